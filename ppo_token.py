"""Per-token PPO: reinforcement learning where every response token can carry its own reward.

For each prompt the policy samples a response; a reward source scores it token by token; the
per-token reward r_j = task_j − β·KL_j feeds generalised advantage estimation (GAE), and PPO's
clipped objective updates the policy and a value model (the critic). `--reward` picks the task reward:

    seq               Bradley–Terry reward model R_φ(x, y), all of it on the last response token
                      (sequence-level PPO, the baseline of both papers)
    red               RED eq. 6/7: r̂_j = β_c·(R_φ(x, y≤j) − R_φ(x, y≤j−1)) + (1 − β_c)·R_φ(x, y)·[j = T]
                      (redistribute.py)
    tlcr              TLCR eq. 7: r_j = 2·D(a_j | x, a_<j) − 1 from the token discriminator D
    tlcr_fixed        +1 if D > 0.6, −1 if D < 0.4, else 0 (TLCR ablation)
    tlcr_no_negative  max(r_j, 0);  tlcr_no_positive: min(r_j, 0) (TLCR ablations, Figure 7)

Who gets what (pinned down in tests/test_ppo_token.py). query_response = [left-padded prompt, P
columns | response, R columns], so response token a_j sits at column P + j. Action j samples a_j:
    log π(a_j | x, a_<j)    read from the policy logits at column P + j − 1 (divided by temperature)
    V(s_j), s_j = (x, a_<j) read from the critic at column P + j − 1 (the state before a_j)
    task reward of a_j      read at a_j's own column P + j (common.gather_response), given to action j
    KL_j = log π_θ(a_j) − log π_ref(a_j)   (k1 estimator) enters the reward of action j: −β·KL_j
    seq: R_φ(x, y) is read at the last response token and given to the last action.
A response ends at, and includes, its first EOS; everything after is masked by position (pad == eos
for GPT-2, so never by token id). A response that reaches --max-new-tokens without EOS is
"truncated": it keeps its token rewards (seq: R_φ read at its last token), is treated as finished
(no bootstrapped value after it), and its last token's task reward is lowered by
--missing-eos-penalty (default 0: off).

The critic is a ScoreModel (backbone + one scalar per position). By default (--critic-init reward) it
starts as a copy of the reward model (seq, red) or the discriminator (tlcr*), head included;
--critic-init policy starts it from the policy's backbone with a fresh head. Dropout is off in the
policy, reference, critic and reward models. The reference π_ref is a frozen copy of --policy.

Log: OUT/log.jsonl, one JSON line per step, averaged over ranks: task_reward (Σ_j task_j per response,
after the clip and the EOS penalty), token_reward (mean r_j per token), rm_score (R_φ(x, y), when
--reward-model is given), kl (Σ_j KL_j per response), entropy (of π_θ, per token), perplexity (exp of
the mean −log π_θ(a_j) over the sampled tokens), response_length, eos_fraction (share ending at EOS),
policy_clipfrac, value_clipfrac, policy_loss, value_loss, explained_variance (of the returns by the
rollout values), time (seconds per step), tokens_per_s (response tokens of all ranks per second).

Commands (outputs: OUT/log.jsonl one line per step, OUT/checkpoint/ to resume, OUT/policy/ final HF model):
    python ppo_token.py --policy runs/demo/sft --reward tlcr --discriminator runs/demo/disc \\
        --reward-model runs/demo/rm --out runs/demo/ppo_tlcr            # CPU or one GPU (bf16 autocast)
    python ppo_token.py --policy runs/demo/sft --reward red --reward-model runs/demo/rm --out runs/demo/ppo_red
    python ppo_token.py ... --gradient-checkpointing --offload-frozen    # one GPU, less memory
    torchrun --nproc_per_node=8 ppo_token.py ...                          # each rank samples --batch-size prompts
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

import common
from common import masked_mean, position_ids_from_mask, unwrap

REWARDS = ("seq", "red", "tlcr", "tlcr_fixed", "tlcr_no_negative", "tlcr_no_positive")
TLCR_MODES = {"tlcr": "continuous", "tlcr_fixed": "fixed", "tlcr_no_negative": "no_negative",
              "tlcr_no_positive": "no_positive"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data", default="bundled",
                      help="preference pairs: 'bundled', 'hh-rlhf[:SUBSETS]' or a .jsonl(.gz) file")
    data.add_argument("--split", default="rl", choices=("sft", "reward", "rl", "test"),
                      help="which split's prompts to train on")
    data.add_argument("--split-seed", type=int, default=0, help="seed of common.split_pairs (keep equal across stages)")
    data.add_argument("--max-prompt-len", type=int, default=256, help="prompts longer than this keep their last tokens")
    data.add_argument("--out", required=True, help="output dir: log.jsonl, checkpoint/, policy/")
    model = parser.add_argument_group("model")
    model.add_argument("--policy", required=True,
                       help="SFT model dir (HF causal LM); also loaded again as the frozen reference")
    model.add_argument("--reward", required=True, choices=REWARDS, help="task reward source, see the docstring")
    model.add_argument("--reward-model", help="Bradley–Terry reward model dir (ScoreModel); required by seq/red, "
                                              "optional for tlcr* (then its score is logged as rm_score)")
    model.add_argument("--discriminator", help="TLCR discriminator dir (ScoreModel); required by tlcr*")
    model.add_argument("--critic-init", default="reward", choices=("reward", "policy"),
                       help="reward: critic = copy of the reward model (seq/red) or discriminator (tlcr*), "
                            "head included; policy: the policy's backbone with a fresh head")
    algo = parser.add_argument_group("algorithm")
    algo.add_argument("--steps", type=int, default=200,
                      help="PPO iterations (one rollout + ppo-epochs of updates each)")
    algo.add_argument("--batch-size", type=int, default=16, help="prompts per rollout per rank")
    algo.add_argument("--minibatch-size", type=int, default=8, help="responses per optimizer step (per rank)")
    algo.add_argument("--micro-batch-size", type=int, default=0,
                      help="responses per forward/backward (gradient accumulation); 0 = minibatch")
    algo.add_argument("--ppo-epochs", type=int, default=4, help="passes over each rollout")
    algo.add_argument("--max-new-tokens", type=int, default=128, help="response length limit")
    algo.add_argument("--temperature", type=float, default=1.0,
                      help="sampling temperature (log-probs are recomputed with it)")
    algo.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    algo.add_argument("--kl-coef", type=float, default=0.1, help="β of the per-token KL penalty (TLCR 0.1, RED 0.02)")
    algo.add_argument("--gamma", type=float, default=1.0, help="discount γ of GAE")
    algo.add_argument("--lam", type=float, default=0.95, help="λ of GAE")
    algo.add_argument("--clip-ratio", type=float, default=0.2, help="ε of the clipped ratio π_θ/π_old")
    algo.add_argument("--clip-value", type=float, default=0.2, help="value clip around the rollout values")
    algo.add_argument("--policy-lr", type=float, default=1e-5,
                      help="constant policy learning rate (the papers: 1e-6 for 7B models; smaller models take "
                           "larger steps, 1e-5 is the usual GPT-2-sized setting)")
    algo.add_argument("--critic-lr", type=float, default=3e-5,
                      help="constant critic learning rate (higher than the policy's: a critic started from the "
                           "reward model must move from rewards to values quickly)")
    algo.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping, each model apart")
    algo.add_argument("--whiten-advantages", action=argparse.BooleanOptionalAction, default=True,
                      help="normalise advantages over the rollout's response tokens (masked)")
    algo.add_argument("--reward-clip", type=float, default=5.0, help="clamp the task reward to ±this (0 = off)")
    algo.add_argument("--missing-eos-penalty", type=float, default=0.0,
                      help="subtracted from the last token's task reward of responses that hit --max-new-tokens")
    algo.add_argument("--beta-c", type=float, default=1.0, help="red: β_c of RED eq. 7 (1 = pure redistribution)")
    algo.add_argument("--zero-first", action="store_true",
                      help="red: take R(x, y≤−1) = 0 instead of the prompt's score, so the token rewards "
                           "sum to R(x, y) rather than R(x, y) − R(x, ∅)")
    system = common.add_system_args(parser)
    system.add_argument("--offload-frozen", action="store_true",
                        help="keep the frozen reference and reward models on the CPU")
    system.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (and at the end)")
    system.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="resume from OUT/checkpoint if present")
    args = parser.parse_args(argv)
    if args.reward in ("seq", "red") and not args.reward_model:
        parser.error(f"--reward {args.reward} needs --reward-model DIR")
    if args.reward.startswith("tlcr") and not args.discriminator:
        parser.error(f"--reward {args.reward} needs --discriminator DIR")
    if args.batch_size % args.minibatch_size:
        parser.error(f"--batch-size {args.batch_size} must be a multiple of --minibatch-size {args.minibatch_size}")
    if args.temperature <= 0 or not 0 < args.top_p <= 1:
        parser.error("--temperature must be > 0 and --top-p in (0, 1]")
    return args


# ----------------------------------------------------------------------------------------------
# 1. Generate: sample responses with a KV cache; mask everything after the first EOS
# ----------------------------------------------------------------------------------------------
def sample_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus sampling: draw from the smallest set of tokens whose probability reaches top_p. [B, V] -> [B]"""
    probs = logits.float().softmax(-1)
    if top_p >= 1:
        return torch.multinomial(probs, 1).squeeze(-1)
    sorted_probs, sorted_ids = probs.sort(-1, descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # mass before a token < top_p; the top token always stays
    choice = torch.multinomial(sorted_probs * keep, 1)  # multinomial renormalises
    return sorted_ids.gather(-1, choice).squeeze(-1)


def keep_logits(model, n: int) -> dict:
    """Ask for the logits of the last n positions only, where the model supports it (saves [B, P, V])."""
    return {"logits_to_keep": n} if "logits_to_keep" in inspect.signature(unwrap(model).forward).parameters else {}


@torch.no_grad()
def generate(policy, prompt, prompt_mask, eos_id: int, max_new_tokens: int, temperature=1.0, top_p=0.9):
    """Sample up to max_new_tokens per row; stop once every row has produced EOS.

    prompt [B, P] is left-padded, so every response starts at column P. Position ids count real
    tokens only (common.position_ids_from_mask), the same ones the training forward uses.
    Returns response [B, R]; after a row's EOS the row is filled with eos_id (= pad).
    """
    attention_mask = prompt_mask.long()
    out = policy(input_ids=prompt, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                 use_cache=True, **keep_logits(policy, 1))
    next_position = attention_mask.sum(-1, keepdim=True)  # [B, 1] the first response token's position
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    tokens = []
    for t in range(max_new_tokens):
        token = sample_top_p(out.logits[:, -1] / temperature, top_p)  # [B]
        token = torch.where(done, torch.full_like(token, eos_id), token)
        tokens.append(token)
        done |= token == eos_id
        if done.all() or t == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], 1)
        out = policy(input_ids=token[:, None], attention_mask=attention_mask, position_ids=next_position + t,
                     past_key_values=out.past_key_values, use_cache=True)
    return torch.stack(tokens, 1)  # [B, R]


