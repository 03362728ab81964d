"""Per-token PPO: reinforcement learning where every response token can carry its own reward.

For each prompt the policy samples a response; a reward source scores it token by token; the
per-token reward r_j = task_j − β·KL_j feeds generalised advantage estimation (GAE), and PPO's
clipped objective updates the policy and a value model (the critic). `--reward` picks the task
reward:

    seq               Bradley–Terry reward model R_φ(x, y), all of it on the last response token
                      (sequence-level PPO, the baseline of both papers)
    red               RED eq. 6/7: r̂_j = β_c·(R_φ(x, y≤j) − R_φ(x, y≤j−1))
                                        + (1 − β_c)·R_φ(x, y)·[j = T]   (redistribute.py)
    tlcr              TLCR eq. 7: r_j = 2·D(a_j | x, a_<j) − 1 from the token discriminator D
    tlcr_fixed        +1 if D > 0.6, −1 if D < 0.4, else 0 (TLCR ablation)
    tlcr_no_negative  max(r_j, 0);  tlcr_no_positive: min(r_j, 0) (TLCR ablations, Figure 7)

One iteration (main's loop): a batch of prompts → `rollout`, steps 1-4 (generate, score, per-token
rewards, advantages and returns), which returns a `Rollout` whose fields say which action each
column belongs to → `ppo_update`, step 5 (PPO epochs) → one log line → a checkpoint when due.

The critic is a ScoreModel (backbone + one scalar per position). By default (--critic-init reward)
it starts as a copy of the reward model (seq, red) or the discriminator (tlcr*), head included, so
its first values are already on the scale of the rewards; --critic-init policy starts it from the
policy's backbone with a fresh head. Dropout is off in the policy, reference, critic and reward
models: the log-probs of the rollout and of the update must come from the same function, or the
first PPO ratio is not 1. The reference π_ref is a frozen copy of --policy (with LoRA: the policy
with its adapters off). `load_models` decides the mode (full or LoRA, offloaded, FSDP) once and
hands the rollout the reference log-probs and the task reward as callables.

The log fields and the LoRA layout (what is shared, what is frozen): docs/training.md, section
"PPO: log fields and LoRA layout".

Commands (outputs: OUT/log.jsonl, OUT/checkpoint/ to resume, OUT/policy/ the final HF model):
    python ppo_token.py --policy runs/demo/sft --reward tlcr \\
        --discriminator runs/demo/discriminator --reward-model runs/demo/reward_model \\
        --out runs/demo/ppo_tlcr                                  # CPU (fp32) or one GPU (bf16)
    python ppo_token.py --policy runs/demo/sft --reward red --reward-model runs/demo/reward_model \\
        --out runs/demo/ppo_red
    python ppo_token.py ... --gradient-checkpointing --offload-frozen  # one GPU, less memory
    python ppo_token.py ... --lora-rank 64                             # LoRA: two frozen backbones
    python ppo_token.py ... --compile      # the rollout's one-token decode step via torch.compile
    torchrun --nproc_per_node=8 ppo_token.py ...   # --rollout-batch-size prompts over all ranks
    torchrun --nproc_per_node=8 ppo_token.py ... --fsdp   # models sharded over the ranks (FSDP2)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

import common
import discriminator
import gold
import lora
import plumbing
import redistribute
from common import masked_mean
from plumbing import amp, checkpoint, decode, distributed, hf_models, ppo_setup
from plumbing.distributed import unwrap
from plumbing.ppo_setup import frozen_call

REWARDS = ("seq", "red", "tlcr", "tlcr_fixed", "tlcr_no_negative", "tlcr_no_positive")
TLCR_MODES = {"tlcr": "continuous", "tlcr_fixed": "fixed", "tlcr_no_negative": "no_negative",
              "tlcr_no_positive": "no_positive"}


def add_algorithm_args(parser):
    """The algorithm's options (data, model, system and scale options: parse_args, near main)."""
    algo = parser.add_argument_group("algorithm")
    algo.add_argument("--reward", required=True, choices=REWARDS,
                      help="task reward source, see the docstring")
    algo.add_argument("--iterations", type=int, default=200,
                      help="PPO iterations of the whole run (each: one rollout, then --ppo-epochs "
                           "passes over it)")
    algo.add_argument("--rollout-batch-size", type=int, default=16,
                      help="prompts per iteration, all ranks together (each rank samples its "
                           "share)")
    algo.add_argument("--minibatch-size", type=int, default=8,
                      help="responses per optimizer step, all ranks together")
    algo.add_argument("--micro-batch-size", type=int, default=0,
                      help="responses per forward/backward on one rank (gradient accumulation); "
                           "0 = the rank's share of a minibatch")
    algo.add_argument("--ppo-epochs", type=int, default=4, help="passes over each rollout")
    decode.add_sampling_args(algo, 128, "response length limit")
    algo.add_argument("--kl-coef", type=float, default=0.1,
                      help="β of the per-token KL penalty (TLCR 0.1, RED 0.02); with --kl-target "
                           "its starting value")
    algo.add_argument("--kl-target", type=float, default=0.0,
                      help="adaptive KL controller (Ziegler et al. 2019): after each iteration β ← "
                           "β·(1 + clip((KL − target)/target, ±0.2)·rollout size/--kl-horizon), "
                           "KL the rollout's mean Σ_t KL_t; 0 = off (β stays --kl-coef)")
    algo.add_argument("--kl-horizon", type=int, default=10000,
                      help="--kl-target: responses over which β moves by up to 20%%")
    algo.add_argument("--gamma", type=float, default=1.0, help="discount γ of GAE")
    algo.add_argument("--lam", type=float, default=0.95, help="λ of GAE")
    algo.add_argument("--clip-ratio", type=float, default=0.2,
                      help="ε of the clipped ratio π_θ/π_old")
    algo.add_argument("--clip-value", type=float, default=0.2,
                      help="value clip around the rollout values")
    algo.add_argument("--policy-lr", type=float, default=1e-5,
                      help="constant policy learning rate (the papers: 1e-6 for 7B models; smaller "
                           "models take larger steps, 1e-5 is the usual GPT-2-sized setting)")
    algo.add_argument("--critic-lr", type=float, default=3e-5,
                      help="constant critic learning rate (higher than the policy's: a critic "
                           "started from the reward model must move from rewards to values "
                           "quickly)")
    algo.add_argument("--max-grad-norm", type=float, default=1.0,
                      help="gradient clipping, each model apart")
    algo.add_argument("--whiten-advantages", action=argparse.BooleanOptionalAction, default=True,
                      help="normalise advantages over the rank's rollout tokens (masked)")
    algo.add_argument("--reward-clip", type=float, default=5.0,
                      help="clamp the task reward to ±this (0 = off)")
    algo.add_argument("--missing-eos-penalty", type=float, default=0.0,
                      help="subtracted from the last token's task reward of responses that hit "
                           "--max-new-tokens")
    algo.add_argument("--beta-c", type=float, default=1.0,
                      help="red: β_c of RED eq. 7 (1 = pure redistribution)")
    algo.add_argument("--zero-first", action="store_true",
                      help="red: take R(x, y≤−1) = 0 instead of the prompt's score, so the token "
                           "rewards sum to R(x, y) rather than R(x, y) − R(x, ∅)")
    return algo


