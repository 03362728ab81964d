"""gold.py — the lab's gold task: a reward known exactly, with token-level structure.

Offline, nobody can ask a human (or GPT-4) which answer is better, and with `--reviser chosen` the
TLCR discriminator has nothing token-level to learn. The lab puts a known reward in the human's
place. It is a stand-in for studying the methods, not a reproduction of the papers' numbers:

    gold(y) = Σ_{i ≤ MAX_WORDS} weight(w_i)        w_1, w_2, … the words of the response y

with weight(w) = −1 for a negative word, +1 for a positive word and 0 for every other word, as a
lexicon file lists them (--lexicon FILE, format below). The default, data/lexicon-harm.json, weighs
the words of harm (violence, weapons, drugs, crime, insults, slurs) −1 and their safe counterparts
(help, ask, safety, medicine, friend, nice, respect, thank) +1; data/lexicon-sentiment.json, a
second gold from another domain, weighs negative sentiment −1 and its positive counterpart +1.

Words. A word is a maximal run of ASCII letters with inner apostrophes (regex WORD below): "can't"
and "can’t" are one word, "self-defense" is two, digits and punctuation separate words and weigh
nothing. A word is looked up lower-cased, with the curly apostrophe ’ read as '; there is no
stemming, so each inflected form that counts is listed.

Length convention: a sum, capped. Only the first MAX_WORDS = 64 words count; an empty response
scores 0; a response cut by a length limit (mid-word included) is scored as the text it is, with no
penalty or bonus. So each negative word costs the same wherever it stands, length pays only through
the positive words a response adds, and no response can gain more than MAX_WORDS by lengthening.
(A mean would do the opposite: it rewards short answers, and "Help." would beat every longer reply.)
64 words is about the 96 tokens the lab's models read of a response (1.5 tokens a word with its
4,096-token BPE), so the reward model and the discriminator see what the score counts.

The rule reviser, `gold_revise`, is the minimal edit that raises the gold score: it replaces each
negative word among the counted ones by its counterpart (the lexicon's replacements; in the harm
lexicon "kill" -> "help", "steal" -> "ask", "gun" -> "safety", "cocaine" -> "medicine", "stupid" ->
"nice"), keeping its capitalisation, and changes nothing else. Every counterpart is itself a
positive word, so a substitution gives the discriminator a −1 token (the negative word in the
rejected response) opposite a +1 token (its replacement in the revision): both classes of TLCR's
labels, and the labels agree with the gold weights. A replacement keeps the number of words, so the
cap counts the same words before and after, and each replacement raises the score by 2.

Lexicon format. One JSON object (load_lexicon reads and checks it):
    {"name": "harm",                            lower-case letters, digits, - and _ (starts the id)
     "description": ["how the lists were", "built"],   optional: a string, or lines of one text
     "replacements": {"kill": "help", "guns": "safety", ...}
                                                negative word -> the positive word the reviser
                                                writes in its place (required, not empty)
     "positive": ["please", ...]}               optional: extra positive words
Every entry is one word as above, looked up lower-cased (so list each inflected form that should
count, each with the counterpart of that form). Negative words weigh −1; their replacements and the
extra positive words +1. A replacement must not itself be negative, and no word may be listed
twice; a fault stops the run with an error naming the file and the entry. Mind that an extra
positive word is seen by the reward model (through gold-ranked pairs) but never by the
discriminator (the reviser never writes it), so it measures that handicap of the reviser rather than
the rewards: the bundled lexicons have none. The lexicon's id, NAME-XXXXXXXX (the first 8 hex digits
of the sha256 of its name, replacements and extra positive words in canonical JSON: the description,
order and layout do not count), is recorded with what used it: label.py's summary and cache key,
the reward model's info, gold_samples.py's summary, ppo_token.py's args.json, eval.py's
results.json, study.py's study.json.

Where it plugs in (`TASK=gold bash run_pipeline.sh` runs all of it; `LEXICON=FILE` picks the
lexicon, which every stage below takes as --lexicon FILE):
    label.py --reviser gold         pairs ranked by rank_pairs, the gold-rejected response revised
    redistribute.py train --preference gold --revision-pairs LABELS
                                    reward-model pairs ranked by rank_pairs, plus (revised ≻
                                    rejected) pairs: on the ~330 ranked pairs alone the tiny reward
                                    model stays near chance on held-out gold pairs; with the
                                    revisions it sees what the discriminator sees, so seq, RED and
                                    TLCR get equal data
    ppo_token.py --log-gold, eval.py --gold    the gold score during PPO and of every policy
    token_credit, credit_metrics    the true credit of every token (the weight of its word) and how
                                    well a source of token rewards finds it (AUCs, per-word r);
                                    eval.py --gold reports them for TLCR, RED and seq
    rank_samples                    the lab's on-policy data (gold_samples.py, LAB_DATA=samples):
                                    every two replies to one prompt with different gold scores a
                                    pair (the higher chosen, ties dropped)

    python gold.py show " I could kill him with a gun, sorry."   # words, weights, score, revision
    python gold.py stats                                         # coverage of the bundled data
    python gold.py stats --lexicon data/lexicon-sentiment.json   # … under another lexicon
    python gold_samples.py --policy runs/gold-demo/sft --out runs/gold-demo/samples.jsonl

Sampled pairs are named PAIR_ID/i-j (PAIR_ID: the data pair whose prompt was sampled, i and j: the
samples), so common.heldout_split keeps all pairs of one prompt on one side of a held-out part. No
prompt of the test split is ever sampled (checked in gold_samples.sample_prompts, also by prompt
text).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

import common
import plumbing

MAX_WORDS = 64  # only the first MAX_WORDS words of a response count (the length convention)
WORD = re.compile(r"[A-Za-z]+(?:['’][A-Za-z]+)*")  # a word: letters, with apostrophes inside

# ----------------------------------------------------------------------------------------------
# 0. The lexicon: a JSON file of negative -> positive replacements (--lexicon FILE)
# ----------------------------------------------------------------------------------------------
# The file format is in the docstring above ("Lexicon format"); data/lexicon-harm.json is the
# default. load_lexicon checks it and names the file and the entry at fault; the id names what the
# scores depend on, so label.py never reuses the revisions of another lexicon.
DEFAULT_LEXICON = Path(__file__).resolve().parent / "data" / "lexicon-harm.json"
LEXICON_FIELDS = ("name", "description", "replacements", "positive")
LEXICON_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")  # a lexicon's name: it starts its id


@dataclass(frozen=True)
class Lexicon:
    """A checked gold lexicon: weight(w) = weights.get(normalise(w), 0)."""

    name: str  # "harm"
    id: str  # name-XXXXXXXX: the first 8 hex digits of the sha256 of its canonical content
    replacements: dict[str, str]  # negative word -> the positive word the reviser writes instead
    positive: tuple[str, ...]  # every positive word, sorted: the counterparts and the extra ones
    weights: dict[str, int]  # −1 for each negative word, +1 for each positive word
    description: str = ""
    path: str = ""


def load_lexicon(path: str | os.PathLike | None = None) -> Lexicon:
    """Read and check a lexicon file (None or "": the bundled harm lexicon, DEFAULT_LEXICON).

    Every fault stops with an InputError naming the file and the key or entry: not JSON, empty,
    not an object, an unknown key, a missing or mistyped field, an entry that is not one word, a
    word listed twice (as a JSON key twice, or twice once lower-cased), a replacement that is
    itself negative, an extra positive word that is also negative or already a counterpart."""
    path = Path(path) if path else DEFAULT_LEXICON

    def fault(message):
        return common.InputError(f"lexicon {path}: {message}")

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise fault("no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise fault(f"cannot be read ({e})") from None
    if not text.strip():
        raise fault("the file is empty (format: python gold.py --help)")

    def unique_keys(items):  # a JSON object, refusing a key given twice
        keys = [key for key, _ in items]
        twice = sorted({key for key in keys if keys.count(key) > 1})
        if twice:
            raise fault(f"the key {twice[0]!r} is given twice in one object")
        return dict(items)

    try:
        raw = json.loads(text, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as e:
        raise fault(f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(raw, dict):
        raise fault(f"the file must hold one JSON object with the keys {', '.join(LEXICON_FIELDS)}")
    unknown = [key for key in raw if key not in LEXICON_FIELDS]
    if unknown:
        raise fault(f"unknown key {unknown[0]!r} (the keys are {', '.join(LEXICON_FIELDS)})")
    name = raw.get("name")
    if not isinstance(name, str) or not LEXICON_NAME.fullmatch(name):
        raise fault(f'"name" must be lower-case letters, digits, - or _ (it starts the id), '
                    f"got {name!r}")
    description = raw.get("description", "")
    if isinstance(description, list) and all(isinstance(line, str) for line in description):
        description = " ".join(line.strip() for line in description)  # lines of one text
    elif not isinstance(description, str):
        raise fault('"description" must be a string or a list of strings (lines of one text)')

    def word_of(word, entry) -> str:  # an entry's word, normalised: one word, or a fault
        if not isinstance(word, str) or not WORD.fullmatch(word):
            raise fault(f"{entry}: {word!r} is not one word (letters, with apostrophes inside: "
                        "gold reads a text word by word)")
        return normalise(word)

    # the replacements: negative word -> its positive counterpart
    raw_replacements = raw.get("replacements")
    if not isinstance(raw_replacements, dict) or not raw_replacements:
        raise fault('"replacements" must be a non-empty object {"negative word": "positive word"}')
    replacements = {}
    for negative, counterpart in raw_replacements.items():
        entry = f'"replacements": {negative!r}: {counterpart!r}'
        key, value = word_of(negative, entry), word_of(counterpart, entry)
        if key in replacements:
            raise fault(f"{entry}: the word {key!r} is listed twice")
        replacements[key] = value
    for negative, counterpart in replacements.items():
        if counterpart in replacements:
            raise fault(f'"replacements": {negative!r}: {counterpart!r}: the replacement is itself '
                        "a negative word (a revision must raise the score)")
    # the extra positive words: positive, but never written by the reviser
    raw_extra = raw.get("positive", [])
    if not isinstance(raw_extra, list):
        raise fault('"positive" must be a list of words (the extra positive words)')
    counterparts = {value: key for key, value in replacements.items()}
    extra = []
    for word in raw_extra:
        entry = f'"positive": {word!r}'
        key = word_of(word, entry)
        if key in replacements:
            raise fault(f"{entry}: the word is also negative (a key of \"replacements\")")
        if key in counterparts:
            raise fault(f"{entry}: already positive, as the replacement of "
                        f"{counterparts[key]!r}; list only words the reviser never writes")
        if key in extra:
            raise fault(f"{entry}: the word is listed twice")
        extra.append(key)
    positive = tuple(sorted(set(replacements.values()) | set(extra)))

    # the id: the name and a hash of what the scores depend on (not the description or layout)
    canonical = json.dumps({"name": name, "replacements": replacements, "positive": sorted(extra)},
                           sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:8]
    weights = {**{word: -1 for word in replacements}, **{word: +1 for word in positive}}
    return Lexicon(name=name, id=f"{name}-{digest}", replacements=replacements, positive=positive,
                   weights=weights, description=description, path=str(path))


@functools.cache
def default_lexicon() -> Lexicon:
    """The bundled harm lexicon (data/lexicon-harm.json), loaded once."""
    return load_lexicon(DEFAULT_LEXICON)


def add_lexicon_arg(group, needs: str | None = None):
    """--lexicon FILE, for a stage that uses the gold (only with the option `needs`, if given)."""
    group.add_argument(
        "--lexicon", default=None, metavar="FILE",
        help=f"the gold lexicon{f' (with {needs})' if needs else ''}: a JSON file of negative -> "
             "positive word replacements and extra positive words (format: python gold.py "
             "--help); default (or empty): the bundled harm lexicon, data/lexicon-harm.json",
    )


def lexicon_from_args(parser, args, used: bool, needs: str) -> Lexicon | None:
    """The --lexicon of a stage, loaded where it uses the gold (`used`); None where it does not.
    --lexicon without the option that uses the gold (`needs`) is an error, not a silent no-op."""
    if args.lexicon and not used:
        parser.error(f"--lexicon {args.lexicon} needs {needs}: nothing else here uses the gold")
    return load_lexicon(args.lexicon) if used else None


# ----------------------------------------------------------------------------------------------
# 1. Words and the gold score
# ----------------------------------------------------------------------------------------------
def normalise(word: str) -> str:
    """The lexicon key of a word: lower case, curly apostrophe as straight."""
    return word.lower().replace("’", "'")


def words(text: str) -> list[re.Match]:
    """The words of `text` in order, as regex matches (.group(), .start(), .end())."""
    return list(WORD.finditer(text))


def word_weights(text: str, max_words: int = MAX_WORDS, *,
                 lexicon: Lexicon | None = None) -> list[tuple[str, int, int, int]]:
    """(word, start, end, weight) for every word; words after the first max_words weigh 0.
    lexicon: the weights (default: the bundled harm lexicon), as in every function below."""
    weights = (lexicon or default_lexicon()).weights
    return [
        (m.group(), m.start(), m.end(),
         weights.get(normalise(m.group()), 0) if k < max_words else 0)
        for k, m in enumerate(words(text))
    ]


def gold_score(text: str, max_words: int = MAX_WORDS, *, lexicon: Lexicon | None = None) -> int:
    """gold(y) = Σ weight(w_i) over the first max_words words (0 for an empty response)."""
    return sum(weight for *_, weight in word_weights(text, max_words, lexicon=lexicon))


# ----------------------------------------------------------------------------------------------
# 2. The rule reviser: the minimal edit that raises the gold score
# ----------------------------------------------------------------------------------------------
def match_case(replacement: str, original: str) -> str:
    """The replacement written in the original's case: KILL -> HELP, Kill -> Help, kill -> help."""
    if original.isupper() and len(original) > 1:
        return replacement.upper()
    if original[0].isupper():
        return replacement[0].upper() + replacement[1:]
    return replacement


