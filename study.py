"""study.py — the lab as a measuring instrument: the whole pipeline over several seeds, each
method's gold score at equal KL with 95% confidence intervals, and which differences between
methods are significant.

One seed of the lab is an example, not a result: RL amplifies the last bit of floating-point
difference, so the same command gives other final numbers on another machine. This script runs
`run_pipeline.sh` once per seed (RUN=OUT/seed-N SEED=N: every stage's seed, SFT to eval; the data
split stays put) and reads what each seed wrote:

    gold at KL k    from each PPO run's per-step log (ppo_token.py --log-gold): the gold score of
                    the rollouts against their KL to the reference, smoothed, read at k = 1, 2, 4
    final gold, KL  eval.py --gold on the held-out test prompts, the final policies
    token credit    eval.py --gold: AUC harm, AUC safe and per-word r of each method's own reward
                    source on held-out replies (and on its own samples, in study.json)

Each figure is given per seed and as mean ± the half-width of a 95% t-interval over the seeds
(t quantile from the Student t distribution, computed here: no scipy). Differences between two
methods are tested on the same seeds' runs, paired: the paired t-test (the differences are assumed
normal; with 5 seeds nothing weaker can reach 5%: the exact sign-flip permutation test, reported
beside it, cannot go below 2/2^5 = 0.0625), two-sided, Holm-corrected over the method pairs of each
figure. A difference is called significant when its Holm-corrected p < --alpha.

The curve. The per-step PPO log can serve as the gold-against-KL curve, and this study uses it:
every iteration samples fresh prompts of the RL split (one seeded permutation, 30 × 16 = 480 of
~875 at demo size: no prompt twice) from the current policy, before that iteration's update, with
eval's sampler (top-p 0.9, temperature 1) and eval's KL (k1, Σ_t per reply, averaged); so each step
is an unbiased estimate on prompts the policy has not trained on yet (of the RL split's
distribution, not the test split's 115 prompts). Evaluating held-out checkpoints instead would cost
a generation pass over the test prompts per checkpoint, more than the PPO run itself on CPU.
One step averages only --rollout-batch-size replies, so the curve is smoothed first: a centred
running mean over --smooth iterations of both KL and gold (the points stay pairs). Gold at KL k
is then the linear interpolation on that smoothed path where it crosses k, averaged over its
crossings (KL may pass k more than once); a run whose smoothed KL never reaches k contributes
nothing there, and the count of runs that did is shown. The study's frontier chart (frontier.svg,
study.html) draws each seed's smoothed value at each KL point faint and the mean over seeds with
its 95% interval.

Commands (the default is the lab at demo size; --jobs 2 runs two seeds at once, one thread each):

    python study.py                          # 5 seeds (0-4): runs/study/study.{json,md,html}
    python study.py --seeds 0 1 2 3 4 5 6 7 --jobs 2
    python study.py --size smoke --seeds 0 1 --out /tmp/study   # the test suite's size
    python study.py --env SOME_SETTING=1     # to run_pipeline.sh (exported variables reach it too)
    python study.py --report-only            # tables and chart from the seeds already run

Resumable: a seed whose eval/results.json already holds every --rewards policy is not run again;
an interrupted seed resumes where it stopped (every stage resumes from its checkpoint). Each seed's
pipeline output is in OUT/seed-N/pipeline.log, its wall time in OUT/seed-N/study_seconds.json.

The PPO runs: seq, red and tlcr (--rewards), the three methods compared. The TLCR ablations
(tlcr_no_negative, tlcr_no_positive) show a mechanism (lengths grow or shrink), not a method to
rank; leaving them out makes a seed 2 PPO runs cheaper, which is what lets 5 seeds fit in an hour on
2 CPU cores. Add them with --rewards when wanted.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import html
import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

import gold
import plumbing
import report
from plumbing import checkpoint

ROOT = Path(__file__).resolve().parent
METHODS = ("seq", "red", "tlcr")


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=plumbing.HelpFormatter)
    run = parser.add_argument_group("runs")
    run.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
        help="one pipeline run per seed (SEED of every stage)",
    )
    run.add_argument(
        "--size", default="demo", choices=["smoke", "demo", "gpt2"], help="run_pipeline.sh SIZE"
    )
    run.add_argument(
        "--rewards", nargs="+", default=list(METHODS),
        help="the PPO runs of each seed (run_pipeline.sh REWARDS); the methods compared",
    )
    run.add_argument(
        "--env", nargs="*", default=[], metavar="NAME=VALUE",
        help="extra settings for run_pipeline.sh (exported variables reach it too)",
    )
    gold.add_lexicon_arg(run)  # run_pipeline.sh LEXICON
    run.add_argument(
        "--jobs", type=int, default=1,
        help="seeds run at once; each gets cores / jobs threads (OMP_NUM_THREADS) unless set",
    )
    run.add_argument(
        "--pipeline", default=str(ROOT / "run_pipeline.sh"), help="the pipeline script"
    )
    run.add_argument(
        "--report-only", action="store_true",
        help="run nothing: tables and chart from the seeds already in --out",
    )
    stats = parser.add_argument_group("statistics")
    stats.add_argument(
        "--kl-points", type=float, nargs="+", default=[1.0, 2.0, 4.0],
        help="KL values at which each run's gold-against-KL curve is read",
    )
    stats.add_argument(
        "--smooth", type=int, default=5,
        help="centred running mean over this many PPO iterations before reading the curve",
    )
    stats.add_argument(
        "--alpha", type=float, default=0.05,
        help="level of the confidence intervals (1 − alpha) and of the significance calls",
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--out", default="runs/study", help="study folder: seed-N/ runs, study.json, study.md"
    )
    args = parser.parse_args(argv)
    plumbing.check_positive(parser, args, "jobs", "smooth")
    args.lexicon_id = gold.load_lexicon(args.lexicon).id  # a bad file stops here, before any run
    if not 0 < args.alpha < 1:
        parser.error(f"--alpha must be in (0, 1), got {args.alpha}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds: a seed given twice in {args.seeds}")
    for item in args.env:
        if "=" not in item or not item.partition("=")[0]:
            parser.error(f"--env: {item!r} is not NAME=VALUE")
    return args


# ----------------------------------------------------------------------------------------------
# 1. Statistics, written out: Student t, intervals, paired tests
# ----------------------------------------------------------------------------------------------
def incomplete_beta(x: float, a: float, b: float) -> float:
    """The regularised incomplete beta function I_x(a, b), by its continued fraction (Lentz's
    method; Numerical Recipes §6.4), used on the side where it converges fast."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - incomplete_beta(1.0 - x, b, a)
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * fraction / a


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| ≥ |t|) for Student's t with df degrees of freedom: I_{df/(df+t²)}(df/2, 1/2)."""
    return incomplete_beta(df / (df + t * t), df / 2, 0.5)


