"""bench/gpu_check.py, the prepared device check, run on the CPU with --tiny so that it cannot rot:
every stage runs, the table and its JSON hold every figure, and PPO starts exactly at its bf16
reference. A stage that raises, runs out of memory, would not fit or would pass the deadline is a
row saying so, and the rows before and after it are kept, on disk after every stage."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402


def test_gpu_check_runs_on_cpu_tiny(tmp_path, capsys, one_thread):
    report = gpu_check.main(
        [
            "--device", "cpu", "--tiny", "--threads", "1", "--steps", "2",
            "--out", str(tmp_path / "check.json"),
        ]
    )
    out = capsys.readouterr().out
    assert json.loads((tmp_path / "check.json").read_text()) == json.loads(json.dumps(report))
    table = (tmp_path / "check.md").read_text()
    stages = ["agreement", "sft", "discriminator", "reward", "ppo", "ppo_lora", "sft_fsdp",
              "rollout"]
    assert [(r["model"], r["stage"]) for r in report["rows"]] == [
        (m, s) for m in ("gpt2", "llama") for s in stages
    ]
    for row in report["rows"]:
        assert row["status"] == "ok", row
        assert f"| {row['model']} | {row['stage']} | ok |" in out
        assert f"| {row['model']} | {row['stage']} | ok |" in table
        if row["stage"] == "agreement":  # bf16 ran, and agrees (tests/test_precision.py)
            assert 0 < row["sft_loss_bf16_vs_fp32"] < 2e-2 and row["planned_bytes"] is None
            continue
        if row["stage"] == "rollout":  # generation alone, eager and compiled (or its fallback)
            assert row["eager_tokens_per_s"] > 0 and row["compiled_tokens_per_s"] > 0
            assert row["compiled_first_call_s"] > 0 and row["planned_bytes"] is None
            continue
        assert row["tokens_per_s"] > 0 and row["planned_bytes"] > 0 and row["peak_bytes"] >= 0
        if row["stage"].startswith("ppo"):
            # bf16: the policy and its reference compute alike at iteration 0
            assert row["kl0_max"] == 0.0 and row["ratio_max"] == pytest.approx(0.0, abs=1e-6)
            assert row["rollout_tokens_per_s"] > 0
    # no MFU without a known peak
    assert report["precision"] == "bf16" and report["peak_tflops"] is None


def test_a_stage_that_raises_or_runs_out_of_memory_keeps_the_rows_around_it(
        tmp_path, monkeypatch, one_thread):
    """discriminator raises, reward fakes a CUDA out-of-memory: both are rows with the error, the
    SFT row before and the PPO row after are measured, and when PPO starts the JSON and the table
    on disk already hold the two failed rows."""
    out = tmp_path / "check.json"

    def raises(*_):
        raise RuntimeError("planted failure")

    def out_of_memory(*_):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (planted)")

    seen_on_disk = {}

    def ppo_after_reading_the_disk(*args):
        seen_on_disk["json"] = json.loads(out.read_text())["rows"]
        seen_on_disk["table"] = out.with_suffix(".md").read_text()
        return gpu_check.ppo_stage(*args)

    stages = gpu_check.STAGES
    monkeypatch.setitem(stages, "discriminator", dataclasses.replace(stages["discriminator"],
                                                                     run=raises))
    monkeypatch.setitem(stages, "reward", dataclasses.replace(stages["reward"], run=out_of_memory))
    monkeypatch.setitem(stages, "ppo", dataclasses.replace(stages["ppo"],
                                                           run=ppo_after_reading_the_disk))
    report = gpu_check.main(["--device", "cpu", "--tiny", "--threads", "1", "--steps", "1",
                             "--models", "gpt2", "--stages", "sft,discriminator,reward,ppo",
                             "--no-agreement", "--out", str(out)])
    rows = {r["stage"]: r for r in report["rows"]}
    assert [r["stage"] for r in report["rows"]] == ["sft", "discriminator", "reward", "ppo"]
    assert [r["status"] for r in report["rows"]] == ["ok", "error", "oom", "ok"]
    assert rows["discriminator"]["error"] == "RuntimeError: planted failure"
    assert "out of memory" in rows["reward"]["error"]
    assert rows["sft"]["tokens_per_s"] > 0 and rows["ppo"]["kl0_max"] == 0.0
    assert [r["status"] for r in seen_on_disk["json"]] == ["ok", "error", "oom"]
    assert "| gpt2 | reward | oom |" in seen_on_disk["table"]
    assert "planted failure" in seen_on_disk["table"]
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(report["rows"]))


def test_a_failed_process_and_fsdp_under_torchrun_exit_0_with_the_other_rows(tmp_path):
    """The script as a command: a 60-token prompt overflows the tiny GPT-2's 64 positions (its SFT
    and its FSDP stage under torchrun fail), the tiny Llama (RoPE) runs both; exit status 0, all
    four rows on disk."""
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--tiny",
         "--threads", "1", "--steps", "1", "--stages", "sft,sft_fsdp", "--no-agreement",
         "--prompt-len", "60", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env={"PATH": "/usr/bin:/bin",
                                                          "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["stage"], r["status"]) for r in rows] == [
        ("gpt2", "sft", "error"), ("gpt2", "sft_fsdp", "error"),
        ("llama", "sft", "ok"), ("llama", "sft_fsdp", "ok"),
    ]
    assert rows[0]["error"] == "IndexError: index out of range in self"
    # the torchrun process's failure: its exit status and the stage's own exception first
    assert rows[1]["error"].startswith("RuntimeError: exit status 1: IndexError: index out of")
    assert rows[3]["tokens_per_s"] > 0


def test_deadline_and_free_memory_skip_a_stage_and_say_why(tmp_path, monkeypatch, one_thread):
    # the estimate: the same stage of the last model that ran it, scaled by parameters
    done = [dict(stage="sft", status="ok", seconds=10.0, n_params=100),
            dict(stage="ppo", status="error", seconds=1.0, n_params=100)]
    assert gpu_check.stage_estimate(done, "sft", 1000) == 100.0
    assert gpu_check.stage_estimate(done, "ppo", 1000) is None  # only finished runs count
    # no time left: every stage skipped, the rows on disk
    out = tmp_path / "check.json"
    report = gpu_check.main(["--device", "cpu", "--tiny", "--models", "gpt2", "--stages",
                             "sft,ppo", "--deadline", "1e-6", "--out", str(out)])
    assert [(r["stage"], r["status"]) for r in report["rows"]] == [
        ("sft", "skipped"), ("ppo", "skipped")]
    assert all(r["reason"].startswith("deadline") for r in report["rows"])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(report["rows"]))
    # the planner's figure above the free memory: skipped with both figures; no plan: runs
    monkeypatch.setattr(gpu_check, "free_memory", lambda device: 1000)
    report = gpu_check.main(["--device", "cpu", "--tiny", "--threads", "1", "--models", "gpt2",
                             "--stages", "agreement,sft", "--out", str(out)])
    agreement, sft = report["rows"]
    assert agreement["status"] == "ok" and sft["status"] == "skipped"
    assert sft["reason"].startswith("cannot fit: planner") and "GiB free" in sft["reason"]


def test_peak_lookup_and_mfu_flops_hand_count_for_gpt2_124m():
    args = gpu_check.parse_args(["--peak-tflops", "100"])
    assert gpu_check.peak_tflops(args, torch.device("cpu")) == (100, "--peak-tflops")
    config = gpu_check.model_configs(tiny=False)["gpt2"]
    with torch.device("meta"):
        gpt2 = AutoModelForCausalLM.from_config(config)
    # GPT-2 124M by hand (H = 768, 12 layers, V = 50257, 1024 positions):
    #   one block: ln_1, ln_2          2 · 2·768                    =     3,072
    #              attn c_attn         768·2304 + 2304              = 1,771,776
    #              attn c_proj         768·768 + 768                =   590,592
    #              mlp c_fc            768·3072 + 3072              = 2,362,368
    #              mlp c_proj          3072·768 + 768               = 2,360,064
    #                                                                 7,087,872
    #   12 blocks                                                    85,054,464
    #   ln_f                           2·768                        =     1,536
    #   LM head = wte (tied), a 768 × 50257 matmul, counted once     38,597,376
    #   wpe (1024 × 768 = 786,432): a look-up, not counted
    #   N = 85,054,464 + 1,536 + 38,597,376                        = 123,653,376
    # (nanoGPT prints "number of parameters: 123.65M" for gpt2, the same N)
    assert sum(p.numel() for p in gpt2.parameters()) == 124_439_808
    n = gpu_check.flop_parameters(gpt2)
    assert n == 123_653_376
    # 6·N = 741,920,256; attention 12·L·H·T at T = 1024: 12·12·768·1024 = 113,246,208
    assert gpu_check.training_flops_per_token(config, n, 1024) == 855_166_464
    # untied (Llama 2 style): the input embedding is a look-up, the LM head a matmul; tied: once
    for tied in (False, True):
        llama = AutoModelForCausalLM.from_config(LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=96, tie_word_embeddings=tied))
        total = sum(p.numel() for p in llama.parameters())
        assert gpu_check.flop_parameters(llama) == total - (0 if tied else 96 * 32)
