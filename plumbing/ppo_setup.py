"""ppo_token.py's set-up and bookkeeping, kept out of the algorithm's file: the models it loads (the
policy and its frozen reference, the critic, the frozen reward sources as callables), the prompts it
walks through, and the snapshots it saves at KL targets (--save-at-kl). Which reward each --reward
computes, and everything PPO does with the models, stays in ppo_token.py."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

import common
import lora
import plumbing
from plumbing import amp, checkpoint, distributed, hf_models
from plumbing.distributed import unwrap


# ----------------------------------------------------------------------------------------------
# The frozen models, called where they live
# ----------------------------------------------------------------------------------------------
def frozen_call(fn, model, query_response, attention_mask, *rest, **kw):
    """Run fn(model, ...) where the frozen model lives (GPU or, with --offload-frozen, CPU); the
    result comes back to the inputs' device."""
    device = next(model.parameters()).device
    moved = [t.to(device) for t in (query_response, attention_mask, *rest)]
    with torch.no_grad():
        return fn(model, *moved, **kw).to(query_response.device)


def reference_logprobs_fn(policy, ref_policy, temperature: float) -> Callable[..., Tensor]:
    """log π_ref(a_j) [B, R] as ref_logprobs_fn(query_response, attention_mask, full_response_mask):
    read from the frozen copy `ref_policy` (where it lives: offloaded or sharded as loaded) or, with
    LoRA (ref_policy None), from the policy itself with its adapters switched off."""
    def logprobs(model, *sequences):
        return common.response_logprobs(model, *sequences, temperature)[0]

    def frozen_copy(query_response, attention_mask, full_response_mask):
        return frozen_call(logprobs, ref_policy, query_response, attention_mask, full_response_mask)

    def adapters_off(query_response, attention_mask, full_response_mask):
        with torch.no_grad(), lora.adapters_disabled(unwrap(policy)):
            return logprobs(unwrap(policy), query_response, attention_mask, full_response_mask)
    return adapters_off if ref_policy is None else frozen_copy


def load_frozen_score_model(path, args, dist_info, what):
    """A trained reward model or discriminator, frozen (eval, no grad, dropout off), in
    --frozen-dtype."""
    model = hf_models.load_score_model(path, dtype=amp.frozen_dtype(args, dist_info.device),
                                       what=what, trust_remote_code=args.trust_remote_code,
                                       meta=dist_info.meta)
    return distributed.prepare_frozen(model, dist_info, args.offload_frozen, args.precision)


class RewardInCritic(nn.Module):
    """With LoRA, the reward model (or discriminator) the critic was started from: the critic's
    backbone with its adapters switched off, read by the frozen reward head. Called like a
    ScoreModel: -> scores [B, T]."""

    def __init__(self, critic: common.ScoreModel, reward_head: nn.Linear):
        super().__init__()
        self.critic, self.reward_head = critic, reward_head

    def forward(self, input_ids, attention_mask):
        with lora.adapters_disabled(self.critic):
            return self.critic(input_ids, attention_mask, head=self.reward_head)


def check_tokenizers(args, tokenizer):
    """The reward model and the discriminator must read token ids as the policy writes them."""
    for option, path in (("--reward-model", args.reward_model),
                         ("--discriminator", args.discriminator)):
        if path is not None:  # parse_args dropped a --discriminator that seq / red never use
            other = hf_models.load_tokenizer(path, args.trust_remote_code, what=option)
            hf_models.check_same_tokenizer(tokenizer, other, f"{option} {path}")


# ----------------------------------------------------------------------------------------------
# The trained models: the policy (with its frozen reference) and the critic
# ----------------------------------------------------------------------------------------------
def load_policy_and_reference(args, dist_info):
    """The policy in its training dtype (fp32, or --frozen-dtype for a LoRA base), dropout off,
    LoRA added; and the frozen reference π_ref, a second copy of --policy in --frozen-dtype where
    it lives (None with LoRA: the policy with its adapters off is the reference). Not yet wrapped
    for DDP / FSDP."""
    meta = dist_info.meta  # FSDP: rank 0 reads the weights, the others receive their shards
    policy = hf_models.load_policy(args.policy, amp.base_dtype(args, dist_info.device),
                                   args.trust_remote_code, what="--policy", meta=meta)
    common.disable_dropout(policy)
    lora.add_lora_from_args(policy, args)
    if args.lora_rank:
        return policy, None
    ref_dtype = amp.frozen_dtype(args, dist_info.device)
    ref_policy = hf_models.load_policy(args.policy, ref_dtype, args.trust_remote_code, meta=meta)
    ref_policy = distributed.prepare_frozen(ref_policy, dist_info, args.offload_frozen,
                                            args.precision)
    amp.round_like_frozen(policy, ref_dtype)  # start where the bf16 reference is: KL 0 at first
    return policy, ref_policy


def load_critic(args, dist_info, reward_option: str):
    """The critic V, a ScoreModel: a copy of the model behind `reward_option` (--critic-init reward:
    the reward model or the discriminator, head included) or the policy's backbone with a fresh
    head (--critic-init policy). Its head in fp32, LoRA on its backbone, dropout off. Returns
    (critic, the path it was started from or None)."""
    dtype = amp.base_dtype(args, dist_info.device)
    if args.critic_init == "policy":
        critic = hf_models.new_score_model(args.policy, bias=True, dtype=dtype,
                                           trust_remote_code=args.trust_remote_code,
                                           meta=dist_info.meta)
        critic_path = None
    else:
        critic_path = getattr(args, reward_option[2:].replace("-", "_"))
        if critic_path is None:
            raise common.InputError(f"--critic-init reward needs {reward_option} (--reward "
                                    f"{args.reward}); or use --critic-init policy")
        critic = hf_models.load_score_model(critic_path, dtype, args.trust_remote_code,
                                            what=reward_option, meta=dist_info.meta)
    critic.head.float()  # the value head is trained: fp32
    lora.add_lora_from_args(critic.backbone, args)  # the head stays trainable
    common.disable_dropout(critic)
    return critic, critic_path


