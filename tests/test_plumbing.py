"""plumbing/hf_models.py: score models in the standard Hugging Face forms (and TRL's, OpenRLHF's,
our older one), models that do not belong together, crash-safe checkpoints that refuse another run,
logs that survive a torn line, and one-line errors for models that cannot be found."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

import common
import plumbing
import redistribute
from plumbing import checkpoint, hf_models

ROOT = Path(__file__).resolve().parents[1]


def scored_batch(tokenizer, texts):
    """Left-padded prompt + response + EOS, as the project and a Hugging Face user would both feed
    them."""
    ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    query_response, attention_mask = common.pad_left(ids, tokenizer.pad_token_id)
    return query_response, attention_mask


def trained_score_model(model_dir, bias, seed=0):
    """A ScoreModel whose head is not at its initialisation (so a random head would be caught)."""
    torch.manual_seed(seed)
    model = common.disable_dropout(hf_models.new_score_model(model_dir, bias=bias)).eval()
    with torch.no_grad():
        model.head.weight.normal_()
        if bias:
            model.head.bias.fill_(0.7)
    return model


TEXTS = ["\n\nHuman: hi\n\nAssistant: hello there", "\n\nHuman: how are you?\n\nAssistant: fine",
         "\n\nHuman: a much longer question about the weather\n\nAssistant: it rains"]


# ----------------------------------------------------------------------------------------------
# Score models: standard formats in, standard formats out
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_reward_model_round_trips_through_auto_model_for_sequence_classification(
        which, request, tmp_path):
    model_dir = request.getfixturevalue("tiny_dir" if which == "gpt2" else "llama_dir")
    tokenizer = hf_models.load_tokenizer(model_dir)
    # neither tokenizer has a pad token of its own
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    model = trained_score_model(model_dir, bias=False)
    query_response, attention_mask = scored_batch(tokenizer, TEXTS)
    with torch.no_grad():
        # at the EOS
        ours = redistribute.sequence_reward(model, query_response, attention_mask, attention_mask)
    hf_models.save_score_model(model, tokenizer, tmp_path / "rm", kind="sequence",
                               extra={"role": "reward_model"})

    # a Hugging Face user: the standard class and the saved tokenizer, nothing of ours
    hf_model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    hf_tokenizer = hf_models.AutoTokenizer.from_pretrained(tmp_path / "rm")
    # so it reads the EOS, not the token before
    assert hf_tokenizer.pad_token_id != hf_tokenizer.eos_token_id
    batch = hf_tokenizer([t + hf_tokenizer.eos_token for t in TEXTS], padding=True,
                         return_tensors="pt")
    with torch.no_grad():
        theirs = hf_model(**batch).logits.squeeze(-1)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    # and right padding reads the same token
    hf_tokenizer.padding_side = "right"
    batch = hf_tokenizer([t + hf_tokenizer.eos_token for t in TEXTS], padding=True,
                         return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(hf_model(**batch).logits.squeeze(-1), ours, atol=1e-5, rtol=1e-5)

    loaded = common.disable_dropout(hf_models.load_score_model(tmp_path / "rm")).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            redistribute.sequence_reward(loaded, query_response, attention_mask, attention_mask),
            ours, atol=1e-5, rtol=1e-5)
    # only a pad added
    hf_models.check_same_tokenizer(tokenizer, hf_models.load_tokenizer(tmp_path / "rm"), "rm")
    info = hf_models.read_run_info(tmp_path / "rm")
    assert info == {"role": "reward_model", "format": "AutoModelForSequenceClassification"}


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_discriminator_round_trips_through_auto_model_for_token_classification(
        which, request, tmp_path):
    model_dir = request.getfixturevalue("tiny_dir" if which == "gpt2" else "llama_dir")
    tokenizer = hf_models.load_tokenizer(model_dir)
    model = trained_score_model(model_dir, bias=True)
    query_response, attention_mask = scored_batch(tokenizer, TEXTS)
    with torch.no_grad():
        ours = model(query_response, attention_mask)  # [B, T]
    hf_models.save_score_model(model, tokenizer, tmp_path / "disc", kind="token")
    hf_model = AutoModelForTokenClassification.from_pretrained(tmp_path / "disc").eval()
    position_ids = common.position_ids_from_mask(attention_mask)
    with torch.no_grad():
        theirs = hf_model(input_ids=query_response, attention_mask=attention_mask,
                          position_ids=position_ids).logits.squeeze(-1)
    real = attention_mask.bool()
    torch.testing.assert_close(theirs[real], ours[real], atol=1e-5, rtol=1e-5)
    loaded = hf_models.load_score_model(tmp_path / "disc").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(query_response, attention_mask)[real], ours[real],
                                   atol=1e-5, rtol=1e-5)


def test_a_standard_save_that_fails_keeps_the_model_in_the_head_file_format(
        tiny_dir, tmp_path, monkeypatch):
    """The run never dies after training: if writing the standard class fails (here: forced), the
    model is saved as backbone + score_head.safetensors with a warning and a note in
    token_rlhf.json, and it loads; a later standard save removes the stale head file (which
    load_score_model would otherwise prefer)."""
    tokenizer = hf_models.load_tokenizer(tiny_dir)
    model = trained_score_model(tiny_dir, bias=True)
    query_response, attention_mask = scored_batch(tokenizer, TEXTS)
    with torch.no_grad():
        ours = model(query_response, attention_mask)

    def broken(*args, **kwargs):
        raise RuntimeError("disk says no")

    monkeypatch.setattr(hf_models, "_save_standard", broken)
    with pytest.warns(UserWarning, match="disk says no"):
        hf_models.save_score_model(model, tokenizer, tmp_path / "disc", kind="token",
                                   extra={"role": "d"})
    info = hf_models.read_run_info(tmp_path / "disc")
    assert info["role"] == "d" and info["format"] == hf_models.HEAD_FILE_FORMAT
    assert "disk says no" in info["format_note"]
    real = attention_mask.bool()
    loaded = hf_models.load_score_model(tmp_path / "disc").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(query_response, attention_mask)[real], ours[real],
                                   atol=1e-5, rtol=1e-5)
    monkeypatch.undo()
    hf_models.save_score_model(model, tokenizer, tmp_path / "disc", kind="token")
    assert not (tmp_path / "disc" / "score_head.safetensors").exists()
    assert AutoModelForTokenClassification.from_pretrained(tmp_path / "disc") is not None


def test_older_trl_and_openrlhf_reward_models_load(tiny_dir, tiny_tokenizer, tmp_path):
    query_response, attention_mask = scored_batch(tiny_tokenizer, TEXTS)
    last = attention_mask.shape[1] - 1  # left padding: the EOS is the last column

    # this project's first format: a backbone plus score_head.safetensors (weight and bias)
    model = trained_score_model(tiny_dir, bias=True)
    model.backbone.save_pretrained(tmp_path / "old")
    save_file({k: v.contiguous() for k, v in model.head.state_dict().items()},
              str(tmp_path / "old" / "score_head.safetensors"))
    loaded = hf_models.load_score_model(tmp_path / "old").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(query_response, attention_mask),
                                   model(query_response, attention_mask))

    # TRL: an AutoModelForSequenceClassification with num_labels=1, saved by Hugging Face
    torch.manual_seed(3)
    trl = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1).eval()
    # batch of one below: the standard class then reads the last position
    trl.config.pad_token_id = None
    trl.save_pretrained(tmp_path / "trl")
    loaded = hf_models.load_score_model(tmp_path / "trl").eval()
    with torch.no_grad():
        one = query_response[:1, attention_mask[0].argmax():]
        expected = trl(input_ids=one).logits.squeeze()
        torch.testing.assert_close(loaded(one, torch.ones_like(one))[0, -1], expected, atol=1e-5,
                                   rtol=1e-5)

    # OpenRLHF: the backbone under "model." with value_head.weight, and reward normalisation in the
    # config
    backbone = AutoModel.from_pretrained(tiny_dir)
    head = torch.randn(1, backbone.config.hidden_size)
    backbone.config.update({"normalize_reward": True, "mean": 0.5, "std": 2.0})
    backbone.save_pretrained(tmp_path / "openrlhf")
    weights = tmp_path / "openrlhf" / "model.safetensors"
    from safetensors.torch import load_file
    state = {f"transformer.{k}": v for k, v in load_file(str(weights)).items()}
    save_file({**state, "value_head.weight": head}, str(weights))
    loaded = hf_models.load_score_model(tmp_path / "openrlhf").eval()
    with torch.no_grad():
        hidden = backbone.eval()(
            input_ids=query_response,
            attention_mask=attention_mask,
            position_ids=common.position_ids_from_mask(attention_mask),
        ).last_hidden_state
        expected = ((hidden[:, last] @ head.T).squeeze(-1) - 0.5) / 2.0
        torch.testing.assert_close(loaded(query_response, attention_mask)[:, last], expected,
                                   atol=1e-5, rtol=1e-5)


def test_a_folder_without_a_trained_head_is_refused(tiny_dir, tmp_path):
    """A causal LM (the SFT model, say) passed as --reward-model would give a random head: refuse
    it."""
    with pytest.raises(common.InputError, match=f"reward model {tiny_dir}: no trained score head"):
        hf_models.load_score_model(tiny_dir, what="reward model")
    hf = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=3)
    hf.save_pretrained(tmp_path / "three")
    with pytest.raises(common.InputError, match="with 3 labels"):
        hf_models.load_score_model(tmp_path / "three")


def test_tokenizers_that_do_not_belong_together_are_refused(tiny_tokenizer, splits):
    other = hf_models.train_tiny_tokenizer([p.prompt + p.chosen for p in splits["rl"][:300]], 2048)
    with pytest.raises(
        common.InputError,
        match=r"--reward-model x: its tokenizer differs from the policy's \(\d+ of",
    ):
        hf_models.check_same_tokenizer(tiny_tokenizer, other, "--reward-model x")
    hf_models.check_same_tokenizer(tiny_tokenizer, tiny_tokenizer, "same")
    assert hf_models.tokenizer_fingerprint(tiny_tokenizer) != hf_models.tokenizer_fingerprint(other)


# ----------------------------------------------------------------------------------------------
# Models that cannot be found: one line, at once
# ----------------------------------------------------------------------------------------------
def run_stage(args, env=None, timeout=120):
    started = time.monotonic()
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    return done, time.monotonic() - started


def test_missing_models_fail_in_a_moment_with_one_line(tmp_path):
    cases = [
        (
            ["sft.py", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
            {},
            "no such directory",
        ),
        (
            ["sft.py", "--model", "./runs/not-there", "--out", str(tmp_path / "o")],
            {},
            "no such directory",
        ),
        (["sft.py", "--model", "a/b/c", "--out", str(tmp_path / "o")], {}, "no such directory"),
        (
            ["sft.py", "--model", str(tmp_path), "--out", str(tmp_path / "o")],
            {},
            "without config.json",
        ),
        (
            ["sft.py", "--model", "nobody-xyz/no-model", "--out", str(tmp_path / "o")],
            {"HF_HUB_OFFLINE": "1"},
            "HF_HUB_OFFLINE",
        ),
    ]
    for args, env, message in cases:
        done, seconds = run_stage(args, env)
        assert done.returncode == 2, done.stderr[-2000:]
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (
            done.stderr
        )
        assert seconds < 30


def test_an_unreachable_hub_is_one_line(tmp_path, monkeypatch):
    # nothing listens on port 9
    monkeypatch.setattr(hf_models, "HUB_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    started = time.monotonic()
    with pytest.raises(common.InputError, match="cannot be reached"):
        hf_models.check_model_source("nobody-xyz/no-model", "--model")
    assert time.monotonic() - started < 5


# ----------------------------------------------------------------------------------------------
# Checkpoints: crash-safe, and never the checkpoint of another run
# ----------------------------------------------------------------------------------------------
def small_training_state(tiny_dir):
    model = hf_models.load_policy(tiny_dir)
    optimizer = plumbing.adamw(model, 1e-3)
    scheduler = plumbing.cosine_schedule(optimizer, 10)
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def test_checkpoint_round_trip_restores_weights_optimizer_schedule_and_rng(tmp_path, tiny_dir):
    model, optimizer, scheduler = small_training_state(tiny_dir)
    torch.manual_seed(123)
    checkpoint.save_checkpoint(tmp_path, 7, {"model": model}, {"model": optimizer},
                               {"model": scheduler}, {"lr": 1})
    expected_draw = torch.rand(3)
    fresh = hf_models.load_policy(tiny_dir)
    fresh_optimizer = plumbing.adamw(fresh, 1e-3)
    fresh_scheduler = plumbing.cosine_schedule(fresh_optimizer, 10)
    state = checkpoint.load_checkpoint(tmp_path, {"model": fresh}, {"model": fresh_optimizer},
                                       {"model": fresh_scheduler}, {"lr": 1})
    assert state["step"] == 7 and fresh_scheduler.last_epoch == 1
    assert torch.equal(torch.rand(3), expected_draw)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    assert fresh_optimizer.state_dict()["state"][0]["exp_avg"].abs().sum() > 0
    assert checkpoint.load_checkpoint(tmp_path / "nothing", {"model": fresh}, {}) is None


def test_a_kill_at_any_point_of_a_save_leaves_a_complete_checkpoint(
        tmp_path, tiny_dir, monkeypatch):
    model, optimizer, scheduler = small_training_state(tiny_dir)
    args = ({"model": model}, {"model": optimizer}, {"model": scheduler}, {})
    checkpoint.save_checkpoint(tmp_path, 3, *args)

    # killed while writing step 6: the half-written folder is never taken, step 3 is
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(tmp_path, 6, *args)
    monkeypatch.setattr(torch, "save", real_save)
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-000000003"
    assert checkpoint.load_checkpoint(tmp_path, *args)["step"] == 3

    # killed after step 6 was published, before step 3 was deleted: resume from 6, and 3 goes next
    # time
    real_rmtree = checkpoint.shutil.rmtree

    def killed_on_delete(path, *a, **k):
        if Path(path).name.startswith("step-"):
            raise KeyboardInterrupt
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_on_delete)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(tmp_path, 6, *args)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == [
        "step-000000003",
        "step-000000006",
    ]
    assert checkpoint.load_checkpoint(tmp_path, *args)["step"] == 6
    checkpoint.clean_stale_temp(tmp_path)
    checkpoint.save_checkpoint(tmp_path, 9, *args)
    assert [p.name for p in (tmp_path / "checkpoint").iterdir()] == ["step-000000009"]


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, tiny_dir):
    model, optimizer, scheduler = small_training_state(tiny_dir)
    args = ({"model": model}, {"model": optimizer}, {"model": scheduler})
    checkpoint.save_checkpoint(tmp_path, 2, *args, {"reward": "tlcr", "total_steps": 10})
    with pytest.raises(
        common.InputError, match=r"--reward was 'tlcr', now 'seq'.*--total-steps was 10, now 20"
    ):
        checkpoint.load_checkpoint(tmp_path, *args, {"reward": "seq", "total_steps": 20})
    with pytest.warns(UserWarning, match="--force-resume"):
        assert (
            checkpoint.load_checkpoint(
                tmp_path, *args, {"reward": "seq", "total_steps": 10}, force=True
            )["step"]
            == 2
        )


def test_stale_temp_folders_are_cleaned(tmp_path):
    for stale in (
        tmp_path / ".save-abc",
        tmp_path / "checkpoint" / ".tmp-step-000000004",
        tmp_path / "policy" / ".save-x",
    ):
        stale.mkdir(parents=True)
    (tmp_path / "checkpoint" / "step-000000002").mkdir()
    checkpoint.clean_stale_temp(tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == \
        ["checkpoint", "checkpoint/step-000000002", "policy"]


def test_a_torn_last_log_line_is_dropped_on_resume(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    checkpoint.JsonlLogger(log).rewind(2)
    assert f"warning: {log} line 3: unreadable" in capsys.readouterr().err
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]
    checkpoint.JsonlLogger(log).log({"step": 3})
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]


def test_help_shows_every_default():
    for script in ("sft.py", "label.py", "ppo_token.py", "eval.py"):
        done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        # --split-seed's default is shown
        assert "(default: 0)" in " ".join(done.stdout.split()), script
    for args in (["discriminator.py", "show", "--help"], ["redistribute.py", "show", "--help"],
                 ["discriminator.py", "evaluate", "--help"]):
        done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
        assert "--trust-remote-code" in done.stdout and "(default:" in done.stdout, args


def test_bad_data_is_one_line_and_exit_code_2_in_every_stage(tmp_path, tiny_dir):
    """Unreadable data stops every stage with one line that names the file and the line, and exit
    code 2: a Latin-1 row on line 3 of the data, a binary labels file (line 1) for the
    discriminator. (Before, the line was not named; earlier still, sft.py, redistribute.py,
    ppo_token.py and eval.py showed a traceback.)"""
    bad = tmp_path / "bad.jsonl"
    good_row = json.dumps({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!",
                           "rejected": "\n\nHuman: Hi\n\nAssistant: No."})
    latin1_row = '{"chosen": "café", "rejected": "thé"}\n'.encode("latin-1")
    bad.write_bytes((good_row + "\n\n").encode() + latin1_row)
    binary = tmp_path / "labels.jsonl"
    binary.write_bytes(bytes(range(256)) * 8)
    stages = {
        "sft": ["sft.py", "--data", bad, "--out", tmp_path / "sft"],
        "label": [
            "label.py", "--reviser", "chosen", "--tokenizer", tiny_dir, "--data", bad,
            "--out", tmp_path / "l",
        ],
        "discriminator": [
            "discriminator.py", "train", "--sft", tiny_dir, "--labels", binary,
            "--out", tmp_path / "d",
        ],
        "reward model": [
            "redistribute.py", "train", "--sft", tiny_dir, "--data", bad, "--out", tmp_path / "r",
        ],
        "ppo": [
            "ppo_token.py", "--policy", tiny_dir, "--reward", "tlcr", "--discriminator", tiny_dir,
            "--critic-init", "policy", "--data", bad, "--out", tmp_path / "p",
        ],
        "eval": [
            "eval.py", "--policies", f"a={tiny_dir}", "--reference", tiny_dir,
            "--reward-model", tiny_dir, "--discriminator", tiny_dir, "--data", bad,
            "--out", tmp_path / "e",
        ],
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running = {
        name: subprocess.Popen(
            [sys.executable, *map(str, args)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in stages.items()
    }
    for name, proc in running.items():
        _, err = proc.communicate(timeout=180)
        lines = err.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (name, err[-2000:])
        where = f"{binary} line 1" if name == "discriminator" else f"{bad} line 3"
        expected = f"error: {where}: not UTF-8 text (a binary file, or another encoding?)"
        assert lines[0] == expected, (name, lines)


def test_device_cuda_n_keeps_its_index_in_one_process(monkeypatch):
    """--device cuda:1 is cuda:1 (it was turned into plain cuda, i.e. GPU 0), made the current GPU;
    cuda alone is the current GPU by index; a GPU that is not there is refused naming --device.
    CUDA mocked: two GPUs, the current one 0."""
    from plumbing import distributed

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert distributed.setup_distributed("cuda:1").device == torch.device("cuda", 1)
    assert current == [torch.device("cuda", 1)]
    assert distributed.setup_distributed("cuda").device == torch.device("cuda", 0)
    assert distributed.setup_distributed("auto").device == torch.device("cuda", 0)
    assert distributed.setup_distributed("cpu").device == torch.device("cpu")
    with pytest.raises(common.InputError, match=r"--device cuda:2: .* 2 CUDA device"):
        distributed.setup_distributed("cuda:2")
    with pytest.raises(common.InputError, match="--device 'gpu1': not a device"):
        distributed.setup_distributed("gpu1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(common.InputError, match="--device cuda:1: no CUDA GPU"):
        distributed.setup_distributed("cuda:1")
    assert distributed.setup_distributed("auto").device == torch.device("cpu")
