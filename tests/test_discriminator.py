"""discriminator.py: the eq. 6 loss, the eq. 7 rewards and their positions, data checks, training
that learns, resume, save/load, and the end-to-end path from label.py's labels."""
import json
import math
import random
from pathlib import Path

import pytest
import torch

import common
import discriminator as D
import label
from conftest import assert_train_step_equals_one_pass, run_torchrun
from plumbing import checkpoint, hf_models

REPO = Path(__file__).resolve().parents[1]
POS_ID, NEG_ID = 500, 501  # the synthetic "always positive" and "always negative" token ids


# ----------------------------------------------------------------------------------------------
# fixtures: a very small GPT-2 on the tiny tokenizer, synthetic labels
# ----------------------------------------------------------------------------------------------
def build_small(out_dir, tokenizer, dropout=0.1, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_head=2, n_embd=32, n_positions=256,
                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                     bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory, tiny_tokenizer):
    return build_small(tmp_path_factory.mktemp("small"), tiny_tokenizer)


@pytest.fixture(scope="module")
def small_nodrop_dir(tmp_path_factory, tiny_tokenizer):
    return build_small(tmp_path_factory.mktemp("small_nodrop"), tiny_tokenizer, dropout=0.0)


@pytest.fixture
def scorer(small_dir):
    torch.manual_seed(1)
    # a fresh random head
    return common.disable_dropout(hf_models.new_score_model(small_dir, bias=True)).eval()


def synthetic_records(n, seed=0):
    """POS_ID is always labelled +1 and NEG_ID always −1, at random places among random neutral
    tokens."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        record = {
            "id": f"pair{i}",
            "prompt": f"\n\nHuman: question number {i} {rng.randint(0, 999)}\n\nAssistant:",
        }
        for side in ("rejected", "revised"):
            ids = [rng.randrange(600, 1500) for _ in range(rng.randint(4, 10))]
            labels = [0] * len(ids)
            special = NEG_ID if side == "rejected" else POS_ID
            for _ in range(rng.randint(1, 3)):
                k = rng.randrange(len(ids) + 1)
                # mostly, not only
                token = special if rng.random() < 0.8 else (POS_ID + NEG_ID - special)
                ids.insert(k, token)
                labels.insert(k, 1 if token == POS_ID else -1)
            record[f"{side}_ids"], record[f"{side}_labels"] = ids, labels
        records.append(record)
    return records


def write_jsonl(path, records, tokenizer=None):
    """label.py's file: every record names the tokenizer that made its ids."""
    fingerprint = hf_models.tokenizer_fingerprint(tokenizer) if tokenizer is not None else None
    path.write_text("".join(json.dumps({**r, "tokenizer": fingerprint}) + "\n" for r in records))
    return path


# ----------------------------------------------------------------------------------------------
# the loss, eq. 6
# ----------------------------------------------------------------------------------------------
def test_neutral_token_at_half_gives_zero_gradient():
    logits = torch.zeros(1, 3, requires_grad=True)  # D = 0.5 everywhere
    D.discriminator_loss(logits, torch.tensor([[0, 0, 0]]), torch.ones(1, 3))[0].backward()
    assert torch.equal(logits.grad, torch.zeros(1, 3))


def test_targets_push_the_logit_the_right_way():
    logits = torch.tensor([[0.0, 0.0, 1.5, -1.5, 4.0, -4.0]], requires_grad=True)
    labels = torch.tensor([[1, -1, 0, 0, 1, -1]])
    D.discriminator_loss(logits, labels, torch.ones(1, 6))[0].backward()
    grad = logits.grad[0]
    # positive: descent raises the logit (D → 1), even when already high
    assert grad[0] < 0 and grad[4] < 0
    assert grad[1] > 0 and grad[5] > 0  # negative: descent lowers it (D → 0)
    assert grad[2] > 0 and grad[3] < 0  # neutral: pulled back towards D = 0.5
    # dL/dz_t = (σ(z_t) − y_t) / N
    expected = (torch.sigmoid(logits.detach()) - D.soft_targets(labels)) / 6
    torch.testing.assert_close(logits.grad, expected)