def t_quantile(probability: float, df: float) -> float:
    """The t value with P(T ≤ t) = probability (> 0.5), by bisection on t_two_sided_p."""
    target, low, high = 2 * (1 - probability), 0.0, 1e6  # the two-sided tail mass beyond t
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_two_sided_p(mid, df) > target else (low, mid)
    return (low + high) / 2


def mean_ci(values, alpha=0.05) -> dict:
    """n, mean, sample standard deviation and the half-width of the (1 − alpha) t-interval of the
    mean (None for fewer than two values); None values (a run that never got there) are left out."""
    xs = [v for v in values if v is not None]
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "ci": None}
    mean = sum(xs) / n
    if n == 1:
        return {"n": 1, "mean": mean, "sd": None, "ci": None}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return {
        "n": n,
        "mean": mean,
        "sd": sd,
        "ci": t_quantile(1 - alpha / 2, n - 1) * sd / math.sqrt(n),
    }


def sign_flip_p(differences) -> float:
    """Exact two-sided permutation p of paired differences: under 'no difference' each sign is a
    fair coin; p = share of the 2^n sign patterns whose |mean| reaches the observed one."""
    observed = abs(sum(differences))
    patterns = list(itertools.product((1, -1), repeat=len(differences)))
    hits = sum(
        abs(sum(s * d for s, d in zip(signs, differences))) >= observed - 1e-12
        for signs in patterns
    )
    return hits / len(patterns)


