"""study.py: the statistics against known values (t, intervals, paired tests, Holm over a family,
the MDD), the gold-at-KL reading of hand-made curves, the frontier fit on synthetic data, and a
smoke-size study of two upstream seeds end to end (resumed without running a stage twice)."""

import argparse
import itertools
import json
import math
import statistics
import sys
from pathlib import Path

import pytest

import study

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import study_design  # noqa: E402
import study_readings  # noqa: E402


# ----------------------------------------------------------------------------------------------
# Student t, intervals, paired tests: values from a t table and by hand
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "df, quantile", [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (29, 2.045)]
)
def test_t_quantile_matches_the_table(df, quantile):
    assert study.t_quantile(0.975, df) == pytest.approx(quantile, abs=1e-3)


def test_t_two_sided_p_known_values():
    assert study.t_two_sided_p(1.0, 1) == pytest.approx(0.5)  # Cauchy: P(|T| ≥ 1) = 1/2
    assert study.t_two_sided_p(10.0, 1) == pytest.approx(
        1 - 2 / 3.141592653589793 * 1.4711276743037347
    )
    assert study.t_two_sided_p(0.0, 5) == pytest.approx(1.0)
    assert study.t_two_sided_p(2.0, 10**6) == pytest.approx(0.0455, abs=1e-4)  # the normal limit
    assert study.t_two_sided_p(study.t_quantile(0.975, 4), 4) == pytest.approx(0.05)


def test_mean_ci_by_hand():
    summary = study.mean_ci([1, 2, 3, 4, 5, None])  # None: a run that never reached the KL
    assert summary["n"] == 5 and summary["mean"] == 3.0
    assert summary["sd"] == pytest.approx(1.5811388) and summary["ci"] == pytest.approx(
        2.7764451 * 1.5811388 / 5**0.5
    )
    assert study.mean_ci([2.0]) == {"n": 1, "mean": 2.0, "sd": None, "ci": None}
    assert study.mean_ci([None, None])["n"] == 0
    assert study.mean_ci([1, 3], alpha=0.10)["ci"] == pytest.approx(
        6.3138 * 2**0.5 / 2**0.5, abs=1e-3
    )


def test_paired_test_on_known_data():
    a, b = [1.5, 2.0, 3.5, 4.0, 5.5], [0.5, 0.0, 0.5, 0.0, 0.5]  # differences 1..5
    test = study.paired_test(a, b)
    assert test["n"] == 5 and test["mean_diff"] == pytest.approx(3.0)
    assert test["t"] == pytest.approx(4.2426407) and test["p"] == pytest.approx(0.013236, abs=1e-5)
    assert test["sign_flip_p"] == pytest.approx(
        2 / 32
    )  # all positive: the two extreme patterns of 32
    assert study.paired_test(b, a)["t"] == pytest.approx(-4.2426407)
    # seeds missing on either side are left out; a constant non-zero difference is certain
    assert study.paired_test([1, None, 3], [0, 1, 2])["n"] == 2
    assert study.paired_test([2, 3, 4], [1, 2, 3])["p"] == 0.0
    assert study.paired_test([1, 2], [1, 2])["p"] == 1.0
    noise = study.paired_test([0.1, -0.2, 0.3, -0.1, 0.0], [0, 0, 0, 0, 0])
    assert noise["p"] > 0.5 and noise["sign_flip_p"] > 0.5


def test_holm_step_down():
    assert study.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert study.holm([0.5, None, 0.01]) == [0.5, None, pytest.approx(0.02)]
    assert study.holm([]) == []


# ----------------------------------------------------------------------------------------------
# the gold-against-KL curve: smoothing and reading at fixed KL
# ----------------------------------------------------------------------------------------------
def test_gold_at_kl_on_hand_made_curves():
    line = [(k, 2.0 * k) for k in (0.0, 0.5, 1.5, 3.0, 5.0)]  # gold = 2·KL
    assert [study.gold_at_kl(line, kl) for kl in (1, 2, 4)] == pytest.approx([2.0, 4.0, 8.0])
    assert study.gold_at_kl(line, 0.5) == 1.0  # exactly on a point: counted once
    assert study.gold_at_kl(line, 6) is None and study.gold_at_kl(line, -1) is None  # never reached
    there_and_back = [
        (0, 0),
        (2, 1),
        (4, 2),
        (2, 3),
    ]  # crosses KL 3 on the way out (1.5) and back (2.5)
    assert study.gold_at_kl(there_and_back, 3) == pytest.approx(2.0)
    assert study.gold_at_kl(there_and_back, 2) == pytest.approx(
        2.0
    )  # the two points at KL 2: 1 and 3


