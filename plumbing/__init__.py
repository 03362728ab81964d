"""plumbing — what every stage needs and no reader has to study: skip it on a first reading.

Nothing here is part of an algorithm (those are in the stage files, and the ideas they share are in
common.py). The package keeps the stages short by holding the machinery three or more of them use,
one file per concern; a stage imports the parts it uses (`from plumbing import checkpoint`) and
calls them by their part's name (`checkpoint.save_checkpoint(...)`):

    __init__.py     the command line: errors -> one line and exit code 2 (cli), HelpFormatter, the
                    shared argument groups, --data to pairs (load_data), seeds, AdamW, the cosine
                    schedule, the trainers' run helper (start_run -> Run)
    hf_models.py    load_tokenizer, load_policy, load_score_model / save_score_model (the project's,
                    TRL's and OpenRLHF's formats), save_policy, save_hf, build_tiny, tokenizer
                    checks (the models of one run must agree)
    distributed.py  DistInfo / setup_distributed (torchrun), wrap_model (DDP, or FSDP2 with --fsdp),
                    prepare_frozen, accumulate, clip_grad_norm, all-reduces, the FSDP2 section
    amp.py          --precision: autocast, the frozen models' dtype, compute_in_fp32
    checkpoint.py   atomic_write, JsonlLogger, trackers (--report-to), save_checkpoint / resume /
                    load_checkpoint (crash-safe, refuses to resume a different run; sharded under
                    FSDP), run_config, clean_stale_temp
    chat.py         one chat-completions client (label.py's reviser, eval.py's judge), the
                    append-only JSONL cache of their answers, one download (hh-rlhf)
    gpt_judge.py    eval.py --judge openai: the judge's prompt, its verdicts, their cache
    decode.py       how generate runs the policy: static KV cache, --compile, the FSDP stop
    ppo_setup.py    ppo_token.py's set-up: loading the policy, reference and critic, the frozen
                    models as callables, the prompts, the snapshots at KL targets
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import common
import lora
from common import InputError
from plumbing import amp, chat, checkpoint, distributed
from plumbing import hf_models as hf_models  # re-exported: `import plumbing` loads every submodule


# ----------------------------------------------------------------------------------------------
# Errors: bad input is one line on stderr and exit code 2, never a traceback
# ----------------------------------------------------------------------------------------------
def cli(main):
    """Run a stage's main(); an InputError (bad data, a missing model, models that do not belong
    together) prints `error: ...` once (rank 0 under torchrun) and exits with code 2. Warnings print
    as one line each, `warning: ...`, without the source line Python shows by default."""
    warnings.formatwarning = lambda message, category, *rest, **kw: f"warning: {message}\n"
    try:
        return main()
    except InputError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the docstring's layout and shows every option's default."""


def check_positive(parser, args, *names):
    for name in names:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(
                f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")


def add_system_args(parser):
    """The options every training stage shares (device, precision, memory, seed)."""
    group = parser.add_argument_group("system")
    group.add_argument("--device", default="auto",
                       help="auto (cuda if available), cpu, cuda, cuda:N")
    amp.add_precision_args(group)
    group.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute activations in the backward pass: less memory, ~30%% more "
                            "compute")
    group.add_argument("--fsdp", action="store_true",
                       help="under torchrun: shard weights, gradients and optimizer states over "
                            "the ranks (FSDP2) instead of replicating them (DDP); for models that "
                            "outgrow one GPU")
    group.add_argument("--seed", type=int, default=0,
                       help="random seed of initialisation, data order and sampling (not of the "
                            "data split)")
    group.add_argument("--trust-remote-code", action="store_true",
                       help="allow model repos that ship their own Python code (off by default)")
    return group


