"""plumbing/checkpoint.py — what a run leaves on disk: atomic writes, OUT/log.jsonl (JsonlLogger)
and the live trackers (--report-to), checkpoints (save_checkpoint / resume / load_checkpoint:
crash-safe, refuse to resume a different run, sharded under FSDP), run configs, stale temp folders.
"""
from __future__ import annotations

import atexit
import importlib.util
import json
import os
import random
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from common import InputError
from plumbing import distributed

try:  # FSDP2's sharded checkpoints (torch >= 2.6; see plumbing/distributed.py)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
except ImportError:  # pragma: no cover
    dcp = None


# ----------------------------------------------------------------------------------------------
# Files: atomic writes, logs (log.jsonl and the trackers)
# ----------------------------------------------------------------------------------------------
def atomic_write(path, text: str):
    """Write text to a temp file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    os.replace(tmp, path)


def read_jsonl_tolerant(path, what: str = "line") -> list[dict]:
    """Rows of a JSONL file this project appends to (a log, an answer cache). A line cut short by a
    kill or a full disk (the last one, usually) is skipped with a warning on stderr instead of
    stopping the run."""
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    for line_no, line in enumerate(
        path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1
    ):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            print(
                f"warning: {path} line {line_no}: unreadable {what} "
                "(cut short by a kill?), skipped",
                file=sys.stderr,
            )
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


# --- live curves: --report-to tensorboard | wandb, beside log.jsonl (the source of truth) ---------
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --report-to -> the package it needs


def report_to(value: str) -> str:
    """--report-to's type: none, or a tracker whose package is installed; a missing one is one line
    naming the package (an InputError: exit code 2 under cli, before any work)."""
    package = TRACKERS.get(value)
    if package and importlib.util.find_spec(package) is None:
        raise InputError(f"--report-to {value} needs the {package} package: pip install {package}")
    return value


def add_report_args(group):
    group.add_argument("--report-to", default="none", type=report_to, choices=("none", *TRACKERS),
                       help="also send every log.jsonl line to a tracker, from rank 0, with the "
                            "run's arguments as its config: tensorboard (OUT/tensorboard; "
                            "`tensorboard --logdir OUT`) or wandb (project $WANDB_PROJECT, default "
                            "token-rlhf); log.jsonl is written either way")
    return group


class Tracker:
    """The numbers of each log record, sent to TensorBoard or Weights & Biases (rank 0 only) under
    their log.jsonl names, at the record's own step. Strings, lists and None stay in log.jsonl."""

    def __init__(self, kind: str, out_dir, config: dict, start_step: int = 0):
        self.kind, self.out_dir, self.run = kind, Path(out_dir), None
        config = json.loads(json.dumps(config, default=str))
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            # purge_step: on a resume, what was logged after the checkpoint is dropped
            self.writer = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"),
                                        purge_step=start_step + 1 if start_step else None)
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)
        elif kind == "wandb":
            import wandb

            id_file = self.out_dir / "wandb_run_id"  # a resumed run continues the same W&B run
            resumed = start_step and id_file.exists()
            run_id = id_file.read_text().strip() if resumed else wandb.util.generate_id()
            atomic_write(id_file, run_id + "\n")
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "token-rlhf"),
                                  name=self.out_dir.name, id=run_id, resume="allow",
                                  dir=str(self.out_dir), config=config)
        else:
            raise ValueError(f"unknown tracker {kind!r}")
        atexit.register(self.close)

    def log(self, record: dict):
        step = int(record.get("step", 0))
        scalars = {k: float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.kind == "tensorboard":
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()  # a run killed a moment later still shows its curves
        else:
            self.run.log(scalars, step=step)

    def close(self):
        if self.kind == "tensorboard":
            self.writer.close()
        elif self.run is not None:
            self.run.finish()
            self.run = None


def open_tracker(args, out_dir, start_step: int = 0, enabled: bool = True) -> Tracker | None:
    """The tracker --report-to asks for; None for none, on ranks but 0, or without the option."""
    kind = getattr(args, "report_to", "none")
    return Tracker(kind, out_dir, vars(args), start_step) if enabled and kind != "none" else None


class JsonlLogger:
    """Appends one JSON object per line (rank 0 only); prints nothing itself. With a tracker
    (--report-to), every record goes there too."""

    def __init__(self, path, enabled: bool = True, tracker: Tracker | None = None):
        self.path = Path(path) if path else None
        self.enabled = enabled and self.path is not None
        self.tracker = tracker if self.enabled else None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def rewind(self, step: int):
        """On resume from a checkpoint at `step`: drop the lines of later steps (they will be logged
        again) and a torn last line, so the log never holds a step twice or a broken line."""
        if self.enabled and self.path.exists():
            kept = [row for row in read_jsonl_tolerant(self.path) if row.get("step", 0) <= step]
            atomic_write(self.path, "".join(json.dumps(row) + "\n" for row in kept))

    def log(self, record: dict):
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if self.tracker is not None:
                self.tracker.log(record)


def clean_stale_temp(out_dir):
    """Remove the temp folders a kill during a save leaves behind (.save-*, checkpoint/.tmp-*)."""
    out_dir = Path(out_dir)
    for pattern in (".save-*", "checkpoint/.tmp-*", "*/.save-*"):
        for stale in out_dir.glob(pattern):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)


