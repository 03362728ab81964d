"""Throughput and memory of ppo_token.py, full fine-tuning beside LoRA, on a fixed tiny GPT-2
(random weights).

Both variants are built by ppo_token.load_models from the same saved policy and reward model
(--reward red, critic started from the reward model), exactly as the stage builds them:
    full   policy and critic trained; a frozen reference copy and a frozen reward model: four models
    lora   --lora-rank adapters on the policy and the critic; the reference is the policy with its
           adapters off, the reward is the critic's backbone with its adapters off: two frozen
           backbones
Printed for each: trained parameters, rollout tokens/s (generation + scoring of policy, reference,
critic and reward + GAE), PPO-update tokens/s (response tokens x ppo-epochs per second), and peak
memory.

Peak memory. CUDA: torch.cuda.max_memory_allocated() over the whole run (models, optimizer states,
the largest transient). CPU: the growth of the process's peak resident set (VmHWM in
/proc/self/status) from just before the models are loaded to the end of the timed iterations: the
same things, as the operating system sees them. Each variant runs in a fresh subprocess with glibc
told to mmap every block over 64 KiB (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident
set and it follows the live tensors.
No token ends a response (the EOS id given to the rollout is -1), so every response has exactly
--new-tokens tokens and every run does the same work.

    python bench/bench_ppo.py                      # CPU, default tiny config
    python bench/bench_ppo.py --device cuda --batch-size 64 --layers 12 --width 768 --vocab 50257
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import ppo_token as ppo  # noqa: E402
from plumbing import distributed, hf_models  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--layers", type=int, default=4, help="GPT-2 layers")
    parser.add_argument("--width", type=int, default=256,
                        help="GPT-2 hidden size (heads = width / 64)")
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary size")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per rollout")
    parser.add_argument("--minibatch-size", type=int, default=8,
                        help="responses per optimizer step")
    parser.add_argument("--prompt-len", type=int, default=64,
                        help="longest prompt (rows are left-padded up to half)")
    parser.add_argument("--new-tokens", type=int, default=64,
                        help="response length (EOS is never sampled)")
    parser.add_argument("--lora-rank", type=int, default=16, help="rank of the LoRA variant")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed iterations (after one warm-up)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--compile", action="store_true",
                        help="ppo_token.py --compile: the rollout's decode step compiled (its "
                             "compilation falls in the warm-up iteration)")
    # internal: one subprocess
    parser.add_argument("--variant", choices=("full", "lora"), help=argparse.SUPPRESS)
    parser.add_argument("--models", help=argparse.SUPPRESS)  # internal: the saved models
    return parser.parse_args(argv)


def save_models(args, folder: Path):
    """A random GPT-2 policy and a reward model (its backbone and a head: the project's first score
    format)."""
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

    cfg = GPT2Config(vocab_size=args.vocab, n_layer=args.layers, n_embd=args.width,
                     n_head=max(1, args.width // 64), n_positions=args.prompt_len + args.new_tokens,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(folder / "policy")
    GPT2Model(cfg).save_pretrained(folder / "reward_model")
    save_file({"weight": torch.randn(1, args.width) / args.width**0.5},
              str(folder / "reward_model" / "score_head.safetensors"))


def rss_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_variant(args) -> dict:
    """Load the models the stage's way, then one warm-up and --repeats timed PPO iterations."""
    device = torch.device(args.device)
    if device.type == "cpu":
        before = rss_kib("VmRSS")
        # reset the high-water mark VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    else:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    models = Path(args.models)
    ppo_args = ppo.parse_args(
        [
            "--policy",
            str(models / "policy"),
            "--reward",
            "red",
            "--reward-model",
            str(models / "reward_model"),
            "--out",
            "-",
            "--rollout-batch-size",
            str(args.batch_size),
            "--minibatch-size",
            str(args.minibatch_size),
            "--max-new-tokens",
            str(args.new_tokens),
            "--device",
            args.device,
            "--lora-rank",
            str(args.lora_rank if args.variant == "lora" else 0),
        ] + (["--compile"] if args.compile else [])
    )
    dist_info = distributed.DistInfo(device=device)
    models = ppo.load_models(ppo_args, dist_info)  # with their AdamW optimizers
    torch.manual_seed(0)
    lengths = torch.randint(args.prompt_len // 2, args.prompt_len + 1, (args.batch_size,)).tolist()
    prompt, prompt_mask = common.pad_left(
        [torch.randint(1, args.vocab, (n,)).tolist() for n in lengths], 0)
    prompt, prompt_mask = prompt.to(device), prompt_mask.to(device)
    rollout_s = update_s = 0.0
    for k in range(args.repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        batch = ppo.rollout(models, prompt, prompt_mask, [-1], 0, ppo_args)  # no EOS
        sync(device)
        t1 = time.perf_counter()
        ppo.ppo_update(models, batch, ppo_args, args.minibatch_size)
        sync(device)
        if k:  # the first iteration warms up (and creates the AdamW states)
            rollout_s, update_s = rollout_s + t1 - t0, update_s + time.perf_counter() - t1
    tokens = args.batch_size * args.new_tokens * args.repeats
    peak = ((rss_kib("VmHWM") - before) / 1024 if device.type == "cpu"
            else (torch.cuda.max_memory_allocated() - before) / 2 ** 20)
    trained = sum(
        p.numel() for m in (models.policy, models.critic) for p in m.parameters() if p.requires_grad
    )
    return {"trained_params": trained, "rollout_tokens_per_s": tokens / rollout_s,
            "update_tokens_per_s": tokens * ppo_args.ppo_epochs / update_s, "peak_mib": peak}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.variant:
        hf_models._quiet_transformers()
        print(json.dumps(run_variant(args)))
        return
    print(
        f"tiny GPT-2: {args.layers} layers x {args.width} wide, vocab {args.vocab}; "
        f"{args.batch_size} prompts "
        f"(<= {args.prompt_len} tokens, left-padded), {args.new_tokens} new tokens, minibatch "
        f"{args.minibatch_size}; "
        f"device {args.device}, torch {torch.__version__}; LoRA rank {args.lora_rank}"
        f"{'; --compile' if args.compile else ''}"
    )
    memory = (
        "peak CUDA memory allocated"
        if args.device.startswith("cuda")
        else "peak RSS growth (VmHWM)"
    )
    print(
        f"  {'variant':<8} {'trained params':>15} {'rollout tok/s':>14} {'update tok/s':>13}  "
        f"{memory} MiB"
    )
    passthrough = list(argv if argv is not None else sys.argv[1:])
    hf_models._quiet_transformers()
    with tempfile.TemporaryDirectory() as folder:
        save_models(args, Path(folder))
        for variant in ("full", "lora"):
            out = subprocess.run(
                [sys.executable, __file__, *passthrough, "--variant", variant, "--models", folder],
                capture_output=True,
                text=True,
                env={
                    **os.environ,
                    "PYTHONWARNINGS": "ignore",
                    "MALLOC_MMAP_THRESHOLD_": "65536",
                    "MALLOC_TRIM_THRESHOLD_": "0",
                },
            )
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  {variant:<8} {r['trained_params']:>15,} {r['rollout_tokens_per_s']:>14.0f} "
                  f"{r['update_tokens_per_s']:>13.0f}  {r['peak_mib']:.1f}")


if __name__ == "__main__":
    main()
