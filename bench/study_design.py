"""Which study design narrows the primary intervals most for its minutes? From a finished study.

The study's primary difference (method − seq at a KL target, paired over upstream seeds) varies for
three reasons, which this script separates from a study.json with ≥ 2 PPO seeds per method:

    e_m    the eval's own sampling error of one policy's held-out gold: the sd of its replies' gold
           / √replies (eval.py's gold_score_se; for studies from before it was recorded, computed
           from the study folder's up-U/eval/responses.jsonl)
    s_m    the spread of method m's gold at the target between the PPO seeds of one upstream seed;
           e_m is part of it, and p_m² = max(0, s_m² − e_m²) is the PPO run's own part
    s_b    the spread of the difference between upstream seeds (study.variance_components)

A design of U upstream seeds, P_m PPO seeds of each method and K replies a prompt then has paired
differences of variance (K₀: the study's K; the methods' runs taken as independent, which leaves
out the common random numbers' help, printed as r below)

    V = s_b² + (p_a² + e_a²·K₀/K) / P_a + (p_seq² + e_seq²·K₀/K) / P_seq

and a 95% half-width t_{U−1}·√(V/U). Its wall time is study.time_plan's, with each method's
iterations as measured in this study. Both are computed, not measured: the sds are
estimates from one study's 8 or so upstream seeds.

    python bench/study_design.py runs/study-harm-10-17          # a study folder (or its study.json)
"""

import argparse
import collections
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import study  # noqa: E402

# (P_seq, P_red, P_tlcr, K): the design of seeds 10-17, the revised default, and neighbours
DESIGNS = [(2, 2, 2, 4), (2, 2, 2, 8), (2, 1, 4, 8), (2, 2, 4, 8), (1, 1, 4, 8), (2, 1, 5, 8),
           (2, 1, 4, 4), (4, 4, 4, 4)]


def load(path: Path):
    """(study.json record, its folder or None)."""
    if path.is_dir():
        return json.loads((path / "study.json").read_text()), path
    return json.loads(path.read_text()), None


def fill_eval_se(record, folder):
    """Each snapshot's gold_se from the eval's replies where the study.json lacks it; returns the
    correlation of two methods' replies' gold on the same draws (seq and tlcr, first PPO seed, last
    target), averaged over upstream seeds, or None without the replies."""
    missing = any(cell.get("gold_se") is None for r in record["runs"]
                  for cell in r["targets"].values() if cell["reached"])
    if folder is None:
        return None
    correlations, last = [], f"{record['config']['kl_targets'][-1]:g}"
    for seed in record["config"]["seeds"]:
        path = folder / f"up-{seed}" / "eval" / "responses.jsonl"
        if not path.exists():
            continue
        golds = collections.defaultdict(list)
        for line in path.open():
            row = json.loads(line)
            golds[row["policy"]].append(row["gold_score"])
        for run in (r for r in record["runs"] if r["seed"] == seed):
            for key, cell in run["targets"].items():
                replies = golds.get(study.policy_name(run["method"], run["ppo_seed"], float(key)))
                if missing and replies and len(replies) > 1:
                    cell["gold_se"] = statistics.stdev(replies) / math.sqrt(len(replies))
        a, b = golds.get(f"seq-p0-kl{last}"), golds.get(f"tlcr-p0-kl{last}")
        if a and b and len(a) == len(b) and statistics.pstdev(a) and statistics.pstdev(b):
            correlations.append(statistics.correlation(a, b))
    return statistics.fmean(correlations) if correlations else None


def wall_minutes(config, iterations, design, seeds) -> float:
    """study.time_plan's wall time for this design at --jobs 2, with the measured iterations."""
    p_seq, p_red, p_tlcr, k = design
    plan = study.time_plan(argparse.Namespace(
        size=config["size"], seeds=range(seeds), methods=config["methods"],
        ppo_seeds={"seq": p_seq, "red": p_red, "tlcr": p_tlcr}, kl_targets=config["kl_targets"],
        samples_per_prompt=k, credit=False, jobs=2), iterations)
    return plan["wall_seconds"] / 60


def half_width(row, design, k0, seeds) -> float | None:
    """The projected 95% half-width of a variance_components row's difference under design
    (P_seq, P_red, P_tlcr, K) with `seeds` upstream seeds; None without the split."""
    if row["sd_between"] is None or None in row["eval_se"]:
        return None
    p = {"seq": design[0], "red": design[1], "tlcr": design[2]}
    variance = row["sd_between"] ** 2
    for method, s_m, e_m in zip((row["a"], row["b"]), row["sd_within"], row["eval_se"]):
        own = max(0.0, s_m ** 2 - e_m ** 2)  # p_m²: the PPO run's part
        variance += (own + e_m ** 2 * k0 / design[3]) / p[method]
    return study.t_quantile(0.975, seeds - 1) * math.sqrt(variance / seeds)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", type=Path, help="a study folder (runs/...) or its study.json")
    parser.add_argument("--seeds", type=int, default=8, help="upstream seeds of the designs")
    parser.add_argument("--half-width", type=float, default=0.03, help="the interval aimed at")
    args = parser.parse_args(argv)
    record, folder = load(args.study)
    config = record["config"]
    r_crn = fill_eval_se(record, folder)
    counts = study.config_ppo_seeds(config)
    spec = argparse.Namespace(ppo_seeds=counts, kl_targets=config["kl_targets"],
                              methods=config["methods"], seeds=config["seeds"],
                              half_width=args.half_width, alpha=0.05)
    rows = study.variance_components(spec, record["runs"])
    iterations = {m: statistics.fmean(r["iterations"] for r in record["runs"] if r["method"] == m)
                  for m in config["methods"]}
    k0 = config["samples_per_prompt"]
    print(f"{args.study}: {len(config['seeds'])} upstream seeds, PPO seeds {counts}, K = {k0} "
          f"replies a prompt; mean iterations "
          + ", ".join(f"{m} {v:.1f}" for m, v in iterations.items()))
    print("r (common random numbers): correlation of seq's and tlcr's replies' gold on the same "
          "draws: " + study.fmt(r_crn, "{:.2f}"))
    print(f"\n{'difference':<11}{'KL':>4}  {'s_a':>6}{'e_a':>7}{'s_seq':>7}{'e_seq':>7}{'s_b':>7}")
    for row in rows:
        print(f"{row['a'] + ' − seq':<11}{row['target']:>4g}  "
              + "".join(f"{study.fmt(x, '{:.3f}'):>7}" for x in (*row["sd_within"][:1],
                        row["eval_se"][0], row["sd_within"][1], row["eval_se"][1],
                        row["sd_between"])))
    print(f"\nprojected 95% half-width at {args.seeds} upstream seeds (computed), and wall time "
          "at --jobs 2 (plan, measured iterations):")
    head = "  ".join(f"{row['a']}−seq@{row['target']:g}" for row in rows)
    print(f"{'P seq, red, tlcr; K':<22}{'minutes':>8}  {head}")
    projections = []
    for design in DESIGNS:
        widths = [half_width(row, design, k0, args.seeds) for row in rows]
        minutes = wall_minutes(config, iterations, design, args.seeds)
        projections.append({"design": design, "minutes": minutes, "half_widths": widths})
        label = f"{design[0]}, {design[1]}, {design[2]}; {design[3]}"
        print(f"{label:<22}{minutes:>8.1f}  " + "  ".join(
            f"{study.fmt(w, '{:.3f}'):>{len(row['a']) + 9}}" for row, w in zip(rows, widths)))
    return {"components": rows, "crn_r": r_crn, "projections": projections}

if __name__ == "__main__":
    main()