def test_running_mean_and_smoothed_curve_keep_points_paired():
    assert study.running_mean([0, 3, 6, 9], 3) == pytest.approx(
        [1.5, 3, 6, 7.5]
    )  # shrinks at the ends
    assert study.running_mean([1, 2], 1) == [1, 2]
    rows = [
        {"step": 3, "kl": 2.0, "gold_score": 4.0},
        {"step": 1, "kl": 0.0, "gold_score": 0.0},
        {"step": 2, "kl": 1.0, "gold_score": 8.0},
        {"step": 4, "kl": 1.0},
    ]  # step 4 has no gold
    assert study.smoothed_curve(rows, 1) == [(0.0, 0.0), (1.0, 8.0), (2.0, 4.0)]  # in step order
    smoothed = study.smoothed_curve(rows, 3)
    assert [k for k, _ in smoothed] == pytest.approx([0.5, 1.0, 1.5])
    assert [g for _, g in smoothed] == pytest.approx([4.0, 4.0, 6.0])


# ----------------------------------------------------------------------------------------------
# the primary family, the MDD, no test on an empty group
# ----------------------------------------------------------------------------------------------
def test_holm_runs_over_the_whole_primary_family():
    """Four tests (2 methods × 2 targets) adjusted as one family, a fifth not tested left out."""
    tests = [{"p": p} for p in (0.01, 0.04, 0.03, 0.005)] + [{"p": None}]
    study.adjust_family(tests, alpha=0.05)
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4·0.005, 3·0.01, max(0.03, 2·0.03), max(0.06, 0.04)
    assert [t["p_holm"] for t in tests[:4]] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert [t["significant"] for t in tests] == [True, False, False, True, False]
    assert tests[4]["p_holm"] is None


def test_seeds_for_half_width_is_the_first_n_whose_interval_is_narrow_enough():
    # sd 0.05, ±0.03: n = 13 gives t_{0.975,12}·0.05/√13 = 2.1788·0.01387 = 0.0302 > 0.03, n = 14
    # gives 2.1604·0.05/√14 = 0.0289
    assert study.seeds_for_half_width(0.05, 0.03) == 14
    n = study.seeds_for_half_width(0.11, 0.03)
    assert study.t_quantile(0.975, n - 1) * 0.11 / n**0.5 <= 0.03
    assert study.t_quantile(0.975, n - 2) * 0.11 / (n - 1)**0.5 > 0.03
    assert study.seeds_for_half_width(None, 0.03) is None
    # a huge sd (a degenerate smoke-size fit) answers at once; it used to count up one n at a time
    assert study.seeds_for_half_width(30.0, 0.03) == math.ceil((1.959964 * 1000) ** 2)
    n = study.seeds_for_half_width(1.0, 0.03)  # 4,268 seeds: the t search still ends exactly
    assert study.t_quantile(0.975, n - 1) / n**0.5 <= 0.03 < study.t_quantile(0.975, n - 2) / (
        n - 1)**0.5
    assert study.seeds_for_half_width(float("nan"), 0.03) is None


def test_variance_components_split_ppo_seed_from_upstream_seed_noise():
    # tlcr − seq = b_u + w_p: b = 0, 0.1, 0.2 over 3 upstream seeds, w = ±0.05 over 2 PPO seeds.
    # s_tlcr² = var(b + 0.05, b − 0.05) = 0.005, s_seq² = 0; the means are b, var 0.01, so
    # s_b² = 0.01 − 0.005/2
    args = argparse.Namespace(ppo_seeds={"seq": 2, "tlcr": 2}, kl_targets=[1.0],
                              methods=["seq", "tlcr"], seeds=[0, 1, 2], half_width=0.03,
                              alpha=0.05)
    runs = [{"seed": u, "ppo_seed": p, "method": m,
             "targets": {"1": {"gold_at_target": 0.3 + (b + w if m == "tlcr" else 0.0),
                               "gold_se": 0.02 if m == "tlcr" else 0.01}}}
            for u, b in enumerate([0.0, 0.1, 0.2]) for p, w in enumerate([0.05, -0.05])
            for m in ("seq", "tlcr")]
    [row] = study.variance_components(args, runs)
    assert (row["a"], row["b"], row["n"], row["ppo_seeds"]) == ("tlcr", "seq", 3, [2, 2])
    assert row["sd_within"] == pytest.approx([0.005 ** 0.5, 0.0])
    assert row["sd_between"] == pytest.approx(0.0075 ** 0.5)
    assert row["eval_se"] == pytest.approx([0.02, 0.01])
    # more PPO seeds per upstream seed shrink only the within part: fewer upstream seeds needed
    needed = row["seeds_needed"]
    assert needed["1"] == study.seeds_for_half_width((0.0075 + 0.005) ** 0.5, 0.03)
    assert needed["4"] == study.seeds_for_half_width((0.0075 + 0.005 / 4) ** 0.5, 0.03)
    assert needed["design"] == needed["2"] and needed["1"] > needed["2"] > needed["4"]
    # an upstream seed without every value is left out; one PPO seed gives no split at all
    runs[0]["targets"]["1"]["gold_at_target"] = None
    assert study.variance_components(args, runs)[0]["n"] == 2
    assert study.variance_components(
        argparse.Namespace(**{**vars(args), "ppo_seeds": {"seq": 1, "tlcr": 1}}), runs) == []


