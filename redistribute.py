"""RED (R3HF): a Bradley–Terry reward model, and its score redistributed over the response tokens.

A sequence-level reward model R(x, y) (the SFT backbone plus a scalar head, read at the last real
token) is trained on chosen/rejected pairs with the Bradley–Terry loss
−log σ(R(x, y_c) − R(x, y_r)). Because the backbone is causal, ONE forward pass gives R(x, y≤t) at
every position t, and RED (Li et al. 2024, arXiv 2411.08302) turns it into a dense per-token reward:

    eq. 6   r̃_t = R(x, y≤t) − R(x, y≤t−1),   R(x, y≤−1) = the score at the last prompt token
            (or 0 with --zero-first), so Σ_t r̃_t = R(x, y) − R(x, ∅)  (or R(x, y))
    eq. 7   r̂_t = β_c · r̃_t + (1 − β_c) · R(x, y) · [t = T]          (default β_c = 1)

The reward of token a_t is read at a_t's own position (the hidden state that has seen a_t) and
belongs to the action that produced a_t. ppo_token.py calls `redistribute` (RED) and
`sparse_token_rewards` (the sequence-PPO baseline): both come from the same forward pass and code.

Prefix pairs (--prefix-pairs, the lab only; not in the R3HF paper). The paper trains R on whole
replies and reads it at every prefix, where it was never trained. In the lab the gold score labels
any prefix, so this option adds a Bradley–Terry term over the prefixes of each training reply: every
two prefixes y≤s, y≤t (the empty one, at the last prompt token, included) whose gold scores differ
are a pair, the higher one preferred, and the loss of a pair of replies becomes

    L = −log σ(R(x, y_c) − R(x, y_r)) + ½ (L_pre(y_c) + L_pre(y_r)),
    L_pre(y) = mean over s, t with gold(y≤t) > gold(y≤s) of −log σ(R(x, y≤t) − R(x, y≤s))

so R is trained where RED reads it. It needs supervision no human preference gives (a score for
every prefix): it measures whether RED's credit is limited by its reward model's prefixes.

Commands (the paper's lr 1e-5 is for 7B models; pass a larger one, e.g. 3e-4, for tiny ones):

    # train on the 40% reward split, one process (CPU or one GPU; bf16 autocast on CUDA)
    python redistribute.py train --sft runs/demo/sft --out runs/demo/reward_model --lr 1e-5
    # many GPUs: 64 pairs per optimizer step, each rank takes its slice of every global batch in
    # forward passes of 8 pairs (gradient accumulation makes up the rest); rank 0 logs and saves
    torchrun --standalone --nproc_per_node=8 redistribute.py train --sft runs/demo/sft \\
        --out runs/demo/reward_model --batch-size 64 --micro-batch-size 8
    # add --fsdp to shard the model over the ranks, --lora-rank 64 to train LoRA adapters (and the
    # head) only
    # look at one response, token by token
    python redistribute.py show --reward-model runs/demo/reward_model \\
        --prompt $'\\n\\nHuman: Hi\\n\\nAssistant:' --response " Hello!"

Outputs in --out: the reward model as a standard Hugging Face sequence classifier
(AutoModelForSequenceClassification, num_labels=1, read at the EOS that ends the response) with its
tokenizer and token_rlhf.json, accuracy.json (held-out pair accuracy and mean margin), log.jsonl and
checkpoint/ (resumed automatically).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
import gold
import lora
import plumbing
from plumbing import amp, checkpoint, distributed, hf_models


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=plumbing.HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train the Bradley–Terry reward model",
                           formatter_class=plumbing.HelpFormatter)
    data = plumbing.add_data_args(train.add_argument_group("data"), split="reward", preference=True)
    data.add_argument("--eval-fraction", type=float, default=0.1,
                      help="share of the split's pairs held out (by a hash of their id) to measure "
                           "pair accuracy")
    data.add_argument("--revision-pairs", default=None, metavar="LABELS",
                      help="the lab: also train on (revised ≻ rejected) pairs from label.py's "
                           "output, so the reward model learns from what the discriminator learns "
                           "from (held-out pairs left out)")
    data.add_argument("--prefix-pairs", action="store_true",
                      help="the lab (needs --preference gold): also rank every two prefixes of "
                           "each training reply by their gold scores (Bradley–Terry), so R is "
                           "trained at the prefixes RED reads; not in the R3HF paper (docstring)")
    gold.add_lexicon_arg(data, "--preference gold")
    model = train.add_argument_group("model")
    model.add_argument("--sft", required=True,
                       help="SFT model directory (or HF name): backbone and tokenizer")
    # a pair's chosen and rejected rows go through one forward pass together
    plumbing.add_optimizer_args(train.add_argument_group("algorithm"), "pairs", epochs=1.0, lr=1e-5,
                                lr_note="1e-5 is for 7B models; tiny models want ~1e-4 to 5e-4",
                                batch_size=8, micro_batch_size=8)
    plumbing.add_output_args(train.add_argument_group("output"),
                             "output directory for the reward model, logs, checkpoint",
                             save_every=200, eval_every=0,
                             eval_help="steps between held-out evaluations (0 = end only)",
                             eval_batch_size=8, batch_unit="pairs", log_every=10)
    lora.add_lora_args(train)
    plumbing.add_system_args(train)

    show = sub.add_parser("show", help="print a response with each token's redistributed reward",
                          formatter_class=plumbing.HelpFormatter)
    show.add_argument("--reward-model", required=True,
                      help="reward model directory written by `train`")
    show.add_argument("--prompt", required=True, help='prompt text, ending with "\\n\\nAssistant:"')
    show.add_argument("--response", required=True, help="response text (EOS is appended)")
    show.add_argument("--beta-c", type=float, default=1.0,
                      help="eq. 7 mixing: 1 = dense RED, 0 = sparse")
    show.add_argument("--zero-first", action="store_true",
                      help="R(x, y≤−1) = 0 instead of the prompt's score")
    show.add_argument("--max-prompt-len", type=int, default=256,
                      help="prompt tokens kept (the last ones)")
    show.add_argument("--max-response-len", type=int, default=256,
                      help="response tokens kept, EOS included")
    show.add_argument("--device", default="auto",
                      help="auto (cuda if available), cpu, cuda, cuda:N")
    show.add_argument("--trust-remote-code", action="store_true",
                      help="allow model repos with their own code")

    args = parser.parse_args(argv)
    if args.command == "train":
        if not 0.0 < args.eval_fraction < 1.0:
            train.error(f"--eval-fraction must be in (0, 1), got {args.eval_fraction}")
        plumbing.check_training_args(train, args, "max_prompt_len", "max_response_len", "log_every")
        lora.check_lora_args(train, args)
        if args.limit is not None and args.limit < 2:
            train.error(
                f"--limit must be at least 2 (one training and one held-out pair), got {args.limit}"
            )
        if args.prefix_pairs and args.preference != "gold":
            train.error("--prefix-pairs needs --preference gold: the gold scores the prefixes")
        # the lab's lexicon (gold.py): it ranks the pairs (and scores the prefixes)
        args.gold_lexicon = gold.lexicon_from_args(train, args, args.preference == "gold",
                                                   "--preference gold")
    elif not 0.0 <= args.beta_c <= 1.0:
        show.error(f"--beta-c must be in [0, 1], got {args.beta_c}")
    return args


# ----------------------------------------------------------------------------------------------
# 1. Data: pairs -> token ids -> right-padded batches (chosen rows first, then rejected rows)
# ----------------------------------------------------------------------------------------------
def select_pairs(args, quiet: bool = False):
    """(training pairs, held-out pairs) of --split (--split-seed; with --preference gold ranked by
    the gold score; then at most --limit, as label.py does): the held-out part is drawn by hashing,
    the same pairs the discriminator holds out. With --revision-pairs, label.py's
    (revised ≻ rejected) pairs join the training pairs, those of held-out ids excepted."""
    pairs = plumbing.load_data(args.data, args.split, args.split_seed, quiet=quiet)
    # the lab: chosen = the reply with the higher gold score, ties dropped
    if args.preference == "gold":
        pairs, ranked = gold.rank_pairs(pairs, lexicon=args.gold_lexicon)
        if not quiet:
            print(
                f"gold preferences: {ranked['kept']} of {ranked['pairs']} pairs kept, "
                f"{ranked['ties']} ties dropped, {ranked['flipped']} flipped against the human "
                "label"
            )
    pairs = pairs[: args.limit] if args.limit is not None else pairs
    train_pairs, eval_pairs = common.heldout_split(pairs, args.eval_fraction, args.split_seed)
    if not train_pairs or not eval_pairs:
        raise common.InputError(
            f"--data {args.data} --split {args.split}: {len(pairs)} pairs, too few to hold "
            f"out {args.eval_fraction:.0%} and train on the rest"
        )
    if args.revision_pairs:
        heldout_groups = {common.pair_group(p.id) for p in eval_pairs}
        train_pairs = train_pairs + revision_pairs(args.revision_pairs, heldout_groups)
    return train_pairs, eval_pairs


def revision_pairs(labels_path, heldout_groups: set[str]) -> list[common.Pair]:
    """(prompt, chosen = revised, rejected) pairs from label.py's output, those of held-out pairs
    left out (a record whose id's group, common.pair_group, is held out: no held-out prompt)."""
    pairs = []
    for where, record in common.read_rows(labels_path):
        if not isinstance(record, dict) or not all(
            isinstance(record.get(k), str) for k in ("id", "prompt", "rejected", "revised")
        ):
            raise common.DataError(
                f"{where}: a label.py record needs string fields id, prompt, rejected, revised")
        if common.pair_group(record["id"]) not in heldout_groups:
            pairs.append(
                common.Pair(
                    record["prompt"], record["revised"], record["rejected"], record.get("messages")
                )
            )
    return pairs


def encode_pairs(pairs, tokenizer, max_prompt_len: int, max_response_len: int,
                 chat_template: bool = True, prefix_gold: bool = False,
                 lexicon: gold.Lexicon | None = None):
    """Token ids of each pair: prompt, chosen and rejected response (each response ends with EOS).
    With prefix_gold, also the gold score (under `lexicon`) of every prefix of each response
    (prefix_gold_scores)."""
    examples = []
    for pair in pairs:
        prompt = common.prompt_text(tokenizer, pair.prompt, pair.messages, chat_template)
        chosen, rejected = (common.response_text(tokenizer, text, pair.messages, chat_template)
                            for text in (pair.chosen, pair.rejected))
        example = {"prompt": common.encode_prompt(tokenizer, prompt, max_prompt_len),
                   "chosen": common.encode_response(tokenizer, chosen, max_response_len),
                   "rejected": common.encode_response(tokenizer, rejected, max_response_len)}
        if prefix_gold:
            for side, text in (("chosen", chosen), ("rejected", rejected)):
                example[f"{side}_gold"] = prefix_gold_scores(
                    tokenizer, text, len(example[side]), lexicon=lexicon)
        examples.append(example)
    return examples


def prefix_gold_scores(tokenizer, text: str, n_tokens: int, *,
                       lexicon: gold.Lexicon | None = None) -> list[int]:
    """gold(y≤t) for the first n_tokens of encode_response(text) (EOS last): the gold score of the
    text up to the end of token t (a word cut mid-way is scored as the text it is); EOS adds 0."""
    ids, offsets = common.response_encodings(tokenizer, [text])[0]
    n_text = min(n_tokens - 1, len(ids))  # encode_response keeps max_len − 1 text tokens, then EOS
    scores = [gold.gold_score(text[:end], lexicon=lexicon) for _, end in offsets[:n_text]]
    return scores + [scores[-1] if scores else 0] * (n_tokens - n_text)


def collate_pairs(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> one right-padded batch of 2B rows: rows 0..B−1 chosen, rows B..2B−1 rejected,
    so both sides of a pair go through the same forward pass. Examples with prefix gold scores also
    give prefix_index [2B, L]: the positions of the empty prefix (the last prompt token) and of
    every response token; prefix_gold [2B, L]: their gold scores (0 for the empty prefix);
    prefix_valid [2B, L]: 1 where a prefix is real."""
    rows = [(e["prompt"], e["chosen"]) for e in examples] + [
        (e["prompt"], e["rejected"]) for e in examples
    ]
    query_response, attention_mask, response_mask = common.collate_right(rows, pad_id)  # [2B, T]
    batch = {"query_response": query_response, "attention_mask": attention_mask,
             "response_mask": response_mask}
    if examples and "chosen_gold" in examples[0]:
        golds = [e["chosen_gold"] for e in examples] + [e["rejected_gold"] for e in examples]
        # the empty prefix at len(prompt) − 1 (none without a prompt), then every response token
        starts = [len(prompt) for prompt, _ in rows]
        index = [[max(s - 1, 0)] + list(range(s, s + len(g))) for s, g in zip(starts, golds)]
        valid = [[int(s > 0)] + [1] * len(g) for s, g in zip(starts, golds)]
        batch["prefix_index"] = common.pad_right(index, 0)[0]
        batch["prefix_valid"] = common.pad_right(valid, 0)[0]
        batch["prefix_gold"] = common.pad_right([[0] + g for g in golds], 0)[0].float()
    return batch


# ----------------------------------------------------------------------------------------------
# 2. The reward model: R at every position, read at the last real token, Bradley–Terry loss
# ----------------------------------------------------------------------------------------------
def score_positions(reward_model, query_response: torch.Tensor,
                    attention_mask: torch.Tensor) -> torch.Tensor:
    """ONE forward pass: R(x, y≤t) at every position t, in float32; 0 at padding. [B, T]

    Gradients flow (training uses this too); wrap in torch.no_grad() to score. The caller puts
    the model in eval mode (dropout off) and, on CUDA, inside amp.autocast.
    """
    scores = reward_model(query_response, attention_mask).float()  # [B, T]
    return scores.masked_fill(attention_mask == 0, 0.0)  # garbage (or NaN) at padding never leaks


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each row's last real token, for left- or right-padded rows. [B]"""
    T = attention_mask.shape[1]
    return T - 1 - attention_mask.long().flip(-1).argmax(-1)


def pair_rewards(model, batch: dict[str, torch.Tensor], return_scores: bool = False):
    """R(x, y_c) and R(x, y_r) of a collate_pairs batch, from one forward pass. ([B], [B]); with
    return_scores also the scores at every position [2B, T] (for prefix_pair_loss)."""
    scores = score_positions(model, batch["query_response"], batch["attention_mask"])  # [2B, T]
    # [2B]
    rewards = scores.gather(1, last_token_index(batch["attention_mask"])[:, None]).squeeze(1)
    chosen, rejected = rewards.chunk(2)
    return (chosen, rejected, scores) if return_scores else (chosen, rejected)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor,
                       normaliser=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bradley–Terry: −log σ(R(x, y_c) − R(x, y_r)) summed over pairs and divided by `normaliser`
    (default: the number of pairs, the plain mean; logsigmoid is stable). Returns (loss, summed
    loss)."""
    loss_sum = -F.logsigmoid(chosen - rejected).sum()
    count = chosen.numel() if normaliser is None else normaliser
    return loss_sum / count, loss_sum.detach()


def prefix_pair_loss(scores: torch.Tensor, prefix_index: torch.Tensor, prefix_gold: torch.Tensor,
                     prefix_valid: torch.Tensor) -> torch.Tensor:
    """--prefix-pairs: per row, the mean over every two prefixes s, t with gold(y≤t) > gold(y≤s) of
    −log σ(R(x, y≤t) − R(x, y≤s)); 0 for a row whose prefixes all score the same. [2B]"""
    prefix_scores = scores.gather(1, prefix_index)  # R(x, y≤t): empty prefix, t = 0, 1, …  [2B, L]
    margin = prefix_scores[:, None, :] - prefix_scores[:, :, None]  # [s, t]: R(y≤t) − R(y≤s)
    valid = prefix_valid.bool()
    both_real = valid[:, None, :] & valid[:, :, None]  # [2B, L, L]
    better = (prefix_gold[:, None, :] > prefix_gold[:, :, None]) & both_real  # gold(t) > gold(s)
    losses = torch.where(better, -F.logsigmoid(margin), 0.0).sum((1, 2))  # [2B]
    return losses / better.sum((1, 2)).clamp(min=1)


# ----------------------------------------------------------------------------------------------
# 3. Held-out pair accuracy
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, examples: list[dict], pad_id: int, batch_size: int, device: torch.device,
             dist_info: distributed.DistInfo | None = None, precision="auto") -> dict:
    """Share of held-out pairs with R(x, y_c) > R(x, y_r) (ties count as wrong), and the mean
    margin R(x, y_c) − R(x, y_r). Under torchrun each rank scores every world_size-th pair."""
    dist_info = dist_info or distributed.DistInfo(device=device)
    model = distributed.unwrap(model)
    was_training = model.training
    model.eval()
    correct = margin_sum = 0.0
    for chunk, weight in distributed.rank_batches(examples, batch_size, dist_info):
        batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id).items()}
        with amp.autocast(device, precision):
            chosen, rejected = pair_rewards(model, batch)
        correct += weight * (chosen > rejected).sum().item()
        margin_sum += weight * (chosen - rejected).sum().item()
    model.train(was_training)
    n = len(examples)
    correct, margin_sum = distributed.all_reduce_sum([correct, margin_sum], dist_info).tolist()
    return {"accuracy": correct / n, "mean_margin": margin_sum / n, "pairs": n}


# ----------------------------------------------------------------------------------------------
# 4. Redistribution (RED eq. 6 and 7): pure maths on the scores, then the model-level functions
# ----------------------------------------------------------------------------------------------
def redistribute_scores(scores: torch.Tensor, attention_mask: torch.Tensor,
                        response_mask: torch.Tensor, beta_c: float = 1.0,
                        zero_first: bool = False) -> torch.Tensor:
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
    # R(x, y≤−1) [B]
    first_previous = torch.where(has_prompt, scores.gather(1, before).squeeze(1), 0.0)
    # R(x, y≤t−1) [B, T_resp]
    previous = torch.cat([first_previous[:, None], current[:, :-1]], dim=1)
    dense = current - previous  # eq. 6: r̃_t = R(x, y≤t) − R(x, y≤t−1)
    lengths = valid.sum(-1)  # [B]
    # [t = T]
    is_last = torch.arange(valid.shape[1], device=valid.device)[None] == (lengths - 1)[:, None]
    sequence = current.gather(1, (lengths - 1).clamp(min=0)[:, None])  # R(x, y) [B, 1]
    sparse = torch.where(is_last, sequence, 0.0)  # R(x, y)·[t = T]  [B, T_resp]
    # eq. 7: r̂_t = β_c·r̃_t + (1 − β_c)·R·[t = T]
    token_rewards = beta_c * dense + (1.0 - beta_c) * sparse
    return torch.where(valid, token_rewards, 0.0)  # padding gets exactly 0


@torch.no_grad()
def redistribute(reward_model, query_response: torch.Tensor, attention_mask: torch.Tensor,
                 response_mask: torch.Tensor, beta_c: float = 1.0,
                 zero_first: bool = False) -> torch.Tensor:
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


def load_reward_model(path, device="cpu", dtype=torch.float32, trust_remote_code=False):
    """A trained reward model (this project's, or TRL's / OpenRLHF's) in eval mode with dropout
    off."""
    model = hf_models.load_score_model(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                       what="--reward-model")
    return common.disable_dropout(model).eval().to(device)


# ----------------------------------------------------------------------------------------------
# 5. One optimizer step over a global batch of pairs
# ----------------------------------------------------------------------------------------------
def train_step(model, optimizer, scheduler, batch: list[dict], args, dist_info,
               pad_id: int) -> dict:
    """One optimizer step over a global batch of pairs, split over ranks and micro-batches.

    Every micro-batch's summed Bradley–Terry loss is divided by the pairs of the whole global batch,
    so the accumulated gradient equals that of one big batch in one process; DDP then averages over
    the ranks, so each rank divides by (global pairs / world size). Also returns the share of pairs
    ranked right and the mean margin R(x, y_c) − R(x, y_r).
    """
    rank_examples = batch[dist_info.rank::dist_info.world_size]
    normaliser = len(batch) / dist_info.world_size  # pairs
    model.train()
    sums = torch.zeros(3, dtype=torch.float64)  # summed loss, pairs ranked right, summed margin
    micro_batches = distributed.micro_batches(rank_examples, args.micro_batch_size)
    for k, examples in enumerate(micro_batches):
        micro = {key: v.to(dist_info.device) for key, v in collate_pairs(examples, pad_id).items()}
        with distributed.accumulate(model, last=k == len(micro_batches) - 1):
            with amp.autocast(dist_info.device, args.precision):
                chosen, rejected, scores = pair_rewards(model, micro, return_scores=True)
            loss, loss_sum = bradley_terry_loss(chosen, rejected, normaliser)
            if "prefix_index" in micro:  # --prefix-pairs: + ½ (L_pre(y_c) + L_pre(y_r)) per pair
                prefix_losses = prefix_pair_loss(  # [2B]
                    scores, micro["prefix_index"], micro["prefix_gold"], micro["prefix_valid"])
                prefix_sum = 0.5 * prefix_losses.sum()
                loss, loss_sum = loss + prefix_sum / normaliser, loss_sum + prefix_sum.detach()
            loss.backward()
        sums += torch.tensor(
            [loss_sum.item(), (chosen > rejected).sum().item(), (chosen - rejected).sum().item()],
            dtype=torch.float64)
    grad_norm = distributed.clip_grad_norm(model, args.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    sums = distributed.all_reduce_sum(sums, dist_info)
    return {"loss": sums[0].item() / len(batch), "accuracy": sums[1].item() / len(batch),
            "margin": sums[2].item() / len(batch), "grad_norm": grad_norm}


# ----------------------------------------------------------------------------------------------
# 6. The stages: train, show
# ----------------------------------------------------------------------------------------------
def train(args):
    run = plumbing.start_run(args)  # torchrun, --seed, a killed save's temp folders in --out
    dist_info, out = run.dist_info, run.out
    master, device = dist_info.master, dist_info.device

    # data: the split (--split-seed), its held-out part (hashed, the same pairs the discriminator
    # holds out)
    train_pairs, eval_pairs = select_pairs(args, quiet=not master)
    tokenizer = hf_models.load_tokenizer(args.sft, trust_remote_code=args.trust_remote_code,
                                         what="--sft")
    pad_id = tokenizer.pad_token_id
    train_examples = encode_pairs(train_pairs, tokenizer, args.max_prompt_len,
                                  args.max_response_len, args.chat_template,
                                  prefix_gold=args.prefix_pairs, lexicon=args.gold_lexicon)
    eval_examples = encode_pairs(eval_pairs, tokenizer, args.max_prompt_len, args.max_response_len,
                                 args.chat_template)

    # model: SFT backbone + fresh scalar head without bias, dropout off (the two sides of a pair
    # must be scored by the same function), optimizer, cosine schedule without warm-up
    model = plumbing.new_score_model(args, dist_info, "sequence", "reward model")
    common.disable_dropout(model).train()
    model = plumbing.prepare_to_train(model, args, dist_info)  # LoRA, checkpointing, DDP / FSDP
    batch_size = min(args.batch_size, len(train_examples))  # global pairs per optimizer step
    distributed.check_batch_size(batch_size, dist_info)
    total_steps, optimizer, scheduler = plumbing.optimizer_and_schedule(
        args, model, len(train_examples), batch_size)
    step = run.resume({"model": model}, {"model": optimizer}, {"model": scheduler},
                      map_location=device, total_steps=total_steps,
                      lexicon=args.gold_lexicon.id if args.gold_lexicon else None)  # 0 or the last
    if master:
        print(
            f"reward model: {len(train_examples)} training pairs, {len(eval_examples)} held out; "
            f"{total_steps} steps of {batch_size} pairs on {dist_info.world_size} rank(s), "
            f"device {device}"
            f"{f', resuming at step {step}' if step else ''}"
        )

    steps_per_epoch = max(1, len(train_examples) // batch_size)
    bar = tqdm(total=total_steps, initial=step, disable=not master, desc="reward model")
    start = time.time()
    while step < total_steps:
        # 1. the step's global batch (the same on every rank and every resume)
        batch = common.global_batch(train_examples, step, batch_size, args.seed)
        # 2. forward, Bradley–Terry loss, backward over micro-batches; clip, step, schedule
        metrics = train_step(model, optimizer, scheduler, batch, args, dist_info, pad_id)
        step += 1
        # 3. log, evaluate, checkpoint
        record = {
            "step": step,
            "epoch": step / steps_per_epoch,
            **metrics,
            "lr": scheduler.get_last_lr()[0],
            "elapsed_s": round(time.time() - start, 2),
        }
        if args.eval_every and step % args.eval_every == 0:
            result = evaluate(model, eval_examples, pad_id, args.eval_batch_size, device, dist_info,
                              args.precision)
            record.update({f"eval_{k}": v for k, v in result.items() if k != "pairs"})
        if step % args.log_every == 0 or step == total_steps or "eval_accuracy" in record:
            run.logger.log(record)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.3f}")
        run.save_if_due(step, total_steps)  # every --save-every steps, --stop-after, the last
        if run.stop_requested(step, total_steps):  # --stop-after: stop as if killed
            break
    bar.close()
    if step < total_steps:  # stopped by --stop-after: run it again to resume
        return run.finish()

    # held-out accuracy, final model
    result = evaluate(model, eval_examples, pad_id, args.eval_batch_size, device, dist_info,
                      args.precision)
    info = {
        "role": "reward_model",
        "sft": str(args.sft),
        "data": str(args.data),
        "split": args.split,
        "split_seed": args.split_seed,
        "eval_fraction": args.eval_fraction,
        "preference": args.preference,
        "revision_pairs": args.revision_pairs,
        "prefix_pairs": args.prefix_pairs,
        "lexicon": args.gold_lexicon.id if args.gold_lexicon else None,  # the lab's gold
        "steps": step,
    }
    # every rank; keeps log, checkpoint/
    hf_models.save_score_model(model, tokenizer, out, kind="sequence", extra=info)
    if master:
        result.update(
            {
                "step": step,
                "split": args.split,
                "data": str(args.data),
                "preference": args.preference,
                "lexicon": args.gold_lexicon.id if args.gold_lexicon else None,
                "training_pairs": len(train_examples),
            }
        )
        run.logger.log(
            {
                "step": step,
                **{f"eval_{k}": v for k, v in result.items() if k in ("accuracy", "mean_margin")},
            }
        )
        checkpoint.atomic_write(out / "accuracy.json", json.dumps(result, indent=2) + "\n")
        print(
            f"held-out pair accuracy {result['accuracy']:.4f}, "
            f"mean margin {result['mean_margin']:+.4f} "
            f"over {result['pairs']} pairs -> {out / 'accuracy.json'}"
        )
    return run.finish(result)


@torch.no_grad()
def show(args):
    device = distributed.setup_distributed(args.device).device
    tokenizer = hf_models.load_tokenizer(args.reward_model,
                                         trust_remote_code=args.trust_remote_code,
                                         what="--reward-model")
    model = load_reward_model(args.reward_model, device, trust_remote_code=args.trust_remote_code)
    prompt = common.encode_prompt(tokenizer, args.prompt, args.max_prompt_len)
    response = common.encode_response(tokenizer, args.response, args.max_response_len)
    query_response = torch.tensor([prompt + response], device=device)  # [1, T]
    attention_mask = torch.ones_like(query_response)
    response_mask = torch.zeros_like(query_response)
    response_mask[0, len(prompt):] = 1
    scores = score_positions(model, query_response, attention_mask)  # [1, T]
    token_rewards = redistribute_scores(
        scores, attention_mask, response_mask, args.beta_c, args.zero_first
    )[0]
    empty = 0.0 if args.zero_first or not prompt else scores[0, len(prompt) - 1].item()
    print(f"{'t':>4}  {'reward':>9}  {'R(x,y<=t)':>9}  token")
    for t, (token_id, reward) in enumerate(zip(response, token_rewards.tolist())):
        print(f"{t:>4}  {reward:+9.4f}  {scores[0, len(prompt) + t].item():+9.4f}  "
              f"{tokenizer.decode([token_id])!r}")
    total, full = token_rewards.sum().item(), scores[0, -1].item()
    print(
        f"sum of token rewards {total:+.4f} = R(x, y) - R(x, empty) = {full:+.4f} - ({empty:+.4f})"
        if args.beta_c == 1.0
        else f"sum of token rewards {total:+.4f}; R(x, y) = {full:+.4f}"
    )
    return token_rewards


def main(argv=None):
    args = parse_args(argv)
    return train(args) if args.command == "train" else show(args)


if __name__ == "__main__":
    plumbing.cli(main)
