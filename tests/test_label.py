"""label.py: the Levenshtein DP and its labels, the tokenisation boundary, the three revisers,
the fault-injecting chat server, the cache and resuming after a kill, and the API key's absence."""
import functools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import common
import label
from chat_server import SECRET, ChatServer, key_fragment
from plumbing import chat, hf_models

ROOT = Path(__file__).resolve().parents[1]
SUFFIX = " I hope this helps."


# ----------------------------------------------------------------------------------------------
# The DP
# ----------------------------------------------------------------------------------------------
def brute_distance(a, b):
    """Levenshtein distance by plain recursion over prefixes (memoised)."""
    @functools.lru_cache(maxsize=None)
    def d(i, j):
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j - 1) + (a[i - 1] != b[j - 1]), d(i - 1, j) + 1, d(i, j - 1) + 1)
    return d(len(a), len(b))


def apply_ops(a, b, ops):
    """Run the edit script over a, checking it walks a and b in order; returns the sequence it
    builds."""
    out, i_next, j_next = [], 0, 0
    for name, i, j in ops:
        if name in ("match", "substitute"):
            assert (i, j) == (i_next, j_next) and (a[i] == b[j]) == (name == "match")
            out.append(a[i] if name == "match" else b[j])
            i_next, j_next = i + 1, j + 1
        elif name == "delete":
            assert (i, j) == (i_next, None)
            i_next += 1
        else:
            assert name == "insert" and (i, j) == (None, j_next)
            out.append(b[j])
            j_next += 1
    assert (i_next, j_next) == (len(a), len(b))
    return out


def random_pairs(rng, n, alphabet, max_len):
    """n pairs of token lists, each of 0 .. max_len tokens drawn from range(alphabet)."""
    def tokens():
        return [rng.randrange(alphabet) for _ in range(rng.randrange(max_len + 1))]
    return [(tokens(), tokens()) for _ in range(n)]


def test_levenshtein_against_brute_force():
    pairs = random_pairs(random.Random(0), 400, alphabet=4, max_len=8)
    batched = label.levenshtein_batch(pairs)  # one padded batch of mixed lengths
    for (a, b), (distance, ops) in zip(pairs, batched):
        assert distance == brute_distance(tuple(a), tuple(b))
        assert sum(name != "match" for name, _, _ in ops) == distance
        assert apply_ops(a, b, ops) == b
        assert label.levenshtein(a, b) == (distance, ops)  # alone == inside a batch


def test_levenshtein_long_and_wide_batches_match_single_calls():
    rng = random.Random(1)
    pairs = []
    for n in (0, 3, 40, 130):
        for _ in range(3):
            a = [rng.randrange(50) for _ in range(n)]
            b = [t if rng.random() > 0.2 else rng.randrange(50) for t in a if rng.random() > 0.1]
            pairs.append((a, b))
    pairs += [([7] * 30, [7] * 30)] * 200  # wide enough for the doubling running minimum
    batched = label.levenshtein_batch(pairs)
    for (a, b), result in zip(pairs[:12], batched):
        assert result == label.levenshtein(a, b)
        assert apply_ops(a, b, result[1]) == b
    assert batched[-1] == (0, [("match", k, k) for k in range(30)])


def test_known_edit_scripts_and_tie_break():
    assert label.levenshtein([], []) == (0, [])
    assert label.levenshtein([1, 2, 3], [1, 4, 3]) == (
        1,
        [("match", 0, 0), ("substitute", 1, 1), ("match", 2, 2)],
    )
    assert label.levenshtein([1, 2], []) == (2, [("delete", 0, None), ("delete", 1, None)])
    assert label.levenshtein([], [5]) == (1, [("insert", None, 0)])
    # a gap in a run of equal tokens lands on the earliest copy
    assert label.levenshtein([1, 1], [1]) == (1, [("delete", 0, None), ("match", 1, 0)])
    assert label.levenshtein([1], [1, 1]) == (1, [("insert", None, 0), ("match", 0, 1)])
    # equal cost: delete + insert keep a match; two substitutions would not
    assert label.levenshtein([5, 6], [6, 7]) == (
        2,
        [("delete", 0, None), ("match", 1, 0), ("insert", None, 1)],
    )
    # equal cost, walking back: delete before substitute
    assert label.levenshtein([7, 8], [9]) == (2, [("substitute", 0, 0), ("delete", 1, None)])


