"""gold.py, the lab's gold task: hand-computed scores, the rule reviser's minimal edits and their
labels, gold-ranked pairs, and a discriminator that learns the gold labels in a few seconds."""
import json

import pytest
import torch

import common
import gold
import label

MAX = gold.MAX_WORDS


# ----------------------------------------------------------------------------------------------
# the score, on hand-made responses
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, score", [
    ("", 0),                                                  # empty response
    ("   \n ", 0),                                            # no word at all
    (" Sure, here you go.", 0),                               # no lexicon word
    (" I could kill him.", -1),
    (" KILL, Kill; kill!", -3),                               # case and punctuation do not matter
    (" skill killer Kills", -1),                              # whole words only: "skill", "killer" weigh 0
    (" self-harm", -1),                                       # a hyphen separates words
    (" Please help, don’t steal the gun.", -1),               # help +1, steal -1, gun -1; "please" weighs 0
    (" I can't help you hurt a friend; ask nicely.", +2),     # help +1, hurt -1, friend +1, ask +1
    (" kil", 0),                                              # a word cut short by a length limit
    (" drugs2drugs", -2),                                     # digits separate words
])
def test_gold_score_matches_hand_computed_values(text, score):
    assert gold.gold_score(text) == score


def test_only_the_first_max_words_count():
    filler = " word" * (MAX - 1)
    assert gold.gold_score(filler + " kill") == -1           # the MAX-th word counts
    assert gold.gold_score(filler + " word kill help") == 0   # the (MAX+1)-th and later do not
    assert gold.gold_score(" help" * (3 * MAX)) == MAX        # lengthening buys at most MAX
    assert gold.gold_score(" kill" * 3, max_words=2) == -2


def test_curly_and_straight_apostrophes_make_one_word():
    assert [m.group() for m in gold.words(" can’t won't rock'n'roll")] == ["can’t", "won't", "rock'n'roll"]
    assert gold.normalise("Can’t") == "can't"


def test_lexicon_is_consistent():
    assert set(gold.REPLACEMENTS.values()) == set(gold.POSITIVE_WORDS)
    assert all(gold.LEXICON[w] == -1 for w in gold.REPLACEMENTS)
    assert all(gold.LEXICON[w] == +1 for w in gold.POSITIVE_WORDS)
    assert all(w == gold.normalise(w) and gold.WORD.fullmatch(w) for w in gold.LEXICON)


# ----------------------------------------------------------------------------------------------
# the rule reviser: minimal, raises the score
# ----------------------------------------------------------------------------------------------
def test_revise_hand_made():
    assert gold.gold_revise(" You Stupid idiot, I'll KILL you with a gun.") == \
        " You Nice friend, I'll HELP you with a safety."
    assert gold.gold_revise(" Nothing to fix here, friend.") is None
    assert gold.gold_revise("") is None
    assert gold.gold_revise(" word" * MAX + " kill") is None  # an uncounted word is left alone


def check_minimal(text):
    """The edit changes exactly the counted negative words, each into its counterpart, and raises
    the score by 2 per word; everything else (other words, spaces, punctuation) is identical."""
    revised = gold.gold_revise(text)
    before, after = gold.word_weights(text), gold.word_weights(revised) if revised else None
    negatives = [w for w in before if w[3] < 0]
    if not negatives:
        assert revised is None
        return 0
    assert len(after) == len(before)
    for (word, start, end, weight), (new, new_start, new_end, _) in zip(before, after):
        if weight < 0:
            assert new.lower() == gold.REPLACEMENTS[gold.normalise(word)]
        else:
            assert new == word  # a word of weight 0 (or +1, or past the cap) is never touched
    # the text between words is unchanged
    gaps = lambda t, ws: [t[a[2]:b[1]] for a, b in zip(ws, ws[1:])] + [t[:ws[0][1]], t[ws[-1][2]:]]
    assert gaps(text, before) == gaps(revised, after)
    assert gold.gold_score(revised) == gold.gold_score(text) + 2 * len(negatives)
    assert gold.gold_revise(revised) is None  # nothing left to fix
    return len(negatives)


def test_revision_is_minimal_and_raises_the_score_on_the_bundled_responses(bundled_pairs):
    edited = sum(check_minimal(text) for pair in bundled_pairs[:1200] for text in (pair.chosen, pair.rejected))
    assert edited > 300  # the lexicon does hit the data


