"""discriminator.py — TLCR stages 2 and 3: a token-level preference discriminator and its rewards.

Stage 2 trains the discriminator on the token labels written by label.py. It is the SFT backbone
plus a linear head giving one logit z_t per token; D(a_t | x, a_<t) = σ(z_t), read at a_t's own
position (the hidden state that has seen a_t), is the probability that a_t is a "positive" token.
The loss is TLCR eq. 6, binary cross-entropy with soft targets y_t = 1 (positive), 0 (negative),
0.5 (neutral), over the response tokens of both the rejected and the revised sequence of every
labelled pair; prompt and padding are masked:

    L = −(1/N) Σ_{t ∈ responses} [ y_t·log σ(z_t) + (1 − y_t)·log(1 − σ(z_t)) ]

The responses carry no EOS here: label.py labels response tokens only, so the end of a response
has no target (the reward D gives an EOS token at PPO time is its extrapolation).

Stage 3 turns D into per-token rewards for PPO, TLCR eq. 7: r_t = 2·D(a_t | x, a_<t) − 1 ∈ [−1, 1],
given to the action that produced a_t (no one-token shift), plus the paper's ablations `fixed`
(+1 if D > 0.6, −1 if D < 0.4, else 0), `no_negative` (max(r_t, 0)) and `no_positive`
(min(r_t, 0)). `token_rewards` and `token_probs` are what ppo_token.py and eval.py import.

    # CPU, the tiny demo model (it wants a much larger lr than the paper's 1e-5 for 7B)
    python discriminator.py train --sft runs/demo/sft --labels runs/demo/labels.jsonl \\
        --out runs/demo/discriminator --lr 1e-3
    # one GPU, paper settings (lr 1e-5, weight decay 0.1, cosine without warm-up, 2 epochs)
    python discriminator.py train --sft runs/llama/sft --labels runs/llama/labels.jsonl \\
        --out runs/llama/discriminator --batch-size 64 --micro-batch-size 4 --gradient-checkpointing
    # several GPUs (add --fsdp to shard the model over them, --lora-rank 64 to train LoRA adapters
    # only)
    torchrun --nproc_per_node=8 discriminator.py train --sft ... --labels ... --out ...
    # measure again (held-out token accuracy; --split all for a separate labels file)
    python discriminator.py evaluate --discriminator runs/demo/discriminator \\
        --labels runs/demo/labels.jsonl
    # look at the rewards of one response, or of a labelled pair
    python discriminator.py show --discriminator runs/demo/discriminator \\
        --prompt "\\n\\nHuman: Hi\\n\\nAssistant:" --response " Hello!"
    python discriminator.py show --discriminator runs/demo/discriminator \\
        --labels runs/demo/labels.jsonl --index 3

`train` writes to --out: the discriminator as a standard Hugging Face token classifier
(AutoModelForTokenClassification, num_labels=1: one logit per token) with its tokenizer and
token_rlhf.json, log.jsonl, accuracy.json and checkpoint/ (resumed from when present).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
import lora
import plumbing
from plumbing import amp, checkpoint, distributed, hf_models

REWARD_MODES = ("continuous", "fixed", "no_negative", "no_positive")
PAPER_ACCURACY = 0.814  # TLCR, Llama-2-7B discriminator, held-out positive/negative tokens


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=plumbing.HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,evaluate,show}")

    train = commands.add_parser("train",
                                help="train the discriminator on label.py's labels (eq. 6)",
                                formatter_class=plumbing.HelpFormatter)
    data = train.add_argument_group("data")
    data.add_argument("--labels", required=True, help="labels.jsonl written by label.py")
    data.add_argument("--eval-fraction", type=float, default=0.1,
                      help="share of the labelled pairs held out (chosen by a hash of their id) "
                           "for accuracy")
    data.add_argument("--split-seed", type=int, default=0,
                      help="seed of the held-out hash (the data split's seed: the reward model "
                           "holds out the same pairs)")
    data.add_argument("--max-prompt-len", type=int, default=256,
                      help="prompt tokens kept (the last ones)")
    data.add_argument("--max-response-len", type=int, default=256,
                      help="response tokens kept (the first ones)")
    model = train.add_argument_group("model")
    model.add_argument("--sft", required=True,
                       help="SFT model folder (or any causal LM): the backbone to start from")
    plumbing.add_optimizer_args(train.add_argument_group("algorithm"), "sequences", epochs=2.0,
                                lr=1e-5,
                                lr_note="1e-5 is the paper's for a 7B model; the tiny "
                                        "demo model needs ~1e-3", batch_size=16, micro_batch_size=8,
                                weight_decay=0.1, weight_decay_note=" (paper: 0.1)",
                                epochs_help="passes over the training sequences, two a labelled "
                                            "pair (paper: 2)")
    plumbing.add_output_args(train.add_argument_group("output"),
                             "output folder: discriminator, log.jsonl, accuracy.json, checkpoint/",
                             save_every=200, eval_every=0,
                             eval_help="held-out accuracy every N steps (0 = at the end only)",
                             eval_batch_size=16, batch_unit="sequences", log_every=10)
    lora.add_lora_args(train)
    plumbing.add_system_args(train)

    evaluate = commands.add_parser("evaluate", help="token-level accuracy on labelled pairs",
                                   formatter_class=plumbing.HelpFormatter)
    evaluate.add_argument("--discriminator", required=True,
                          help="discriminator folder written by `train`")
    evaluate.add_argument("--labels", required=True, help="labels.jsonl written by label.py")
    evaluate.add_argument("--split", choices=("heldout", "all"), default="heldout",
                          help="heldout: the pairs `train` held out (same --eval-fraction and "
                               "--split-seed); all: every pair")
    evaluate.add_argument("--out", default=None,
                          help="accuracy JSON to write (default: DISCRIMINATOR/accuracy.json)")
    add_scoring_args(evaluate)

    show = commands.add_parser("show", help="print a response token by token with D and its reward",
                               formatter_class=plumbing.HelpFormatter)
    show.add_argument("--discriminator", required=True,
                      help="discriminator folder written by `train`")
    show.add_argument("--prompt", default=None, help="prompt text (ends with '\\n\\nAssistant:')")
    show.add_argument("--response", default=None,
                      help="response text (starts with a space in hh-rlhf)")
    show.add_argument("--add-eos", action="store_true",
                      help="append EOS to --response, as PPO samples do")
    show.add_argument("--labels", default=None,
                      help="instead of --prompt/--response: a labels.jsonl ...")
    show.add_argument("--index", type=int, default=0,
                      help="... and the 0-based record to show (both sequences)")
    show.add_argument("--mode", choices=REWARD_MODES, default="continuous",
                      help="reward mode (eq. 7 or an ablation)")
    add_scoring_args(show)

    args = parser.parse_args(argv)
    if args.command == "train":
        if not 0.0 <= args.eval_fraction < 1.0:
            train.error("--eval-fraction must be in [0, 1)")
        plumbing.check_training_args(train, args, "log_every")
        lora.check_lora_args(train, args)
    if (
        args.command == "show"
        and args.labels is None
        and (args.prompt is None or args.response is None)
    ):
        show.error("give --prompt and --response, or --labels FILE [--index K]")
    return args


def add_scoring_args(parser):
    group = parser.add_argument_group("system")
    group.add_argument("--eval-batch-size", type=int, default=16, help="sequences per forward pass")
    group.add_argument("--max-prompt-len", type=int, default=None,
                       help="prompt tokens kept (default: as in training)")
    group.add_argument("--max-response-len", type=int, default=None,
                       help="response tokens kept (default: as in training)")
    group.add_argument("--device", default="auto",
                       help="auto (cuda if available), cpu, cuda, cuda:N")
    amp.add_precision_args(group)
    group.add_argument("--trust-remote-code", action="store_true",
                       help="allow model repos that ship their own Python code (off by default)")
    return group


# ----------------------------------------------------------------------------------------------
# 1. data: labelled pairs -> (prompt ids, response ids, labels) sequences
# ----------------------------------------------------------------------------------------------
def load_labels(path, tokenizer=None) -> list[dict]:
    """Read label.py's JSONL; every record is checked, and a bad one raises naming file and line.
    With `tokenizer`, the file must have been made with it (label.py records the tokenizer's
    fingerprint): token ids from another tokenizer would train the discriminator on meaningless
    labels."""
    fingerprint = hf_models.tokenizer_fingerprint(tokenizer) if tokenizer is not None else None
    records = []
    for where, record in common.read_rows(path):
        if not isinstance(record, dict):
            raise common.DataError(f"{where}: expected a JSON object")
        for key in ("id", "prompt"):
            if not isinstance(record.get(key), str):
                raise common.DataError(f"{where}: field {key!r} missing or not a string")
        for side in ("rejected", "revised"):
            ids, labels = record.get(f"{side}_ids"), record.get(f"{side}_labels")
            if not isinstance(ids, list) or not all(type(i) is int and i >= 0 for i in ids):
                raise common.DataError(
                    f"{where}: field '{side}_ids' missing or not a list of token ids")
            if not isinstance(labels, list) or not all(
                type(v) is int and v in (-1, 0, 1) for v in labels
            ):
                raise common.DataError(
                    f"{where}: field '{side}_labels' missing or not a list of -1/0/+1")
            if len(ids) != len(labels):
                raise common.DataError(f"{where}: {side}_ids has {len(ids)} tokens but "
                                       f"{side}_labels has {len(labels)} labels")
        if fingerprint is not None and record.get("tokenizer") != fingerprint:
            made_with = record.get("tokenizer")
            raise common.DataError(
                f"{where}: labelled with another tokenizer ({made_with}) than the model's "
                f"({fingerprint}); run label.py again with --tokenizer set to this SFT model "
                "(the reviser's answers are cached)"
                if made_with
                else f"{where}: the record does not say which tokenizer made its ids (a label file "
                "from an older label.py); run label.py again (the reviser's answers are cached)"
            )
        record["_where"] = where
        records.append(record)
    if not records:
        raise common.DataError(f"{path}: no labelled pairs")
    return records


def encode_records(records, tokenizer, max_prompt_len=256, max_response_len=256):
    """Two sequences per pair: prompt + rejected (labels −1/0) and prompt + revised (labels +1/0).

    The prompt is rendered and tokenised here exactly as label.py rendered it (its record says
    whether a chat template was used); the response ids and their labels come from the record as
    label.py tokenised them, cut to max_response_len, with no EOS. Empty responses are dropped.
    """
    vocab = len(tokenizer)
    examples = []
    for record in records:
        prompt = common.prompt_text(tokenizer, record["prompt"], record.get("messages"),
                                    record.get("chat_template", True))
        prompt_ids = common.encode_prompt(tokenizer, prompt, max_prompt_len)
        for side in ("rejected", "revised"):
            response_ids = record[f"{side}_ids"][:max_response_len]
            if response_ids and max(response_ids) >= vocab:
                raise common.DataError(
                    f"{record['_where']}: token id {max(response_ids)} in {side}_ids is outside "
                    f"the tokenizer's {vocab} ids (labels made with another tokenizer?)"
                )
            if response_ids:
                examples.append(
                    (prompt_ids, response_ids, record[f"{side}_labels"][:max_response_len]))
    return examples


def collate(examples, pad_id):
    """Right-pad prompt + response (common.collate_right). labels [B, T] hold −1/0/+1 on response
    tokens and 0 elsewhere; response_mask says which positions count."""
    query_response, attention_mask, response_mask = common.collate_right(
        [(p, r) for p, r, _ in examples], pad_id)
    labels = torch.zeros_like(query_response)
    for i, (prompt_ids, response_ids, token_labels) in enumerate(examples):
        labels[i, len(prompt_ids): len(prompt_ids) + len(response_ids)] = torch.tensor(token_labels)
    return query_response, attention_mask, response_mask, labels


# ----------------------------------------------------------------------------------------------
# 2. the loss, TLCR eq. 6
# ----------------------------------------------------------------------------------------------
def soft_targets(labels: torch.Tensor) -> torch.Tensor:
    """+1 → 1.0, 0 → 0.5, −1 → 0.0."""
    return (labels.float() + 1.0) / 2.0


def token_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token BCE with soft targets [B, T]; log σ(z) and log(1 − σ(z)) = log σ(−z) computed
    stably."""
    y = soft_targets(labels)  # [B, T]
    z = logits.float()  # [B, T]
    return -(y * F.logsigmoid(z) + (1.0 - y) * F.logsigmoid(-z))  # eq. 6, per token


