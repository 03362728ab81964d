"""sft.py — stage 1: supervised fine-tuning on the chosen responses.

The policy learns to imitate the preferred answers of the SFT split (20% of the pairs, as in the
TLCR paper). The loss is the mean negative log-likelihood of the *response* tokens only:

    L_SFT = −(1/N) Σ_i Σ_{t ∈ response_i} log π_θ(y_t | x_i, y_<t),   N = response tokens in the batch

Prompt tokens are inputs but never targets. Every later stage starts from the model saved here.

    python sft.py --model tiny --out runs/demo/sft                          # CPU, minutes
    python sft.py --model gpt2 --out runs/gpt2/sft --batch-size 32 --micro-batch-size 8 \\
        --lr 1e-5 --gradient-checkpointing                                 # one GPU
    torchrun --nproc_per_node=4 sft.py --model gpt2 --out runs/gpt2/sft ...  # several GPUs

Interrupt it and start it again with the same --out: it resumes from --out/checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data", default=str(common.BUNDLED_DATA),
                      help="a .jsonl/.jsonl.gz of hh-rlhf pairs, or 'hh-rlhf[:subset,...]' to download")
    data.add_argument("--split-seed", type=int, default=0, help="seed of the 20/40/40 + test split (keep it fixed)")
    data.add_argument("--limit", type=int, default=None, help="use at most this many pairs from the file")
    data.add_argument("--max-prompt-len", type=int, default=256, help="prompt tokens kept (the last ones)")
    data.add_argument("--max-response-len", type=int, default=256, help="response tokens kept, EOS included")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="tiny",
                       help="'tiny' (a small GPT-2 + BPE tokenizer trained on the data), or any Hugging Face "
                            "causal LM by name or path (gpt2, meta-llama/Llama-2-7b-hf, ./my-model)")
    model.add_argument("--tiny-layers", type=int, default=2, help="tiny model: transformer blocks")
    model.add_argument("--tiny-width", type=int, default=64, help="tiny model: hidden size")
    model.add_argument("--tiny-dropout", type=float, default=0.1, help="tiny model: dropout probability")
    model.add_argument("--tiny-vocab", type=int, default=2048, help="tiny model: BPE vocabulary size")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=float, default=1.0, help="passes over the SFT split")
    train.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    train.add_argument("--batch-size", type=int, default=16, help="global batch: sequences per optimizer step")
    train.add_argument("--micro-batch-size", type=int, default=8,
                       help="sequences per forward pass on one rank; gradient accumulation makes up the rest")
    train.add_argument("--lr", type=float, default=1e-3,
                       help="peak learning rate, cosine-decayed to 0 without warm-up (1e-3 suits the tiny "
                            "model; use ~1e-5 for gpt2 and larger)")
    train.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on matrices")
    train.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 = off)")
    train.add_argument("--eval-every", type=int, default=50, help="held-out loss every N steps (and at the end)")
    train.add_argument("--eval-batches", type=int, default=8, help="micro-batches of the test split per evaluation")
    train.add_argument("--save-every", type=int, default=100, help="write a resumable checkpoint every N steps")
    out = parser.add_argument_group("output")
    out.add_argument("--out", default="runs/demo/sft", help="output folder: final model, log.jsonl, checkpoint/")
    out.add_argument("--no-resume", dest="resume", action="store_false",
                     help="ignore an existing checkpoint in --out and start over")
    common.add_system_args(parser)
    args = parser.parse_args(argv)
    if args.micro_batch_size < 1 or args.batch_size < 1:
        parser.error("--batch-size and --micro-batch-size must be positive")
    return args


# ----------------------------------------------------------------------------------------------
# 1. data: (prompt ids, response ids) with labels that mask the prompt
# ----------------------------------------------------------------------------------------------
def encode_examples(pairs, tokenizer, max_prompt_len, max_response_len):
    """Each pair becomes one example: prompt ids + chosen response ids (EOS appended)."""
    examples = []
    for pair in pairs:
        prompt_ids, response_ids = common.encode_prompt_response(
            tokenizer, pair.prompt, pair.chosen, max_prompt_len, max_response_len)
        examples.append((prompt_ids, response_ids))
    return examples


def collate(examples, pad_id):
    """Right-pad prompt + response; labels are -100 on prompt and padding (ignored by the loss)."""
    input_ids, attention_mask = common.pad_right([p + r for p, r in examples], pad_id)  # [B, T]
    labels = torch.full_like(input_ids, -100)
    for i, (prompt_ids, response_ids) in enumerate(examples):
        labels[i, len(prompt_ids): len(prompt_ids) + len(response_ids)] = torch.tensor(response_ids)
    return input_ids, attention_mask, labels


# ----------------------------------------------------------------------------------------------
# 2. the loss
# ----------------------------------------------------------------------------------------------
def response_nll(model, input_ids, attention_mask, labels):
    """Summed NLL over response tokens and their count (prompt and padding carry label -100)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=common.position_ids_from_mask(attention_mask), use_cache=False).logits
    # position t predicts token t+1
    shift_logits = logits[:, :-1].float()  # [B, T-1, V]
    shift_labels = labels[:, 1:]  # [B, T-1]
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                          ignore_index=-100, reduction="sum")
    return nll, (shift_labels != -100).sum()


