"""common.py — the ideas every stage shares; read this after the first stage file.

    data       Pair, the preference-data formats (load_pairs), the 20 / 40 / 40 + test split
               (split_pairs), held-out parts by hashing (heldout_split)
    encoding   prompt rendering (hh-rlhf transcript or the tokenizer's chat template), BOS once,
               response ids exactly as they follow a prompt (encode_prompt, encode_response)
    batches    left / right padding, position ids, where the response sits (response_index,
               gather_response), log-probs of the response tokens (response_logprobs, a chunk of
               positions at a time: token_logprobs), masked_mean
    models     ScoreModel: a transformer backbone plus one scalar per position (discriminator,
               reward model, critic)

The machinery no reader needs to study (loading models, torchrun, checkpoints, logs, HTTP) is in
plumbing/; the algorithms are written out in the stage files.
"""
from __future__ import annotations

import gzip
import hashlib
import inspect
import json
import math
import warnings
import weakref
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

REPO_ROOT = Path(__file__).resolve().parent
BUNDLED_DATA = REPO_ROOT / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
# hh-rlhf transcripts; the prompt ends with the last "Assistant:"
HUMAN_TAG, ASSISTANT_TAG = "\n\nHuman:", "\n\nAssistant:"


class InputError(Exception):
    """Bad input from the user (a file, a model, a flag): stages print it as one line and exit
    with 2."""


class DataError(InputError):
    """Bad input data; the message names the file and line."""


# ----------------------------------------------------------------------------------------------
# Data: preference pairs in the formats people have
# ----------------------------------------------------------------------------------------------
@dataclass
class Pair:
    """One preference pair. `prompt` is the hh-rlhf transcript ("\\n\\nHuman: …\\n\\nAssistant:")
    and `chosen` / `rejected` the replies that follow it (each starting with a space, as in
    hh-rlhf). `messages` holds the prompt as chat messages when the data came as such (None for
    hh-rlhf): it is rendered with the tokenizer's chat template where there is one (see
    prompt_text)."""

    prompt: str
    chosen: str
    rejected: str
    messages: list | None = None
    id: str = ""  # a stable content hash

    def __post_init__(self):
        if not self.id:
            digest = hashlib.sha256(f"{self.prompt}\x00{self.chosen}\x00{self.rejected}".encode())
            self.id = digest.hexdigest()[:16]


def split_dialogue(text: str) -> tuple[str, str]:
    """Split an hh-rlhf dialogue into (prompt, response) at the last "\\n\\nAssistant:"."""
    cut = text.rfind(ASSISTANT_TAG)
    if cut < 0:
        return "", text
    cut += len(ASSISTANT_TAG)
    return text[:cut], text[cut:]


def transcript(messages: list[dict]) -> str:
    """Chat messages as an hh-rlhf transcript ending with "\\n\\nAssistant:" (a system message
    first)."""
    tags = {"user": HUMAN_TAG, "assistant": ASSISTANT_TAG}
    text = "".join(
        m["content"] if m["role"] == "system" else f"{tags[m['role']]} {m['content']}"
        for m in messages
    )
    return text + ASSISTANT_TAG


def _messages(value, where: str, name: str) -> list[dict]:
    if not isinstance(value, list) or not all(
        isinstance(m, dict)
        and m.get("role") in ("system", "user", "assistant")
        and isinstance(m.get("content"), str)
        for m in value
    ):
        raise DataError(
            f"{where}: field {name!r} is not a list of "
            "{'role': system|user|assistant, 'content': str}"
        )
    return value


def _reply(messages: list[dict], where: str, name: str) -> str:
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise DataError(f"{where}: field {name!r} must end with exactly one assistant reply")
    return messages[0]["content"]