def discriminator_loss(logits: torch.Tensor, labels: torch.Tensor, response_mask: torch.Tensor,
                       normaliser=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 6: token_bce summed over the response positions and divided by `normaliser` (default:
    their count, the plain mean); prompt and padding contribute nothing. Returns (loss, summed
    BCE)."""
    bce_sum = (token_bce(logits, labels) * response_mask).sum()
    count = response_mask.sum() if normaliser is None else normaliser
    return bce_sum / count, bce_sum.detach()


# ----------------------------------------------------------------------------------------------
# 3. token rewards, TLCR eq. 7 (what ppo_token.py and eval.py import)
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def token_probs(discriminator, query_response, attention_mask, response_mask) -> torch.Tensor:
    """D(a_t | x, a_<t) for every response token, [B, T_resp] left-aligned, 0 past each row's end.

    One forward pass. The logit at position t has seen tokens 0..t, so D for token a_t is read at
    a_t's own position: no shift. Works with left-padded prompts and right-padded rows alike.
    The caller sets eval mode (load_discriminator does).
    """
    logits = discriminator(query_response, attention_mask)  # [B, T]
    return common.gather_response(torch.sigmoid(logits.float()), response_mask)  # [B, T_resp]


def rewards_from_probs(probs: torch.Tensor, valid: torch.Tensor,
                       mode: str = "continuous") -> torch.Tensor:
    """D [B, T_resp] -> token rewards [B, T_resp]; 0 where valid is 0."""
    rewards = 2.0 * probs - 1.0  # eq. 7: r_t = 2·D − 1
    if mode == "fixed":  # ablation: +1 if D > 0.6, −1 if D < 0.4, else 0
        rewards = (probs > 0.6).float() - (probs < 0.4).float()
    elif mode == "no_negative":  # ablation: max(r_t, 0)
        rewards = rewards.clamp(min=0.0)
    elif mode == "no_positive":  # ablation: min(r_t, 0)
        rewards = rewards.clamp(max=0.0)
    elif mode != "continuous":
        raise ValueError(f"unknown reward mode {mode!r}; choose from {REWARD_MODES}")
    return rewards * valid.to(rewards.dtype)


def token_rewards(discriminator, query_response, attention_mask, response_mask,
                  mode="continuous") -> torch.Tensor:
    """TLCR per-token rewards [B, T_resp]: column j is the reward of the row's j-th response token,
    for the action that produced it; prompt and padding get none (zeros past each row's end)."""
    probs = token_probs(discriminator, query_response, attention_mask, response_mask)  # [B, T_resp]
    _, valid = common.response_index(response_mask)  # [B, T_resp]
    return rewards_from_probs(probs, valid, mode)


def load_discriminator(path, device="cpu", dtype=torch.float32, trust_remote_code=False):
    """A trained discriminator in eval mode with dropout off, ready for token_rewards (stored in
    `dtype`, computing like an fp32 model: amp.compute_in_fp32)."""
    model = hf_models.load_score_model(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                       what="--discriminator")
    return amp.compute_in_fp32(common.disable_dropout(model).eval().to(device))


# ----------------------------------------------------------------------------------------------
# 4. one optimizer step; held-out accuracy
# ----------------------------------------------------------------------------------------------
def train_step(model, optimizer, scheduler, batch, args, dist_info, pad_id) -> dict:
    """One optimizer step over a global batch, split over ranks and micro-batches.

    Every micro-batch's summed loss is divided by the labelled tokens of the whole global batch, so
    the accumulated gradient equals that of one big batch in one process; DDP then averages over the
    ranks, so each rank divides by (global tokens / world size). Also returns the share of positive
    / negative tokens on the right side of D = ½ (batch_accuracy).
    """
    rank_examples = batch[dist_info.rank::dist_info.world_size]
    normaliser = sum(len(r) for _, r, _ in batch) / dist_info.world_size  # labelled response tokens
    model.train()
    sums = torch.zeros(3, dtype=torch.float64)  # summed BCE, right decisions, decided (±1) tokens
    micro_batches = distributed.micro_batches(rank_examples, args.micro_batch_size)
    for k, examples in enumerate(micro_batches):
        query_response, attention_mask, response_mask, labels = (
            t.to(dist_info.device) for t in collate(examples, pad_id)
        )
        with distributed.accumulate(model, last=k == len(micro_batches) - 1):
            with amp.autocast(dist_info.device, args.precision):
                logits = model(query_response, attention_mask)  # [B, T]
            loss, bce_sum = discriminator_loss(logits, labels, response_mask, normaliser)  # eq. 6
            loss.backward()
        decided = response_mask.bool() & (labels != 0)
        sums += torch.tensor([bce_sum.item(), ((logits > 0) == (labels > 0))[decided].sum().item(),
                              decided.sum().item()], dtype=torch.float64)
    grad_norm = distributed.clip_grad_norm(model, args.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    sums = distributed.all_reduce_sum(sums, dist_info)
    tokens = normaliser * dist_info.world_size
    return {
        "loss": sums[0].item() / tokens,
        "batch_accuracy": sums[1].item() / max(sums[2].item(), 1),
        "grad_norm": grad_norm,
    }


@torch.no_grad()
def evaluate_accuracy(model, examples, batch_size, dist_info, precision="auto", pad_id=0) -> dict:
    """Token-level accuracy on held-out labels: a positive token is right if D > 0.5, a negative one
    if D < 0.5 (the paper's 81.4% figure); neutral tokens have no right answer, we report their mean
    D. Each rank scores its share of the sequences; the counts are summed over ranks."""
    model = distributed.unwrap(model)
    was_training = model.training
    model.eval()
    # counts: positive n / right / ΣD, negative n / right / ΣD, neutral n / ΣD
    sums = torch.zeros(8, dtype=torch.float64)
    for chunk, weight in distributed.rank_batches(examples, batch_size, dist_info):
        query_response, attention_mask, response_mask, labels = (
            t.to(dist_info.device) for t in collate(chunk, pad_id)
        )
        with amp.autocast(dist_info.device, precision):
            # D at every position, [B, T]
            probs = torch.sigmoid(model(query_response, attention_mask).float())
        in_response = response_mask.bool()
        pos, neg, neu = (
            in_response & (labels > 0),
            in_response & (labels < 0),
            in_response & (labels == 0),
        )
        counts = [
            pos.sum(),
            (probs[pos] > 0.5).sum(),
            probs[pos].sum(),
            neg.sum(),
            (probs[neg] < 0.5).sum(),
            probs[neg].sum(),
            neu.sum(),
            probs[neu].sum(),
        ]
        sums += weight * torch.tensor([c.item() for c in counts], dtype=torch.float64)
    model.train(was_training)
    n_pos, right_pos, d_pos, n_neg, right_neg, d_neg, n_neu, d_neu = distributed.all_reduce_sum(
        sums, dist_info
    ).tolist()
    return {
        "accuracy": (right_pos + right_neg) / max(n_pos + n_neg, 1),
        "positive_accuracy": right_pos / max(n_pos, 1),
        "negative_accuracy": right_neg / max(n_neg, 1),
        "n_positive": int(n_pos),
        "n_negative": int(n_neg),
        "n_neutral": int(n_neu),
        "mean_d_positive": d_pos / max(n_pos, 1),
        "mean_d_negative": d_neg / max(n_neg, 1),
        "mean_d_neutral": d_neu / max(n_neu, 1),
        "n_sequences": len(examples),
        "paper_accuracy": PAPER_ACCURACY,
    }


def log_fields(metrics: dict) -> dict:
    return {
        f"eval_{k}": v
        for k, v in metrics.items()
        if k.startswith(("acc", "pos", "neg", "mean_d", "n_"))
    }


def report_accuracy(metrics: dict, path: Path):
    checkpoint.atomic_write(path, json.dumps(metrics, indent=2) + "\n")
    print(
        f"token accuracy {metrics['accuracy']:.3f} (positive {metrics['positive_accuracy']:.3f} of "
        f"{metrics['n_positive']}, negative {metrics['negative_accuracy']:.3f} of "
        f"{metrics['n_negative']}); "
        f"mean D on {metrics['n_neutral']} neutral tokens {metrics['mean_d_neutral']:.3f}; "
        f"paper {PAPER_ACCURACY} -> {path}"
    )


def heldout_examples_of(records, tokenizer, info: dict, split: str = "heldout"):
    """The sequences `train` held out (its saved --eval-fraction, --split-seed and lengths), or
    every one."""
    if split == "heldout":
        records = common.heldout_split(
            records,
            info.get("eval_fraction", 0.1),
            info.get("split_seed", 0),
            key=lambda r: r["id"],
        )[1]
    return encode_records(
        records, tokenizer, info.get("max_prompt_len", 256), info.get("max_response_len", 256)
    ), len(records)


# ----------------------------------------------------------------------------------------------
# 5. the commands
# ----------------------------------------------------------------------------------------------
def train(args):
    run = plumbing.start_run(args)  # torchrun, --seed, a killed save's temp folders in --out
    dist_info, out = run.dist_info, run.out
    tokenizer = hf_models.load_tokenizer(args.sft, trust_remote_code=args.trust_remote_code,
                                         what="--sft")
    # before the model: a bad file stops the run at once
    records = load_labels(args.labels, tokenizer)
    # dropout stays on while the discriminator learns (per-token targets, no pair to keep
    # consistent: it is plain regularisation, as in SFT); load_discriminator turns it off, so the
    # rewards PPO reads are deterministic
    model = plumbing.new_score_model(args, dist_info, "token", "discriminator")
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and args.max_prompt_len + args.max_response_len > max_positions:
        raise common.InputError(
            "--max-prompt-len + --max-response-len = "
            f"{args.max_prompt_len + args.max_response_len} "
            f"exceeds the model's {max_positions} positions"
        )
    train_records, heldout_records = common.heldout_split(
        records, args.eval_fraction, args.split_seed, key=lambda r: r["id"])
    train_examples = encode_records(train_records, tokenizer, args.max_prompt_len,
                                    args.max_response_len)
    heldout_examples = encode_records(heldout_records, tokenizer, args.max_prompt_len,
                                      args.max_response_len)
    if not train_examples:
        raise common.DataError(f"{args.labels}: no non-empty response to train on")
    model = plumbing.prepare_to_train(model, args, dist_info)  # LoRA, checkpointing, DDP / FSDP
    batch_size = min(args.batch_size, len(train_examples))
    distributed.check_batch_size(batch_size, dist_info)
    total_steps, optimizer, scheduler = plumbing.optimizer_and_schedule(
        args, model, len(train_examples), batch_size)
    step = run.resume({"model": model}, {"model": optimizer}, {"model": scheduler},
                      total_steps=total_steps)  # 0, or where the newest checkpoint stopped
    pad_id = tokenizer.pad_token_id
    if dist_info.master:
        print(
            f"discriminator: {len(train_records)} pairs ({len(train_examples)} sequences) "
            "to train on, "
            f"{len(heldout_records)} held out; {total_steps} steps of {batch_size} sequences"
            f"{f', resuming at step {step}' if step else ''}"
        )

    steps_per_epoch = max(1, len(train_examples) // batch_size)
    bar = tqdm(total=total_steps, initial=step, desc="discriminator", disable=not dist_info.master)
    start = time.time()
    while step < total_steps:
        batch = common.global_batch(train_examples, step, batch_size, args.seed)
        metrics = train_step(model, optimizer, scheduler, batch, args, dist_info, pad_id)
        step += 1
        record = {
            "step": step,
            "epoch": step / steps_per_epoch,
            **metrics,
            "lr": scheduler.get_last_lr()[0],
            "elapsed_s": round(time.time() - start, 2),
        }
        if args.eval_every and step % args.eval_every == 0 and heldout_examples:
            accuracy = evaluate_accuracy(model, heldout_examples, args.eval_batch_size, dist_info,
                                         args.precision, pad_id)
            record.update(log_fields(accuracy))
        if step % args.log_every == 0 or step == total_steps or "eval_accuracy" in record:
            run.logger.log(record)
        bar.update(1)
        bar.set_postfix(loss=round(record["loss"], 4), acc=round(record["batch_accuracy"], 3))
        run.save_if_due(step, total_steps)  # every --save-every steps, --stop-after, the last
        if run.stop_requested(step, total_steps):  # --stop-after: stop as if killed
            break
    bar.close()
    if step < total_steps:  # stopped by --stop-after: run it again to resume
        return run.finish()
    info = {
        "role": "tlcr_discriminator",
        "sft": str(args.sft),
        "labels": str(args.labels),
        "split_seed": args.split_seed,
        "eval_fraction": args.eval_fraction,
        "max_prompt_len": args.max_prompt_len,
        "max_response_len": args.max_response_len,
        "steps": step,
    }
    # every rank; keeps log.jsonl, checkpoint/
    hf_models.save_score_model(model, tokenizer, out, kind="token", extra=info)
    metrics = None
    if heldout_examples:
        metrics = evaluate_accuracy(model, heldout_examples, args.eval_batch_size, dist_info,
                                    args.precision, pad_id)
        metrics.update(labels=str(args.labels), n_pairs=len(heldout_records), split="heldout")
        if dist_info.master:
            report_accuracy(metrics, out / "accuracy.json")
            run.logger.log({"step": step, **log_fields(metrics)})
    elif dist_info.master:
        print("no held-out pairs (--eval-fraction 0 or a single pair): accuracy not measured")
    if dist_info.master:
        print(f"discriminator saved to {out}")
    return run.finish(metrics)


def evaluate(args):
    device = distributed.setup_distributed(args.device).device
    info = hf_models.read_run_info(args.discriminator)
    info.update(
        {
            k: v
            for k in ("max_prompt_len", "max_response_len")
            if (v := getattr(args, k)) is not None
        }
    )
    tokenizer = hf_models.load_tokenizer(args.discriminator, what="--discriminator")
    model = load_discriminator(args.discriminator, device, amp.frozen_dtype(args, device),
                               args.trust_remote_code)
    records = load_labels(args.labels, tokenizer)
    examples, n_pairs = heldout_examples_of(records, tokenizer, info, args.split)
    if not examples:
        raise common.InputError(f"{args.labels}: no held-out pairs; use --split all")
    metrics = evaluate_accuracy(model, examples, args.eval_batch_size,
                                distributed.DistInfo(device=device), args.precision,
                                tokenizer.pad_token_id)
    metrics.update(labels=str(args.labels), n_pairs=n_pairs, split=args.split)
    report_accuracy(metrics,
                    Path(args.out) if args.out else Path(args.discriminator) / "accuracy.json")
    return metrics


def show(args):
    """Print each response token with D and its reward (and its label when shown from a labels
    file)."""
    device = distributed.setup_distributed(args.device).device
    info = hf_models.read_run_info(args.discriminator)
    max_prompt_len = args.max_prompt_len or info.get("max_prompt_len", 256)
    tokenizer = hf_models.load_tokenizer(args.discriminator, what="--discriminator")
    model = load_discriminator(args.discriminator, device, amp.frozen_dtype(args, device),
                               args.trust_remote_code)
    if args.labels is not None:
        records = load_labels(args.labels, tokenizer)
        if not 0 <= args.index < len(records):
            raise common.InputError(
                f"--index {args.index}: {args.labels} has records 0..{len(records) - 1}")
        record = records[args.index]
        prompt = common.prompt_text(tokenizer, record["prompt"], record.get("messages"),
                                    record.get("chat_template", True))
        sequences = [
            (side, record[f"{side}_ids"], record[f"{side}_labels"])
            for side in ("rejected", "revised")
        ]
    else:
        prompt = args.prompt
        sequences = [
            (
                "response",
                common.encode_response(tokenizer, args.response, 10**9, args.add_eos),
                None,
            )
        ]
    prompt_ids = common.encode_prompt(tokenizer, prompt, max_prompt_len)
    print(f"prompt: {prompt[-300:]!r}")
    for name, response_ids, labels in sequences:
        if not response_ids:
            print(f"\n{name}: (empty)")
            continue
        batch = collate([(prompt_ids, response_ids, [0] * len(response_ids))],
                        tokenizer.pad_token_id)
        inputs = [t.to(device) for t in batch[:3]]  # query_response, attention_mask, response_mask
        with amp.autocast(device, args.precision):
            probs = token_probs(model, *inputs)  # [1, T_resp]
        rewards = rewards_from_probs(probs, torch.ones_like(probs), args.mode)[0]  # [T_resp]
        probs = probs[0]
        print(
            f"\n{name} ({len(response_ids)} tokens, reward mode {args.mode}, "
            f"sum {rewards.sum().item():+.3f})"
        )
        print(f"{'#':>4}  {'token':<20} {'label':>5}  {'D':>6}  {'reward':>7}")
        for j, token_id in enumerate(response_ids):
            label = "" if labels is None else {1: "+1", 0: "0", -1: "-1"}[labels[j]]
            print(
                f"{j:>4}  {tokenizer.decode([token_id])!r:<20} {label:>5}  {probs[j].item():6.3f}  "
                f"{rewards[j].item():+7.3f}"
            )


def main(argv=None):
    args = parse_args(argv)
    return {"train": train, "evaluate": evaluate, "show": show}[args.command](args)


if __name__ == "__main__":
    plumbing.cli(main)