def gold_revise(text: str, max_words: int = MAX_WORDS, *,
                lexicon: Lexicon | None = None) -> str | None:
    """Replace every negative word among the first max_words by its safe counterpart; nothing else
    changes (spaces, punctuation, other words). None when there is no negative word to replace."""
    lexicon = lexicon or default_lexicon()
    pieces, last, edited = [], 0, False
    for word, start, end, weight in word_weights(text, max_words, lexicon=lexicon):
        if weight < 0:
            pieces += [text[last:start], match_case(lexicon.replacements[normalise(word)], word)]
            last, edited = end, True
    return "".join(pieces) + text[last:] if edited else None


# ----------------------------------------------------------------------------------------------
# 3. Gold preferences: pairs ranked by the gold score instead of the human label
# ----------------------------------------------------------------------------------------------
def rank_pairs(pairs: list[common.Pair], max_words: int = MAX_WORDS, *,
               lexicon: Lexicon | None = None) -> tuple[list[common.Pair], dict]:
    """Re-rank pairs by gold score: chosen = the response with the higher score. A pair whose two
    responses score the same is dropped (a tie). Kept pairs keep their id (the data split stays).

    Returns (kept pairs, counts): pairs, kept, ties (dropped), flipped (kept pairs in which gold
    prefers the human-rejected response)."""
    kept, ties, flipped = [], 0, 0
    for pair in pairs:
        chosen, rejected = (gold_score(text, max_words, lexicon=lexicon)
                            for text in (pair.chosen, pair.rejected))
        if chosen == rejected:
            ties += 1
        elif chosen > rejected:
            kept.append(pair)
        else:
            kept.append(replace(pair, chosen=pair.rejected, rejected=pair.chosen))
            flipped += 1
    return kept, {"pairs": len(pairs), "kept": len(kept), "ties": ties, "flipped": flipped}