def rewards_inside_critic(args, critic, critic_path) -> dict:
    """{path: frozen reward model} for make_reward_fn: with LoRA, the reward model (or
    discriminator) the critic started from is read from the critic's own backbone with its
    adapters off and the reward head, copied before training (or a resumed checkpoint) moves the
    value head; otherwise nothing is shared."""
    if not args.lora_rank or critic_path is None:
        return {}
    reward_head = distributed.frozen_copy(unwrap(critic).head)
    return {critic_path: RewardInCritic(unwrap(critic), reward_head).eval()}


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------
def select_pairs(args, quiet: bool = False):
    """The pairs whose prompts PPO trains on: --split (the RL part by default) of --split-seed's
    split."""
    pairs = plumbing.load_data(args.data, args.split, args.split_seed, args.limit, quiet=quiet)
    if not pairs:
        raise common.InputError(f"--data {args.data}: split {args.split!r} is empty")
    return pairs


def load_prompts(args, tokenizer, quiet=False) -> list[list[int]]:
    """Token ids of the --split prompts (rendered, BOS once, left-truncated to --max-prompt-len)."""
    return common.encode_prompts(tokenizer, select_pairs(args, quiet), args.max_prompt_len,
                                 args.chat_template)


def prompt_batch(prompts, step: int, batch_size: int, seed: int, rank: int, pad_id: int, device):
    """This rank's prompts for `step`: a walk through one seeded permutation per epoch
    (resumable)."""
    ids = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(k, len(prompts))
        generator = torch.Generator().manual_seed(seed + 1000 * rank + 1_000_003 * epoch)
        order = torch.randperm(len(prompts), generator=generator)
        ids.append(prompts[order[offset]])
    prompt, prompt_mask = common.pad_left(ids, pad_id)
    return prompt.to(device), prompt_mask.to(device)


# ----------------------------------------------------------------------------------------------
# Snapshots at KL targets (--save-at-kl)
# ----------------------------------------------------------------------------------------------
def add_snapshot_args(group):
    group.add_argument("--save-at-kl", type=float, nargs="*", default=[], metavar="KL",
                       help="KL targets: the policy is saved to OUT/policy_kl<target>/ (before "
                            "that iteration's update) the first time the rollouts' KL, a trailing "
                            "mean over --save-kl-window iterations, reaches each target; "
                            "OUT/snapshots.json records the iteration and KL of each")
    group.add_argument("--save-kl-window", type=int, default=3,
                       help="--save-at-kl: iterations in the trailing mean of the rollout KL (one "
                            "rollout's KL is a mean over only --rollout-batch-size responses)")
    group.add_argument("--stop-at-kl", action="store_true",
                       help="--save-at-kl: end the run (OUT/policy saved) once every target is "
                            "saved; --iterations stays the cap")


def check_snapshot_args(parser, args):
    plumbing.check_positive(parser, args, "save_kl_window")
    if any(kl <= 0 for kl in args.save_at_kl):
        parser.error("every --save-at-kl target must be > 0")
    if args.stop_at_kl and not args.save_at_kl:
        parser.error("--stop-at-kl needs --save-at-kl targets")
    args.save_at_kl = sorted(set(args.save_at_kl))


def snapshot_dir(out, target: float) -> Path:
    return Path(out) / f"policy_kl{target:g}"


def read_snapshots(out) -> dict:
    """{"<target>": {"iteration", "trailing_kl", "rollout_kl"}} of the snapshots saved so far."""
    path = Path(out) / "snapshots.json"
    return json.loads(path.read_text()) if path.exists() else {}


def trailing_mean(history: list[float], window: int) -> float:
    """Mean of the last `window` values: the rollout KL as --save-at-kl reads it."""
    last = history[-window:]
    return sum(last) / len(last)


def every_target_saved(targets, saved: dict) -> bool:
    """--stop-at-kl's end: every --save-at-kl target has its snapshot."""
    return all(f"{t:g}" in saved for t in targets)


def targets_reached(targets, saved: dict, trailing_kl: float) -> list[float]:
    """The targets without a snapshot yet that the trailing KL has reached (KL ≥ target)."""
    return [t for t in targets if f"{t:g}" not in saved and trailing_kl >= t]


def save_snapshot(policy, tokenizer, out: Path, target: float, saved: dict, master: bool):
    """The policy to OUT/policy_kl<target>/, whole or not at all: written into a temp folder
    (.save-*, removed at the next start if a kill leaves it), then renamed in one step; then
    OUT/snapshots.json rewritten as `saved`, the run's record of every snapshot (this one's
    included)."""
    final = snapshot_dir(out, target)
    temp = out / f".save-{final.name}"
    if master and temp.exists():
        shutil.rmtree(temp)
    hf_models.save_policy(policy, tokenizer, temp)  # every rank (FSDP gathers to rank 0)
    if master:
        if final.exists():  # from an interrupted run that resumed before this iteration
            shutil.rmtree(final)
        os.replace(temp, final)
        checkpoint.atomic_write(out / "snapshots.json", json.dumps(saved, indent=1) + "\n")