def sft_loss(model, input_ids, attention_mask, labels):
    """L_SFT: mean NLL of the response tokens of one batch."""
    nll, count = response_nll(model, input_ids, attention_mask, labels)
    return nll / count.clamp(min=1)


# ----------------------------------------------------------------------------------------------
# 3. one optimizer step, held-out loss
# ----------------------------------------------------------------------------------------------
def train_step(model, optimizer, scheduler, batch, args, dist, pad_id):
    """One optimizer step over a global batch, split over ranks and micro-batches.

    The loss is normalised by the response tokens of the whole *global* batch (counted before any
    forward pass), so the gradient equals that of one big batch on one process: DDP averages the
    ranks' gradients, hence the factor world_size.
    """
    rank_examples = batch[dist.rank::dist.world_size]
    total_tokens = sum(len(r) for _, r in batch)  # response tokens in the global batch (targets)
    model.train()
    loss_sum = 0.0
    micro_batches = [rank_examples[i: i + args.micro_batch_size]
                     for i in range(0, len(rank_examples), args.micro_batch_size)]
    for k, micro in enumerate(micro_batches):
        input_ids, attention_mask, labels = (t.to(dist.device) for t in collate(micro, pad_id))
        is_last = k == len(micro_batches) - 1
        sync = model.no_sync() if (dist.enabled and not is_last) else contextlib.nullcontext()
        with sync, common.autocast(dist.device, args.bf16):
            nll, _ = response_nll(model, input_ids, attention_mask, labels)
            loss = nll * dist.world_size / total_tokens
        loss.backward()
        loss_sum += nll.item()
    if args.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return common.all_reduce_sum(loss_sum, dist).item() / total_tokens


@torch.no_grad()
def evaluate(model, examples, args, dist, pad_id):
    """Held-out mean response NLL over the first eval_batches micro-batches (all ranks share them)."""
    model.eval()
    nll_sum, count = 0.0, 0
    shard = examples[: args.eval_batches * args.micro_batch_size][dist.rank::dist.world_size]
    for i in range(0, len(shard), args.micro_batch_size):
        input_ids, attention_mask, labels = (t.to(dist.device) for t in collate(shard[i: i + args.micro_batch_size], pad_id))
        with common.autocast(dist.device, args.bf16):
            nll, n = response_nll(model, input_ids, attention_mask, labels)
        nll_sum, count = nll_sum + nll.item(), count + n.item()
    nll_total, count_total = common.all_reduce_sum([nll_sum, count], dist).tolist()
    return nll_total / max(count_total, 1)