def row_to_pair(row, where: str) -> tuple[Pair | None, str]:
    """One data row as a Pair, or (None, reason) for a row to skip (counted by load_pairs).

    Accepted forms (one-line examples in docs/data.md):
      hh-rlhf         {"chosen": dialogue, "rejected": dialogue}: split at the last "Assistant:"
      prompt strings  {"prompt", "chosen", "rejected"} strings: a transcript prompt ending with
                      "Assistant:" (full-hh-rlhf), or else the user's message (TRL's explicit
                      prompt)
      chat messages   {"chosen": [...], "rejected": [...]} message lists sharing all but the last
                      message (UltraFeedback-binarized), or {"prompt": [...], "chosen":
                      [assistant], "rejected": [assistant]} (TRL conversational with explicit
                      prompt)
    Any form may carry an "id" string, the pair's id (default: a hash of its content). An id
    GROUP/k puts the pair in group GROUP (see pair_group).
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object")
    for key in ("chosen", "rejected"):
        if not isinstance(row.get(key), (str, list)):
            raise DataError(
                f"{where}: field {key!r} missing or not a string or a list of chat messages; "
                "a row is an hh-rlhf pair, 'prompt'/'chosen'/'rejected' strings or chat message "
                "lists"
            )
    chosen, rejected, prompt = row.get("chosen"), row.get("rejected"), row.get("prompt")
    messages = None
    if isinstance(chosen, list) and isinstance(rejected, list):  # chat messages
        chosen_messages, rejected_messages = (
            _messages(chosen, where, "chosen"),
            _messages(rejected, where, "rejected"),
        )
        if isinstance(prompt, list):
            messages = _messages(prompt, where, "prompt")
        else:
            messages, chosen_messages = chosen_messages[:-1], chosen_messages[-1:]
            if rejected_messages[:-1] != messages:
                return None, "prompts of chosen and rejected differ"
            rejected_messages = rejected_messages[-1:]
        if not messages or messages[-1]["role"] != "user":
            return None, "prompt does not end with a user message"
        prompt = transcript(messages)
        chosen = " " + _reply(chosen_messages, where, "chosen")
        rejected = " " + _reply(rejected_messages, where, "rejected")
    elif isinstance(chosen, str) and isinstance(rejected, str) and isinstance(prompt, str):
        # full-hh-rlhf: a transcript apart from its replies
        if prompt.rstrip().endswith("Assistant:"):
            prompt = prompt.rstrip()
        else:  # TRL's explicit prompt: the user's message
            messages = [{"role": "user", "content": prompt}]
            prompt = transcript(messages)
        chosen = chosen if chosen.startswith(" ") else " " + chosen
        rejected = rejected if rejected.startswith(" ") else " " + rejected
    elif isinstance(chosen, str) and isinstance(rejected, str) and prompt is None:  # hh-rlhf
        prompt, chosen = split_dialogue(chosen)
        prompt_rejected, rejected = split_dialogue(rejected)
        if prompt != prompt_rejected:
            return None, "prompts of chosen and rejected differ"
        if not prompt:
            return None, "no '\\n\\nAssistant:' turn"
    else:
        raise DataError(
            f"{where}: not a preference pair in a known format "
            "(hh-rlhf 'chosen'/'rejected' dialogues, "
            f"'prompt'/'chosen'/'rejected' strings, or chat message lists); keys {sorted(row)}"
        )
    if not chosen.strip() or not rejected.strip():
        return None, "empty response"
    pair_id = row.get("id")  # a row may name its pair (gold_samples.py does); else: a content hash
    if pair_id is not None and (not isinstance(pair_id, str) or not pair_id):
        raise DataError(f"{where}: field 'id' must be a non-empty string (or absent)")
    return Pair(prompt, chosen, rejected, messages, id=pair_id or ""), ""


def _utf8(data: bytes, path, line_no: int | None = None) -> str:
    """Decode UTF-8 (a BOM at the start is dropped), or a DataError naming the file and the line.
    A NUL byte (never in JSON text, always in a binary file) counts as not UTF-8 text too."""
    try:
        if b"\0" in data:
            nul = data.index(b"\0")
            raise UnicodeDecodeError("utf-8", data, nul, nul + 1, "NUL byte")
        return data.decode("utf-8-sig" if line_no in (None, 1) else "utf-8")
    except UnicodeDecodeError as e:
        line_no = line_no or data[: e.start].count(b"\n") + 1
        raise DataError(f"{path} line {line_no}: not UTF-8 text (a binary file, or another "
                        "encoding?)") from None


def read_rows(path):
    """(where, row) for every row of a .jsonl / .jsonl.gz / .json / .parquet file, `where` naming
    the file and the real line (blank lines counted). Unreadable files raise DataError: missing, a
    directory, not UTF-8, a broken or truncated .gz, malformed JSON."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: a directory, not a data file")
    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            try:
                import pyarrow.parquet  # optional: only needed for .parquet files
            except ImportError:
                raise DataError(
                    f"{path}: reading .parquet needs pyarrow (pip install pyarrow)"
                ) from None
            for k, row in enumerate(pyarrow.parquet.read_table(path).to_pylist(), start=1):
                yield f"{path} row {k}", row
            return
        opener = (lambda: gzip.open(path, "rb")) if name.endswith(".gz") else \
            (lambda: open(path, "rb"))
        if name.endswith((".json", ".json.gz")):
            with opener() as f:
                rows = json.loads(_utf8(f.read(), path))
            if not isinstance(rows, list):
                raise DataError(f"{path}: a .json data file must hold a list of rows")
            for k, row in enumerate(rows, start=1):
                yield f"{path} row {k}", row
            return
        with opener() as f:
            for line_no, raw in enumerate(f, start=1):  # decoded line by line: errors name it
                line = _utf8(raw, path, line_no)
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(
                            f"{path} line {line_no}: malformed JSON ({e.msg})"
                        ) from None
                    yield f"{path} line {line_no}", row
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a complete gzip file ({type(e).__name__}: {e})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: malformed JSON ({e.msg})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None


