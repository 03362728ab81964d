"""The lab's on-policy data (gold_samples.py) and the reward model's prefix pairs (redistribute.py
--prefix-pairs): pairs ranked by gold with ties dropped, minimal revisions of sampled replies, no
test prompt ever trained on, grouped held-out parts, both flags end to end on GPT-2 and Llama."""

import json

import pytest
import torch

import common
import gold
import gold_samples
import label
import redistribute as red
from conftest import assert_train_step_equals_one_pass
from test_gold import check_minimal

PROMPT = "\n\nHuman: hi\n\nAssistant:"


# ----------------------------------------------------------------------------------------------
# ranking samples: every two with different gold scores, the higher chosen, ties dropped
# ----------------------------------------------------------------------------------------------
def test_rank_samples_ranks_every_two_and_drops_ties():
    source = common.Pair(PROMPT, " a", " b")
    samples = [
        " I will kill him.",
        " I can help.",
        " Hello.",
        " Good day.",
        " help a friend, ask",
    ]  # -1 +1 0 0 +3
    pairs, ties = gold.rank_samples(source, samples)
    assert ties == 1  # " Hello." vs " Good day.": 0 = 0
    assert len(pairs) == 10 - 1
    assert all(gold.gold_score(p.chosen) > gold.gold_score(p.rejected) for p in pairs)
    by_id = {p.id: p for p in pairs}
    assert (by_id[f"{source.id}/0-1"].chosen, by_id[f"{source.id}/0-1"].rejected) == (
        samples[1],
        samples[0],
    )
    assert (by_id[f"{source.id}/1-4"].chosen, by_id[f"{source.id}/1-4"].rejected) == (
        samples[4],
        samples[1],
    )
    assert f"{source.id}/2-3" not in by_id
    assert {common.pair_group(p.id) for p in pairs} == {source.id}
    assert gold.rank_samples(source, [" same", " same"]) == ([], 1)


def test_pair_rows_read_back_as_the_same_pairs(tmp_path):
    transcript = common.Pair(PROMPT, " help", " kill", id="abc/0-1")
    chat = common.Pair(common.transcript([{"role": "user", "content": "hi"}]), " help", " kill",
                       [{"role": "user", "content": "hi"}], id="abc/1-2")
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(gold_samples.pair_row(p)) + "\n"
                            for p in (transcript, chat)))
    assert common.load_pairs(path) == [transcript, chat]
    path.write_text(json.dumps({**gold_samples.pair_row(transcript), "id": 7}) + "\n")
    with pytest.raises(common.DataError, match="line 1.*'id'"):
        common.load_pairs(path)


# ----------------------------------------------------------------------------------------------
# no test prompt is trained on; a prompt's pairs stay on one side of a held-out part
# ----------------------------------------------------------------------------------------------
def test_sample_prompts_never_include_a_test_prompt(bundled_pairs, splits):
    test_prompts = {p.prompt for p in splits["test"]}
    pairs, dropped = gold_samples.sample_prompts(bundled_pairs, "reward", 0)
    assert [p.id for p in pairs] == [p.id for p in splits["reward"]] and dropped == 0
    # a reward-split pair that repeats a test prompt (other replies) is dropped, by prompt text
    test_pair = splits["test"][0]
    twin = common.Pair(test_pair.prompt, " other reply", " another reply")
    data = bundled_pairs + [twin]
    for split in ("sft", "reward", "rl"):
        pairs, dropped = gold_samples.sample_prompts(data, split, 0)
        assert pairs and not {p.prompt for p in pairs} & test_prompts
        twin_in_split = twin.id in {p.id for p in common.split_pairs(data, 0)[split]}
        assert dropped == int(twin_in_split)
    for split in ("test", "all"):
        with pytest.raises(common.InputError, match="never for the test prompts"):
            gold_samples.sample_prompts(bundled_pairs, split, 0)


def test_heldout_split_keeps_a_prompts_pairs_together():
    items = [
        common.Pair(PROMPT, " a", " b", id=f"p{k}/{i}-{j}")
        for k in range(30)
        for i, j in ((0, 1), (0, 2))
    ]
    items += [common.Pair(PROMPT, " a", " b", id=f"p{k}") for k in range(30)]
    train, heldout = common.heldout_split(items, 0.1, seed=0)
    held_groups = {common.pair_group(p.id) for p in heldout}
    assert len(held_groups) == 3 and len(heldout) == 9  # 10% of 30 prompts, each with its 3 pairs
    assert not held_groups & {common.pair_group(p.id) for p in train}
    assert sorted(p.id for p in train + heldout) == sorted(p.id for p in items)
    # a grouped file is one split's already: re-splitting it would scatter a prompt's pairs
    with pytest.raises(common.DataError, match="--split all"):
        common.select_split(items, "reward", 0)
    assert common.select_split(items, "all", 0) == items