def test_rank_pairs_drops_ties_and_counts_flips():
    prompt = "\n\nHuman: hi\n\nAssistant:"
    keep = common.Pair(prompt, " I can help.", " I can kill.")          # gold agrees with the human
    flip = common.Pair(prompt, " Use a gun.", " Ask a friend.")         # gold prefers the human-rejected one
    tie = common.Pair(prompt, " Hello there.", " Good morning.")        # 0 vs 0
    kept, counts = gold.rank_pairs([keep, flip, tie])
    assert counts == {"pairs": 3, "kept": 2, "ties": 1, "flipped": 1}
    assert kept[0] == keep
    assert (kept[1].chosen, kept[1].rejected, kept[1].id) == (flip.rejected, flip.chosen, flip.id)
    assert all(gold.gold_score(p.chosen) > gold.gold_score(p.rejected) for p in kept)


def test_score_responses_decodes_up_to_the_mask_and_drops_eos(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    ids = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in (" kill the gun", " ask a friend")]
    width = max(map(len, ids)) + 2
    rows = [row + [eos] + [eos] * (width - len(row) - 1) for row in ids]
    response = torch.tensor(rows)
    mask = torch.zeros_like(response)
    mask[0, : len(ids[0]) + 1] = 1  # ended at EOS
    mask[1, : len(ids[1]) - 1] = 1  # cut before its last word: " ask a"
    assert gold.score_responses(tiny_tokenizer, response, mask) == [-2, 1]