def paired_test(a, b, alpha=0.05) -> dict:
    """The paired t-test of a − b over the seeds both have (None left out): mean difference, its
    (1 − alpha) interval, t, two-sided p, and the exact sign-flip p beside it."""
    differences = [x - y for x, y in zip(a, b) if x is not None and y is not None]
    summary = mean_ci(differences, alpha)
    result = {
        "n": summary["n"],
        "mean_diff": summary["mean"],
        "ci": summary["ci"],
        "t": None,
        "p": None,
        "sign_flip_p": sign_flip_p(differences) if 0 < len(differences) <= 16 else None,
    }
    if summary["n"] >= 2:
        if summary["sd"] > 0:
            result["t"] = summary["mean"] / (summary["sd"] / math.sqrt(summary["n"]))
            result["p"] = t_two_sided_p(result["t"], summary["n"] - 1)
        else:  # every seed the same difference: certain if it is not 0
            result["p"] = 1.0 if summary["mean"] == 0 else 0.0
    return result


def holm(p_values):
    """Holm's step-down adjustment of a family of p-values (None stays None)."""
    order = sorted((p, k) for k, p in enumerate(p_values) if p is not None)
    adjusted, running = [None] * len(p_values), 0.0
    for rank, (p, k) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[k] = running
    return adjusted


# ----------------------------------------------------------------------------------------------
# 2. One run's gold-against-KL curve and its value at fixed KL
# ----------------------------------------------------------------------------------------------
def running_mean(values, window: int) -> list[float]:
    """Centred running mean; the window shrinks at both ends (window 1: the values themselves)."""
    half = window // 2
    return [
        sum(values[max(0, i - half) : i + half + 1]) / len(values[max(0, i - half) : i + half + 1])
        for i in range(len(values))
    ]


def smoothed_curve(log_rows, window: int) -> list[tuple[float, float]]:
    """[(KL, gold)] per PPO iteration, in step order, both smoothed by the same running mean."""
    rows = [
        r
        for r in log_rows
        if isinstance(r.get("kl"), (int, float)) and isinstance(r.get("gold_score"), (int, float))
    ]
    rows.sort(key=lambda r: r.get("step", 0))
    return list(
        zip(
            running_mean([r["kl"] for r in rows], window),
            running_mean([r["gold_score"] for r in rows], window),
        )
    )


def gold_at_kl(curve, kl: float):
    """Gold where the path [(KL, gold)] crosses KL = kl, linearly interpolated and averaged over its
    crossings; None when the path never reaches kl."""
    values = [g for k, g in curve if k == kl]  # points exactly at kl, each once
    for (k0, g0), (k1, g1) in itertools.pairwise(curve):
        if (k0 - kl) * (k1 - kl) < 0:  # a segment strictly across kl
            values.append(g0 + (kl - k0) / (k1 - k0) * (g1 - g0))
    return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------------------------
# 3. Running the seeds
# ----------------------------------------------------------------------------------------------
def seed_dir(args, seed) -> Path:
    return Path(args.out) / f"seed-{seed}"


def seed_done(args, seed) -> bool:
    """A seed is done when its eval results hold every --rewards policy."""
    path = seed_dir(args, seed) / "eval" / "results.json"
    if not path.exists():
        return False
    policies = json.loads(path.read_text()).get("policies", {})
    return all(reward in policies for reward in args.rewards)


def pipeline_env(args) -> dict:
    """The environment of run_pipeline.sh: ours, --env, the lab (TASK=gold), size and rewards."""
    env = dict(os.environ)
    env.update(item.partition("=")[::2] for item in args.env)
    env.update(
        TASK="gold",
        SIZE=args.size,
        REWARDS=" ".join(args.rewards),
        PYTHON=env.get("PYTHON", sys.executable),
        LEXICON=str(Path(args.lexicon).resolve()) if args.lexicon else "",  # "": the default
    )
    if args.jobs > 1 and "OMP_NUM_THREADS" not in env:  # seeds side by side: share the cores out
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    return env


def run_seed(args, seed) -> float:
    """run_pipeline.sh for one seed, output to OUT/seed-N/pipeline.log; returns the wall seconds."""
    folder = seed_dir(args, seed)
    folder.mkdir(parents=True, exist_ok=True)
    env = {**pipeline_env(args), "RUN": str(folder), "SEED": str(seed)}
    start = time.time()
    with open(folder / "pipeline.log", "a", encoding="utf-8") as log:
        done = subprocess.run(
            ["bash", args.pipeline], env=env, stdout=log, stderr=subprocess.STDOUT, check=False
        )
    seconds = time.time() - start
    if done.returncode != 0:
        raise RuntimeError(
            f"seed {seed}: run_pipeline.sh failed (exit {done.returncode}); see "
            f"{folder / 'pipeline.log'}, then run the study again (it resumes)"
        )
    checkpoint.atomic_write(
        folder / "study_seconds.json",
        json.dumps({"seconds": round(seconds, 1), "size": args.size, "rewards": args.rewards})
        + "\n",
    )
    return seconds