# ----------------------------------------------------------------------------------------------
# 4. model set-up
# ----------------------------------------------------------------------------------------------
def load_or_build_model(args, sft_pairs, out: Path, master: bool):
    """`tiny`: build once into out/init (reused on resume, so the tokenizer never changes)."""
    if args.model != "tiny":
        return common.load_policy(args.model, trust_remote_code=args.trust_remote_code), \
            common.load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    init = out / "init"
    if not (init / "config.json").exists():
        if master:
            common.build_tiny([p.prompt + p.chosen for p in sft_pairs], init, vocab_size=args.tiny_vocab,
                              seed=args.seed, n_layer=args.tiny_layers, n_embd=args.tiny_width,
                              resid_pdrop=args.tiny_dropout, embd_pdrop=args.tiny_dropout,
                              attn_pdrop=args.tiny_dropout)
        _barrier()
    return common.load_policy(init), common.load_tokenizer(init)


def _barrier():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def main(argv=None):
    args = parse_args(argv)
    dist = common.setup_distributed(args.device)
    common.seed_everything(args.seed)
    out = Path(args.out)
    splits = common.split_pairs(common.load_pairs(args.data, limit=args.limit, quiet=not dist.master),
                                seed=args.split_seed)
    model, tokenizer = load_or_build_model(args, splits["sft"], out, dist.master)
    train_examples = encode_examples(splits["sft"], tokenizer, args.max_prompt_len, args.max_response_len)
    test_examples = encode_examples(splits["test"], tokenizer, args.max_prompt_len, args.max_response_len)
    model.to(dist.device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False

    steps_per_epoch = max(1, len(train_examples) // args.batch_size)
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    optimizer = common.adamw(model, args.lr, args.weight_decay)
    scheduler = common.cosine_schedule(optimizer, total_steps)
    step = 0
    ckpt = out / "checkpoint"
    if args.resume and (state := common.resume_training_state(ckpt, model, optimizer, scheduler, total_steps,
                                                             dist.master)):
        step = state["step"]
    if dist.enabled:
        model = torch.nn.parallel.DistributedDataParallel(model)
    logger = common.JsonlLogger(out / "log.jsonl", enabled=dist.master)
    logger.rewind(step)
    pad_id = tokenizer.pad_token_id

    def checkpoint():
        if dist.master:
            common.save_training_state(ckpt, model, optimizer, scheduler, step)

    eval_loss = None
    bar = tqdm(total=total_steps, initial=step, desc="sft", disable=not dist.master)
    start = time.time()
    while step < total_steps:
        batch = common.global_batch(train_examples, step, args.batch_size, args.seed)
        train_loss = train_step(model, optimizer, scheduler, batch, args, dist, pad_id)
        step += 1
        record = {"step": step, "train_loss": train_loss, "lr": scheduler.get_last_lr()[0],
                  "elapsed_s": round(time.time() - start, 2)}
        if step % args.eval_every == 0 or step == total_steps:
            record["eval_loss"] = eval_loss = evaluate(model, test_examples, args, dist, pad_id)
        logger.log(record)
        bar.update(1)
        bar.set_postfix({k: round(v, 4) for k, v in record.items() if k.endswith("loss")})
        if step % args.save_every == 0 and step < total_steps:
            checkpoint()
    bar.close()
    if dist.master:
        checkpoint()
        common.save_hf(model, tokenizer, out)
        if eval_loss is None:  # resumed after the last step: nothing was evaluated in this run
            eval_loss = evaluate(common.unwrap(model), test_examples, args, common.Dist(device=dist.device), pad_id)
        final = {"step": step, "eval_loss": eval_loss}
        common.atomic_write(out / "sft_summary.json", json.dumps(final, indent=2))
        print(f"sft: {step} steps, held-out response NLL {final['eval_loss']:.4f}, model saved to {out}")
    common.cleanup_distributed(dist)
    return out


if __name__ == "__main__":
    main()
