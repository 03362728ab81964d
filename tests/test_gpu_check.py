"""bench/gpu_check.py, the prepared device check, run on the CPU with --tiny so that it cannot rot:
every
stage runs, the table and its JSON hold every figure, and PPO starts exactly at its bf16
reference."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_check  # noqa: E402


def test_gpu_check_runs_on_cpu_tiny(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        report = gpu_check.main(
            [
                "--device", "cpu", "--tiny", "--threads", "1", "--steps", "2",
                "--out", str(tmp_path / "check.json"),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert json.loads((tmp_path / "check.json").read_text()) == json.loads(json.dumps(report))
    stages = ["sft", "discriminator", "reward", "ppo", "ppo_lora", "sft_fsdp"]
    assert [(r["model"], r["stage"]) for r in report["rows"]] == [
        (m, s) for m in ("gpt2", "llama") for s in stages
    ]
    for row in report["rows"]:
        assert row["tokens_per_s"] > 0 and row["planned_bytes"] > 0 and row["peak_bytes"] >= 0
        assert f"| {row['model']} | {row['stage']} |" in out
        if row["stage"].startswith(
            "ppo"
        ):  # bf16: the policy and its reference compute alike at iteration 0
            assert row["kl0_max"] == 0.0 and row["ratio_max"] == pytest.approx(0.0, abs=1e-6)
            assert row["rollout_tokens_per_s"] > 0
        if row["stage"] == "sft":
            assert (
                0 < row["sft_loss_bf16_vs_fp32"] < 2e-2
            )  # bf16 ran, and agrees (tests/test_precision.py)
    assert (
        report["precision"] == "bf16" and report["peak_tflops"] is None
    )  # no MFU without a known peak


def test_peak_lookup_and_mfu_flops():
    args = gpu_check.parse_args(["--peak-tflops", "100"])
    assert gpu_check.peak_tflops(args, torch.device("cpu")) == (100, "--peak-tflops")
    config = gpu_check.model_configs(tiny=False)["gpt2"]
    n = 124_439_808  # GPT-2-124M with its tied LM head
    flops = gpu_check.training_flops_per_token(config, n, 1024)
    assert (
        flops == 6 * (n - 50257 * 768) + 12 * 12 * 768 * 1024
    )  # 6·N (no input embedding) + attention
