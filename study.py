"""study.py — the lab decides: does token-level credit give a better policy at the same distance
from the reference? Every method brought to the same KL targets, every run counted, the answer with
a confidence interval, in under an hour on 2 CPU cores.

The design (declared here, before any result; docs/lab.md, "The study"; revised on 2026-12-06
from the first studies' variance, before the studies on seeds 10-17: 8 × 2 seeds, the straight-line
reading; revised again on 2026-12-07 from those studies' variance, before the study on seeds 20-27:
PPO seeds per method, 8 replies a prompt; and a fourth time on 2026-12-07, from the harm study on
seeds 20-31 and with each seed 1.6× cheaper, before the study on seeds 40-54: 15 upstream seeds, 4
replies a prompt):

    upstream seeds  --seeds U (default 0-14): each trains its own reward model (redistribute.py) and
                    token discriminator (discriminator.py) with --seed U, from one SFT model and one
                    label file shared by all (sft.py --seed 0, label.py: the gold reviser is
                    deterministic). The upstream seed is the unit of replication: the models that
                    differ between methods are what varies between seeds.
    PPO runs        per upstream seed, per method (seq, red, tlcr) and per PPO seed P of that
                    method's --ppo-seeds (default seq 2, red 1, tlcr 4: on seeds 10-17 seq's and
                    RED's runs of one upstream seed differed by no more than the eval's own
                    sampling error, TLCR's by twice as much, docs/lab.md; ppo_token.py --seed
                    U + 1000·P: the same prompt order and sampling seeds for every method of a
                    (U, P), common random numbers), fixed β = 0.1,
                    until the rollouts' KL (trailing mean over 3 iterations) has reached every
                    target of --kl-targets (--save-at-kl, --stop-at-kl; --max-iterations caps the
                    run). The policy is saved whole where it first reaches each target.
                    (ppo_token.py also has the adaptive KL controller, --kl-target; the study keeps
                    β fixed, so every method optimises the papers' objective and one run reaches
                    every target.)
    primary         held-out gold at each KL target: eval.py --gold-only on the whole test
    endpoint        split (115 prompts), --samples-per-prompt K replies a prompt (4: 460 replies),
                    the same seed for every policy of the study (the same prompts and random
                    draws; the SFT model, one for all seeds, is scored once). A snapshot's held-out
                    KL misses its target (measured at demo size, seed 0: seq 0.62 and 1.17, red 0.53
                    and 0.85 for targets 0.5 and 1: the rollout KL that triggers a snapshot is a
                    mean over 48 replies of the RL split), so a run's value is its held-out
                    frontier read at exactly the target: the points (0, SFT gold) and (held-out KL,
                    held-out gold) of its snapshots joined by straight lines in d = √KL, read
                    between the two points around the target (gold_at_target); above the run's
                    largest held-out KL, that snapshot's gold, never extrapolated (the run is
                    listed as short of the target). Beside it, as sensitivity checks (raw p): the
                    snapshots' own gold, and R(d) below fitted through the same points (the
                    reading first declared; on the first studies its curvature added noise). An
                    upstream seed's value is the mean over its PPO seeds.
                    A run that never reaches a target has no snapshot there: it is listed with the
                    KL it reached and its final policy's held-out gold and KL (never dropped
                    silently), and its upstream seed leaves the comparison at that target only if
                    none of its PPO seeds reached it (every test prints its n).
    comparisons     tlcr − seq and red − seq at every target, paired over the upstream seeds: the
                    paired t-test, two-sided, its (1 − alpha) interval and the exact sign-flip p
                    beside it. The primary family is methods × targets (2 × 2 by default): Holm's
                    step-down adjustment over the whole family; "significant" means Holm p < alpha.
                    Every p is labelled raw or Holm. MDD: the minimal difference detectable with 80%
                    power by this design, (t_{1−α/2,n−1} + t_{0.8,n−1})·sd/√n (sd of the paired
                    differences); and the upstream seeds an interval of ±--half-width (0.03 gold)
                    would need at that sd.
    secondary       the all-steps frontier: per run, gold against KL over every logged iteration
    endpoint        fitted by R(d) = d(α − β·log d), d = √KL (Gao et al. 2022; gold measured from
                    the SFT level g0, the mean gold of the first rollouts of all runs, at KL 0), a
                    linear least-squares fit on the features d and −d·log d; compared as the mean
                    gain over KL in [0, the largest target] (the area under the fitted curve divided
                    by its width), paired as above, Holm over its own 2 comparisons.
    exploratory     everything else, labelled so: the rollout gold read off the smoothed training
                    log at --kl-points (the old reading), and the token credit of each method's
                    reward source (--credit: eval.py --gold on each method's policy at the last
                    target: AUC harm, AUC safe, per-word r, per-reply r on held-out replies and on
                    own samples).
                    Credit is compared between tlcr and red only: seq puts its whole reward on the
                    last token, so its credit is chance by construction and is never tested.
                    With ≥ 2 PPO seeds, where each primary difference varies: each method's spread
                    between the PPO seeds of one upstream seed, the eval's sampling error inside
                    it, the spread between upstream seeds (variance_components), and the upstream
                    seeds a ±--half-width interval would need with this design's PPO seeds or with
                    1, 2 or 4.

Each stage is the command a student would type, printed and logged (OUT/logs/), and resumable: a
stage with a marker in OUT/stages/ is done and not run again (an eval, unless its policies changed:
a study extended with more --ppo-seeds evaluates again); an interrupted one resumes from its
checkpoint. --jobs stages run at once with cores / jobs threads each (SFT, which runs alone, gets
every core); of the stages ready at once, the upstream models and PPO runs start before the evals
(one a seed and target), which then end the study on every job. The plan (stage seconds × counts /
jobs) is printed before anything runs, the measured wall time of every stage after.

    python study.py --jobs 2                             # the default design: runs/study/
    python study.py --plan-only                          # the time plan, nothing run
    python study.py --seeds 10 11 12 13 14 15 16 17 --lexicon data/lexicon-sentiment.json --jobs 2
    python study.py --size smoke --seeds 0 1 --out /tmp/study   # the test suite's size
    python study.py --report-only                        # tables and chart from the runs in --out
"""

from __future__ import annotations

import argparse
import concurrent.futures
import html
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gold
import plumbing
import report
from plumbing import checkpoint

ROOT = Path(__file__).resolve().parent
METHODS = ("seq", "red", "tlcr")
BASELINE = "seq"  # the sequence-level reward: what token-level credit is compared with

# The stages' settings per --size: run_pipeline.sh's lab presets (TASK=gold), except PPO, which runs
# to the KL targets instead of a fixed number of iterations, and eval, which scores gold only.
PRESETS = {
    "smoke": {
        "sft": "--tiny-layers 1 --tiny-width 32 --tiny-vocab 512 --max-prompt-len 48 "
               "--max-response-len 32 --limit 60 --max-steps 6 --lr 3e-3 --batch-size 8 "
               "--micro-batch-size 8 --eval-examples 16",
        "label": "--limit 40 --max-response-len 32",
        "discriminator": "--epochs 2 --lr 1e-3 --max-prompt-len 48 --max-response-len 32 "
                         "--batch-size 8 --micro-batch-size 8",
        "reward_model": "--limit 40 --epochs 1 --lr 1e-3 --max-prompt-len 48 --max-response-len 32 "
                        "--batch-size 8 --micro-batch-size 8",
        "ppo": "--rollout-batch-size 4 --minibatch-size 4 --ppo-epochs 1 --max-prompt-len 48 "
               "--max-new-tokens 12 --policy-lr 3e-3 --critic-lr 1e-4",
        "eval": "--num-prompts 8 --max-prompt-len 48 --max-new-tokens 12 --eval-batch-size 16",
    },
    "demo": {
        "sft": "--tiny-layers 2 --tiny-width 128 --tiny-vocab 4096 --max-prompt-len 192 "
               "--max-response-len 96 --epochs 8 --lr 3e-3 --batch-size 16 --micro-batch-size 16 "
               "--eval-every 25 --eval-examples 128 --eval-batch-size 16",
        "label": "--max-response-len 96",
        "discriminator": "--epochs 20 --lr 2e-3 --max-prompt-len 192 --max-response-len 96 "
                         "--batch-size 32 --micro-batch-size 32",
        "reward_model": "--epochs 3 --lr 1e-3 --max-prompt-len 192 --max-response-len 96 "
                        "--batch-size 16 --micro-batch-size 16",
        "ppo": "--rollout-batch-size 16 --minibatch-size 8 --ppo-epochs 2 --max-prompt-len 192 "
               "--max-new-tokens 48 --policy-lr 5e-5 --critic-lr 1e-4",
        "eval": "--num-prompts 115 --max-prompt-len 192 --max-new-tokens 48 --eval-batch-size 32",
    },
}
# Seconds of each stage on an idle 2-core machine, two stages at once at one thread each (--jobs 2;
# SFT alone, both threads); ppo is per iteration plus the start, eval per policy (at
# --samples-per-prompt 4, scaled by K / 4) plus the start. demo: measured in the harm study on
# seeds 40-54 (2026-12-07, the fourth design, docs/lab.md), after the tiny model lost its attention
# dropout and took the fused GELU and eval.py its sampler's log-probabilities: sft 70 s, reward
# model 49 and discriminator 109 (means of 15), PPO a least-squares line over its 105 runs (6.3 s +
# 1.35 s an iteration), eval 63.6 s for 7 policies at K = 4 (30 evals) with the start of the timing
# study on seeds 90-91 (5.5 s: sft_eval's 21 s for one policy at K = 8 against 114-121 s for 7).
# credit: an earlier study's (one thread, before these changes).
STAGE_SECONDS = {
    "smoke": {"sft": 5, "label": 3, "reward_model": 5, "discriminator": 5, "ppo_start": 5,
              "ppo_iteration": 0.2, "eval_start": 5, "eval_policy": 0.5, "credit": 8},
    "demo": {"sft": 70, "label": 4, "reward_model": 49, "discriminator": 109, "ppo_start": 6.3,
             "ppo_iteration": 1.35, "eval_start": 5.5, "eval_policy": 8.3, "credit": 50},
}
# iterations to reach the last target, KL 1 (demo: the same study's means, 30 to 60 runs a method:
# seq 10.2, red 9.8, tlcr 17.9; on the sentiment lexicon tlcr took 28.9 on seeds 20-27 with the
# SFT model of before, which the plan of a sentiment study leaves out)
EXPECTED_ITERATIONS = {"smoke": {"seq": 4, "red": 4, "tlcr": 4},
                       "demo": {"seq": 10, "red": 10, "tlcr": 18}}