# ----------------------------------------------------------------------------------------------
# What one iteration works on: the models, and the rollout that steps 1-4 produce
# ----------------------------------------------------------------------------------------------
@dataclass
class Models:
    """The trained models and their optimizers, and the frozen ones as callables. load_models builds
    them for the run's mode (full or LoRA, offloaded, FSDP); the rollout calls them the same way in
    every mode, each on (query_response, attention_mask, full_response_mask), all [B, P+R]."""

    policy: nn.Module  # π_θ (DDP- or FSDP-wrapped; unwrap() for the module)
    critic: nn.Module  # V, a common.ScoreModel
    policy_optimizer: torch.optim.Optimizer
    critic_optimizer: torch.optim.Optimizer
    ref_logprobs_fn: Callable[..., Tensor]  # -> [B, R] log π_ref(a_j | x, a_<j)
    reward_fn: Callable[..., Tensor]  # -> [B, R] the task reward of each action (--reward)
    score_fn: Callable[..., Tensor] | None = None  # -> [B] R_φ(x, y), logged; None: no reward model
    decoder: Callable | None = None  # how generate runs the policy (decode.make_decoder)
    # the rollout's policy: under FSDP kept gathered (distributed.gathered), else as it is
    keep_gathered: Callable = contextlib.nullcontext


@dataclass
class Rollout:
    """Steps 1-4 for B prompts. query_response = [left-padded prompt, P columns | response, R
    columns], so response token a_j sits at column P + j; action j samples a_j in the state
    s_j = (x, a_<j). Per-action fields are [B, R] and zero past a response's end; which column each
    is read at is pinned down in tests/test_ppo_token.py."""

    # the sequences
    query_response: Tensor  # [B, P+R] prompt ids, then response ids
    attention_mask: Tensor  # [B, P+R] 0 on the prompt's left pads and after the response's end
    full_response_mask: Tensor  # [B, P+R] 1 on the response's tokens, columns P .. P+R−1
    prompt_width: int  # P
    response: Tensor  # [B, R] a_j; pad_id after the end
    # [B, R] 1 on the actions up to and including the first EOS (any of the model's EOS ids), masked
    # by position, never by token id (pad == eos for GPT-2); 1 everywhere when no EOS came
    response_mask: Tensor
    # [B] False: truncated at --max-new-tokens. Such a response keeps its token rewards (seq: R_φ
    # read at its last token) and ends there (no bootstrapped value after it: the next state is not
    # in the data, and a critic guess would only add noise); --missing-eos-penalty charges it
    ended: Tensor

    # action j, read at column P + j − 1 (the state s_j, the column before a_j)
    logprobs: Tensor  # log π_old(a_j | s_j), the policy's logits divided by --temperature
    ref_logprobs: Tensor  # log π_ref(a_j | s_j), likewise
    entropy: Tensor  # H(π_old(· | s_j))
    values: Tensor  # V(s_j), the critic's scalar

    # action j, read at a_j's own column P + j (common.gather_response) and given to action j
    task_rewards: Tensor  # the --reward score of a_j, clipped, penalised (seq: all on the last)
    rm_score: Tensor | None  # [B] R_φ(x, y) at the last token, for the log (None: no reward model)

    # steps 3-4, per action j
    kl: Tensor  # KL_j = log π_old(a_j) − log π_ref(a_j) (k1 estimator)
    token_rewards: Tensor  # r_j = task_j − β·KL_j
    advantages: Tensor  # A_j by GAE (whitened over the rank's tokens with --whiten-advantages)
    returns: Tensor  # A_j + V(s_j), the critic's target