def run_seeds(args):
    """Every seed not done yet, --jobs at a time."""
    todo = [seed for seed in args.seeds if not seed_done(args, seed)]
    for seed in args.seeds:
        if seed not in todo:
            print(f"seed {seed}: done already ({seed_dir(args, seed)}), not run again")
    if not todo:
        return
    bar = tqdm(total=len(todo), desc="study seeds", unit="seed")
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run_seed, args, seed): seed for seed in todo}
        for future in concurrent.futures.as_completed(futures):
            seconds = future.result()  # a failed seed stops the study with its log's path
            bar.write(f"seed {futures[future]}: finished in {seconds:.0f} s")
            bar.update(1)
    bar.close()


# ----------------------------------------------------------------------------------------------
# 4. Reading the seeds: one record per seed and method
# ----------------------------------------------------------------------------------------------
def seed_record(args, seed) -> dict:
    """{method: {figure: value}} of one finished seed, and "_seed": time, reward model, ..."""
    folder = seed_dir(args, seed)
    results = json.loads((folder / "eval" / "results.json").read_text())
    credit = results.get("credit") or {"heldout": {"by_source": {}}, "samples": {}}
    record = {}
    for method in ["sft", *args.rewards]:
        policy = results["policies"].get(method, {})
        row = {"final_gold": policy.get("gold_score"), "final_kl": policy.get("kl")}
        if method != "sft":
            curve = smoothed_curve(
                checkpoint.read_jsonl_tolerant(folder / f"ppo_{method}" / "log.jsonl"), args.smooth
            )
            row["max_kl"] = max((k for k, _ in curve), default=None)
            row["curve"] = curve
            row.update({f"gold_at_kl_{kl:g}": gold_at_kl(curve, kl) for kl in args.kl_points})
            held = credit["heldout"]["by_source"].get(method, {})
            own = credit["samples"].get(method, {}).get(method, {})
            row.update(
                {f"heldout_{k}": held.get(k) for k in ("auc_harm", "auc_safe", "word_r", "reply_r")}
            )
            row.update(
                {
                    f"samples_{k}": own.get(k)
                    for k in ("auc_harm", "auc_safe", "word_r", "harm_tokens", "safe_tokens")
                }
            )
        record[method] = row
    timing = folder / "study_seconds.json"
    rm_accuracy = folder / "reward_model" / "accuracy.json"
    record["_seed"] = {
        "seconds": json.loads(timing.read_text())["seconds"] if timing.exists() else None,
        "reward_model_accuracy": json.loads(rm_accuracy.read_text()).get("accuracy")
        if rm_accuracy.exists()
        else None,
        "discriminator_accuracy": (results.get("discriminator_accuracy") or {}).get("accuracy"),
    }
    return record


def figures(args) -> list[tuple[str, str, str]]:
    """(key, label, format) of every figure the study summarises, in table order."""
    return [(f"gold_at_kl_{kl:g}", f"gold at KL {kl:g}", "{:+.3f}") for kl in args.kl_points] + [
        ("final_gold", "held-out gold (end)", "{:+.3f}"),
        ("final_kl", "held-out KL (end)", "{:.2f}"),
        ("heldout_auc_harm", "AUC harm (held-out)", "{:.3f}"),
        ("heldout_auc_safe", "AUC safe (held-out)", "{:.3f}"),
        ("heldout_word_r", "per-word r (held-out)", "{:+.3f}"),
        ("samples_auc_harm", "AUC harm (own samples)", "{:.3f}"),
        ("samples_auc_safe", "AUC safe (own samples)", "{:.3f}"),
    ]