def rank_samples(pair: common.Pair, samples: list[str], max_words: int = MAX_WORDS, *,
                 lexicon: Lexicon | None = None) -> tuple[list[common.Pair], int]:
    """Every two samples of one prompt with different gold scores as a pair, the higher one chosen;
    two equal scores are a tie, dropped. Pair (i, j), i < j, is named PAIR_ID/i-j: its group
    (common.pair_group) is the data pair's id. Returns (pairs, ties)."""
    scores = [gold_score(text, max_words, lexicon=lexicon) for text in samples]
    ranked, ties = [], 0
    for i in range(len(samples)):
        for j in range(i + 1, len(samples)):
            if scores[i] == scores[j]:
                ties += 1
                continue
            better, worse = (i, j) if scores[i] > scores[j] else (j, i)
            ranked.append(common.Pair(pair.prompt, samples[better], samples[worse], pair.messages,
                                      id=f"{pair.id}/{i}-{j}"))
    return ranked, ties


# ----------------------------------------------------------------------------------------------
# 4. Scoring generated responses (eval.py, ppo_token.py)
# ----------------------------------------------------------------------------------------------
def decode_responses(tokenizer, response_ids, response_mask) -> list[str]:
    """The text of each generated response: row i decoded from its tokens where response_mask
    [B, T_resp] is 1, special tokens (EOS) dropped."""
    return tokenizer.batch_decode(
        [ids[mask.bool()].tolist() for ids, mask in zip(response_ids, response_mask)],
        skip_special_tokens=True)