# ----------------------------------------------------------------------------------------------
# 1. Generate: sample responses with a KV cache; mask everything after the first EOS
# ----------------------------------------------------------------------------------------------
def sample_top_p(logits: Tensor, top_p: float) -> Tensor:
    """Nucleus sampling: draw from the smallest set of tokens whose probability reaches top_p,
    renormalised. [B, V] -> [B]

    A token is in the nucleus when the mass of the tokens sorted before it is < top_p (the top token
    always is); the nucleus is then every token at least as probable as τ, its least probable
    member. The draw is the exponential race torch.multinomial runs, argmax_i p_i / E_i with
    E_i ~ Exp(1) = −log U_i, which picks i with probability p_i / Σ p. Only the probabilities are
    sorted, never their ids, and E comes from torch.rand and a vectorised log: a sort with ids and
    multinomial's exponentials were most of a decode step on CPU at the demo model's size
    (docs/rollout-speed.md). (Inverse-CDF sampling, one uniform per row, is faster still, but a
    cumulative sum carries the rounding of every token before the draw: bf16 and fp32 logits then
    drew other tokens far more often.)
    """
    probs = logits.float().softmax(-1)  # [B, V]
    if top_p < 1:
        sorted_probs = sorted_descending(probs)  # [B, V]
        inside = sorted_probs.cumsum(-1) - sorted_probs < top_p  # mass before < top_p: a prefix
        tau = sorted_probs.gather(-1, inside.sum(-1, keepdim=True) - 1)  # [B, 1]
        probs = probs * (probs >= tau)
    exponentials = torch.rand_like(probs).log_().neg_()  # [B, V] E_i = −log U_i
    return (probs / exponentials).argmax(-1)


def sorted_descending(probs: Tensor) -> Tensor:
    """Each row's values sorted, largest first, without their ids [B, V]. On CPU by numpy's
    vectorised sort (about 10× torch.sort there, measured); elsewhere by torch.sort."""
    if probs.device.type == "cpu":
        return torch.from_numpy(np.sort(probs.detach().numpy(), axis=-1)).flip(-1)
    return probs.sort(-1, descending=True).values


@torch.no_grad()
def generate(policy, prompt, prompt_mask, eos_ids: list[int], pad_id: int, max_new_tokens: int,
             temperature=1.0, top_p=0.9, decoder=None, with_logprobs=False):
    """Sample up to max_new_tokens per row; stop once every row has produced one of eos_ids (under
    FSDP: every row of every rank, so that all ranks take the same number of decode steps).

    prompt [B, P] is left-padded, so every response starts at column P. Position ids count real
    tokens only (common.position_ids_from_mask), the same ones the training forward uses.
    `decoder` runs the policy (decode.make_decoder, chosen at load time; None: the default, a
    static KV cache). Returns response [B, R]; after a row's EOS the row is filled with pad_id.
    With with_logprobs, also log π(a_j | x, a_<j) of each sampled token at the sampling temperature
    (before the nucleus cut, as common.response_logprobs reads it), taken from the decode step's
    own logits [B, R]: what a scoring forward would recompute, without the forward.
    """
    decoder = decoder or decode.make_decoder()
    eos = torch.tensor(eos_ids, device=prompt.device)
    # logits of response token 0 [B, V]; next_logits(token, t): those after token t; finished(done):
    # every row has ended (under FSDP: on every rank, whose forwards are collectives)
    logits, next_logits, finished = decoder(policy, prompt, prompt_mask, max_new_tokens)
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    tokens, logprobs = [], []
    for t in range(max_new_tokens):
        scaled = logits / temperature  # [B, V]
        token = sample_top_p(scaled, top_p)  # [B]
        token = torch.where(done, torch.full_like(token, pad_id), token)
        tokens.append(token)
        if with_logprobs:  # log softmax(logits / T) at the drawn token [B]
            logprobs.append(scaled.float().log_softmax(-1).gather(-1, token[:, None]).squeeze(-1))
        done |= torch.isin(token, eos)
        if finished(done) or t == max_new_tokens - 1:
            break
        logits = next_logits(token, t)  # [B, V] after response token t
    response = torch.stack(tokens, 1)  # [B, R]
    return (response, torch.stack(logprobs, 1)) if with_logprobs else response


def response_mask_from(response: Tensor, eos_ids: list[int]) -> tuple[Tensor, Tensor]:
    """1 on tokens up to and including the first EOS (all tokens if none).
    Returns mask [B, R], ended [B]."""
    is_eos = torch.isin(response, torch.tensor(eos_ids, device=response.device))
    ended = is_eos.any(-1)  # [B]
    first_eos = is_eos.long().argmax(-1)  # [B] (0 when none)
    length = torch.where(ended, first_eos + 1, torch.full_like(first_eos, response.shape[1]))
    mask = (torch.arange(response.shape[1], device=response.device)[None] < length[:, None]).long()
    return mask, ended


# ----------------------------------------------------------------------------------------------
# 2. Score: values (log-probs: common.response_logprobs; reference and task reward: Models)
# ----------------------------------------------------------------------------------------------
def critic_values(critic, query_response, attention_mask, response_mask) -> Tensor:
    """V(s_j) for each action j: the critic's scalar at column P+j−1, the state before a_j.
    [B, T_resp] (the same columns common.response_logprobs reads the policy's logits at)."""
    values = critic(query_response, attention_mask).float()  # [B, T]
    index, valid = common.response_index(response_mask)  # [B, T_resp]
    return values.gather(1, (index - 1).clamp(min=0)) * valid