def summarise(args, records: dict) -> dict:
    """Per figure and method: the per-seed values, n, mean and CI; per figure: the paired tests."""
    summary, comparisons = {}, {}
    for key, _, _ in figures(args):
        summary[key] = {}
        for method in ["sft", *args.rewards]:
            values = [records[seed][method].get(key) for seed in args.seeds]
            if method == "sft" and all(v is None for v in values):
                continue
            summary[key][method] = {**mean_ci(values, args.alpha), "values": values}
        pairs = list(itertools.combinations(args.rewards, 2))
        tests = [
            {
                "a": a,
                "b": b,
                **paired_test(summary[key][a]["values"], summary[key][b]["values"], args.alpha),
            }
            for a, b in pairs
        ]
        for test, adjusted in zip(tests, holm([t["p"] for t in tests])):
            test["p_holm"] = adjusted
            test["significant"] = adjusted is not None and adjusted < args.alpha
        comparisons[key] = tests
    return {"summary": summary, "comparisons": comparisons}


# ----------------------------------------------------------------------------------------------
# 5. Output: study.json, study.md, frontier.svg, study.html
# ----------------------------------------------------------------------------------------------
def fmt(value, pattern):
    return "—" if value is None else pattern.format(value)


def study_tables(args, study) -> list[tuple[str, list[str], list[list[str]]]]:
    """[(title, header, rows)]: the summary, the per-seed values, the tests."""
    level, seeds = f"{1 - args.alpha:.0%}", args.seeds
    head = ["method"] + [label for _, label, _ in figures(args)]
    summary_rows = []
    for method in ["sft", *args.rewards]:
        row = [method]
        for key, _, pattern in figures(args):
            s = study["summary"][key].get(method)
            if s is None or s["n"] == 0:
                row.append("—")
                continue
            cell = fmt(s["mean"], pattern) + (
                f" ± {pattern.format(s['ci']).lstrip('+')}" if s["ci"] else ""
            )
            row.append(cell + (f" ({s['n']}/{len(seeds)})" if s["n"] < len(seeds) else ""))
        summary_rows.append(row)
    seed_rows = [
        [f"{method} · {label}", *[fmt(v, pattern) for v in study["summary"][key][method]["values"]]]
        for key, label, pattern in figures(args)
        for method in ["sft", *args.rewards]
        if method in study["summary"][key]
    ]
    test_rows = [
        [
            label,
            f"{t['a']} − {t['b']}",
            str(t["n"]),
            fmt(t["mean_diff"], "{:+.3f}"),
            fmt(t["ci"], "± {:.3f}"),
            fmt(t["t"], "{:+.2f}"),
            fmt(t["p"], "{:.3g}"),
            fmt(t["p_holm"], "{:.3g}"),
            fmt(t["sign_flip_p"], "{:.3g}"),
            "yes" if t["significant"] else "no",
        ]
        for key, label, _ in figures(args)
        for t in study["comparisons"][key]
    ]
    return [
        (
            f"Mean ± {level} t-interval over {len(seeds)} seeds ({', '.join(map(str, seeds))}); "
            "(k/n): only k of the n seeds' runs reached that KL or had that class",
            head,
            summary_rows,
        ),
        ("Per seed", ["method · figure", *[f"seed {s}" for s in seeds]], seed_rows),
        (
            "Paired differences over seeds: paired t-test, two-sided, Holm-corrected over the "
            f"method pairs of each figure; significant: Holm p < {args.alpha:g}. Sign-flip: the "
            "exact permutation p (its floor with n seeds is 2/2^n)",
            [
                "figure", "difference", "seeds", "mean", f"{level} CI", "t", "p", "Holm p",
                "sign-flip p", "significant",
            ],
            test_rows,
        ),
    ]


def study_markdown(args, study, records) -> str:
    lines = [
        f"# Study: {len(args.seeds)} seeds of the lab "
        f"(SIZE={args.size}, PPO runs: {' '.join(args.rewards)})",
        "",
        f"Gold at KL k: each PPO run's per-step log, smoothed over {args.smooth} iterations, read "
        "where its KL crosses k (study.py's docstring says why and how). Held-out: eval.py --gold "
        "on the test split. Credit: each method's own reward source on held-out replies (AUC 0.5 "
        "= chance).",
    ]
    for title, head, rows in study_tables(args, study):
        lines += ["", f"{title}:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += [
            "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows
        ]
    seconds = [records[s]["_seed"]["seconds"] for s in args.seeds]
    facts = []
    for seed, seconds_of_seed in zip(args.seeds, seconds):
        known = records[seed]["_seed"]
        facts.append(
            f"seed {seed}: reward model held-out accuracy "
            f"{fmt(known['reward_model_accuracy'], '{:.1%}')}, discriminator token accuracy "
            f"{fmt(known['discriminator_accuracy'], '{:.1%}')}, "
            f"pipeline {fmt(seconds_of_seed, '{:.0f} s')}"
        )
    lines += ["", "Per seed:", ""] + [f"- {fact}" for fact in facts]
    if args.env:
        lines += ["", f"Settings passed to run_pipeline.sh: {' '.join(args.env)}"]
    return "\n".join(lines) + "\n"


