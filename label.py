"""TLCR stage 1: token-level preference labels from minimal revisions.

For every preference pair (prompt x, chosen y_c, rejected y_r) a reviser rewrites y_r with minimal
edits into y_m, having seen x and y_c and said why y_c is better. y_r and y_m are tokenised with the
policy's tokenizer and aligned by a Levenshtein DP over token ids; its edit script gives the labels
(TLCR §3.1; the discriminator learns them with eq. 6, targets 0 / 0.5 / 1):
    rejected token deleted or substituted  -> -1 (negative), otherwise 0 (neutral)
    revised token inserted or substituted  -> +1 (positive), otherwise 0 (neutral)

Revisers (--reviser): `openai`, any OpenAI-compatible chat-completions endpoint (the paper used
gpt-4-0125-preview; a local vLLM / llama.cpp / Ollama server works the same); `hf`, a local Hugging
Face model with batched generation; `gold`, the offline lab's rule reviser (gold.py: the minimal
edit that raises the known gold score; with --preference gold the pairs are first ranked by that
score); `chosen`, no model at all: y_m = y_c (most tokens then count as edited, so the labels are
much noisier than the paper's).

    # the offline lab: a known gold reward and its rule reviser (CPU, seconds)
    python label.py --reviser gold --preference gold --tokenizer runs/lab/sft \\
        --out runs/lab/labels.jsonl
    # offline, no model at all
    python label.py --reviser chosen --tokenizer runs/demo/sft --out runs/demo/labels.jsonl
    # the paper's reviser; the key is read from OPENAI_API_KEY and never written anywhere
    python label.py --reviser openai --api-model gpt-4-0125-preview --concurrency 8 \\
        --tokenizer runs/demo/sft --out runs/demo/labels.jsonl
    # a local OpenAI-compatible server (no key needed on localhost)
    python label.py --reviser openai --api-base http://localhost:8000/v1 \\
        --api-model Qwen/Qwen2.5-7B-Instruct ...
    # a Hugging Face model on one GPU
    python label.py --reviser hf --reviser-model Qwen/Qwen2.5-7B-Instruct \\
        --reviser-batch-size 16 ...

No torchrun: the reviser runs concurrently (API) or batched (hf). Every reviser answer, parsed or
not, is appended to <out>.cache.jsonl as it arrives (so a killed run started again asks only for the
pairs still missing, and the raw answers of pairs that could not be parsed can be read there). A
rerun asks again for transient failures (network, timeout, 429, 5xx), not for answers that came back
and could not be used, unless --retry-failed: at temperature 0 they would come back the same.
Outputs: <out> (JSONL, one record per labelled pair: id, prompt, messages, chat_template, tokenizer,
chosen, rejected, revised, rejected_ids, revised_ids, rejected_labels, revised_labels, distance; ids
are the response tokens without EOS, cut to --max-response-len − 1 like common.encode_response) and
<out>.summary.json, both written atomically. A run that labels no pair exits with code 1.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import hashlib
import json
import multiprocessing as mp
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import common
import gold
import plumbing
from plumbing import amp, chat, checkpoint, distributed, hf_models

DELIMITER = "### REVISED RESPONSE ###"
DELIMITER_LINE = re.compile(r"^[ \t*_#]*REVISED RESPONSE[ \t*_#:]*$", re.IGNORECASE | re.MULTILINE)
REVISER_PROMPT = (
    "Below is a conversation between a human and an AI assistant, then two candidate final replies "
    "of the assistant. Human raters preferred reply A to reply B.\n"
    "\n"
    "=== Conversation ===\n"
    "{prompt}\n"
    "\n"
    "=== Reply A (preferred) ===\n"
    "{chosen}\n"
    "\n"
    "=== Reply B (rejected) ===\n"
    "{rejected}\n"
    "\n"
    "First explain in one or two sentences why reply A is better than reply B. Then rewrite reply "
    "B with minimal edits so that it becomes as good as reply A: keep every word of reply B that "
    "can stay, and change, delete or add only what must change (do not copy reply A). Write the "
    "line\n"
    "{delimiter}\n"
    "and after it only the revised reply B, nothing else."
)
# marks a conversation cut to fit the reviser's context
DIALOGUE_CUT = "[… earlier turns cut to fit …]\n"
CELLS_PER_BATCH = 1 << 23  # DP cells per numpy batch (E in int16: 16 MiB)
ALIGN_CAP = 4  # align at most ALIGN_CAP × --max-response-len tokens per response (bounds memory)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=plumbing.HelpFormatter, epilog=__doc__)
    data = plumbing.add_data_args(parser.add_argument_group("data"), split="reward",
                                  response_len=False, prompt_len=False, preference=True)
    data.add_argument("--out", default="runs/demo/labels.jsonl",
                      help="output JSONL; <out>.cache.jsonl and <out>.summary.json beside it")
    gold.add_lexicon_arg(data, "--reviser gold or --preference gold")
    data.add_argument("--max-response-len", type=int, default=256,
                      help="keep the first N−1 tokens of each response (N with EOS, as "
                           "common.encode_response)")
    model = parser.add_argument_group("model")
    model.add_argument("--tokenizer", default="runs/demo/sft",
                       help="the policy's tokenizer (the SFT model dir)")
    model.add_argument("--layout", default="separate", choices=["separate", "joint"],
                       help="separate: ids of the response as it follows the prompt, tokenised on "
                            "its own (what every stage here feeds the model); joint: ids inside "
                            "tokenize(prompt + response), labels mapped by character offsets")
    reviser = parser.add_argument_group("algorithm (the reviser)")
    reviser.add_argument("--reviser", required=True, choices=["openai", "hf", "gold", "chosen"],
                         help="openai: chat-completions endpoint; hf: local model; gold: the lab's "
                              "rule reviser (gold.py); chosen: y_m = y_c, no model")
    reviser.add_argument("--api-base", default="https://api.openai.com/v1",
                         help="OpenAI-compatible base URL (…/v1)")
    reviser.add_argument("--api-model", default="gpt-4-0125-preview",
                         help="model name sent to the endpoint")
    reviser.add_argument("--api-key-env", default="OPENAI_API_KEY",
                         help="environment variable holding the API key (may be empty for a "
                              "localhost server)")
    reviser.add_argument("--reviser-model", default=None,
                         help="--reviser hf: Hugging Face model name or path")
    reviser.add_argument("--reviser-batch-size", type=int, default=8,
                         help="--reviser hf: prompts per generate call")
    reviser.add_argument("--reviser-max-new-tokens", type=int, default=1024,
                         help="longest reviser answer (reason + revision), tokens")
    reviser.add_argument("--reviser-max-prompt-len", type=int, default=4096,
                         help="--reviser hf: longest reviser prompt in tokens (also capped by the "
                              "model's context); a longer one keeps its instructions and replies "
                              "and cuts the conversation's first turns")
    reviser.add_argument("--temperature", type=float, default=0.0,
                         help="reviser sampling temperature (0: greedy)")
    system = plumbing.add_system_args(parser)
    system.add_argument("--concurrency", type=int, default=8,
                        help="--reviser openai: requests in flight")
    system.add_argument("--timeout", type=float, default=120.0,
                        help="--reviser openai: seconds for a whole request (connect, headers and "
                             "the full answer)")
    system.add_argument("--max-retries", type=int, default=5,
                        help="retries per pair after 429 / 5xx / timeout / connection error / "
                             "malformed or null answer / missing delimiter")
    system.add_argument("--backoff-base", type=float, default=1.0,
                        help="first retry delay, seconds (doubles each retry)")
    system.add_argument("--backoff-cap", type=float, default=60.0,
                        help="longest retry delay, seconds (Retry-After overrides)")
    system.add_argument("--retry-after-cap", type=float, default=chat.RETRY_AFTER_CAP,
                        help="longest wait a server's Retry-After may ask for, seconds "
                             "(a longer one is cut to this)")
    system.add_argument("--workers", type=int, default=1, help="processes for the alignment")
    system.add_argument("--no-resume", dest="resume", action="store_false",
                        help="ignore and overwrite <out>.cache.jsonl instead of reusing its "
                             "answers")
    system.add_argument("--retry-failed", action="store_true",
                        help="on a rerun, ask again for the pairs whose answer came back and "
                             "could not be used (no delimiter, another 4xx; paid again, and at "
                             "temperature 0 the answer is the same); transient failures (network, "
                             "timeout, 429, 5xx) are always asked again")
    args = parser.parse_args(argv)
    if args.max_response_len < 2:
        parser.error("--max-response-len must be at least 2 (one token and the EOS)")
    if args.reviser == "hf" and not args.reviser_model:
        parser.error("--reviser hf needs --reviser-model PATH_OR_NAME")
    # the lab's lexicon (gold.py), loaded once: it ranks the pairs and/or revises
    args.gold_lexicon = gold.lexicon_from_args(parser, args,
                                               args.reviser == "gold" or args.preference == "gold",
                                               "--reviser gold or --preference gold")
    plumbing.check_positive(parser, args, "concurrency", "workers", "reviser_batch_size",
                            "reviser_max_new_tokens", "reviser_max_prompt_len")
    return args


# ----------------------------------------------------------------------------------------------
# 1. The pairs to label
# ----------------------------------------------------------------------------------------------
def select_pairs(args):
    """The pairs to label: one split (--split-seed), duplicates dropped, at most --limit.
    Returns (pairs, skipped, notes)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pairs = plumbing.load_data(args.data, args.split, args.split_seed)
    notes = [str(w.message) for w in caught]
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    skipped = {}
    # the lab: chosen = the reply with the higher gold score, ties dropped
    if args.preference == "gold":
        pairs, ranked = gold.rank_pairs(pairs, lexicon=args.gold_lexicon)
        skipped["gold tie"] = ranked["ties"]
        notes.append(
            f"gold ranking: {ranked['kept']} of {ranked['pairs']} pairs kept, "
            f"{ranked['ties']} ties dropped, {ranked['flipped']} flipped against the human label"
        )
        print(notes[-1], file=sys.stderr)
    seen, unique = set(), []
    for pair in pairs:
        if pair.id in seen:
            skipped["duplicate pair"] = skipped.get("duplicate pair", 0) + 1
            continue
        seen.add(pair.id)
        unique.append(pair)
    return unique[: args.limit] if args.limit is not None else unique, skipped, notes


