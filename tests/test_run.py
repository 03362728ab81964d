"""plumbing.Run, the bookkeeping the four trainers share: add_run_args declares every option Run
reads; stop_requested answers without acting; each step's checkpoint is written once; and every
trainer ends the same way, finished or stopped by --stop-after."""
import argparse

import pytest

import discriminator
import plumbing
import ppo_token
import redistribute
import sft
from plumbing import checkpoint, distributed, hf_models
from test_discriminator import build_small, synthetic_records, write_jsonl
from test_ppo_token import cli as ppo_cli
from test_ppo_token import toy_reward
from test_redistribute import train_argv as rm_argv
from test_sft import SMALL as SFT_ARGS


def run_args(argv=()):
    parser = argparse.ArgumentParser()
    plumbing.add_run_args(parser, save_every=3)
    return parser.parse_args(list(argv))


def test_add_run_args_declares_every_option_run_reads():
    args = run_args()
    assert (args.save_every, args.stop_after, args.resume, args.force_resume) == \
        (3, None, True, False)
    assert args.report_to == "none"
    assert run_args(["--save-every", "5", "--stop-after", "2"]).stop_after == 2


@pytest.fixture
def spy(monkeypatch):
    """Records the steps checkpointed and the times the process group was ended."""
    seen = {"saved": [], "finished": 0}
    real_save = checkpoint.save_checkpoint

    def save(out, step, *rest, **kw):
        seen["saved"].append(step)
        return real_save(out, step, *rest, **kw)

    def cleanup(dist_info):
        seen["finished"] += 1

    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    monkeypatch.setattr(distributed, "cleanup_distributed", cleanup)
    return seen


def test_stop_requested_changes_nothing(spy, tmp_path):
    run = plumbing.Run(run_args(["--stop-after", "2"]), distributed.DistInfo(), tmp_path)
    assert run.stop_requested(2, total_steps=6)
    assert not run.stop_requested(1, total_steps=6)
    assert not run.stop_requested(2, total_steps=2)  # the last step is the end, not a stop
    assert spy == {"saved": [], "finished": 0}


def test_save_if_due_writes_a_step_once(spy, tmp_path):
    """Step 6 is a multiple of --save-every, --stop-after and the last step: one checkpoint."""
    run = plumbing.Run(run_args(["--stop-after", "6"]), distributed.DistInfo(), tmp_path)
    run.resume({}, {})
    for step in range(1, 7):
        run.save_if_due(step, total_steps=6)
    assert spy["saved"] == [3, 6]


@pytest.fixture(scope="module")
def labels_file(tmp_path_factory, tiny_dir):
    folder = tmp_path_factory.mktemp("run_disc")
    small = build_small(folder / "small", hf_models.load_tokenizer(tiny_dir))
    return small, write_jsonl(folder / "labels.jsonl", synthetic_records(16),
                              hf_models.load_tokenizer(small))


def trainers(tiny_dir, labels_file, out):
    """Each trainer's main and argv for 4 steps (iterations), checkpointing every 2."""
    small, labels = labels_file
    every = ["--save-every", "2"]
    disc_argv = ["train", "--sft", str(small), "--labels", str(labels), "--out", str(out),
                 "--max-prompt-len", "16", "--max-response-len", "32", "--max-steps", "4",
                 "--batch-size", "4", "--micro-batch-size", "4", "--lr", "1e-3", *every]
    return {
        "sft": (sft.main, SFT_ARGS + ["--max-steps", "4", "--eval-every", "100", "--out",
                                      str(out), *every]),
        "discriminator": (discriminator.main, disc_argv),
        "reward model": (redistribute.main, rm_argv(tiny_dir, out, "--max-steps", "4", *every)),
        "ppo": (lambda argv: ppo_token.main(argv, reward_fn=toy_reward),
                ppo_cli(tiny_dir, out, 4, *every)),
    }


@pytest.mark.parametrize("name", ["sft", "discriminator", "reward model", "ppo"])
def test_every_trainer_ends_the_same_way(name, spy, tiny_dir, labels_file, tmp_path):
    """Finished: checkpoints at 2 and 4, once each (4 is both a multiple of --save-every and the
    last step), a result, the process group ended once. Stopped by --stop-after 2: the checkpoint
    at 2, no result, the group ended once. Resumed: 4, once more."""
    main, argv = trainers(tiny_dir, labels_file, tmp_path / "whole")[name]
    assert main(argv) is not None
    assert spy == {"saved": [2, 4], "finished": 1}

    spy.update(saved=[], finished=0)
    main, argv = trainers(tiny_dir, labels_file, tmp_path / "cut")[name]
    assert main(argv + ["--stop-after", "2"]) is None
    assert spy == {"saved": [2], "finished": 1}
    assert checkpoint.latest_checkpoint(tmp_path / "cut").name == "step-000000002"

    spy.update(saved=[], finished=0)
    assert main(argv) is not None
    assert spy == {"saved": [4], "finished": 1}