def test_loss_value_and_masked_positions():
    logits = torch.tensor([[0.0, 2.0, -3.0, 5.0], [1.0, -1.0, 7.0, 9.0]], requires_grad=True)
    labels = torch.tensor([[1, -1, 0, 1], [0, 1, -1, -1]])
    # [prompt, response..] / [response.., padding]
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    loss, bce_sum = D.discriminator_loss(logits, labels, mask)
    loss.backward()

    def bce(z, y):
        s = 1 / (1 + math.exp(-z))
        return -(y * math.log(s) + (1 - y) * math.log(1 - s))

    expected = (bce(2.0, 0.0) + bce(-3.0, 0.5) + bce(5.0, 1.0) + bce(1.0, 0.5) + bce(-1.0, 1.0)) / 5
    assert loss.item() == pytest.approx(expected, rel=1e-6) and bce_sum.item() == pytest.approx(
        5 * expected, rel=1e-6
    )
    # a normaliser divides the summed loss instead of the token count (gradient accumulation)
    assert D.discriminator_loss(logits, labels, mask, normaliser=10)[0].item() == pytest.approx(
        expected / 2, rel=1e-6
    )
    assert logits.grad[0, 0] == 0 and logits.grad[1, 2] == 0 and logits.grad[1, 3] == 0
    assert (logits.grad[mask.bool()] != 0).all()
    # whatever sits at masked positions changes nothing
    other, _ = D.discriminator_loss(logits.detach() + 50 * (1 - mask),
                                    -labels * (1 - mask) + labels * mask, mask)
    assert other.item() == pytest.approx(loss.item(), rel=1e-6)
    # large logits stay finite (log-sigmoid, not log of a rounded sigmoid)
    assert torch.isfinite(
        D.discriminator_loss(
            torch.tensor([[200.0, -200.0]]), torch.tensor([[-1, 1]]), torch.ones(1, 2)
        )[0]
    )


# ----------------------------------------------------------------------------------------------
# rewards, eq. 7 and ablations
# ----------------------------------------------------------------------------------------------
def test_reward_modes_on_hand_made_probabilities():
    probs = torch.tensor(
        [[0.05, 0.39, 0.4, 0.5, 0.6, 0.61, 0.95], [0.9, 0.1, 0.7, 0.0, 0.0, 0.0, 0.0]])
    valid = torch.tensor([[1] * 7, [1, 1, 0, 0, 0, 0, 0]])
    r = 2 * probs - 1
    cont = D.rewards_from_probs(probs, valid, "continuous")
    torch.testing.assert_close(cont[0], r[0])
    torch.testing.assert_close(cont[1], torch.tensor([0.8, -0.8, 0, 0, 0, 0, 0]))
    assert D.rewards_from_probs(probs, valid, "fixed").tolist() == [
        [-1, -1, 0, 0, 0, 1, 1],
        [1, -1, 0, 0, 0, 0, 0],
    ]
    torch.testing.assert_close(D.rewards_from_probs(probs, valid, "no_negative")[0],
                               r[0].clamp(min=0))
    torch.testing.assert_close(D.rewards_from_probs(probs, valid, "no_positive")[0],
                               r[0].clamp(max=0))
    for mode in D.REWARD_MODES:  # nothing past a row's response
        assert (D.rewards_from_probs(probs, valid, mode)[1, 2:] == 0).all()
    with pytest.raises(ValueError, match="unknown reward mode"):
        D.rewards_from_probs(probs, valid, "softmax_twice")


def two_layouts(prompts, responses, pad_id):
    """The same rows right-padded (training batches) and with left-padded prompts (PPO rollouts)."""
    right = D.collate([(p, r, [0] * len(r)) for p, r in zip(prompts, responses)], pad_id)[:3]
    P, R = max(map(len, prompts)), max(map(len, responses))
    qr = torch.full((len(prompts), P + R), pad_id)
    am, rm = torch.zeros_like(qr), torch.zeros_like(qr)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        qr[i, P - len(p): P + len(r)] = torch.tensor(p + r)
        am[i, P - len(p): P + len(r)] = 1
        rm[i, P: P + len(r)] = 1
    return right, (qr, am, rm)