# Options that change how a run is carried out but not what it computes: a resume may change them.
NOT_DEFINING = {
    "out",
    "resume",
    "force_resume",
    "device",
    "save_every",
    "eval_every",
    "log_every",
    "stop_after",
    "log_gold",
    "lexicon",  # a path; a stage whose data the lexicon changes adds its id (gold.Lexicon.id)
    "gold_lexicon",  # the loaded lexicon
    "gradient_checkpointing",
    "trust_remote_code",
    "eval_batch_size",
    "eval_examples",
    "micro_batch_size",
    "offload_frozen",
    "command",
    "fsdp",
    "report_to",
}


def run_config(args, ignore=(), **derived) -> dict:
    """The settings that define a run (all options but NOT_DEFINING and `ignore`, plus derived
    values such as the planned total steps): stored with every checkpoint, compared on resume."""
    config = {k: v for k, v in vars(args).items() if k not in NOT_DEFINING and k not in ignore}
    return json.loads(json.dumps({**config, **derived}, default=str))


def add_resume_args(group):
    group.add_argument("--no-resume", dest="resume", action="store_false",
                       help="ignore a checkpoint in --out and start over")
    group.add_argument("--force-resume", action="store_true",
                       help="resume even if the checkpoint was made with other settings (data, "
                            "model, schedule)")
    return group


# A checkpoint is OUT/checkpoint/step-000120/: the trained tensors of each model (safetensors), and
# state.pt (optimizer and schedule states, step, RNG, the run's defining settings) that loads with
# weights_only=True. It is written as checkpoint/.tmp-step-000120 and renamed into place in ONE
# rename; older steps are deleted only after that. A kill at any moment therefore leaves at least
# one complete step folder, and resuming takes the newest complete one.
# Trained tensors only: with LoRA the adapters and heads (the base is read again from the model
# folder), so a checkpoint of a 7B LoRA run is megabytes, not gigabytes.
# Under FSDP the models and optimizer states go to step-000120/sharded/ instead, in the
# torch.distributed.checkpoint format (one .distcp file per rank and a .metadata index): every rank
# writes and reads its own pieces, none holds the whole model. All ranks must see the same folder.
STEP_DIR = re.compile(r"step-(\d{9})")


SHARDED = "sharded"