# ----------------------------------------------------------------------------------------------
# 2. The reviser: its prompt, reading its answer, the revisers, the cache
# ----------------------------------------------------------------------------------------------
def reviser_prompt(pair, dialogue: str | None = None) -> str:
    """The request to the reviser; `dialogue` replaces the conversation (fit_reviser_prompt cuts
    it)."""
    return REVISER_PROMPT.format(prompt=pair.prompt.strip() if dialogue is None else dialogue,
                                 chosen=pair.chosen.strip(), rejected=pair.rejected.strip(),
                                 delimiter=DELIMITER)


def fit_reviser_prompt(pair, n_tokens, max_tokens: int) -> tuple[str | None, bool]:
    """The reviser prompt within max_tokens (n_tokens(text) counts them), and whether it was cut.

    Only the conversation is cut, from its start (its last turns matter most), never the
    instructions or the two replies: a model that lost the instructions would answer without the
    delimiter. None when the prompt does not fit even with no conversation at all.
    """
    full = reviser_prompt(pair)
    if n_tokens(full) <= max_tokens:
        return full, False
    dialogue = pair.prompt.strip()
    if n_tokens(reviser_prompt(pair, DIALOGUE_CUT)) > max_tokens:
        return None, True
    keep_low, keep_high = 0, len(dialogue)  # characters kept from the end: low fits, high does not
    while keep_high - keep_low > 1:  # binary search on the characters kept
        middle = (keep_low + keep_high) // 2
        if n_tokens(reviser_prompt(pair, DIALOGUE_CUT + dialogue[-middle:])) <= max_tokens:
            keep_low = middle
        else:
            keep_high = middle
    return reviser_prompt(pair, DIALOGUE_CUT + dialogue[len(dialogue) - keep_low:]), True


