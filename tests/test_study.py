"""study.py: the statistics against known values, the gold-at-KL reading of hand-made curves, and a
smoke-size study of two seeds end to end (resumed without running a seed twice)."""

import json
import sys

import pytest

import study


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
# end to end: two seeds at smoke size, then a rerun that runs nothing
# ----------------------------------------------------------------------------------------------
def test_smoke_study_runs_two_seeds_and_resumes(tmp_path, monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYTHON", sys.executable)
    monkeypatch.setenv("DEVICE", "cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "study"
    argv = [
        "--size", "smoke", "--seeds", "0", "1", "--rewards", "seq", "tlcr", "--jobs", "2",
        "--out", str(out),
    ]
    result = study.main(argv)
    for seed in (0, 1):
        assert (out / f"seed-{seed}" / "eval" / "results.json").exists()
        assert json.loads((out / f"seed-{seed}" / "study_seconds.json").read_text())["seconds"] > 0
    on_disk = json.loads((out / "study.json").read_text())
    assert on_disk["config"]["seeds"] == [0, 1] and on_disk["config"]["rewards"] == ["seq", "tlcr"]
    summary = on_disk["summary"]
    assert set(summary) == {
        "gold_at_kl_1",
        "gold_at_kl_2",
        "gold_at_kl_4",
        "final_gold",
        "final_kl",
        "heldout_auc_harm",
        "heldout_auc_safe",
        "heldout_word_r",
        "samples_auc_harm",
        "samples_auc_safe",
    }
    for method in ("seq", "tlcr"):  # the per-seed values are those of each seed's own eval
        per_seed = [
            json.loads((out / f"seed-{s}" / "eval" / "results.json").read_text())["policies"][
                method
            ]
            for s in (0, 1)
        ]
        assert summary["final_gold"][method]["values"] == [p["gold_score"] for p in per_seed]
        assert (
            summary["final_kl"][method]["n"] == 2 and summary["final_kl"][method]["ci"] is not None
        )
    assert [(t["a"], t["b"]) for t in on_disk["comparisons"]["final_gold"]] == [("seq", "tlcr")]
    assert on_disk["per_seed"]["0"]["tlcr"]["curve"]  # the smoothed curve of each run is kept
    md = (out / "study.md").read_text()
    assert "gold at KL 1" in md and "paired t-test" in md and "| seq |" in md
    page = (out / "study.html").read_text()
    assert (
        page.startswith("<!DOCTYPE html>") and "<svg" in page and page.rstrip().endswith("</html>")
    )
    assert (out / "frontier.svg").read_text().startswith("<svg")
    assert (
        result["summary"]["final_gold"]["tlcr"]["values"] == summary["final_gold"]["tlcr"]["values"]
    )

    # resumable: the finished seeds are not run again
    def no_run(*args, **kwargs):
        raise AssertionError("a finished seed was run again")

    monkeypatch.setattr(study, "run_seed", no_run)
    again = study.main(argv)
    assert again["summary"] == json.loads(json.dumps(result["summary"]))
    # a seed without every requested method is not done: it would run (and resume) again
    assert not study.seed_done(
        study.parse_args(argv[:-2] + ["--rewards", "seq", "red", "--out", str(out)]), 0
    )
    with pytest.raises(SystemExit, match=r"seeds \[2\] have no finished run"):
        study.main(argv + ["--seeds", "0", "2", "--report-only"])


def test_study_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        study.parse_args(["--help"])
    assert "--kl-points" in capsys.readouterr().out
    for bad in (["--seeds", "1", "1"], ["--alpha", "1.5"], ["--env", "NOVALUE"], ["--jobs", "0"]):
        with pytest.raises(SystemExit):
            study.parse_args(bad)
