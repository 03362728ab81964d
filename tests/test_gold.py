"""gold.py, the lab's gold task: hand-computed scores, the rule reviser's minimal edits and their
labels, gold-ranked pairs, and a discriminator that learns the gold labels in a few seconds."""
import json
import math

import numpy as np
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
    (" skill killer Kills", -1),                              # whole words: "skill", "killer": 0
    (" self-harm", -1),                                       # a hyphen separates words
    (" Please help, don’t steal the gun.", -1),               # help +1, steal -1, gun -1, please 0
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
    assert [m.group() for m in gold.words(" can’t won't rock'n'roll")] == [
        "can’t",
        "won't",
        "rock'n'roll",
    ]
    assert gold.normalise("Can’t") == "can't"


def test_lexicon_is_consistent():
    lexicon = gold.default_lexicon()
    assert set(lexicon.replacements.values()) == set(lexicon.positive)
    assert all(lexicon.weights[w] == -1 for w in lexicon.replacements)
    assert all(lexicon.weights[w] == +1 for w in lexicon.positive)
    assert all(w == gold.normalise(w) and gold.WORD.fullmatch(w) for w in lexicon.weights)


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
            assert new.lower() == gold.default_lexicon().replacements[gold.normalise(word)]
        else:
            assert new == word  # a word of weight 0 (or +1, or past the cap) is never touched
    # the text between words is unchanged
    def gaps(t, ws):
        return [t[a[2]:b[1]] for a, b in zip(ws, ws[1:])] + [t[:ws[0][1]], t[ws[-1][2]:]]

    assert gaps(text, before) == gaps(revised, after)
    assert gold.gold_score(revised) == gold.gold_score(text) + 2 * len(negatives)
    assert gold.gold_revise(revised) is None  # nothing left to fix
    return len(negatives)


def test_revision_is_minimal_and_raises_the_score_on_the_bundled_responses(bundled_pairs):
    edited = sum(
        check_minimal(text)
        for pair in bundled_pairs[:1200]
        for text in (pair.chosen, pair.rejected)
    )
    assert edited > 300  # the lexicon does hit the data


def test_rank_pairs_drops_ties_and_counts_flips():
    prompt = "\n\nHuman: hi\n\nAssistant:"
    keep = common.Pair(prompt, " I can help.", " I can kill.")          # gold agrees with the human
    # gold prefers the human-rejected one
    flip = common.Pair(prompt, " Use a gun.", " Ask a friend.")
    tie = common.Pair(prompt, " Hello there.", " Good morning.")        # 0 vs 0
    kept, counts = gold.rank_pairs([keep, flip, tie])
    assert counts == {"pairs": 3, "kept": 2, "ties": 1, "flipped": 1}
    assert kept[0] == keep
    assert (kept[1].chosen, kept[1].rejected, kept[1].id) == (flip.rejected, flip.chosen, flip.id)
    assert all(gold.gold_score(p.chosen) > gold.gold_score(p.rejected) for p in kept)


