"""Benchmark RED's redistribution against one plain scoring pass and the naive per-prefix loop.

For a batch of B responses of 256 tokens after left-padded prompts of up to 64 tokens (random ids,
a randomly initialised GPT-2-small-shaped reward model by default) it times:
    score     redistribute.sequence_reward: one forward pass, R read at the last token,
    red       redistribute.redistribute: eq. 6/7 token rewards from that same single pass,
    naive     re-scoring every prefix x + y≤t with its own forward pass (rows batched, T passes):
              by default only --naive-prefixes prefix lengths spread evenly over 1..T are run
              and the total is extrapolated as their mean × T (stated in the output),
and the ratios to `score`. Target: red within 1.1× of score. Times are the best of --repeats,
score and red interleaved; CPU time (time.process_time, all threads) is printed beside wall time
because this machine is shared.

    python bench/bench_redistribute.py                              # GPT-2 small shape, CPU
    python bench/bench_redistribute.py --config mid --naive-prefixes 0   # full naive loop
    python bench/bench_redistribute.py --device cuda --repeats 10
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import redistribute as red  # noqa: E402
from plumbing import amp  # noqa: E402

CONFIGS = {  # GPT2Config fields
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257),  # GPT-2 small, 124M
    "mid": dict(n_layer=6, n_head=8, n_embd=512, vocab_size=50257),  # ~45M
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, vocab_size=2048),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="gpt2", choices=sorted(CONFIGS),
                        help="reward model shape")
    parser.add_argument("--batch-size", type=int, default=8, help="responses in the batch")
    parser.add_argument("--prompt-len", type=int, default=64,
                        help="longest prompt (others are 0–16 shorter)")
    parser.add_argument("--response-len", type=int, default=256, help="response tokens per row")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed repeats of score and red (best is kept)")
    parser.add_argument("--naive-prefixes", type=int, default=8,
                        help="prefix lengths timed for the naive loop, then extrapolated (0 = all "
                             "of them)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    return parser.parse_args()


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def make_batch(args, vocab, device):
    """Left-padded prompts (PPO layout) followed by full-length responses."""
    g = torch.Generator().manual_seed(args.seed)
    prompts = [
        torch.randint(
            1, vocab, (args.prompt_len - int(torch.randint(0, 17, (1,), generator=g)),), generator=g
        ).tolist()
        for _ in range(args.batch_size)
    ]
    prompt_ids, prompt_mask = common.pad_left(prompts, 0)
    response = torch.randint(1, vocab, (args.batch_size, args.response_len), generator=g)
    query_response = torch.cat([prompt_ids, response], 1).to(device)
    attention_mask = torch.cat([prompt_mask, torch.ones_like(response)], 1).to(device)
    response_mask = torch.cat([torch.zeros_like(prompt_mask), torch.ones_like(response)], 1).to(
        device)
    return query_response, attention_mask, response_mask


def main():
    args = parse_args()
    from transformers import GPT2Config, GPT2Model

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    shape = CONFIGS[args.config]
    cfg = GPT2Config(n_positions=max(1024, args.prompt_len + args.response_len),
                     bos_token_id=shape["vocab_size"] - 1, eos_token_id=shape["vocab_size"] - 1,
                     **shape)
    model = common.disable_dropout(common.ScoreModel(GPT2Model(cfg))).to(device).eval()
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    batch = make_batch(args, cfg.vocab_size, device)
    P, T = batch[0].shape[1] - args.response_len, args.response_len
    print(
        f"model {args.config} ({n_params:.0f}M params, {cfg.n_layer} layers × {cfg.n_embd}), "
        f"device {device}, "
        f"{torch.get_num_threads()} threads; batch {args.batch_size} × ({P} prompt + {T} response) "
        "tokens"
    )
    ctx = lambda: amp.autocast(device, "bf16" if args.bf16 else "fp32")  # noqa: E731

    def score():
        with ctx():
            return red.sequence_reward(model, *batch)

    def redistribution():
        with ctx():
            return red.redistribute(model, *batch)

    score(), redistribution()  # warm-up
    times = {"score": [], "red": []}
    for _ in range(args.repeats):
        for name, fn in (("score", score), ("red", redistribution)):
            token_rewards, wall, cpu = timed(fn, device)
            times[name].append((wall, cpu))

    # the naive loop: one forward pass per prefix x + y≤t, rows batched (left-padded prompts)
    prefixes = list(range(1, T + 1))
    if args.naive_prefixes and args.naive_prefixes < T:
        k = args.naive_prefixes
        prefixes = (
            sorted({round(1 + i * (T - 1) / (k - 1)) for i in range(k)}) if k > 1 else [T // 2]
        )
    query_response, attention_mask, _ = batch
    naive_wall = naive_cpu = 0.0
    max_diff = 0.0
    with torch.no_grad():
        scores = red.score_positions(model, query_response, attention_mask)  # for the check below
        for t in prefixes:
            with ctx():
                prefix_scores, wall, cpu = timed(
                    lambda: red.score_positions(
                        model, query_response[:, : P + t], attention_mask[:, : P + t]
                    ),
                    device,
                )
            naive_wall, naive_cpu = naive_wall + wall, naive_cpu + cpu
            max_diff = max(max_diff,
                           (prefix_scores[:, -1] - scores[:, P + t - 1]).abs().max().item())
    scale = T / len(prefixes)
    naive = (naive_wall * scale, naive_cpu * scale)

    best = {name: min(v, key=lambda x: x[0]) for name, v in times.items()}
    median = {name: statistics.median(w for w, _ in v) for name, v in times.items()}
    base_wall, base_cpu = best["score"]
    print(f"{'':8} {'wall s':>9} {'cpu s':>9} {'× score (wall)':>15} {'× score (cpu)':>14}")
    for name, (wall, cpu) in (("score", best["score"]), ("red", best["red"]), ("naive", naive)):
        print(f"{name:8} {wall:9.3f} {cpu:9.3f} {wall / base_wall:15.2f} {cpu / base_cpu:14.2f}")
    print(
        f"median wall over {args.repeats} repeats: score {median['score']:.3f} s, red "
        f"{median['red']:.3f} s "
        f"(ratio {median['red'] / median['score']:.3f})"
    )
    extrapolated = (
        ""
        if len(prefixes) == T
        else f", extrapolated from {len(prefixes)} of {T} prefix lengths × {scale:.0f}"
    )
    print(
        f"naive: {T} forward passes{extrapolated}; its prefix scores match the single pass to "
        f"{max_diff:.1e}"
    )
    ratio = best["red"][0] / base_wall
    print(f"target red ≤ 1.1× score: {'met' if ratio <= 1.1 else 'NOT met'} ({ratio:.3f}×); "
          f"red is {naive[0] / best['red'][0]:.0f}× faster than the naive loop")


if __name__ == "__main__":
    main()
