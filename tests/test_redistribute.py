"""redistribute.py: RED eq. 6/7 from one pass, the Bradley–Terry reward model, save/load, CLI."""
import json
import random
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2Model

import common
import plumbing
import redistribute as red
from conftest import assert_train_step_equals_one_pass, run_torchrun
from plumbing import checkpoint, hf_models

ROOT = Path(__file__).resolve().parents[1]
PAD = 0


def tiny_score_model(vocab=48, n_layer=2, n_embd=32, seed=0):
    """A ScoreModel on a GPT-2 built straight from a config (no tokenizer needed)."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_layer=n_layer, n_head=2, n_embd=n_embd, n_positions=128,
                     bos_token_id=PAD, eos_token_id=PAD, pad_token_id=PAD)
    return common.disable_dropout(common.ScoreModel(GPT2Model(cfg))).eval()


def random_rows(n=4, vocab=48, seed=0):
    """(prompt ids, response ids) of varying lengths; ids avoid PAD so padding is visible."""
    rng = random.Random(seed)
    return [([rng.randrange(1, vocab) for _ in range(rng.randint(1, 7))],
             [rng.randrange(1, vocab) for _ in range(rng.randint(1, 9))]) for _ in range(n)]


def batch_right(rows):
    """Training layout: prompt + response, the whole row right-padded."""
    ids, mask = common.pad_right([p + r for p, r in rows], PAD)
    response_mask = torch.zeros_like(mask)
    for i, (p, r) in enumerate(rows):
        response_mask[i, len(p): len(p) + len(r)] = 1
    return ids, mask, response_mask


def batch_left(rows):
    """PPO layout: left-padded prompts, then right-padded responses."""
    prompt_ids, prompt_mask = common.pad_left([p for p, _ in rows], PAD)
    response_ids, response_mask = common.pad_right([r for _, r in rows], PAD)
    ids = torch.cat([prompt_ids, response_ids], 1)
    mask = torch.cat([prompt_mask, response_mask], 1)
    return ids, mask, torch.cat([torch.zeros_like(prompt_mask), response_mask], 1)


def score_alone(model, ids):
    """R of an unpadded sequence, read at its last token: its own forward pass."""
    ids = torch.tensor([ids])
    with torch.no_grad():
        return model(ids, torch.ones_like(ids))[0, -1].item()


def naive_redistribute(model, rows, zero_first=False):
    """The T-pass reference: re-score every prefix x + y≤t separately and take differences."""
    out = torch.zeros(len(rows), max(len(r) for _, r in rows))
    for b, (prompt, response) in enumerate(rows):
        previous = 0.0 if zero_first else score_alone(model, prompt)
        for t in range(len(response)):
            current = score_alone(model, prompt + response[: t + 1])
            out[b, t] = current - previous
            previous = current
    return out


@pytest.mark.parametrize("layout", [batch_left, batch_right], ids=["left_padded", "right_padded"])
@pytest.mark.parametrize("zero_first", [False, True])
def test_single_pass_equals_naive_prefix_loop(layout, zero_first):
    model, rows = tiny_score_model(), random_rows(5)
    got = red.redistribute(model, *layout(rows), zero_first=zero_first)
    want = naive_redistribute(model, rows, zero_first)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert want.abs().max() > 1e-2  # the rewards are not trivially zero


@pytest.mark.parametrize("layout", [batch_left, batch_right], ids=["left_padded", "right_padded"])
def test_telescoping(layout):
    model, rows = tiny_score_model(seed=1), random_rows(6, seed=1)
    batch = layout(rows)
    full = torch.tensor([score_alone(model, p + r) for p, r in rows])  # R(x, y)
    empty = torch.tensor([score_alone(model, p) for p, _ in rows])  # R(x, ∅)
    torch.testing.assert_close(red.sequence_reward(model, *batch), full, atol=2e-5, rtol=0)
    torch.testing.assert_close(red.redistribute(model, *batch).sum(-1), full - empty, atol=2e-5,
                               rtol=0)
    torch.testing.assert_close(red.redistribute(model, *batch, zero_first=True).sum(-1), full,
                               atol=2e-5, rtol=0)


def test_hand_made_scores_pin_positions():
    """Which position gives which reward, on made-up scores; NaN at padding must not leak."""
    nan = float("nan")
    scores = torch.tensor([[1.0, 2.0, 4.0, 7.0, 11.0, nan],   # right-padded: prompt 2, response 3
                           [nan, 5.0, 3.0, 2.0, 6.0, nan]])  # left-padded prompt 2, response 2, pad
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 0]])
    response_mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0]])
    f = red.redistribute_scores
    assert f(scores, attention_mask, response_mask).tolist() == [[2, 3, 4], [-1, 4, 0]]
    assert f(scores, attention_mask, response_mask, zero_first=True).tolist() == [
        [4, 3, 4],
        [2, 4, 0],
    ]
    # eq. 7: β_c·r̃_t + (1 − β_c)·R(x, y)·[t = T]
    assert f(scores, attention_mask, response_mask, beta_c=0.5).tolist() == [
        [1, 1.5, 7.5],
        [-0.5, 5, 0],
    ]
    assert f(scores, attention_mask, response_mask, beta_c=0.0).tolist() == [[0, 0, 11], [0, 6, 0]]


def test_beta_zero_is_exactly_sparse_and_padding_is_zero():
    model, rows = tiny_score_model(seed=2), random_rows(5, seed=2)
    batch = batch_left(rows)
    sparse = red.sparse_token_rewards(model, *batch)
    assert torch.equal(red.redistribute(model, *batch, beta_c=0.0), sparse)
    seq = red.sequence_reward(model, *batch)
    for b, (_, response) in enumerate(rows):
        expected = torch.zeros(sparse.shape[1])
        expected[len(response) - 1] = seq[b]
        assert torch.equal(sparse[b], expected)  # R(x, y) on the last token, exact zeros elsewhere
    for beta_c in (1.0, 0.3):
        token_rewards = red.redistribute(model, *batch, beta_c=beta_c)
        for b, (_, response) in enumerate(rows):
            assert torch.all(token_rewards[b, len(response):] == 0)
            assert torch.all(token_rewards[b, : len(response)] != 0)
    mixed = red.redistribute(model, *batch, beta_c=0.3)
    torch.testing.assert_close(mixed, 0.3 * red.redistribute(model, *batch) + 0.7 * sparse)


def test_reward_read_at_last_real_token_any_padding():
    model, rows = tiny_score_model(seed=3), random_rows(4, seed=3)
    examples = [{"prompt": p, "chosen": r, "rejected": r[::-1] + [7]} for p, r in rows]
    batch = red.collate_pairs(examples, PAD)  # right-padded, chosen rows then rejected rows
    with torch.no_grad():
        chosen, rejected = red.pair_rewards(model, batch)
        want_c = torch.tensor([score_alone(model, e["prompt"] + e["chosen"]) for e in examples])
        want_r = torch.tensor([score_alone(model, e["prompt"] + e["rejected"]) for e in examples])
        torch.testing.assert_close(chosen, want_c, atol=2e-5, rtol=0)
        torch.testing.assert_close(rejected, want_r, atol=2e-5, rtol=0)
        # the same rows left-padded: same rewards, and the same as sequence_reward
        rows2 = [(e["prompt"], e["chosen"]) for e in examples] + [
            (e["prompt"], e["rejected"]) for e in examples
        ]
        left = batch_left(rows2)
        left_batch = {"query_response": left[0], "attention_mask": left[1]}
        torch.testing.assert_close(torch.cat(red.pair_rewards(model, left_batch)),
                                   torch.cat([want_c, want_r]), atol=2e-5, rtol=0)
        torch.testing.assert_close(
            red.sequence_reward(
                model, batch["query_response"], batch["attention_mask"], batch["response_mask"]
            ),
            torch.cat([want_c, want_r]),
            atol=2e-5,
            rtol=0,
        )


def synthetic_pairs(n, vocab, marker, rng):
    """Chosen responses contain the marker token somewhere; rejected ones never do."""
    def response():
        return [rng.randrange(marker + 1, vocab) for _ in range(rng.randint(3, 9))]
    examples = []
    for _ in range(n):
        chosen = response()
        chosen.insert(rng.randrange(len(chosen) + 1), marker)
        examples.append({"prompt": [rng.randrange(1, vocab) for _ in range(rng.randint(1, 5))],
                         "chosen": chosen + [PAD], "rejected": response() + [PAD]})  # PAD = EOS
    return examples


def test_bradley_terry_learns_a_marker_preference():
    rng, vocab, marker = random.Random(0), 40, 5
    train_examples = synthetic_pairs(512, vocab, marker, rng)
    eval_examples = synthetic_pairs(200, vocab, marker, rng)
    model = tiny_score_model(vocab=vocab, n_layer=1, n_embd=32, seed=0)
    device = torch.device("cpu")
    before = red.evaluate(model, eval_examples, PAD, 64, device)
    model.train()
    optimizer = plumbing.adamw(model, lr=3e-3)
    for step in range(2 * len(train_examples) // 32):  # 2 epochs of 32 pairs per step
        batch = red.collate_pairs(common.global_batch(train_examples, step, 32, seed=0), PAD)
        loss, _ = red.bradley_terry_loss(*red.pair_rewards(model, batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = red.evaluate(model, eval_examples, PAD, 64, device)
    assert before["accuracy"] < 0.75
    assert after["accuracy"] > 0.9, after
    assert after["mean_margin"] > 1.0


def test_bradley_terry_loss_values():
    chosen = torch.tensor([0.0, 2.0, -1.0], requires_grad=True)
    rejected = torch.tensor([0.0, 0.0, 1.0])
    loss, loss_sum = red.bradley_terry_loss(chosen, rejected)
    want = -torch.log(torch.sigmoid(torch.tensor([0.0, 2.0, -2.0]))).mean()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(loss_sum, 3 * want)
    torch.testing.assert_close(red.bradley_terry_loss(chosen, rejected, normaliser=6)[0], want / 2)
    loss.backward()
    assert torch.all(chosen.grad < 0)  # descent raises the chosen reward
    big, _ = red.bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([200.0]))
    assert torch.isfinite(big) and abs(big.item() - 400.0) < 1e-3


def test_save_load_gives_same_scores(tiny_dir, tiny_tokenizer, tmp_path):
    model = hf_models.new_score_model(tiny_dir, bias=False).eval()  # a fresh random head
    hf_models.save_score_model(model, tiny_tokenizer, tmp_path / "rm", kind="sequence")
    loaded = red.load_reward_model(tmp_path / "rm")
    rows = random_rows(4, vocab=len(tiny_tokenizer), seed=4)
    batch = batch_left(rows)
    assert torch.equal(red.redistribute(model, *batch), red.redistribute(loaded, *batch))
    assert red.redistribute(model, *batch).abs().sum() > 0


def train_argv(tiny_dir, out, *extra):
    return [
        "train", "--sft", str(tiny_dir), "--out", str(out), "--limit", "24",
        "--max-prompt-len", "32", "--max-response-len", "16", "--batch-size", "4",
        "--micro-batch-size", "2", "--lr", "5e-4", "--log-every", "2", *extra,
    ]


def test_train_step_gradient_is_the_global_batch_mean_loss(tiny_dir, tiny_tokenizer, splits):
    """train_step divides each micro-batch by the pairs of the whole batch: the gradient it
    accumulates over micro-batches of 3 pairs equals that of bradley_terry_loss over the 8 pairs in
    one pass."""
    args = red.parse_args(
        train_argv(tiny_dir, "x", "--micro-batch-size", "3", "--max-grad-norm", "0"))
    examples = red.encode_pairs(splits["reward"][:8], tiny_tokenizer, 32, 16)
    model = common.disable_dropout(hf_models.new_score_model(tiny_dir, bias=False))
    batch = red.collate_pairs(examples, tiny_tokenizer.pad_token_id)
    assert_train_step_equals_one_pass(
        model, red.train_step, examples, args, tiny_tokenizer.pad_token_id,
        lambda: red.bradley_terry_loss(*red.pair_rewards(model, batch))[0])


def test_train_cli_end_to_end_and_resume(tiny_dir, tiny_tokenizer, tmp_path, capsys):
    # one uninterrupted run on the bundled data: 24 pairs, 2 held out by hashing, 22 // 4 = 5 steps
    # of 4 pairs (2 accumulated micro-batches of 2 pairs)
    result = red.main(train_argv(tiny_dir, tmp_path / "a"))
    acc = json.loads((tmp_path / "a" / "accuracy.json").read_text())
    assert acc["pairs"] == 2 and acc["step"] == 5 and acc["accuracy"] == result["accuracy"]
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [2, 4, 5]
    assert "held-out pair accuracy" in capsys.readouterr().out
    assert checkpoint.latest_checkpoint(tmp_path / "a").name == "step-000000005"
    # the held-out pairs are the reward split's hashed tenth, the ones the discriminator holds out
    # too
    _, eval_pairs = red.select_pairs(red.parse_args(train_argv(tiny_dir, "x")), quiet=True)
    split = plumbing.load_data("bundled", "reward", 0, 24, quiet=True)
    assert [p.id for p in eval_pairs] == [p.id for p in common.heldout_split(split, 0.1, 0)[1]]
    # the same run stopped after 3 steps, then resumed: the same final reward model
    assert (
        red.main(train_argv(tiny_dir, tmp_path / "b", "--stop-after", "3", "--save-every", "100"))
        is None
    )
    assert not (tmp_path / "b" / "config.json").exists()  # no final model yet
    red.main(train_argv(tiny_dir, tmp_path / "b"))
    assert "resuming at step 3" in capsys.readouterr().out
    a, b = red.load_reward_model(tmp_path / "a"), red.load_reward_model(tmp_path / "b")
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5, msg=name)
    sft = hf_models.new_score_model(tiny_dir, bias=False)
    # it did train
    assert not torch.equal(a.backbone.wte.weight[:len(tiny_tokenizer)], sft.backbone.wte.weight)
    # a resume with other settings is refused instead of continuing another schedule
    with pytest.raises(common.InputError, match="--lr was 0.0005, now 0.001"):
        red.main(train_argv(tiny_dir, tmp_path / "b", "--lr", "1e-3"))
    # show: one line per response token (EOS included) and the telescoped sum
    token_rewards = red.main(["show", "--reward-model", str(tmp_path / "a"), "--prompt",
                              "\n\nHuman: Hi\n\nAssistant:", "--response", " Hello there"])
    out = capsys.readouterr().out.splitlines()
    n_tokens = len(common.encode_response(hf_models.load_tokenizer(tmp_path / "a"), " Hello there"))
    assert len(token_rewards) == n_tokens and len(out) == n_tokens + 2
    assert out[-1].startswith(f"sum of token rewards {token_rewards.sum().item():+.4f}")


def test_bad_arguments_are_named(capsys):
    with pytest.raises(SystemExit):
        red.parse_args(["train", "--sft", "x", "--out", "y", "--eval-fraction", "1.5"])
    assert "--eval-fraction must be in (0, 1), got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        red.parse_args(
            ["show", "--reward-model", "x", "--prompt", "p", "--response", "r", "--beta-c", "2"])
    assert "--beta-c must be in [0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        red.parse_args(["train", "--sft", "x", "--out", "y", "--micro-batch-size", "0"])
    assert "--micro-batch-size must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        red.main(["train", "--help"])
    assert exit_info.value.code == 0 and "--gradient-checkpointing" in capsys.readouterr().out


def test_torchrun_two_ranks_match_one_process(tiny_dir, tmp_path):
    """The same global batch of 4 pairs per step, as 2 ranks × 1 micro-batch of 2 pairs or as
    1 process × 2 accumulated micro-batches of 2 pairs, must train alike: the loss is normalised by
    the global batch's pairs (× world_size, since DDP averages the ranks' gradients). The single
    process also recomputes activations (gradient checkpointing), which must not change the
    numbers."""
    argv = train_argv(tiny_dir, tmp_path / "ddp", "--batch-size", "4", "--micro-batch-size", "2")
    returncode, output = run_torchrun([ROOT / "redistribute.py", *argv], cwd=ROOT)
    assert returncode == 0, output[-3000:]
    assert output.count("held-out pair accuracy") == 1  # rank 0 alone prints and saves
    red.main(train_argv(tiny_dir, tmp_path / "one", "--batch-size", "4", "--micro-batch-size", "2",
                        "--gradient-checkpointing"))
    logs = [[json.loads(line) for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
            for d in ("ddp", "one")]
    assert len(logs[0]) == len(logs[1])  # no duplicate lines from rank 1
    for x, y in zip(*logs):
        if "loss" in x:
            assert abs(x["loss"] - y["loss"]) < 1e-4, (x, y)
    acc = [json.loads((tmp_path / d / "accuracy.json").read_text()) for d in ("ddp", "one")]
    assert abs(acc[0]["mean_margin"] - acc[1]["mean_margin"]) < 1e-4