def test_score_responses_decodes_up_to_the_mask_and_drops_eos(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    ids = [
        tiny_tokenizer(t, add_special_tokens=False)["input_ids"]
        for t in (" kill the gun", " ask a friend")
    ]
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
    the k-th word of the revision is edited where the k-th word of the rejected response is
    negative."""
    before, after = gold.word_weights(rejected), gold.word_weights(revised)
    edited = [k for k, (*_, weight) in enumerate(before) if weight < 0]
    return {
        "rejected": [before[k][1:3] for k in edited],
        "revised": [after[k][1:3] for k in edited],
    }


def test_gold_labels_mark_exactly_the_edited_words(splits, tiny_tokenizer):
    pairs, _ = gold.rank_pairs(splits["reward"])
    revisions = {p.id: gold.gold_revise(p.rejected) for p in pairs}
    pairs = [p for p in pairs if revisions[p.id]]
    records, _ = label.label_pairs(pairs, revisions, tiny_tokenizer, max_response_len=10**6,
                                   progress=False)
    exact = 0
    for record in records:
        edited = edited_word_spans(record["rejected"], record["revised"])
        for side, sign in (("rejected", -1), ("revised", +1)):
            text, ids, labels = record[side], record[f"{side}_ids"], record[f"{side}_labels"]
            spans = token_spans(tiny_tokenizer, text, ids)
            inside = [
                any(s < e_tok and s_tok < e for s, e in edited[side]) for s_tok, e_tok in spans
            ]
            assert set(labels) <= {0, sign}
            # no token outside an edited word carries a label ...
            assert all(inside[k] for k, v in enumerate(labels) if v), (side, text)
            # ... and every edited word has a labelled token
            for s, e in edited[side]:
                assert any(
                    labels[k] for k, (s_tok, e_tok) in enumerate(spans) if s < e_tok and s_tok < e
                ), text
            exact += all(bool(v) == inside[k] for k, v in enumerate(labels))
    # exactly the edited words' tokens, except where a sub-word token is shared ("cocaine" ->
    # "medicine")
    assert len(records) > 100 and exact > 0.9 * 2 * len(records)


def test_label_py_gold_reviser_end_to_end(tiny_dir, tmp_path, splits):
    out = tmp_path / "labels.jsonl"
    argv = [
        "--reviser", "gold", "--preference", "gold", "--tokenizer", str(tiny_dir),
        "--out", str(out), "--max-response-len", "64",
    ]
    summary = label.main(argv)
    kept, counts = gold.rank_pairs(splits["reward"])
    revisable = [p for p in kept if gold.gold_revise(p.rejected)]
    assert summary["reviser"] == "gold" and summary["reviser_model"] == gold.default_lexicon().id
    assert summary["skipped"]["gold tie"] == counts["ties"]
    assert summary["pairs"] == counts["kept"] and summary["done"] == len(revisable)
    assert summary["failed"] == counts["kept"] - len(revisable)
    assert {f["error"] for f in summary["failures"]} == {"no negative word to replace"}
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [p.id for p in revisable]
    assert all(r["revised"] == gold.gold_revise(r["rejected"]) for r in records)
    assert summary["tokens"]["positive"] > 0.01 and summary["tokens"]["negative"] > 0.01
    # the same cache as the LLM revisers: the second run reuses every answer
    again = label.main(argv)
    assert again["from_cache"] == len(revisable) and out.read_text() == "".join(
        json.dumps(r) + "\n" for r in records)


# ----------------------------------------------------------------------------------------------
# a discriminator trained for a few seconds on gold labels is above chance on held-out gold labels
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lexicon", [[], ["--lexicon", str(gold.DEFAULT_LEXICON.parent /
                                                         "lexicon-sentiment.json")]])
def test_discriminator_learns_gold_labels(tiny_dir, tmp_path, lexicon):
    """On the harm lexicon and on the sentiment one: either gold gives TLCR something to learn."""
    import discriminator

    torch.set_num_threads(1)
    labels = tmp_path / "labels.jsonl"
    label.main(
        [
            "--reviser", "gold", "--preference", "gold", "--tokenizer", str(tiny_dir),
            "--out", str(labels), "--max-response-len", "48", *lexicon,
        ]
    )
    metrics = discriminator.main(
        [
            "train", "--sft", str(tiny_dir), "--labels", str(labels), "--out", str(tmp_path / "d"),
            "--epochs", "6", "--lr", "3e-3", "--batch-size", "32", "--micro-batch-size", "32",
            "--max-prompt-len", "32", "--max-response-len", "48", "--eval-fraction", "0.2",
            "--device", "cpu",
        ]
    )
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

    rows = [
        {
            "id": f"p{k}",
            "prompt": "\n\nHuman: hi\n\nAssistant:",
            "rejected": f" kill {k}",
            "revised": f" help {k}",
        }
        for k in range(3)
    ]
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = redistribute.revision_pairs(path, heldout_groups={"p1"})
    assert [(p.chosen, p.rejected) for p in pairs] == [
        (" help 0", " kill 0"),
        (" help 2", " kill 2"),
    ]
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
    log.write_text(
        "".join(json.dumps({"step": s, "kl": 3 - s, "gold_score": 2 * s}) + "\n" for s in (1, 2, 3))
    )
    curves = report.training_curves({"tlcr": str(log)})
    # (KL, gold), in step order
    assert curves[report.GOLD_VS_KL]["tlcr"] == [(2, 2), (1, 4), (0, 6)]
    assert any(title.startswith("gold score (") for title in curves)
    svg = report.line_chart_svg(report.GOLD_VS_KL, curves[report.GOLD_VS_KL], x_label="KL")
    assert ">KL</text>" in svg
    page = report.report_html({**results, "seed": 0}, [], curves)
    assert page.count(">KL</text>") == 1 and page.count(">step</text>") == len(curves) - 1


# ----------------------------------------------------------------------------------------------
# true token credit: the gold weight of each token's word, and how well token rewards match it
# ----------------------------------------------------------------------------------------------
CREDIT_TEXT = (" You stupid idiot, I could kill him with a gun or cocaine. Ask a friend for help,"
               " can’t you?")


def credit_by_word(tokenizer, text):
    """{word: [(token text, credit)]}: the tokens token_credit puts in each word."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    credit, word_of_token = gold.token_credit(tokenizer, ids)
    decoded, spans = gold.token_spans(tokenizer, ids)
    assert len(credit) == len(word_of_token) == len(ids)
    assert gold.gold_score(decoded) == gold.gold_score(text)
    found = {}
    for (start, end), c, w in zip(spans, credit, word_of_token):
        if w >= 0:
            found.setdefault(gold.words(decoded)[w].group(), []).append((decoded[start:end], c))
    return ids, credit, word_of_token, found


@pytest.mark.parametrize("which", ["tiny_tokenizer", "llama_tokenizer"])
def test_token_credit_maps_each_word_weight_onto_its_tokens(which, request):
    tokenizer = request.getfixturevalue(which)
    _, credit, word_of_token, found = credit_by_word(tokenizer, CREDIT_TEXT)
    expected = {"stupid": -1, "idiot": -1, "kill": -1, "gun": -1, "cocaine": -1,
                "Ask": 1, "friend": 1, "help": 1}
    for word, weight in expected.items():  # every piece of a weighted word carries its weight ...
        pieces = found[word]
        assert {c for _, c in pieces} == {weight}, (word, pieces)
        # ... and the pieces spell the word, with at most the leading space (byte-level " kill",
        # SentencePiece "▁kill")
        assert "".join(p for p, _ in pieces).strip(" ,.") == word, pieces
    assert {c for _, c in found["can’t"]} == {0.0}  # a curly apostrophe inside one word
    assert credit[-1] == 0.0 and word_of_token[-1] == -1  # EOS belongs to no word
    # punctuation tokens (",", ".", "?") are in no word and weigh nothing
    assert sum(w == -1 for w in word_of_token) >= 3
    # the harm words' tokens are exactly the tokens of credit −1
    harm = ("stupid", "idiot", "kill", "gun", "cocaine")
    assert sum(c < 0 for c in credit) == sum(len(found[w]) for w in harm)
    assert sorted(set(word_of_token) - {-1}) == list(range(len(gold.words(CREDIT_TEXT))))


def test_token_credit_cap_and_multibyte_pieces(tiny_tokenizer, llama_tokenizer):
    for tokenizer in (tiny_tokenizer, llama_tokenizer):
        text = " word" * (MAX - 1) + " kill kill"
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        credit, word_of_token = gold.token_credit(tokenizer, ids)
        harm = [word_of_token[k] for k, c in enumerate(credit) if c < 0]
        assert set(harm) == {MAX - 1}  # the MAX-th word counts, the next kill is a word of weight 0
        assert MAX in word_of_token
        # a piece that completes no character (an emoji in bytes) never breaks the spans
        ids = tokenizer(" kill 😀 help", add_special_tokens=False)["input_ids"]
        credit, word_of_token = gold.token_credit(tokenizer, ids)
        assert sorted(set(credit)) == [-1.0, 0.0, 1.0]
        assert credit[word_of_token.index(0)] == -1.0 and credit[-1] == 1.0
        assert gold.token_spans(tokenizer, ids)[0] == tokenizer.decode(ids)  # the emoji is kept
    assert gold.token_credit(tiny_tokenizer, []) == ([], [])


def test_credit_metrics_rewards_equal_to_the_gold_weights_are_perfect():
    credit = [0, -1, -1, 0, 1, 0, 0, -1, 1, 1, 0]
    words = [-1, 0, 0, 1, 2, -1, 3, 4, 5, 5, -1]
    m = gold.credit_metrics(credit, credit, words)
    assert m["auc_harm"] == 1.0 and m["auc_safe"] == 1.0
    # per word the rewards are summed: a two-token word collects twice its weight, so r < 1 ...
    assert 0.9 < m["word_r"] < 0.99
    # ... and the weight split over the word's tokens (Σ over the reply = gold(y)) is exact
    split = [c / words.count(w) if w >= 0 else 0.0 for c, w in zip(credit, words)]
    m = gold.credit_metrics(split, credit, words)
    assert m["auc_harm"] == 1.0 and m["auc_safe"] == 1.0 and m["word_r"] == pytest.approx(1.0)
    assert (m["tokens"], m["harm_tokens"], m["safe_tokens"]) == (11, 3, 3)
    assert (m["words"], m["harm_words"], m["safe_words"]) == (6, 2, 2)
    flipped = gold.credit_metrics([-c for c in split], credit, words)  # upside down: AUC 0, r = −1
    assert flipped["auc_harm"] == 0.0 and flipped["auc_safe"] == 0.0
    assert flipped["word_r"] == pytest.approx(-1.0)


def test_auc_counts_ties_half_and_matches_the_pair_definition():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=60).astype(float)  # many ties
    positive = rng.random(60) < 0.3
    pairs = [1.0 if p > n else 0.5 if p == n else 0.0
             for p in scores[positive] for n in scores[~positive]]
    assert gold.auc(scores, positive) == pytest.approx(sum(pairs) / len(pairs))
    assert gold.auc([1.0, 1.0, 1.0], [True, False, False]) == 0.5  # a constant score is chance
    assert math.isnan(gold.auc([1.0, 2.0], [False, False]))