# ----------------------------------------------------------------------------------------------
# 3. Per-token rewards with the KL penalty
# ----------------------------------------------------------------------------------------------
def build_token_rewards(task_rewards, logprobs, ref_logprobs, response_mask, ended, kl_coef=0.1,
                        reward_clip=5.0, missing_eos_penalty=0.0):
    """r_j = clip(task_j) − β·KL_j, with KL_j = log π_θ(a_j) − log π_ref(a_j) (k1), per action j.

    All tensors [B, R] (ended [B]). A truncated row (ended False) loses missing_eos_penalty on its
    last action's task reward. Returns token_rewards, task_rewards (clipped, penalised), kl; zero
    past the end.
    """
    mask = response_mask.to(logprobs.dtype)
    task = task_rewards.float()
    if reward_clip > 0:
        task = task.clamp(-reward_clip, reward_clip)
    last = response_mask.long().sum(-1) - 1  # [B] column of each row's last action
    rows = torch.arange(task.shape[0], device=task.device)
    task = task.clone()
    task[rows, last] -= missing_eos_penalty * (~ended).to(task.dtype)
    task = task * mask
    kl = (logprobs - ref_logprobs) * mask  # KL_j, [B, R]
    token_rewards = task - kl_coef * kl  # r_j = task_j − β·KL_j
    return token_rewards, task, kl


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, horizon: int, n_steps: int) -> float:
    """The adaptive KL controller of Ziegler et al. 2019 (TRL's AdaptiveKLController), one update:

        e = clip((KL − target) / target, −0.2, 0.2),   β ← β·(1 + e·n_steps / horizon)

    KL above the target raises β (a stronger pull back to π_ref), below it lowers β; n_steps is the
    rollout's number of responses, so β moves by at most 20% per `horizon` responses."""
    error = min(max((kl - target) / target, -0.2), 0.2)
    return kl_coef * (1 + error * n_steps / horizon)