def trained_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: every parameter that requires grad (all of them in full fine-tuning,
    only adapters and heads with LoRA), on the CPU."""
    return {name: p.detach().contiguous().cpu()
            for name, p in distributed.unwrap(model).named_parameters() if p.requires_grad}


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
             "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(
        ("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(out_dir) -> Path | None:
    """The newest complete checkpoint folder in out_dir/checkpoint, or None."""
    steps = [p for p in (Path(out_dir) / "checkpoint").glob("step-*") if STEP_DIR.fullmatch(p.name)
             and (p / "state.pt").exists()]
    return max(steps, key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)), default=None)


def _sharded_state(models: dict, optimizers: dict) -> dict:
    """What a sharded checkpoint holds: each model's trained tensors and its optimizer's states, as
    this rank's pieces (DTensors: nothing is gathered). Frozen weights (a LoRA base) are left
    out."""
    state = {}
    for name, model in models.items():
        model = distributed.unwrap(model)
        state[f"model.{name}"] = get_model_state_dict(
            model, options=StateDictOptions(ignore_frozen_params=True))
        state[f"optimizer.{name}"] = get_optimizer_state_dict(model, optimizers[name])
    return state


def _load_sharded(path: Path, models: dict, optimizers: dict):
    """Read a sharded checkpoint into models and optimizers (in place): each rank reads its pieces
    (DCP also reshards for another world size, and fills an unsharded model when resumed without
    --fsdp)."""
    state = _sharded_state(models, optimizers)  # the layout to fill
    with warnings.catch_warnings():  # one process reading it is what we mean
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))
    for name, model in models.items():
        model = distributed.unwrap(model)
        set_model_state_dict(model, state[f"model.{name}"],
                             options=StateDictOptions(ignore_frozen_params=True, strict=False))
        set_optimizer_state_dict(model, optimizers[name], state[f"optimizer.{name}"])


def save_checkpoint(out_dir, step: int, models: dict, optimizers: dict,
                    schedulers: dict | None = None, run_config: dict | None = None, **extra):
    """Write OUT/checkpoint/step-N atomically (see above), then delete the older steps. Every rank
    calls it: rank 0 writes, and under FSDP every rank writes its pieces too. `optimizers` has the
    keys of `models`."""
    sharded = any(distributed.is_sharded(distributed.unwrap(model)) for model in models.values())
    master = distributed._rank() == 0
    if not (master or sharded):
        return
    root = Path(out_dir) / "checkpoint"
    final = root / f"step-{step:09d}"
    tmp = root / f".tmp-{final.name}"
    if master:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / SHARDED if sharded else tmp).mkdir(parents=True)
    if sharded:
        distributed.barrier()
        dcp.save(_sharded_state(models, optimizers), checkpoint_id=str(tmp / SHARDED))
        distributed.barrier()  # every rank's pieces are written
        if master:
            _publish_checkpoint(tmp, final, step, {}, schedulers, run_config, extra)
        distributed.barrier()  # no rank reads or writes on before the new step is in place
        return
    for name, model in models.items():
        state = trained_state_dict(model)
        # tied weights (GPT-2's lm_head = wte) share storage; safetensors wants each tensor once
        seen, unique = set(), {}
        for key, tensor in state.items():
            ident = (tensor.data_ptr(), tensor.shape, tensor.stride()) if tensor.numel() else None
            if ident is None or ident not in seen:
                seen.add(ident)
                unique[key] = tensor
        save_file(unique, str(tmp / f"{name}.safetensors"))
    _publish_checkpoint(tmp, final, step, {k: opt.state_dict() for k, opt in optimizers.items()},
                        schedulers, run_config, extra)


def _publish_checkpoint(tmp: Path, final: Path, step: int, optimizer_states: dict, schedulers,
                        run_config, extra):
    """state.pt into the temp folder, then the one rename, then the older steps go."""
    root = final.parent
    state = {
        "step": step,
        "run_config": run_config or {},
        "rng": rng_state(),
        "optimizers": optimizer_states,
        "schedulers": {k: s.state_dict() for k, s in (schedulers or {}).items()},
        **extra,
    }
    torch.save(state, tmp / "state.pt")
    if final.exists():  # the same step saved twice (resumed at the end): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)  # the one rename that publishes the checkpoint
    for old in root.glob("step-*"):
        if old != final and STEP_DIR.fullmatch(old.name):
            shutil.rmtree(old, ignore_errors=True)


def resume(out_dir, models: dict, optimizers: dict, schedulers: dict | None, run_config: dict, args,
           dist_info: distributed.DistInfo, map_location="cpu") -> tuple[int, "JsonlLogger"]:
    """Where a training stage starts: step 0, or the step of the newest checkpoint in out_dir,
    loaded into the models, optimizers and schedules (it must be of this run: load_checkpoint;
    --no-resume ignores it, --force-resume takes it anyway); and OUT/log.jsonl rewound to that step
    (rank 0 logs)."""
    state = load_checkpoint(out_dir, models, optimizers, schedulers, run_config, args.force_resume,
                            map_location) if args.resume else None
    step = state["step"] if state else 0
    logger = JsonlLogger(Path(out_dir) / "log.jsonl", enabled=dist_info.master,
                         tracker=open_tracker(args, out_dir, step, enabled=dist_info.master))
    logger.rewind(step)  # the lines of steps after the checkpoint will be logged again
    return step, logger


def load_checkpoint(out_dir, models: dict, optimizers: dict, schedulers: dict | None = None,
                    run_config: dict | None = None, force: bool = False,
                    map_location="cpu") -> dict | None:
    """Load the newest complete checkpoint into models, optimizers and schedulers (in place) and
    restore the RNG; return its state (step and the extra fields), or None when there is none.

    A checkpoint of a different run (another data set, model, reward or schedule: any key of
    run_config that differs) stops with the differences named, unless force.
    """
    ckpt = latest_checkpoint(out_dir)
    if ckpt is None:
        return None
    state = torch.load(ckpt / "state.pt", map_location=map_location, weights_only=True)
    saved_config = state.get("run_config", {})
    changed = {
        k: (saved_config.get(k), v)
        for k, v in (run_config or {}).items()
        if saved_config.get(k) != v
    }
    if changed and not force:
        what = "; ".join(
            f"--{k.replace('_', '-')} was {old!r}, now {new!r}" for k, (old, new) in changed.items()
        )
        raise InputError(
            f"{ckpt} belongs to a different run ({what}); use --no-resume to start over in this "
            "folder, another --out, or --force-resume to continue with the new settings"
        )
    if changed:
        warnings.warn(f"--force-resume: continuing {ckpt} with changed settings {sorted(changed)}",
                      stacklevel=2)
    if (ckpt / SHARDED).is_dir():
        _load_sharded(ckpt / SHARDED, models, optimizers)
    elif any(distributed.is_sharded(distributed.unwrap(model)) for model in models.values()):
        raise InputError(
            f"{ckpt} was written without --fsdp; resume it without --fsdp, or start over with "
            "--no-resume"
        )
    else:
        for name, model in models.items():
            tensors = load_file(str(ckpt / f"{name}.safetensors"))
            expected = trained_state_dict(model).keys()
            tied = {k for k in expected if k not in tensors and k.endswith("lm_head.weight")}
            if set(expected) - tied != set(tensors):
                raise InputError(f"{ckpt}/{name}.safetensors does not match the model (missing "
                                 f"{sorted(set(expected) - set(tensors) - tied)[:3]}, unexpected "
                                 f"{sorted(set(tensors) - set(expected))[:3]}); use --no-resume")
            distributed.unwrap(model).load_state_dict(tensors, strict=False)
        for key, optimizer in optimizers.items():
            optimizer.load_state_dict(state["optimizers"][key])
    for key, scheduler in (schedulers or {}).items():
        scheduler.load_state_dict(state["schedulers"][key])
    set_rng_state(state["rng"])
    return state