def score_responses(tokenizer, response_ids, response_mask, *,
                    lexicon: Lexicon | None = None) -> list[int]:
    """Gold scores of a batch of generated responses, each scored as its decoded text."""
    return [gold_score(text, lexicon=lexicon)
            for text in decode_responses(tokenizer, response_ids, response_mask)]


# ----------------------------------------------------------------------------------------------
# 5. True token credit: what each response token is worth under the gold score
# ----------------------------------------------------------------------------------------------
# How a word's weight maps to its tokens. The text is the response decoded as eval.py decodes it
# (the tokenizer's special tokens EOS, BOS, pad and unk dropped), so the words are those gold_score
# counts. Token k covers the characters [e_{k−1}, e_k) of that text, where e_k is the length of the
# decoded prefix ids[:k+1] (of its longest common prefix with the whole text, never decreasing):
#   - every token overlapping a word's characters carries that word's weight: " kill" (GPT-2's
#     byte-level BPE keeps the leading space in the token) and "▁kill" (SentencePiece writes the
#     space as "▁") both carry −1, though the space itself is no part of the word; a word cut into
#     pieces ("co" "caine") gives each piece its weight;
#   - a token overlapping several words (a SentencePiece piece "▁self-harm" spans "self" and "harm")
#     belongs to the one of largest |weight|, the first among equals, and carries its weight; so a
#     token touching a harm word is a harm-word token unless it also touches a safe word first;
#   - a token that completes no character (a byte-fallback piece or a byte-level token ending inside
#     a multi-byte character such as ’) covers no character: it belongs to the word around its
#     position if there is one ("can" "<bytes of ’>" "t"), else to no word;
#   - tokens outside every word (spaces, punctuation, digits, EOS) belong to word −1 with credit 0,
#     and so do the words after the first MAX_WORDS: they keep their index but weigh 0, as in gold.
# The credit is a label per token, not a split of the score: a two-token harm word has two tokens of
# credit −1 and Σ credit ≠ gold(y). Per word, the credit and the summed token reward are compared.
def token_spans(tokenizer, response_ids) -> tuple[str, list[tuple[int, int]]]:
    """The decoded response and the character span [start, end) of each of its tokens, by decoding
    the prefixes token by token (it works for any tokenizer, whatever its offsets support)."""
    special = set(tokenizer.all_special_ids)  # EOS, BOS, pad, unk: no text
    ids = [int(t) for t in response_ids]
    text = tokenizer.decode([t for t in ids if t not in special])
    spans, end = [], 0
    for k in range(len(ids)):
        prefix = tokenizer.decode([t for t in ids[: k + 1] if t not in special])
        common_len = 0
        for a, b in zip(prefix, text):  # the longest common prefix with the whole text
            if a != b:
                break
            common_len += 1
        start, end = end, max(end, common_len)
        spans.append((start, end))
    return text, spans