def test_running_min_equals_accumulate():
    import numpy as np
    rng = np.random.default_rng(0)
    # narrow: numpy's accumulate; wide: doubling scan
    for shape in [(1, 1), (7, 3), (65, 300), (300, 64)]:
        t = rng.integers(-50, 50, shape).astype(np.int16)
        assert (label.running_min(t, np.empty_like(t)) == np.minimum.accumulate(t, axis=0)).all()


def test_edit_labels_substitutions_count_on_both_sides():
    assert label.edit_labels([1, 2, 3, 4], [1, 9, 3, 4, 5]) == ([0, -1, 0, 0], [0, 1, 0, 0, 1])
    assert label.edit_labels([5, 6], [6, 7]) == ([-1, 0], [0, 1])
    assert label.edit_labels([1, 2, 3], [1, 2, 3]) == ([0, 0, 0], [0, 0, 0])
    assert label.edit_labels([1, 2], []) == ([-1, -1], [])


def test_align_all_with_workers_matches_one_process():
    pairs = random_pairs(random.Random(2), 60, alphabet=9, max_len=29)
    expected = [(d, *label.labels_from_ops(ops, len(a), len(b))) for (a, b), (d, ops)
                in zip(pairs, (label.levenshtein(a, b) for a, b in pairs))]
    assert label.align_all(pairs, workers=1, progress=False) == expected
    assert label.align_all(pairs, workers=2, progress=False) == expected


# ----------------------------------------------------------------------------------------------
# Tokenisation and the prompt/response boundary
# ----------------------------------------------------------------------------------------------
def test_map_labels_by_offsets():
    # two source tokens merge into one: the non-neutral label wins
    assert label.map_labels_by_offsets(
        [0, -1, 0], [(0, 2), (2, 4), (4, 7)], [(0, 4), (4, 7)], 7
    ) == [-1, 0]
    # one source token split in two: both halves carry its label
    assert label.map_labels_by_offsets([1, 0], [(0, 3), (3, 5)], [(0, 1), (1, 5)], 5) == [1, 1]
    assert label.map_labels_by_offsets([0, 0], [(0, 3), (3, 5)], [(0, 5)], 5) == [0]


def test_bundled_responses_tokenise_the_same_alone_and_in_context(splits, tiny_tokenizer):
    pairs = splits["reward"][:40]
    records, stats = label.label_pairs(pairs, {p.id: p.chosen for p in pairs}, tiny_tokenizer,
                                       max_response_len=64, progress=False)
    # prompts end with "Assistant:", responses start with " "
    assert stats["boundary_mismatch"] == 0
    for pair, record in zip(pairs, records):
        response_ids = common.encode_response(tiny_tokenizer, pair.rejected, max_len=64)
        # what every stage feeds the model, minus EOS
        assert record["rejected_ids"] == response_ids[:-1]
        assert len(record["rejected_ids"]) == len(record["rejected_labels"]) <= 63
        assert len(record["revised_ids"]) == len(record["revised_labels"])
        assert set(record["rejected_labels"]) <= {-1, 0} and set(record["revised_labels"]) <= {0, 1}