# ----------------------------------------------------------------------------------------------
# 4. Advantages and returns
# ----------------------------------------------------------------------------------------------
def gae(token_rewards, values, response_mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation over response tokens. All [B, R]; returns (advantages,
    returns).

    δ_j = r_j + γ·V(s_{j+1}) − V(s_j), A_j = δ_j + γλ·A_{j+1}; after the last action V = 0 (the
    episode ends at EOS or at the length limit). returns R_j = A_j + V(s_j), the critic's target.
    """
    mask = response_mask.to(values.dtype)
    values = values * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for j in reversed(range(values.shape[1])):
        delta = token_rewards[:, j] + gamma * next_value - values[:, j]  # δ_j
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, j]  # A_j
        advantages[:, j] = next_advantage
        next_value = values[:, j]
    return advantages, (advantages + values) * mask


def masked_whiten(values, mask, eps=1e-8):
    """(x − mean) / std over the unmasked entries; 0 where masked. One or no valid value gives
    zeros."""
    mask = mask.to(values.dtype)
    centred = (values - masked_mean(values, mask)) * mask
    var = (centred ** 2).sum() / (mask.sum() - 1).clamp(min=1)  # unbiased
    return centred * torch.rsqrt(var + eps)


# ----------------------------------------------------------------------------------------------
# 1-4 together: one rollout
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def rollout(models: Models, prompt, prompt_mask, eos_ids: list[int], pad_id: int, args,
            kl_coef: float | None = None) -> Rollout:
    """Steps 1-4 for one batch of left-padded prompts [B, P]; β = kl_coef (the adaptive
    controller's current value), or --kl-coef."""
    kl_coef = args.kl_coef if kl_coef is None else kl_coef
    policy, critic = unwrap(models.policy), unwrap(models.critic)
    policy.eval()  # dropout is 0 either way; eval() switches gradient checkpointing off (KV cache)
    critic.eval()
    # (FSDP: the policy is kept gathered for the whole rollout, models.keep_gathered)
    with amp.autocast(prompt.device, args.precision), models.keep_gathered(models.policy):
        # 1. generate
        response = generate(policy, prompt, prompt_mask, eos_ids, pad_id, args.max_new_tokens,
                            args.temperature, args.top_p, models.decoder)  # [B, R]
        mask, ended = response_mask_from(response, eos_ids)  # [B, R], [B]
        query_response = torch.cat([prompt, response], 1)  # [B, P+R]
        attention_mask = torch.cat([prompt_mask.long(), mask], 1)  # 0 on left pads and after EOS
        full_response_mask = torch.cat([torch.zeros_like(prompt_mask.long()), mask], 1)  # [B, P+R]
        sequences = (query_response, attention_mask, full_response_mask)
        # 2. score (the longest response fills all R columns, so every [B, T_resp] here is [B, R])
        logprobs, entropy = common.response_logprobs(policy, *sequences, args.temperature,
                                                     with_entropy=True)
        ref_logprobs = models.ref_logprobs_fn(*sequences)
        values = critic_values(critic, *sequences)
        task_rewards = models.reward_fn(*sequences).float()  # [B, R]
        if task_rewards.shape != mask.shape:
            raise ValueError(f"reward_fn returned {tuple(task_rewards.shape)}, expected [B, R] = "
                             f"{tuple(mask.shape)}")
        rm_score = models.score_fn(*sequences).float() if models.score_fn else None  # [B]
    # 3. compute per-token rewards
    token_rewards, task_rewards, kl = build_token_rewards(
        task_rewards, logprobs, ref_logprobs, mask, ended, kl_coef, args.reward_clip,
        args.missing_eos_penalty)
    # 4. compute advantages and returns
    advantages, returns = gae(token_rewards, values, mask, args.gamma, args.lam)
    if args.whiten_advantages:
        # over this rank's rollout only: ranks stay independent between the gradient all-reduces,
        # and with a rollout of a few hundred tokens per rank the statistics are already stable
        advantages = masked_whiten(advantages, mask)
    return Rollout(query_response=query_response, attention_mask=attention_mask,
                   full_response_mask=full_response_mask, prompt_width=prompt.shape[1],
                   response=response, response_mask=mask, ended=ended, logprobs=logprobs,
                   ref_logprobs=ref_logprobs, entropy=entropy, values=values,
                   task_rewards=task_rewards, rm_score=rm_score, kl=kl, token_rewards=token_rewards,
                   advantages=advantages, returns=returns)


def rollout_stats(batch: Rollout) -> dict:
    """Per-step statistics of one rollout (the TLCR paper's Figure 7 curves), as plain floats."""
    mask = batch.response_mask.float()
    returns, values = batch.returns, batch.values
    residual_var = masked_mean((returns - values - masked_mean(returns - values, mask)) ** 2, mask)
    returns_var = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    stats = dict(
        task_reward=batch.task_rewards.sum(-1).mean(),  # Σ_j task_j per response, averaged
        token_reward=masked_mean(batch.token_rewards, mask),  # mean r_j = task_j − β·KL_j per token
        kl=batch.kl.sum(-1).mean(),  # Σ_j (log π_θ − log π_ref) per response (k1), averaged
        entropy=masked_mean(batch.entropy, mask),  # policy entropy per token
        perplexity=torch.exp(-masked_mean(batch.logprobs, mask)),  # of the responses under π_θ
        response_length=mask.sum(-1).mean(),
        eos_fraction=batch.ended.float().mean(),
        explained_variance=1 - residual_var / returns_var.clamp(min=1e-8),
    )
    if batch.rm_score is not None:
        stats["rm_score"] = batch.rm_score.mean()
    return {k: float(v) for k, v in stats.items()}


# ----------------------------------------------------------------------------------------------
# 5. PPO epochs
# ----------------------------------------------------------------------------------------------
def policy_loss(new_logprobs, old_logprobs, advantages, clip_ratio=0.2):
    """Clipped surrogate per token: max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), ρ = π_θ / π_old (not π_ref).
    Returns (loss, clipped), both [B, R]."""
    ratio = torch.exp(new_logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_ratio, 1 + clip_ratio)
    return torch.max(unclipped, clipped), clipped > unclipped


def value_loss(new_values, old_values, returns, clip_value=0.2):
    """Clipped value loss per token: ½·max((V − R)², (V_old + clip(V − V_old, ±c) − R)²).
    Returns (loss, clipped), both [B, R]."""
    clipped_values = old_values + (new_values - old_values).clamp(-clip_value, clip_value)
    unclipped, clipped = (new_values - returns) ** 2, (clipped_values - returns) ** 2
    return 0.5 * torch.max(unclipped, clipped), clipped > unclipped


def minibatch_losses(policy, critic, batch: Rollout, idx, n_tokens, args):
    """Policy loss, value loss and their clip fractions on responses `idx`, each as a share of the
    minibatch's token mean (sum over these tokens / n_tokens), so micro-batches add up exactly."""
    # the longest response here: later columns are padding
    width = int(batch.response_mask[idx].sum(-1).max())
    columns = batch.prompt_width + width
    sequences = (batch.query_response[idx, :columns], batch.attention_mask[idx, :columns],
                 batch.full_response_mask[idx, :columns])
    mask = batch.response_mask[idx, :width].float()  # [b, width]
    with amp.autocast(sequences[0].device, args.precision):
        new_logprobs, _ = common.response_logprobs(policy, *sequences, args.temperature)
        new_values = critic_values(critic, *sequences)  # [b, width]
    pg_loss, pg_clipped = policy_loss(new_logprobs, batch.logprobs[idx, :width],
                                      batch.advantages[idx, :width], args.clip_ratio)
    vf_loss, vf_clipped = value_loss(new_values, batch.values[idx, :width],
                                     batch.returns[idx, :width], args.clip_value)
    return [(x * mask).sum() / n_tokens for x in (pg_loss, vf_loss, pg_clipped, vf_clipped)]


def ppo_update(models: Models, batch: Rollout, args, minibatch: int) -> dict:
    """ppo-epochs passes over the rollout in shuffled minibatches of `minibatch` responses (this
    rank's share). Returns mean losses and clip fractions."""
    policy, critic = models.policy, models.critic
    unwrap(policy).train()  # dropout is 0 already; train() turns gradient checkpointing on (if set)
    unwrap(critic).train()
    device = batch.query_response.device
    B = batch.response_mask.shape[0]
    micro = args.micro_batch_size or minibatch
    names = ("policy_loss", "value_loss", "policy_clipfrac", "value_clipfrac")  # minibatch_losses'
    sums = {k: torch.zeros((), device=device) for k in names}
    n_updates = 0
    for _ in range(args.ppo_epochs):
        order = torch.randperm(B, device=device)
        for start in range(0, B, minibatch):
            indices = order[start:start + minibatch]
            # losses: token means over the minibatch
            n_tokens = batch.response_mask[indices].sum().clamp(min=1)
            models.policy_optimizer.zero_grad(set_to_none=True)
            models.critic_optimizer.zero_grad(set_to_none=True)
            for m_start in range(0, len(indices), micro):  # gradient accumulation: micro-batches
                micro_indices = indices[m_start:m_start + micro]
                with distributed.accumulate((policy, critic), last=m_start + micro >= len(indices)):
                    losses = minibatch_losses(policy, critic, batch, micro_indices, n_tokens, args)
                    # disjoint parameters: one backward fills both models' grads
                    (losses[0] + losses[1]).backward()
                for key, value in zip(sums, losses):
                    sums[key] += value.detach()
            distributed.clip_grad_norm(policy, args.max_grad_norm)
            distributed.clip_grad_norm(critic, args.max_grad_norm)
            models.policy_optimizer.step()
            models.critic_optimizer.step()
            n_updates += 1
    return {k: float(v) / max(n_updates, 1) for k, v in sums.items()}


# ----------------------------------------------------------------------------------------------
# Setup: the models (plumbing/ppo_setup.py loads them) and the reward sources
# ----------------------------------------------------------------------------------------------
def make_reward_fn(args, dist_info, shared: dict | None = None):
    """The task reward source of --reward as reward_fn(query_response, attention_mask,
    response_mask) -> [B, T_resp], plus score_fn(...) -> [B] (the reward model's sequence score,
    for logging) or None without --reward-model. shared: {path: model} already loaded (with LoRA,
    the reward model or discriminator inside the critic)."""
    shared = shared or {}

    def load(path, what):
        if path in shared:
            return shared[path]
        return ppo_setup.load_frozen_score_model(path, args, dist_info, what)

    reward_model = load(args.reward_model, "--reward-model") if args.reward_model else None

    def score_fn(query_response, attention_mask, response_mask):
        return frozen_call(redistribute.sequence_reward, reward_model, query_response,
                           attention_mask, response_mask)

    if args.reward == "seq":
        def reward_fn(query_response, attention_mask, response_mask):  # R_φ(x, y) on the last
            return frozen_call(redistribute.sparse_token_rewards, reward_model, query_response,
                               attention_mask, response_mask)
    elif args.reward == "red":
        def reward_fn(query_response, attention_mask, response_mask):  # RED eq. 6/7, one forward
            return frozen_call(redistribute.redistribute, reward_model, query_response,
                               attention_mask, response_mask, beta_c=args.beta_c,
                               zero_first=args.zero_first)
    else:
        disc = load(args.discriminator, "--discriminator")

        def reward_fn(query_response, attention_mask, response_mask):  # TLCR eq. 7 or an ablation
            return frozen_call(discriminator.token_rewards, disc, query_response, attention_mask,
                               response_mask, mode=TLCR_MODES[args.reward])
    return reward_fn, (score_fn if reward_model is not None else None)


def load_models(args, dist_info, reward_fn=None) -> Models:
    """Policy and critic (trained, wrapped for DDP or FSDP) with their optimizers, and the frozen
    models as callables: the reference log-probs (a frozen copy of --policy; with LoRA the policy
    with its adapters off) and the --reward source (with LoRA read from the critic's backbone with
    its adapters off). `reward_fn` (optional) replaces the --reward source, e.g. a toy reward."""
    policy, ref_policy = ppo_setup.load_policy_and_reference(args, dist_info)
    reward_option = "--reward-model" if args.reward in ("seq", "red") else "--discriminator"
    critic, critic_path = ppo_setup.load_critic(args, dist_info, reward_option)
    if args.gradient_checkpointing:  # active in train() mode only: generation keeps its KV cache
        hf_models.enable_gradient_checkpointing(policy)
        hf_models.enable_gradient_checkpointing(critic)
    policy = distributed.wrap_model(policy, dist_info, args.precision)
    critic = distributed.wrap_model(critic, dist_info, args.precision)
    score_fn = None
    if reward_fn is None:
        shared = ppo_setup.rewards_inside_critic(args, critic, critic_path)
        reward_fn, score_fn = make_reward_fn(args, dist_info, shared)
    # how the rollout runs the policy, decided here once: the decoder (a static KV cache, compiled
    # with --compile, which parse_args refuses with --fsdp); under FSDP every forward all-gathers
    # each layer's weights and frees them again, and generation runs the policy once per token, so
    # the rollout keeps it gathered: one all-gather per layer per rollout instead of per token, for
    # the price of the whole policy on every rank meanwhile
    decoder = decode.make_decoder(args.compile, dist_info.device.type, sharded=args.fsdp)
    keep_gathered = distributed.gathered if args.fsdp else contextlib.nullcontext
    return Models(policy, critic, plumbing.adamw(policy, args.policy_lr),
                  plumbing.adamw(critic, args.critic_lr),
                  ppo_setup.reference_logprobs_fn(policy, ref_policy, args.temperature), reward_fn,
                  score_fn, decoder, keep_gathered)


# ----------------------------------------------------------------------------------------------
# The state that a resume restores
# ----------------------------------------------------------------------------------------------
def resumed_kl_state(args, out: Path, start_step: int) -> tuple[list[float], float]:
    """The rollout KL of every iteration logged so far (--save-at-kl's trailing mean needs the last
    few) and β: --kl-coef, or with --kl-target the controller's value after the last logged
    iteration (log.jsonl is rewound to the checkpoint's step by run.resume)."""
    rows = [r for r in checkpoint.read_jsonl_tolerant(out / "log.jsonl")
            if isinstance(r.get("step"), int) and r["step"] <= start_step] if start_step else []
    rows.sort(key=lambda r: r["step"])
    kl_coef = args.kl_coef
    if args.kl_target and rows and "kl_coef" in rows[-1]:
        kl_coef = adaptive_kl_coef(rows[-1]["kl_coef"], rows[-1]["kl"], args.kl_target,
                                   args.kl_horizon, args.rollout_batch_size)
    return [r["kl"] for r in rows], kl_coef


# ----------------------------------------------------------------------------------------------
# The script: options (the algorithm's first, above), then main
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=plumbing.HelpFormatter)
    add_algorithm_args(parser)
    data = plumbing.add_data_args(parser.add_argument_group("data"), split="rl", response_len=False)
    data.add_argument("--out", required=True, help="output dir: log.jsonl, checkpoint/, policy/")
    model = parser.add_argument_group("model")
    model.add_argument("--policy", required=True,
                       help="SFT model dir (HF causal LM); also loaded again as the frozen "
                            "reference")
    model.add_argument("--reward-model",
                       help="Bradley–Terry reward model dir; required by seq/red, optional for "
                            "tlcr* (then its score is logged as rm_score)")
    model.add_argument("--discriminator", help="TLCR discriminator dir; required by tlcr*")
    model.add_argument("--critic-init", default="reward", choices=("reward", "policy"),
                       help="reward: critic = copy of the reward model (seq/red) or discriminator "
                            "(tlcr*), head included; policy: the policy's backbone with a fresh "
                            "head")
    lora.add_lora_args(parser)
    system = plumbing.add_system_args(parser)
    system.add_argument("--log-gold", action="store_true",
                        help="the offline lab: log gold_score, the mean gold.py score of each "
                             "rollout's responses")
    gold.add_lexicon_arg(system, "--log-gold")
    system.add_argument("--offload-frozen", action="store_true",
                        help="keep the frozen reference and reward models on the CPU (with LoRA: "
                             "those that do not share the policy's or the critic's backbone)")
    ppo_setup.add_snapshot_args(system)
    plumbing.add_run_args(system, save_every=50, unit="iterations")
    args = parser.parse_args(argv)
    lora.check_lora_args(parser, args)
    gold.lexicon_from_args(parser, args, args.log_gold, "--log-gold")  # checked (a bad file: here)
    if args.compile and args.fsdp:
        parser.error("--compile does not go together with --fsdp: the compiled decode step would "
                     "trace the sharded policy's all-gathers; drop one of them")
    if args.offload_frozen and args.fsdp:
        parser.error("--offload-frozen and --fsdp do not go together: FSDP already spreads the "
                     "frozen models over the ranks")
    if args.reward in ("seq", "red") and not args.reward_model:
        parser.error(f"--reward {args.reward} needs --reward-model DIR")
    if args.reward.startswith("tlcr") and not args.discriminator:
        parser.error(f"--reward {args.reward} needs --discriminator DIR")
    if args.reward in ("seq", "red") and args.discriminator:  # never read: not checked, not loaded
        warnings.warn(f"--reward {args.reward} does not use --discriminator; "
                      f"ignoring {args.discriminator}")
        args.discriminator = None
    plumbing.check_positive(parser, args, "iterations", "rollout_batch_size", "minibatch_size",
                            "ppo_epochs", "max_new_tokens", "max_prompt_len", "save_every")
    plumbing.check_positive(parser, args, "kl_horizon")
    if args.kl_target < 0:
        parser.error("--kl-target must be ≥ 0 (0 = off)")
    ppo_setup.check_snapshot_args(parser, args)
    if args.rollout_batch_size % args.minibatch_size:
        parser.error(f"--rollout-batch-size {args.rollout_batch_size} must be a multiple of "
                     f"--minibatch-size {args.minibatch_size}")
    decode.check_sampling_args(parser, args)
    return args


def main(argv=None, reward_fn=None):
    """Train. `reward_fn` (optional) replaces the --reward source, e.g. a toy reward in tests."""
    args = parse_args(argv)
    run = plumbing.start_run(args)  # torchrun or one process, seeds, a killed save's temp removed
    dist_info, out = run.dist_info, run.out
    device, master, rank = dist_info.device, dist_info.master, dist_info.rank
    for name in ("rollout_batch_size", "minibatch_size"):
        if getattr(args, name) % dist_info.world_size:
            raise common.InputError(f"--{name.replace('_', '-')} {getattr(args, name)} is not "
                                    f"divisible by the {dist_info.world_size} processes")
    rollout_per_rank = args.rollout_batch_size // dist_info.world_size
    minibatch_per_rank = args.minibatch_size // dist_info.world_size

    tokenizer = hf_models.load_tokenizer(args.policy, args.trust_remote_code, what="--policy")
    if reward_fn is None:
        # before any model is loaded: mismatches stop at once
        ppo_setup.check_tokenizers(args, tokenizer)
    prompts = ppo_setup.load_prompts(args, tokenizer, quiet=not master)
    models = load_models(args, dist_info, reward_fn)
    eos_ids = common.eos_token_ids(tokenizer, unwrap(models.policy))
    pad_id = tokenizer.pad_token_id
    n_positions = getattr(unwrap(models.policy).config, "max_position_embeddings", None)
    if n_positions and max(map(len, prompts)) + args.max_new_tokens > n_positions:
        raise common.InputError(f"--max-prompt-len + --max-new-tokens exceeds the model's "
                                f"{n_positions} positions")

    lexicon = gold.load_lexicon(args.lexicon) if args.log_gold else None  # the lab's gold
    start_step = run.resume({"policy": models.policy, "critic": models.critic},
                            {"policy": models.policy_optimizer, "critic": models.critic_optimizer},
                            # constant learning rates: a run may grow; snapshots do not train
                            ignore=("iterations", "save_at_kl", "save_kl_window", "stop_at_kl"))
    kl_history, kl_coef = resumed_kl_state(args, out, start_step)
    saved = ppo_setup.read_snapshots(out)  # every rank: each decides the same snapshots
    if master:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write(out / "args.json", json.dumps(
            {**vars(args), "lexicon_id": lexicon.id if lexicon else None}, indent=2))
        print(f"ppo_token: reward={args.reward}, {len(prompts)} prompts, world size "
              f"{dist_info.world_size}, "
              f"{'resuming at iteration ' + str(start_step) if start_step else 'fresh start'}")

    bar = tqdm(range(start_step, args.iterations), initial=start_step, total=args.iterations,
               disable=not master, desc="ppo")
    start = time.perf_counter()
    done, stopped = start_step, False  # iterations done; stopped by --stop-after
    for step in bar:
        if args.stop_at_kl and ppo_setup.every_target_saved(args.save_at_kl, saved):
            break  # --stop-at-kl: a resumed run that had ended
        t0 = time.perf_counter()
        # all randomness of a step (sampling, minibatch order) is a function of (seed, rank, step)
        torch.manual_seed(args.seed + 1000 * rank + 1_000_003 * (step + 1))
        prompt, prompt_mask = ppo_setup.prompt_batch(prompts, step, rollout_per_rank, args.seed,
                                                     rank, pad_id, device)
        # 1-4. generate, score, per-token rewards, advantages and returns
        batch = rollout(models, prompt, prompt_mask, eos_ids, pad_id, args, kl_coef)
        stats = rollout_stats(batch)
        stats["kl_coef"] = kl_coef  # β of this rollout's rewards
        if args.save_at_kl:  # before this iteration's update: the policy that sampled the rollout
            kl_history.append(distributed.all_reduce_mean(stats["kl"], dist_info))
            stats["kl_trailing"] = ppo_setup.trailing_mean(kl_history, args.save_kl_window)
            for target in ppo_setup.targets_reached(args.save_at_kl, saved, stats["kl_trailing"]):
                saved[f"{target:g}"] = {"iteration": step + 1, "trailing_kl": stats["kl_trailing"],
                                        "rollout_kl": kl_history[-1]}
                ppo_setup.save_snapshot(models.policy, tokenizer, out, target, saved, master)
        if args.log_gold:  # the lab's known reward (gold.py): logged, never seen by the optimiser
            scores = gold.score_responses(tokenizer, batch.response.cpu(),
                                          batch.response_mask.cpu(), lexicon=lexicon)
            stats["gold_score"] = sum(scores) / len(scores)
        # 5. PPO epochs
        stats.update(ppo_update(models, batch, args, minibatch_per_rank))
        # log: means over the ranks (every rank takes part)
        stats["tokens"] = float(batch.response_mask.sum())
        stats = {k: distributed.all_reduce_mean(v, dist_info) for k, v in stats.items()}
        tokens = stats.pop("tokens") * dist_info.world_size
        record = {"step": step + 1, **stats, "elapsed_s": round(time.perf_counter() - start, 2),
                  "tokens_per_s": tokens / (time.perf_counter() - t0)}
        run.logger.log(record)
        if args.kl_target:  # the adaptive controller moves β for the next rollout
            kl_coef = adaptive_kl_coef(kl_coef, record["kl"], args.kl_target, args.kl_horizon,
                                       args.rollout_batch_size)
        bar.set_postfix_str(f"task {record['task_reward']:.3f} kl {record['kl']:.3f} "
                            f"len {record['response_length']:.1f} eos {record['eos_fraction']:.2f} "
                            f"vf {record['value_loss']:.3f} ev {record['explained_variance']:.2f}")
        done = step + 1
        # --stop-at-kl: the run ends after the iteration that took the last snapshot
        ended = args.stop_at_kl and ppo_setup.every_target_saved(args.save_at_kl, saved)
        run.save_if_due(done, done if ended else args.iterations)  # --save-every, --stop-after
        if ended:
            break
        if run.stop_requested(done, args.iterations):  # --stop-after: stop as if killed
            stopped = True
            break
    bar.close()
    if stopped:  # run it again to resume
        return run.finish()
    hf_models.save_policy(models.policy, tokenizer, out / "policy")  # gathered (FSDP), LoRA merged
    if master:
        print(f"ppo_token: done, policy saved to {out / 'policy'}")
    return run.finish(out / "policy")


if __name__ == "__main__":
    plumbing.cli(main)