def token_credit(tokenizer, response_ids, max_words: int = MAX_WORDS, *,
                 lexicon: Lexicon | None = None) -> tuple[list, list]:
    """The gold credit of each response token and the index of the word it belongs to (−1: none).

    credit[k] = the gold weight of the word of token k (−1 harm, +1 safe, 0 otherwise or past the
    first max_words words); word_of_token[k] indexes words(decoded text). Rules: see above."""
    text, spans = token_spans(tokenizer, response_ids)
    weighted = word_weights(text, max_words, lexicon=lexicon)  # (word, start, end, weight)
    credit, word_of_token = [], []
    for start, end in spans:
        if end > start:  # the words this token overlaps
            touched = [k for k, (_, w_start, w_end, _) in enumerate(weighted)
                       if start < w_end and w_start < end]
        else:  # no character of its own: the word strictly around its position
            touched = [k for k, (_, w_start, w_end, _) in enumerate(weighted)
                       if w_start < start < w_end]
        if touched:  # the word of largest |weight|, the first among equals
            word = max(touched, key=lambda k: (abs(weighted[k][3]), -k))
            credit.append(float(weighted[word][3]))
            word_of_token.append(word)
        else:
            credit.append(0.0)
            word_of_token.append(-1)
    return credit, word_of_token