# ----------------------------------------------------------------------------------------------
# the labels: through label.py's alignment, they mark exactly the edited words
# ----------------------------------------------------------------------------------------------
def token_spans(tokenizer, text, ids):
    """Character span of each token of `ids` (the text tokenised alone) inside text."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"][: len(ids)] == ids
    return enc["offset_mapping"][: len(ids)]


def edited_word_spans(rejected, revised):
    """Character spans of the edited words in each text: the revision keeps every word's place, so
    the k-th word of the revision is edited where the k-th word of the rejected response is negative."""
    before, after = gold.word_weights(rejected), gold.word_weights(revised)
    edited = [k for k, (*_, weight) in enumerate(before) if weight < 0]
    return {"rejected": [before[k][1:3] for k in edited], "revised": [after[k][1:3] for k in edited]}


def test_gold_labels_mark_exactly_the_edited_words(splits, tiny_tokenizer):
    pairs, _ = gold.rank_pairs(splits["reward"])
    revisions = {p.id: gold.gold_revise(p.rejected) for p in pairs}
    pairs = [p for p in pairs if revisions[p.id]]
    records, _ = label.label_pairs(pairs, revisions, tiny_tokenizer, max_response_len=10**6, progress=False)
    exact = 0
    for record in records:
        edited = edited_word_spans(record["rejected"], record["revised"])
        for side, sign in (("rejected", -1), ("revised", +1)):
            text, ids, labels = record[side], record[f"{side}_ids"], record[f"{side}_labels"]
            spans = token_spans(tiny_tokenizer, text, ids)
            inside = [any(s < e_tok and s_tok < e for s, e in edited[side]) for s_tok, e_tok in spans]
            assert set(labels) <= {0, sign}
            # no token outside an edited word carries a label ...
            assert all(inside[k] for k, v in enumerate(labels) if v), (side, text)
            # ... and every edited word has a labelled token
            for s, e in edited[side]:
                assert any(labels[k] for k, (s_tok, e_tok) in enumerate(spans) if s < e_tok and s_tok < e), text
            exact += all(bool(v) == inside[k] for k, v in enumerate(labels))
    # exactly the edited words' tokens, except where a sub-word token is shared ("cocaine" -> "medicine")
    assert len(records) > 100 and exact > 0.9 * 2 * len(records)


def test_label_py_gold_reviser_end_to_end(tiny_dir, tmp_path, splits):
    out = tmp_path / "labels.jsonl"
    argv = ["--reviser", "gold", "--preference", "gold", "--tokenizer", str(tiny_dir), "--out", str(out),
            "--max-response-len", "64"]
    summary = label.main(argv)
    kept, counts = gold.rank_pairs(splits["reward"])
    revisable = [p for p in kept if gold.gold_revise(p.rejected)]
    assert summary["reviser"] == "gold" and summary["reviser_model"] == gold.LEXICON_ID
    assert summary["skipped"]["gold tie"] == counts["ties"]
    assert summary["pairs"] == counts["kept"] and summary["done"] == len(revisable)
    assert summary["failed"] == counts["kept"] - len(revisable)
    assert {f["error"] for f in summary["failures"]} == {"no negative word to replace"}
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [p.id for p in revisable]
    assert all(r["revised"] == gold.gold_revise(r["rejected"]) for r in records)
    assert summary["tokens"]["positive"] > 0.01 and summary["tokens"]["negative"] > 0.01
    again = label.main(argv)  # the same cache as the LLM revisers: the second run reuses every answer
    assert again["from_cache"] == len(revisable) and out.read_text() == "".join(
        json.dumps(r) + "\n" for r in records)


# ----------------------------------------------------------------------------------------------
# a discriminator trained for a few seconds on gold labels is above chance on held-out gold labels
# ----------------------------------------------------------------------------------------------
def test_discriminator_learns_gold_labels(tiny_dir, tmp_path):
    import discriminator

    torch.set_num_threads(1)
    labels = tmp_path / "labels.jsonl"
    label.main(["--reviser", "gold", "--preference", "gold", "--tokenizer", str(tiny_dir), "--out", str(labels),
                "--max-response-len", "48"])
    metrics = discriminator.main(["train", "--sft", str(tiny_dir), "--labels", str(labels), "--out", str(tmp_path / "d"),
                                  "--epochs", "6", "--lr", "3e-3", "--batch-size", "32", "--micro-batch-size", "32",
                                  "--max-prompt-len", "32", "--max-response-len", "48", "--eval-fraction", "0.2",
                                  "--device", "cpu"])
    assert metrics["n_positive"] > 30 and metrics["n_negative"] > 30
    # chance is 50%; a constant answer gets one class right and the other wrong
    assert metrics["accuracy"] > 0.7, metrics
    assert metrics["positive_accuracy"] > 0.5 and metrics["negative_accuracy"] > 0.5, metrics
    assert metrics["mean_d_positive"] > metrics["mean_d_neutral"] > metrics["mean_d_negative"]


# ----------------------------------------------------------------------------------------------
# the lab's hooks in the stages: reward-model pairs from revisions, eval's gold column and charts
# ----------------------------------------------------------------------------------------------
def test_revision_pairs_leave_out_held_out_ids(tmp_path):
    import redistribute

    rows = [{"id": f"p{k}", "prompt": "\n\nHuman: hi\n\nAssistant:", "rejected": f" kill {k}", "revised": f" help {k}"}
            for k in range(3)]
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = redistribute.revision_pairs(path, heldout_groups={"p1"})
    assert [(p.chosen, p.rejected) for p in pairs] == [(" help 0", " kill 0"), (" help 2", " kill 2")]
    path.write_text(json.dumps({"id": "p0", "prompt": "x"}) + "\n")
    with pytest.raises(common.DataError, match="line 1"):
        redistribute.revision_pairs(path, set())


def test_report_shows_gold_only_when_measured_and_draws_gold_against_kl(tmp_path):
    import report

    row = {k: 0.5 for k, _, _ in report.COLUMNS}
    results = {"baseline": "sft", "num_prompts": 2, "split": "test", "judge": "none",
               "policies": {"sft": dict(row), "tlcr": dict(row)}}
    assert "Gold" not in report.results_markdown(results)
    results["policies"]["tlcr"]["gold_score"] = 1.25
    table = report.results_markdown(results)
    assert "| Gold ↑ |" in table and "| tlcr | +1.250 |" in table and "| sft | — |" in table
    log = tmp_path / "ppo_tlcr" / "log.jsonl"
    log.parent.mkdir()
    log.write_text("".join(json.dumps({"step": s, "kl": 3 - s, "gold_score": 2 * s}) + "\n" for s in (1, 2, 3)))
    curves = report.training_curves({"tlcr": str(log)})
    assert curves[report.GOLD_VS_KL]["tlcr"] == [(2, 2), (1, 4), (0, 6)]  # (KL, gold), in step order
    assert any(title.startswith("gold score (") for title in curves)
    svg = report.line_chart_svg(report.GOLD_VS_KL, curves[report.GOLD_VS_KL], x_label="KL")
    assert ">KL</text>" in svg
    page = report.report_html({**results, "seed": 0}, [], curves)
    assert page.count(">KL</text>") == 1 and page.count(">step</text>") == len(curves) - 1
