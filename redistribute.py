"""RED (R3HF): a Bradley–Terry reward model, and its score redistributed over the response tokens.

A sequence-level reward model R(x, y) (the SFT backbone plus a scalar head, read at the last real
token) is trained on chosen/rejected pairs with the Bradley–Terry loss −log σ(R(x, y_c) − R(x, y_r)).
Because the backbone is causal, ONE forward pass gives R(x, y≤t) at every position t, and RED
(Li et al. 2024, arXiv 2411.08302) turns it into a dense per-token reward:

    eq. 6   r̃_t = R(x, y≤t) − R(x, y≤t−1),   R(x, y≤−1) = the score at the last prompt token
            (or 0 with --zero-first), so Σ_t r̃_t = R(x, y) − R(x, ∅)  (or R(x, y))
    eq. 7   r̂_t = β_c · r̃_t + (1 − β_c) · R(x, y) · [t = T]          (default β_c = 1)

The reward of token a_t is read at a_t's own position (the hidden state that has seen a_t) and
belongs to the action that produced a_t. ppo_token.py calls `redistribute` (RED) and
`sparse_token_rewards` (the sequence-PPO baseline): both come from the same forward pass and code.

Commands (the paper's lr 1e-5 is for 7B models; pass a larger one, e.g. 3e-4, for tiny ones):

    # train on the 40% reward split, one process (CPU or one GPU; bf16 autocast on CUDA)
    python redistribute.py train --sft runs/demo/sft --out runs/demo/rm --lr 1e-5
    # many GPUs: 64 pairs per optimizer step, each rank takes its slice of every global batch in
    # forward passes of 8 pairs (gradient accumulation makes up the rest); rank 0 logs and saves
    torchrun --standalone --nproc_per_node=8 redistribute.py train --sft runs/demo/sft --out runs/demo/rm \\
        --batch-size 64 --micro-batch-size 8
    # look at one response, token by token
    python redistribute.py show --rm runs/demo/rm --prompt $'\\n\\nHuman: Hi\\n\\nAssistant:' --response " Hello!"

Outputs in --out: the reward model (Hugging Face backbone + score_head.safetensors + tokenizer,
load it with common.ScoreModel.from_pretrained), accuracy.json (held-out pair accuracy and mean
margin), log.jsonl (one JSON line per logged step) and checkpoint/ (resumed automatically).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

import common


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train the Bradley–Terry reward model")
    data = train.add_argument_group("data")
    data.add_argument("--data", default="bundled",
                      help='"bundled" (the hh-rlhf slice in data/), a .jsonl(.gz) path, or "hh-rlhf[:SUBSET,...]"')
    data.add_argument("--split", default="reward", choices=["sft", "reward", "rl", "test"],
                      help="which part of common.split_pairs to train on (the paper: the 40%% reward part)")
    data.add_argument("--limit", type=int, default=None, help="use at most this many pairs of the split")
    data.add_argument("--eval-fraction", type=float, default=0.1,
                      help="share of the split's pairs held out to measure pair accuracy")
    data.add_argument("--max-prompt-len", type=int, default=256, help="prompt tokens kept (the last ones)")
    data.add_argument("--max-response-len", type=int, default=256, help="response tokens kept, EOS included")
    model = train.add_argument_group("model")
    model.add_argument("--sft", required=True, help="SFT model directory (or HF name): backbone and tokenizer")
    model.add_argument("--out", required=True, help="output directory for the reward model, logs, checkpoint")
    algo = train.add_argument_group("algorithm")
    algo.add_argument("--epochs", type=int, default=1, help="passes over the training pairs")
    algo.add_argument("--lr", type=float, default=1e-5,
                      help="peak learning rate, cosine to 0 without warm-up (1e-5 is for 7B models; "
                           "tiny models want ~1e-4 to 5e-4)")
    algo.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on matrices")
    algo.add_argument("--batch-size", type=int, default=8,
                      help="global batch: pairs per optimizer step (all ranks, all micro-batches)")
    algo.add_argument("--micro-batch-size", type=int, default=8,
                      help="pairs per forward pass on one rank (a pair = its chosen and rejected rows in "
                           "one pass); gradient accumulation makes up the rest")
    algo.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (0 = off)")
    system = common.add_system_args(train)
    system.add_argument("--log-every", type=int, default=10, help="optimizer steps between log lines")
    system.add_argument("--eval-every", type=int, default=0, help="steps between held-out evaluations (0 = end only)")
    system.add_argument("--save-every", type=int, default=200, help="steps between checkpoints")
    system.add_argument("--max-steps", type=int, default=None,
                        help="stop after this many optimizer steps in total (the schedule still plans the "
                             "full run; the next call resumes)")
    system.add_argument("--no-resume", dest="resume", action="store_false",
                        help="start fresh even if OUT/checkpoint exists")

    show = sub.add_parser("show", help="print a response with each token's redistributed reward")
    show.add_argument("--rm", required=True, help="reward model directory written by `train`")
    show.add_argument("--prompt", required=True, help='prompt text, ending with "\\n\\nAssistant:"')
    show.add_argument("--response", required=True, help="response text (EOS is appended)")
    show.add_argument("--beta-c", type=float, default=1.0, help="eq. 7 mixing: 1 = dense RED, 0 = sparse")
    show.add_argument("--zero-first", action="store_true", help="R(x, y≤−1) = 0 instead of the prompt's score")
    show.add_argument("--max-prompt-len", type=int, default=256, help="prompt tokens kept (the last ones)")
    show.add_argument("--max-response-len", type=int, default=256, help="response tokens kept, EOS included")
    show.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    show.add_argument("--trust-remote-code", action="store_true", help="allow model repos with their own code")

    args = parser.parse_args(argv)
    sub_parser = train if args.command == "train" else show
    if args.command == "train":
        if not 0.0 < args.eval_fraction < 1.0:
            sub_parser.error(f"--eval-fraction must be in (0, 1), got {args.eval_fraction}")
        for name in ("batch_size", "micro_batch_size", "epochs", "max_prompt_len", "max_response_len",
                     "log_every", "save_every"):
            if getattr(args, name) < 1:
                sub_parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
        if args.limit is not None and args.limit < 2:
            sub_parser.error(f"--limit must be at least 2 (one training and one held-out pair), got {args.limit}")
    elif not 0.0 <= args.beta_c <= 1.0:
        sub_parser.error(f"--beta-c must be in [0, 1], got {args.beta_c}")
    return args


# ----------------------------------------------------------------------------------------------
# 1. Data: pairs -> token ids -> right-padded batches (chosen rows first, then rejected rows)
# ----------------------------------------------------------------------------------------------
def encode_pairs(pairs, tokenizer, max_prompt_len: int, max_response_len: int) -> list[dict]:
    """Token ids of each pair: prompt, chosen and rejected response (each response ends with EOS)."""
    examples = []
    for pair in pairs:
        prompt, chosen = common.encode_prompt_response(tokenizer, pair.prompt, pair.chosen,
                                                       max_prompt_len, max_response_len)
        _, rejected = common.encode_prompt_response(tokenizer, pair.prompt, pair.rejected,
                                                    max_prompt_len, max_response_len)
        examples.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return examples


def collate_pairs(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> one right-padded batch of 2B rows: rows 0..B−1 chosen, rows B..2B−1 rejected,
    so both sides of a pair go through the same forward pass."""
    rows = [e["prompt"] + e["chosen"] for e in examples] + [e["prompt"] + e["rejected"] for e in examples]
    query_response, attention_mask = common.pad_right(rows, pad_id)  # [2B, T]
    response_mask = torch.zeros_like(attention_mask)
    for i, e in enumerate(examples + examples):
        start = len(e["prompt"])
        response_mask[i, start: int(attention_mask[i].sum())] = 1
    return {"query_response": query_response, "attention_mask": attention_mask, "response_mask": response_mask}


