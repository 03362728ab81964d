"""Rollout speed: ppo_token.generate's decoders against Hugging Face's model.generate, on one model
with one batch of left-padded prompts, top-p 0.9, temperature 1, EOS never ending a row (ours: no
EOS id; HF: min_new_tokens = max_new_tokens), so every variant produces the same number of tokens.

Variants, run in turn inside every repetition (A/B alternation; medians over --repeats):
    before    the code before the static cache: HF's dynamic cache grown per token, and the
              sampler that sorted the probabilities with their ids and drew with torch.multinomial
              (kept below as sample_top_p_before, for this comparison only)
    dynamic   the dynamic cache with today's sampler (sample_top_p: values-only sort, exponential
              race): what the sampler alone buys
    static    the default: a static KV cache (transformers' StaticCache), masks and positions once
    compiled  static + the one-token forward through torch.compile (--compile); its first call
              (compilation) is timed apart and left out of the medians
    hf        model.generate(do_sample=True, top_p=0.9, top_k=0) on the same model and prompts

    python bench/bench_generate.py                          # demo model (run_pipeline.sh demo)
    python bench/bench_generate.py --preset gpt2 --prompt-len 32 --new-tokens 16 --repeats 3
    python bench/bench_generate.py --device cuda --preset gpt2

rollout_tokens_per_s(model, ...) measures one model's rollout tokens/s with and without compile,
for other scripts (bench/gpu_check.py).
"""
import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import ppo_token as ppo  # noqa: E402
from plumbing import decode  # noqa: E402

PRESETS = {  # GPT-2 shapes: (layers, width, heads, vocab)
    "demo": (2, 128, 2, 4096),  # run_pipeline.sh demo: sft.py --tiny-layers 2 --tiny-width 128
    "gpt2": (12, 768, 12, 50257),  # GPT-2 small, 124M, random weights
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="demo", help="model shape")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64],
                        help="prompts per generate call, each measured apart")
    parser.add_argument("--prompt-len", type=int, default=192,
                        help="longest prompt; rows are left-padded from half of it up")
    parser.add_argument("--new-tokens", type=int, default=48, help="tokens generated per row")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per variant")
    parser.add_argument("--variants", nargs="+", default=["before", "dynamic", "static",
                                                          "compiled", "hf"],
                        help="which of before, dynamic, static, compiled, hf to run")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0 = torch's default)")
    return parser.parse_args(argv)


def sample_top_p_before(logits, top_p):
    """The sampler before this bench's change, verbatim: sort with ids, torch.multinomial."""
    probs = logits.float().softmax(-1)
    if top_p >= 1:
        return torch.multinomial(probs, 1).squeeze(-1)
    sorted_probs, sorted_ids = probs.sort(-1, descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
    choice = torch.multinomial(sorted_probs * keep, 1)
    return sorted_ids.gather(-1, choice).squeeze(-1)


def gpt2_model(preset: str, positions: int, device):
    from transformers import GPT2Config, GPT2LMHeadModel
    layers, width, heads, vocab = PRESETS[preset]
    config = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab,
                        n_positions=max(positions, 1024 if preset == "gpt2" else 512),
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).to(device).eval()


def random_prompts(model, batch_size: int, prompt_len: int, device, seed=0):
    """Left-padded random prompts [B, P], lengths uniform in [prompt_len / 2, prompt_len]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(prompt_len // 2, prompt_len + 1, (batch_size,), generator=g).tolist()
    vocab = model.config.vocab_size
    rows = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]
    prompt, prompt_mask = common.pad_left(rows, 0)
    return prompt.to(device), prompt_mask.to(device)


def run_variant(name, model, prompt, prompt_mask, new_tokens):
    """One generate call of variant `name`; returns the response [B, new_tokens]."""
    if name == "hf":
        out = model.generate(input_ids=prompt, attention_mask=prompt_mask, do_sample=True,
                             top_p=0.9, top_k=0, temperature=1.0, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=0)
        return out[:, prompt.shape[1]:]
    decoder = decode.make_decoder(name == "compiled", prompt.device.type, static=name not in
                               ("before", "dynamic"))
    sampler = ppo.sample_top_p
    if name == "before":
        ppo.sample_top_p = sample_top_p_before
    try:
        return ppo.generate(model, prompt, prompt_mask, [-1], 0, new_tokens, 1.0, 0.9, decoder)
    finally:
        ppo.sample_top_p = sampler


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.no_grad()
def rollout_tokens_per_s(model, batch_size: int = 16, prompt_len: int = 192, new_tokens: int = 48,
                         compile: bool = False, repeats: int = 3) -> dict:
    """Rollout tokens/s of ppo_token.generate (the static-cache decoder; compile: its one-token
    step through torch.compile) on `model` (eval mode, on its device), random left-padded prompts,
    top-p 0.9, no EOS. Returns {"tokens_per_s": median over `repeats` calls after the first,
    "first_call_s": the first call's seconds (with compile: compiling included), "compile": the
    setting}."""
    device = next(model.parameters()).device
    prompt, prompt_mask = random_prompts(model, batch_size, prompt_len, device)
    variant = "compiled" if compile else "static"
    first = timed(lambda: run_variant(variant, model, prompt, prompt_mask, new_tokens), device)
    times = [timed(lambda: run_variant(variant, model, prompt, prompt_mask, new_tokens), device)
             for _ in range(repeats)]
    return {"tokens_per_s": batch_size * new_tokens / statistics.median(times),
            "first_call_s": first, "compile": compile}


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    device = torch.device(args.device)
    model = gpt2_model(args.preset, args.prompt_len + args.new_tokens, device)
    layers, width, heads, vocab = PRESETS[args.preset]
    print(f"{args.preset}: GPT-2 {layers} layers x {width} wide, {heads} heads, vocab {vocab}, "
          f"random weights; prompts {args.prompt_len // 2}..{args.prompt_len} tokens "
          f"(left-padded), {args.new_tokens} new tokens, top-p 0.9; device {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of "
          f"{args.repeats} alternating repetitions")
    for batch_size in args.batch_sizes:
        prompt, prompt_mask = random_prompts(model, batch_size, args.prompt_len, device)
        first = {}
        with torch.no_grad():
            for name in args.variants:  # warm-up; the compiled variant compiles here
                first[name] = timed(lambda: run_variant(name, model, prompt, prompt_mask,
                                                        args.new_tokens), device)
            times = {name: [] for name in args.variants}
            for _ in range(args.repeats):
                for name in args.variants:
                    times[name].append(timed(lambda: run_variant(
                        name, model, prompt, prompt_mask, args.new_tokens), device))
        median = {name: statistics.median(t) for name, t in times.items()}
        print(f"\nbatch {batch_size}: {'variant':<9} {'median s':>9} {'tokens/s':>9} "
              f"{'x hf':>6} {'x before':>9} {'first call s':>13}")
        for name in args.variants:
            tokens_per_s = batch_size * args.new_tokens / median[name]
            vs_hf = median["hf"] / median[name] if "hf" in median else float("nan")
            vs_before = median["before"] / median[name] if "before" in median else float("nan")
            print(f"{'':9}{name:<9} {median[name]:>9.3f} {tokens_per_s:>9.0f} {vs_hf:>6.2f} "
                  f"{vs_before:>9.2f} {first[name]:>13.1f}")


if __name__ == "__main__":
    main()