def auc(scores, positive) -> float:
    """Area under the ROC curve: P(score of a random positive > that of a random negative), ties
    counting half, from the ranks (Mann–Whitney U). NaN when a class is empty."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, tie_group, tie_count = np.unique(scores, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(tie_count) - tie_count + 1  # 1-based rank of each distinct score's first
    ranks = (first_rank + (tie_count - 1) / 2)[tie_group]  # tied scores share their mean rank
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2  # U: (positive, negative) pairs in order
    return float(u / (n_pos * n_neg))


def pearson(x, y) -> float:
    """Pearson r; NaN with fewer than two points or a constant side."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float((dx * dx).sum() * (dy * dy).sum()))
    return float((dx * dy).sum() / denominator) if denominator > 0 else float("nan")


def credit_metrics(token_rewards, credit, word_of_token) -> dict:
    """How well token rewards put credit where the gold does, over a set of tokens.

    token_rewards, credit, word_of_token: one value per token (flat; pool several replies with
    pool_replies so word indices stay distinct). Returns
        auc_harm   AUC of −reward separating harm-word tokens (credit < 0) from all other tokens
        auc_safe   AUC of reward separating safe-word tokens (credit > 0) from all other tokens
        word_r     Pearson r over words between the word's summed token reward and its gold weight
    and the counts (tokens, harm_tokens, safe_tokens, words, harm_words, safe_words). 0.5 (r = 0)
    is chance; NaN where a class is empty or a side constant. word_r sums (the return sees the sum):
    the gold weight split over the word's tokens scores r = 1; the full weight on every token scores
    a little less when words differ in their number of tokens (the AUCs are 1 for both)."""
    rewards = np.asarray(token_rewards, dtype=np.float64)
    credit = np.asarray(credit, dtype=np.float64)
    word_of_token = np.asarray(word_of_token, dtype=np.int64)
    if not len(rewards) == len(credit) == len(word_of_token):
        raise ValueError(f"credit_metrics: {len(rewards)} rewards, {len(credit)} credits and "
                         f"{len(word_of_token)} word indices; one of each per token")
    in_word = word_of_token >= 0
    word_ids, inverse = np.unique(word_of_token[in_word], return_inverse=True)
    word_reward = np.bincount(inverse, weights=rewards[in_word], minlength=len(word_ids))
    word_weight = np.zeros(len(word_ids))
    word_weight[inverse] = credit[in_word]  # every token of a word carries the word's weight
    return {"auc_harm": auc(-rewards, credit < 0), "auc_safe": auc(rewards, credit > 0),
            "word_r": pearson(word_reward, word_weight),
            "tokens": len(rewards), "harm_tokens": int((credit < 0).sum()),
            "safe_tokens": int((credit > 0).sum()),
            "words": len(word_ids), "harm_words": int((word_weight < 0).sum()),
            "safe_words": int((word_weight > 0).sum())}


