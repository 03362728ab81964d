"""Why the tiny models have no attention dropout and GPT-2's fused GELU: a training step of the demo
model on CPU, before and after (hf_models.tiny_config), and the two ops alone.

    before  attn_pdrop 0.1, activation "gelu_new" (GPT-2's tanh GELU, seven elementwise ops)
    after   attn_pdrop 0,   activation "gelu_pytorch_tanh" (the same function, one fused op)

On CPU, torch's scaled_dot_product_attention with dropout_p > 0 leaves its fused kernel for the
math path: it builds the [B, H, T, T] weights and their dropout mask. One training step (forward and
backward, model.train(), residual and embedding dropout on in both) of a --batch-size × --seq-len
batch, one thread; variants alternate inside every repetition and the medians are printed.

    python bench/bench_attention.py                 # the demo model (run_pipeline.sh demo)
    python bench/bench_attention.py --threads 2 --repeats 9
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.activations import ACT2FN

VARIANTS = {"before": {"attn_pdrop": 0.1, "activation_function": "gelu_new"},
            "after": {"attn_pdrop": 0.0, "activation_function": "gelu_pytorch_tanh"}}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="GPT-2 blocks (demo: 2)")
    parser.add_argument("--width", type=int, default=128, help="hidden size (demo: 128)")
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary (demo: 4096)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="sequences a step (the study's discriminator micro-batch: 32)")
    parser.add_argument("--seq-len", type=int, default=288,
                        help="tokens a sequence (prompt 192 + response 96)")
    parser.add_argument("--repeats", type=int, default=5, help="repetitions; medians printed")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (the study runs one a stage)")
    return parser.parse_args(argv)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def model_step(model, ids, mask):
    """One training step's forward and backward (no optimizer: the same for both variants)."""
    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    return step


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch_size, args.seq_len))
    mask = torch.ones_like(ids)
    mask[: args.batch_size // 2, : args.seq_len // 3] = 0  # left padding in half the rows
    heads, head_dim = 2, args.width // 2
    q, k, v = (torch.randn(args.batch_size, heads, args.seq_len, head_dim, requires_grad=True)
               for _ in range(3))
    hidden = torch.randn(args.batch_size, args.seq_len, 4 * args.width, requires_grad=True)
    steps = {}
    for name, config in VARIANTS.items():
        model = GPT2LMHeadModel(GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=heads,
                                           vocab_size=args.vocab, n_positions=args.seq_len,
                                           bos_token_id=0, eos_token_id=0, resid_pdrop=0.1,
                                           embd_pdrop=0.1, **config)).train()
        steps[f"{name}: training step"] = model_step(model, ids, mask)
        p = config["attn_pdrop"]
        steps[f"{name}: attention fwd+bwd"] = lambda p=p: F.scaled_dot_product_attention(
            q, k, v, dropout_p=p, is_causal=True).sum().backward()
        act = ACT2FN[config["activation_function"]]
        steps[f"{name}: MLP activation fwd+bwd"] = lambda act=act: act(hidden).sum().backward()
    for step in steps.values():  # warm-up
        step()
    times = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            times[name].append(timed(step))
    print(f"GPT-2 {args.layers} layers × {args.width}, vocab {args.vocab}; batch {args.batch_size} "
          f"× {args.seq_len} tokens; {args.threads} thread(s); median of {args.repeats} (measured)")
    medians = {name: statistics.median(t) * 1000 for name, t in times.items()}
    for part in ("training step", "attention fwd+bwd", "MLP activation fwd+bwd"):
        before, after = medians[f"before: {part}"], medians[f"after: {part}"]
        print(f"  {part:<24} before {before:8.1f} ms   after {after:8.1f} ms   "
              f"before / after {before / after:4.2f}")


if __name__ == "__main__":
    main()