# PPO seeds per upstream seed (the design's third revision, 2026-12-07, from the studies on seeds
# 10-17; docs/lab.md): the held-out eval's own sampling error (sd 0.023-0.027 a policy at 4 replies
# a prompt) was all of seq's and RED's spread between PPO seeds, while TLCR's was twice that: more
# replies a prompt (8) serve every method, more PPO runs only TLCR.
DEFAULT_PPO_SEEDS = {"seq": 2, "red": 1, "tlcr": 4}
# Upstream seeds and replies a prompt (the fourth revision, 2026-12-07, from the harm study on seeds
# 20-31; docs/lab.md): there, the upstream seed's spread of tlcr − seq at KL 1 (sd 0.036-0.047)
# was most of the interval, the eval's error (0.017-0.021 a policy at K = 8) a small part. With
# each seed 1.6× cheaper (the tiny model without attention dropout, the fused GELU, eval's
# sampler log-probabilities), the hour buys 15 upstream seeds at K = 4 rather than 12 at K = 8
# (bench/study_design.py: ±0.029 against ±0.031 projected at KL 1, both planned at 55 min). The
# study on seeds 40-54 took 59.7 min and gave ±0.027.
DEFAULT_SEEDS = 15
DEFAULT_SAMPLES_PER_PROMPT = 4


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=plumbing.HelpFormatter)
    run = parser.add_argument_group("design")
    run.add_argument("--seeds", type=int, nargs="+", default=list(range(DEFAULT_SEEDS)),
                     help="upstream seeds: each trains its own reward model and discriminator "
                          "(--seed U); the unit of the paired comparisons (default 0-14: the "
                          "design's fourth revision)")
    run.add_argument("--ppo-seeds", nargs="+", default=[f"{m}={n}" for m, n in
                                                         DEFAULT_PPO_SEEDS.items()],
                     metavar="[METHOD=]N",
                     help="PPO runs per upstream seed (--seed U + 1000·P), averaged within the "
                          "upstream seed: N for every method, METHOD=N for one (a method not "
                          "named keeps its default); the default gives the noisiest method the "
                          "most (docs/lab.md, the design's third revision)")
    run.add_argument("--size", default="demo", choices=sorted(PRESETS), help="stage presets")
    run.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
        help=f"the PPO rewards compared; each one but {BASELINE} is compared with {BASELINE}")
    run.add_argument("--kl-targets", type=float, nargs="+", default=[0.5, 1.0],
                     help="KL to the reference at which every run is saved and scored (the primary "
                          "endpoint)")
    run.add_argument("--samples-per-prompt", type=int, default=DEFAULT_SAMPLES_PER_PROMPT,
                     help="held-out replies per test prompt and policy (eval.py "
                          "--samples-per-prompt)")
    gold.add_lexicon_arg(run)  # run_pipeline.sh LEXICON
    run.add_argument("--max-iterations", type=int, default=0,
                     help="PPO iterations a run may take to reach the last target (0: 90 at demo, "
                          "8 at smoke)")
    run.add_argument("--credit", action=argparse.BooleanOptionalAction, default=False,
                     help="also measure the token credit of every method (eval.py --gold on each "
                          "method's policy at the last target, one reply a prompt; 50 s a seed); "
                          "exploratory, and off by default: it does not serve the policy "
                          "comparison")
    system = parser.add_argument_group("running")
    system.add_argument("--jobs", type=int, default=1,
                        help="stages run at once; each gets cores / jobs threads (OMP_NUM_THREADS) "
                             "unless set")
    system.add_argument("--report-only", action="store_true",
                        help="run nothing: tables and chart from the stages already done in --out")
    system.add_argument("--plan-only", action="store_true",
                        help="print the design and its time plan, run nothing")
    stats = parser.add_argument_group("statistics")
    stats.add_argument("--alpha", type=float, default=0.05,
                       help="level of the intervals (1 − alpha) and of the calls: significant = "
                            "Holm-adjusted p < alpha, Holm over the primary family (every method × "
                            "every target)")
    stats.add_argument("--power", type=float, default=0.8,
                       help="power of the minimal detectable difference (MDD) printed per test")
    stats.add_argument("--half-width", type=float, default=0.03,
                       help="the interval the design aims at: each primary test also prints the "
                            "upstream seeds a (1 − alpha) interval this narrow would need at the "
                            "sd of its paired differences")
    stats.add_argument("--kl-points", type=float, nargs="*", default=None,
                       help="exploratory: KL values at which the smoothed training log is read "
                            "(default: --kl-targets)")
    stats.add_argument("--smooth", type=int, default=5,
                       help="exploratory: centred running mean over this many PPO iterations "
                            "before that reading")
    out = parser.add_argument_group("output")
    out.add_argument("--out", default="runs/study",
                     help="study folder: sft/, up-U/, stages/, logs/, study.*")
    args = parser.parse_args(argv)
    plumbing.check_positive(parser, args, "jobs", "smooth", "samples_per_prompt")
    if not 0 < args.alpha < 1 or not 0.5 < args.power < 1:
        parser.error(f"--alpha must be in (0, 1) and --power in (0.5, 1), got {args.alpha}, "
                     f"{args.power}")
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        parser.error(f"--seeds: each seed once, none negative, got {args.seeds}")
    if BASELINE not in args.methods or len(set(args.methods)) < 2:
        parser.error(f"--methods must hold {BASELINE} and at least one other, got {args.methods}")
    if any(kl <= 0 for kl in args.kl_targets):
        parser.error(f"--kl-targets must be > 0, got {args.kl_targets}")
    args.methods = list(dict.fromkeys(args.methods))
    args.ppo_seeds = parse_ppo_seeds(parser, args.ppo_seeds, args.methods)
    args.kl_targets = sorted(set(args.kl_targets))
    args.kl_points = args.kl_targets if args.kl_points is None else args.kl_points
    args.max_iterations = args.max_iterations or {"smoke": 8, "demo": 90}[args.size]
    args.lexicon_id = gold.load_lexicon(args.lexicon).id  # a bad file stops here, before any run
    return args



def parse_ppo_seeds(parser, words: list[str], methods: list[str]) -> dict[str, int]:
    """--ppo-seeds words → {method: PPO seeds}: the defaults, then a bare N for every method, then
    METHOD=N for one."""
    counts = {m: DEFAULT_PPO_SEEDS.get(m, 1) for m in methods}
    for word in sorted(words, key=lambda w: "=" in w):  # the bare N first: METHOD=N wins
        method, _, number = word.rpartition("=")
        if method and method not in METHODS or not number.isdigit() or int(number) < 1:
            parser.error(f"--ppo-seeds: expected N or METHOD=N with N ≥ 1 and METHOD one of "
                         f"{', '.join(METHODS)}, got {word!r}")
        for m in ([method] if method else methods):
            if m in counts:
                counts[m] = int(number)
    return counts


def config_ppo_seeds(config: dict) -> dict[str, int]:
    """A study.json config's PPO seeds per method (one count for every method in the studies made
    before 2026-12-07)."""
    counts = config["ppo_seeds"]
    return dict(counts) if isinstance(counts, dict) else {m: counts for m in config["methods"]}