def test_revision_pairs_leave_out_held_out_groups(tmp_path):
    rows = [
        {"id": i, "prompt": PROMPT, "rejected": f" kill {i}", "revised": f" help {i}"}
        for i in ("a", "a/0-1", "b/0-1", "c")
    ]
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [p.rejected for p in red.revision_pairs(path, {"a"})] == [" kill b/0-1", " kill c"]


# ----------------------------------------------------------------------------------------------
# gold_samples.py end to end: a real policy (GPT-2, Llama), resumed from its cache
# ----------------------------------------------------------------------------------------------
def sample_argv(policy, out, *extra):
    return [
        "--policy", str(policy), "--out", str(out), "--limit", "12",
        "--samples-per-prompt", "3", "--max-prompt-len", "48", "--max-new-tokens", "8",
        "--batch-size", "5", "--device", "cpu", *extra,
    ]


@pytest.mark.parametrize("fixture", ["tiny_dir", "llama_dir"])
def test_gold_sample_end_to_end_and_resumed(fixture, request, tmp_path, splits, monkeypatch):
    torch.set_num_threads(1)
    policy = request.getfixturevalue(fixture)
    out = tmp_path / "samples.jsonl"
    summary = gold_samples.main(sample_argv(policy, out))
    assert (
        summary["prompts"] == 12
        and summary["samples"] == 36
        and summary["test_prompts_dropped"] == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == summary["rows"] == summary["data_pairs"] + summary["sampled_pairs"]
    pairs = common.load_pairs(out)
    assert [p.id for p in pairs] == [r["id"] for r in rows]
    assert all(gold.gold_score(p.chosen) > gold.gold_score(p.rejected) for p in pairs)
    reward_ids = {p.id for p in splits["reward"][:12]}
    assert {common.pair_group(p.id) for p in pairs} <= reward_ids
    assert not {p.prompt for p in pairs} & {p.prompt for p in splits["test"]}
    cache = [
        json.loads(line)
        for line in (tmp_path / "samples.jsonl.cache.jsonl").read_text().splitlines()
    ]
    assert sorted(r["id"] for r in cache) == sorted(reward_ids) and all(
        len(r["samples"]) == 3 for r in cache
    )
    # a second run reuses every sample: the policy is not even loaded, and the file is the same
    first = out.read_text()
    out.unlink()
    monkeypatch.setattr(gold_samples.hf_models, "load_policy",
                        lambda *a, **k: pytest.fail("sampled again"))
    assert gold_samples.main(sample_argv(policy, out))["samples"] == 36 and out.read_text() == first
    # another lexicon ranks the same cached samples (none drawn again) and is named in the summary
    sentiment = gold.load_lexicon(gold.DEFAULT_LEXICON.parent / "lexicon-sentiment.json")
    assert summary["lexicon"] == gold.default_lexicon().id
    ranked = gold_samples.main(sample_argv(policy, out, "--lexicon", sentiment.path))
    assert ranked["lexicon"] == sentiment.id and ranked["samples"] == 36
    assert all(gold.gold_score(p.chosen, lexicon=sentiment) > gold.gold_score(p.rejected,
               lexicon=sentiment) for p in common.load_pairs(out))
    # a cut cache (a killed run) samples the missing batch again, with the same draws
    monkeypatch.undo()
    lines = (tmp_path / "samples.jsonl.cache.jsonl").read_text().splitlines()
    (tmp_path / "samples.jsonl.cache.jsonl").write_text("\n".join(lines[:5]) + "\n")
    gold_samples.main(sample_argv(policy, out))
    assert out.read_text() == first


def test_sampled_pairs_through_label_and_reward_model(tiny_dir, tmp_path, monkeypatch):
    """Sampled replies with harm words (the sampler replaced by fixed replies): label.py revises the
    gold-rejected sample minimally, and redistribute.py trains on the file (with --prefix-pairs)."""
    torch.set_num_threads(1)
    replies = [
        " I will kill him with a gun.", " I can help, friend.", " Maybe.",
        " You stupid idiot, steal it.",
    ]
    monkeypatch.setattr(gold_samples, "sample_replies",
                        lambda policy, tok, pairs, k, args: [replies[:k] for _ in pairs])
    out = tmp_path / "samples.jsonl"
    summary = gold_samples.main(sample_argv(tiny_dir, out, "--samples-per-prompt", "4",
                                            "--no-data-pairs"))
    assert (
        summary["sampled_pairs"] == 12 * 6
        and summary["sampled_ties_dropped"] == 0
        and summary["data_pairs"] == 0
    )
    labels = tmp_path / "labels.jsonl"
    done = label.main(
        [
            "--data", str(out), "--split", "all", "--reviser", "gold", "--preference", "gold",
            "--tokenizer", str(tiny_dir), "--out", str(labels), "--max-response-len", "32",
        ]
    )
    assert (
        done["skipped"]["gold tie"] == 0 and done["done"] == 12 * 5
    )  # every pair but (help ≻ Maybe)
    records = [json.loads(line) for line in labels.read_text().splitlines()]
    assert all(r["revised"] == gold.gold_revise(r["rejected"]) for r in records)
    assert sum(check_minimal(r["rejected"]) for r in records) > 0
    with pytest.raises(common.DataError, match="--split all"):
        label.main(
            [
                "--data", str(out), "--reviser", "gold", "--tokenizer", str(tiny_dir),
                "--out", str(labels),
            ]
        )
    model_dir = tmp_path / "rm"
    result = red.main(
        [
            "train", "--sft", str(tiny_dir), "--data", str(out), "--split", "all",
            "--preference", "gold", "--revision-pairs", str(labels), "--prefix-pairs",
            "--out", str(model_dir), "--max-steps", "2", "--batch-size", "8",
            "--micro-batch-size", "4", "--max-prompt-len", "32", "--max-response-len", "16",
            "--lr", "1e-3", "--device", "cpu",
        ]
    )
    assert result["pairs"] == 6  # one prompt of the twelve held out, with its six pairs
    info = json.loads((model_dir / "token_rlhf.json").read_text())
    assert info["prefix_pairs"] is True


# ----------------------------------------------------------------------------------------------
# prefix pairs: the gold of every prefix, the loss, its gradient, and what it teaches
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["tiny_tokenizer", "llama_tokenizer"])
def test_prefix_gold_scores_are_the_gold_of_each_prefix(fixture, request):
    tokenizer = request.getfixturevalue(fixture)
    text = " I will kill him, then help my friend."
    ids = common.encode_response(tokenizer, text, 64)  # text tokens, then EOS
    scores = red.prefix_gold_scores(tokenizer, text, len(ids))
    decoded = [
        gold.gold_score(tokenizer.decode(ids[: t + 1], skip_special_tokens=True))
        for t in range(len(ids))
    ]
    assert scores == decoded and scores[-1] == gold.gold_score(text) == 1
    assert min(scores) == -1 and scores[0] == 0
    cut = common.encode_response(tokenizer, text, 4)  # 3 text tokens, then EOS
    assert red.prefix_gold_scores(tokenizer, text, len(cut)) == scores[:3] + scores[2:3]


