"""gold_samples.py — the lab's on-policy data: K replies per prompt drawn from a policy (the SFT
model) as PPO draws them, every two with different gold scores made a pair (the higher chosen, ties
dropped), written after the split's own gold-ranked pairs as one pairs file that label.py (the rule
reviser's labels, so the discriminator) and redistribute.py (the reward model) read with
--data FILE --split all. No test prompt is ever sampled (sample_prompts), and a prompt's pairs,
named PAIR_ID/i-j, are held out together (common.heldout_split). The lab observes the algorithm:
this file uses ppo_token.generate; nothing the algorithm runs imports it.

    python gold_samples.py --policy runs/gold-demo/sft --out runs/gold-demo/samples.jsonl
    python label.py --reviser gold --preference gold --data runs/gold-demo/samples.jsonl \
        --split all --tokenizer runs/gold-demo/sft --out runs/gold-demo/labels.jsonl

Resumable: every prompt's samples go to OUT.cache.jsonl as they are drawn, keyed by the policy's
weights and the sampling settings; OUT.summary.json counts what was written.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import common
import gold
import plumbing
import ppo_token
from plumbing import chat, checkpoint, decode, distributed, hf_models


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=plumbing.HelpFormatter)
    data = plumbing.add_data_args(parser.add_argument_group("data"), split="reward",
                                  response_len=False)
    data.add_argument("--out", required=True,
                      help="pairs JSONL (read it with --data OUT --split all); OUT.cache.jsonl and "
                           "OUT.summary.json beside it")
    gold.add_lexicon_arg(data)  # it ranks the samples; the cached samples serve every lexicon
    data.add_argument("--data-pairs", action=argparse.BooleanOptionalAction, default=True,
                      help="also write the split's own gold-ranked pairs (ties dropped): the "
                           "samples add to the data rather than replace it")
    algo = parser.add_argument_group("sampling")
    algo.add_argument("--policy", required=True, help="the policy to sample (the SFT model folder)")
    algo.add_argument("--samples-per-prompt", type=int, default=4,
                      help="K replies per prompt; every two with different gold scores are a pair")
    decode.add_sampling_args(algo, 255,
                             "longest reply in tokens (the stages' --max-response-len "
                             "− 1 reads it whole)")
    algo.add_argument("--batch-size", type=int, default=32,
                      help="prompts per generate call (× K rows)")
    system = parser.add_argument_group("system")
    system.add_argument("--device", default="auto",
                        help="auto (cuda if available), cpu, cuda, cuda:N")
    system.add_argument("--seed", type=int, default=0,
                        help="sampling seed (batch b of prompts draws with seed·1000003 + b)")

    system.add_argument("--no-resume", dest="resume", action="store_false",
                        help="ignore and overwrite OUT.cache.jsonl instead of reusing its samples")
    system.add_argument("--trust-remote-code", action="store_true",
                        help="allow model repos that ship their own Python code (off by default)")
    args = parser.parse_args(argv)
    plumbing.check_positive(parser, args, "samples_per_prompt", "max_new_tokens", "batch_size",
                            "max_prompt_len")
    if args.samples_per_prompt < 2:
        parser.error("--samples-per-prompt must be at least 2: a pair needs two replies")
    decode.check_sampling_args(parser, args)
    return args


def sample_prompts(pairs: list[common.Pair], split: str, split_seed: int,
                   limit: int | None = None) -> tuple[list[common.Pair], int]:
    """The pairs of `split` (sft, reward or rl; at most `limit`) whose prompts may be sampled for
    training: never the test split, and never a prompt whose text is also a test prompt (dropped and
    counted). Returns (pairs, dropped)."""
    if split not in ("sft", "reward", "rl"):
        raise common.InputError(
            f"--split {split}: training data is sampled for the sft, reward or rl "
            "split only, never for the test prompts"
        )
    selected = common.select_split(pairs, split, split_seed, limit)
    test_prompts = {pair.prompt for pair in common.select_split(pairs, "test", split_seed)}
    kept = [pair for pair in selected if pair.prompt not in test_prompts]
    # this function's promise, checked (not assert: -O)
    if {pair.prompt for pair in kept} & test_prompts:
        raise RuntimeError("a test prompt was selected for training")
    return kept, len(selected) - len(kept)


def pair_row(pair: common.Pair) -> dict:
    """A pair as a data row that common.row_to_pair reads back unchanged (prompt string or chat)."""
    if pair.messages:
        chosen, rejected = ([{"role": "assistant", "content": text.removeprefix(" ")}]
                            for text in (pair.chosen, pair.rejected))
        return {"id": pair.id, "prompt": pair.messages, "chosen": chosen, "rejected": rejected}
    return {"id": pair.id, "prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}


def policy_stamp(policy: str) -> str:
    """Names the policy's weights in the sample cache key (files, sizes, modification times), so
    the samples of a policy trained again in the same folder are never reused."""
    path = Path(policy)
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) if path.is_dir() else []
    return json.dumps(
        [str(policy)] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files])


@torch.no_grad()
def sample_replies(policy, tokenizer, pairs: list[common.Pair], samples_per_prompt: int,
                   args) -> list[list[str]]:
    """samples_per_prompt replies to each pair's prompt, drawn as PPO draws them
    (ppo_token.generate, one batch of len(pairs) × K rows), each decoded up to its first EOS."""
    device = next(policy.parameters()).device
    prompts = common.encode_prompts(tokenizer, pairs, args.max_prompt_len, args.chat_template,
                                    repeat=samples_per_prompt)
    prompt, prompt_mask = common.pad_left(prompts, tokenizer.pad_token_id)  # [B·K, P]
    eos_ids = common.eos_token_ids(tokenizer, policy)
    decoder = decode.make_decoder(args.compile, device.type)  # one per process and setting
    response = ppo_token.generate(policy, prompt.to(device), prompt_mask.to(device), eos_ids,
                                  tokenizer.pad_token_id, args.max_new_tokens, args.temperature,
                                  args.top_p, decoder).cpu()  # [B·K, R]
    mask, _ = ppo_token.response_mask_from(response, eos_ids)  # [B·K, R], up to the first EOS
    texts = gold.decode_responses(tokenizer, response, mask)
    return [texts[k:k + samples_per_prompt] for k in range(0, len(texts), samples_per_prompt)]


def sample(args) -> dict:
    """Draw (resumably), rank, write the pairs file and its summary atomically."""
    start = time.time()
    out = Path(args.out)
    cache_path, summary_path = Path(f"{out}.cache.jsonl"), Path(f"{out}.summary.json")
    plumbing.seed_everything(args.seed)
    pairs, dropped = sample_prompts(common.load_pairs(plumbing.data_paths(args.data)), args.split,
                                    args.split_seed, args.limit)
    if not pairs:
        raise common.InputError(f"--data {args.data} --split {args.split}: no prompts to sample")
    device = distributed.setup_distributed(args.device).device
    tokenizer = hf_models.load_tokenizer(args.policy, args.trust_remote_code, what="--policy")
    settings = [policy_stamp(args.policy), args.samples_per_prompt, args.max_prompt_len,
                args.max_new_tokens, args.temperature, args.top_p, args.seed, args.chat_template]

    def key(pair):  # the cache key of one prompt's samples
        return hashlib.sha256(
            json.dumps([settings, pair.prompt, pair.messages]).encode()
        ).hexdigest()

    # 1. sample: batch b of prompts with seed·1000003 + b, so a resumed run draws what an
    #    uninterrupted one would; every prompt's samples go to the cache as they come
    cache = chat.JsonlCache(cache_path, fresh=not args.resume,
                            valid=lambda r: len(r.get("samples") or []) == args.samples_per_prompt)
    batches = [pairs[k:k + args.batch_size] for k in range(0, len(pairs), args.batch_size)]
    todo = [
        (b, batch) for b, batch in enumerate(batches) if any(key(p) not in cache for p in batch)
    ]
    policy = None
    with cache, tqdm(total=len(pairs), initial=len(pairs) - sum(len(batch) for _, batch in todo),
                     desc="sample", unit="prompt") as bar:
        for b, batch in todo:
            if policy is None:  # loaded only when something is left to sample
                policy = (
                    hf_models.load_policy(
                        args.policy, trust_remote_code=args.trust_remote_code, what="--policy"
                    )
                    .to(device)
                    .eval()
                )
            torch.manual_seed(args.seed * 1_000_003 + b)
            replies = sample_replies(policy, tokenizer, batch, args.samples_per_prompt, args)
            for pair, texts in zip(batch, replies):
                if key(pair) not in cache:
                    cache.add({"key": key(pair), "id": pair.id, "samples": texts})
            bar.update(len(batch))

    # 2. rank: the split's own pairs (gold-ranked, ties dropped), then each prompt's sampled pairs
    lexicon = gold.load_lexicon(args.lexicon)
    data_pairs, data_counts = (gold.rank_pairs(pairs, lexicon=lexicon) if args.data_pairs
                               else ([], {"kept": 0, "ties": 0}))
    sampled, ties, empty, scores = [], 0, 0, []
    for pair in pairs:
        replies = cache.get(key(pair))["samples"]
        scores += [gold.gold_score(text, lexicon=lexicon) for text in replies]
        nonempty = [text for text in replies if text.strip()]  # an empty reply is no data row
        empty += len(replies) - len(nonempty)
        ranked, tied = gold.rank_samples(pair, nonempty, lexicon=lexicon)
        sampled += ranked
        ties += tied

    # 3. write the pairs (rows common.load_pairs reads) and the summary
    rows = [pair_row(p) for p in data_pairs + sampled]
    if not rows:
        raise common.InputError("no pair to write: every two samples tie (try more "
                                "--samples-per-prompt)")
    checkpoint.atomic_write(out,
                            "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    summary = {
        "policy": str(args.policy),
        "data": str(args.data),
        "split": args.split,
        "split_seed": args.split_seed,
        "lexicon": lexicon.id,
        "prompts": len(pairs),
        "test_prompts_dropped": dropped,
        "samples_per_prompt": args.samples_per_prompt,
        "samples": len(scores),
        "empty_samples": empty,
        "mean_gold": round(sum(scores) / len(scores), 4),
        "negative_samples": sum(s < 0 for s in scores),
        "positive_samples": sum(s > 0 for s in scores),
        "sampled_pairs": len(sampled),
        "sampled_ties_dropped": ties,
        "data_pairs": data_counts["kept"],
        "data_ties_dropped": data_counts["ties"],
        "rows": len(rows),
        "max_prompt_len": args.max_prompt_len,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "elapsed_s": round(time.time() - start, 1),
    }
    checkpoint.atomic_write(summary_path, json.dumps(summary, indent=2) + "\n")
    print(
        f"sampled {summary['samples']} replies to {len(pairs)} prompts (mean gold "
        f"{summary['mean_gold']:+.3f}, {summary['negative_samples']} below 0, "
        f"{summary['positive_samples']} above); {len(sampled)} sampled pairs ({ties} ties dropped) "
        f"+ {data_counts['kept']} data pairs -> {out}",
        file=sys.stderr,
    )
    return summary


def main(argv=None):
    return sample(parse_args(argv))


if __name__ == "__main__":
    plumbing.cli(main)