def ppo_design(args) -> str:
    """The PPO seeds per method in words: "seq 2, red 1, tlcr 4 PPO seeds"."""
    return ", ".join(f"{m} {args.ppo_seeds[m]}" for m in args.methods) + " PPO seeds"


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
    """The paired t-test of a − b over the seeds both have (None left out): mean difference, the sd
    of the differences, its (1 − alpha) interval, t, two-sided p, and the exact sign-flip p beside
    it."""
    differences = [x - y for x, y in zip(a, b) if x is not None and y is not None]
    summary = mean_ci(differences, alpha)
    result = {
        "n": summary["n"],
        "mean_diff": summary["mean"],
        "sd": summary["sd"],
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


def mdd(sd, n: int, alpha=0.05, power=0.8):
    """The minimal detectable difference of the paired t-test at this power, two-sided level alpha:
    MDD = (t_{1−α/2, n−1} + t_{power, n−1})·sd/√n (sd of the paired differences); None for n < 2."""
    if sd is None or n < 2:
        return None
    return (t_quantile(1 - alpha / 2, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n)


def seeds_for_half_width(sd, half_width: float, alpha=0.05):
    """The fewest paired seeds n whose (1 − alpha) t-interval, t_{1−α/2, n−1}·sd/√n, is at most
    half_width, at this sd of the paired differences (a planning figure: sd is itself estimated);
    None without a finite sd. The search starts at the normal-quantile answer (z·sd/half_width)²,
    a lower bound since t > z, so a huge sd (a degenerate fit) costs a few steps, not millions;
    beyond 10⁵ seeds t ≈ z and that bound is the answer."""
    if sd is None or not math.isfinite(sd) or half_width <= 0:
        return None
    z = statistics.NormalDist().inv_cdf(1 - alpha / 2)
    n = max(2, math.ceil((z * sd / half_width) ** 2))
    if n > 100_000:
        return n
    while t_quantile(1 - alpha / 2, n - 1) * sd / math.sqrt(n) > half_width:
        n += 1
    return n


def compare(a, b, alpha=0.05, power=0.8, half_width=0.03) -> dict:
    """paired_test of a − b plus the MDD and the seeds a ±half_width interval would need; a group
    without values (n = 0 on either side, or fewer than two pairs) is not tested: p None and the
    reason."""
    test = paired_test(a, b, alpha)
    test["mdd"] = mdd(test["sd"], test["n"], alpha, power)
    test["seeds_for_half_width"] = seeds_for_half_width(test["sd"], half_width, alpha)
    test["not_tested"] = None
    if test["n"] < 2:
        test.update(p=None, t=None, sign_flip_p=None,
                    not_tested=f"n = {test['n']} paired value{'s' * (test['n'] != 1)}")
    return test


def adjust_family(tests, alpha=0.05):
    """Holm over one family of tests (each a compare() dict): p_holm and significant added."""
    for test, adjusted in zip(tests, holm([t["p"] for t in tests])):
        test["p_holm"] = adjusted
        test["significant"] = adjusted is not None and adjusted < alpha
    return tests


# ----------------------------------------------------------------------------------------------
# 3. The all-steps frontier: R(d) = d(α − β·log d), d = √KL (Gao et al. 2022)
# ----------------------------------------------------------------------------------------------
def fit_frontier(kls, golds, g0: float):
    """Least squares of gold − g0 = α·d + β·(−d·log d), d = √max(KL, 0) (linear in α, β: the 2×2
    normal equations). Returns (alpha, beta), or None when the features are collinear (fewer than
    two distinct d > 0)."""
    rows = [(math.sqrt(max(k, 0.0)), g - g0) for k, g in zip(kls, golds)]
    features = [(d, -d * math.log(d) if d > 0 else 0.0, y) for d, y in rows]
    s11 = sum(f1 * f1 for f1, _, _ in features)
    s12 = sum(f1 * f2 for f1, f2, _ in features)
    s22 = sum(f2 * f2 for _, f2, _ in features)
    s1y = sum(f1 * y for f1, _, y in features)
    s2y = sum(f2 * y for _, f2, y in features)
    det = s11 * s22 - s12 * s12
    if det <= 1e-12 * max(s11 * s22, 1e-300):
        return None
    return (s22 * s1y - s12 * s2y) / det, (s11 * s2y - s12 * s1y) / det


def frontier_gain(alpha: float, beta: float, kl: float) -> float:
    """R(√kl) = d(α − β·log d), the gold gained over the SFT level at this KL."""
    d = math.sqrt(max(kl, 0.0))
    return d * (alpha - beta * math.log(d)) if d > 0 else 0.0


def frontier_mean_gain(alpha: float, beta: float, kl_max: float) -> float:
    """(1/K)∫_0^K R(√k) dk, the area under the fitted curve up to K = kl_max over its width. With
    k = d², dk = 2d·dd: ∫_0^D 2d²(α − β·log d) dd = 2αD³/3 − 2β(D³·log D/3 − D³/9), over D²."""
    d = math.sqrt(kl_max)
    return 2 * alpha * d / 3 - 2 * beta * (d * math.log(d) / 3 - d / 9)


def gold_at_target(points, g_sft: float, target: float):
    """Held-out gold at exactly KL = target (the primary reading), off one run's held-out frontier:
    the SFT model's point (0, g_sft) and the run's snapshots (held-out KL, held-out gold), joined
    by straight lines in d = √KL and read at d = √target between the two points around it.
    Never extrapolated: above the run's largest held-out KL the reading is that snapshot's gold
    (the run is listed as short of the target, short_of_target). Snapshots at one KL are averaged;
    snapshots whose held-out KL is not above 0 (a tiny model that barely moved, k1 estimates below
    0) leave no line: their mean gold is the value. None without a point.
    Declared on 2026-12-06, before the study on upstream seeds 10-17; it replaces the reading of
    R(d) fitted through the same points (gold_by_fit_at_target, kept as a sensitivity), whose
    curvature, set by three points, added noise (docs/lab.md, "The reading, revised")."""
    points = [(k, g) for k, g in points if k is not None and g is not None]
    if not points:
        return None
    golds_at = {}  # d > 0 → the snapshots' golds there
    for k, g in points:
        if k > 0:
            golds_at.setdefault(math.sqrt(k), []).append(g)
    if not golds_at:
        return sum(g for _, g in points) / len(points)
    line = [(0.0, g_sft)] + sorted((d, sum(gs) / len(gs)) for d, gs in golds_at.items())
    d = math.sqrt(target)
    for (d_lo, g_lo), (d_hi, g_hi) in zip(line, line[1:]):
        if d <= d_hi:
            return g_lo + (g_hi - g_lo) * (d - d_lo) / (d_hi - d_lo)
    return line[-1][1]  # above the last snapshot: its gold, not a guess beyond it


def short_of_target(points, target: float) -> bool:
    """Whether a run's held-out KL stayed below the target at every snapshot: its primary value is
    then read at its largest held-out KL (a finding listed per run, not a silent substitute)."""
    kls = [k for k, _ in points if k is not None]
    return bool(kls) and max(kls) < target


def gold_by_fit_at_target(points, g_sft: float, target: float):
    """The reading declared first (sensitivity since 2026-12-06): R(d) above fitted through
    (0, g_sft) and the snapshots (two snapshots: the curve through both; one distinct KL:
    R = α·d), read at the target. None without a point."""
    points = sorted({(k, g) for k, g in points if k is not None and g is not None})
    if not points:
        return None
    fit = fit_frontier([k for k, _ in points], [g for _, g in points], g_sft)
    if fit is None:
        line = [(math.sqrt(k), g - g_sft) for k, g in points if k > 0]
        if not line:
            return sum(g for _, g in points) / len(points)
        fit = (sum(d * y for d, y in line) / sum(d * d for d, _ in line), 0.0)  # R = α·d
    return g_sft + frontier_gain(*fit, target)


# ----------------------------------------------------------------------------------------------
# 4. The stages: each the command a student would type, resumable, --jobs at a time
# ----------------------------------------------------------------------------------------------
@dataclass
class Stage:
    name: str  # e.g. "up-3/ppo_tlcr_p0": also its folder under OUT
    kind: str  # sft, label, reward_model, discriminator, ppo, eval, credit
    argv: Callable[[], list[str]]  # built when the stage starts (eval lists the snapshots made)
    deps: list[str] = field(default_factory=list)


def up_dir(args, seed) -> Path:
    return Path(args.out) / f"up-{seed}"


def ppo_dir(args, seed, method, ppo_seed) -> Path:
    return up_dir(args, seed) / f"ppo_{method}_p{ppo_seed}"


def snapshot_dir(args, seed, method, ppo_seed, target) -> Path:
    # as plumbing.ppo_setup.snapshot_dir names it
    return ppo_dir(args, seed, method, ppo_seed) / f"policy_kl{target:g}"


def policy_name(method, ppo_seed, target=None) -> str:
    """The eval name of a run's snapshot at a target, or of its final policy (target None)."""
    return f"{method}-p{ppo_seed}-" + ("final" if target is None else f"kl{target:g}")


def pipeline_env(args) -> dict:
    """The environment of every stage command: ours, PYTHON, and one thread per stage unless set."""
    env = dict(os.environ)
    env.setdefault("PYTHON", sys.executable)
    env["LEXICON"] = str(Path(args.lexicon).resolve()) if args.lexicon else ""  # "": the default
    return env


def lexicon_args(env) -> list[str]:
    """--lexicon FILE for the stages that read the gold (label, reward model, PPO, eval) when the
    environment names one (LEXICON)."""
    return ["--lexicon", env["LEXICON"]] if env.get("LEXICON") else []


def stage_threads(args, stage: Stage, env) -> str:
    """OMP_NUM_THREADS of a stage: the environment's, else SFT (which runs alone) every core and the
    others cores / --jobs."""
    if "OMP_NUM_THREADS" in env:
        return env["OMP_NUM_THREADS"]
    cores = os.cpu_count() or 1
    return str(cores if stage.kind == "sft" else max(1, cores // args.jobs))


def build_stages(args) -> list[Stage]:
    """Every stage of the design, in the order they become ready."""
    out, preset, env = Path(args.out), PRESETS[args.size], pipeline_env(args)
    python, lex = env["PYTHON"], lexicon_args(env)
    sft, labels = out / "sft", out / "labels.jsonl"
    common_args = ["--data", "bundled", "--device", "cpu"]

    def fixed(*words):
        return lambda: [python, *words]

    stages = [
        Stage("sft", "sft", fixed("sft.py", "--model", "tiny", "--out", str(sft), "--seed", "0",
                                  *common_args, *preset["sft"].split())),
        Stage("labels", "label", fixed("label.py", "--data", "bundled", "--split", "reward",
                                       "--tokenizer", str(sft), "--out", str(labels), "--reviser",
                                       "gold", "--preference", "gold", *lex,
                                       *preset["label"].split()), ["sft"]),
        Stage("sft_eval", "sft_eval", eval_argv(args, None, python, lex), ["sft"]),
    ]
    for seed in args.seeds:
        up = up_dir(args, seed)
        seed_args = ["--sft", str(sft), "--seed", str(seed), "--device", "cpu"]
        stages += [
            Stage(f"up-{seed}/reward_model", "reward_model", fixed(
                "redistribute.py", "train", *seed_args, "--data", "bundled", "--split", "reward",
                "--out", str(up / "reward_model"), "--preference", "gold", "--revision-pairs",
                str(labels), *lex, *preset["reward_model"].split()), ["labels"]),
            Stage(f"up-{seed}/discriminator", "discriminator", fixed(
                "discriminator.py", "train", *seed_args, "--labels", str(labels), "--out",
                str(up / "discriminator"), *preset["discriminator"].split()), ["labels"]),
        ]
        runs = []
        for ppo_seed in range(max(args.ppo_seeds.values())):
            for method in (m for m in args.methods if ppo_seed < args.ppo_seeds[m]):
                name = f"up-{seed}/ppo_{method}_p{ppo_seed}"
                runs.append(name)
                stages.append(Stage(name, "ppo", fixed(
                    "ppo_token.py", "--policy", str(sft), "--reward", method, "--reward-model",
                    str(up / "reward_model"),
                    *(["--discriminator", str(up / "discriminator")] if method != "seq" and
                      method != "red" else []),
                    *common_args, "--out", str(ppo_dir(args, seed, method, ppo_seed)), "--seed",
                    str(seed + 1000 * ppo_seed), "--iterations", str(args.max_iterations),
                    "--save-at-kl", *[f"{t:g}" for t in args.kl_targets], "--stop-at-kl",
                    "--log-gold", *lex, *preset["ppo"].split()),
                    [f"up-{seed}/reward_model", f"up-{seed}/discriminator"]))
        for target in args.kl_targets:  # one eval a target: two shorter stages pack better
            stages.append(Stage(eval_stage_name(seed, target), "eval",
                                eval_argv(args, seed, python, lex, target), runs))
        if args.credit:
            stages.append(Stage(f"up-{seed}/credit", "credit", credit_argv(args, seed, python, lex),
                                runs))
    return stages


def eval_stage_name(seed, target) -> str:
    """The eval stage of an upstream seed's snapshots at one KL target (also its folder)."""
    return f"up-{seed}/eval_kl{target:g}"


def eval_policies(args, seed, target) -> dict:
    """{name: path} scored at the primary endpoint at `target`: every run's snapshot at it, and
    (with the last target) the final policy of every run that missed a target (its KL and gold are
    reported beside the miss). The SFT model is the same for every seed: it is scored once, by the
    stage sft_eval."""
    policies = {}
    for ppo_seed in range(max(args.ppo_seeds.values())):
        for method in (m for m in args.methods if ppo_seed < args.ppo_seeds[m]):
            path = snapshot_dir(args, seed, method, ppo_seed, target)
            if path.exists():
                policies[policy_name(method, ppo_seed, target)] = str(path)
            missed = any(not snapshot_dir(args, seed, method, ppo_seed, t).exists()
                         for t in args.kl_targets)
            if missed and target == args.kl_targets[-1]:
                policies[policy_name(method, ppo_seed)] = str(
                    ppo_dir(args, seed, method, ppo_seed) / "policy")
    return policies


def eval_argv(args, seed, python, lex, target=None):
    """eval.py --gold-only of every snapshot of an upstream seed at one target (seed None: the SFT
    model alone), K replies a test prompt, sampling seed 0 for every policy of the study."""
    def argv():
        sft = str(Path(args.out) / "sft")
        policies = {"sft": sft} if seed is None else eval_policies(args, seed, target)
        out = (Path(args.out) / "sft_eval" if seed is None
               else Path(args.out) / eval_stage_name(seed, target))
        return [python, "eval.py", "--policies", *[f"{k}={v}" for k, v in policies.items()],
                "--reference", sft, "--gold-only", "--samples-per-prompt",
                str(args.samples_per_prompt), "--seed", "0", "--data", "bundled", "--device", "cpu",
                "--out", str(out), *lex, *PRESETS[args.size]["eval"].split()]
    return argv


def credit_policies(args, seed) -> dict:
    """{method: path}: each method's first run at the last target (or its final policy)."""
    policies = {"sft": str(Path(args.out) / "sft")}
    for method in args.methods:
        path = snapshot_dir(args, seed, method, 0, args.kl_targets[-1])
        policies[method] = str(path if path.exists() else ppo_dir(args, seed, method, 0) / "policy")
    return policies


def credit_argv(args, seed, python, lex):
    def argv():
        up, policies = up_dir(args, seed), credit_policies(args, seed)
        return [python, "eval.py", "--policies", *[f"{k}={v}" for k, v in policies.items()],
                "--reference", policies["sft"], "--reward-model", str(up / "reward_model"),
                "--discriminator", str(up / "discriminator"), "--labels",
                str(Path(args.out) / "labels.jsonl"), "--gold", "--judge", "none", "--seed", "0",
                "--data", "bundled", "--device", "cpu", "--out", str(up / "credit"), *lex,
                *PRESETS[args.size]["eval"].split()]
    return argv


def marker(args, stage: Stage | str) -> Path:
    name = stage if isinstance(stage, str) else stage.name
    return Path(args.out) / "stages" / f"{name.replace('/', '__')}.json"


def stage_done(args, stage: Stage) -> bool:
    """A marker, and for an eval the same policies as now: a study extended with --ppo-seeds or
    --kl-targets evaluates its upstream seeds' snapshots again, the new ones with the old. (A study
    from before the eval was split by target has one eval a seed, up-U/eval: it stands for its
    targets' evals when it scored their policies.)"""
    info = read_json(marker(args, stage))
    if info is None and stage.kind == "eval":
        info = read_json(marker(args, stage.name.rsplit("/", 1)[0] + "/eval"))
        return info is not None and set(policy_names(stage.argv())) <= set(
            policy_names(info.get("argv", [])) or [])
    if info is None:
        return False
    recorded = policy_names(info.get("argv", []))
    return recorded is None or recorded == policy_names(stage.argv())


def policy_names(argv: list[str]):
    """The names given to eval.py's --policies (name=path ...), None without the option."""
    if "--policies" not in argv:
        return None
    names = itertools.takewhile(lambda word: not word.startswith("--"),
                                argv[argv.index("--policies") + 1:])
    return sorted(word.split("=", 1)[0] for word in names)


def run_stage(args, stage: Stage) -> float:
    """One stage's command, its output appended to OUT/logs/<name>.log; a marker with its wall
    time when it succeeds. Returns the seconds."""
    env = pipeline_env(args)
    env["OMP_NUM_THREADS"] = stage_threads(args, stage, env)
    argv = stage.argv()
    log_path = Path(args.out) / "logs" / f"{stage.name.replace('/', '__')}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write("+ " + " ".join(argv) + "\n")
        log.flush()
        done = subprocess.run(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                              check=False)
    seconds = time.time() - start
    if done.returncode != 0:
        raise RuntimeError(f"stage {stage.name} failed (exit {done.returncode}); see {log_path}, "
                           "then run the study again (it resumes)")
    checkpoint.atomic_write(marker(args, stage), json.dumps(
        {"stage": stage.name, "kind": stage.kind, "seconds": round(seconds, 1),
         "threads": env["OMP_NUM_THREADS"], "argv": argv}) + "\n")
    return seconds


# which ready stage starts first: the ones with the most work behind them (upstream models, then
# PPO runs) before the evals, which nothing waits for. The evals then fill the end of the study on
# every job, instead of the last seed's eval running alone (the third design's studies: ~6 min of
# one idle core).
START_ORDER = ("sft", "label", "reward_model", "discriminator", "ppo", "sft_eval", "eval", "credit")


def run_stages(args, stages: list[Stage]):
    """Every stage not done yet, --jobs at a time, each as soon as the stages it needs are done:
    of the ready ones, by START_ORDER's kind, then in build order (seed by seed)."""
    done = {s.name for s in stages if stage_done(args, s)}
    pending = [s for s in stages if s.name not in done]
    if done:
        print(f"{len(done)} stages done already in {args.out}, not run again")
    running, start = {}, time.time()
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        while pending or running:
            ready = sorted((s for s in pending if all(d in done for d in s.deps)),
                           key=lambda s: START_ORDER.index(s.kind))  # stable: build order next
            for stage in ready[: args.jobs - len(running)]:
                pending.remove(stage)
                print(f"[{time.time() - start:6.0f} s] start {stage.name}", flush=True)
                running[pool.submit(run_stage, args, stage)] = stage
            finished, _ = concurrent.futures.wait(running,
                                                  return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                stage = running.pop(future)
                seconds = future.result()  # a failed stage stops the study with its log's path
                done.add(stage.name)
                print(f"[{time.time() - start:6.0f} s] done  {stage.name}: {seconds:.0f} s",
                      flush=True)


# ----------------------------------------------------------------------------------------------
# 5. The time plan: stage seconds × counts / jobs, before anything runs
# ----------------------------------------------------------------------------------------------
def time_plan(args, iterations: dict | None = None) -> dict:
    """Per stage kind: count, seconds each (one thread, idle machine), core-seconds; and the wall
    time: SFT alone (on every core: counted at one core's time, an upper bound), the rest / jobs.
    PPO runs take EXPECTED_ITERATIONS, or `iterations` per method (a finished study's)."""
    s, u = STAGE_SECONDS[args.size], len(args.seeds)
    iterations = iterations or EXPECTED_ITERATIONS[args.size]
    runs_per_seed = sum(args.ppo_seeds[m] for m in args.methods)
    runs, evals = u * runs_per_seed, u * len(args.kl_targets)  # an eval: a target's snapshots
    per_ppo = s["ppo_start"] + s["ppo_iteration"] * sum(  # the mean over the runs
        args.ppo_seeds[m] * iterations[m] for m in args.methods) / runs_per_seed
    per_eval = s["eval_start"] + s["eval_policy"] * runs_per_seed * args.samples_per_prompt / 4
    sft_eval = s["eval_start"] + s["eval_policy"] * args.samples_per_prompt / 4
    kinds = {
        "sft": (1, s["sft"]),
        "label": (1, s["label"]),
        "sft_eval": (1, sft_eval),
        "reward_model": (u, s["reward_model"]),
        "discriminator": (u, s["discriminator"]),
        "ppo": (runs, per_ppo),
        "eval": (evals, per_eval),
        "credit": (u if args.credit else 0, s["credit"]),
    }
    rows = {k: {"count": n, "seconds_each": round(each, 1), "core_seconds": round(n * each)}
            for k, (n, each) in kinds.items()}
    rest = sum(r["core_seconds"] for k, r in rows.items() if k not in ("sft", "label"))
    wall = s["sft"] + s["label"] + rest / args.jobs
    return {"stages": rows, "wall_seconds": round(wall), "jobs": args.jobs}


def plan_text(args, plan) -> str:
    lines = [f"design: {len(args.seeds)} upstream seeds ({', '.join(map(str, args.seeds))}) × "
             f"{ppo_design(args)}; KL targets "
             f"{', '.join(f'{t:g}' for t in args.kl_targets)}; {args.samples_per_prompt} held-out "
             f"replies a test prompt; SIZE={args.size}", "time plan (one thread a stage, idle "
             "machine; PPO at the expected iterations):"]
    for kind, row in plan["stages"].items():
        lines.append(f"  {kind:<14} {row['count']:>3} × {row['seconds_each']:>6.1f} s = "
                     f"{row['core_seconds']:>6} core-s")
    lines.append(f"  wall ≈ SFT + label + the rest / {plan['jobs']} jobs = "
                 f"{plan['wall_seconds'] / 60:.1f} min")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# 6. Reading the runs: one row per run and target
# ----------------------------------------------------------------------------------------------
def read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def run_log(args, seed, method, ppo_seed) -> list[dict]:
    rows = checkpoint.read_jsonl_tolerant(ppo_dir(args, seed, method, ppo_seed) / "log.jsonl")
    return sorted((r for r in rows if isinstance(r.get("step"), int)), key=lambda r: r["step"])


def read_runs(args) -> list[dict]:
    """One record per run: its snapshots, the held-out gold and KL of each (eval), the largest
    trailing KL it reached, its final policy's held-out values when it missed a target, its log."""
    runs = []
    for seed in args.seeds:
        # every eval of the seed: one a target (up-U/eval_klT), or up-U/eval in a study from
        # before the split
        results = {"policies": {}}
        for name in [f"up-{seed}/eval", *(eval_stage_name(seed, t) for t in args.kl_targets)]:
            found = read_json(Path(args.out) / name / "results.json")
            results["policies"].update(found["policies"] if found else {})
        for ppo_seed in range(max(args.ppo_seeds.values())):
            for method in (m for m in args.methods if ppo_seed < args.ppo_seeds[m]):
                folder = ppo_dir(args, seed, method, ppo_seed)
                log = run_log(args, seed, method, ppo_seed)
                saved = read_json(folder / "snapshots.json") or {}
                record = {"seed": seed, "ppo_seed": ppo_seed, "method": method,
                          "iterations": len(log),
                          "max_trailing_kl": max((r.get("kl_trailing", r["kl"]) for r in log),
                                                 default=None),
                          "targets": {}, "log": [(r["kl"], r.get("gold_score")) for r in log]}
                for target in args.kl_targets:
                    policy = results["policies"].get(policy_name(method, ppo_seed, target), {})
                    snap = saved.get(f"{target:g}")
                    record["targets"][f"{target:g}"] = {
                        "reached": snap is not None,
                        "iteration": snap and snap["iteration"],
                        "trailing_kl": snap and snap["trailing_kl"],
                        "gold": policy.get("gold_score"),
                        "gold_se": policy.get("gold_score_se"),  # the eval's sampling error
                        "heldout_kl": policy.get("kl"),
                    }
                final = results["policies"].get(policy_name(method, ppo_seed))
                record["final"] = final and {"gold": final.get("gold_score"),
                                             "heldout_kl": final.get("kl")}
                runs.append(record)
    return runs


def sft_gold(args):
    """The SFT model's held-out gold (one model for every seed, the same draws as every policy)."""
    results = read_json(Path(args.out) / "sft_eval" / "results.json") or {"policies": {}}
    return (results["policies"].get("sft") or {}).get("gold_score")


# the sensitivity readings of the primary comparisons: (name, figure in primary["values"])
SENSITIVITY_READINGS = [("snapshot gold, unmatched KL", "snapshot_gold"),
                        ("R(d) fit at the target (the first declared reading)", "fit_gold")]


def per_seed_mean(args, runs, method, value: Callable[[dict], float | None]) -> list:
    """The mean over an upstream seed's PPO seeds of value(run) (None where no run has one)."""
    means = []
    for seed in args.seeds:
        values = [value(r) for r in runs if r["seed"] == seed and r["method"] == method]
        values = [v for v in values if v is not None]
        means.append(sum(values) / len(values) if values else None)
    return means


def add_frontiers(args, runs) -> float | None:
    """Fit every run's frontier (in place: run["frontier"]); returns g0, the SFT level: the mean
    gold of every run's first rollout (iteration 1: the SFT policy itself, KL 0)."""
    firsts = [r["log"][0][1] for r in runs if r["log"] and r["log"][0][1] is not None]
    g0 = sum(firsts) / len(firsts) if firsts else None
    kl_max = args.kl_targets[-1]
    for run in runs:
        points = [(k, g) for k, g in run["log"] if g is not None]
        fit = fit_frontier([k for k, _ in points], [g for _, g in points], g0) if (
            g0 is not None and points) else None
        run["frontier"] = fit and {"alpha": fit[0], "beta": fit[1],
                                   "mean_gain": frontier_mean_gain(*fit, kl_max)}
    return g0


# ----------------------------------------------------------------------------------------------
# 7. The analysis: primary, secondary, exploratory
# ----------------------------------------------------------------------------------------------
def analyse(args, runs) -> dict:
    others = [m for m in args.methods if m != BASELINE]
    g0 = add_frontiers(args, runs)
    g_sft = sft_gold(args)
    short = []  # runs whose held-out KL stayed below a target: read at their largest held-out KL
    for run in runs:  # the primary reading: held-out gold at exactly each target (gold_at_target)
        points = [(t["heldout_kl"], t["gold"]) for t in run["targets"].values() if t["reached"]]
        for key, cell in run["targets"].items():
            read = cell["reached"] and g_sft is not None
            cell["gold_at_target"] = gold_at_target(points, g_sft, float(key)) if read else None
            cell["gold_by_fit"] = gold_by_fit_at_target(points, g_sft, float(key)) if read else None
            cell["short"] = read and short_of_target(points, float(key))
            if cell["short"]:
                short.append({"seed": run["seed"], "ppo_seed": run["ppo_seed"],
                              "method": run["method"], "target": float(key),
                              "heldout_kl": max(k for k, _ in points if k is not None)})
    primary = {"values": {}, "tests": [], "sensitivity": []}
    for target in args.kl_targets:
        key = f"{target:g}"
        for method in args.methods:
            def reached(field):
                return lambda r: r["targets"][key][field] if r["targets"][key]["reached"] else None
            figures_of = {"gold": reached("gold_at_target"), "snapshot_gold": reached("gold"),
                          "fit_gold": reached("gold_by_fit"), "heldout_kl": reached("heldout_kl")}
            primary["values"][f"{method}@{key}"] = {
                name: {**mean_ci(v, args.alpha), "values": v} for name, v in (
                    (name, per_seed_mean(args, runs, method, f))
                    for name, f in figures_of.items())}
        for method in others:
            a, b = primary["values"][f"{method}@{key}"], primary["values"][f"{BASELINE}@{key}"]
            kl_gap = compare(a["heldout_kl"]["values"], b["heldout_kl"]["values"], args.alpha)
            primary["tests"].append({
                "a": method, "b": BASELINE, "target": target,
                **compare(a["gold"]["values"], b["gold"]["values"], args.alpha, args.power,
                          args.half_width),
                "kl_diff": {"mean": kl_gap["mean_diff"], "ci": kl_gap["ci"]}})
            for reading, figure in SENSITIVITY_READINGS:  # other readings of the same snapshots
                primary["sensitivity"].append({
                    "a": method, "b": BASELINE, "target": target, "reading": reading,
                    **compare(a[figure]["values"], b[figure]["values"], args.alpha, args.power)})
    adjust_family(primary["tests"], args.alpha)  # Holm over methods × targets
    missed = [{"seed": r["seed"], "ppo_seed": r["ppo_seed"], "method": r["method"],
               "target": float(k), "max_trailing_kl": r["max_trailing_kl"],
               "iterations": r["iterations"], "final": r["final"]}
              for r in runs for k, t in r["targets"].items() if not t["reached"]]

    gains = {m: per_seed_mean(args, runs, m, lambda r: r["frontier"] and r["frontier"]["mean_gain"])
             for m in args.methods}
    secondary = {"g0": g0, "kl_max": args.kl_targets[-1],
                 "values": {m: {**mean_ci(v, args.alpha), "values": v} for m, v in gains.items()},
                 "tests": adjust_family([{"a": m, "b": BASELINE, **compare(
                     gains[m], gains[BASELINE], args.alpha, args.power)} for m in others],
                     args.alpha)}
    return {"primary": primary, "missed": missed, "short": short, "secondary": secondary,
            "exploratory": exploratory(args, runs)}


CREDIT_FIGURES = [("heldout_auc_harm", "AUC harm (held-out)", "{:.3f}"),
                  ("heldout_auc_safe", "AUC safe (held-out)", "{:.3f}"),
                  ("heldout_word_r", "per-word r (held-out)", "{:+.3f}"),
                  ("heldout_reply_r", "per-reply r (held-out)", "{:+.3f}"),
                  ("samples_auc_harm", "AUC harm (own samples)", "{:.3f}"),
                  ("samples_auc_safe", "AUC safe (own samples)", "{:.3f}")]


def credit_values(args) -> dict:
    """{figure: {method: [value per upstream seed]}} from each seed's credit eval (None: not run,
    or an empty class: seq's per-word r has no spread, it is constant by construction)."""
    table = {key: {m: [] for m in args.methods} for key, _, _ in CREDIT_FIGURES}
    for seed in args.seeds:
        results = read_json(up_dir(args, seed) / "credit" / "results.json") or {}
        credit = results.get("credit") or {"heldout": {"by_source": {}}, "samples": {}}
        for method in args.methods:
            held = credit["heldout"]["by_source"].get(method, {})
            own = credit["samples"].get(method, {}).get(method, {})
            for key, _, _ in CREDIT_FIGURES:
                source, _, metric = key.partition("_")
                table[key][method].append((held if source == "heldout" else own).get(metric))
    return table


def variance_components(args, runs) -> list[dict]:
    """Where a primary difference varies (a planning figure). Per method m with P_m ≥ 2 PPO seeds,
    the spread of its runs' gold_at_target within an upstream seed,
        s_m² = mean over u of the sample variance of g_m(u, ·) over its PPO seeds   (within)
    and the mean sampling error of its snapshots' held-out gold (eval_se: part of s_m). The
    difference of the upstream seed's means, D(u) = mean g_a(u, ·) − mean g_seq(u, ·), then splits
    (one-way random effects, method of moments, the methods' PPO runs taken as independent) into
        s_b² = max(0, variance over u of D(u) − s_a²/P_a − s_seq²/P_seq)      (upstream seed)
    A design of U upstream seeds × P'_a, P'_seq PPO seeds has paired differences of sd
    √(s_b² + s_a²/P'_a + s_seq²/P'_seq): the U that a ±half_width interval needs is given for
    this design and for P' = 1, 2, 4 for both. Upstream seeds missing a value are left out (and
    counted); a comparison with a one-PPO-seed method has no split; none at all without any."""
    if max(args.ppo_seeds.values()) < 2:
        return []
    value = {(r["seed"], r["ppo_seed"], r["method"], key): cell.get("gold_at_target")
             for r in runs for key, cell in r["targets"].items()}
    eval_se = {(r["method"], key): [] for r in runs for key in r["targets"]}
    for r in runs:
        for key, cell in r["targets"].items():
            if cell.get("gold_se") is not None:
                eval_se[(r["method"], key)].append(cell["gold_se"])
    rows = []
    for target, method in itertools.product(args.kl_targets,
                                            [m for m in args.methods if m != BASELINE]):
        key, pair = f"{target:g}", (method, BASELINE)
        groups = []  # per upstream seed: (method's values, baseline's values)
        for seed in args.seeds:
            group = tuple([value.get((seed, p, m, key)) for p in range(args.ppo_seeds[m])]
                          for m in pair)
            if all(v is not None for values in group for v in values):
                groups.append(group)
        row = {"a": method, "b": BASELINE, "target": target, "n": len(groups),
               "ppo_seeds": [args.ppo_seeds[m] for m in pair], "sd_within": [None, None],
               "eval_se": [statistics.fmean(eval_se[(m, key)]) if eval_se.get((m, key)) else None
                           for m in pair], "sd_between": None, "seeds_needed": {}}
        if len(groups) >= 2 and min(row["ppo_seeds"]) >= 2:
            within = [sum(mean_ci(g[i])["sd"] ** 2 for g in groups) / len(groups)  # s_a², s_seq²
                      for i in range(2)]
            differences = [statistics.fmean(a) - statistics.fmean(b) for a, b in groups]
            between = max(0.0, mean_ci(differences)["sd"] ** 2 - sum(
                w / p for w, p in zip(within, row["ppo_seeds"])))  # s_b²

            def needed(p_a, p_b):
                return seeds_for_half_width(math.sqrt(between + within[0] / p_a + within[1] / p_b),
                                            args.half_width, args.alpha)
            row.update(sd_within=[math.sqrt(w) for w in within], sd_between=math.sqrt(between),
                       seeds_needed={"design": needed(*row["ppo_seeds"]),
                                     **{str(k): needed(k, k) for k in (1, 2, 4)}})
        rows.append(row)
    return rows


def exploratory(args, runs) -> dict:
    """The figures that decide nothing, each with its raw p: the old reading of the training log,
    and the token credit (tlcr − red only: seq's credit is constant by construction)."""
    log_reading = {}
    for kl in args.kl_points:
        values = {m: per_seed_mean(args, runs, m, lambda r: gold_at_kl(
            smoothed_curve([{"step": i, "kl": k, "gold_score": g} for i, (k, g) in
                            enumerate(r["log"])], args.smooth), kl)) for m in args.methods}
        log_reading[f"{kl:g}"] = {
            "values": {m: {**mean_ci(v, args.alpha), "values": v} for m, v in values.items()},
            "tests": [{"a": m, "b": BASELINE, **compare(values[m], values[BASELINE], args.alpha,
                                                         args.power)}
                      for m in args.methods if m != BASELINE]}
    credit = {}
    table = credit_values(args)
    for key, _, _ in CREDIT_FIGURES:
        entry = {"values": {m: {**mean_ci(v, args.alpha), "values": v}
                            for m, v in table[key].items()}, "tests": []}
        if "tlcr" in args.methods and "red" in args.methods:
            entry["tests"] = [{"a": "tlcr", "b": "red", **compare(
                table[key]["tlcr"], table[key]["red"], args.alpha, args.power)}]
        credit[key] = entry
    accuracy = []
    for seed in args.seeds:
        rm = read_json(up_dir(args, seed) / "reward_model" / "accuracy.json") or {}
        results = read_json(up_dir(args, seed) / "credit" / "results.json") or {}
        accuracy.append({"seed": seed, "reward_model": rm.get("accuracy"),
                         "discriminator": (results.get("discriminator_accuracy") or {})
                         .get("accuracy")})
    return {"log_reading": log_reading, "credit": credit, "accuracy": accuracy,
            "variance": variance_components(args, runs)}


def stage_times(args, stages) -> dict:
    """Measured wall seconds per stage kind (from the markers): count, total, mean, max."""
    times = {}
    for stage in stages:
        info = read_json(marker(args, stage))
        if info:
            times.setdefault(stage.kind, []).append(info["seconds"])
    return {k: {"count": len(v), "total": round(sum(v)), "mean": round(sum(v) / len(v), 1),
                "max": round(max(v), 1)} for k, v in times.items()}


# ----------------------------------------------------------------------------------------------
# 8. Output: study.json, study.md, frontier.svg, study.html — the decision table first
# ----------------------------------------------------------------------------------------------
def fmt(value, pattern):
    return "—" if value is None else pattern.format(value)


def mean_cell(summary, pattern, total) -> str:
    if summary["n"] == 0:
        return "—"
    cell = fmt(summary["mean"], pattern)
    if summary["ci"] is not None:
        cell += f" ± {pattern.format(summary['ci']).lstrip('+')}"
    return cell + (f" (n {summary['n']}/{total})" if summary["n"] < total else "")


def test_cells(test, alpha) -> list[str]:
    """n, mean, CI, t, raw p, Holm p, sign-flip p, significant, MDD; 'not tested' says why."""
    if test["not_tested"]:
        return [str(test["n"]), fmt(test["mean_diff"], "{:+.3f}"), "—", "—",
                f"not tested ({test['not_tested']})", "—", "—", "—", "—"]
    return [str(test["n"]), fmt(test["mean_diff"], "{:+.3f}"), fmt(test["ci"], "± {:.3f}"),
            fmt(test["t"], "{:+.2f}"), fmt(test["p"], "{:.3g}"), fmt(test.get("p_holm"), "{:.3g}"),
            fmt(test["sign_flip_p"], "{:.3g}"),
            ("yes" if test["significant"] else "no") if "significant" in test else "—",
            fmt(test["mdd"], "{:.3f}")]


def raw_cell(test) -> str:
    """An exploratory comparison in one cell: the mean difference and its raw p."""
    if test["not_tested"]:
        return f"not tested ({test['not_tested']})"
    return f"{fmt(test['mean_diff'], '{:+.3f}')}, p {fmt(test['p'], '{:.3g}')}"


TEST_HEAD = ["n seeds", "mean difference", "CI", "t", "p (raw)", "p (Holm)", "sign-flip p (raw)",
             "significant", "MDD (80% power)"]


def study_tables(args, study, runs) -> list[tuple[str, list[str], list[list[str]]]]:
    """[(title, header, rows)]: the decision table first, then the rest (exploratory last)."""
    level, n = f"{1 - args.alpha:.0%}", len(args.seeds)
    prim, sec, exp = study["primary"], study["secondary"], study["exploratory"]
    tables = []
    head = ["method"] + [f"{c} (KL {t:g})" for t in args.kl_targets
                         for c in ("held-out gold at the target", "snapshot gold",
                                   "snapshot held-out KL")]
    rows = [["sft (one model)"] + [c for _ in args.kl_targets
                                   for c in (fmt(study["sft_gold"], "{:+.3f}"), "", "0")]]
    for method in args.methods:
        row = [method]
        for t in args.kl_targets:
            values = prim["values"][f"{method}@{t:g}"]
            row += [mean_cell(values["gold"], "{:+.3f}", n),
                    mean_cell(values["snapshot_gold"], "{:+.3f}", n),
                    mean_cell(values["heldout_kl"], "{:.2f}", n)]
        rows.append(row)
    tables.append((
        f"PRIMARY ENDPOINT — held-out gold at each KL target: mean ± {level} t-interval over {n} "
        f"upstream seeds ({ppo_design(args)} each, averaged within a seed), "
        f"{args.samples_per_prompt} replies × every test prompt, the same draws for every policy. "
        "Read at exactly the target on each run's held-out frontier (the SFT point and the run's "
        "snapshots joined by straight lines in √KL, never extrapolated); beside it the snapshots "
        "as they are, whose held-out KL misses the target",
        head, rows))
    tables.append((
        f"PRIMARY COMPARISONS — paired over upstream seeds, two-sided paired t-test; Holm over the "
        f"whole primary family ({len(prim['tests'])} tests: every method × every target); "
        f"significant: Holm p < {args.alpha:g}; MDD: the difference this design detects with "
        f"{args.power:.0%} power",
        ["difference", "KL target", *TEST_HEAD, "held-out KL difference",
         f"seeds for ± {args.half_width:g}"],
        [[f"{t['a']} − {t['b']}", f"{t['target']:g}", *test_cells(t, args.alpha),
          fmt(t["kl_diff"]["mean"], "{:+.2f}") + fmt(t["kl_diff"]["ci"], " ± {:.2f}")
          .replace("—", ""), fmt(t.get("seeds_for_half_width"), "{}")] for t in prim["tests"]]))
    tables.append((
        "SENSITIVITY (exploratory) — the same comparisons on other readings of the same snapshots: "
        "their own held-out gold, at their unmatched KL (the held-out KL difference above), and "
        "R(d) fitted through them, read at the target; p raw, not adjusted",
        ["difference", "KL target", "reading", "n seeds", "mean difference", "CI", "p (raw)"],
        [[f"{t['a']} − {t['b']}", f"{t['target']:g}", t["reading"],
          *test_cells(t, args.alpha)[:3], test_cells(t, args.alpha)[4]]
         for t in prim["sensitivity"]]))
    per_run = []
    for r in runs:
        for t in args.kl_targets:
            cell = r["targets"][f"{t:g}"]
            per_run.append([str(r["seed"]), str(r["ppo_seed"]), r["method"], f"{t:g}",
                            fmt(cell.get("gold_at_target"), "{:+.3f}"),
                            fmt(cell["gold"], "{:+.3f}"), fmt(cell["heldout_kl"], "{:.2f}"),
                            fmt(cell["iteration"], "{}"), fmt(cell["trailing_kl"], "{:.2f}")
                            if cell["reached"] else "not reached"])
    tables.append(("Per run: the snapshot at each target (iteration: the PPO iteration whose "
                   "rollouts' trailing KL first reached it)",
                   ["seed", "PPO seed", "method", "KL target", "held-out gold at the target",
                    "snapshot gold", "snapshot held-out KL", "iteration", "trailing KL"], per_run))
    tables.append((
        "Runs whose held-out KL stayed below a target at every snapshot (the primary value is read "
        f"at the run's largest held-out KL, not extrapolated): {len(study['short'])}",
        ["seed", "PPO seed", "method", "KL target", "largest snapshot held-out KL"],
        [[str(m["seed"]), str(m["ppo_seed"]), m["method"], f"{m['target']:g}",
          fmt(m["heldout_kl"], "{:.2f}")] for m in study["short"]]))
    tables.append((
        f"Runs that missed a target (within {args.max_iterations} iterations): "
        f"{len(study['missed'])}",
        ["seed", "PPO seed", "method", "KL target", "largest trailing KL", "iterations",
         "final policy held-out gold", "final policy held-out KL"],
        [[str(m["seed"]), str(m["ppo_seed"]), m["method"], f"{m['target']:g}",
          fmt(m["max_trailing_kl"], "{:.2f}"), str(m["iterations"]),
          fmt((m["final"] or {}).get("gold"), "{:+.3f}"),
          fmt((m["final"] or {}).get("heldout_kl"), "{:.2f}")] for m in study["missed"]]))
    tables.append((
        f"SECONDARY ENDPOINT — all-steps frontier: mean gold gain over KL in "
        f"[0, {sec['kl_max']:g}] of each run's fit R(d) = d(α − β·log d), d = √KL, from g0 = "
        f"{fmt(sec['g0'], '{:+.3f}')} (rollout gold, RL-split prompts); mean ± {level} CI",
        ["method", "mean gain"],
        [[m, mean_cell(v, "{:+.4f}", n)] for m, v in sec["values"].items()]))
    tables.append((
        f"Secondary comparisons — paired t-test; Holm over these {len(sec['tests'])} only (not "
        "part of the primary family)",
        ["difference", *TEST_HEAD],
        [[f"{t['a']} − {t['b']}", *test_cells(t, args.alpha)] for t in sec["tests"]]))
    fits = [[str(r["seed"]), str(r["ppo_seed"]), r["method"],
             fmt(r["frontier"] and r["frontier"]["alpha"], "{:+.4f}"),
             fmt(r["frontier"] and r["frontier"]["beta"], "{:+.4f}"),
             fmt(r["frontier"] and r["frontier"]["mean_gain"], "{:+.4f}"), str(r["iterations"])]
            for r in runs]
    tables.append(("Per run: the frontier fit", ["seed", "PPO seed", "method", "α", "β",
                                                  "mean gain", "iterations"], fits))
    reading = exp["log_reading"]
    tables.append((
        f"EXPLORATORY — rollout gold read off the smoothed training log ({args.smooth} iterations) "
        "at KL k (the old reading; RL-split prompts, ~80 replies a reading); p raw, no adjustment",
        ["method"] + [f"log gold at KL {k}" for k in reading],
        [[m] + [mean_cell(reading[k]["values"][m], "{:+.3f}", n) for k in reading]
         for m in args.methods]
        + [[f"{m} − {BASELINE} (p raw)"] + [raw_cell(reading[k]["tests"][i]) for k in reading]
           for i, m in enumerate(m for m in args.methods if m != BASELINE)]))
    credit = exp["credit"]
    tables.append((
        "EXPLORATORY — token credit of each method's reward source (eval.py --gold at the last "
        "target; AUC 0.5 = chance); only tlcr − red is tested (seq's token reward is constant "
        "before the last token by construction), p raw",
        ["method"] + [label for _, label, _ in CREDIT_FIGURES],
        [[m] + [mean_cell(credit[k]["values"][m], f, n) for k, _, f in CREDIT_FIGURES]
         for m in args.methods]
        + ([["tlcr − red (p raw)"]
            + [raw_cell(credit[k]["tests"][0]) for k, _, _ in CREDIT_FIGURES]]
           if all(credit[k]["tests"] for k, _, _ in CREDIT_FIGURES) else [])))
    if exp.get("variance"):
        tables.append((
            "EXPLORATORY — where each primary difference varies: each method's spread between the "
            "PPO seeds of one upstream seed (within; the eval's own sampling error of a snapshot "
            "beside it, part of it) and the difference's spread between upstream seeds (between), "
            f"one-way random effects; and the upstream seeds a ±{args.half_width:g} interval would "
            "need with this design's PPO seeds, or 1, 2 or 4 for both methods (a planning figure: "
            "the sds are estimates)",
            ["difference", "KL target", "upstream seeds", "PPO seeds (a, seq)",
             "sd within (a, seq)", "eval se (a, seq)", "sd between (upstream seed)",
             "seeds, this design", "seeds, 1 PPO seed", "seeds, 2 PPO seeds",
             "seeds, 4 PPO seeds"],
            [[f"{v['a']} − {v['b']}", f"{v['target']:g}", str(v["n"]),
              " / ".join(map(str, v["ppo_seeds"])),
              " / ".join(fmt(x, "{:.3f}") for x in v["sd_within"]),
              " / ".join(fmt(x, "{:.3f}") for x in v["eval_se"]),
              fmt(v["sd_between"], "{:.3f}"),
              *[fmt(v["seeds_needed"].get(k), "{}") for k in ("design", "1", "2", "4")]]
             for v in exp["variance"]]))
    times = study["times"]
    tables.append((
        f"Wall time per stage (measured, {args.jobs} jobs) against the plan (one thread, idle "
        "machine)",
        ["stage", "count", "plan each (s)", "measured mean (s)", "measured max (s)",
         "measured total (s)"],
        [[k, str(p["count"]), f"{p['seconds_each']:.0f}",
          fmt((times.get(k) or {}).get("mean"), "{:.0f}"),
          fmt((times.get(k) or {}).get("max"), "{:.0f}"),
          fmt((times.get(k) or {}).get("total"), "{:.0f}")]
         for k, p in study["plan"]["stages"].items()]))
    return tables


def study_markdown(args, study, runs) -> str:
    lines = [f"# Study: {len(args.seeds)} upstream seeds × {ppo_design(args)} "
             f"(SIZE={args.size})", "",
             "Design declared in study.py's docstring before any result. Primary endpoint: "
             "held-out gold at each KL target; p-values labelled raw or Holm."]
    for title, head, rows in study_tables(args, study, runs):
        lines += ["", f"{title}:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    wall = study.get("wall_seconds")
    lines += ["", f"Study wall time: {fmt(wall, '{:.0f} s')} (the invocation that ran the "
              f"stages; plan {study['plan']['wall_seconds']} s). Accuracy per upstream seed "
              "(reward model held-out pairs, discriminator held-out tokens): " + "; ".join(
                  f"{a['seed']}: {fmt(a['reward_model'], '{:.1%}')}, "
                  f"{fmt(a['discriminator'], '{:.1%}')}" for a in study["exploratory"]["accuracy"])]
    return "\n".join(lines) + "\n"


def frontier_svg(args, study, runs, width=560, height=330) -> str:
    """Each run's fitted frontier g0 + R(√KL) faint, each method's mean fitted curve bold, and the
    primary endpoint (held-out gold at each target, at its mean held-out KL) as squares ± CI."""
    g0, kl_max = study["secondary"]["g0"], args.kl_targets[-1]
    grid = [kl_max * i / 40 for i in range(41)]
    curves = {}
    for r in runs:
        if r["frontier"] and g0 is not None:
            curves.setdefault(r["method"], []).append(
                [(k, g0 + frontier_gain(r["frontier"]["alpha"], r["frontier"]["beta"], k))
                 for k in grid])
    points = {m: [(t, study["primary"]["values"][f"{m}@{t:g}"]["gold"]["mean"],
                   study["primary"]["values"][f"{m}@{t:g}"]["gold"]["ci"])
                  for t in args.kl_targets] for m in args.methods}
    points = {m: [p for p in ps if p[1] is not None] for m, ps in points.items()}
    snapshots = {m: [(c["heldout_kl"], c["gold"]) for r in runs if r["method"] == m
                     for c in r["targets"].values()
                     if c["heldout_kl"] is not None and c["gold"] is not None]
                 for m in args.methods}
    ys = [y for cs in curves.values() for c in cs for _, y in c] + [
        p[1] for ps in [*points.values(), *snapshots.values()] for p in ps]
    xs = [kl_max] + [p[0] for ps in snapshots.values() for p in ps]
    if not ys:
        return ""
    y0, y1 = min(ys), max(ys)
    y1 = y1 if y1 > y0 else y0 + 1e-3
    left, bottom = 56, 74
    parts, sx, sy = report.chart_frame(
        f"gold against KL: {len(args.seeds)} upstream seeds × {ppo_design(args)}",
        (0.0, max(xs)), (y0, y1), width, height, (left, 22, 24, bottom), "KL")
    for k, method in enumerate(args.methods):
        colour = report.PALETTE[k % len(report.PALETTE)]
        for curve in curves.get(method, []):
            coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in curve)
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="0.8" '
                         f'stroke-opacity="0.3" points="{coords}"></polyline>')
        if curves.get(method):
            mean = [(x, sum(c[i][1] for c in curves[method]) / len(curves[method]))
                    for i, x in enumerate(grid)]
            coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in mean)
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2.2" '
                         f'points="{coords}"><title>{html.escape(method)}: mean fitted frontier'
                         f'</title></polyline>')
        for x, y in snapshots[method]:
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="1.8" fill="{colour}" '
                         f'fill-opacity="0.35"><title>{html.escape(method)}: a snapshot, '
                         f'held-out KL {x:.2f}, gold {y:+.3f}</title></circle>')
        for x, y, e in points[method]:
            if e:
                parts.append(f'<line x1="{sx(x):.1f}" y1="{sy(max(y - e, y0)):.1f}" '
                             f'x2="{sx(x):.1f}" y2="{sy(min(y + e, y1)):.1f}" stroke="{colour}" '
                             f'stroke-width="1.2"></line>')
            parts.append(f'<rect x="{sx(x) - 3:.1f}" y="{sy(y) - 3:.1f}" width="6" height="6" '
                         f'fill="{colour}"><title>{html.escape(method)}: held-out gold {y:+.3f}'
                         f'{f" ± {e:.3f}" if e else ""} at KL {x:g}</title></rect>')
        lx, ly = left + k * 110, height - bottom + 44
        parts.append(f'<rect x="{lx}" y="{ly - 8}" width="10" height="3" fill="{colour}"></rect>'
                     f'<text x="{lx + 14}" y="{ly - 4}">{html.escape(method)}</text>')
    parts.append(f'<text x="{left}" y="{height - 16}" class="note">lines: each run\'s fitted '
                 'frontier (faint) and their mean, rollout gold on RL-split prompts</text>')
    parts.append(f'<text x="{left}" y="{height - 3}" class="note">squares: held-out gold at each '
                 f'KL target, mean ± {1 - args.alpha:.0%} CI; dots: the snapshots (test prompts)'
                 '</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def study_html(args, study, runs, svg) -> str:
    tables = study_tables(args, study, runs)
    body = [f"<h1>Study: {len(args.seeds)} upstream seeds × {ppo_design(args)}</h1>",
            "<p>Design declared in study.py before any result. The decision table first; "
            "p-values labelled raw or Holm; exploratory figures last.</p>"]
    body += [f"<h3>{html.escape(t)}</h3>" + report.html_table(h, r) for t, h, r in tables[:4]]
    body.append(svg)
    body += [f"<h3>{html.escape(t)}</h3>" + report.html_table(h, r) for t, h, r in tables[4:]]
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "table.results{border-collapse:collapse;font-size:13px}"
        "table.results td,table.results th{border:1px solid #bbb;padding:3px 6px;text-align:right}"
        "svg.curve{font-size:10px;background:#fafafa}"
        "svg .axis{stroke:#888}svg .title{font-size:12px;font-weight:600}svg .note{fill:#666}"
    )
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>token-rlhf study</title><style>{style}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_outputs(args, study, runs):
    out = Path(args.out)
    config = {k: getattr(args, k) for k in (
        "seeds", "ppo_seeds", "size", "methods", "kl_targets", "samples_per_prompt",
        "max_iterations", "credit", "alpha", "power", "kl_points", "smooth")}
    config["lexicon"] = args.lexicon_id
    config["family"] = ("primary: held-out gold at each KL target, every method − seq, paired "
                        "t-test over upstream seeds, Holm over methods × targets")
    per_run = [{k: v for k, v in r.items()} for r in runs]
    checkpoint.atomic_write(out / "study.json", json.dumps(
        {"config": config, **study, "runs": per_run}, indent=1) + "\n")
    md = study_markdown(args, study, runs)
    checkpoint.atomic_write(out / "study.md", md)
    svg = frontier_svg(args, study, runs)
    checkpoint.atomic_write(out / "frontier.svg", svg + "\n")
    checkpoint.atomic_write(out / "study.html", study_html(args, study, runs, svg))
    print(md)
    print(f"wrote {out / 'study.json'}, {out / 'study.md'}, {out / 'study.html'}, "
          f"{out / 'frontier.svg'}")


def main(argv=None):
    args = parse_args(argv)
    stages = build_stages(args)
    plan = time_plan(args)
    print(plan_text(args, plan), flush=True)
    if args.plan_only:
        return {"plan": plan}
    start = time.time()
    if not args.report_only:
        run_stages(args, stages)
    missing = [s.name for s in stages if not stage_done(args, s)]
    if missing:
        raise SystemExit(f"study.py: {len(missing)} stages not done in {args.out} (first: "
                         f"{missing[0]}); run without --report-only")
    runs = read_runs(args)
    wall = round(time.time() - start)
    if args.report_only:  # the run's own wall time and plan, as its last report recorded them
        previous = read_json(Path(args.out) / "study.json") or {}
        wall, plan = previous.get("wall_seconds"), previous.get("plan", plan)
        args.jobs = plan["jobs"]
    study = {"plan": plan, **analyse(args, runs), "sft_gold": sft_gold(args),
             "times": stage_times(args, stages), "wall_seconds": wall}
    write_outputs(args, study, runs)
    return {**study, "runs": runs}


if __name__ == "__main__":
    plumbing.cli(main)
