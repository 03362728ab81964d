"""How noisy is each way of reading a run's held-out gold at a KL target? From a study.json.

A study saves each PPO run's policy where its rollout KL first reaches each target, and scores the
snapshot on the test prompts (held-out gold, held-out KL). The snapshot's held-out KL misses the
target, so the value at the target is read off the run's held-out points. This script recomputes,
for every primary comparison (method − seq at each target, paired over upstream seeds, PPO seeds
averaged within one), the mean difference, the sd of the paired differences and the 95%
t-interval under three readings of the same snapshots:

    line      study.gold_at_target: straight lines in √KL through (0, SFT gold) and the snapshots,
              never extrapolated (the primary reading since 2026-12-06)
    fit       study.gold_by_fit_at_target: R(d) = d(α − β·log d) fitted through the same points
              (the reading declared first)
    snapshot  the snapshot's own gold, at its unmatched KL

Nothing is trained or run; the figures come from the study.json's per-run records.

    python bench/study_readings.py results/study-sentiment-10x2-seeds.json
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import study  # noqa: E402

READINGS = {
    "line": study.gold_at_target,
    "fit": study.gold_by_fit_at_target,
    "snapshot": None,  # the snapshot's own gold
}


def run_value(run, key, reading, g_sft):
    """One run's gold at target `key` under `reading` (None where the run missed the target)."""
    cell = run["targets"][key]
    if not cell["reached"]:
        return None
    if READINGS[reading] is None:
        return cell["gold"]
    points = [(t["heldout_kl"], t["gold"]) for t in run["targets"].values() if t["reached"]]
    return READINGS[reading](points, g_sft, float(key))


def comparison(record, method, key, reading) -> dict:
    """study.paired_test of method − seq over the upstream seeds, PPO seeds averaged within one
    (study.per_seed_mean), as study.py pairs them."""
    seeds = argparse.Namespace(seeds=record["config"]["seeds"])
    means = [study.per_seed_mean(seeds, record["runs"], name,
                                 lambda r: run_value(r, key, reading, record["sft_gold"]))
             for name in (method, study.BASELINE)]
    return study.paired_test(*means)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", nargs="+", help="study.json files (study.py's output)")
    args = parser.parse_args(argv)
    table = []
    for path in args.studies:
        record = json.loads(Path(path).read_text())
        config = record["config"]
        ppo_seeds = ", ".join(f"{m} {n}" for m, n in study.config_ppo_seeds(config).items())
        print(f"{path}: {len(config['seeds'])} upstream seeds × {ppo_seeds} PPO seeds, SFT gold "
              f"{record['sft_gold']:+.3f}")
        print(f"  {'difference':<12}{'KL':>5}  " + "  ".join(
            f"{name + ': mean, sd, ± 95%':<28}" for name in READINGS))
        for target in config["kl_targets"]:
            key = f"{target:g}"
            for method in (m for m in config["methods"] if m != study.BASELINE):
                cells = []
                for reading in READINGS:
                    test = comparison(record, method, key, reading)
                    cells.append(f"{study.fmt(test['mean_diff'], '{:+.3f}')}, "
                                 f"{study.fmt(test['sd'], '{:.3f}')}, "
                                 f"± {study.fmt(test['ci'], '{:.3f}')} (n {test['n']})")
                    table.append({"study": path, "difference": f"{method} − seq", "target": target,
                                  "reading": reading, "n": test["n"], "mean": test["mean_diff"],
                                  "sd": test["sd"], "ci": test["ci"]})
                print(f"  {method + ' − seq':<12}{key:>5}  " + "  ".join(f"{c:<28}" for c in cells))
    return table


if __name__ == "__main__":
    main()