def parse_revision(answer: str, rejected: str) -> str | None:
    """The text after the first delimiter line, or None if there is none or nothing follows it.

    The revision takes the rejected response's leading whitespace (hh-rlhf responses start with a
    space), so their first tokens compare like for like.
    """
    match = DELIMITER_LINE.search(answer or "")
    revised = answer[match.end():].strip() if match else ""
    if not revised:
        return None
    return rejected[: len(rejected) - len(rejected.lstrip())] + revised


def cache_key(kind: str, model: str, pair) -> str:
    return hashlib.sha256(
        json.dumps([kind, model, pair.prompt, pair.chosen, pair.rejected]).encode()
    ).hexdigest()


def revise_openai(pair, args, client: chat.ChatClient) -> tuple[str | None, str, str, int]:
    """One pair through the chat-completions endpoint, with the client's retries (chat.ChatClient:
    429, 5xx, timeouts, malformed or null answers, and answers without the delimiter are tried
    again; other 4xx fail the pair; 401/403/404 stop the run). Returns (revised or None, answer,
    error, calls); the answer and the error are scrubbed of the key."""
    reply = client.complete([{"role": "user", "content": reviser_prompt(pair)}],
                            parse=lambda answer: parse_revision(answer, pair.rejected),
                            invalid="no delimiter in answer", temperature=args.temperature,
                            max_tokens=args.reviser_max_new_tokens)
    return reply.value, reply.text or "", reply.error, reply.calls


