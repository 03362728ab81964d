"""Throughput and memory of ppo_token.py on a fixed tiny GPT-2 (random weights, random prompts).

Prints: rollout tokens/s (generation alone, and the whole rollout: generation + policy, reference,
critic and reward scoring + GAE), PPO-update tokens/s (response tokens x ppo-epochs per second of
ppo_update), and the peak memory of one ppo_update with and without gradient checkpointing.

Peak memory: on CUDA, torch.cuda.max_memory_allocated() above what was allocated before the update.
On CPU, the process's resident-set high-water mark (VmHWM in /proc/self/status, reset through
/proc/self/clear_refs) above the resident set before the update. Each variant runs in a fresh
subprocess with glibc told to mmap every block over 64 KiB (MALLOC_MMAP_THRESHOLD_), so freed
tensors leave the resident set and it follows the live tensors instead of the allocator's cache.
EOS is never sampled here (eos_id = -1), so every response has exactly --new-tokens tokens and
every run does the same work.

    python bench/bench_ppo.py                      # CPU, default tiny config
    python bench/bench_ppo.py --device cuda --batch-size 64 --layers 12 --width 768
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import ppo_token as ppo  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--layers", type=int, default=4, help="GPT-2 layers")
    parser.add_argument("--width", type=int, default=256, help="GPT-2 hidden size (heads = width / 64)")
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary size")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per rollout")
    parser.add_argument("--minibatch-size", type=int, default=8, help="responses per optimizer step")
    parser.add_argument("--prompt-len", type=int, default=64, help="longest prompt (rows are left-padded up to half)")
    parser.add_argument("--new-tokens", type=int, default=64, help="response length (EOS is never sampled)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (after one warm-up)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--memory-only", choices=("on", "off"), help=argparse.SUPPRESS)  # internal: one memory probe
    return parser.parse_args(argv)


def build(args, checkpointing: bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    device = torch.device(args.device)
    cfg = GPT2Config(vocab_size=args.vocab, n_layer=args.layers, n_embd=args.width, n_head=max(1, args.width // 64),
                     n_positions=args.prompt_len + args.new_tokens, bos_token_id=0, eos_token_id=0,
                     pad_token_id=0)  # ids inside the vocabulary; the bench never samples EOS (eos_id = -1)
    torch.manual_seed(0)
    policy = common.disable_dropout(GPT2LMHeadModel(cfg)).to(device)
    ref_policy = common.disable_dropout(GPT2LMHeadModel(cfg)).eval().requires_grad_(False).to(device)
    ref_policy.load_state_dict(policy.state_dict())
    critic = common.ScoreModel(common.disable_dropout(GPT2LMHeadModel(cfg)).transformer).to(device)
    reward_model = common.ScoreModel(common.disable_dropout(GPT2LMHeadModel(cfg)).transformer).eval().to(device)
    if checkpointing:
        ppo.enable_checkpointing(policy)
        ppo.enable_checkpointing(critic.backbone)

    def reward_fn(query_response, attention_mask, response_mask):  # a discriminator-like per-token reward
        with torch.no_grad():
            scores = torch.tanh(reward_model(query_response, attention_mask).float())
        return common.gather_response(scores, response_mask)

    ppo_args = ppo.parse_args(["--policy", "-", "--out", "-", "--reward", "tlcr", "--discriminator", "-",
                               "--batch-size", str(args.batch_size), "--minibatch-size", str(args.minibatch_size),
                               "--max-new-tokens", str(args.new_tokens)])
    lengths = torch.randint(args.prompt_len // 2, args.prompt_len + 1, (args.batch_size,)).tolist()
    lengths[0] = args.prompt_len
    prompts = [torch.randint(1, args.vocab, (n,)).tolist() for n in lengths]
    prompt, prompt_mask = common.pad_left(prompts, 0)
    optimizers = common.adamw(policy, 1e-5), common.adamw(critic, 1e-5)
    return policy, ref_policy, critic, reward_fn, optimizers, ppo_args, prompt.to(device), prompt_mask.to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats, device):
    fn()  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        result = fn()
    sync(device)
    return (time.perf_counter() - start) / repeats, result


def throughput(args):
    device = torch.device(args.device)
    policy, ref_policy, critic, reward_fn, (p_opt, c_opt), ppo_args, prompt, prompt_mask = build(args, False)
    n_tokens = args.batch_size * args.new_tokens

    def gen():
        with common.autocast(device, ppo_args.bf16):
            return ppo.generate(policy.eval(), prompt, prompt_mask, -1, args.new_tokens, 1.0, 0.9)

    def roll():
        return ppo.rollout(policy, ref_policy, critic, reward_fn, prompt, prompt_mask, ppo_args, -1)

    gen_s, _ = timed(gen, args.repeats, device)
    roll_s, batch = timed(roll, args.repeats, device)
    rows = [("generation", gen_s, n_tokens), ("rollout (generate + score + GAE)", roll_s, n_tokens)]
    for checkpointing in (False, True):
        if checkpointing:
            ppo.enable_checkpointing(policy)
            ppo.enable_checkpointing(critic.backbone)
        update_s, _ = timed(lambda: ppo.ppo_update(policy, critic, p_opt, c_opt, batch, ppo_args), args.repeats, device)
        label = f"ppo_update ({ppo_args.ppo_epochs} epochs, checkpointing {'on' if checkpointing else 'off'})"
        rows.append((label, update_s, n_tokens * ppo_args.ppo_epochs))
    return rows


def rss_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory(args, checkpointing: bool) -> float:
    """MiB above the pre-update level at the peak of one ppo_update (after a warm-up update)."""
    device = torch.device(args.device)
    policy, ref_policy, critic, reward_fn, (p_opt, c_opt), ppo_args, prompt, prompt_mask = build(args, checkpointing)
    batch = ppo.rollout(policy, ref_policy, critic, reward_fn, prompt, prompt_mask, ppo_args, -1)
    ppo_args.ppo_epochs = 1
    ppo.ppo_update(policy, critic, p_opt, c_opt, batch, ppo_args)  # warm-up: optimizer states now exist
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        ppo.ppo_update(policy, critic, p_opt, c_opt, batch, ppo_args)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    before = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark VmHWM to the current RSS
    ppo.ppo_update(policy, critic, p_opt, c_opt, batch, ppo_args)
    return (rss_kib("VmHWM") - before) / 1024


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_only:
        print(json.dumps({"peak_mib": peak_memory(args, args.memory_only == "on")}))
        return
    print(f"tiny GPT-2: {args.layers} layers x {args.width} wide, vocab {args.vocab}; batch {args.batch_size} prompts "
          f"(<= {args.prompt_len} tokens, left-padded), {args.new_tokens} new tokens; device {args.device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for label, seconds, tokens in throughput(args):
        print(f"  {label:<48} {tokens / seconds:10.0f} tokens/s  ({seconds * 1000:.0f} ms)")
    passthrough = list(argv if argv is not None else sys.argv[1:])
    for flag in ("off", "on"):
        out = subprocess.run([sys.executable, __file__, *passthrough, "--memory-only", flag],
                             capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "65536",
                                  "MALLOC_TRIM_THRESHOLD_": "0"})
        peak = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
        print(f"  peak memory of one ppo_update, gradient checkpointing {flag:<3}   {peak:10.1f} MiB "
              "above the pre-update level")


if __name__ == "__main__":
    main()
