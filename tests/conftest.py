"""Shared fixtures: the bundled pairs, and one tiny GPT-2 + BPE tokenizer built once per session."""
import json
import os
import random
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import plumbing  # noqa: E402
from plumbing import distributed, hf_models  # noqa: E402


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (intra-op threads only add overhead), and this
    machine's cores are shared; the count before is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def bundled_pairs():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return common.load_pairs(common.BUNDLED_DATA)


@pytest.fixture(scope="session")
def splits(bundled_pairs):
    return common.split_pairs(bundled_pairs, seed=0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, splits):
    """A tiny GPT-2 (2 layers, 64 wide) and a 2048-token byte-level BPE, saved with
    save_pretrained."""
    out = tmp_path_factory.mktemp("tiny")
    texts = [p.prompt + p.chosen for p in splits["sft"]]
    hf_models.build_tiny(texts, out, vocab_size=2048, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    return hf_models.load_tokenizer(tiny_dir)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, splits):
    """A tiny random Llama (RoPE, GQA, RMSNorm, no pad token) with a SentencePiece-style BPE in the
    "legacy" layout that adds BOS and puts '▁' before every text it tokenises: what users bring from
    Llama / Mistral."""
    out = tmp_path_factory.mktemp("llama")
    texts = [p.prompt + p.chosen for p in splits["sft"]]
    hf_models.build_tiny(texts, out, arch="llama", vocab_size=1024, seed=0, dropout=0.0)
    return out


@pytest.fixture(scope="session")
def llama_tokenizer(llama_dir):
    return hf_models.load_tokenizer(llama_dir)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), children before grandchildren."""
    found, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop(0)}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:  # gone meanwhile
                continue
            found += children
            todo += children
    return found


def run_torchrun(script_and_args, nproc=2, timeout=180, cwd=None):
    """Run `torchrun --standalone --nproc_per_node=N script args...` on CPU (gloo).

    --standalone picks a free rendezvous port itself (no collisions between parallel runs). On a
    time-out the whole tree is killed and the test fails with what it printed instead of hanging:
    the launcher's process group, and the workers, which torchrun starts in sessions of their own.
    Returns (returncode, combined output).
    """
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *map(str, script_and_args),
    ]
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        workers = descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        output, _ = proc.communicate(timeout=30)
        pytest.fail(f"torchrun timed out after {timeout} s:\n{output[-3000:]}")
    return proc.returncode, output


def assert_train_step_equals_one_pass(model, train_step, examples, args, pad_id, one_pass_loss):
    """A stage's train_step accumulates, over its micro-batches, exactly the gradient of
    one_pass_loss() (the stage's loss on the whole batch in one forward pass): read just before its
    optimizer step, which changes nothing (SGD, lr 0). A wrong normaliser would scale or skew the
    accumulated gradient."""
    one_pass_loss().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    accumulated = {}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    optimizer.register_step_pre_hook(
        lambda *_: accumulated.update(grads=[p.grad.clone() for p in model.parameters()]))
    train_step(model, optimizer, plumbing.cosine_schedule(optimizer, 1), examples, args,
               distributed.DistInfo(), pad_id)
    for got, want in zip(accumulated["grads"], expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def write_random_labels(path, tokenizer, n=12, seed=0):
    """label.py's format with random token ids (300 and up) and random labels, for runs that are
    compared with each other and need not learn."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        row = {"id": f"pair{i}", "prompt": f"\n\nHuman: question {i}\n\nAssistant:",
               "tokenizer": hf_models.tokenizer_fingerprint(tokenizer)}
        for side in ("rejected", "revised"):
            ids = [rng.randrange(300, len(tokenizer)) for _ in range(rng.randint(3, 12))]
            row[f"{side}_ids"], row[f"{side}_labels"] = ids, [rng.choice((-1, 0, 1)) for _ in ids]
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