def run_openai(todo, args, on_answer):
    """--concurrency threads send requests; answers are handed to on_answer in this thread.
    One cheap request first: a bad key, model or URL stops the run before the first pair."""
    client = chat.ChatClient(args.api_base, args.api_model,
                             chat.api_key_from_env(args.api_key_env, args.api_base),
                             key_env=args.api_key_env, timeout=args.timeout,
                             max_retries=args.max_retries, backoff_base=args.backoff_base,
                             backoff_cap=args.backoff_cap, retry_after_cap=args.retry_after_cap)
    client.check()
    checked = client.calls
    with cf.ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        futures = {pool.submit(revise_openai, pair, args, client): pair for pair in todo}
        try:
            for future in cf.as_completed(futures):
                on_answer(futures[future], *future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return checked


def run_gold(todo, args, on_answer):
    """The lab's rule reviser (gold.gold_revise): no model, one instant answer per pair; a rejected
    reply with no negative word has nothing to revise and fails."""
    for pair in todo:
        revised = gold.gold_revise(pair.rejected, lexicon=args.gold_lexicon)
        on_answer(pair, revised, revised or "", "" if revised else "no negative word to replace", 1)
    return 0


def chat_text(tokenizer, message: str) -> str:
    """The message in the model's chat template, or as plain text for a model without one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                             add_generation_prompt=True)
    return message + "\n\n"


@torch.no_grad()
def generate_texts(model, tokenizer, texts: list[str], max_new_tokens: int,
                   temperature: float) -> list[str]:
    """Batched generation from left-padded prompts (each already fits: fit_reviser_prompt); returns
    the new text of each."""
    # BOS once, template or not
    seqs = [common.encode_prompt(tokenizer, text, 10**9) for text in texts]
    input_ids, attention_mask = common.pad_left(seqs, tokenizer.pad_token_id)  # [B, T]
    device = next(model.parameters()).device
    sampling = (
        dict(do_sample=True, temperature=temperature, top_p=1.0)
        if temperature > 0
        else dict(do_sample=False)
    )
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                         max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         **sampling)
    return tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)


def run_hf(todo, args, on_answer):
    """Batches of --reviser-batch-size prompts through a local model. A prompt longer than the room
    left in the model's context has its conversation cut from the start (fit_reviser_prompt; counted
    and reported). Pairs without the delimiter are tried again only when sampling (greedy decoding
    would give the same answer)."""
    if not todo:
        return 0
    device = distributed.resolve_device(args.device)  # cuda:N honoured
    tokenizer = hf_models.load_tokenizer(args.reviser_model, args.trust_remote_code,
                                         what="--reviser-model")
    dtype = torch.bfloat16 if amp.use_bf16(args.precision, device) else torch.float32
    model = (
        hf_models.load_policy(
            args.reviser_model,
            dtype=dtype,
            trust_remote_code=args.trust_remote_code,
            what="--reviser-model",
        )
        .to(device)
        .eval()
    )
    context = getattr(model.config, "max_position_embeddings", None) or 10**9
    max_prompt_len = min(args.reviser_max_prompt_len, context - args.reviser_max_new_tokens)
    if max_prompt_len < 1:
        raise common.InputError(
            f"--reviser-max-new-tokens {args.reviser_max_new_tokens} leaves no room for the "
            f"prompt in the model's {context}-token context"
        )

    def n_tokens(text):
        return len(common.encode_prompt(tokenizer, chat_text(tokenizer, text), 10**9))

    prompts, cut = {}, 0
    for pair in todo:
        prompts[pair.id], was_cut = fit_reviser_prompt(pair, n_tokens, max_prompt_len)
        cut += was_cut and prompts[pair.id] is not None
        if prompts[pair.id] is None:
            on_answer(
                pair,
                None,
                "",
                f"the reviser prompt does not fit {max_prompt_len} tokens even without "
                "the conversation (the two replies alone are too long)",
                0,
            )
    if cut:
        print(
            f"warning: {cut} reviser prompts were longer than {max_prompt_len} tokens; "
            "their conversation was cut from the start (instructions and replies kept whole)",
            file=sys.stderr,
        )
    tries = 1 + (args.max_retries if args.temperature > 0 else 0)
    pending = [pair for pair in todo if prompts[pair.id] is not None]
    for attempt in range(tries):
        missing = []
        for start in range(0, len(pending), args.reviser_batch_size):
            batch = pending[start:start + args.reviser_batch_size]
            answers = generate_texts(model, tokenizer,
                                     [chat_text(tokenizer, prompts[p.id]) for p in batch],
                                     args.reviser_max_new_tokens, args.temperature)
            for pair, answer in zip(batch, answers):
                revised = parse_revision(answer, pair.rejected)
                if revised is None and attempt + 1 < tries:
                    missing.append(pair)
                else:
                    on_answer(pair, revised, answer, "" if revised else "no delimiter in answer",
                              attempt + 1)
        pending = missing
    return 0


def reviser_model(args) -> str | None:
    """What revises, as named in the cache key: gold, the lexicon's id (an edited lexicon never
    reuses old revisions)."""
    if args.reviser == "gold":
        return args.gold_lexicon.id
    return {"openai": args.api_model, "hf": args.reviser_model}.get(args.reviser)


def revise_all(pairs, args, cache_path: Path):
    """Revisions (id -> revised text) for every pair the reviser could do, reusing and extending
    the cache; failures (id -> error); and counts (calls made, answers reused). Every answer goes to
    the cache as it arrives, a failed one too (with its raw text and the error, so a user can read
    what the reviser said); only parsed revisions are reused by a later run."""
    if args.reviser == "chosen":
        print("warning: --reviser chosen uses the chosen response as the revision; it is rarely a "
              "minimal edit of the rejected one, so the labels mark most tokens as edited",
              file=sys.stderr)
        return {p.id: p.chosen for p in pairs}, {}, {"calls": 0, "cached": 0}
    model = reviser_model(args)
    keys = {p.id: cache_key(args.reviser, model, p) for p in pairs}
    cache = chat.JsonlCache(cache_path, fresh=not args.resume,
                            valid=lambda record: isinstance(record.get("revised"), str))
    revisions = {p.id: cache.get(keys[p.id])["revised"] for p in pairs if keys[p.id] in cache}
    failures = {}  # a rerun asks again for transient failures only, unless --retry-failed
    if not args.retry_failed:
        failures = {p.id: cache.refused[keys[p.id]].get("error", "unusable answer") for p in pairs
                    if p.id not in revisions and keys[p.id] in cache.refused
                    and not chat.transient_error(cache.refused[keys[p.id]].get("error", ""))}
    todo = [p for p in pairs if p.id not in revisions and p.id not in failures]
    counts = {"calls": 0, "cached": len(revisions), "failed_before": len(failures)}
    with cache, tqdm(total=len(todo), desc="revise", unit="pair") as bar:
        def on_answer(pair, revised, answer, error, calls):
            counts["calls"] += calls
            cache.add(
                {
                    "key": keys[pair.id],
                    "id": pair.id,
                    "reviser": args.reviser,
                    "model": model,
                    "revised": revised,
                    "answer": answer,
                    **({"error": error} if revised is None else {}),
                }
            )
            # (the client scrubbed the answer, and so the revision, of the key)
            if revised is not None:
                revisions[pair.id] = revised
            else:
                failures[pair.id] = error
            bar.update()

        if todo:
            run = {"openai": run_openai, "hf": run_hf, "gold": run_gold}[args.reviser]
            # the openai client's test request (on_answer counts the rest)
            check_calls = run(todo, args, on_answer)
            counts["calls"] += check_calls
    return revisions, failures, counts


# ----------------------------------------------------------------------------------------------
# 3. The alignment: a Levenshtein DP with backtrace over token ids, and the labels it gives
# ----------------------------------------------------------------------------------------------
def levenshtein(a: list[int], b: list[int]) -> tuple[int, list[tuple]]:
    """The edit distance turning a into b, and one shortest edit script, by the textbook DP.

    D[i][j] = the distance between a[:i] and b[:j]:
        D[i][0] = i,  D[0][j] = j
        D[i][j] = min(D[i-1][j-1] + [a[i-1] != b[j-1]],   # match (free) or substitute
                      D[i-1][j] + 1,                       # delete a[i-1]
                      D[i][j-1] + 1)                       # insert b[j-1]
    The walk back from (n, m) reads the script off the full table. Among equal-cost choices it takes
    match, then delete, then insert, then substitute: equal tokens are always matched (when
    a[i-1] == b[j-1], D[i][j] = D[i-1][j-1], a classic property of this DP), and a substitution is
    used only when no deletion or insertion is as cheap, so more tokens stay neutral.
    [5, 6] -> [6, 7] is "delete 5, match 6, insert 7", not two substitutions; a gap in a run of
    equal tokens lands on the earliest copy ([1, 1] -> [1] deletes a[0]).
    Each op is (name, i, j): ("match"|"substitute", i, j), ("delete", i, None), ("insert", None, j).
    levenshtein_batch (below, the fast version) computes the same distances and scripts.
    """
    n, m = len(a), len(b)
    D = [[0] * (m + 1) for _ in range(n + 1)]  # [n+1][m+1]
    for i in range(n + 1):
        D[i][0] = i
    for j in range(m + 1):
        D[0][j] = j
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            D[i][j] = min(D[i - 1][j - 1] + (a[i - 1] != b[j - 1]), D[i - 1][j] + 1,
                          D[i][j - 1] + 1)
    i, j, ops = n, m, []
    while i > 0 or j > 0:
        if i > 0 and j > 0 and a[i - 1] == b[j - 1]:
            i, j = i - 1, j - 1
            ops.append(("match", i, j))
        elif i > 0 and D[i][j] == D[i - 1][j] + 1:
            i -= 1
            ops.append(("delete", i, None))
        elif j > 0 and D[i][j] == D[i][j - 1] + 1:
            j -= 1
            ops.append(("insert", None, j))
        else:
            i, j = i - 1, j - 1
            ops.append(("substitute", i, j))
    ops.reverse()
    return D[n][m], ops


def labels_from_ops(ops: list[tuple], n: int, m: int) -> tuple[list[int], list[int]]:
    """TLCR labels from an edit script: rejected deleted/substituted -> -1, revised
    inserted/substituted -> +1."""
    rejected_labels, revised_labels = [0] * n, [0] * m
    for name, i, j in ops:
        if name in ("delete", "substitute"):
            rejected_labels[i] = -1
        if name in ("insert", "substitute"):
            revised_labels[j] = 1
    return rejected_labels, revised_labels


def edit_labels(rejected_ids: list[int], revised_ids: list[int]) -> tuple[list[int], list[int]]:
    """(rejected_labels, revised_labels): one label per token, -1/0 and +1/0."""
    _, ops = levenshtein(rejected_ids, revised_ids)
    return labels_from_ops(ops, len(rejected_ids), len(revised_ids))


# ----------------------------------------------------------------------------------------------
# 4. Tokenise, check the prompt/response boundary, align and label every pair
# ----------------------------------------------------------------------------------------------
def response_in_context(tokenizer, prompts: list[str], responses: list[str]):
    """Tokenise prompt + response as one text. Per row: the ids of the tokens covering the
    response's characters, and their character spans relative to the response (a token that
    straddles the boundary starts at 0). Equal to the response's own ids unless a token merges
    across the boundary (e.g. a prompt that stops mid-word)."""
    enc = tokenizer([p + r for p, r in zip(prompts, responses)], add_special_tokens=False,
                    return_offsets_mapping=True)
    rows = []
    for prompt, ids, offsets in zip(prompts, enc["input_ids"], enc["offset_mapping"]):
        cut = len(prompt)
        keep = [k for k, (_, end) in enumerate(offsets) if end > cut]
        rows.append(
            (
                [ids[k] for k in keep],
                [(max(offsets[k][0] - cut, 0), offsets[k][1] - cut) for k in keep],
            )
        )
    return rows


def map_labels_by_offsets(labels: list[int], src_spans, dst_spans, n_chars: int) -> list[int]:
    """Carry token labels from one tokenisation of a text to another through its characters.

    Each source token paints its characters with its label; a destination token takes the
    non-neutral label of any character it covers (a side's labels are all -1/0 or all +1/0), else 0.
    """
    char_labels = [0] * n_chars
    for label, (start, end) in zip(labels, src_spans):
        if label:
            char_labels[start:end] = [label] * (end - start)
    return [next((c for c in char_labels[start:end] if c), 0) for start, end in dst_spans]


def label_pairs(pairs, revisions: dict[str, str], tokenizer, layout: str = "separate",
                max_response_len: int = 256, workers: int = 1, progress: bool = True,
                chat_template: bool = True):
    """Tokenise, check the boundary, align and label every pair. Returns (records, stats).

    The response ids are common.response_encodings', the ids every stage feeds the model after the
    prompt (no stray SentencePiece '▁'); each record names the tokenizer that made them (its
    fingerprint) and whether the prompt was rendered with the chat template, so the discriminator
    reads them as they were made.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise common.InputError("label.py needs a fast (Rust) tokenizer: character offsets map "
                                "labels across the prompt/response boundary")
    keep, cap = max_response_len - 1, ALIGN_CAP * max_response_len  # keep: room for the EOS
    stats = {"boundary_mismatch": 0, "truncated": 0}
    if not pairs:
        return [], stats
    fingerprint = hf_models.tokenizer_fingerprint(tokenizer)
    templated = [common.uses_chat_template(tokenizer, p.messages, chat_template) for p in pairs]
    prompts = [common.prompt_text(tokenizer, p.prompt, p.messages, chat_template) for p in pairs]
    texts = {
        "rejected": [
            common.response_text(tokenizer, p.rejected, p.messages, chat_template) for p in pairs
        ],
        "revised": [
            common.response_text(tokenizer, revisions[p.id], p.messages, chat_template)
            for p in pairs
        ],
    }
    # [(ids, offsets)] per pair
    alone = {s: common.response_encodings(tokenizer, texts[s]) for s in texts}
    in_context = {s: response_in_context(tokenizer, prompts, texts[s]) for s in texts}
    aligned = align_all(
        [(alone["rejected"][k][0][:cap], alone["revised"][k][0][:cap]) for k in range(len(pairs))],
        workers, progress)
    records = []
    for k, pair in enumerate(pairs):
        distance, rejected_labels, revised_labels = aligned[k]
        record = {
            "id": pair.id,
            "prompt": pair.prompt,
            "messages": pair.messages,
            "chat_template": templated[k],
            "tokenizer": fingerprint,
            "chosen": pair.chosen,
            "rejected": pair.rejected,
            "revised": revisions[pair.id],
        }
        for side, labels in (("rejected", rejected_labels), ("revised", revised_labels)):
            ids, offsets = alone[side][k][0][:cap], alone[side][k][1][:cap]
            context_ids, context_spans = in_context[side][k]
            if context_ids != alone[side][k][0]:
                stats["boundary_mismatch"] += 1
                if layout == "joint":
                    labels = map_labels_by_offsets(labels, offsets, context_spans,
                                                   len(texts[side][k]))
                    ids = context_ids
            stats["truncated"] += len(ids) > keep
            record[f"{side}_ids"], record[f"{side}_labels"] = ids[:keep], labels[:keep]
        record["distance"] = distance
        records.append(record)
    return records, stats


# ----------------------------------------------------------------------------------------------
# 5. The summary
# ----------------------------------------------------------------------------------------------
def summarize(args, pairs, records, failures, skipped, notes, counts, stats, elapsed) -> dict:
    """Counts, shares of positive / negative / neutral tokens (over rejected and revised), mean
    distance."""
    rejected = np.array([v for r in records for v in r["rejected_labels"]], dtype=np.int64)
    revised = np.array([v for r in records for v in r["revised_labels"]], dtype=np.int64)
    both = np.concatenate([rejected, revised])

    def share(values, label):
        return round(float((values == label).mean()), 4) if values.size else 0.0

    reasons = {}
    for error in failures.values():
        reasons[error.split(":")[0]] = reasons.get(error.split(":")[0], 0) + 1
    return {
        "reviser": args.reviser,
        "reviser_model": reviser_model(args),
        "preference": args.preference,
        "lexicon": args.gold_lexicon.id if args.gold_lexicon else None,  # the lab's gold
        "data": args.data,
        "split": args.split,
        "layout": args.layout,
        "max_response_len": args.max_response_len,
        "pairs": len(pairs),
        "done": len(records),
        "failed": len(failures),
        "failure_reasons": reasons,
        "skipped": skipped,
        "load_warnings": notes,
        "failures": [{"id": pid, "error": err} for pid, err in failures.items()],
        "tokens": {
            "positive": share(both, 1),
            "negative": share(both, -1),
            "neutral": share(both, 0),
        },
        "rejected_tokens": {"negative": share(rejected, -1), "neutral": share(rejected, 0)},
        "revised_tokens": {"positive": share(revised, 1), "neutral": share(revised, 0)},
        "mean_distance": round(float(np.mean([r["distance"] for r in records])), 3)
        if records
        else 0.0,
        "reviser_calls": counts["calls"],
        "from_cache": counts["cached"],
        "failed_kinds": chat.failure_counts(failures.values()),
        "failed_not_asked_again": counts.get("failed_before", 0),
        "boundary_mismatch": stats["boundary_mismatch"],
        "truncated": stats["truncated"],
        "elapsed_s": round(elapsed, 1),
    }


# ----------------------------------------------------------------------------------------------
# Speed-up: the same DP for a whole batch of pairs at once, in numpy (skip on a first reading)
# ----------------------------------------------------------------------------------------------
# levenshtein() above walks its table cell by cell in Python: fine for one pair, slow for 45,000.
# levenshtein_batch computes the same table for P pairs at once, one row of all P tables per handful
# of numpy calls, and walks back with the same tie-break (tests/test_label.py checks that the two
# agree). align_all groups pairs of similar length and can spread the groups over processes.
def running_min(t: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out[j] = min(t[0], ..., t[j]) along axis 0, i.e. np.minimum.accumulate(t, axis=0, out=out).

    numpy's accumulate walks the array one element at a time; for a wide batch a doubling scan is
    several times faster: after the step with shift s, out[j] holds the minimum of the 2s values
    ending at j, so log2(len) elementwise calls suffice (bench/bench_levenshtein.py).
    """
    if t.size < 12_000:
        return np.minimum.accumulate(t, axis=0, out=out)
    out[...] = t
    shift = 1
    while shift < len(out):
        np.minimum(out[shift:], out[:-shift], out=out[shift:])  # numpy buffers the overlap
        shift *= 2
    return out


def levenshtein_batch(pairs: list[tuple[list[int], list[int]]]) -> list[tuple[int, list[tuple]]]:
    """levenshtein(a, b) for a batch of (a, b) token-id sequences, vectorised over the batch.

    Row i of the table comes from row i-1 in a few numpy calls: the match/substitute and delete
    terms are elementwise; the insert term runs along the row, and with E[i, j] = D[i, j] - j it
    becomes a running minimum, E[i, j] = min(E[i, j-1], t[j]) (see running_min). The batch is the
    last axis P (shorter pairs padded with ids that never match), so each call serves P rows at
    once.
    """
    if not pairs:
        return []
    P = len(pairs)
    n, m = max(len(a) for a, _ in pairs), max(len(b) for _, b in pairs)
    big = 1 + max([0] + [max(s, default=0) for pair in pairs for s in pair])
    dtype = np.int16 if n + m < 32000 else np.int32
    ids_dtype = np.int32 if big < 2**31 - 1 else np.int64
    A = np.full((n, P), big, dtype=ids_dtype)  # padding ids never equal any real id
    B = np.full((m, P), big + 1, dtype=ids_dtype)
    for p, (a, b) in enumerate(pairs):
        A[: len(a), p], B[: len(b), p] = a, b
    E = np.zeros((n + 1, m + 1, P), dtype=dtype)  # E[i, j] = D[i, j] - j; row 0: D[0, j] = j
    equal, up, t = (
        np.empty((m, P), dtype=bool),
        np.empty((m, P), dtype=dtype),
        np.empty((m + 1, P), dtype=dtype),
    )
    for i in range(1, n + 1):
        np.equal(A[i - 1], B, out=equal)  # [m, P]
        # match / substitute: E[i-1, j-1] + [a != b] - 1
        np.subtract(E[i - 1, :-1], equal, out=t[1:])
        np.add(E[i - 1, 1:], 1, out=up)  # delete: E[i-1, j] + 1
        np.minimum(t[1:], up, out=t[1:])
        t[0] = i  # D[i, 0] = i
        running_min(t, out=E[i])  # insert: E[i, j] = min(E[i, j-1], t[j])
    # backtrace from (n, m); flat[(i * width + j) * P + p] is E[i, j] of pair p, a plain Python int
    flat, width = memoryview(E.reshape(-1)), m + 1
    results = []
    for p, (a, b) in enumerate(pairs):
        i, j, ops = len(a), len(b), []
        while i > 0 or j > 0:
            if i > 0 and j > 0 and a[i - 1] == b[j - 1]:
                i, j = i - 1, j - 1
                ops.append(("match", i, j))
                continue
            here = (i * width + j) * P + p
            # D[i-1, j] + 1 == D[i, j]
            if j == 0 or (i > 0 and flat[here - width * P] + 1 == flat[here]):
                i -= 1
                ops.append(("delete", i, None))
            elif i == 0 or flat[here - P] == flat[here]:  # D[i, j-1] + 1 == D[i, j]
                j -= 1
                ops.append(("insert", None, j))
            else:
                i, j = i - 1, j - 1
                ops.append(("substitute", i, j))
        ops.reverse()
        results.append((int(E[len(a), len(b), p]) + len(b), ops))
    return results


def _label_batch(pairs):
    return [
        (dist, *labels_from_ops(ops, len(a), len(b)))
        for (a, b), (dist, ops) in zip(pairs, levenshtein_batch(pairs))
    ]


def group_batches(id_pairs: list[tuple[list[int], list[int]]],
                  cells: int = CELLS_PER_BATCH) -> list[list[int]]:
    """Indices of id_pairs sorted by length and grouped so each group holds about `cells` DP
    cells."""
    order = sorted(range(len(id_pairs)), key=lambda k: (len(id_pairs[k][0]), len(id_pairs[k][1])))
    batches, batch, n, m = [], [], 0, 0
    for k in order:
        n2, m2 = max(n, len(id_pairs[k][0])), max(m, len(id_pairs[k][1]))
        if batch and (len(batch) + 1) * (n2 + 1) * (m2 + 1) > cells:
            batches.append(batch)
            batch, n2, m2 = [], len(id_pairs[k][0]), len(id_pairs[k][1])
        batch.append(k)
        n, m = n2, m2
    return batches + [batch] if batch else batches


def align_all(id_pairs: list[tuple[list[int], list[int]]], workers: int = 1, progress: bool = True):
    """[(distance, rejected_labels, revised_labels)] for every (rejected_ids, revised_ids) pair,
    in batches of similar length; with workers > 1 the batches go to a process pool."""
    batches = group_batches(id_pairs)
    jobs = [[id_pairs[k] for k in batch] for batch in batches]
    results = [None] * len(id_pairs)
    # spawn, not fork: safe after threads (tokenizers, the reviser pool) and on every OS
    with (
        mp.get_context("spawn").Pool(workers) if workers > 1 else contextlib.nullcontext() as pool,
        tqdm(total=len(id_pairs), desc="align", unit="pair", disable=not progress) as bar,
    ):
        for batch, labelled in zip(
            batches, pool.imap(_label_batch, jobs) if pool else map(_label_batch, jobs)
        ):
            for k, item in zip(batch, labelled):
                results[k] = item
            bar.update(len(batch))
    return results


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.time()
    plumbing.seed_everything(args.seed)
    out = Path(args.out)
    cache_path, summary_path = Path(f"{out}.cache.jsonl"), Path(f"{out}.summary.json")
    tokenizer = hf_models.load_tokenizer(args.tokenizer, args.trust_remote_code, what="--tokenizer")
    pairs, skipped, notes = select_pairs(args)

    # 1. revise (cached, resumable; a ChatFatal, e.g. a bad key, stops here with one line, scrubbed)
    revisions, failures, counts = revise_all(pairs, args, cache_path)
    done = [p for p in pairs if p.id in revisions]
    # 2. tokenise, align, label
    records, stats = label_pairs(done, revisions, tokenizer, args.layout, args.max_response_len,
                                 args.workers, chat_template=args.chat_template)
    if stats["boundary_mismatch"] and args.layout == "separate":
        print(
            f"warning: {stats['boundary_mismatch']} responses tokenise differently inside "
            "prompt + response; "
            "the labels follow the response's own ids, as common.encode_response feeds it "
            "(--layout joint maps them onto the joint tokenisation)",
            file=sys.stderr,
        )
    # 3. write atomically
    checkpoint.atomic_write(out, "".join(json.dumps(r) + "\n" for r in records))
    summary = summarize(args, pairs, records, failures, skipped, notes, counts, stats,
                        time.time() - start)
    checkpoint.atomic_write(summary_path, json.dumps(summary, indent=2) + "\n")
    t = summary["tokens"]
    print(
        f"labelled {summary['done']}/{summary['pairs']} pairs ({summary['failed']} failed) "
        f"-> {out}; "
        f"tokens positive {t['positive']:.1%}, negative {t['negative']:.1%}, "
        f"neutral {t['neutral']:.1%}; "
        f"mean distance {summary['mean_distance']:.1f}; reviser calls {summary['reviser_calls']}"
    )
    if failures:
        print(chat.rerun_note(summary["failed_kinds"]) +
              (f" ({summary['failed_not_asked_again']} failed before, kept from the cache)"
               if summary["failed_not_asked_again"] else ""))
    if not records:
        why = (
            ", ".join(f"{n} {reason}" for reason, n in summary["failure_reasons"].items())
            or "no pairs selected"
        )
        print(
            f"error: no pair was labelled ({summary['failed']} of {summary['pairs']} failed: "
            f"{why}); the raw "
            f"answers are in {cache_path}, the failures in {summary_path}",
            file=sys.stderr,
        )
        raise SystemExit(1)
    return summary


if __name__ == "__main__":
    plumbing.cli(main)
