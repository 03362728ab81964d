"""common.py's data and encoding: the formats people have, bad files, the one split every stage
shares, prompts and responses encoded as the model reads them (BOS once, no stray '▁', chat
templates)."""
import gzip
import http.server
import json
import threading
import warnings

import pytest
import torch

import common
import eval as eval_stage
import label
import plumbing
import ppo_token
import redistribute
import sft
from plumbing import hf_models, ppo_setup


def write_jsonl(path, rows, raw_lines=()):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        for line in raw_lines:
            f.write(line + "\n")


HH = {"chosen": "\n\nHuman: q\n\nAssistant: good", "rejected": "\n\nHuman: q\n\nAssistant: bad"}


# ----------------------------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------------------------
def test_split_dialogue_uses_last_assistant_turn():
    text = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: see you"
    prompt, response = common.split_dialogue(text)
    assert prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:"
    assert response == " see you"


def test_bundled_data_skips_the_real_messy_rows_with_one_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pairs = common.load_pairs(common.BUNDLED_DATA)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    # the bundled harmless-base test slice: 2,312 rows, 4 with an empty response and
    # 5 whose chosen and rejected prompts differ
    assert "skipped 9 rows" in messages[0]
    assert (
        "4 empty response" in messages[0]
        and "5 prompts of chosen and rejected differ" in messages[0]
    )
    assert len(pairs) == 2312 - 9
    for pair in pairs:
        assert pair.prompt.endswith("\n\nAssistant:") and pair.messages is None
        assert pair.chosen.strip() and pair.rejected.strip()


def test_every_format_gives_the_same_kind_of_pair(tmp_path):
    path = tmp_path / "pairs.jsonl"
    user = {"role": "user", "content": "q3"}
    write_jsonl(
        path,
        [
            HH,
            # empty
            {"chosen": "\n\nHuman: q\n\nAssistant: ", "rejected": "\n\nHuman: q\n\nAssistant: bad"},
            # prompts differ
            {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},
            # full-hh-rlhf
            {"prompt": "\n\nHuman: q2\n\nAssistant:", "chosen": "yes", "rejected": " no"},
            {
                "prompt": "What is 2+2?",
                "chosen": "4",
                "rejected": "5",
            },  # TRL explicit prompt string
            # UltraFeedback-binarized
            {
                "prompt": "q3",
                "chosen": [user, {"role": "assistant", "content": "A"}],
                "rejected": [user, {"role": "assistant", "content": "B"}],
            },
            # TRL conversational, explicit prompt
            {
                "prompt": [{"role": "system", "content": "Be brief."}, user],
                "chosen": [{"role": "assistant", "content": "C"}],
                "rejected": [{"role": "assistant", "content": "D"}],
            },
        ],
    )
    with pytest.warns(
        UserWarning,
        match=r"skipped 2 rows \(1 empty response, 1 prompts of chosen and rejected differ\)",
    ):
        pairs = common.load_pairs(path)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("\n\nHuman: q\n\nAssistant:", " good", " bad"),
        ("\n\nHuman: q2\n\nAssistant:", " yes", " no"),
        ("\n\nHuman: What is 2+2?\n\nAssistant:", " 4", " 5"),  # a turn marker, not glued on
        ("\n\nHuman: q3\n\nAssistant:", " A", " B"),
        ("Be brief.\n\nHuman: q3\n\nAssistant:", " C", " D"),
    ]
    assert [p.messages for p in pairs] == [
        None,
        None,
        [{"role": "user", "content": "What is 2+2?"}],
        [user],
        [{"role": "system", "content": "Be brief."}, user],
    ]


def test_json_and_parquet_files(tmp_path):
    rows = [HH, {"prompt": "hi", "chosen": "a", "rejected": "b"}]
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    assert [p.chosen for p in common.load_pairs(tmp_path / "pairs.json")] == [" good", " a"]
    pyarrow = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")
    rows = [
        {"prompt": "hi", "chosen": "a", "rejected": "b"},
        {"prompt": "ho", "chosen": "c", "rejected": "d"},
    ]
    parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    assert [p.rejected for p in common.load_pairs(tmp_path / "pairs.parquet")] == [" b", " d"]