def test_reward_is_read_at_the_tokens_own_position(scorer):
    prompt, response = [11, 12, 13, 14], [40, 41, 42, 43, 44]
    (qr, am, rm), _ = two_layouts([prompt], [response], 0)
    rewards = D.token_rewards(scorer, qr, am, rm)  # [1, 5]
    with torch.no_grad():
        scores = scorer(qr, am)[0]  # [T]
    # positions of a_0..a_4
    torch.testing.assert_close(rewards[0], 2 * torch.sigmoid(scores[4:9]) - 1)
    # changing a_2 changes its own reward (no shift), leaves earlier ones alone (causal)
    qr2 = qr.clone()
    qr2[0, 6] = 99
    rewards2 = D.token_rewards(scorer, qr2, am, rm)
    torch.testing.assert_close(rewards2[0, :2], rewards[0, :2])
    assert (rewards2[0, 2] - rewards[0, 2]).abs() > 1e-4


def test_left_and_right_padding_give_the_same_rewards(scorer):
    prompts = [[11, 12, 13, 14, 15, 16], [21, 22], [31, 32, 33]]
    responses = [[40, 41], [50, 51, 52, 53, 54, 55], [60, 61, 62, 63]]
    (rq, ra, rr), (lq, la, lr) = two_layouts(prompts, responses, pad_id=0)
    for mode in D.REWARD_MODES:
        right = D.token_rewards(scorer, rq, ra, rr, mode)
        left = D.token_rewards(scorer, lq, la, lr, mode)
        assert right.shape == (3, 6)
        torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-5)
    # alone in a batch of one, each row gets the same rewards too
    for i in range(3):
        (q1, a1, r1), _ = two_layouts([prompts[i]], [responses[i]], 0)
        alone = D.token_rewards(scorer, q1, a1, r1)
        batched = D.token_rewards(scorer, rq, ra, rr)
        torch.testing.assert_close(alone[0], batched[i, : len(responses[i])], atol=1e-5, rtol=1e-5)


def test_prompt_and_padding_get_no_reward(scorer):
    prompts, responses = [[11, 12, 13, 14, 15, 16], [21, 22]], [[40, 41], [50, 51, 52, 53]]
    _, (qr, am, rm) = two_layouts(prompts, responses, pad_id=0)
    rewards = D.token_rewards(scorer, qr, am, rm)
    assert rewards.shape == (2, 4)  # one column per response token, none for the prompt
    assert (rewards[0, 2:] == 0).all() and (rewards[1] != 0).all()
    assert (D.token_probs(scorer, qr, am, rm)[0, 2:] == 0).all()
    # what the padding holds does not matter (pad == eos must not leak into the rewards)
    qr_other = torch.where(am.bool(), qr, torch.full_like(qr, 777))
    torch.testing.assert_close(D.token_rewards(scorer, qr_other, am, rm), rewards)