def test_variance_components_with_unequal_ppo_seeds():
    # tlcr with 4 PPO seeds (w = ±0.1, ±0.1: s² = 0.04/3), seq with 2 (w = ±0.02: s² = 0.0008);
    # D(u) = b_u (0, 0.1, 0.2, 0.3: var 1/60); s_b² = 1/60 − (0.04/3)/4 − 0.0008/2
    args = argparse.Namespace(ppo_seeds={"seq": 2, "red": 1, "tlcr": 4}, kl_targets=[1.0],
                              methods=["seq", "red", "tlcr"], seeds=[0, 1, 2, 3],
                              half_width=0.03, alpha=0.05)
    spread = {"tlcr": [0.1, -0.1, 0.1, -0.1], "seq": [0.02, -0.02], "red": [0.0]}
    runs = [{"seed": u, "ppo_seed": p, "method": m,
             "targets": {"1": {"gold_at_target": 0.3 + w + (b if m == "tlcr" else 0.0)}}}
            for u, b in enumerate([0.0, 0.1, 0.2, 0.3]) for m, ws in spread.items()
            for p, w in enumerate(ws)]
    red, tlcr = study.variance_components(args, runs)
    assert red["ppo_seeds"] == [1, 2] and red["sd_between"] is None and red["seeds_needed"] == {}
    assert tlcr["sd_within"] == pytest.approx([(0.04 / 3) ** 0.5, 0.0008 ** 0.5])
    between = 1 / 60 - (0.04 / 3) / 4 - 0.0008 / 2
    assert tlcr["sd_between"] == pytest.approx(between ** 0.5)
    assert tlcr["seeds_needed"]["design"] == study.seeds_for_half_width(
        (between + (0.04 / 3) / 4 + 0.0008 / 2) ** 0.5, 0.03)
    assert tlcr["eval_se"] == [None, None]  # no sampling error recorded: none made up


