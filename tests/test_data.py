"""common.py data plumbing: parsing real and malformed hh-rlhf rows, the split, the download."""
import gzip
import http.server
import json
import threading
import warnings

import pytest
import torch

import common


def write_jsonl(path, rows, raw_lines=()):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        for line in raw_lines:
            f.write(line + "\n")


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
    assert "4 empty response" in messages[0] and "5 prompts of chosen and rejected differ" in messages[0]
    assert len(pairs) == 2312 - 9
    for pair in pairs:
        assert pair.prompt.endswith("\n\nAssistant:")
        assert pair.chosen.strip() and pair.rejected.strip()


def test_both_forms_and_skips(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [
        {"chosen": "\n\nHuman: q\n\nAssistant: good", "rejected": "\n\nHuman: q\n\nAssistant: bad"},
        {"chosen": "\n\nHuman: q\n\nAssistant: ", "rejected": "\n\nHuman: q\n\nAssistant: bad"},  # empty
        {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},  # prompts differ
        {"prompt": "\n\nHuman: q2\n\nAssistant:", "chosen": "yes", "rejected": " no"},  # full-hh-rlhf form
    ])
    with pytest.warns(UserWarning, match=r"skipped 2 rows \(1 empty response, 1 prompts of chosen and rejected differ\)"):
        pairs = common.load_pairs(path)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("\n\nHuman: q\n\nAssistant:", " good", " bad"),
        ("\n\nHuman: q2\n\nAssistant:", " yes", " no"),
    ]


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [{"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}],
                raw_lines=['{"chosen": "unterminated'])
    with pytest.raises(common.DataError, match=r"bad.jsonl line 2: malformed JSON"):
        common.load_pairs(path)


def test_missing_field_names_file_and_row(tmp_path):
    path = tmp_path / "missing.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"chosen": "\n\nHuman: q\n\nAssistant: a"}) + "\n")
    with pytest.raises(common.DataError, match=r"missing.jsonl.gz row 1: field 'rejected' missing"):
        common.load_pairs(path)


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


def test_padding_helpers_and_response_index():
    ids, mask = common.pad_left([[5, 6], [7, 8, 9]], pad_value=0)
    assert ids.tolist() == [[0, 5, 6], [7, 8, 9]] and mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert common.position_ids_from_mask(mask).tolist() == [[0, 0, 1], [0, 1, 2]]
    response_mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]])
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    assert common.gather_response(values, response_mask).tolist() == [[2.0, 3.0], [7.0, 8.0]]
    response_mask = torch.tensor([[0, 1, 0, 0], [0, 1, 1, 1]])
    assert common.gather_response(values, response_mask).tolist() == [[2.0, 0.0, 0.0], [6.0, 7.0, 8.0]]
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert common.masked_mean(x, torch.tensor([0, 1, 1, 0])).item() == 2.5
    assert common.masked_mean(x, torch.zeros(4)).item() == 0.0


def test_encode_response_ids_are_the_same_alone_and_inside(tiny_tokenizer, splits):
    for pair in splits["test"][:20]:
        prompt_ids, response_ids = common.encode_prompt_response(tiny_tokenizer, pair.prompt, pair.chosen,
                                                                 10_000, 10_000, add_eos=False)
        joint = tiny_tokenizer(pair.prompt + pair.chosen, add_special_tokens=False)["input_ids"]
        assert joint == prompt_ids + response_ids
    _, response_ids = common.encode_prompt_response(tiny_tokenizer, "\n\nHuman: q\n\nAssistant:", " a b c d e f",
                                                    8, 4)
    assert len(response_ids) == 4 and response_ids[-1] == tiny_tokenizer.eos_token_id


def test_checkpoint_round_trip_restores_weights_optimizer_and_rng(tmp_path, tiny_dir):
    model = common.load_policy(tiny_dir)
    optimizer = common.adamw(model, 1e-3)
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    optimizer.step()
    torch.manual_seed(123)
    common.save_checkpoint(tmp_path / "ckpt", {"model": model}, {"optimizer": optimizer.state_dict(), "step": 7})
    expected_draw = torch.rand(3)
    fresh = common.load_policy(tiny_dir)
    state = common.load_checkpoint(tmp_path / "ckpt", {"model": fresh})
    assert state["step"] == 7
    assert torch.equal(torch.rand(3), expected_draw)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    assert common.load_checkpoint(tmp_path / "nothing", {"model": fresh}) is None


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
    rows = [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: yes {i}", "rejected": f"\n\nHuman: q{i}\n\nAssistant: no"}
            for i in range(20000)]
    payload = gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())
    _RangeHandler.payload, _RangeHandler.requests_seen = payload, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HH_RLHF_URL", f"http://127.0.0.1:{server.server_port}")
        pairs = common.load_pairs("hh-rlhf:harmless-base", cache_dir=tmp_path)
    finally:
        server.shutdown()
    assert len(pairs) == 20000
    assert _RangeHandler.requests_seen[0] is None and _RangeHandler.requests_seen[1].startswith("bytes=")
    target = tmp_path / "hh-rlhf" / "harmless-base" / "train.jsonl.gz"
    assert target.read_bytes() == payload
    assert not list(target.parent.glob("*.part"))
    # cached: a second load makes no request
    n = len(_RangeHandler.requests_seen)
    assert len(common.load_pairs("hh-rlhf:harmless-base", cache_dir=tmp_path)) == 20000
    assert len(_RangeHandler.requests_seen) == n