def test_save_load_same_rewards(small_dir, tiny_tokenizer, tmp_path):
    torch.manual_seed(3)
    model = hf_models.new_score_model(small_dir, bias=True)
    torch.nn.init.normal_(model.head.weight, std=1.0)
    out = tmp_path / "disc"
    out.mkdir()
    (out / "log.jsonl").write_text("{}\n")
    hf_models.save_score_model(model, tiny_tokenizer, out, kind="token",
                               extra={"role": "tlcr_discriminator"})
    assert (out / "log.jsonl").exists()  # other files in the run folder survive the save
    assert (
        (out / "model.safetensors").exists()
        and not list(out.glob("*.bin"))
        and not list(out.glob("*.pt"))
    )
    assert json.loads((out / "config.json").read_text())["architectures"] == [
        "GPT2ForTokenClassification"
    ]
    loaded = D.load_discriminator(out)
    (qr, am, rm), _ = two_layouts([[11, 12, 13], [21]], [[40, 41, 42], [50, 51]], 0)
    model.eval()
    for mode in D.REWARD_MODES:
        assert torch.equal(
            D.token_rewards(model, qr, am, rm, mode), D.token_rewards(loaded, qr, am, rm, mode)
        )
    assert (
        hf_models.load_tokenizer(out)("Hello there")["input_ids"]
        == tiny_tokenizer("Hello there")["input_ids"]
    )


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, message", [
    ("{not json", "line 2: malformed JSON"),
    (json.dumps({"id": "x", "prompt": "p", "rejected_ids": [1, 2], "rejected_labels": [0],
                 "revised_ids": [], "revised_labels": []}),
     "line 2: rejected_ids has 2 tokens but rejected_labels has 1"),
    (json.dumps({"id": "x", "prompt": "p", "rejected_ids": [1], "rejected_labels": [2],
                 "revised_ids": [], "revised_labels": []}), "line 2: field 'rejected_labels'"),
    (json.dumps({"id": "x", "rejected_ids": [1], "rejected_labels": [0],
                 "revised_ids": [], "revised_labels": []}), "line 2: field 'prompt' missing"),
    (json.dumps({"id": "x", "prompt": "p", "rejected_ids": [1], "rejected_labels": [0]}),
     "line 2: field 'revised_ids' missing"),
])
def test_bad_label_records_name_file_and_line(tmp_path, bad, message):
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps(synthetic_records(1)[0]) + "\n" + bad + "\n")
    with pytest.raises(common.DataError, match=message) as err:
        D.load_labels(path)
    assert str(path) in str(err.value)


def test_labels_made_with_another_tokenizer_are_refused(tmp_path, tiny_tokenizer, llama_tokenizer):
    path = write_jsonl(tmp_path / "labels.jsonl", synthetic_records(2), llama_tokenizer)
    with pytest.raises(common.DataError, match="line 1: labelled with another tokenizer"):
        D.load_labels(path, tiny_tokenizer)
    path = write_jsonl(tmp_path / "old.jsonl", synthetic_records(2))  # a file that does not say
    with pytest.raises(common.DataError, match="line 1: the record does not say which tokenizer"):
        D.load_labels(path, tiny_tokenizer)
    assert (
        len(
            D.load_labels(
                write_jsonl(tmp_path / "ok.jsonl", synthetic_records(2), tiny_tokenizer),
                tiny_tokenizer,
            )
        )
        == 2
    )
    record = synthetic_records(1)[0]
    record["revised_ids"][0] = len(tiny_tokenizer) + 5
    records = D.load_labels(write_jsonl(tmp_path / "labels.jsonl", [record]))
    with pytest.raises(common.DataError, match="line 1: token id .* outside the tokenizer"):
        D.encode_records(records, tiny_tokenizer)