@pytest.mark.parametrize(
    "row,message",
    [
        ({"chosen": "\n\nHuman: q\n\nAssistant: a"}, r"line 3: field 'rejected' missing"),
        ({"question": "q", "answer": "a"}, r"line 3: field 'chosen' missing"),
        (
            {"chosen": [{"role": "user"}], "rejected": []},
            r"line 3: field 'chosen' is not a list of \{'role'",
        ),
        (
            {
                "prompt": [{"role": "user", "content": "q"}],
                "chosen": [{"role": "user", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            r"line 3: field 'chosen' must end with exactly one assistant",
        ),
        ([1, 2], r"line 3: expected a JSON object"),
    ],
)
def test_a_row_in_no_known_format_names_file_and_real_line(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    # a blank line before the bad row
    path.write_text(json.dumps(HH) + "\n\n" + json.dumps(row) + "\n")
    with pytest.raises(common.DataError, match="bad.jsonl " + message):
        common.load_pairs(path)


def test_unreadable_files_are_one_clear_error(tmp_path):
    good = (json.dumps(HH) + "\n").encode()
    latin1 = '{"chosen": "café", "rejected": "thé"}\n'.encode("latin-1")
    cases = {
        "missing.jsonl": None,
        "binary.jsonl": bytes(range(256)) * 4,
        "latin1.jsonl": good + b"\n" + latin1,  # the bad row is line 3: the error names it
        "latin1.json": b"[\n" + latin1.rstrip() + b"]",
        "latin1.jsonl.gz": gzip.compress(good + b"\n" + latin1),
        "truncated.jsonl.gz": gzip.compress(good * 50)[:-20],
        "fake.jsonl.gz": good,
        "malformed.jsonl": good + b"\n\n" + b'{"chosen": "unterminated\n',
        "notalist.json": b'{"chosen": "x"}',
    }
    expected = {
        "missing.jsonl": "no such file",
        "binary.jsonl": "line 1: not UTF-8",
        "latin1.jsonl": "line 3: not UTF-8",
        "latin1.json": "line 2: not UTF-8",
        "latin1.jsonl.gz": "line 3: not UTF-8",
        "truncated.jsonl.gz": "not a complete gzip file",
        "fake.jsonl.gz": "not a complete gzip file",
        "malformed.jsonl": "line 4: malformed JSON",
        "notalist.json": "must hold a list of rows",
    }
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(common.DataError, match=expected[name]) as caught:
            common.load_pairs(tmp_path / name)
        assert str(tmp_path / name) in str(caught.value) and "\n" not in str(caught.value)
    (tmp_path / "folder").mkdir()
    with pytest.raises(common.DataError, match="a directory"):
        common.load_pairs(tmp_path / "folder")


# ----------------------------------------------------------------------------------------------
# The split
# ----------------------------------------------------------------------------------------------
def test_split_is_deterministic_disjoint_and_order_free(bundled_pairs):
    first = common.split_pairs(bundled_pairs, seed=0)
    again = common.split_pairs(list(reversed(bundled_pairs)), seed=0)
    other = common.split_pairs(bundled_pairs, seed=1)
    ids = {name: [p.id for p in part] for name, part in first.items()}
    assert ids == {name: [p.id for p in part] for name, part in again.items()}
    assert ids["sft"] != [p.id for p in other["sft"]]
    all_ids = [i for part in ids.values() for i in part]
    assert len(all_ids) == len(set(all_ids)) == len(bundled_pairs)
    rest = len(bundled_pairs) - len(ids["test"])
    assert abs(len(ids["sft"]) - 0.2 * rest) <= 1
    assert abs(len(ids["reward"]) - 0.4 * rest) <= 1
    # a pinned value: same seed, same split on any machine
    assert ids["test"][0] == "67589506179c6ed2"


def stage_pairs(seed: int, limit: list[str] = ()) -> dict[str, set[str]]:
    """The pair ids every stage reads, each through the stage's own argument parser and data
    function."""
    common_args = ["--seed", str(seed), *limit]
    sft_train, sft_test = sft.select_pairs(sft.parse_args(common_args), quiet=True)
    label_pairs, _, _ = label.select_pairs(label.parse_args(["--reviser", "chosen", *common_args]))
    rm_train, rm_eval = redistribute.select_pairs(
        redistribute.parse_args(["train", "--sft", "x", "--out", "x", *common_args]), quiet=True)
    ppo_pairs = ppo_setup.select_pairs(
        ppo_token.parse_args(
            ["--policy", "x", "--out", "x", "--reward", "seq", "--reward-model", "x", *common_args]
        ),
        quiet=True,
    )
    eval_pairs = eval_stage.select_pairs(
        eval_stage.parse_args(
            [
                "--policies", "a=x", "--reference", "x", "--reward-model", "x",
                "--discriminator", "x", "--seed", str(seed), "--num-prompts", "10000",
            ]
        ),
        quiet=True,
    )
    return {
        "sft": {p.id for p in sft_train},
        "test (sft)": {p.id for p in sft_test},
        "label": {p.id for p in label_pairs},
        "reward model": {p.id for p in rm_train + rm_eval},
        "ppo": {p.id for p in ppo_pairs},
        "eval": {p.id for p in eval_pairs},
    }


def test_every_stage_draws_the_same_split_whatever_its_seed(bundled_pairs):
    """--seed changes initialisation and sampling, never the data: the reward model cannot train on
    evaluation prompts or PPO's prompts, whatever seeds the stages are given."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seed0, seed7 = stage_pairs(0), stage_pairs(7)
    assert seed0 == seed7
    split = {
        name: {p.id for p in part} for name, part in common.split_pairs(bundled_pairs, 0).items()
    }
    assert seed0["sft"] == split["sft"] and seed0["test (sft)"] == seed0["eval"] == split["test"]
    assert (
        seed0["label"] == seed0["reward model"] == split["reward"] and seed0["ppo"] == split["rl"]
    )
    parts = [seed0["sft"], seed0["reward model"], seed0["ppo"], seed0["eval"]]
    assert sum(map(len, parts)) == len(set().union(*parts))  # disjoint
    # --limit takes the first pairs of a split and never changes which pairs are in it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        limited = stage_pairs(3, ["--limit", "20"])
    for name in ("sft", "label", "reward model", "ppo"):
        assert len(limited[name]) == 20 and limited[name] <= seed0[name], name


def test_heldout_split_is_deterministic_disjoint_and_order_free(bundled_pairs):
    items = bundled_pairs[:200]
    train, heldout = common.heldout_split(items, 0.1, seed=0)
    train2, heldout2 = common.heldout_split(list(reversed(items)), 0.1, seed=0)
    assert [p.id for p in heldout] == [p.id for p in heldout2] and len(heldout) == 20
    assert {p.id for p in train}.isdisjoint(p.id for p in heldout) and len(train) + len(
        heldout
    ) == 200
    assert [p.id for p in common.heldout_split(items, 0.1, seed=1)[1]] != [p.id for p in heldout]
    # label.py's records hold out the same pairs as the reward model
    records = [{"id": p.id} for p in items]
    assert [r["id"] for r in common.heldout_split(records, 0.1, 0, key=lambda r: r["id"])[1]] == [
        p.id for p in heldout
    ]


# ----------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------
def test_padding_helpers_and_response_index():
    ids, mask = common.pad_left([[5, 6], [7, 8, 9]], pad_value=0)
    assert ids.tolist() == [[0, 5, 6], [7, 8, 9]] and mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert common.position_ids_from_mask(mask).tolist() == [[0, 0, 1], [0, 1, 2]]
    response_mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]])
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    assert common.gather_response(values, response_mask).tolist() == [[2.0, 3.0], [7.0, 8.0]]
    response_mask = torch.tensor([[0, 1, 0, 0], [0, 1, 1, 1]])
    assert common.gather_response(values, response_mask).tolist() == [
        [2.0, 0.0, 0.0],
        [6.0, 7.0, 8.0],
    ]
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert common.masked_mean(x, torch.tensor([0, 1, 1, 0])).item() == 2.5
    assert common.masked_mean(x, torch.zeros(4)).item() == 0.0
    qr, am, rm = common.collate_right([([1, 2, 3], [4, 5]), ([6], [7, 8, 9])], pad_id=0)
    assert qr.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]] and am.tolist() == [
        [1] * 5,
        [1, 1, 1, 1, 0],
    ]
    assert rm.tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0]]


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_prompt_and_response_ids_are_the_ids_of_the_whole_text(which, request, splits):
    """encode_prompt + encode_response == the tokenizer's own encoding of prompt + response, for
    byte-level BPE without BOS and for a SentencePiece-style tokenizer that adds BOS and prefixes
    '▁'."""
    tokenizer = request.getfixturevalue(f"{'tiny' if which == 'gpt2' else 'llama'}_tokenizer")
    for pair in splits["test"][:30]:
        prompt_ids = common.encode_prompt(tokenizer, pair.prompt, 10_000)
        response_ids = common.encode_response(tokenizer, pair.chosen, 10_000, add_eos=False)
        assert prompt_ids + response_ids == tokenizer(pair.prompt + pair.chosen)["input_ids"]
    prompt_ids = common.encode_prompt(tokenizer, "\n\nHuman: " + "word " * 50 + "\n\nAssistant:", 8)
    assert len(prompt_ids) == 8 and prompt_ids[
        : len(common.bos_prefix(tokenizer))
    ] == common.bos_prefix(tokenizer)
    response_ids = common.encode_response(tokenizer, " a b c d e f", 4)
    assert len(response_ids) == 4 and response_ids[-1] == tokenizer.eos_token_id


def test_bos_once_and_no_stray_word_boundary_with_a_legacy_sentencepiece_tokenizer(llama_tokenizer):
    tokenizer = llama_tokenizer
    assert common.bos_prefix(tokenizer) == [tokenizer.bos_token_id]
    prompt_ids = common.encode_prompt(tokenizer, "\n\nHuman: Hi\n\nAssistant:", 100)
    assert prompt_ids[0] == tokenizer.bos_token_id and prompt_ids.count(tokenizer.bos_token_id) == 1
    # a template's BOS
    assert common.encode_prompt(tokenizer, "<s>\n\nHuman: Hi\n\nAssistant:", 100) == prompt_ids
    alone = tokenizer(" Hello there", add_special_tokens=False)["input_ids"]
    # the stray boundary this layout puts in front
    assert tokenizer.convert_ids_to_tokens(alone)[0] == "▁"
    ids = common.encode_response(tokenizer, " Hello there", 100, add_eos=False)
    assert ids == alone[1:] and tokenizer.convert_ids_to_tokens(ids)[0] != "▁"


def test_gpt2_tokenizer_adds_no_bos(tiny_tokenizer):
    assert common.bos_prefix(tiny_tokenizer) == []
    assert common.encode_prompt(tiny_tokenizer, "\n\nHuman: Hi\n\nAssistant:", 100) == \
        tiny_tokenizer("\n\nHuman: Hi\n\nAssistant:")["input_ids"]


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_chat_template_renders_message_data_and_only_message_data(llama_dir):
    tokenizer = hf_models.load_tokenizer(llama_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    messages = [{"role": "user", "content": "What is 2+2?"}]
    pair = common.Pair(common.transcript(messages), " 4", " 5", messages)
    text = common.prompt_text(tokenizer, pair.prompt, pair.messages)
    assert text == "<s><|user|>What is 2+2?</s><|assistant|>"
    assert common.response_text(tokenizer, pair.chosen, pair.messages) == "4"
    ids = common.encode_prompt(tokenizer, text, 100)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1  # BOS once
    # --no-chat-template, and hh-rlhf transcripts (no messages), stay transcripts
    assert (
        common.prompt_text(tokenizer, pair.prompt, pair.messages, chat_template=False)
        == pair.prompt
    )
    assert common.response_text(tokenizer, pair.chosen, pair.messages, chat_template=False) == " 4"
    assert (
        common.prompt_text(tokenizer, "\n\nHuman: q\n\nAssistant:", None)
        == "\n\nHuman: q\n\nAssistant:"
    )


def test_eos_ids_include_the_generation_config_list(tiny_dir):
    tokenizer, model = hf_models.load_tokenizer(tiny_dir), hf_models.load_policy(tiny_dir)
    assert common.eos_token_ids(tokenizer, model) == [tokenizer.eos_token_id]
    # as Llama 3 instruct lists two
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, 7, 9]
    assert common.eos_token_ids(tokenizer, model) == [tokenizer.eos_token_id, 7, 9]


# ----------------------------------------------------------------------------------------------
# hh-rlhf download
# ----------------------------------------------------------------------------------------------
class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves one gzip file; the first request is cut off half way (a broken download)."""

    payload = b""
    requests_seen = []

    def do_GET(self):
        self.requests_seen.append(self.headers.get("Range"))
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            self.send_response(206)
        else:
            self.send_response(200)
        body = self.payload[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if len(self.requests_seen) == 1:
            self.wfile.write(body[: len(body) // 2])  # then drop the connection
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_download_resumes_a_broken_transfer_and_writes_atomically(tmp_path, monkeypatch):
    rows = [
        {
            "chosen": f"\n\nHuman: q{i}\n\nAssistant: yes {i}",
            "rejected": f"\n\nHuman: q{i}\n\nAssistant: no",
        }
        for i in range(20000)
    ]
    payload = gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())
    _RangeHandler.payload, _RangeHandler.requests_seen = payload, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HH_RLHF_URL", f"http://127.0.0.1:{server.server_port}")
        pairs = common.load_pairs(plumbing.data_paths("hh-rlhf:harmless-base", cache_dir=tmp_path))
    finally:
        server.shutdown()
    assert len(pairs) == 20000
    assert _RangeHandler.requests_seen[0] is None and _RangeHandler.requests_seen[1].startswith(
        "bytes="
    )
    target = tmp_path / "hh-rlhf" / "harmless-base" / "train.jsonl.gz"
    assert target.read_bytes() == payload
    assert not list(target.parent.glob("*.part"))
    # cached: a second load makes no request
    n = len(_RangeHandler.requests_seen)
    assert (
        len(common.load_pairs(plumbing.data_paths("hh-rlhf:harmless-base", cache_dir=tmp_path)))
        == 20000
    )
    assert len(_RangeHandler.requests_seen) == n


def test_every_stage_renders_a_chat_prompt_the_same_way(llama_dir, tmp_path):
    """Chat-message data and a tokenizer with a chat template: SFT, the labels (and so the
    discriminator), the reward model, PPO and eval all feed the model the same prompt ids, rendered
    with the template (BOS once); --no-chat-template gives the hh-rlhf transcript in every stage
    alike."""
    import discriminator

    tokenizer = hf_models.load_tokenizer(llama_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(tmp_path / "tok")
    user = {"role": "user", "content": "How do I stay safe online?"}
    row = {"chosen": [user, {"role": "assistant", "content": "Use strong passwords."}],
           "rejected": [user, {"role": "assistant", "content": "Who cares."}]}
    data = tmp_path / "pairs.jsonl"
    write_jsonl(data, [row] * 1)
    [pair] = common.load_pairs(data)
    for template in (True, False):
        flag = [] if template else ["--no-chat-template"]
        sft_args = sft.parse_args(["--data", str(data), *flag])
        sft_prompt = sft.encode_examples([pair], tokenizer, sft_args)[0][0]
        rm_prompt = redistribute.encode_pairs([pair], tokenizer, 256, 256, template)[0]["prompt"]
        records, _ = label.label_pairs([pair], {pair.id: pair.chosen}, tokenizer,
                                       chat_template=template, progress=False)
        records[0]["_where"] = "x"
        disc_prompt = discriminator.encode_records(records, tokenizer)[0][0]
        ppo_args = ppo_token.parse_args(
            [
                "--policy", "p", "--out", "o", "--reward", "seq", "--reward-model", "r",
                "--data", str(data), "--split", "all", *flag,
            ]
        )
        ppo_prompt = ppo_setup.load_prompts(ppo_args, tokenizer, quiet=True)[0]
        expected = (
            tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
            if template
            else "\n\nHuman: How do I stay safe online?\n\nAssistant:"
        )
        assert (
            sft_prompt
            == rm_prompt
            == disc_prompt
            == ppo_prompt
            == common.encode_prompt(tokenizer, expected)
        )
        assert sft_prompt.count(tokenizer.bos_token_id) == 1
        assert records[0]["chat_template"] is template
        response = sft.encode_examples([pair], tokenizer, sft_args)[0][1]
        assert response[:-1] == common.encode_response(
            tokenizer,
            "Use strong passwords." if template else " Use strong passwords.",
            add_eos=False,
        )
