"""The whole pipeline at its smallest size (run_pipeline.sh SIZE=smoke), and the README's
promises."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gold
import report
from plumbing import hf_models

ROOT = Path(__file__).resolve().parents[1]


def run_pipeline(tmp_path, **settings):
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(SIZE="smoke", RUN=str(run), PYTHON=sys.executable, DEVICE="cpu", OMP_NUM_THREADS="1",
               **settings)
    done = subprocess.run(["bash", str(ROOT / "run_pipeline.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "report: " in done.stdout and "| sft |" in done.stdout
    # each stage was printed as the command a student would type
    return run, [line for line in done.stdout.splitlines() if line.startswith("+ ")]


def test_the_lab_pipeline_at_smoke_size(tmp_path):
    """The default run (TASK=gold): gold preferences and revisions, the five PPO runs, the gold
    score in the PPO logs, the results and the report."""
    run, commands = run_pipeline(tmp_path)
    rewards = ["seq", "red", "tlcr", "tlcr_no_negative", "tlcr_no_positive"]
    assert [c.split()[2] for c in commands] == [
        "sft.py",
        "label.py",
        "discriminator.py",
        "redistribute.py",
        *["ppo_token.py"] * 5,
        "eval.py",
    ]
    assert "--reviser gold" in commands[1] and "--preference gold" in commands[1]
    assert "--preference gold --revision-pairs" in commands[3]
    assert all("--log-gold" in c for c in commands[4:9]) and "--gold" in commands[9]
    records = [json.loads(line) for line in (run / "labels.jsonl").read_text().splitlines()]
    assert records and all(r["revised"] == gold.gold_revise(r["rejected"]) for r in records)
    for reward in rewards:
        log = [
            json.loads(line)
            for line in (run / f"ppo_{reward}" / "log.jsonl").read_text().splitlines()
        ]
        assert [r["step"] for r in log] == [1, 2] and all("gold_score" in r for r in log)
        lexicon_id = json.loads((run / f"ppo_{reward}" / "args.json").read_text())["lexicon_id"]
        assert lexicon_id == gold.default_lexicon().id  # the lexicon is recorded with the run
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["lexicon"] == gold.default_lexicon().id
    assert list(results["policies"]) == ["sft", *rewards] and results["num_prompts"] == 8
    responses = [
        json.loads(line) for line in (run / "eval" / "responses.jsonl").read_text().splitlines()
    ]
    # the column is the mean of the per-response gold scores
    for name, row in results["policies"].items():
        scores = [r["gold_score"] for r in responses if r["policy"] == name]
        assert row["gold_score"] == pytest.approx(sum(scores) / 8) and scores == [
            gold.gold_score(r["response"]) for r in responses if r["policy"] == name]
    page = (run / "eval" / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and report.GOLD_VS_KL in page and "</html>" in page


def test_the_lab_pipeline_on_samples_with_prefix_pairs(tmp_path):
    """LAB_DATA=samples PREFIX_PAIRS=1: gold_samples.py after SFT, label.py and redistribute.py on
    its file (--split all), the reward model with --prefix-pairs; PPO and eval still on the bundled
    data."""
    run, commands = run_pipeline(tmp_path, LAB_DATA="samples", PREFIX_PAIRS="1", REWARDS="red")
    assert [c.split()[2] for c in commands] == [
        "sft.py", "gold_samples.py", "label.py", "discriminator.py", "redistribute.py",
        "ppo_token.py", "eval.py"]
    samples = f"--data {run}/samples.jsonl --split all"
    assert samples in commands[2] and samples in commands[4] and "--prefix-pairs" in commands[4]
    assert "--data bundled" in commands[5] and "--data bundled" in commands[6]
    summary = json.loads((run / "samples.jsonl.summary.json").read_text())
    assert (
        summary["prompts"] == 20
        and summary["samples"] == 60
        and summary["test_prompts_dropped"] == 0
    )
    info = json.loads((run / "reward_model" / "token_rlhf.json").read_text())
    assert info["prefix_pairs"] is True and info["split"] == "all"
    bad = subprocess.run(["bash", str(ROOT / "run_pipeline.sh")],
                         env={**os.environ, "LAB_DATA": "sample"}, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "LAB_DATA must be pairs or samples" in bad.stderr


def test_the_human_pipeline_with_lora_at_smoke_size(tmp_path):
    """TASK=human with LoRA on every training stage: the saved models are the standard ones,
    adapters merged."""
    run, commands = run_pipeline(tmp_path, TASK="human", LORA_RANK="4")
    assert [c.split()[2] for c in commands] == [
        "sft.py", "label.py", "discriminator.py", "redistribute.py", "ppo_token.py", "ppo_token.py",
        "ppo_token.py", "eval.py",
    ]
    lora_stages = [c.split()[2] for c in commands if "--lora-rank 4" in c]
    assert lora_stages == ["sft.py", "discriminator.py", "redistribute.py"] + ["ppo_token.py"] * 3
    tokenizer = hf_models.load_tokenizer(run / "sft")
    ids = torch.tensor([tokenizer("\n\nHuman: hi\n\nAssistant: hello")["input_ids"]])
    mask = torch.ones_like(ids)
    for policy_dir in [run / "sft"] + [run / f"ppo_{r}" / "policy" for r in ("seq", "red", "tlcr")]:
        policy = hf_models.load_policy(policy_dir)
        assert torch.isfinite(policy(input_ids=ids, attention_mask=mask).logits).all(), policy_dir
        assert not any("lora" in name for name in policy.state_dict())  # merged: a plain model
    for score_dir in (run / "discriminator", run / "reward_model"):
        scores = hf_models.load_score_model(score_dir)(ids, mask)
        assert scores.shape == ids.shape and torch.isfinite(scores).all()
    # 10% of --limit 40
    assert json.loads((run / "reward_model" / "accuracy.json").read_text())["pairs"] == 4
    # the same pairs
    assert json.loads((run / "discriminator" / "accuracy.json").read_text())["n_pairs"] == 4
    records = [json.loads(line) for line in (run / "labels.jsonl").read_text().splitlines()]
    assert len(records) == 40 and all(
        len(r["rejected_ids"]) == len(r["rejected_labels"]) for r in records
    )
    results = json.loads((run / "eval" / "results.json").read_text())
    assert (
        list(results["policies"]) == ["sft", "seq", "red", "tlcr"]
        and "gold_score" not in results["policies"]["sft"]
    )


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, flags=re.S)
    test_command = ci[-1]
    assert test_command.startswith("python -m pytest")
    assert any(test_command in block.splitlines() for block in blocks), (
        "README must show the CI test command"
    )


def test_every_stage_script_has_help():
    for script in (
        "sft.py", "label.py", "discriminator.py", "redistribute.py", "ppo_token.py", "eval.py",
        "study.py", "gold_samples.py", "gold.py",
    ):
        done = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0 and "usage:" in done.stdout, script