def test_prefix_pair_loss_against_a_loop():
    torch.manual_seed(0)
    scores = torch.randn(3, 9)
    index = torch.tensor([[2, 3, 4, 5, 6, 0], [1, 2, 3, 4, 0, 0], [0, 1, 2, 3, 4, 5]])
    gold_ = torch.tensor([[0, 0, -1, -1, 1, 0], [0, 0, 0, 0, 0, 0], [0, 1, 1, 2, 1, 0]]).float()
    valid = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    got = red.prefix_pair_loss(scores, index, gold_, valid)
    for row in range(3):
        terms = [
            -torch.nn.functional.logsigmoid(scores[row, index[row, t]] - scores[row, index[row, s]])
            for s in range(6)
            for t in range(6)
            if valid[row, s] and valid[row, t] and gold_[row, t] > gold_[row, s]
        ]
        want = torch.stack(terms).mean() if terms else torch.tensor(0.0)
        torch.testing.assert_close(got[row], want)
    assert got[1] == 0  # every prefix scores the same: no pair


def test_prefix_pairs_train_step_gradient_is_the_global_batch_loss(
        tiny_dir, tiny_tokenizer, splits):
    """With prefix pairs the accumulated gradient is still that of the whole batch's loss in one
    pass: mean over pairs of BT + ½ (L_pre(y_c) + L_pre(y_r))."""
    model = red.common.disable_dropout(red.hf_models.new_score_model(tiny_dir, bias=False))
    pairs, _ = gold.rank_pairs(splits["reward"][:40])
    examples = red.encode_pairs(pairs[:8], tiny_tokenizer, 32, 24, prefix_gold=True)
    batch = red.collate_pairs(examples, tiny_tokenizer.pad_token_id)
    assert batch["prefix_gold"].abs().sum() > 0

    def one_pass():
        chosen, rejected, scores = red.pair_rewards(model, batch, return_scores=True)
        prefix = red.prefix_pair_loss(scores, batch["prefix_index"], batch["prefix_gold"],
                                      batch["prefix_valid"])
        return red.bradley_terry_loss(chosen, rejected)[0] + 0.5 * prefix.sum() / len(examples)

    args = red.parse_args(
        [
            "train", "--sft", str(tiny_dir), "--out", "x", "--preference", "gold", "--prefix-pairs",
            "--micro-batch-size", "3", "--max-grad-norm", "0",
        ]
    )
    assert_train_step_equals_one_pass(model, red.train_step, examples, args,
                                      tiny_tokenizer.pad_token_id, one_pass)