def test_labelled_ids_are_what_the_discriminator_feeds_with_bos_and_sentencepiece(
        splits, llama_tokenizer):
    """With a tokenizer that adds BOS and puts '▁' before every text it tokenises alone: the
    labelled ids carry no stray '▁', and the discriminator's sequence (BOS, prompt, labelled ids) is
    exactly the tokenizer's own encoding of prompt + response, so every label sits on the token it
    was made for."""
    import discriminator

    pairs = splits["reward"][:20]
    revisions = {p.id: p.chosen for p in pairs}
    records, stats = label.label_pairs(pairs, revisions, llama_tokenizer, max_response_len=10_000,
                                       progress=False)
    assert stats["boundary_mismatch"] == 0
    for record in records:
        record["_where"] = "x"
    examples = discriminator.encode_records(records, llama_tokenizer, 10_000, 10_000)
    for k, pair in enumerate(pairs):
        for side, text in (("rejected", pair.rejected), ("revised", pair.chosen)):
            prompt_ids, response_ids, labels = examples[2 * k + (side == "revised")]
            assert prompt_ids + response_ids == llama_tokenizer(pair.prompt + text)["input_ids"]
            assert prompt_ids.count(llama_tokenizer.bos_token_id) == 1
            # has a stray '▁' in front
            alone = llama_tokenizer(text, add_special_tokens=False)["input_ids"]
            assert (
                llama_tokenizer.convert_ids_to_tokens(alone[:1]) == ["▁"]
                and alone[1:] == response_ids
            )
            assert labels == records[k][f"{side}_labels"]
        assert records[k]["tokenizer"] == hf_models.tokenizer_fingerprint(llama_tokenizer)


def merged_word(tokenizer):
    """A word that is one token with its leading space, and two or more without its first two
    letters (so the labels of the response alone sit at other positions than inside prompt +
    response)."""
    vocab = tokenizer.get_vocab()
    for piece, token_id in sorted(vocab.items(), key=lambda kv: kv[1]):
        word = piece[1:]
        if piece.startswith("Ġ") and len(word) >= 5 and word.isalpha() and word.islower():
            if (tokenizer(" " + word, add_special_tokens=False)["input_ids"] == [token_id]
                    and len(tokenizer(word[2:], add_special_tokens=False)["input_ids"]) >= 2):
                return word, token_id
    raise AssertionError("no multi-letter word token in the tiny vocabulary")


def test_boundary_merge_maps_labels_by_character_offsets(tiny_tokenizer):
    word, word_id = merged_word(tiny_tokenizer)
    prompt = "\n\nHuman: say something\n\nAssistant: " + word[:2]  # stops mid-word
    rejected, revised = word[2:] + " is here.", word[2:] + " was here."
    alone = tiny_tokenizer(rejected, add_special_tokens=False)["input_ids"]
    [(context_ids, spans)] = label.response_in_context(tiny_tokenizer, [prompt], [rejected])
    # " word" straddles the boundary
    assert len(context_ids) < len(alone) and context_ids[0] == word_id
    assert spans[0] == (0, len(word) - 2) and "".join(rejected[s:e] for s, e in spans) == rejected

    pair = common.Pair(prompt, " a chosen reply.", rejected)
    tail = len(tiny_tokenizer(" is here.", add_special_tokens=False)["input_ids"])
    for layout in ("separate", "joint"):
        [record], stats = label.label_pairs([pair], {pair.id: revised}, tiny_tokenizer,
                                            layout=layout, progress=False)
        assert stats["boundary_mismatch"] == 2  # both sides
        rejected_labels, revised_labels = label.edit_labels(
            alone, tiny_tokenizer(revised, add_special_tokens=False)["input_ids"])
        assert -1 in rejected_labels and rejected_labels[: len(alone) - tail] == [0] * (
            len(alone) - tail
        )
        if layout == "separate":  # the response's own ids, as common.encode_response gives them
            assert record["rejected_ids"] == alone and record["rejected_labels"] == rejected_labels
        else:  # the tokens inside prompt + response; the merged first token stays neutral
            assert record["rejected_ids"] == context_ids
            assert (
                record["rejected_labels"][0] == 0
                and record["rejected_labels"][1:] == rejected_labels[-(len(context_ids) - 1) :]
            )
            assert record["revised_ids"][0] == word_id and 1 in record["revised_labels"]
            assert len(record["revised_ids"]) == len(record["revised_labels"])


# ----------------------------------------------------------------------------------------------
# Parsing and retry helpers
# ----------------------------------------------------------------------------------------------
def test_parse_revision():
    d = label.DELIMITER
    assert (
        label.parse_revision(f"Because A is kind.\n{d}\nSure, here you go.\n", " No.")
        == " Sure, here you go."
    )
    assert label.parse_revision(f"Reason.\n**{d}**\n\nHello", "Hi") == "Hello"
    assert label.parse_revision("Reason.\nRevised response:\nHello", " x") == " Hello"
    assert label.parse_revision("Reason only, no delimiter.", " x") is None
    assert label.parse_revision(f"Reason.\n{d}\n   \n", " x") is None  # nothing after it
    assert label.parse_revision(f"I will write {d} below", " x") is None  # not on its own line


