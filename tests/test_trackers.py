"""--report-to: live curves in TensorBoard or Weights & Biases, the same numbers as log.jsonl."""

import importlib.util
import json
import sys
import types

import pytest

import plumbing
import sft


def sft_argv(tiny_dir, out, *extra):
    return [
        "--model", str(tiny_dir), "--out", str(out), "--max-steps", "3", "--batch-size", "2",
        "--micro-batch-size", "2", "--limit", "6", "--max-prompt-len", "24",
        "--max-response-len", "12", "--eval-every", "2", "--eval-examples", "2", "--device", "cpu",
        *extra,
    ]


def read_tensorboard(log_dir) -> dict:
    """{tag: {step: value}} of every scalar in the event files under log_dir, read back with
    tensorboard's own reader (not the writer we test)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def numbers_of(rows) -> dict:
    """{field: {step: value}} of the numbers in log.jsonl rows."""
    found = {}
    for row in rows:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                found.setdefault(key, {})[row["step"]] = value
    return found


def test_tensorboard_holds_the_scalars_of_log_jsonl(tiny_dir, tmp_path):
    out = tmp_path / "sft"
    sft.main(sft_argv(tiny_dir, out, "--report-to", "tensorboard", "--stop-after", "2"))
    # resumed at step 2: one more line
    sft.main(sft_argv(tiny_dir, out, "--report-to", "tensorboard"))
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    expected = numbers_of(rows)
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert "eval_loss" in expected and "train_loss" in expected
    scalars = read_tensorboard(out / "tensorboard")
    assert set(scalars) == set(expected)
    for tag, by_step in expected.items():
        assert scalars[tag].keys() == by_step.keys(), tag
        for step, value in by_step.items():
            assert scalars[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-7), (tag, step)


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_a_missing_tracker_package_is_one_line_and_exit_code_2_before_any_work(
        tracker, tiny_dir, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == tracker else real(name, *a))
    with pytest.raises(SystemExit) as info:
        plumbing.cli(lambda: sft.main(sft_argv(tiny_dir, tmp_path / "sft", "--report-to", tracker)))
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert (
        err == f"error: --report-to {tracker} needs the {tracker} package: pip install {tracker}\n"
    )
    assert not (tmp_path / "sft").exists()  # nothing was done


def test_wandb_gets_the_config_and_every_logged_scalar(tiny_dir, tmp_path, monkeypatch):
    """W&B is not installed here: a stand-in module with wandb's API (init(project, name, id,
    resume, dir, config) -> run; run.log(dict, step=); run.finish(); util.generate_id()) records
    what the tracker sends."""
    calls = []

    class Run:
        def log(self, data, step=None):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(("init", kwargs)) or Run()
    fake.util = types.SimpleNamespace(generate_id=lambda: "abc123")
    monkeypatch.setitem(sys.modules, "wandb", fake)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "wandb" else real(name, *a))
    out = tmp_path / "sft"
    sft.main(sft_argv(tiny_dir, out, "--report-to", "wandb"))
    kind, init = calls[0]
    assert kind == "init" and init["id"] == "abc123" and init["name"] == "sft"
    assert init["config"]["max_steps"] == 3 and init["config"]["report_to"] == "wandb"
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    logged = [(call[1], call[2]) for call in calls if call[0] == "log"]
    assert [step for _, step in logged] == [row["step"] for row in rows]
    for (data, _), row in zip(logged, rows):
        assert data == {
            k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))
        }
    assert (out / "wandb_run_id").read_text().strip() == "abc123"