def test_study_design_projects_the_half_width_from_the_three_parts(tmp_path, capsys):
    # tlcr = 0.3 + b_u ± 0.1 (s² 0.02), seq = 0.3 ± 0.01 (s² 0.0002) over 2 PPO seeds, b_u = 0,
    # 0.1, 0.2, 0.3 (var 1/60); a study from before gold_score_se: the eval's error from its replies
    replies = {"seq": [1, 0, 0, -1, 2, 0, 1, 0] * 40, "tlcr": [2, 1, 0, 0, 1, 1, 0, 3] * 40}
    runs = []
    for u, b in enumerate([0.0, 0.1, 0.2, 0.3]):
        rows = []
        for p, sign in enumerate([1, -1]):
            for m, value in (("tlcr", 0.3 + b + 0.1 * sign), ("seq", 0.3 + 0.01 * sign)):
                runs.append({"seed": u, "ppo_seed": p, "method": m, "iterations": 10 if m == "seq"
                             else 20, "targets": {"1": {"reached": True, "gold_at_target": value}}})
                rows += [{"policy": f"{m}-p{p}-kl1", "gold_score": g} for g in replies[m]]
        (tmp_path / f"up-{u}" / "eval").mkdir(parents=True)
        (tmp_path / f"up-{u}" / "eval" / "responses.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows))
    config = {"seeds": [0, 1, 2, 3], "methods": ["seq", "tlcr"], "ppo_seeds": 2, "size": "demo",
              "kl_targets": [1.0], "samples_per_prompt": 4}
    (tmp_path / "study.json").write_text(json.dumps({"config": config, "runs": runs}))
    result = study_design.main([str(tmp_path)])
    [row] = result["components"]
    e = {m: statistics.stdev(v) / math.sqrt(len(v)) for m, v in replies.items()}
    assert row["eval_se"] == pytest.approx([e["tlcr"], e["seq"]])
    assert row["sd_within"] == pytest.approx([0.02 ** 0.5, 0.0002 ** 0.5])
    between = 1 / 60 - 0.02 / 2 - 0.0002 / 2
    assert row["sd_between"] == pytest.approx(between ** 0.5)
    assert result["crn_r"] == pytest.approx(statistics.correlation(replies["seq"], replies["tlcr"]))
    # the revised default (seq 2, tlcr 4, K 8): the eval's part halves, the PPO run's is its own
    design = next(p for p in result["projections"] if p["design"] == (2, 1, 4, 8))
    assert e["seq"] ** 2 > 0.0002 > 0 and 0.02 > e["tlcr"] ** 2  # seq's spread: all the eval's
    variance = (between + (0.02 - e["tlcr"] ** 2 + e["tlcr"] ** 2 / 2) / 4
                + (0.0 + e["seq"] ** 2 / 2) / 2)
    assert design["half_widths"] == [pytest.approx(study.t_quantile(0.975, 7) * math.sqrt(
        variance / 8))]
    assert "tlcr−seq@1" in capsys.readouterr().out


def test_ppo_seeds_per_method():
    args = study.parse_args([])
    assert args.ppo_seeds == study.DEFAULT_PPO_SEEDS == {"seq": 2, "red": 1, "tlcr": 4}
    assert study.parse_args(["--ppo-seeds", "3"]).ppo_seeds == {"seq": 3, "red": 3, "tlcr": 3}
    assert study.parse_args(["--ppo-seeds", "tlcr=5", "2"]).ppo_seeds == {
        "seq": 2, "red": 2, "tlcr": 5}  # METHOD=N wins over N, whatever the order
    assert study.parse_args(["--methods", "seq", "tlcr", "--ppo-seeds", "red=3"]).ppo_seeds == {
        "seq": 2, "tlcr": 4}  # a method not compared is ignored
    for bad in (["--ppo-seeds", "0"], ["--ppo-seeds", "ppo=2"], ["--ppo-seeds", "tlcr=x"]):
        with pytest.raises(SystemExit):
            study.parse_args(bad)
    stages = [s.name for s in study.build_stages(study.parse_args(["--seeds", "0"]))
              if s.kind == "ppo"]
    assert stages == ["up-0/ppo_seq_p0", "up-0/ppo_red_p0", "up-0/ppo_tlcr_p0",
                      "up-0/ppo_seq_p1", "up-0/ppo_tlcr_p1", "up-0/ppo_tlcr_p2",
                      "up-0/ppo_tlcr_p3"]
    assert study.ppo_design(args) == "seq 2, red 1, tlcr 4 PPO seeds"


def test_mdd_matches_a_hand_value():
    # n = 8: t_{0.975,7} = 2.3646, t_{0.8,7} = 0.8960 (t table); sd 0.05
    assert study.t_quantile(0.8, 7) == pytest.approx(0.8960, abs=1e-3)
    assert study.mdd(0.05, 8) == pytest.approx((2.3646 + 0.8960) * 0.05 / 8**0.5, abs=2e-4)
    assert study.mdd(0.05, 8, power=0.9) > study.mdd(0.05, 8)  # more power: a larger MDD
    assert study.mdd(None, 8) is None and study.mdd(0.05, 1) is None
    test = study.compare([1.0, 2.0, 3.5, 4.0], [0.0, 0.5, 1.0, 2.0])  # differences 1, 1.5, 2.5, 2
    assert test["sd"] == pytest.approx(0.6454972) and test["mdd"] == pytest.approx(
        study.mdd(0.6454972, 4))


def test_no_test_on_an_empty_group():
    empty = study.compare([None, None, None], [0.1, 0.2, 0.3])  # seq's per-word r: n = 0
    assert empty["n"] == 0 and empty["p"] is None and empty["t"] is None
    assert empty["sign_flip_p"] is None and empty["not_tested"] == "n = 0 paired values"
    single = study.compare([0.5, None], [0.1, 0.2])
    assert single["n"] == 1 and single["p"] is None and single["not_tested"] == "n = 1 paired value"
    study.adjust_family([empty, single])
    assert empty["p_holm"] is None and not empty["significant"] and not single["significant"]
    assert study.test_cells(empty, 0.05)[4] == "not tested (n = 0 paired values)"


# ----------------------------------------------------------------------------------------------
# the all-steps frontier of Gao et al. 2022
# ----------------------------------------------------------------------------------------------
def test_frontier_fit_recovers_known_alpha_beta():
    alpha, beta, g0 = 0.30, 0.12, 0.09
    kls = [0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9, 1.0, 1.2]
    golds = [g0 + study.frontier_gain(alpha, beta, k) for k in kls]
    assert study.fit_frontier(kls, golds, g0) == pytest.approx((alpha, beta), abs=1e-9)
    # noisy: the least-squares fit is still close
    noise = [0.004 * (-1) ** i for i in range(len(kls))]
    fit = study.fit_frontier(kls, [g + e for g, e in zip(golds, noise)], g0)
    assert fit == pytest.approx((alpha, beta), abs=0.05)
    assert study.fit_frontier([0.0, 0.5, 0.5], [0.1, 0.2, 0.2], 0.1) is None  # one distinct d > 0
    assert study.frontier_gain(alpha, beta, -0.01) == 0.0  # a negative k1 estimate: d = 0


def test_gold_at_target_joins_the_held_out_points_by_straight_lines_in_sqrt_kl():
    g_sft = 0.1
    snapshots = [(0.64, 0.3), (1.44, 0.2)]  # d = 0.8 and 1.2
    # between SFT (d 0) and the first snapshot: d 0.4 is halfway, so halfway between their golds
    assert study.gold_at_target(snapshots, g_sft, 0.16) == pytest.approx(0.2)
    # between the two snapshots: d 1 is halfway
    assert study.gold_at_target(snapshots, g_sft, 1.0) == pytest.approx(0.25)
    assert study.gold_at_target(snapshots, g_sft, 0.64) == pytest.approx(0.3)  # on a point
    # above the last snapshot: its gold, never a line carried beyond it (which would give 0.15)
    assert study.gold_at_target(snapshots, g_sft, 1.96) == pytest.approx(0.2)
    assert study.short_of_target(snapshots, 1.96) and not study.short_of_target(snapshots, 1.0)
    # the order of the points does not matter; the same snapshot saved for both targets counts once
    assert study.gold_at_target(snapshots[::-1], g_sft, 1.0) == pytest.approx(0.25)
    assert study.gold_at_target([(0.81, 0.19), (0.81, 0.19)], g_sft, 0.09) == pytest.approx(0.13)
    # two snapshots at one KL with different gold: their mean
    assert study.gold_at_target([(1.0, 0.2), (1.0, 0.4)], g_sft, 1.0) == pytest.approx(0.3)
    assert study.gold_at_target([(-0.01, 0.12)], 0.09, 0.5) == 0.12  # no KL above 0: as it is
    assert study.gold_at_target([], 0.09, 0.5) is None
    assert study.gold_at_target([(None, None)], 0.09, 0.5) is None
    assert not study.short_of_target([(None, None)], 0.5)


def test_the_straight_line_reading_is_steadier_than_the_fit_when_snapshots_crowd():
    """Why the reading changed: two snapshots close in KL with a gold difference that is only eval
    noise send the fitted R(d) far off between SFT and them; the straight lines stay between the
    measured golds."""
    g_sft, snapshots = 0.09, [(0.85, 0.17), (0.86, 0.20)]
    line = study.gold_at_target(snapshots, g_sft, 0.5)
    assert g_sft < line < 0.20
    fit = study.gold_by_fit_at_target(snapshots, g_sft, 0.5)
    assert fit < 0.0  # the curve through both bends far below every measured gold (−0.87)


def test_gold_by_fit_at_target_reads_the_fitted_frontier_at_exactly_the_target():
    alpha, beta, g_sft = 0.2, -0.1, 0.09
    curve = [(kl, g_sft + study.frontier_gain(alpha, beta, kl)) for kl in (0.62, 1.17)]
    for target in (0.5, 1.0):  # two snapshots off the targets: the curve through them, at target
        assert study.gold_by_fit_at_target(curve, g_sft, target) == pytest.approx(
            g_sft + study.frontier_gain(alpha, beta, target))
    # the same snapshot saved for both targets (one distinct KL): R = α·d through it
    assert study.gold_by_fit_at_target([(0.81, 0.18), (0.81, 0.18)], 0.09, 0.25) == pytest.approx(
        0.09 + 0.09 / 0.9 * 0.5)
    assert study.gold_by_fit_at_target([(-0.01, 0.12)], 0.09, 0.5) == 0.12
    assert study.gold_by_fit_at_target([], 0.09, 0.5) is None


def test_frontier_mean_gain_is_the_area_over_the_width():
    alpha, beta, kl_max, steps = 0.3, 0.12, 1.5, 200000
    riemann = sum(study.frontier_gain(alpha, beta, (i + 0.5) * kl_max / steps)
                  for i in range(steps)) / steps  # midpoint rule of (1/K)∫_0^K R(√k) dk
    assert study.frontier_mean_gain(alpha, beta, kl_max) == pytest.approx(riemann, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# end to end: two upstream seeds at smoke size, then a rerun that runs nothing
# ----------------------------------------------------------------------------------------------
def test_smoke_study_two_upstream_seeds_end_to_end_and_resumes(tmp_path, monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LEXICON"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYTHON", sys.executable)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "study"
    # 1000: a target no smoke run reaches, so every run reports a miss there
    argv = ["--size", "smoke", "--seeds", "0", "1", "--methods", "seq", "tlcr", "--kl-targets",
            "0.02", "1000", "--max-iterations", "5", "--samples-per-prompt", "2", "--jobs", "2",
            "--ppo-seeds", "1", "--credit", "--out", str(out)]
    result = study.main(argv)
    on_disk = json.loads((out / "study.json").read_text())
    assert on_disk["config"]["seeds"] == [0, 1] and on_disk["config"]["methods"] == ["seq", "tlcr"]
    runs = on_disk["runs"]
    assert len(runs) == 4 and all(set(r["targets"]) == {"0.02", "1000"} for r in runs)
    for run in runs:  # every run contributes at every target: a value or a reported miss
        up = out / f"up-{run['seed']}"
        eval_results = json.loads((up / "eval_kl0.02" / "results.json").read_text())
        last_eval = json.loads((up / "eval_kl1000" / "results.json").read_text())
        # one eval a target: its snapshots; the missed runs' final policies with the last
        assert set(eval_results["policies"]) == {"seq-p0-kl0.02", "tlcr-p0-kl0.02"}
        assert set(last_eval["policies"]) == {"seq-p0-final", "tlcr-p0-final"}
        low = run["targets"]["0.02"]
        assert low["reached"] and low["iteration"] >= 1
        name = study.policy_name(run["method"], 0, 0.02)
        assert low["gold"] == eval_results["policies"][name]["gold_score"]
        assert low["heldout_kl"] == eval_results["policies"][name]["kl"]
        assert eval_results["samples_per_prompt"] == 2 and eval_results["num_prompts"] == 8
        assert not run["targets"]["1000"]["reached"] and run["final"]["gold"] == last_eval[
            "policies"][study.policy_name(run["method"], 0)]["gold_score"]
        assert run["iterations"] == 5 and run["frontier"] is not None
        snapshots = json.loads((out / f"up-{run['seed']}" / f"ppo_{run['method']}_p0" /
                                "snapshots.json").read_text())
        assert snapshots["0.02"]["iteration"] == low["iteration"]
    assert len(on_disk["missed"]) == 4 and {m["target"] for m in on_disk["missed"]} == {1000.0}
    tests = on_disk["primary"]["tests"]
    assert [(t["a"], t["b"], t["target"]) for t in tests] == [("tlcr", "seq", 0.02),
                                                              ("tlcr", "seq", 1000.0)]
    assert tests[0]["n"] == 2 and tests[1]["n"] == 0 and tests[1]["not_tested"]
    assert tests[1]["p"] is None and tests[1]["p_holm"] is None
    tlcr = on_disk["primary"]["values"]["tlcr@0.02"]
    assert tlcr["snapshot_gold"]["values"] == [
        r["targets"]["0.02"]["gold"] for r in runs if r["method"] == "tlcr"]
    for run in runs:  # the primary value: the run's held-out frontier read at the target
        cell = run["targets"]["0.02"]
        assert cell["gold_at_target"] == pytest.approx(study.gold_at_target(
            [(cell["heldout_kl"], cell["gold"])], on_disk["sft_gold"], 0.02))
    assert tlcr["gold"]["values"] == [
        r["targets"]["0.02"]["gold_at_target"] for r in runs if r["method"] == "tlcr"]
    assert len(on_disk["primary"]["sensitivity"]) == 2 * 2  # 2 targets × 2 other readings
    # the runs listed short of a target are exactly those whose held-out KL stayed below it
    short = []
    for r in runs:
        points = [(c["heldout_kl"], c["gold"]) for c in r["targets"].values() if c["reached"]]
        short += [(r["seed"], r["method"], float(k), max(p[0] for p in points))
                  for k, c in r["targets"].items()
                  if c["reached"] and study.short_of_target(points, float(k))]
    assert [(s["seed"], s["method"], s["target"], s["heldout_kl"])
            for s in on_disk["short"]] == short
    assert "Runs whose held-out KL stayed below a target" in (out / "study.md").read_text()
    assert set(on_disk["times"]) == {"sft", "label", "sft_eval", "reward_model", "discriminator",
                                     "ppo", "eval", "credit"}
    sft_eval = json.loads((out / "sft_eval" / "results.json").read_text())
    assert on_disk["sft_gold"] == sft_eval["policies"]["sft"]["gold_score"]
    assert "sft" not in eval_results["policies"]  # scored once, not per seed
    assert on_disk["times"]["ppo"]["count"] == 4
    credit = on_disk["exploratory"]["credit"]["heldout_auc_harm"]
    assert credit["values"]["tlcr"]["n"] == 2 and [
        (t["a"], t["b"]) for t in credit["tests"]] == []  # red not run: nothing to compare with
    md = (out / "study.md").read_text()
    assert md.index("PRIMARY ENDPOINT") < md.index("PRIMARY COMPARISONS") < md.index(
        "SECONDARY ENDPOINT") < md.index("EXPLORATORY")  # the decision table first
    assert "p (raw)" in md and "p (Holm)" in md and "not tested (n = 0 paired values)" in md
    assert "Runs that missed a target (within 5 iterations): 4" in md
    page = (out / "study.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and page.rstrip().endswith(
        "</html>")
    svg = (out / "frontier.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") >= 4 + 2  # each run's fit, each mean
    assert result["primary"]["tests"][0]["mean_diff"] == pytest.approx(tests[0]["mean_diff"])
    # bench/study_readings.py recomputes the primary comparisons from study.json as study.py did
    line = [r for r in study_readings.main([str(out / "study.json")]) if r["reading"] == "line"]
    assert [(r["target"], r["n"], r["mean"]) for r in line] == [
        (t["target"], t["n"], t["mean_diff"]) for t in tests]

    # resumable: every stage has its marker, a rerun runs nothing and gives the same tables
    def no_run(*args, **kwargs):
        raise AssertionError("a finished stage was run again")

    monkeypatch.setattr(study, "run_stage", no_run)
    again = study.main(argv + ["--report-only"])
    assert json.loads(json.dumps(again["primary"])) == on_disk["primary"]
    study.main(argv)  # not --report-only: still nothing to run
    with pytest.raises(SystemExit, match=r"stages not done"):
        study.main(argv + ["--seeds", "0", "2", "--report-only"])


def test_an_eval_marker_is_done_only_for_the_same_policies(tmp_path):
    """Extending a study with --ppo-seeds 2 keeps its PPO runs and upstream models but evaluates
    again, since the eval's policies changed; the same design finds every marker done."""
    out = str(tmp_path / "study")
    one = study.parse_args(["--seeds", "0", "--ppo-seeds", "1", "--out", out])
    two = study.parse_args(["--seeds", "0", "--ppo-seeds", "2", "--out", out])
    for ppo_seed, method, target in itertools.product([0], study.METHODS, [0.5, 1]):
        study.snapshot_dir(one, 0, method, ppo_seed, target).mkdir(parents=True)
    for stage in study.build_stages(one):  # as run_stage leaves them
        study.marker(one, stage).parent.mkdir(parents=True, exist_ok=True)
        study.marker(one, stage).write_text(json.dumps({"argv": stage.argv()}))
    assert all(study.stage_done(one, s) for s in study.build_stages(one))
    for method, target in itertools.product(study.METHODS, [0.5, 1]):  # the new runs' snapshots
        study.snapshot_dir(two, 0, method, 1, target).mkdir(parents=True)
    not_done = [s.name for s in study.build_stages(two) if not study.stage_done(two, s)]
    assert not_done == ["up-0/ppo_seq_p1", "up-0/ppo_red_p1", "up-0/ppo_tlcr_p1",
                        "up-0/eval_kl0.5", "up-0/eval_kl1"]
    assert study.policy_names(["eval.py", "--policies", "b=x", "a=y", "--seed", "0"]) == ["a", "b"]
    assert study.policy_names(["sft.py", "--out", "x"]) is None


def test_a_study_from_before_the_eval_split_is_not_evaluated_again(tmp_path):
    """Before, one eval a seed (up-U/eval) scored both targets' snapshots: its marker stands for
    the targets' evals while it scored their policies, and read_runs reads its results."""
    out = tmp_path / "study"
    args = study.parse_args(["--seeds", "0", "--ppo-seeds", "1", "--methods", "seq", "tlcr",
                             "--out", str(out)])
    for method, target in itertools.product(["seq", "tlcr"], [0.5, 1]):
        study.snapshot_dir(args, 0, method, 0, target).mkdir(parents=True)
    evals = [s for s in study.build_stages(args) if s.kind == "eval"]
    assert [s.name for s in evals] == ["up-0/eval_kl0.5", "up-0/eval_kl1"]
    assert [study.policy_names(s.argv()) for s in evals] == [
        ["seq-p0-kl0.5", "tlcr-p0-kl0.5"], ["seq-p0-kl1", "tlcr-p0-kl1"]]
    old = ["eval.py", "--policies", *(f"{m}-p0-kl{t}={out}/{m}{t}" for m in ("seq", "tlcr")
                                      for t in ("0.5", "1")), "--seed", "0"]
    study.marker(args, "up-0/eval").parent.mkdir(parents=True)
    study.marker(args, "up-0/eval").write_text(json.dumps({"argv": old[:5] + old[6:]}))
    assert [study.stage_done(args, s) for s in evals] == [True, False]  # kl1 was not scored
    study.marker(args, "up-0/eval").write_text(json.dumps({"argv": old}))
    assert all(study.stage_done(args, s) for s in evals)
    (out / "up-0" / "eval").mkdir()
    (out / "up-0" / "eval" / "results.json").write_text(json.dumps({"policies": {
        "seq-p0-kl0.5": {"gold_score": 0.25, "kl": 0.6}, "seq-p0-kl1": {"gold_score": 0.5}}}))
    run = study.read_runs(args)[0]
    assert run["targets"]["0.5"]["gold"] == 0.25 and run["targets"]["0.5"]["heldout_kl"] == 0.6
    assert run["targets"]["1"]["gold"] == 0.5


def test_ready_stages_start_upstream_first_and_evals_last(tmp_path, monkeypatch):
    """Of the stages ready at once, the upstream models and PPO runs start before any eval: the
    evals end the study on both jobs (two a seed), not the last seed's alone on one."""
    args = study.parse_args(["--seeds", "0", "1", "--ppo-seeds", "1", "--methods", "seq", "red",
                             "--jobs", "1", "--out", str(tmp_path / "study")])
    started = []

    def fake_run(args, stage):
        started.append(stage.name)
        return 0.0

    monkeypatch.setattr(study, "run_stage", fake_run)
    study.run_stages(args, study.build_stages(args))
    assert started == ["sft", "labels", "up-0/reward_model", "up-1/reward_model",
                       "up-0/discriminator", "up-1/discriminator", "up-0/ppo_seq_p0",
                       "up-0/ppo_red_p0", "up-1/ppo_seq_p0", "up-1/ppo_red_p0", "sft_eval",
                       "up-0/eval_kl0.5", "up-0/eval_kl1", "up-1/eval_kl0.5", "up-1/eval_kl1"]


def test_time_plan_counts_the_design():
    args = study.parse_args(["--seeds", *map(str, range(8)), "--ppo-seeds", "2", "--jobs", "2",
                             "--samples-per-prompt", "4"])
    plan = study.time_plan(args)["stages"]
    assert plan["ppo"]["count"] == 8 * 3 * 2 and plan["discriminator"]["count"] == 8
    assert plan["sft"]["count"] == 1 and plan["eval"]["count"] == 8 * 2  # one a target
    seconds = study.STAGE_SECONDS["demo"]
    assert plan["eval"]["seconds_each"] == pytest.approx(
        seconds["eval_start"] + seconds["eval_policy"] * 3 * 2, abs=0.1)
    # the default: 15 upstream seeds, 7 runs a seed (seq 2, red 1, tlcr 4), 4 replies a prompt
    plan = study.time_plan(study.parse_args(["--jobs", "2"]))["stages"]
    iterations = study.EXPECTED_ITERATIONS["demo"]
    assert plan["ppo"]["count"] == 15 * 7 and plan["eval"]["count"] == 15 * 2
    assert plan["eval"]["seconds_each"] == pytest.approx(
        seconds["eval_start"] + seconds["eval_policy"] * 7, abs=0.1)
    assert plan["ppo"]["seconds_each"] == pytest.approx(seconds["ppo_start"] + seconds[
        "ppo_iteration"] * (2 * iterations["seq"] + iterations["red"] + 4 * iterations["tlcr"]) / 7,
        abs=0.1)
    assert study.main(["--plan-only", "--seeds", "0", "1"]) == {"plan": study.time_plan(
        study.parse_args(["--seeds", "0", "1"]))}


def test_study_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        study.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "--kl-points" in text and "Holm" in text and "--kl-targets" in text
    for bad in (["--seeds", "1", "1"], ["--alpha", "1.5"], ["--kl-targets", "0"], ["--jobs", "0"],
                ["--methods", "red", "tlcr"], ["--power", "0.4"]):
        with pytest.raises(SystemExit):
            study.parse_args(bad)