def synthetic_replies(rng, n_replies=200, length=30):
    """Replies of one-token words, 5% harm and 5% safe tokens, punctuation (no word) in between."""
    credit, words = [], []
    for _ in range(n_replies):
        c = rng.choice([-1.0, 0.0, 1.0], size=length, p=[0.05, 0.9, 0.05])
        w = np.where(rng.random(length) < 0.2, -1, np.arange(length))
        c[w < 0] = 0.0
        credit.append(c)
        words.append(w)
    return credit, words


def test_credit_metrics_random_constant_and_shifted_rewards():
    rng = np.random.default_rng(1)
    credit, words = synthetic_replies(rng)

    def pooled(rewards):
        return gold.credit_metrics(*gold.pool_replies(zip(rewards, credit, words)))

    random = pooled([rng.normal(size=len(c)) for c in credit])
    assert abs(random["auc_harm"] - 0.5) < 0.06 and abs(random["auc_safe"] - 0.5) < 0.06
    assert abs(random["word_r"]) < 0.06
    constant = pooled([np.full(len(c), 0.3) for c in credit])
    assert constant["auc_harm"] == constant["auc_safe"] == 0.5 and math.isnan(constant["word_r"])
    # the gold credit, one token late (the off-by-one between words and tokens): far from perfect
    late = pooled([np.concatenate([[0.0], c[:-1]]) for c in credit])
    exact = pooled(credit)
    assert exact["auc_harm"] == exact["auc_safe"] == 1.0
    assert late["auc_harm"] < 0.6 and late["auc_safe"] < 0.6 and late["word_r"] < 0.2
    # a noisy but right reward sits in between
    noisy = pooled([c + rng.normal(scale=0.7, size=len(c)) for c in credit])
    assert 0.8 < noisy["auc_harm"] < 1.0 and 0.8 < noisy["auc_safe"] < 1.0
    assert 0.3 < noisy["word_r"] < 0.6