def response_mask_from(response: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1 on tokens up to and including the first EOS (all tokens if none). Returns mask [B, R], ended [B]."""
    is_eos = response == eos_id
    ended = is_eos.any(-1)  # [B]
    first_eos = is_eos.long().argmax(-1)  # [B] (0 when none)
    length = torch.where(ended, first_eos + 1, torch.full_like(first_eos, response.shape[1]))
    mask = (torch.arange(response.shape[1], device=response.device)[None] < length[:, None]).long()
    return mask, ended


# ----------------------------------------------------------------------------------------------
# 2. Score: log-probs of policy and reference, values, task rewards
# ----------------------------------------------------------------------------------------------
def policy_logprobs(model, query_response, attention_mask, response_len: int, temperature=1.0, with_entropy=False):
    """log π(a_j | x, a_<j) for the last response_len tokens: [B, R] (and the entropy [B, R] if asked).

    The logits at column P+j−1 predict response token j (column P+j), so we keep the last R+1
    columns of logits and drop the final one. Divided by the sampling temperature.
    """
    logits = model(input_ids=query_response, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                   **keep_logits(model, response_len + 1)).logits
    logits = logits[:, -(response_len + 1):-1].float() / temperature  # [B, R, V]
    response = query_response[:, -response_len:]  # [B, R]
    log_norm = logits.logsumexp(-1)  # [B, R]
    logprobs = logits.gather(-1, response[..., None]).squeeze(-1) - log_norm  # [B, R]
    if not with_entropy:
        return logprobs, None
    entropy = log_norm - (logits.softmax(-1) * logits).sum(-1)  # H = log Z − Σ p·logit, [B, R]
    return logprobs, entropy


def critic_values(critic, query_response, attention_mask, response_len: int):
    """V(s_j) for each action j: the critic's scalar at column P+j−1, the state before a_j. [B, R]"""
    return critic(query_response, attention_mask)[:, -(response_len + 1):-1].float()


def frozen_call(fn, model, query_response, attention_mask, *rest, **kw):
    """Run fn(model, ...) where the frozen model lives (GPU or, with --offload-frozen, CPU); result back."""
    device = next(model.parameters()).device
    moved = [t.to(device) for t in (query_response, attention_mask, *rest)]
    with torch.no_grad():
        return fn(model, *moved, **kw).to(query_response.device)


# ----------------------------------------------------------------------------------------------
# 3. Per-token rewards with the KL penalty
# ----------------------------------------------------------------------------------------------
def build_token_rewards(task_rewards, logprobs, ref_logprobs, response_mask, ended, kl_coef=0.1,
                        reward_clip=5.0, missing_eos_penalty=0.0):
    """r_j = clip(task_j) − β·KL_j, with KL_j = log π_θ(a_j) − log π_ref(a_j) (k1), per action j.

    All tensors [B, R] (ended [B]). A truncated row (ended False) loses missing_eos_penalty on its
    last action's task reward. Returns token_rewards, task_rewards (clipped, penalised), kl; zero past the end.
    """
    mask = response_mask.to(logprobs.dtype)
    task = task_rewards.float().clamp(-reward_clip, reward_clip) if reward_clip > 0 else task_rewards.float()
    last = response_mask.long().sum(-1) - 1  # [B] column of each row's last action
    rows = torch.arange(task.shape[0], device=task.device)
    task = task.clone()
    task[rows, last] -= missing_eos_penalty * (~ended).to(task.dtype)
    task = task * mask
    kl = (logprobs - ref_logprobs) * mask  # KL_j, [B, R]
    token_rewards = task - kl_coef * kl  # r_j = task_j − β·KL_j
    return token_rewards, task, kl


# ----------------------------------------------------------------------------------------------
# 4. Advantages and returns
# ----------------------------------------------------------------------------------------------
def gae(token_rewards, values, response_mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation over response tokens. All [B, R]; returns (advantages, returns).

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
    """(x − mean) / std over the unmasked entries; 0 where masked. One or no valid value gives zeros."""
    mask = mask.to(values.dtype)
    centred = (values - masked_mean(values, mask)) * mask
    var = (centred ** 2).sum() / (mask.sum() - 1).clamp(min=1)  # unbiased
    return centred * torch.rsqrt(var + eps)


# ----------------------------------------------------------------------------------------------
# 1-4 together: one rollout
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def rollout(policy, ref_policy, critic, reward_fn, prompt, prompt_mask, args, eos_id: int, score_fn=None) -> dict:
    """Steps 1-4 for one batch of prompts. Everything returned is [B, R] unless noted."""
    unwrap(policy).eval()  # dropout is 0 either way; eval() switches gradient checkpointing off for the KV cache
    unwrap(critic).eval()
    with common.autocast(prompt.device, args.bf16):
        # 1. generate
        response = generate(unwrap(policy), prompt, prompt_mask, eos_id, args.max_new_tokens, args.temperature,
                            args.top_p)  # [B, R]
        mask, ended = response_mask_from(response, eos_id)  # [B, R], [B]
        R = response.shape[1]
        query_response = torch.cat([prompt, response], 1)  # [B, P+R]
        attention_mask = torch.cat([prompt_mask.long(), mask], 1)  # 0 on left pads and after EOS
        full_response_mask = torch.cat([torch.zeros_like(prompt_mask.long()), mask], 1)  # [B, P+R] shared layout
        # 2. score
        logprobs, entropy = policy_logprobs(unwrap(policy), query_response, attention_mask, R, args.temperature, True)
        ref_logprobs = frozen_call(lambda model, *inputs: policy_logprobs(model, *inputs, R, args.temperature)[0],
                                   ref_policy, query_response, attention_mask)
        values = critic_values(unwrap(critic), query_response, attention_mask, R)
        task_rewards = reward_fn(query_response, attention_mask, full_response_mask).float()  # [B, T_resp], T_resp = R
        if task_rewards.shape != mask.shape:
            raise ValueError(f"reward_fn returned {tuple(task_rewards.shape)}, expected [B, R] = {tuple(mask.shape)}")
        rm_score = score_fn(query_response, attention_mask, full_response_mask).float() if score_fn else None  # [B]
    # 3. compute per-token rewards
    token_rewards, task_rewards, kl = build_token_rewards(task_rewards, logprobs, ref_logprobs, mask, ended,
                                                          args.kl_coef, args.reward_clip, args.missing_eos_penalty)
    # 4. compute advantages and returns
    advantages, returns = gae(token_rewards, values, mask, args.gamma, args.lam)
    if args.whiten_advantages:  # over this rank's rollout
        advantages = masked_whiten(advantages, mask)
    return dict(query_response=query_response, attention_mask=attention_mask, response=response, response_mask=mask,
                ended=ended, logprobs=logprobs, ref_logprobs=ref_logprobs, entropy=entropy, values=values,
                task_rewards=task_rewards, token_rewards=token_rewards, kl=kl, advantages=advantages,
                returns=returns, rm_score=rm_score)


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


def no_sync(models, skip: bool):
    """Inside gradient accumulation, skip DDP's all-reduce except on the last micro-batch."""
    stack = contextlib.ExitStack()
    for model in models:
        if skip and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            stack.enter_context(model.no_sync())
    return stack


def minibatch_losses(policy, critic, batch: dict, idx, n_tokens, args):
    """Policy loss, value loss and their clip fractions on responses `idx`, each as a share of the
    minibatch's token mean (sum over these tokens / n_tokens), so micro-batches add up exactly."""
    R = batch["response_mask"].shape[1]
    mask = batch["response_mask"][idx].float()  # [b, R]
    query_response, attention_mask = batch["query_response"][idx], batch["attention_mask"][idx]
    with common.autocast(query_response.device, args.bf16):
        new_logprobs, _ = policy_logprobs(policy, query_response, attention_mask, R, args.temperature)  # [b, R]
        new_values = critic_values(critic, query_response, attention_mask, R)  # [b, R]
    pg_loss, pg_clipped = policy_loss(new_logprobs, batch["logprobs"][idx], batch["advantages"][idx], args.clip_ratio)
    vf_loss, vf_clipped = value_loss(new_values, batch["values"][idx], batch["returns"][idx], args.clip_value)
    return [(x * mask).sum() / n_tokens for x in (pg_loss, vf_loss, pg_clipped, vf_clipped)]


def ppo_update(policy, critic, policy_optimizer, critic_optimizer, batch: dict, args) -> dict:
    """ppo-epochs passes over the rollout in shuffled minibatches. Returns mean losses and clip fractions."""
    unwrap(policy).train()  # dropout is 0 already; train() turns gradient checkpointing on (if enabled)
    unwrap(critic).train()
    device = batch["query_response"].device
    B = batch["response_mask"].shape[0]
    micro = args.micro_batch_size or args.minibatch_size
    names = ("policy_loss", "value_loss", "policy_clipfrac", "value_clipfrac")  # minibatch_losses' order
    sums = {k: torch.zeros((), device=device) for k in names}
    n_updates = 0
    for _ in range(args.ppo_epochs):
        order = torch.randperm(B, device=device)
        for start in range(0, B, args.minibatch_size):
            minibatch = order[start:start + args.minibatch_size]
            n_tokens = batch["response_mask"][minibatch].sum().clamp(min=1)  # losses: token means over the minibatch
            policy_optimizer.zero_grad(set_to_none=True)
            critic_optimizer.zero_grad(set_to_none=True)
            for m_start in range(0, len(minibatch), micro):  # gradient accumulation over micro-batches
                with no_sync((policy, critic), skip=m_start + micro < len(minibatch)):
                    losses = minibatch_losses(policy, critic, batch, minibatch[m_start:m_start + micro], n_tokens, args)
                    (losses[0] + losses[1]).backward()  # disjoint parameters: one backward fills both models' grads
                for key, value in zip(sums, losses):
                    sums[key] += value.detach()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
            torch.nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
            policy_optimizer.step()
            critic_optimizer.step()
            n_updates += 1
    return {k: float(v) / max(n_updates, 1) for k, v in sums.items()}


def rollout_stats(batch: dict) -> dict:
    """Per-step statistics of one rollout (the TLCR paper's Figure 7 curves), as plain floats."""
    mask = batch["response_mask"].float()
    returns, values = batch["returns"], batch["values"]
    residual_var = masked_mean((returns - values - masked_mean(returns - values, mask)) ** 2, mask)
    returns_var = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    stats = dict(
        task_reward=batch["task_rewards"].sum(-1).mean(),  # Σ_j task_j per response, averaged
        token_reward=masked_mean(batch["token_rewards"], mask),  # mean r_j = task_j − β·KL_j per token
        kl=batch["kl"].sum(-1).mean(),  # Σ_j (log π_θ − log π_ref) per response (k1), averaged
        entropy=masked_mean(batch["entropy"], mask),  # policy entropy per token
        perplexity=torch.exp(-masked_mean(batch["logprobs"], mask)),  # of the sampled responses under π_θ
        response_length=mask.sum(-1).mean(),
        eos_fraction=batch["ended"].float().mean(),
        explained_variance=1 - residual_var / returns_var.clamp(min=1e-8),
    )
    if batch["rm_score"] is not None:
        stats["rm_score"] = batch["rm_score"].mean()
    return {k: float(v) for k, v in stats.items()}


def train_step(policy, ref_policy, critic, policy_optimizer, critic_optimizer, reward_fn, prompt, prompt_mask,
               args, eos_id: int, score_fn=None) -> dict:
    """One PPO iteration: rollout (steps 1-4) then PPO epochs (step 5). Returns this rank's statistics."""
    batch = rollout(policy, ref_policy, critic, reward_fn, prompt, prompt_mask, args, eos_id, score_fn)
    stats = rollout_stats(batch)
    # 5. PPO epochs
    stats.update(ppo_update(policy, critic, policy_optimizer, critic_optimizer, batch, args))
    stats["tokens"] = float(batch["response_mask"].sum())
    return stats


# ----------------------------------------------------------------------------------------------
# Setup: models, reward sources, prompts
# ----------------------------------------------------------------------------------------------
def load_score_model(path, device, trust_remote_code=False, frozen=True):
    """A saved ScoreModel (reward model, discriminator) or a fresh head on a causal LM; dropout off."""
    model = common.disable_dropout(common.ScoreModel.from_pretrained(path, trust_remote_code=trust_remote_code))
    if frozen:
        model.eval().requires_grad_(False)
    return model.to(device)


def make_reward_fn(args, device):
    """The task reward source of --reward as reward_fn(query_response, attention_mask, response_mask) -> [B, T_resp],
    plus score_fn(...) -> [B] (the reward model's sequence score, for logging) or None without --reward-model."""
    reward_model = load_score_model(args.reward_model, device, args.trust_remote_code) if args.reward_model else None
    if reward_model is not None:
        import redistribute  # imported here, not at the top: tests of the PPO itself run on toy rewards

    def score_fn(query_response, attention_mask, response_mask):
        return frozen_call(redistribute.sequence_reward, reward_model, query_response, attention_mask, response_mask)

    if args.reward == "seq":
        def reward_fn(query_response, attention_mask, response_mask):  # R_φ(x, y) on the last action
            return frozen_call(redistribute.sparse_token_rewards, reward_model, query_response, attention_mask,
                               response_mask)
    elif args.reward == "red":
        def reward_fn(query_response, attention_mask, response_mask):  # RED eq. 6/7, one forward pass
            return frozen_call(redistribute.redistribute, reward_model, query_response, attention_mask, response_mask,
                               beta_c=args.beta_c, zero_first=args.zero_first)
    else:
        import discriminator

        disc = load_score_model(args.discriminator, device, args.trust_remote_code)

        def reward_fn(query_response, attention_mask, response_mask):  # TLCR eq. 7 (or an ablation)
            return frozen_call(discriminator.token_rewards, disc, query_response, attention_mask, response_mask,
                               mode=TLCR_MODES[args.reward])
    return reward_fn, (score_fn if reward_model is not None else None)


def load_models(args, device, frozen_device):
    """Policy (trained), reference (frozen copy of --policy), critic (trained ScoreModel)."""
    policy = common.disable_dropout(common.load_policy(args.policy, trust_remote_code=args.trust_remote_code))
    policy = policy.to(device)
    ref_policy = common.disable_dropout(common.load_policy(args.policy, trust_remote_code=args.trust_remote_code))
    ref_policy = ref_policy.eval().requires_grad_(False).to(frozen_device)
    if args.critic_init == "policy":
        critic_path = args.policy
    else:
        critic_path = args.reward_model if args.reward in ("seq", "red") else args.discriminator
        if critic_path is None:
            raise SystemExit("--critic-init reward needs --reward-model (seq/red) or --discriminator (tlcr*); "
                             "or use --critic-init policy")
    critic = load_score_model(critic_path, device, args.trust_remote_code, frozen=False)
    if args.gradient_checkpointing:  # active in train() mode only, so generation keeps its KV cache
        enable_checkpointing(policy)
        enable_checkpointing(critic.backbone)
    return policy, ref_policy, critic


def enable_checkpointing(model):
    """Hugging Face gradient checkpointing (non-reentrant: works with DDP and frozen inputs)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_prompts(args, tokenizer, quiet=False) -> list[list[int]]:
    """Token ids of the --split prompts (left-truncated to --max-prompt-len)."""
    pairs = common.load_pairs(args.data, quiet=quiet)
    prompts = common.split_pairs(pairs, seed=args.split_seed)[args.split]
    if not prompts:
        raise SystemExit(f"--data {args.data}: split {args.split!r} is empty")
    return [common.encode_prompt_response(tokenizer, p.prompt, None, args.max_prompt_len)[0] for p in prompts]


def prompt_batch(prompts, step: int, batch_size: int, seed: int, rank: int, pad_id: int, device):
    """This rank's prompts for `step`: a walk through one seeded permutation per epoch (resumable)."""
    ids = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(k, len(prompts))
        generator = torch.Generator().manual_seed(seed + 1000 * rank + 1_000_003 * epoch)
        order = torch.randperm(len(prompts), generator=generator)
        ids.append(prompts[order[offset]])
    prompt, prompt_mask = common.pad_left(ids, pad_id)
    return prompt.to(device), prompt_mask.to(device)


def main(argv=None, reward_fn=None):
    """Train. `reward_fn` (optional) replaces the --reward source, e.g. a toy reward in tests."""
    args = parse_args(argv)
    dist = common.setup_distributed(args.device)
    device, master = dist.device, dist.master
    frozen_device = torch.device("cpu") if args.offload_frozen else device
    out = Path(args.out)
    common.seed_everything(args.seed)

    tokenizer = common.load_tokenizer(args.policy, args.trust_remote_code)
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise SystemExit(f"--policy {args.policy}: the tokenizer has no EOS token")
    prompts = load_prompts(args, tokenizer, quiet=not master)
    policy, ref_policy, critic = load_models(args, device, frozen_device)
    n_positions = getattr(policy.config, "max_position_embeddings", None)
    if n_positions and max(map(len, prompts)) + args.max_new_tokens > n_positions:
        raise SystemExit(f"--max-prompt-len + --max-new-tokens exceeds the model's {n_positions} positions")
    score_fn = None
    if reward_fn is None:
        reward_fn, score_fn = make_reward_fn(args, frozen_device)
    policy_optimizer = common.adamw(policy, args.policy_lr)
    critic_optimizer = common.adamw(critic, args.critic_lr)

    start_step = 0
    state = common.load_checkpoint(out / "checkpoint", {"policy": policy, "critic": critic}) if args.resume else None
    if state is not None:
        policy_optimizer.load_state_dict(state["policy_optimizer"])
        critic_optimizer.load_state_dict(state["critic_optimizer"])
        start_step = state["step"]
    logger = common.JsonlLogger(out / "log.jsonl", enabled=master)
    logger.rewind(start_step)  # a resumed run logs again what came after its checkpoint
    if master:
        out.mkdir(parents=True, exist_ok=True)
        common.atomic_write(out / "args.json", json.dumps(vars(args), indent=2))
        print(f"ppo_token: reward={args.reward}, {len(prompts)} prompts, world size {dist.world_size}, "
              f"{'resuming at step ' + str(start_step) if start_step else 'fresh start'}")
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [dist.local_rank] if device.type == "cuda" else None
        policy, critic = DDP(policy, device_ids=ids), DDP(critic, device_ids=ids)

    bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, disable=not master, desc="ppo")
    for step in bar:
        t0 = time.perf_counter()
        # all randomness of a step (sampling, minibatch order) is a function of (seed, rank, step): resumable
        torch.manual_seed(args.seed + 1000 * dist.rank + 1_000_003 * (step + 1))
        prompt, prompt_mask = prompt_batch(prompts, step, args.batch_size, args.seed, dist.rank, eos_id, device)
        stats = train_step(policy, ref_policy, critic, policy_optimizer, critic_optimizer, reward_fn, prompt,
                           prompt_mask, args, eos_id, score_fn)
        stats = {k: common.all_reduce_mean(v, dist) for k, v in stats.items()}  # every rank takes part
        seconds = time.perf_counter() - t0
        record = {"step": step + 1, **{k: v for k, v in stats.items() if k != "tokens"},
                  "time": seconds, "tokens_per_s": stats["tokens"] * dist.world_size / seconds}
        logger.log(record)
        bar.set_postfix_str(f"task {record['task_reward']:.3f} kl {record['kl']:.3f} "
                            f"len {record['response_length']:.1f} eos {record['eos_fraction']:.2f} "
                            f"vf {record['value_loss']:.3f} ev {record['explained_variance']:.2f}")
        if master and ((step + 1) % args.save_every == 0 or step + 1 == args.steps):
            common.save_checkpoint(out / "checkpoint", {"policy": policy, "critic": critic},
                                   {"step": step + 1, "policy_optimizer": policy_optimizer.state_dict(),
                                    "critic_optimizer": critic_optimizer.state_dict()})
    if master:
        common.save_hf(policy, tokenizer, out / "policy")
        print(f"ppo_token: done, policy saved to {out / 'policy'}")
    common.cleanup_distributed(dist)


if __name__ == "__main__":
    main()