# ----------------------------------------------------------------------------------------------
# Data: --data to files (the bundled slice, a local file, or hh-rlhf downloaded), then one split
# ----------------------------------------------------------------------------------------------
def add_data_args(group, split: str | None = None, response_len: bool = True,
                  prompt_len: bool = True, limit: bool = True, preference: bool = False):
    """The data options the stages share: --data, --split, --split-seed, --limit, lengths, chat
    template."""
    group.add_argument("--data", default="bundled",
                       help="'bundled' (the hh-rlhf slice in data/), a local "
                            ".jsonl/.jsonl.gz/.json/.parquet of preference pairs (formats: "
                            "docs/data.md), or 'hh-rlhf[:SUBSET,...]' to download")
    if split is not None:
        group.add_argument("--split", default=split, choices=("sft", "reward", "rl", "test", "all"),
                           help="which part of the 20/40/40 + test split (common.split_pairs) to "
                                "use")
    group.add_argument("--split-seed", type=int, default=0,
                       help="seed of the data split; keep it equal across stages (nothing else "
                            "depends on it)")
    if limit:
        group.add_argument("--limit", type=int, default=None,
                           help="use at most this many pairs of the split")
    if prompt_len:
        group.add_argument("--max-prompt-len", type=int, default=256,
                           help="prompt tokens kept (the last ones)")
    if response_len:
        group.add_argument("--max-response-len", type=int, default=256,
                           help="response tokens kept, EOS included")
    if preference:
        group.add_argument("--preference", default="human", choices=("human", "gold"),
                           help="which reply of a pair is chosen: the data's (human) or the one "
                                "with the higher gold.py score (gold: the offline lab; ties are "
                                "dropped)")
    group.add_argument("--no-chat-template", dest="chat_template", action="store_false",
                       help="render chat-message data as the hh-rlhf transcript even when the "
                            "tokenizer has a chat template (the bundled hh-rlhf data always uses "
                            "the transcript)")
    return group


def data_paths(source: str, cache_dir=None) -> list[Path]:
    """The files behind --data: 'bundled', a local file, or 'hh-rlhf[:SUBSET,...]' (downloaded
    once)."""
    source = str(source)
    if source == "bundled":
        return [common.BUNDLED_DATA]
    if source.startswith("hh-rlhf") and not Path(source).exists():
        subsets = (source.split(":", 1)[1].split(",") if ":" in source
                   else list(chat.HH_RLHF_SUBSETS))
        return [chat.download_hh_rlhf(s, "train", cache_dir) for s in subsets]
    return [Path(source)]


def load_data(source: str, split: str, split_seed: int, limit: int | None = None,
              quiet: bool = False):
    """The pairs of one split of --data (common.load_pairs, common.select_split)."""
    return common.select_split(common.load_pairs(data_paths(source), quiet=quiet), split,
                               split_seed, limit)


