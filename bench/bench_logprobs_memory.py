"""Peak memory of log-probs and entropy over a large vocabulary: common.response_logprobs (chunked)
against the one-piece computation it replaced, measured on the CPU.

    python bench/bench_logprobs_memory.py                    # gpt2 preset shapes, 128k vocabulary
    python bench/bench_logprobs_memory.py --rows 4 --layers 2

The model is GPT-2 of the `gpt2` preset's width (768) with Llama 3's 128,256-token vocabulary and
--layers blocks (1 by default: the blocks do not touch what is measured), random weights, the
preset's rollout shapes (prompt 512 + 128 new tokens, so 129 columns of logits per row), fp32 (the
CPU default). Each figure is the growth of a fresh process's peak RSS over its RSS just before the
call (glibc told to map every large block apart, so freed memory leaves the RSS at once):
  logits only   the model's forward alone, [rows, 129, V] logits (the floor both paths share)
  scoring       response_logprobs with entropy, no grad (PPO's rollout, the reference, eval)
  training      log-probs and their backward (PPO's update, SFT); both paths also hold the
                LM head's weight gradient (V × 768 × 4 bytes = 376 MiB) and the logits' gradient
The preset scores 64 rollout rows at once; --rows 8 measures an eighth of that, and the last lines
scale the measured figures to 64 rows (computed: every term is linear in the rows).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import common  # noqa: E402

MiB = 2 ** 20


def one_piece_logprobs(model, query_response, attention_mask, response_mask, temperature=1.0,
                       with_entropy=False):
    """The computation before chunking: the logits of every response position gathered, upcast and
    reduced in one piece, [B, T_resp, V] fp32 (kept as the reference of the tests and this
    bench)."""
    index, valid = common.response_index(response_mask)
    keep = query_response.shape[1] - int(index[:, 0].min()) + 1
    logits = model(input_ids=query_response, attention_mask=attention_mask,
                   position_ids=common.position_ids_from_mask(attention_mask), use_cache=False,
                   **common.logits_to_keep(model, keep)).logits
    offset = query_response.shape[1] - logits.shape[1]
    before = (index - 1 - offset).clamp(min=0)
    picked = (
        logits.gather(1, before[..., None].expand(-1, -1, logits.shape[-1])).float() / temperature
    )  # [B, T_resp, V]
    tokens = query_response.gather(1, index)
    log_norm = picked.logsumexp(-1)
    logprobs = (picked.gather(-1, tokens[..., None]).squeeze(-1) - log_norm) * valid
    if not with_entropy:
        return logprobs, None
    entropy = (log_norm - (picked.softmax(-1) * picked).sum(-1)) * valid
    return logprobs, entropy


def build_model(arch: str, vocab: int, layers: int, width: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_layer=layers, n_embd=width,
                                          n_head=max(1, width // 64), n_positions=1024)).eval()
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=width,
                                        intermediate_size=2 * width, num_hidden_layers=layers,
                                        num_attention_heads=2, num_key_value_heads=1,
                                        tie_word_embeddings=True)).eval()


def run_one(spec: dict) -> dict:
    """In this (fresh) process: the peak RSS growth of one call, and the logits' size."""
    torch.set_num_threads(1)
    if spec.get("chunk_bytes"):
        common.CHUNK_BYTES = spec["chunk_bytes"]
    model = build_model(spec["arch"], spec["vocab"], spec["layers"], spec["width"])
    rows, P, R = spec["rows"], spec["prompt_len"], spec["new_tokens"]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, spec["vocab"], (rows, P + R), generator=g)
    mask = torch.ones_like(ids)
    response_mask = torch.zeros_like(ids)
    response_mask[:, P:] = 1
    grad = spec["grad"]

    def call(n):
        batch = (ids[:n], mask[:n], response_mask[:n])
        with torch.set_grad_enabled(grad):
            if spec["how"] == "forward":  # the model's own logits, nothing else
                return model(input_ids=batch[0], attention_mask=batch[1],
                             **common.logits_to_keep(model, R + 1)).logits.shape
            fn = common.response_logprobs if spec["how"] == "chunked" else one_piece_logprobs
            logprobs, _ = fn(model, *batch, 1.0, with_entropy=not grad)
            if grad:
                logprobs.sum().backward()
            return logprobs.shape

    call(1)  # kernels and allocator warmed up on one row
    model.zero_grad(set_to_none=True)
    gc.collect()
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    call(rows)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return dict(peak=peak, logits=rows * (R + 1) * spec["vocab"] * 4)


def measure(how: str, grad: bool, **spec) -> dict:
    """run_one in a fresh process ({how: forward | chunked | one_piece})."""
    spec = {**dict(arch="gpt2", vocab=128256, layers=1, width=768, rows=8, prompt_len=512,
                   new_tokens=128), **spec, "how": how, "grad": grad}
    env = dict(os.environ, OMP_NUM_THREADS="1",
               # every large block its own mapping, unmapped when freed: the peak RSS is the peak
               # of live tensors, not of glibc's heap
               MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, __file__, "--spec", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode:
        raise RuntimeError(f"{how} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8, help="rollout rows scored at once")
    parser.add_argument("--layers", type=int, default=1, help="transformer blocks")
    parser.add_argument("--vocab", type=int, default=128256, help="vocabulary size")
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.spec:
        print(json.dumps(run_one(json.loads(args.spec))))
        return None
    spec = dict(rows=args.rows, layers=args.layers, vocab=args.vocab)
    floor = measure("forward", False, **spec)
    figures = {(how, grad): measure(how, grad, **spec)["peak"]
               for grad in (False, True) for how in ("one_piece", "chunked")}
    logits = floor["logits"]
    print(f"## Peak memory of log-probs over a {args.vocab}-token vocabulary (measured, CPU, "
          f"fp32): GPT-2 width 768, {args.layers} layer(s), {args.rows} rows × 129 positions "
          f"(logits {logits / MiB:.0f} MiB), chunk {common.CHUNK_BYTES // MiB} MiB\n")
    print("| call | before (one piece) MiB | after (chunked) MiB | above the logits, before "
          "| after |")
    print("|---|---:|---:|---:|---:|")
    print(f"| logits only (model forward) | {floor['peak'] / MiB:.0f} | {floor['peak'] / MiB:.0f}"
          " | – | – |")
    for grad, name in ((False, "scoring (log-probs + entropy, no grad)"),
                       (True, "training (log-probs + backward)")):
        old, new = figures[("one_piece", grad)], figures[("chunked", grad)]
        print(f"| {name} | {old / MiB:.0f} | {new / MiB:.0f} | {(old - floor['peak']) / MiB:.0f}"
              f" | {(new - floor['peak']) / MiB:.0f} |")
    scale = 64 / args.rows
    old, new = figures[("one_piece", False)], figures[("chunked", False)]
    # the logits and everything of the one-piece path grow with the rows; the chunks do not
    after = scale * floor["peak"] + new - floor["peak"]
    print(f"\nscoring scaled to the preset's 64 rollout rows (computed, × {scale:g}): "
          f"{old * scale / 2**30:.1f} GiB before, {after / 2**30:.1f} GiB after, of which "
          f"{scale * logits / 2**30:.1f} GiB are the model's own fp32 logits (half in bf16)")
    return figures


if __name__ == "__main__":
    main()