def load_pairs(paths, quiet: bool = False) -> list[Pair]:
    """Every preference pair of the given files (see row_to_pair for the formats;
    plumbing.data_paths turns --data into files). Rows that cannot be a pair (an empty response,
    chosen and rejected prompts that differ) are skipped and counted, with one warning that says how
    many and why."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    pairs, skipped = [], {}
    for path in paths:
        for where, row in read_rows(path):
            pair, reason = row_to_pair(row, where)
            if pair is None:
                skipped[reason] = skipped.get(reason, 0) + 1
            else:
                pairs.append(pair)
    source = ", ".join(str(p) for p in paths)
    if skipped and not quiet:
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
        warnings.warn(f"{source}: skipped {sum(skipped.values())} rows ({why}); kept {len(pairs)}",
                      stacklevel=2)
    if not pairs:
        raise DataError(f"{source}: no usable preference pairs")
    return pairs


def _hash_order(items: list, seed: int, key=lambda item: item.id) -> list:
    """Items sorted by a seeded hash of their id: the same order on any machine, in any file
    order."""
    return sorted(items,
                  key=lambda item: hashlib.sha256(f"{seed}:{key(item)}".encode()).hexdigest())


def split_pairs(pairs: list[Pair], seed: int = 0,
                test_fraction: float = 0.05) -> dict[str, list[Pair]]:
    """The split every stage shares: a held-out `test` part, then 20% SFT / 40% reward / 40% RL
    (TLCR).

    It depends on the pairs and on `seed` (--split-seed) only, never on a stage's own --seed, so the
    reward model never trains on evaluation prompts whatever else changes.
    """
    ordered = _hash_order(pairs, seed)
    n_test = max(1, round(len(ordered) * test_fraction))
    test, rest = ordered[:n_test], ordered[n_test:]
    n_sft, n_reward = round(len(rest) * 0.2), round(len(rest) * 0.4)
    return {
        "sft": rest[:n_sft],
        "reward": rest[n_sft : n_sft + n_reward],
        "rl": rest[n_sft + n_reward :],
        "test": test,
    }


def select_split(pairs: list[Pair], split: str, split_seed: int,
                 limit: int | None = None) -> list[Pair]:
    """One part of split_pairs (or "all"), then at most `limit` pairs: --limit never changes the
    split. Grouped pairs (ids GROUP/k, from gold_samples.py) are one split's already: "all" only."""
    if split != "all" and any("/" in pair.id for pair in pairs):
        raise DataError(f"the data holds grouped pairs (ids GROUP/k, written by gold_samples.py), "
                        f"one split's already: read them with --split all, not --split {split}")
    chosen = pairs if split == "all" else split_pairs(pairs, split_seed)[split]
    return chosen[:limit] if limit is not None else chosen


def pair_group(pair_id: str) -> str:
    """The group of a pair id: GROUP for GROUP/k, else the id itself. gold_samples.py names the
    pairs it samples for one prompt PAIR_ID/k: a held-out part keeps a prompt's pairs together."""
    return pair_id.split("/", 1)[0]