# ----------------------------------------------------------------------------------------------
# A training run's basics: seeds, AdamW, the cosine schedule, the planned steps
# ----------------------------------------------------------------------------------------------
def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def adamw(model: nn.Module, lr: float, weight_decay: float = 0.0,
          betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW over the trained parameters, with weight decay on matrices only (not on biases and
    norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def cosine_schedule(optimizer: torch.optim.Optimizer,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay from the base learning rate to 0 over total_steps, no warm-up."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps))))


def total_steps_of(n_examples: int, batch_size: int, epochs: float, max_steps: int | None) -> int:
    """The planned optimizer steps of a run: --max-steps, or --epochs passes of full global
    batches."""
    if max_steps is not None:
        return max_steps
    return max(1, math.ceil(epochs * max(1, n_examples // batch_size)))


# ----------------------------------------------------------------------------------------------
# What the three supervised trainers share (sft.py, discriminator.py train, redistribute.py train):
# their optimizer and output options, their model's preparation, their optimizer and schedule
# ----------------------------------------------------------------------------------------------
def add_optimizer_args(group, batch_unit: str, epochs: float, lr: float, lr_note: str,
                       batch_size: int, micro_batch_size: int, weight_decay: float = 0.0,
                       epochs_help: str | None = None, weight_decay_note: str = ""):
    """--epochs, --max-steps, --lr, --weight-decay, --batch-size, --micro-batch-size and
    --max-grad-norm, with each stage's defaults; `batch_unit` is what a batch counts."""
    group.add_argument("--epochs", type=float, default=epochs,
                       help=epochs_help or f"passes over the training {batch_unit}")
    group.add_argument("--max-steps", type=int, default=None,
                       help="optimizer steps of the whole run (overrides --epochs)")
    group.add_argument("--lr", type=float, default=lr,
                       help=f"peak learning rate, cosine-decayed to 0 without warm-up ({lr_note})")
    group.add_argument("--weight-decay", type=float, default=weight_decay,
                       help=f"AdamW weight decay on matrices{weight_decay_note}")
    group.add_argument("--batch-size", type=int, default=batch_size,
                       help=f"global batch: {batch_unit} per optimizer step over all ranks")
    group.add_argument("--micro-batch-size", type=int, default=micro_batch_size,
                       help=f"{batch_unit} per forward pass on one rank; gradient accumulation "
                            "makes up the rest")
    group.add_argument("--max-grad-norm", type=float, default=1.0,
                       help="gradient clipping (0 = off)")
    return group


def add_output_args(group, out_help: str, save_every: int, eval_every: int, eval_help: str,
                    eval_batch_size: int, batch_unit: str, log_every: int | None = None,
                    out_default: str | None = None):
    """--out, --log-every (when the stage logs every N steps), --eval-every, --eval-batch-size and
    the run's options (add_run_args)."""
    group.add_argument("--out", required=out_default is None, default=out_default, help=out_help)
    if log_every is not None:
        group.add_argument("--log-every", type=int, default=log_every,
                           help="write a log line every N optimizer steps")
    group.add_argument("--eval-every", type=int, default=eval_every, help=eval_help)
    group.add_argument("--eval-batch-size", type=int, default=eval_batch_size,
                       help=f"{batch_unit} per forward pass when evaluating")
    return add_run_args(group, save_every)


def check_training_args(parser, args, *more_positive: str):
    """Refuses, by name, a batch, step count or interval below 1 (and any of `more_positive`), and
    an --epochs or --lr that is not positive."""
    names = ["batch_size", "micro_batch_size", "eval_batch_size", "max_steps", "save_every",
             *more_positive]
    check_positive(parser, args, *(n for n in names if hasattr(args, n)))
    for name in ("epochs", "lr"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")


def new_score_model(args, dist_info: distributed.DistInfo, kind: str, stage: str) -> nn.Module:
    """A score-model trainer's model (discriminator: kind "token", one logit per token; reward
    model: "sequence"): --sft's backbone and a fresh scalar head, with a bias for the token logit
    and none for R (only differences of R matter). Says before training, not after, when its family
    will be saved in the project's own format."""
    model = hf_models.new_score_model(args.sft, bias=kind == "token",
                                      dtype=amp.base_dtype(args, dist_info.device),
                                      trust_remote_code=args.trust_remote_code, what="--sft",
                                      meta=dist_info.meta)
    save_note = hf_models.score_save_note(model.config, kind)
    if dist_info.master and save_note:
        print(f"{stage}: note: {save_note}")
    return model


def prepare_to_train(model: nn.Module, args, dist_info: distributed.DistInfo) -> nn.Module:
    """What every trainer does to its model before the optimizer sees it: LoRA adapters
    (--lora-rank 0: none; on a score model's backbone, its head stays trained), gradient
    checkpointing if asked, then DDP, or FSDP2 sharding with --fsdp."""
    lora.add_lora_from_args(model.backbone if isinstance(model, common.ScoreModel) else model, args)
    if args.gradient_checkpointing:
        hf_models.enable_gradient_checkpointing(model)
    return distributed.wrap_model(model, dist_info, args.precision)


def optimizer_and_schedule(args, model: nn.Module, n_examples: int, batch_size: int):
    """AdamW (--lr, --weight-decay) and its cosine schedule over the run's planned steps (--epochs
    passes over n_examples in global batches of batch_size, or --max-steps).
    Returns (total_steps, optimizer, scheduler)."""
    total_steps = total_steps_of(n_examples, batch_size, args.epochs, args.max_steps)
    optimizer = adamw(model, args.lr, args.weight_decay)
    return total_steps, optimizer, cosine_schedule(optimizer, total_steps)



# ----------------------------------------------------------------------------------------------
# The run helper: the bookkeeping every trainer repeats (sft.py, discriminator.py train,
# redistribute.py train, ppo_token.py). Each keeps its own loop and its own train_step:
#
#     run = plumbing.start_run(args)                 # torchrun, --seed, a killed save's temp files
#     model, optimizer, scheduler = ...
#     step = run.resume({"model": model}, {"model": optimizer}, {"model": scheduler},
#                       total_steps=total_steps)     # 0, or where the newest checkpoint stopped
#     while step < total_steps:
#         metrics = train_step(...)
#         step += 1
#         run.logger.log({"step": step, **metrics})  # OUT/log.jsonl (and --report-to)
#         run.save_if_due(step, total_steps)         # --save-every, --stop-after, the last step
#         if run.stop_requested(step, total_steps):  # --stop-after: stop as if killed
#             break
#     if step < total_steps:                         # stopped: run it again to resume
#         return run.finish()
#     ...save the trained model...
#     return run.finish(result)
# ----------------------------------------------------------------------------------------------
def add_run_args(group, save_every: int, unit: str = "steps"):
    """Every option Run reads: --save-every, --stop-after, --no-resume, --force-resume and
    --report-to. `unit` names a step in the help (PPO: "iterations")."""
    group.add_argument("--save-every", type=int, default=save_every,
                       help=f"write a resumable checkpoint every N {unit} (and at the last)")
    group.add_argument("--stop-after", type=int, default=None,
                       help=f"checkpoint and stop after this many {unit} (as if interrupted); run "
                            "again to resume")
    checkpoint.add_resume_args(group)
    checkpoint.add_report_args(group)
    return group


@dataclass
class Run:
    """One training run's bookkeeping, none of its maths: this process under torchrun, --out, and
    what a checkpoint holds (the models, optimizers and schedules given to resume) and the log."""

    args: argparse.Namespace
    dist_info: distributed.DistInfo
    out: Path
    models: dict = field(default_factory=dict)
    optimizers: dict = field(default_factory=dict)
    schedulers: dict | None = None
    config: dict = field(default_factory=dict)  # the defining settings (checkpoint.run_config)
    logger: checkpoint.JsonlLogger | None = None  # OUT/log.jsonl, opened by resume

    def resume(self, models: dict, optimizers: dict, schedulers: dict | None = None, ignore=(),
               map_location="cpu", **derived) -> int:
        """The step to start at: 0, or the newest checkpoint's, loaded into the models, optimizers
        and schedulers (dicts with the same keys), the RNG restored. The checkpoint must be of this
        run: checkpoint.run_config (the options less `ignore`, plus `derived`, e.g. total_steps)
        must match, unless --force-resume; --no-resume ignores it. Opens run.logger (OUT/log.jsonl,
        rewound to that step)."""
        self.models, self.optimizers, self.schedulers = models, optimizers, schedulers
        self.config = checkpoint.run_config(self.args, ignore, **derived)
        step, self.logger = checkpoint.resume(self.out, models, optimizers, schedulers, self.config,
                                              self.args, self.dist_info, map_location)
        return step

    def save_if_due(self, step: int, total_steps: int):
        """OUT/checkpoint/step-N after step N if N is a multiple of --save-every, --stop-after or
        the last step: once a step, whichever of these it is. Every rank calls it (under FSDP each
        writes its shards)."""
        if step % self.args.save_every == 0 or step in (self.args.stop_after, total_steps):
            checkpoint.save_checkpoint(self.out, step, self.models, self.optimizers,
                                       self.schedulers, self.config)

    def stop_requested(self, step: int, total_steps: int) -> bool:
        """Whether --stop-after asks the run to stop after this step, before its last (then the
        trainer leaves its loop, and a later run with the same --out resumes there). Changes
        nothing."""
        return step == self.args.stop_after and step < total_steps

    def finish(self, result=None):
        """Wait for every rank, end the process group (distributed.cleanup_distributed), and hand
        back `result`: every trainer ends with `return run.finish(...)`."""
        distributed.cleanup_distributed(self.dist_info)
        return result


def start_run(args) -> Run:
    """A training run begins: this process under torchrun (--device, --fsdp), every seed (--seed),
    and the temp folders a killed save left in --out removed (rank 0)."""
    dist_info = distributed.setup_distributed(args.device, args.fsdp)
    seed_everything(args.seed)
    out = Path(args.out)
    if dist_info.master:
        checkpoint.clean_stale_temp(out)
    return Run(args, dist_info, out)