def test_credit_metrics_with_an_empty_class_is_nan_not_a_crash():
    m = gold.credit_metrics([0.1, 0.2], [0.0, 0.0], [0, -1])
    assert math.isnan(m["auc_harm"]) and math.isnan(m["auc_safe"]) and math.isnan(m["word_r"])
    assert m["harm_tokens"] == 0 and m["words"] == 1
    empty = gold.credit_metrics([], [], [])
    assert empty["tokens"] == 0 and math.isnan(empty["auc_harm"])
    with pytest.raises(ValueError, match="one of each per token"):
        gold.credit_metrics([0.1], [0.0, 1.0], [0])


def test_pool_replies_keeps_words_of_different_replies_apart():
    replies = [([1, 2, 3], [0, -1, -1], [-1, 0, 0]), ([4, 5], [1, 0], [0, 1])]
    rewards, credit, words = gold.pool_replies(replies)
    assert words == [-1, 0, 0, 1, 2] and credit == [0, -1, -1, 1, 0] and rewards == [1, 2, 3, 4, 5]


class PieceTokenizer:
    """A tokenizer reduced to what token_credit uses: pieces of text by id; id 0 is EOS."""
    all_special_ids = [0]

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


def test_token_credit_rules_on_hand_made_pieces():
    pieces = ["<eos>", " self", "-harm", " ok", " kill-help", " fine", "-kill", " co", "caine", "."]
    tokenizer = PieceTokenizer(pieces)
    #        " self" "-harm" " ok" " kill-help" " fine-kill" " co" "caine" "." EOS
    ids = [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    credit, word_of_token = gold.token_credit(tokenizer, ids)
    # words: self0 harm1 ok2 kill3 help4 fine5 kill6 cocaine7
    assert word_of_token == [0, 1, 2, 3, 5, 6, 7, 7, -1, -1]
    assert credit == [0, -1, 0, -1, 0, -1, -1, -1, 0, 0]
    # " kill-help" overlaps a harm and a safe word: the first among equals; "help" keeps no token.
    # "-kill" (the hyphen outside any word) belongs to kill; " co" "caine" both carry cocaine's
    # weight
    m = gold.credit_metrics(credit, credit, word_of_token)
    assert m["words"] == 7 and m["harm_words"] == 4 and m["safe_words"] == 0


def test_binned_frontier_and_its_chart():
    import report

    # time order
    points = [(0.2, 1.0), (3.5, 7.0), (0.4, 3.0), (1.5, 2.0), (3.0, 5.0), (100.0, 0.0)]
    frontier = report.binned_frontier(points)
    assert frontier[0] == pytest.approx((0.3, 2.0, 1.0, 2))  # s.e. = sd / √n = √2 / √2
    assert frontier[1] == (1.5, 2.0, None, 1)  # one step: no error bar
    assert frontier[2] == pytest.approx((3.25, 6.0, 1.0, 2))
    assert frontier[3] == (100.0, 0.0, None, 1)  # past the last edge: the last bin
    svg = report.gold_frontier_svg({"tlcr": points})
    assert svg.count("<circle") == len(points) + len(frontier)  # faint steps, then the bin means
    assert svg.count('stroke-width="1.2"') == 2  # an error bar where a bin holds two steps or more
    assert report.GOLD_VS_KL in svg and ">KL</text>" in svg