# ----------------------------------------------------------------------------------------------
# A chat-completions server that injects faults
# ----------------------------------------------------------------------------------------------
def fake_chat(pairs, scripts=None, hold_after=None):
    """The chat server (tests/chat_server.py) playing the reviser: each pair, tagged by its index
    and found by its reviser prompt, follows a script of behaviours, one per call, then answers "ok"
    (the rejected response plus SUFFIX after the delimiter). The client's test request is tagged
    "check"."""
    index = {label.reviser_prompt(p): k for k, p in enumerate(pairs)}

    def answer(messages):
        k = index.get(messages[0]["content"])
        if k is None:
            return "check", "OK"
        return (
            k,
            f"Reply A is more helpful.\n{label.DELIMITER}\n{pairs[k].rejected.strip()}{SUFFIX}",
        )

    def plan(tag, n):
        script = (scripts or {}).get(tag, [])
        return script[n] if n < len(script) else "ok"

    return ChatServer(answer, plan, hold_after)


@pytest.fixture
def no_proxy_env(monkeypatch):
    for name in (
        "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def openai_args(tiny_dir, out, url, n, *extra):
    return [
        "--reviser", "openai", "--api-base", url, "--api-model", "fake-model",
        "--tokenizer", str(tiny_dir), "--out", str(out), "--limit", str(n),
        "--max-response-len", "64", "--backoff-base", "0.01", "--backoff-cap", "0.05",
        "--timeout", "0.5", *extra,
    ]


def read_lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def test_openai_reviser_survives_faults_and_never_leaks_the_key(
        splits, tiny_dir, tiny_tokenizer, tmp_path, monkeypatch, no_proxy_env, capsys):
    pairs = splits["reward"][:10]
    nodelim = "say:I would rather not rewrite this."
    scripts = {0: ["429:0.4"], 1: ["500"], 2: ["badjson"], 3: [nodelim], 4: ["slow:1.5"],
               5: [nodelim] * 3, 6: ["500key"] * 3, 7: ["okkey"], 8: ["null"], 9: ["trickle:0.2"]}
    # --max-retries 2: at most 3
    expected_calls = {0: 2, 1: 2, 2: 2, 3: 2, 4: 2, 5: 3, 6: 3, 7: 1, 8: 2, 9: 2}
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    server = fake_chat(pairs, scripts)
    out = tmp_path / "labels.jsonl"
    try:
        summary = label.main(
            openai_args(tiny_dir, out, server.url, 10, "--max-retries", "2", "--concurrency", "3"))
        assert {k: len(server.calls_for(k)) for k in range(10)} == expected_calls
        # before any pair
        assert len(server.calls_for("check")) == 1 and server.calls[0][0] == "check"
        assert summary["reviser_calls"] == sum(expected_calls.values()) + 1
        assert all(auth == f"Bearer {SECRET}" for _, _, _, auth in server.calls)
        first, second = server.calls_for(0)[:2]
        assert second[2] - first[2] >= 0.39  # Retry-After: 0.4 honoured (the backoff cap is 0.05 s)
        # a byte every 0.2 s: cut at --timeout 0.5, then retried
        first, second = server.calls_for(9)
        assert 0.45 <= second[2] - first[2] <= 1.0

        # every pair labelled or reported failed, with the reason
        assert summary["done"] == 8 and summary["failed"] == 2 and summary["pairs"] == 10
        errors = {f["id"]: f["error"] for f in summary["failures"]}
        assert errors[pairs[5].id] == "no delimiter in answer"
        assert errors[pairs[6].id].startswith("HTTP 500") and "***" in errors[pairs[6].id]
        records = read_lines(out)
        assert [r["id"] for r in records] == [p.id for k, p in enumerate(pairs) if k not in (5, 6)]
        suffix_ids, checked = tiny_tokenizer(SUFFIX, add_special_tokens=False)["input_ids"], 0
        for record in records:
            lead = record["rejected"][: len(record["rejected"]) - len(record["rejected"].lstrip())]
            assert record["revised"] == lead + record["rejected"].strip() + SUFFIX
            if (
                record["rejected"] == record["rejected"].rstrip()
                and len(record["revised_ids"]) < 63
            ):
                assert set(record["rejected_labels"]) == {0}  # nothing deleted
                # inserted
                assert sum(record["revised_labels"]) == record["distance"] == len(suffix_ids)
                neutral = [
                    t for t, v in zip(record["revised_ids"], record["revised_labels"]) if v == 0
                ]
                # where the inserts land is up to the tie-break
                assert neutral == record["rejected_ids"]
                checked += 1
        assert checked >= 3
        # every answer, the two failed ones with their raw text
        cache = read_lines(f"{out}.cache.jsonl")
        assert len(cache) == 10 and len({c["key"] for c in cache}) == 10
        failed = {c["id"]: c for c in cache if c["revised"] is None}
        assert set(failed) == {pairs[5].id, pairs[6].id}
        assert failed[pairs[5].id]["answer"] == "I would rather not rewrite this."
        assert failed[pairs[5].id]["error"] == "no delimiter in answer"

        # the key is nowhere: outputs, cache (pair 7's answer echoed it), summary, printed output
        printed = capsys.readouterr()
        for text in (
            out.read_text(), Path(f"{out}.cache.jsonl").read_text(),
            Path(f"{out}.summary.json").read_text(), printed.out, printed.err,
        ):
            assert SECRET not in text
        assert "***" in Path(f"{out}.cache.jsonl").read_text()

        # a second run asks only for the two failed pairs (their scripts are used up: they
        # succeed now); pair 5's answer had no delimiter: asked again only with --retry-failed
        before = len(server.calls)
        summary = label.main(openai_args(tiny_dir, out, server.url, 10, "--max-retries", "2",
                                         "--retry-failed"))
        assert sorted(c[0] for c in server.calls[before:] if c[0] != "check") == [5, 6]
        assert summary["done"] == 10 and summary["failed"] == 0 and summary["from_cache"] == 8
        assert len(read_lines(out)) == 10 and len(read_lines(f"{out}.cache.jsonl")) == 12
    finally:
        server.close()


def test_a_rerun_pays_again_only_for_transient_failures(splits, tiny_dir, tmp_path, no_proxy_env,
                                                        capsys):
    """Answers that came back and could not be used (no delimiter, a 400) are not asked again by a
    rerun unless --retry-failed; transient failures (500, 429, a timeout, a refused connection) are.
    Before, a rerun re-asked every failed pair with the full retry budget: a paid API billed twice
    for the same malformed answer at temperature 0."""
    pairs = splits["reward"][:6]
    nodelim = "say:I would rather not rewrite this."
    scripts = {0: [nodelim] * 2, 1: ["400"], 2: ["500"] * 2, 3: ["429:0"] * 2}  # 4, 5: fine
    server = fake_chat(pairs, scripts)
    out = tmp_path / "labels.jsonl"
    try:
        argv = openai_args(tiny_dir, out, server.url, 6, "--max-retries", "1", "--concurrency", "1")
        summary = label.main(argv)
        assert summary["done"] == 2 and summary["failed_kinds"] == {"transient": 2, "unusable": 2}
        printed = capsys.readouterr().out
        assert "2 transient" in printed and "2 with an unusable answer" in printed
        assert "at least 3 calls" in printed  # the test request and the two transient pairs

        before = len(server.calls)  # a rerun: the 500 and the 429 are asked again (answered now)
        summary = label.main(argv)
        assert sorted(map(str, (c[0] for c in server.calls[before:]))) == ["2", "3", "check"]
        assert summary["done"] == 4 and summary["failed_kinds"] == {"transient": 0, "unusable": 2}
        assert summary["failed_not_asked_again"] == 2
        printed = capsys.readouterr().out
        assert "a rerun makes no calls" in printed

        before = len(server.calls)  # nothing transient is left: a rerun makes no call at all
        label.main(argv)
        assert len(server.calls) == before

        summary = label.main(argv + ["--retry-failed"])  # asked for: pairs 0 and 1 again (fine now)
        assert sorted(map(str, (c[0] for c in server.calls[before:]))) == ["0", "1", "check"]
        assert summary["done"] == 6 and summary["failed"] == 0
    finally:
        server.close()


def test_openai_key_never_leaks_at_any_offset(splits, tiny_dir, tmp_path, monkeypatch, no_proxy_env,
                                              capsys):
    """The server echoes the key at character offset k, for every k up to past the snippet an error
    shows: pair 2k fails with the key in its error body (-> the summary), pair 2k+1 answers with the
    key in its answer (-> the cache). Before the fix the error body was cut at 200 characters, then
    scrubbed: up to 55 of the key's 56 characters reached labels.jsonl.summary.json."""
    n = 2 * (chat.SNIPPET_CHARS + 2)
    pairs = splits["reward"][:n]
    scripts = {j: [f"echo500:{j // 2}" if j % 2 == 0 else f"okkey:{j // 2}"] for j in range(n)}
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    server = fake_chat(pairs, scripts)
    out = tmp_path / "labels.jsonl"
    try:
        summary = label.main(
            openai_args(tiny_dir, out, server.url, n, "--max-retries", "0", "--concurrency", "8"))
    finally:
        server.close()
    assert summary["pairs"] == n and summary["failed"] == n // 2 and summary["done"] == n // 2
    assert all(f["error"].startswith("HTTP 500") for f in summary["failures"])
    printed = capsys.readouterr()
    cache = Path(f"{out}.cache.jsonl").read_text()
    # every answer; the key scrubbed in answers and in errors alike
    records = read_lines(f"{out}.cache.jsonl")
    assert sum("***" in r["answer"] for r in records if r["revised"] is not None) == n // 2
    failed = [r for r in records if r["revised"] is None]
    assert len(failed) == n // 2 and all(r["error"].startswith("HTTP 500") for r in failed)
    for text in (
        Path(f"{out}.summary.json").read_text(), cache, out.read_text(), printed.out, printed.err,
    ):
        assert key_fragment(text) < 4
    # a 401 stops the run with one line on stderr, whatever the offset (200: the old cut)
    for k in (150, 170, 185, 199, 250, 280, 299):
        server = fake_chat(pairs[:1], {"check": [f"echo401:{k}"]})
        try:
            with pytest.raises(chat.ChatFatal) as exc:
                label.main(openai_args(tiny_dir, tmp_path / "l.jsonl", server.url, 1))
        finally:
            server.close()
        assert (
            "HTTP 401" in str(exc.value)
            and "\n" not in str(exc.value)
            and key_fragment(str(exc.value)) < 4
        )


def test_openai_bad_key_stops_the_run_without_leaking_it(
        splits, tiny_dir, tmp_path, monkeypatch, no_proxy_env):
    pairs = splits["reward"][:2]
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    server = fake_chat(pairs, {"check": ["401"]})
    try:
        with pytest.raises(chat.ChatFatal) as exc:
            label.main(
                openai_args(tiny_dir, tmp_path / "l.jsonl", server.url, 2, "--concurrency", "1"))
        assert (
            "HTTP 401" in str(exc.value)
            and SECRET not in str(exc.value)
            and "***" in str(exc.value)
        )
        # the test request, no pair asked
        assert "\n" not in str(exc.value) and len(server.calls) == 1
        assert not (tmp_path / "l.jsonl").exists()
    finally:
        server.close()


def test_openai_without_key_is_a_clear_error(tiny_dir, tmp_path, no_proxy_env):
    with pytest.raises(chat.ChatFatal, match="OPENAI_API_KEY"):
        label.main(openai_args(tiny_dir, tmp_path / "l.jsonl", "https://api.example.com/v1", 2))


def test_resume_after_kill_asks_only_for_missing_pairs(splits, tiny_dir, tmp_path, no_proxy_env):
    pairs = splits["reward"][:6]
    # the test request and three answers, then it stalls until released
    server = fake_chat(pairs, hold_after=4)
    out = tmp_path / "labels.jsonl"
    cache = Path(f"{out}.cache.jsonl")
    args = openai_args(tiny_dir, out, server.url, 6, "--concurrency", "1", "--timeout", "30")
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}  # localhost needs no key
    try:
        proc = subprocess.Popen([sys.executable, str(ROOT / "label.py"), *args], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if cache.exists() and cache.read_text().count("\n") >= 3 and len(server.calls) >= 5:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # while the 4th request is in flight
        proc.wait()
        server.release.set()
        assert not out.exists()  # killed before the final write
        cached = {c["id"] for c in read_lines(cache)}
        assert len(cached) == 3
        before = len(server.calls)

        summary = label.main(args)
        asked = [pairs[c[0]].id for c in server.calls[before:] if c[0] != "check"]
        assert not set(asked) & cached and sorted(asked) == sorted({p.id for p in pairs} - cached)
        assert summary["done"] == 6 and summary["from_cache"] == len(cached)
        # none lost, none twice
        assert sorted(r["id"] for r in read_lines(out)) == sorted(p.id for p in pairs)
        lines = read_lines(cache)
        assert len(lines) == len({c["key"] for c in lines}) == 6

        before = len(server.calls)
        label.main(args)  # a third run: everything cached
        assert len(server.calls) == before
    finally:
        server.close()


# ----------------------------------------------------------------------------------------------
# The chosen and hf revisers, end to end
# ----------------------------------------------------------------------------------------------
def test_chosen_reviser_end_to_end(splits, tiny_dir, tiny_tokenizer, tmp_path, capsys):
    out = tmp_path / "labels.jsonl"
    summary = label.main(
        [
            "--reviser", "chosen", "--tokenizer", str(tiny_dir), "--out", str(out), "--limit", "12",
            "--max-response-len", "32",
        ]
    )
    assert "warning: --reviser chosen" in capsys.readouterr().err
    records = read_lines(out)
    assert [r["id"] for r in records] == [p.id for p in splits["reward"][:12]]
    for record, pair in zip(records, splits["reward"]):
        assert record["revised"] == pair.chosen and record["prompt"] == pair.prompt
        assert record["rejected_ids"] == common.encode_response(
            tiny_tokenizer, pair.rejected, 31, add_eos=False
        )
        assert len(record["revised_ids"]) == len(record["revised_labels"]) <= 31
        assert record["distance"] >= sum(v == -1 for v in record["rejected_labels"])
    assert summary["done"] == 12 and summary["failed"] == 0 and summary["reviser"] == "chosen"
    assert abs(sum(summary["tokens"].values()) - 1) < 1e-3 and summary["tokens"]["negative"] > 0.3
    assert summary["mean_distance"] > 0 and not Path(f"{out}.cache.jsonl").exists()
    assert json.loads(Path(f"{out}.summary.json").read_text()) == summary


def hf_args(tiny_dir, out, n, *extra):
    return [
        "--reviser", "hf", "--reviser-model", str(tiny_dir), "--tokenizer", str(tiny_dir),
        "--out", str(out), "--limit", str(n), "--reviser-batch-size", "2",
        "--reviser-max-new-tokens", "8", "--device", "cpu", "--max-response-len", "64", *extra,
    ]


def test_hf_reviser_tiny_model_end_to_end(tiny_dir, tmp_path):
    """A real generate() on the tiny model: it never writes the delimiter, so nothing is labelled
    (exit 1) and its three answers wait in the cache."""
    out = tmp_path / "labels.jsonl"
    with pytest.raises(SystemExit) as exc:
        label.main(hf_args(tiny_dir, out, 3))
    assert exc.value.code == 1
    cache = read_lines(f"{out}.cache.jsonl")
    assert len(cache) == 3 and all(
        c["error"] == "no delimiter in answer" and c["answer"] for c in cache
    )


def test_hf_reviser_parses_and_retries_when_sampling(splits, tiny_dir, tmp_path, monkeypatch):
    pairs = splits["reward"][:3]
    seen = []

    def fake_generate(model, tokenizer, texts, max_new_tokens, temperature):
        answers = []
        for text in texts:
            rejected = text.split("=== Reply B (rejected) ===\n", 1)[1].split(
                "\n\nFirst explain", 1
            )[0]
            seen.append(rejected)
            first_try_of_pair_1 = (
                rejected == pairs[1].rejected.strip() and seen.count(rejected) == 1
            )
            answers.append(
                "no idea"
                if first_try_of_pair_1
                else f"Kinder.\n{label.DELIMITER}\n{rejected}{SUFFIX}"
            )
        return answers

    monkeypatch.setattr(label, "generate_texts", fake_generate)
    out = tmp_path / "labels.jsonl"
    summary = label.main(hf_args(tiny_dir, out, 3, "--temperature", "0.7", "--max-retries", "1"))
    assert summary["done"] == 3 and summary["failed"] == 0 and summary["reviser_calls"] == 4
    assert len(seen) == 4 and seen.count(pairs[1].rejected.strip()) == 2
    assert [r["revised"] for r in read_lines(out)] == [
        " " + p.rejected.strip() + SUFFIX for p in pairs
    ]
    summary = label.main(hf_args(tiny_dir, out, 3))  # cached: no generation at all
    assert len(seen) == 4 and summary["from_cache"] == 3


def test_hf_reviser_with_no_answer_to_parse_exits_with_the_reasons(
        splits, tiny_dir, tmp_path, monkeypatch, capsys):
    """No pair labelled: exit code 1 and one line that says how many failed and why; the raw answers
    are in the cache for the user to read."""
    monkeypatch.setattr(label, "generate_texts",
                        lambda model, tok, texts, *rest: ["I refuse."] * len(texts))
    out = tmp_path / "labels.jsonl"
    with pytest.raises(SystemExit) as exc:
        label.main(hf_args(tiny_dir, out, 3))
    assert exc.value.code == 1
    assert (
        "error: no pair was labelled (3 of 3 failed: 3 no delimiter in answer)"
        in capsys.readouterr().err
    )
    assert [c["answer"] for c in read_lines(f"{out}.cache.jsonl")] == ["I refuse."] * 3
    assert json.loads(Path(f"{out}.summary.json").read_text())["failed"] == 3


def test_a_long_reviser_prompt_loses_dialogue_turns_never_its_instructions(splits):
    pair = max(splits["reward"], key=lambda p: len(p.prompt))
    count = len  # characters stand in for tokens

    full, was_cut = label.fit_reviser_prompt(pair, count, 10**9)
    assert full == label.reviser_prompt(pair) and not was_cut
    # room for half the conversation
    budget = len(label.reviser_prompt(pair)) - len(pair.prompt.strip()) // 2
    text, was_cut = label.fit_reviser_prompt(pair, count, budget)
    assert was_cut and len(text) <= budget and len(text) >= budget - 2
    head, tail = label.REVISER_PROMPT.split("{prompt}")
    assert text.startswith(head) and label.DELIMITER in text  # the instructions are whole ...
    assert text.endswith(tail.format(chosen=pair.chosen.strip(), rejected=pair.rejected.strip(),
                                     delimiter=label.DELIMITER))  # ... and so are both replies
    dialogue = text[
        len(head) : len(text)
        - len(
            tail.format(
                chosen=pair.chosen.strip(),
                rejected=pair.rejected.strip(),
                delimiter=label.DELIMITER,
            )
        )
    ]
    assert dialogue.startswith(label.DIALOGUE_CUT) and pair.prompt.strip().endswith(
        dialogue[len(label.DIALOGUE_CUT) :]
    )
    # the replies alone do not fit
    assert label.fit_reviser_prompt(pair, count, 100) == (None, True)


def test_chat_text_uses_the_template_when_there_is_one(tiny_dir):
    tokenizer = hf_models.load_tokenizer(tiny_dir)
    assert label.chat_text(tokenizer, "Fix this.") == "Fix this.\n\n"  # no template: plain text
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    assert label.chat_text(tokenizer, "Fix this.") == "<|user|>Fix this.<|assistant|>"