def heldout_split(items: list, fraction: float, seed: int,
                  key=lambda item: item.id) -> tuple[list, list]:
    """(train, heldout): the `fraction` of groups (pair_group of each id; a plain id is its own
    group) with the smallest seeded hash are held out, at least one when fraction > 0 and there are
    two groups, so no prompt of a held-out pair is trained on. The reward model and the
    discriminator call it on the same split with the same seed: they hold out the same pairs."""
    groups = _hash_order(sorted({pair_group(key(item)) for item in items}), seed, key=lambda g: g)
    n_heldout = 0 if fraction <= 0 or len(groups) < 2 else max(1, round(len(groups) * fraction))
    rank = {group: k for k, group in enumerate(groups)}
    # items of held-out groups first (a stable sort: in hash order within a group)
    ordered = sorted(_hash_order(items, seed, key), key=lambda item: rank[pair_group(key(item))])
    cut = sum(rank[pair_group(key(item))] < n_heldout for item in items)
    return ordered[cut:], ordered[:cut]


def global_batch(examples: list, step: int, batch_size: int, seed: int) -> list:
    """The examples of optimizer step `step`: a fresh seeded permutation every epoch.

    Every rank computes the same global batch, so a run resumed at any step sees exactly the
    data an uninterrupted run would, and 1 process or N processes see the same data.
    """
    per_epoch = max(1, len(examples) // batch_size)
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(len(examples),
                           generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return [examples[i] for i in order[index * batch_size: (index + 1) * batch_size].tolist()]


# ----------------------------------------------------------------------------------------------
# Encoding: the ids every stage feeds the model, built one way
# ----------------------------------------------------------------------------------------------
def uses_chat_template(tokenizer, pair_messages, enabled: bool = True) -> bool:
    """The chat template renders a prompt when the data came as chat messages, the tokenizer has a
    template and --no-chat-template was not given; otherwise the hh-rlhf transcript does."""
    return bool(enabled and pair_messages and getattr(tokenizer, "chat_template", None))


def prompt_text(tokenizer, prompt: str, messages: list | None, chat_template: bool = True) -> str:
    """The prompt as the model reads it: the chat template with the generation prompt appended
    ("<|im_start|>assistant\\n", "[/INST]", …) or the transcript ending with "\\n\\nAssistant:"."""
    if uses_chat_template(tokenizer, messages, chat_template):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt


def response_text(tokenizer, response: str, messages: list | None,
                  chat_template: bool = True) -> str:
    """The reply as it follows prompt_text: after a chat template it has no leading space (a
    transcript reply starts with one, after "Assistant:")."""
    return (
        response.removeprefix(" ")
        if uses_chat_template(tokenizer, messages, chat_template)
        else response
    )


_prefix_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def bos_prefix(tokenizer) -> list[int]:
    """The ids a tokenizer puts before any text (BOS for Llama, Mistral, OPT; none for GPT-2,
    Qwen)."""
    if tokenizer not in _prefix_cache:
        marked = tokenizer("a", add_special_tokens=True)["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        starts = [
            k for k in range(len(marked) - len(plain) + 1) if marked[k : k + len(plain)] == plain
        ]
        _prefix_cache[tokenizer] = marked[:starts[0]] if starts else []
    return _prefix_cache[tokenizer]


def encode_prompt(tokenizer, text: str, max_len: int = 256) -> list[int]:
    """Prompt ids, starting as the tokenizer starts any text (its BOS, once: a chat template that
    writes BOS itself is not given a second), left-truncated to max_len (the last turns matter
    most)."""
    prefix = bos_prefix(tokenizer)
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    if prefix and body[:len(prefix)] == prefix:
        body = body[len(prefix):]
    keep = max(max_len - len(prefix), 1)
    return prefix + body[-keep:]


def encode_prompts(tokenizer, pairs, max_len: int = 256, chat_template: bool = True,
                   repeat: int = 1) -> list[list[int]]:
    """Each pair's prompt as the model reads it (prompt_text, then encode_prompt), `repeat` times
    in a row: the prompts generate samples from (PPO, eval, gold_samples.py)."""
    return [encode_prompt(tokenizer, prompt_text(tokenizer, p.prompt, p.messages, chat_template),
                          max_len) for p in pairs for _ in range(repeat)]


RESPONSE_ANCHOR = "\n"  # tokenised in front of a response and then dropped (see response_encodings)


def response_encodings(tokenizer,
                       texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(ids, character offsets) of each response, as the response's tokens are when it follows a
    prompt.

    A SentencePiece tokenizer in its "legacy" layout (Llama, Mistral) puts a word-boundary '▁' in
    front of every text it tokenises, so a response tokenised alone would start with a stray '▁'
    token it never has after a prompt. Tokenising it behind a fixed anchor and dropping the anchor's
    ids avoids that; byte-level BPE (GPT-2, Llama 3, Qwen) gives the same ids either way. When the
    anchor merges with the text (a response starting with a newline, say) the plain tokenisation is
    used.
    """
    anchor = tokenizer(RESPONSE_ANCHOR, add_special_tokens=False)["input_ids"]
    joint = tokenizer([RESPONSE_ANCHOR + t for t in texts], add_special_tokens=False,
                      return_offsets_mapping=True)
    plain = None
    out = []
    for k, (ids, offsets) in enumerate(zip(joint["input_ids"], joint["offset_mapping"])):
        if ids[:len(anchor)] == anchor:
            shift = len(RESPONSE_ANCHOR)
            out.append(
                (
                    ids[len(anchor) :],
                    [(max(a - shift, 0), b - shift) for a, b in offsets[len(anchor) :]],
                )
            )
        else:
            if plain is None:
                plain = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
            out.append((plain["input_ids"][k], [tuple(o) for o in plain["offset_mapping"][k]]))
    return out


def encode_response(tokenizer, text: str, max_len: int = 256, add_eos: bool = True) -> list[int]:
    """Response ids (see response_encodings), cut to max_len, EOS appended (within max_len) if
    add_eos."""
    ids = response_encodings(tokenizer, [text])[0][0]
    ids = ids[: max_len - (1 if add_eos else 0)]
    return ids + [tokenizer.eos_token_id] if add_eos else ids


def eos_token_ids(tokenizer, model=None) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and any the model's generation_config
    lists (Llama 3 instruct stops at <|eot_id|> as well as <|end_of_text|>)."""
    ids = [tokenizer.eos_token_id]
    config_ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in ([config_ids] if isinstance(config_ids, int) else (config_ids or [])):
        if i not in ids:
            ids.append(i)
    return ids


# ----------------------------------------------------------------------------------------------
# Batches: padding, positions, where the response sits, log-probs
# ----------------------------------------------------------------------------------------------
def pad_right(seqs: list[list[int]], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a list of id lists. Returns ids [B, T] and mask [B, T] (1 = real token)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def pad_left(seqs: list[list[int]], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad a list of id lists (prompts for generation). Returns ids [B, T] and mask [B, T]."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def collate_right(examples: list[tuple[list[int], list[int]]], pad_id: int):
    """(prompt ids, response ids) rows -> query_response, attention_mask, response_mask, all [B, T],
    right-padded: the layout of every supervised stage (SFT, discriminator, reward model)."""
    query_response, attention_mask = pad_right([p + r for p, r in examples], pad_id)  # [B, T]
    response_mask = torch.zeros_like(attention_mask)
    for i, (prompt_ids, response_ids) in enumerate(examples):
        response_mask[i, len(prompt_ids): len(prompt_ids) + len(response_ids)] = 1
    return query_response, attention_mask, response_mask


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on the first real token, for left- or right-padded rows."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_index(response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each row's response sits. response_mask [B, T] marks one contiguous run per row.

    Returns index [B, T_resp] (position in T of the row's j-th response token, clamped inside
    the row) and valid [B, T_resp] (1 where j < that row's response length). T_resp is the
    longest response. Works for left-padded prompts and right-padded batches alike.
    """
    response_mask = response_mask.long()
    lengths = response_mask.sum(-1)  # [B]
    t_resp = max(int(lengths.max()), 1)
    start = response_mask.argmax(-1)  # first response position, [B]
    offsets = torch.arange(t_resp, device=response_mask.device)
    index = (start[:, None] + offsets[None]).clamp(max=response_mask.shape[1] - 1)  # [B, T_resp]
    valid = (offsets[None] < lengths[:, None]).long()  # [B, T_resp]
    return index, valid


def gather_response(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """values [B, T] -> [B, T_resp]: each row's values at its response tokens, left-aligned, 0
    after."""
    index, valid = response_index(response_mask)
    return values.gather(1, index) * valid.to(values.dtype)


def logits_to_keep(model, n: int) -> dict:
    """Ask for the logits of the last n positions only, where the model supports it (saves
    [B, P, V])."""
    forward = getattr(model, "module", model).forward
    return (
        {"logits_to_keep": n} if "logits_to_keep" in inspect.signature(forward).parameters else {}
    )


# The fp32 work of one chunk of positions in token_logprobs: rows × V × 4 bytes, a few such tensors
# alive at once (the chunk's logits, exp(z − log Z), their product). 64 MiB holds 128 positions of
# Llama 3's 128,256-token vocabulary, 333 of GPT-2's 50,257.
CHUNK_BYTES = 64 * 2**20


def chunk_positions(vocab: int, chunk_bytes: int | None = None) -> int:
    """Positions per chunk: as many rows of `vocab` fp32 values as fit chunk_bytes (at least 1)."""
    return max(1, (CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // (4 * vocab))


class _TokenLogprobs(torch.autograd.Function):
    """log p(a) and H(p) of chosen rows of a logits matrix, computed a chunk of rows at a time, in
    the forward and in the backward: nothing of size rows × V is kept or built but one chunk (and
    the gradient of the logits themselves, which the LM head's backward reads).

    With z = logits / τ, log Z = logsumexp(z), p = exp(z − log Z):
        log p(a) = z_a − log Z                      d/dz_k = δ_ka − p_k
        H        = log Z − Σ_k p_k z_k              d/dz_k = −p_k (z_k − log Z + H)
    and d/dlogits = d/dz / τ.
    """

    @staticmethod
    def forward(ctx, logits, rows, tokens, temperature, with_entropy, chunk):
        # logits [N0, V] (the model's dtype), rows [N] (which rows), tokens [N] (a in each row)
        logprobs = torch.empty(rows.shape[0], dtype=torch.float32, device=logits.device)  # [N]
        log_norm, entropy = torch.empty_like(logprobs), torch.zeros_like(logprobs)
        for s in range(0, rows.shape[0], chunk):
            z = logits.index_select(0, rows[s:s + chunk]).float() / temperature  # [c, V] fp32
            log_norm[s:s + chunk] = z.logsumexp(-1)
            logprobs[s:s + chunk] = z.gather(-1, tokens[s:s + chunk, None]).squeeze(-1) \
                - log_norm[s:s + chunk]
            if with_entropy:
                p = (z - log_norm[s:s + chunk, None]).exp_()  # softmax  [c, V]
                entropy[s:s + chunk] = log_norm[s:s + chunk] - (p.mul_(z)).sum(-1)
        ctx.save_for_backward(logits, rows, tokens, log_norm, entropy)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.set_materialize_grads(False)  # an output not used downstream: its gradient is None
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, rows, tokens, log_norm, entropy = ctx.saved_tensors
        temperature, chunk = ctx.temperature, ctx.chunk
        grad = torch.zeros_like(logits)  # [N0, V]; rows never read get 0
        for s in range(0, rows.shape[0], chunk):
            z = logits.index_select(0, rows[s:s + chunk]).float() / temperature  # [c, V]
            p = (z - log_norm[s:s + chunk, None]).exp()  # [c, V]
            g = torch.zeros_like(z)
            if grad_logprobs is not None:  # Σ_rows g_lp · (δ_ka − p)
                g_lp = grad_logprobs[s:s + chunk, None].float()  # [c, 1]
                g.sub_(p * g_lp).scatter_add_(-1, tokens[s:s + chunk, None], g_lp)
            if grad_entropy is not None:  # Σ_rows g_H · (−p (z − log Z + H))
                g_h = grad_entropy[s:s + chunk, None].float()
                shift = entropy[s:s + chunk, None] - log_norm[s:s + chunk, None]
                g.sub_(p.mul_(z.add_(shift)).mul_(g_h))
            grad.index_add_(0, rows[s:s + chunk], (g / temperature).to(grad.dtype))
        return grad, None, None, None, None, None


def token_logprobs(logits: torch.Tensor, before: torch.Tensor, tokens: torch.Tensor,
                   valid: torch.Tensor, temperature: float = 1.0, with_entropy: bool = False,
                   chunk_bytes: int | None = None):
    """log softmax(logits / τ)[a] and the entropy H at chosen columns, [B, T_resp] each (0 where
    `valid` is 0), computed chunk by chunk (_TokenLogprobs): the extra memory is one chunk of
    chunk_positions(V) positions in fp32, never B·T_resp·V, in the forward and in the backward.

    logits [B, K, V] (any float dtype: upcast to fp32 a chunk at a time), before [B, T_resp] the
    column of logits that predicts token a_j, tokens [B, T_resp] = a_j. Entropy is None unless
    asked.
    """
    B, K, V = logits.shape
    flat = logits.reshape(B * K, V)  # a view (a model's logits are contiguous)
    picked = valid.bool()  # [B, T_resp]: only real response positions are computed
    rows = (torch.arange(B, device=logits.device)[:, None] * K + before)[picked]  # [N]
    # [N], [N]
    logprobs, entropy = _TokenLogprobs.apply(flat, rows, tokens[picked], temperature, with_entropy,
                                             chunk_positions(V, chunk_bytes))
    out = torch.zeros(B, before.shape[1], dtype=logprobs.dtype, device=logits.device)
    out_logprobs = out.index_put((picked,), logprobs)  # [B, T_resp], 0 past each row's end
    return out_logprobs, out.index_put((picked,), entropy) if with_entropy else None


def response_logprobs(model, query_response: torch.Tensor, attention_mask: torch.Tensor,
                      response_mask: torch.Tensor, temperature: float = 1.0,
                      with_entropy: bool = False):
    """log π(a_j | x, a_<j) of every response token, [B, T_resp] left-aligned like gather_response
    (0 past each row's end), and the policy's entropy at those positions [B, T_resp] if asked (else
    None).

    The logits at column P+j−1 predict response token a_j at column P+j, so we read each row one
    column before its response tokens. Only the logits from the earliest response column on are
    computed (logits_to_keep). Logits are divided by the sampling temperature, as when they were
    sampled. The model's own forward (its LM head, any soft-capping) makes the logits [B, K, V] in
    its compute dtype; the fp32 log-softmax and entropy over V are then taken a chunk of positions
    at a time (token_logprobs), so nothing more of size B·K·V is made, in the forward or the
    backward.
    """
    index, valid = response_index(response_mask)  # [B, T_resp]
    # columns first_response − 1 … T − 1
    keep = query_response.shape[1] - int(index[:, 0].min()) + 1
    logits = model(input_ids=query_response, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                   **logits_to_keep(model, keep)).logits  # [B, keep or T, V]
    offset = query_response.shape[1] - logits.shape[1]  # column of logits[:, 0]
    before = (index - 1 - offset).clamp(min=0)  # column P+j−1, which predicts a_j  [B, T_resp]
    tokens = query_response.gather(1, index)  # a_j  [B, T_resp]
    return token_logprobs(logits, before, tokens, valid, temperature, with_entropy)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Every dropout probability to 0: RL and scoring must be deterministic functions of the
    input."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of `values` where mask is 1; 0 (not NaN) where the mask is empty."""
    mask = mask.to(values.dtype)
    total = (values * mask).sum() if dim is None else (values * mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1)


# ----------------------------------------------------------------------------------------------
# Models: one scalar per position
# ----------------------------------------------------------------------------------------------
class ScoreModel(nn.Module):
    """A transformer backbone plus a linear head giving one scalar per position.

    One class serves three roles: the TLCR discriminator (scalar = logit of "this token is good"),
    the Bradley–Terry reward model (scalar read at the last token) and the PPO critic (value).
    `forward` returns scores [B, T]; the score at position t has seen tokens 0..t (causal).
    A fresh head starts small (std 1/√(H+1)) with zero bias, so its first scores are near 0. The
    reward model's head has no bias (the Bradley–Terry loss cannot see one; the standard sequence
    classifier has none); the discriminator's has one (its logits are absolute: 0 means D = ½).
    """

    def __init__(self, backbone: nn.Module, bias: bool = True):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.head = nn.Linear(hidden, 1, bias=bias)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(hidden + 1))
        if bias:
            nn.init.zeros_(self.head.bias)

    @property
    def config(self):
        return self.backbone.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                head: nn.Linear | None = None) -> torch.Tensor:
        """Scores [B, T]; `head` reads the hidden states instead of self.head (with LoRA, PPO's
        critic and the frozen reward model share one backbone: ppo_token.py)."""
        head = self.head if head is None else head
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids_from_mask(attention_mask),
                               use_cache=False).last_hidden_state  # [B, T, H]
        # the head in its own dtype (fp32), not bf16: a score keeps its small differences
        with torch.autocast(hidden.device.type, enabled=False):
            return head(hidden.to(head.weight.dtype)).squeeze(-1)  # [B, T]