FRONTIER_GRID = [0.25 * k for k in range(1, 81)]  # KL 0.25, 0.5, …, 20: where the chart reads


def frontier_svg(args, study, records) -> str:
    """Per method: the mean over seeds of the gold at KL 0.25, 0.5, … (each seed's smoothed curve
    read as in the tables) ± its CI, joined, wherever at least three seeds' runs got that far (two
    with fewer seeds: with two, t = 12.7 makes every interval span the chart); behind it, faint,
    every seed's smoothed curve (one point per PPO iteration)."""
    series, points = {}, {}
    min_seeds = 3 if len(args.seeds) >= 3 else 2
    for method in args.rewards:
        curves = [records[seed][method]["curve"] for seed in args.seeds]
        series[method] = []
        for kl in FRONTIER_GRID:
            summary = mean_ci([gold_at_kl(curve, kl) for curve in curves], args.alpha)
            if summary["n"] >= min_seeds:
                series[method].append((kl, summary["mean"], summary["ci"]))
        points[method] = [point for curve in curves for point in curve]
    return report.frontier_chart_svg(
        f"gold against KL, {len(args.seeds)} seeds",
        series,
        points=points,
        note=f"mean ± {1 - args.alpha:.0%} CI where ≥ {min_seeds} seeds reached the KL; "
        "faint: each seed's curve",
        width=460,
    )


def study_html(args, study, records, svg) -> str:
    body = [
        f"<h1>Study: {len(args.seeds)} seeds of the lab</h1>",
        f"<p>SIZE={html.escape(args.size)}, PPO runs: {html.escape(' '.join(args.rewards))}. "
        f"Curves smoothed over {args.smooth} iterations.</p>",
        svg,
    ]
    body += [
        f"<h3>{html.escape(title)}</h3>" + report.html_table(head, rows)
        for title, head, rows in study_tables(args, study)
    ]
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "table.results{border-collapse:collapse;font-size:13px}"
        "table.results td,table.results th{border:1px solid #bbb;padding:3px 6px;text-align:right}"
        "svg.curve{font-size:10px;background:#fafafa}"
        "svg .axis{stroke:#888}svg .title{font-size:12px;font-weight:600}svg .note{fill:#666}"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>token-rlhf study</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_outputs(args, records, study):
    out = Path(args.out)
    config = {
        "seeds": args.seeds,
        "size": args.size,
        "rewards": args.rewards,
        "lexicon": args.lexicon_id,
        "env": args.env,
        "kl_points": args.kl_points,
        "smooth": args.smooth,
        "alpha": args.alpha,
        "test": "paired t-test over seeds, two-sided, Holm-corrected per figure; "
        "exact sign-flip p beside",
    }
    per_seed = {str(seed): records[seed] for seed in args.seeds}
    checkpoint.atomic_write(
        out / "study.json",
        json.dumps({"config": config, **study, "per_seed": per_seed}, indent=1) + "\n",
    )
    checkpoint.atomic_write(out / "study.md", study_markdown(args, study, records))
    svg = frontier_svg(args, study, records)
    checkpoint.atomic_write(out / "frontier.svg", svg + "\n")
    checkpoint.atomic_write(out / "study.html", study_html(args, study, records, svg))
    print(study_markdown(args, study, records))
    written = ", ".join(str(out / name) for name in ("study.json", "study.md", "study.html"))
    print(f"wrote {written}, {out / 'frontier.svg'}")


def main(argv=None):
    args = parse_args(argv)
    if not args.report_only:
        run_seeds(args)
    missing = [seed for seed in args.seeds if not seed_done(args, seed)]
    if missing:
        raise SystemExit(
            f"study.py: seeds {missing} have no finished run in {args.out}; "
            "run without --report-only"
        )
    records = {seed: seed_record(args, seed) for seed in args.seeds}
    study = summarise(args, records)
    write_outputs(args, records, study)
    return {"records": records, **study}


if __name__ == "__main__":
    plumbing.cli(main)