# ----------------------------------------------------------------------------------------------
# 2. The reward model: R at every position, read at the last real token, Bradley–Terry loss
# ----------------------------------------------------------------------------------------------
def score_positions(reward_model, query_response: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """ONE forward pass: R(x, y≤t) at every position t, in float32; 0 at padding. [B, T]

    Gradients flow (training uses this too); wrap in torch.no_grad() to score. The caller puts
    the model in eval mode (dropout off) and, on CUDA, inside common.autocast.
    """
    vocab = common.unwrap(reward_model).config.vocab_size
    if query_response.numel() and int(query_response.max()) >= vocab:
        raise ValueError(f"token id {int(query_response.max())} is outside the reward model's vocabulary "
                         f"({vocab}); the reward model must share the policy's tokenizer")
    scores = reward_model(query_response, attention_mask).float()  # [B, T]
    return scores.masked_fill(attention_mask == 0, 0.0)  # garbage (or NaN) at padding never leaks


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each row's last real token, for left- or right-padded rows. [B]"""
    T = attention_mask.shape[1]
    return T - 1 - attention_mask.long().flip(-1).argmax(-1)


def pair_rewards(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """R(x, y_c) and R(x, y_r) of a collate_pairs batch, from one forward pass. ([B], [B])"""
    scores = score_positions(model, batch["query_response"], batch["attention_mask"])  # [2B, T]
    rewards = scores.gather(1, last_token_index(batch["attention_mask"])[:, None]).squeeze(1)  # [2B]
    chosen, rejected = rewards.chunk(2)
    return chosen, rejected


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry: −log σ(R(x, y_c) − R(x, y_r)), averaged over pairs (logsigmoid is stable)."""
    return -F.logsigmoid(chosen - rejected).mean()


# ----------------------------------------------------------------------------------------------
# 3. Held-out pair accuracy
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, examples: list[dict], pad_id: int, batch_size: int, device: torch.device,
             dist_info: common.Dist | None = None, bf16: bool = True) -> dict:
    """Share of held-out pairs with R(x, y_c) > R(x, y_r) (ties count as wrong), and the mean
    margin R(x, y_c) − R(x, y_r). Under torchrun each rank scores every world_size-th pair."""
    dist_info = dist_info or common.Dist(device=device)
    model = common.unwrap(model)
    was_training = model.training
    model.eval()
    mine = examples[dist_info.rank::dist_info.world_size]
    correct = margin_sum = 0.0
    for i in range(0, len(mine), batch_size):
        batch = {k: v.to(device) for k, v in collate_pairs(mine[i: i + batch_size], pad_id).items()}
        with common.autocast(device, bf16):
            chosen, rejected = pair_rewards(model, batch)
        correct += (chosen > rejected).sum().item()
        margin_sum += (chosen - rejected).sum().item()
    model.train(was_training)
    n = len(examples)
    correct, margin_sum = common.all_reduce_sum([correct, margin_sum], dist_info).tolist()
    return {"accuracy": correct / n, "mean_margin": margin_sum / n, "pairs": n}


# ----------------------------------------------------------------------------------------------
# 4. Redistribution (RED eq. 6 and 7): pure maths on the scores, then the model-level functions
# ----------------------------------------------------------------------------------------------
def redistribute_scores(scores: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
                        beta_c: float = 1.0, zero_first: bool = False) -> torch.Tensor:
    """scores [B, T] (R at every position) -> token rewards [B, T_resp], left-aligned per row.

    Column j is the row's j-th response token; columns past the row's response length are 0.
    A row with no real token before its response (no prompt) uses R(x, y≤−1) = 0.
    """
    index, valid = common.response_index(response_mask)  # [B, T_resp] positions in T, 1 = real
    valid = valid.bool()
    current = scores.gather(1, index)  # R(x, y≤t)  [B, T_resp]
    start = index[:, 0]  # position of the first response token  [B]
    before = (start - 1).clamp(min=0)[:, None]  # the last prompt token  [B, 1]
    has_prompt = (start > 0) & (attention_mask.gather(1, before).squeeze(1) == 1)  # [B]
    if zero_first:
        has_prompt = torch.zeros_like(has_prompt)
    first_previous = torch.where(has_prompt, scores.gather(1, before).squeeze(1), 0.0)  # R(x, y≤−1) [B]
    previous = torch.cat([first_previous[:, None], current[:, :-1]], dim=1)  # R(x, y≤t−1) [B, T_resp]
    dense = current - previous  # eq. 6: r̃_t = R(x, y≤t) − R(x, y≤t−1)
    lengths = valid.sum(-1)  # [B]
    is_last = torch.arange(valid.shape[1], device=valid.device)[None] == (lengths - 1)[:, None]  # [t = T]
    sequence = current.gather(1, (lengths - 1).clamp(min=0)[:, None])  # R(x, y) [B, 1]
    sparse = torch.where(is_last, sequence, 0.0)  # R(x, y)·[t = T]  [B, T_resp]
    token_rewards = beta_c * dense + (1.0 - beta_c) * sparse  # eq. 7: r̂_t = β_c·r̃_t + (1 − β_c)·R·[t = T]
    return torch.where(valid, token_rewards, 0.0)  # padding gets exactly 0


@torch.no_grad()
def redistribute(reward_model, query_response: torch.Tensor, attention_mask: torch.Tensor,
                 response_mask: torch.Tensor, beta_c: float = 1.0, zero_first: bool = False) -> torch.Tensor:
    """RED token rewards [B, T_resp] (eq. 6 and 7) from ONE forward pass of the reward model."""
    scores = score_positions(reward_model, query_response, attention_mask)  # [B, T]
    return redistribute_scores(scores, attention_mask, response_mask, beta_c, zero_first)


@torch.no_grad()
def sparse_token_rewards(reward_model, query_response: torch.Tensor, attention_mask: torch.Tensor,
                         response_mask: torch.Tensor) -> torch.Tensor:
    """The sequence-PPO baseline: R(x, y) on the last response token, 0 elsewhere. [B, T_resp]
    Same pass and code as RED: exactly redistribute(..., beta_c=0)."""
    return redistribute(reward_model, query_response, attention_mask, response_mask, beta_c=0.0)


@torch.no_grad()
def sequence_reward(reward_model, query_response: torch.Tensor, attention_mask: torch.Tensor,
                    response_mask: torch.Tensor) -> torch.Tensor:
    """R(x, y): the score at each row's last response token (0 for an empty response). [B]"""
    return sparse_token_rewards(reward_model, query_response, attention_mask, response_mask).sum(-1)


# ----------------------------------------------------------------------------------------------
# 5. One optimizer step over a global batch of pairs
# ----------------------------------------------------------------------------------------------
def train_step(model, optimizer, scheduler, batch: list[dict], args, dist_info: common.Dist,
               pad_id: int) -> tuple[list[float], float]:
    """One optimizer step over a global batch of pairs, split over ranks and micro-batches.

    The Bradley–Terry loss is summed over each micro-batch and normalised by the pairs of the whole
    *global* batch, so the gradient equals that of one big batch on one process: DDP averages the
    ranks' gradients, hence the factor world_size. Returns this rank's sums [loss, correct pairs,
    margin, pairs] and the gradient norm before clipping (nan when clipping is off).
    """
    rank_examples = batch[dist_info.rank::dist_info.world_size]
    total_pairs = len(batch)  # pairs in the global batch
    sums = [0.0, 0.0, 0.0, 0.0]  # loss, correct, margin, pairs (this rank)
    micro_batches = [rank_examples[i: i + args.micro_batch_size]
                     for i in range(0, len(rank_examples), args.micro_batch_size)]
    for m, examples in enumerate(micro_batches):
        # forward both sides of each pair in one batch, Bradley–Terry loss, backward (accumulated)
        micro = {key: v.to(dist_info.device) for key, v in collate_pairs(examples, pad_id).items()}
        sync = m == len(micro_batches) - 1 or not dist_info.enabled
        with (nullcontext() if sync else model.no_sync()), common.autocast(dist_info.device, args.bf16):
            chosen, rejected = pair_rewards(model, micro)  # [B], [B]
            loss_sum = bradley_terry_loss(chosen, rejected) * len(examples)  # summed over the B pairs
        (loss_sum * dist_info.world_size / total_pairs).backward()
        sums = [a + b for a, b in zip(sums, (loss_sum.item(), (chosen > rejected).sum().item(),
                                             (chosen - rejected).sum().item(), len(examples)))]
    grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm).item()
                 if args.max_grad_norm > 0 else float("nan"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return sums, grad_norm


# ----------------------------------------------------------------------------------------------
# 6. The stages: train, show
# ----------------------------------------------------------------------------------------------
def train(args):
    dist_info = common.setup_distributed(args.device)
    master, device = dist_info.master, dist_info.device
    common.seed_everything(args.seed + dist_info.rank)
    out = Path(args.out)
    if master:
        out.mkdir(parents=True, exist_ok=True)

    # data: the split, its held-out tail, token ids
    pairs = common.split_pairs(common.load_pairs(args.data, quiet=not master), seed=args.seed)[args.split]
    pairs = pairs[: args.limit] if args.limit else pairs
    n_eval = max(1, round(len(pairs) * args.eval_fraction))
    if len(pairs) - n_eval < 1:
        raise SystemExit(f"--data {args.data} --split {args.split}: {len(pairs)} pairs, too few to hold out "
                         f"{n_eval} and train on the rest")
    tokenizer = common.load_tokenizer(args.sft, trust_remote_code=args.trust_remote_code)
    pad_id = tokenizer.pad_token_id
    train_examples = encode_pairs(pairs[:-n_eval], tokenizer, args.max_prompt_len, args.max_response_len)
    eval_examples = encode_pairs(pairs[-n_eval:], tokenizer, args.max_prompt_len, args.max_response_len)

    # model: SFT backbone + fresh scalar head, dropout off (the two sides of a pair must be
    # scored by the same function), optimizer, cosine schedule without warm-up
    model = common.ScoreModel.from_pretrained(args.sft, trust_remote_code=args.trust_remote_code)
    common.disable_dropout(model).to(device).train()
    if args.gradient_checkpointing:
        model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = common.adamw(model, args.lr, args.weight_decay)
    batch_size = min(args.batch_size, len(train_examples))  # global pairs per optimizer step
    if batch_size < dist_info.world_size:
        raise SystemExit(f"--batch-size {batch_size} is smaller than the {dist_info.world_size} processes")
    steps_per_epoch = max(1, len(train_examples) // batch_size)  # as common.global_batch counts them
    total_steps = steps_per_epoch * args.epochs
    scheduler = common.cosine_schedule(optimizer, total_steps)
    step = 0
    ckpt_dir = out / "checkpoint"
    if args.resume and (state := common.resume_training_state(ckpt_dir, model, optimizer, scheduler, total_steps,
                                                             master, map_location=device)):
        step = state["step"]  # a checkpoint saved for another total_steps stops the run instead
    if dist_info.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    logger = common.JsonlLogger(out / "log.jsonl", enabled=master)
    logger.rewind(step)  # lines logged after the checkpoint will be logged again
    if master:
        print(f"{len(train_examples)} training pairs, {len(eval_examples)} held out; {total_steps} steps of "
              f"{batch_size} pairs on {dist_info.world_size} rank(s) in forward passes of at most "
              f"{args.micro_batch_size}, device {device}")

    def checkpoint():
        if master:
            common.save_training_state(ckpt_dir, model, optimizer, scheduler, step, total_steps=total_steps)

    last_step = min(total_steps, args.max_steps) if args.max_steps is not None else total_steps
    from tqdm import tqdm
    bar = tqdm(total=last_step, initial=min(step, last_step), disable=not master, desc="reward model")
    stats, started = [0.0, 0.0, 0.0, 0.0], time.time()  # loss, correct, margin, pairs since the last log
    while step < last_step:
        epoch = step // steps_per_epoch
        # 1. the step's global batch (the same on every rank and every resume), this rank's slice of it
        batch = common.global_batch(train_examples, step, batch_size, args.seed)
        # 2. forward, Bradley–Terry loss, backward over micro-batches; clip, step, schedule
        sums, grad_norm = train_step(model, optimizer, scheduler, batch, args, dist_info, pad_id)
        stats = [a + b for a, b in zip(stats, sums)]
        step += 1
        bar.update(1)
        # 3. log, evaluate, checkpoint
        if step % args.log_every == 0 or step == last_step:
            loss_sum, correct, margin_sum, n_pairs = common.all_reduce_sum(list(stats), dist_info).tolist()
            loss_avg, acc_avg, margin_avg = loss_sum / n_pairs, correct / n_pairs, margin_sum / n_pairs
            record = {"step": step, "epoch": epoch, "loss": loss_avg, "accuracy": acc_avg, "margin": margin_avg,
                      "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                      "pairs_seen": step * batch_size, "seconds": round(time.time() - started, 2)}
            logger.log(record)
            bar.set_postfix(loss=f"{loss_avg:.4f}", acc=f"{acc_avg:.3f}")
            stats = [0.0, 0.0, 0.0, 0.0]
        if args.eval_every and step % args.eval_every == 0 and step < last_step:
            result = evaluate(model, eval_examples, pad_id, args.micro_batch_size, device, dist_info, args.bf16)
            logger.log({"step": step, **{f"eval_{k}": v for k, v in result.items()}})
        if step % args.save_every == 0 or step == last_step:
            checkpoint()
    bar.close()

    # held-out accuracy, final model
    result = evaluate(model, eval_examples, pad_id, args.micro_batch_size, device, dist_info, args.bf16)
    if master:
        result.update({"step": step, "total_steps": total_steps, "split": args.split, "data": str(args.data)})
        logger.log({"step": step, **{f"eval_{k}": v for k, v in result.items() if k in ("accuracy", "mean_margin")}})
        if step == total_steps:
            common.save_hf(model, tokenizer, out)  # keeps log.jsonl and checkpoint/
        common.atomic_write(out / "accuracy.json", json.dumps(result, indent=2) + "\n")
        print(f"held-out pair accuracy {result['accuracy']:.4f}, mean margin {result['mean_margin']:+.4f} "
              f"over {result['pairs']} pairs (step {step}/{total_steps}) -> {out / 'accuracy.json'}")
    common.cleanup_distributed(dist_info)
    return result


@torch.no_grad()
def show(args):
    device = common.setup_distributed(args.device).device
    tokenizer = common.load_tokenizer(args.rm, trust_remote_code=args.trust_remote_code)
    model = common.ScoreModel.from_pretrained(args.rm, trust_remote_code=args.trust_remote_code).to(device).eval()
    prompt, response = common.encode_prompt_response(tokenizer, args.prompt, args.response,
                                                     args.max_prompt_len, args.max_response_len)
    query_response = torch.tensor([prompt + response], device=device)  # [1, T]
    attention_mask = torch.ones_like(query_response)
    response_mask = torch.zeros_like(query_response)
    response_mask[0, len(prompt):] = 1
    scores = score_positions(model, query_response, attention_mask)  # [1, T]
    token_rewards = redistribute_scores(scores, attention_mask, response_mask, args.beta_c, args.zero_first)[0]
    empty = 0.0 if args.zero_first or not prompt else scores[0, len(prompt) - 1].item()
    print(f"{'t':>4}  {'reward':>9}  {'R(x,y<=t)':>9}  token")
    for t, (token_id, reward) in enumerate(zip(response, token_rewards.tolist())):
        print(f"{t:>4}  {reward:+9.4f}  {scores[0, len(prompt) + t].item():+9.4f}  "
              f"{tokenizer.decode([token_id])!r}")
    total, full = token_rewards.sum().item(), scores[0, -1].item()
    print(f"sum of token rewards {total:+.4f} = R(x, y) - R(x, empty) = {full:+.4f} - ({empty:+.4f})"
          if args.beta_c == 1.0 else f"sum of token rewards {total:+.4f}; R(x, y) = {full:+.4f}")
    return token_rewards


def main(argv=None):
    args = parse_args(argv)
    return train(args) if args.command == "train" else show(args)


if __name__ == "__main__":
    main(sys.argv[1:])