def test_sequences_mask_the_prompt_and_carry_the_labels(tiny_tokenizer):
    records = synthetic_records(2)
    for r in records:
        r["_where"] = "x"
    examples = D.encode_records(records, tiny_tokenizer, max_prompt_len=5, max_response_len=4)
    assert len(examples) == 4
    qr, am, rm, labels = D.collate(examples, tiny_tokenizer.pad_token_id)
    for i, (prompt_ids, response_ids, token_labels) in enumerate(examples):
        # left-truncated prompt, cut response
        assert len(prompt_ids) == 5 and len(response_ids) == 4
        side = ("rejected", "revised")[i % 2]
        assert response_ids == records[i // 2][f"{side}_ids"][:4]  # no EOS appended
        assert rm[i].tolist() == [0] * 5 + [1] * 4 and am[i].tolist() == [1] * 9
        assert labels[i, 5:].tolist() == records[i // 2][f"{side}_labels"][:4]


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def train_args(sft, labels, out, *extra):
    return [
        "train",
        "--sft",
        str(sft),
        "--labels",
        str(labels),
        "--out",
        str(out),
        "--max-prompt-len",
        "16",
        "--max-response-len",
        "32",
        "--seed",
        "0",
        *map(str, extra),
    ]


def test_learns_synthetic_token_labels(small_dir, tmp_path, capsys):
    labels = write_jsonl(tmp_path / "labels.jsonl", synthetic_records(100),
                         hf_models.load_tokenizer(small_dir))
    metrics = D.main(
        train_args(
            small_dir,
            labels,
            tmp_path / "disc",
            "--epochs",
            3,
            "--lr",
            5e-3,
            "--batch-size",
            16,
            "--micro-batch-size",
            16,
            "--eval-fraction",
            0.2,
        )
    )
    saved = json.loads((tmp_path / "disc" / "accuracy.json").read_text())
    assert saved == pytest.approx(metrics)
    assert saved["accuracy"] > 0.95, saved
    assert saved["positive_accuracy"] > 0.9 and saved["negative_accuracy"] > 0.9
    assert saved["n_positive"] > 20 and saved["n_negative"] > 20 and saved["n_pairs"] == 20
    assert 0.3 < saved["mean_d_neutral"] < 0.7  # neutral targets are 0.5
    assert "token accuracy" in capsys.readouterr().out
    log = [json.loads(line) for line in (tmp_path / "disc" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["eval_accuracy"] == pytest.approx(saved["accuracy"])
    assert log[0]["loss"] > log[-2]["loss"]
    # the trained discriminator gives the positive token a positive reward and the negative one a
    # negative reward
    disc = D.load_discriminator(tmp_path / "disc")
    prompt = common.encode_prompt(hf_models.load_tokenizer(tmp_path / "disc"),
                                  "\n\nHuman: hi\n\nAssistant:")
    _, (qr, am, rm) = two_layouts([prompt], [[700, POS_ID, 800, NEG_ID, 900]], 0)
    rewards = D.token_rewards(disc, qr, am, rm, "fixed")[0]
    assert rewards[1] == 1 and rewards[3] == -1


def test_resume_reproduces_an_uninterrupted_run(small_dir, tmp_path):
    labels = write_jsonl(tmp_path / "labels.jsonl", synthetic_records(24),
                         hf_models.load_tokenizer(small_dir))
    # dropout on
    common_args = ("--epochs", 1, "--lr", 1e-3, "--batch-size", 8, "--micro-batch-size", 4)
    D.main(train_args(small_dir, labels, tmp_path / "full", *common_args))
    assert (
        D.main(train_args(small_dir, labels, tmp_path / "cut", *common_args, "--stop-after", 2))
        is None
    )
    assert checkpoint.latest_checkpoint(tmp_path / "cut").name == "step-000000002"
    assert not (tmp_path / "cut" / "accuracy.json").exists()
    D.main(train_args(small_dir, labels, tmp_path / "cut", *common_args))
    full, cut = D.load_discriminator(tmp_path / "full"), D.load_discriminator(tmp_path / "cut")
    for (name, a), (_, b) in zip(full.state_dict().items(), cut.state_dict().items()):
        assert torch.equal(a, b), name
    assert json.loads((tmp_path / "full" / "accuracy.json").read_text()) == \
        json.loads((tmp_path / "cut" / "accuracy.json").read_text())


def test_torchrun_two_processes_match_one(small_nodrop_dir, tmp_path):
    labels = write_jsonl(tmp_path / "labels.jsonl", synthetic_records(24),
                         hf_models.load_tokenizer(small_nodrop_dir))
    args = train_args(small_nodrop_dir, labels, tmp_path / "ddp", "--epochs", 1, "--lr", 1e-3,
                      "--batch-size", 8, "--micro-batch-size", 2)
    returncode, output = run_torchrun([REPO / "discriminator.py", *args], cwd=REPO)
    assert returncode == 0, output[-3000:]
    D.main(train_args(small_nodrop_dir, labels, tmp_path / "one", "--epochs", 1, "--lr", 1e-3,
                      "--batch-size", 8, "--micro-batch-size", 8))
    ddp, one = D.load_discriminator(tmp_path / "ddp"), D.load_discriminator(tmp_path / "one")
    for (name, a), (_, b) in zip(ddp.state_dict().items(), one.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    acc_ddp = json.loads((tmp_path / "ddp" / "accuracy.json").read_text())
    acc_one = json.loads((tmp_path / "one" / "accuracy.json").read_text())
    assert (
        acc_ddp["n_positive"] == acc_one["n_positive"]
        and acc_ddp["n_neutral"] == acc_one["n_neutral"]
    )


# ----------------------------------------------------------------------------------------------
# end to end on the bundled data
# ----------------------------------------------------------------------------------------------
def test_train_step_gradient_is_the_global_batch_mean_loss(small_nodrop_dir, tiny_tokenizer):
    """train_step divides each micro-batch by the labelled tokens of the whole batch: the gradient
    it accumulates over micro-batches of 5 equals that of discriminator_loss over the 12 sequences
    in one pass (a wrong normaliser would scale or skew it)."""
    records = synthetic_records(6)
    for r in records:
        r["_where"] = "x"
    examples = D.encode_records(records, tiny_tokenizer)
    args = D.parse_args(
        train_args(small_nodrop_dir, "x", "x", "--micro-batch-size", 5, "--max-grad-norm", 0))
    torch.manual_seed(0)
    model = hf_models.new_score_model(small_nodrop_dir, bias=True)
    qr, am, rm, labels = D.collate(examples, tiny_tokenizer.pad_token_id)
    assert_train_step_equals_one_pass(model, D.train_step, examples, args,
                                      tiny_tokenizer.pad_token_id,
                                      lambda: D.discriminator_loss(model(qr, am), labels, rm)[0])


def test_end_to_end_on_bundled_data(tiny_dir, tmp_path, capsys):
    labels = tmp_path / "labels.jsonl"
    summary = label.main(
        ["--reviser", "chosen", "--tokenizer", str(tiny_dir), "--limit", "24", "--out", str(labels)]
    )
    assert summary["done"] == 24
    out = tmp_path / "disc"
    metrics = D.main(
        train_args(
            tiny_dir,
            labels,
            out,
            "--epochs",
            1,
            "--lr",
            1e-3,
            "--batch-size",
            8,
            "--micro-batch-size",
            8,
            "--eval-fraction",
            0.25,
        )
    )
    accuracy = json.loads((out / "accuracy.json").read_text())
    # 25% of 24 pairs held out
    assert accuracy == pytest.approx(metrics) and accuracy["n_pairs"] == 6
    # the held-out pairs are those common.heldout_split picks, and their tokens (the first 32) are
    # all counted
    records = D.load_labels(labels)
    heldout = common.heldout_split(records, 0.25, 0, key=lambda r: r["id"])[1]
    for sign, key in ((1, "n_positive"), (-1, "n_negative"), (0, "n_neutral")):
        assert accuracy[key] == sum(
            r[f"{s}_labels"][:32].count(sign) for r in heldout for s in ("rejected", "revised")
        )
    capsys.readouterr()
    # `evaluate` measures the same held-out pairs again
    again = D.main(
        [
            "evaluate", "--discriminator", str(out), "--labels", str(labels),
            "--out", str(tmp_path / "again.json"),
        ]
    )
    assert again["accuracy"] == pytest.approx(accuracy["accuracy"], abs=1e-6)
    assert again["n_positive"] == accuracy["n_positive"]
    # `show` prints every token of both sequences with D and a reward 2·D − 1
    capsys.readouterr()
    D.main(["show", "--discriminator", str(out), "--labels", str(labels), "--index", "0"])
    shown = capsys.readouterr().out
    record = D.load_labels(labels)[0]
    rows = [line.split() for line in shown.splitlines() if line[:4].strip().isdigit()]
    assert len(rows) == len(record["rejected_ids"]) + len(record["revised_ids"])
    for row in rows:
        assert float(row[-1]) == pytest.approx(2 * float(row[-2]) - 1, abs=2e-3)
    D.main(
        [
            "show", "--discriminator", str(out), "--prompt", "\n\nHuman: Hi\n\nAssistant:",
            "--response", " Hello there", "--mode", "fixed",
        ]
    )
    assert "reward mode fixed" in capsys.readouterr().out