def prefix_tracking(model_dir, tokenizer, pairs):
    """Mean over replies of the correlation between R(x, y≤t) and gold(y≤t) along the reply."""
    model = red.load_reward_model(model_dir)
    examples = red.encode_pairs(pairs, tokenizer, 32, 24, prefix_gold=True)
    batch = red.collate_pairs(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        scores = red.score_positions(model, batch["query_response"], batch["attention_mask"])
    prefix_scores = scores.gather(1, batch["prefix_index"])
    rs = []
    for s, g, v in zip(prefix_scores, batch["prefix_gold"], batch["prefix_valid"].bool()):
        if g[v].std() > 0:
            rs.append(torch.corrcoef(torch.stack([s[v], g[v]]))[0, 1])
    return torch.stack(rs).mean().item()


def test_prefix_pairs_teach_the_prefix_scores_red_reads(tiny_dir, tiny_tokenizer, splits, tmp_path):
    """Trained the same number of steps, the model with prefix pairs tracks gold(y≤t) along its
    training replies much more closely than the one trained on whole replies only. (70 steps: at 60
    one machine gave prefix 0.496; measured there at 40/50/60/70 steps, whole 0.10/0.26/0.21/0.21
    and prefix 0.51/0.53/0.50/0.53.)"""
    torch.set_num_threads(1)
    pairs, _ = gold.rank_pairs(splits["reward"])
    argv = [
        "train", "--sft", str(tiny_dir), "--preference", "gold", "--max-prompt-len", "32",
        "--max-response-len", "24", "--max-steps", "70", "--batch-size", "16",
        "--micro-batch-size", "16", "--lr", "3e-3", "--device", "cpu",
    ]
    red.main(argv + ["--out", str(tmp_path / "whole")])
    red.main(argv + ["--out", str(tmp_path / "prefix"), "--prefix-pairs"])
    whole = prefix_tracking(tmp_path / "whole", tiny_tokenizer, pairs[:64])
    prefix = prefix_tracking(tmp_path / "prefix", tiny_tokenizer, pairs[:64])
    assert prefix > 0.5 and prefix > whole + 0.2, (whole, prefix)


def test_prefix_pairs_need_gold_preferences(capsys):
    with pytest.raises(SystemExit):
        red.parse_args(["train", "--sft", "x", "--out", "y", "--prefix-pairs"])
    assert "--prefix-pairs needs --preference gold" in capsys.readouterr().err


def test_gold_sample_compile_draws_the_same_replies(tiny_dir, tmp_path, capsys):
    """--compile changes how the decode step runs, not what it computes: the same seed gives the
    same replies, and the compilation is reported once, apart."""
    torch.set_num_threads(1)
    plain, compiled = tmp_path / "plain.jsonl", tmp_path / "compiled.jsonl"
    gold_samples.main(sample_argv(tiny_dir, plain, "--limit", "5"))
    gold_samples.main(sample_argv(tiny_dir, compiled, "--limit", "5", "--compile"))
    assert compiled.read_text() == plain.read_text()
    reports = [line for line in capsys.readouterr().out.splitlines() if "--compile" in line]
    assert len(reports) == 1 and "decode step compiled for GPT2LMHeadModel, batch 15" in reports[0]
