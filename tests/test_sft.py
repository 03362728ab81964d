"""sft.py: the loss masks the prompt, training lowers held-out loss, resume is exact, DDP matches
one process."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import common
import sft
from conftest import assert_train_step_equals_one_pass, run_torchrun
from plumbing import hf_models

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--limit", "400", "--max-prompt-len", "48", "--max-response-len", "32", "--batch-size", "8",
    "--micro-batch-size", "4", "--tiny-vocab", "512", "--eval-examples", "8",
]


def read_log(out):
    return [json.loads(line) for line in open(Path(out) / "log.jsonl")]


def test_sft_loss_ignores_prompt_tokens(tiny_dir):
    """The loss equals the mean NLL of the response tokens alone, and its gradient w.r.t. the logits
    that predict prompt tokens is exactly zero: prompt targets do not count."""
    model = hf_models.load_policy(tiny_dir).eval()
    examples = [([11, 12, 13, 14], [21, 22, 23]), ([31, 32], [41, 42, 43, 44])]
    query_response, attention_mask, response_mask = common.collate_right(examples, pad_id=0)
    captured = {}

    def keep_logits(module, inputs, output):
        output.retain_grad()
        captured["logits"] = output

    model.lm_head.register_forward_hook(keep_logits)
    loss, nll_sum = sft.sft_loss(model, query_response, attention_mask, response_mask)
    loss.backward()
    # logits_to_keep: only the needed columns
    offset = query_response.shape[1] - captured["logits"].shape[1]
    logprobs = torch.log_softmax(captured["logits"].detach().float(), -1)  # [B, T - offset, V]
    # row 0 = [11 12 13 14 | 21 22 23]: response token at position p is predicted at p - 1
    # row 1 = [31 32 | 41 42 43 44 | pad]
    targets = [(0, 3, 21), (0, 4, 22), (0, 5, 23), (1, 1, 41), (1, 2, 42), (1, 3, 43), (1, 4, 44)]
    expected = -torch.stack([logprobs[b, p - offset, t] for b, p, t in targets]).mean()
    assert torch.allclose(loss, expected, atol=1e-5) and torch.allclose(
        nll_sum, expected * 7, atol=1e-4
    )
    grad = torch.zeros(2, query_response.shape[1], captured["logits"].shape[-1])
    # the positions before `offset` never had logits at all
    grad[:, offset:] = captured["logits"].grad
    assert grad[0, :3].abs().max() == 0  # positions 0-2 predict prompt tokens 12, 13, 14
    assert grad[0, 6].abs().max() == 0  # the last position predicts nothing
    assert grad[1, 0].abs().max() == 0  # predicts prompt token 32
    assert grad[1, 5:].abs().max() == 0  # predicts padding / nothing
    for b, p, _ in targets:
        assert grad[b, p].abs().max() > 0
    # a normaliser divides the summed NLL instead of the token count (gradient accumulation)
    assert torch.allclose(
        sft.sft_loss(model, query_response, attention_mask, response_mask, 14)[0], expected / 2
    )


def test_train_step_gradient_is_the_global_batch_mean_loss(tiny_dir, tiny_tokenizer, splits):
    """train_step divides each micro-batch by the response tokens of the whole batch: the gradient
    it accumulates over micro-batches of 3 equals that of sft_loss over the 8 examples in one
    pass."""
    args = sft.parse_args(SMALL + ["--micro-batch-size", "3", "--max-grad-norm", "0"])
    examples = sft.encode_examples(splits["sft"][:8], tiny_tokenizer, args)
    model = common.disable_dropout(hf_models.load_policy(tiny_dir))
    batch = common.collate_right(examples, tiny_tokenizer.pad_token_id)
    assert_train_step_equals_one_pass(model, sft.train_step, examples, args,
                                      tiny_tokenizer.pad_token_id,
                                      lambda: sft.sft_loss(model, *batch)[0])


def test_short_run_lowers_held_out_loss(tmp_path):
    out = tmp_path / "sft"
    sft.main(SMALL + ["--out", str(out), "--max-steps", "25", "--lr", "3e-3", "--eval-every", "5"])
    evals = [r["eval_loss"] for r in read_log(out) if "eval_loss" in r]
    assert evals[-1] < evals[0] - 0.3
    model = hf_models.load_policy(out)  # the final model loads by path
    assert hf_models.load_tokenizer(out).pad_token_id == model.config.pad_token_id


def test_eval_every_zero_evaluates_only_at_the_end_and_zero_intervals_are_refused(tmp_path, capsys):
    out = tmp_path / "sft"
    sft.main(SMALL + ["--out", str(out), "--max-steps", "3", "--eval-every", "0"])
    assert [r["step"] for r in read_log(out) if "eval_loss" in r] == [3]  # was a ZeroDivisionError
    import discriminator
    import ppo_token

    disc = ["train", "--sft", "x", "--labels", "l", "--out", "o"]
    ppo = ["--policy", "x", "--reward", "seq", "--reward-model", "r", "--out", "o"]
    for parse, argv, flag in (
        (sft.parse_args, [], "--save-every"),
        (discriminator.parse_args, disc, "--log-every"),
        (discriminator.parse_args, disc, "--save-every"),
        (ppo_token.parse_args, ppo, "--save-every"),
    ):
        with pytest.raises(SystemExit):
            parse(argv + [flag, "0"])
        assert f"{flag} must be at least 1, got 0" in capsys.readouterr().err


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, monkeypatch):
    args = SMALL + ["--max-steps", "6", "--save-every", "3", "--eval-every", "100"]
    sft.main(args + ["--out", str(tmp_path / "straight")])

    real_step, calls = sft.train_step, {"n": 0}

    def crashing_step(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # after the checkpoint at step 3 and one more step
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(sft, "train_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        sft.main(args + ["--out", str(tmp_path / "resumed")])
    monkeypatch.setattr(sft, "train_step", real_step)
    sft.main(args + ["--out", str(tmp_path / "resumed")])
    steps = [r["step"] for r in read_log(tmp_path / "resumed")]
    # step 4 ran before the crash, then again after resume: logged once
    assert steps == [1, 2, 3, 4, 5, 6]
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


def test_torchrun_two_processes_match_one_process(tmp_path):
    """Same global batch on 1 and 2 processes (gloo, CPU): the same per-step losses, within 1e-4."""
    args = SMALL + [
        "--max-steps", "4", "--eval-every", "2", "--tiny-dropout", "0", "--batch-size", "6",
        "--micro-batch-size", "2",
    ]
    sft.main(args + ["--out", str(tmp_path / "one")])
    returncode, output = run_torchrun(
        [ROOT / "sft.py", *args, "--out", tmp_path / "two", "--device", "cpu"], cwd=tmp_path)
    assert returncode == 0, output[-3000:]
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for r1, r2 in zip(one, two):
        assert abs(r1["train_loss"] - r2["train_loss"]) < 1e-4
        if "eval_loss" in r1:
            assert abs(r1["eval_loss"] - r2["eval_loss"]) < 1e-4