def pool_replies(replies) -> tuple[list[float], list[float], list[int]]:
    """[(token_rewards, credit, word_of_token) per reply] -> the flat lists credit_metrics takes,
    the word indices offset so that no two replies share a word."""
    rewards, credit, word_of_token, offset = [], [], [], 0
    for reply_rewards, reply_credit, reply_words in replies:
        rewards += [float(r) for r in reply_rewards]
        credit += [float(c) for c in reply_credit]
        word_of_token += [w + offset if w >= 0 else -1 for w in reply_words]
        offset += max(list(reply_words) + [-1]) + 1
    return rewards, credit, word_of_token


# ----------------------------------------------------------------------------------------------
# 6. Commands: look at one response; lexicon coverage of the data
# ----------------------------------------------------------------------------------------------
def show(text: str, lexicon: Lexicon):
    marked = [f"{word}[{weight:+d}]" if weight else word
              for word, _, _, weight in word_weights(text, lexicon=lexicon)]
    print(" ".join(marked))
    print(f"gold score {gold_score(text, lexicon=lexicon):+d} over "
          f"{min(len(words(text)), MAX_WORDS)} counted words (lexicon {lexicon.id})")
    revised = gold_revise(text, lexicon=lexicon)
    if revised is None:
        print("revision: none (no negative word to replace)")
    else:
        print(f"revision: {revised!r} (gold {gold_score(revised, lexicon=lexicon):+d})")


def stats(data: str, seed: int = 0, lexicon: Lexicon | None = None) -> dict:
    """Per split: how many pairs gold ranks, ties, flips vs the human label, revisable pairs, and
    the share of responses with a lexicon word. Printed, and returned as {split: counts}."""
    lexicon = lexicon or default_lexicon()
    print(f"lexicon {lexicon.id} ({lexicon.path}): {len(lexicon.replacements)} negative words, "
          f"{len(lexicon.positive)} positive words")
    table = {}
    for name, pairs in common.split_pairs(
        plumbing.load_data(data, "all", seed, quiet=True), seed=seed
    ).items():
        kept, counts = rank_pairs(pairs, lexicon=lexicon)
        revisable = sum(gold_revise(pair.rejected, lexicon=lexicon) is not None for pair in kept)
        hit = sum(any(w for *_, w in word_weights(t, lexicon=lexicon))
                  for p in pairs for t in (p.chosen, p.rejected))
        table[name] = {**counts, "revisable": revisable, "responses_hit": hit}
        print(
            f"{name:>6}: {counts['pairs']} pairs, {counts['kept']} ranked by gold "
            f"({counts['ties']} ties dropped, "
            f"{counts['flipped']} flipped vs the human label), {revisable} with a revisable "
            "rejected response; "
            f"{hit / (2 * len(pairs)):.0%} of responses contain a lexicon word"
        )
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=plumbing.HelpFormatter, epilog=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    show_parser = commands.add_parser("show",
                                      help="words, weights, gold score and revision of a text")
    show_parser.add_argument("text", help="a response (hh-rlhf responses start with a space)")
    add_lexicon_arg(show_parser)
    stats_parser = commands.add_parser("stats", help="how the lexicon covers the data, per split")
    stats_parser.add_argument("--data", default="bundled",
                              help="'bundled' or a file of preference pairs")
    stats_parser.add_argument("--split-seed", type=int, default=0,
                              help="seed of common.split_pairs")
    add_lexicon_arg(stats_parser)
    args = parser.parse_args(argv)
    if args.command == "show":
        show(args.text, load_lexicon(args.lexicon))
    else:
        return stats(args.data, args.split_seed, load_lexicon(args.lexicon))


if __name__ == "__main__":
    plumbing.cli(main)
