"""sft.py — stage 1: supervised fine-tuning on the chosen responses.

The policy learns to imitate the preferred answers of the SFT split (20% of the pairs, as in the
TLCR paper). The loss is the mean negative log-likelihood of the *response* tokens only:

    L_SFT = −(1/N) Σ_i Σ_{t ∈ response_i} log π_θ(y_t | x_i, y_<t),
        N = response tokens in the batch

Prompt tokens are inputs but never targets. Every later stage starts from the model saved here.

    python sft.py --model tiny --out runs/demo/sft                          # CPU, minutes
    python sft.py --model gpt2 --out runs/gpt2/sft --batch-size 32 --micro-batch-size 8 \\
        --lr 1e-5 --gradient-checkpointing                                 # one GPU
    torchrun --nproc_per_node=4 sft.py --model gpt2 --out runs/gpt2/sft ...  # several GPUs
    torchrun --nproc_per_node=8 sft.py --model meta-llama/Llama-2-7b-hf --fsdp \\
        --lora-rank 64 ...                                                 # sharded, LoRA

Interrupt it and start it again with the same --out: it resumes from --out/checkpoint.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

import common
import lora
import plumbing
from plumbing import amp, checkpoint, distributed, hf_models


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=plumbing.HelpFormatter)
    plumbing.add_data_args(parser.add_argument_group("data"))
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="tiny",
                       help="'tiny' (a small random model + BPE tokenizer trained on the data), or "
                            "any Hugging Face causal LM by name or path (gpt2, "
                            "meta-llama/Llama-2-7b-hf, ./my-model)")
    model.add_argument("--tiny-arch", default="gpt2", choices=tuple(hf_models.TINY_FAMILIES),
                       help="tiny model family: gpt2 (byte-level BPE, no BOS), llama (RoPE, "
                            "SentencePiece-style BPE, BOS), or another of hf_models.TINY_FAMILIES "
                            "(llama3, mistral, qwen2, qwen3, gemma2, phi3, gpt_neox, opt)")
    model.add_argument("--tiny-layers", type=int, default=2, help="tiny model: transformer blocks")
    model.add_argument("--tiny-width", type=int, default=64, help="tiny model: hidden size")
    model.add_argument("--tiny-dropout", type=float, default=0.1,
                       help="tiny model: residual and embedding dropout probability (attention "
                            "dropout is 0, as in Llama's configs: hf_models.tiny_config)")
    model.add_argument("--tiny-vocab", type=int, default=2048,
                       help="tiny model: BPE vocabulary size")
    plumbing.add_optimizer_args(parser.add_argument_group("training"), "sequences", epochs=1.0,
                                lr=1e-3,
                                lr_note="1e-3 suits the tiny model; use ~1e-5 for gpt2 and larger",
                                batch_size=16, micro_batch_size=8,
                                epochs_help="passes over the SFT split")
    out = plumbing.add_output_args(parser.add_argument_group("output"),
                                   "output folder: final model, log.jsonl, checkpoint/",
                                   save_every=100, eval_every=50,
                                   eval_help="held-out loss every N steps and at the end (0: only "
                                             "at the end)", eval_batch_size=8,
                                   batch_unit="sequences", out_default="runs/demo/sft")
    out.add_argument("--eval-examples", type=int, default=64,
                     help="test-split examples per held-out evaluation")
    lora.add_lora_args(parser)
    plumbing.add_system_args(parser)
    args = parser.parse_args(argv)
    lora.check_lora_args(parser, args)
    plumbing.check_training_args(parser, args, "eval_examples", "max_prompt_len",
                                 "max_response_len")
    return args


# ----------------------------------------------------------------------------------------------
# 1. data: (prompt ids, response ids) pairs
# ----------------------------------------------------------------------------------------------
def select_pairs(args, quiet: bool = False):
    """(training pairs, held-out pairs): the SFT split (at most --limit pairs) and the test
    split."""
    splits = common.split_pairs(plumbing.load_data(args.data, "all", args.split_seed, quiet=quiet),
                                args.split_seed)
    return common.select_split(splits["sft"], "all", args.split_seed, args.limit), splits["test"]


def encode_examples(pairs, tokenizer, args) -> list[tuple[list[int], list[int]]]:
    """Each pair becomes one example: prompt ids + chosen response ids (EOS appended)."""
    examples = []
    for pair in pairs:
        prompt = common.prompt_text(tokenizer, pair.prompt, pair.messages, args.chat_template)
        response = common.response_text(tokenizer, pair.chosen, pair.messages, args.chat_template)
        examples.append((common.encode_prompt(tokenizer, prompt, args.max_prompt_len),
                         common.encode_response(tokenizer, response, args.max_response_len)))
    return examples


# ----------------------------------------------------------------------------------------------
# 2. the loss
# ----------------------------------------------------------------------------------------------
def sft_loss(model, query_response, attention_mask, response_mask, normaliser=None):
    """L_SFT: the summed NLL of the response tokens divided by `normaliser` (default: this batch's
    response tokens, the plain mean). Prompt and padding are never targets. Returns (loss, summed
    NLL)."""
    # [B, T_resp]
    logprobs, _ = common.response_logprobs(model, query_response, attention_mask, response_mask)
    nll_sum = -logprobs.sum()  # 0 past each row's end
    count = response_mask.sum() if normaliser is None else normaliser
    return nll_sum / count, nll_sum.detach()


# ----------------------------------------------------------------------------------------------
# 3. one optimizer step, held-out loss
# ----------------------------------------------------------------------------------------------
def train_step(model, optimizer, scheduler, batch, args, dist_info, pad_id) -> dict:
    """One optimizer step over a global batch, split over ranks and micro-batches.

    Every micro-batch's summed loss is divided by the response tokens of the whole global batch, so
    the accumulated gradient equals that of one big batch in one process; DDP then averages over the
    ranks, so each rank divides by (global tokens / world size).
    """
    rank_examples = batch[dist_info.rank::dist_info.world_size]
    normaliser = sum(len(r) for _, r in batch) / dist_info.world_size  # response tokens (targets)
    model.train()
    nll_sum = torch.zeros((), dtype=torch.float64)
    micro_batches = distributed.micro_batches(rank_examples, args.micro_batch_size)
    for k, examples in enumerate(micro_batches):
        inputs = [t.to(dist_info.device) for t in common.collate_right(examples, pad_id)]
        with distributed.accumulate(model, last=k == len(micro_batches) - 1):
            with amp.autocast(dist_info.device, args.precision):
                loss, nll = sft_loss(model, *inputs, normaliser=normaliser)
            loss.backward()
        nll_sum += nll.double().cpu()
    grad_norm = distributed.clip_grad_norm(model, args.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = normaliser * dist_info.world_size
    return {
        "loss": distributed.all_reduce_sum(nll_sum, dist_info).item() / tokens,
        "grad_norm": grad_norm,
    }


@torch.no_grad()
def evaluate(model, examples, args, dist_info, pad_id) -> float:
    """Held-out mean response NLL over the first --eval-examples test examples (shared over
    ranks)."""
    model = distributed.unwrap(model)
    was_training = model.training
    model.eval()
    nll_sum, count = 0.0, 0
    for chunk, weight in distributed.rank_batches(
        examples[: args.eval_examples], args.eval_batch_size, dist_info
    ):
        inputs = [t.to(dist_info.device) for t in common.collate_right(chunk, pad_id)]
        with amp.autocast(dist_info.device, args.precision):
            _, nll = sft_loss(model, *inputs)
        nll_sum, count = nll_sum + weight * nll.item(), count + weight * int(inputs[2].sum())
    model.train(was_training)
    nll_total, count_total = distributed.all_reduce_sum([nll_sum, count], dist_info).tolist()
    return nll_total / max(count_total, 1)


# ----------------------------------------------------------------------------------------------
# 4. model set-up
# ----------------------------------------------------------------------------------------------
def load_or_build_model(args, sft_pairs, out: Path, dist_info):
    """`tiny`: build once into out/init (reused on resume, so the tokenizer never changes). In fp32,
    or in --frozen-dtype as a LoRA base; under FSDP built empty on ranks other than 0 (they receive
    rank 0's weights)."""
    path = args.model
    if args.model == "tiny":
        path = out / "init"
        if not (path / "config.json").exists():
            if dist_info.master:
                hf_models.build_tiny([p.prompt + p.chosen for p in sft_pairs], path,
                                     arch=args.tiny_arch, vocab_size=args.tiny_vocab,
                                     seed=args.seed, layers=args.tiny_layers, width=args.tiny_width,
                                     dropout=args.tiny_dropout)
            distributed.barrier()
    dtype = amp.base_dtype(args, dist_info.device)
    return (
        hf_models.load_policy(
            path, dtype, args.trust_remote_code, what="--model", meta=dist_info.meta
        ),
        hf_models.load_tokenizer(path, trust_remote_code=args.trust_remote_code, what="--model"),
    )


def main(argv=None):
    args = parse_args(argv)
    run = plumbing.start_run(args)  # torchrun, --seed, a killed save's temp folders in --out
    dist_info, out = run.dist_info, run.out
    distributed.check_batch_size(args.batch_size, dist_info)
    if args.model != "tiny":
        hf_models.check_model_source(args.model, "--model")  # before any long work
    sft_pairs, test_pairs = select_pairs(args, quiet=not dist_info.master)
    model, tokenizer = load_or_build_model(args, sft_pairs, out, dist_info)
    train_examples = encode_examples(sft_pairs, tokenizer, args)
    test_examples = encode_examples(test_pairs, tokenizer, args)
    # dropout stays as the model was built (0.1 in the tiny model): SFT is ordinary supervised
    # learning, and a small model fitting a few hundred dialogues needs the regularisation; every RL
    # stage turns it off
    model = plumbing.prepare_to_train(model, args, dist_info)  # LoRA, checkpointing, DDP / FSDP
    total_steps, optimizer, scheduler = plumbing.optimizer_and_schedule(
        args, model, len(train_examples), args.batch_size)
    step = run.resume({"model": model}, {"model": optimizer}, {"model": scheduler},
                      total_steps=total_steps)  # 0, or where the newest checkpoint stopped
    pad_id = tokenizer.pad_token_id
    if dist_info.master:
        print(f"sft: {len(train_examples)} examples, {total_steps} steps of {args.batch_size}"
              f"{f', resuming at step {step}' if step else ''}")

    eval_loss = None
    bar = tqdm(total=total_steps, initial=step, desc="sft", disable=not dist_info.master)
    start = time.time()
    while step < total_steps:
        batch = common.global_batch(train_examples, step, args.batch_size, args.seed)
        metrics = train_step(model, optimizer, scheduler, batch, args, dist_info, pad_id)
        step += 1
        record = {"step": step, "train_loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
                  "lr": scheduler.get_last_lr()[0], "elapsed_s": round(time.time() - start, 2)}
        if (args.eval_every and step % args.eval_every == 0) or step == total_steps:
            record["eval_loss"] = eval_loss = evaluate(model, test_examples, args, dist_info,
                                                       pad_id)
        run.logger.log(record)
        bar.update(1)
        bar.set_postfix({k: round(v, 4) for k, v in record.items() if k.endswith("loss")})
        run.save_if_due(step, total_steps)  # every --save-every steps, --stop-after, the last
        if run.stop_requested(step, total_steps):  # --stop-after: stop as if killed
            break
    bar.close()
    if step < total_steps:  # stopped by --stop-after: run it again to resume
        return run.finish()
    if eval_loss is None:  # resumed after the last step: nothing was evaluated in this run
        eval_loss = evaluate(model, test_examples, args, dist_info, pad_id)
    # every rank: gathered under FSDP, LoRA merged; rank 0 writes
    hf_models.save_policy(model, tokenizer, out)
    if dist_info.master:
        checkpoint.atomic_write(out / "sft_summary.json",
                                json.dumps({"step": step, "eval_loss": eval_loss}, indent=2))
        print(f"sft: {step} steps, held-out response NLL {eval_loss:.4f}, model saved to {out}")
    return run.finish(out)


if __name__ == "__main__":
    plumbing.cli(main)
