"""Peak memory of one SFT step with and without gradient checkpointing.

    python bench/bench_sft_memory.py                 # CPU: GPT-2-small shape, batch 4 x 512 tokens
    python bench/bench_sft_memory.py --device cuda --batch-size 16

Each setting runs in a fresh process. Two figures:
- activations held for backward: the bytes of every distinct tensor that autograd saves during the
  forward pass (counted with torch.autograd.graph.saved_tensors_hooks, parameters excluded). This
  is what gradient checkpointing trades for recomputation; it is exact and does not depend on the
  allocator or on other processes, so it is the figure to compare on CPU.
- on CUDA, also torch.cuda.max_memory_allocated over the step, above what was allocated before it
  (model, optimizer state and batch).
The model is built from a config (GPT-2 small: 12 layers, 768 wide), so nothing is downloaded.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one_step(args):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import common
    import plumbing
    import sft
    from plumbing import amp, hf_models

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.width // 64,
                        n_positions=1024, vocab_size=50257)
    model = GPT2LMHeadModel(config).to(device)
    if args.checkpointing:
        hf_models.enable_gradient_checkpointing(model)
    optimizer = plumbing.adamw(model, 1e-5)
    prompt_len = args.seq_len // 2
    examples = [
        (
            torch.randint(0, 50257, (prompt_len,)).tolist(),
            torch.randint(0, 50257, (args.seq_len - prompt_len,)).tolist(),
        )
        for _ in range(args.batch_size)
    ]
    query_response, attention_mask, response_mask = (
        t.to(device) for t in common.collate_right(examples, pad_id=0)
    )
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in param_storages:
            saved[ptr] = tensor.untyped_storage().nbytes()
        return tensor

    # a first step allocates the optimizer state, so the measured step sees steady-state memory
    for measured in (False, True):
        if measured:
            saved.clear()
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            start = time.perf_counter()
        with (
            amp.autocast(device, True),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            loss, _ = sft.sft_loss(model, query_response, attention_mask, response_mask)
        activations = sum(saved.values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    result = {"activation_bytes": activations, "step_s": time.perf_counter() - start}
    if device.type == "cuda":
        torch.cuda.synchronize()
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() - base
    print(json.dumps(result))


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--layers", type=int, default=12,
                        help="transformer blocks (GPT-2 small: 12)")
    parser.add_argument("--width", type=int, default=768, help="hidden size (GPT-2 small: 768)")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=512,
                        help="tokens per sequence (half prompt, half response)")
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return one_step(args)
    results = {}
    for checkpointing in (False, True):
        cmd = [
            sys.executable, __file__, "--child", "--device", args.device,
            "--layers", str(args.layers), "--width", str(args.width),
            "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
        ]
        cmd += ["--checkpointing"] if checkpointing else []
        out = (
            subprocess.run(cmd, capture_output=True, text=True, check=True)
            .stdout.strip()
            .splitlines()[-1]
        )
        results[checkpointing] = json.loads(out)
    without, with_ = results[False], results[True]
    print(
        f"SFT step, {args.layers} layers x {args.width}, batch {args.batch_size} x {args.seq_len} "
        "tokens, "
        f"{args.device}"
    )
    for name, r in (
        ("without gradient checkpointing", without),
        ("with gradient checkpointing   ", with_),
    ):
        cuda = (
            f", CUDA peak {r['cuda_peak_bytes'] / 2**20:8.1f} MiB" if "cuda_peak_bytes" in r else ""
        )
        print(
            f"  {name}: activations {r['activation_bytes'] / 2**20:8.1f} MiB{cuda}, step "
            f"{r['step_s']:.2f} s"
        )
    print(f"  activation memory ratio (without / with): "
          f"{without['activation_bytes'] / max(with_['activation_bytes'], 1):.2f}x")
    if "cuda_peak_bytes" in without:
        print(
            "  CUDA peak ratio (without / with): "
            f"{without['cuda_peak_bytes'] / max(with_['cuda_peak_bytes'], 1):.2f}x"
        )
    print(f"  step time ratio (with / without): {with_['step_s'] / without['step_s']:.2f}x")


if __name__ == "__main__":
    main()
