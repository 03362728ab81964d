"""The prepared device check: every stage on random-weight models, measured against the memory
planner.

    python bench/gpu_check.py                      # one GPU: GPT-2-124M, a ~1B Llama, bf16, < 8 min
    python bench/gpu_check.py --peak-tflops 989    # a GPU the lookup table below does not know
    python bench/gpu_check.py --device cpu --tiny  # the same in seconds (tests/test_gpu_check.py)

Nothing is downloaded: the models are built from their published configs with random weights (saved
to a temporary folder and read back by the stages' own loaders) and fed random token ids of exactly
the planned shape, so bench/plan_memory.py can be asked about the same shape. For each model, in
--precision (bf16 on a GPU) with gradient checkpointing and the `gpt2` preset's micro-batch
(run_pipeline.sh SIZE=gpt2): the bf16-against-fp32 agreement, SFT, discriminator and reward model
(--steps optimizer steps each, through each stage's train_step), PPO (--steps iterations of
ppo_token's rollout and update, reward red), PPO with LoRA, then SFT under FSDP2 on one rank
(distributed.shard_model, the --fsdp path, with the bf16 mixed-precision policy).

Nothing measured is lost (a lent GPU's minutes are few):
  - each stage is a row of its own: in this process under try/except (the CUDA cache cleared
    after it), or in a fresh process (--isolate; the default on a CPU without --tiny); the FSDP
    stage always in its own process under `torchrun --nproc_per_node 1`, on this device, its
    process group torn down at its end. An error, an out-of-memory or the deadline is the row's
    status, its message kept; the next stage runs.
  - the JSON (--out) and the table beside it (.md) are rewritten after every stage, each to a
    temporary file renamed over the old one.
  - --deadline (7 min): a stage whose estimate (the same stage of the previous model, scaled by
    parameters) exceeds the time left is skipped, and one still running at the deadline stopped;
    its row says which.
  - before each stage the planner's figure is compared with torch.cuda.mem_get_info: a stage that
    cannot fit is skipped, the row giving both figures.
  - the script exits 0 with whatever it measured.
A further stage is a function (job, folder, sizes, device, dist_info) -> {figure: value} and one
line in STAGES; figures the table has no column for go to its notes column (all are in the JSON).

One table, printed and written as JSON (--out) and Markdown (the same name, .md):
  peak memory   measured: CUDA, torch.cuda.max_memory_allocated above what was allocated before the
                stage; CPU, the growth of the process's peak RSS (ru_maxrss) over its RSS before the
                stage, each stage in a fresh subprocess (so that one stage's peak does not hide the
                next one's)
  planner       plan_memory.plan() for the same shape, micro-batch, lengths and precision (1
                device); error = measured / planned − 1
  tokens/s      tokens through the stage per second (SFT etc.: the trained sequences' tokens; PPO:
                response tokens per second of whole iterations, rollout and update), the first step
                excluded when --steps > 1 (it warms up kernels and allocators)
  MFU           model FLOPs utilisation of the SFT step and of the PPO update (policy and critic):
                6·N + 12·L·H·T FLOPs per trained token over the device's dense bf16 peak; N counts
                every matmul weight once, the LM head included (also when tied to the input
                embedding), the embedding look-ups not (flop_parameters); the PaLM paper's count
                (appendix B) and nanoGPT's estimate_mfu, which ignore the recomputation of gradient
                checkpointing
  rollout tok/s response tokens per second of the PPO rollout (generation and scoring); the
                rollout row: generation alone, eager, and in its notes with --compile (and each
                first call's seconds, compilation included)
  bf16 vs fp32  the agreement row: the SFT loss of one batch in bf16 against fp32 (relative
                difference); the PPO rows: the largest |KL_j| at iteration 0 and the largest
                |ratio − 1| of the first update
The figures in this table are measured; the planner's are computed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402

import bench_generate  # noqa: E402
import common  # noqa: E402
import discriminator  # noqa: E402
import plan_memory  # noqa: E402
import plumbing  # noqa: E402
import ppo_token  # noqa: E402
import redistribute  # noqa: E402
import sft  # noqa: E402
from plumbing import amp, checkpoint, distributed, hf_models  # noqa: E402

# Dense bf16 peak TFLOP/s (no sparsity), from the vendors' data sheets; the first key found in the
# device's name wins.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A10G": 70.0,
    "A10": 125.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "V100": 125.0,
    "T4": 65.0,
}

# The gpt2 preset of run_pipeline.sh (SIZE=gpt2): micro-batches, lengths, learning rates.
PRESET = dict(prompt_len=512, response_len=256, new_tokens=128, micro_batch=8, rollout_batch=64,
              minibatch=16, sft_lr=2e-5, disc_lr=1e-5, rm_lr=1e-5, policy_lr=1e-6, critic_lr=5e-6)
TINY = dict(prompt_len=16, response_len=8, new_tokens=8, micro_batch=2, rollout_batch=4,
            minibatch=2, sft_lr=1e-3, disc_lr=1e-3, rm_lr=1e-3, policy_lr=1e-3, critic_lr=1e-3)


def model_configs(tiny: bool, only=None) -> dict:
    """name -> config: GPT-2-124M's and Llama-3.2-1B's published shapes (plan_memory.MODELS)."""
    if tiny:
        from transformers import GPT2Config, LlamaConfig

        configs = {
            "gpt2": GPT2Config(
                n_layer=2,
                n_embd=64,
                n_head=2,
                n_positions=64,
                vocab_size=512,
                bos_token_id=1,
                eos_token_id=1,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
            ),
            "llama": LlamaConfig(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                vocab_size=512,
                max_position_embeddings=64,
                tie_word_embeddings=False,
            ),
        }
    else:
        configs = {
            "gpt2": plan_memory.load_config("gpt2"),
            "llama-1b": plan_memory.load_config("llama-3.2-1b"),
        }
    for config in configs.values():
        config.bos_token_id = config.eos_token_id = (
            1  # EOS: id 1, never the argmax of a random model's rows
        )
        config.pad_token_id = 0
    return {k: v for k, v in configs.items() if not only or k in only}


# ----------------------------------------------------------------------------------------------
# Models on disk (random weights), read back by the stages' loaders
# ----------------------------------------------------------------------------------------------
def save_models(config, folder: Path, tokenizer=None):
    """policy/ (a causal LM) and reward/ (a ScoreModel: the PPO reward model, its critic's start),
    with `tokenizer` (default: a three-word stand-in; the models are fed random ids anyway)."""
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tokenizer = tokenizer or PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(
            models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>")
        ),
        pad_token="<pad>",
        eos_token="<eos>",
    )
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(config)
    hf_models.save_hf(policy, tokenizer, folder / "policy")
    del policy
    torch.manual_seed(1)
    hf_models.save_score_model(hf_models.new_score_model(folder / "policy", bias=False), tokenizer,
                               folder / "reward", "sequence")


# ----------------------------------------------------------------------------------------------
# One stage, measured
# ----------------------------------------------------------------------------------------------
def random_rows(n, length, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(
        3, vocab, (n, length), generator=g
    ).tolist()  # ids 0-2 (pad, EOS, unk) left out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def flop_parameters(model) -> int:
    """N of the 6·N estimate: the parameters that multiply activations, each once. The input
    embedding and learned position embeddings are look-ups (no FLOPs) and left out; the LM head is a
    matmul of V·H and counted once, also when it shares its weight with the input embedding (GPT-2,
    Llama 3.2: parameters() lists a tied weight once, and it stays in). nanoGPT's estimate_mfu
    counts the same (its get_num_params drops wpe and keeps the tied wte)."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    head_weight = getattr(head, "weight", None)
    lookups = {
        id(module.weight): module.weight.numel()
        for module in model.modules()
        if isinstance(module, torch.nn.Embedding) and module.weight is not head_weight
    }
    return sum(p.numel() for p in model.parameters()) - sum(lookups.values())


def training_flops_per_token(config, n_params: int, tokens: int) -> float:
    """6·N + 12·L·H·T: a trained token's forward (2·N) and backward (4·N) through N parameters
    (flop_parameters), plus attention's scores and weighted sum over T positions, 2·2·H·T forward
    per layer and twice that backward (PaLM, appendix B; nanoGPT's estimate_mfu). Gradient
    checkpointing's recomputation is not counted (MFU, not hardware utilisation)."""
    return 6 * n_params + 12 * config.num_hidden_layers * config.hidden_size * tokens


def supervised_stage(job, folder, sizes, device, dist_info):
    """SFT, discriminator or reward model: --steps optimizer steps of the stage's train_step."""
    stage, lora_rank = job["stage"], job.get("lora_rank", 0)
    P, R, b = sizes["prompt_len"], sizes["response_len"], sizes["micro_batch"]
    common_argv = [
        "--micro-batch-size",
        str(b),
        "--batch-size",
        str(b * job["micro_batches"]),
        "--max-prompt-len",
        str(P),
        "--max-response-len",
        str(R),
        "--gradient-checkpointing",
        "--precision",
        job["precision"],
        "--lora-rank",
        str(lora_rank),
    ]
    path = folder / "policy"
    vocab = job["vocab"]
    n_examples = b * job["micro_batches"]
    if stage.startswith("sft"):
        args = sft.parse_args(common_argv + ["--model", str(path), "--lr", str(sizes["sft_lr"])])
        model = hf_models.load_policy(path, amp.base_dtype(args, device))
        module, examples = (
            sft,
            list(zip(random_rows(n_examples, P, vocab, 1), random_rows(n_examples, R, vocab, 2))),
        )
    elif stage == "discriminator":
        args = discriminator.parse_args(
            [
                "train",
                "--sft",
                str(path),
                "--labels",
                "x",
                "--out",
                "x",
                "--lr",
                str(sizes["disc_lr"]),
                *common_argv,
            ]
        )
        model = hf_models.new_score_model(path, bias=True, dtype=amp.base_dtype(args, device))
        labels = [[(-1, 0, 1)[(i + j) % 3] for j in range(R)] for i in range(n_examples)]
        module = discriminator
        examples = list(
            zip(random_rows(n_examples, P, vocab, 1), random_rows(n_examples, R, vocab, 2), labels))
    else:
        args = redistribute.parse_args(
            ["train", "--sft", str(path), "--out", "x", "--lr", str(sizes["rm_lr"]), *common_argv])
        model = hf_models.new_score_model(path, bias=False, dtype=amp.base_dtype(args, device))
        module = redistribute
        examples = [
            dict(prompt=p, chosen=c, rejected=r)
            for p, c, r in zip(
                random_rows(n_examples, P, vocab, 1),
                random_rows(n_examples, R, vocab, 2),
                random_rows(n_examples, R, vocab, 3),
            )
        ]
    import lora

    lora.add_lora_from_args(model.backbone if hasattr(model, "backbone") else model, args)
    n_params = flop_parameters(model)
    common.disable_dropout(model)
    hf_models.enable_gradient_checkpointing(model)
    model = distributed.wrap_model(model, dist_info, args.precision)
    optimizer = plumbing.adamw(model, args.lr)
    scheduler = plumbing.cosine_schedule(optimizer, job["steps"])
    times, losses = [], []
    for _ in range(job["steps"]):
        sync(device)
        start = time.perf_counter()
        metrics = module.train_step(model, optimizer, scheduler, examples, args, dist_info, 0)
        sync(device)
        times.append(time.perf_counter() - start)
        losses.append(metrics["loss"])
    rows = 2 * n_examples if stage == "reward" else n_examples
    tokens = rows * (P + R)
    steady = times[1:] or times
    out = dict(tokens_per_s=tokens / (sum(steady) / len(steady)), step_s=sum(times) / len(times),
               loss=losses[0])
    if stage.startswith("sft"):
        out["mfu_flops_per_token"] = training_flops_per_token(job["config"], n_params, P + R)
    return out


def ppo_stage(job, folder, sizes, device, dist_info):
    """--steps PPO iterations (reward red), rollout and update timed apart; KL, ratio at step 0."""
    P, R = sizes["prompt_len"], sizes["new_tokens"]
    B, minibatch, b = sizes["rollout_batch"], sizes["minibatch"], sizes["micro_batch"]
    argv = [
        "--policy",
        str(folder / "policy"),
        "--out",
        "x",
        "--reward",
        "red",
        "--reward-model",
        str(folder / "reward"),
        "--rollout-batch-size",
        str(B),
        "--minibatch-size",
        str(minibatch),
        "--micro-batch-size",
        str(b),
        "--max-new-tokens",
        str(R),
        "--max-prompt-len",
        str(P),
        "--ppo-epochs",
        str(job["ppo_epochs"]),
        "--policy-lr",
        str(sizes["policy_lr"]),
        "--critic-lr",
        str(sizes["critic_lr"]),
        "--gradient-checkpointing",
        "--precision",
        job["precision"],
        "--lora-rank",
        str(job.get("lora_rank", 0)),
        "--device",
        str(device),  # cuda:N as given
    ]
    args = ppo_token.parse_args(argv)
    torch.manual_seed(0)
    models = ppo_token.load_models(args, dist_info)  # with their AdamW optimizers
    policy = models.policy
    prompt = torch.tensor(random_rows(B, P, job["vocab"], 4), device=device)
    prompt_mask = torch.ones_like(prompt)
    # the policy's and the critic's FLOPs (the critic: the reward model's backbone and a value head)
    n_params = (flop_parameters(distributed.unwrap(policy)),
                flop_parameters(distributed.unwrap(models.critic)))
    rollout_s, update_s, response_tokens, update_tokens, first = [], [], [], [], {}
    for step in range(job["steps"]):
        torch.manual_seed(step)
        sync(device)
        start = time.perf_counter()
        batch = ppo_token.rollout(models, prompt, prompt_mask, [1], 0, args)
        sync(device)
        middle = time.perf_counter()
        if step == 0:
            first["kl0_max"] = float(batch.kl.abs().max())
            first["ratio_max"] = first_ratio(policy, batch, args, minibatch)
        ppo_token.ppo_update(models, batch, args, minibatch)
        sync(device)
        rollout_s.append(middle - start)
        update_s.append(time.perf_counter() - middle)
        response_tokens.append(int(batch.response_mask.sum()))
        # prompt + response, each epoch
        update_tokens.append(batch.query_response.numel() * args.ppo_epochs)
    k = 1 if job["steps"] > 1 else 0
    tokens, roll, upd = sum(response_tokens[k:]), sum(rollout_s[k:]), sum(update_s[k:])
    T = batch.query_response.shape[1]
    flops = sum(training_flops_per_token(job["config"], n, T) for n in n_params)
    return dict(tokens_per_s=tokens / (roll + upd),
                step_s=(sum(rollout_s) + sum(update_s)) / job["steps"],
                rollout_tokens_per_s=tokens / roll,
                update_tokens_per_s=sum(update_tokens[k:]) / upd, mfu_flops_per_token=flops,
                response_len=tokens / B / (len(response_tokens) - k), **first)


def first_ratio(policy, batch, args, minibatch) -> float:
    """max |π_θ / π_old − 1| on the first minibatch, in the training forward (train mode)."""
    distributed.unwrap(policy).train()
    idx = torch.arange(min(minibatch, batch.response_mask.shape[0]),
                       device=batch.response_mask.device)
    idx = idx[: args.micro_batch_size or len(idx)]
    with torch.no_grad(), amp.autocast(batch.response_mask.device, args.precision):
        new_logprobs, _ = common.response_logprobs(policy, batch.query_response[idx],
                                                   batch.attention_mask[idx],
                                                   batch.full_response_mask[idx], args.temperature)
    mask = batch.response_mask[idx].bool()
    return float((torch.exp(new_logprobs - batch.logprobs[idx]) - 1)[mask].abs().max())


def agreement_stage(job, folder, sizes, device, dist_info) -> dict:
    """|L_bf16 / L_fp32 − 1| of the SFT loss of one micro-batch (the same weights, the same ids)."""
    model = common.disable_dropout(hf_models.load_policy(folder / "policy")).to(device).eval()
    vocab = model.config.vocab_size
    examples = list(
        zip(
            random_rows(2, sizes["prompt_len"], vocab, 5),
            random_rows(2, sizes["response_len"], vocab, 6),
        )
    )
    query_response, attention_mask, response_mask = (
        t.to(device) for t in common.collate_right(examples, 0)
    )
    losses = {}
    for precision in ("fp32", "bf16"):
        with torch.no_grad(), amp.autocast(device, precision):
            losses[precision] = float(
                sft.sft_loss(model, query_response, attention_mask, response_mask)[0])
    return dict(sft_loss_bf16_vs_fp32=abs(losses["bf16"] / losses["fp32"] - 1))


def rollout_stage(job, folder, sizes, device, dist_info) -> dict:
    """Generation alone (ppo_token.generate with the static-cache decoder, the policy in eval mode
    under the stage's precision): response tokens/s with and without --compile, each the median of
    3 calls after a first (bench_generate.rollout_tokens_per_s), the rollout batch of PPO's shape;
    the first call's seconds apart, compilation included."""
    model = common.disable_dropout(hf_models.load_policy(folder / "policy")).to(device).eval()
    figures = {}
    for compile in (False, True):
        with torch.no_grad(), amp.autocast(device, job["precision"]):
            result = bench_generate.rollout_tokens_per_s(
                model, batch_size=sizes["rollout_batch"], prompt_len=sizes["prompt_len"],
                new_tokens=sizes["new_tokens"], compile=compile)
        name = "compiled" if compile else "eager"
        figures[f"{name}_tokens_per_s"] = result["tokens_per_s"]
        figures[f"{name}_first_call_s"] = result["first_call_s"]
    return dict(rollout_tokens_per_s=figures["eager_tokens_per_s"], **figures)


# ----------------------------------------------------------------------------------------------
# The stages: a row each. Another stage = a function (job, folder, sizes, device, dist_info) ->
# {figure: value} and one line here (and its name in --stages).
# ----------------------------------------------------------------------------------------------
@dataclass
class Stage:
    run: Callable[..., dict]  # measured figures; peak memory is added by run_job
    planner: str | None  # plan_memory's stage (SFT, discriminator, reward model, PPO), or None
    lora_rank: int = 0
    fsdp: bool = False  # FSDP2 on one rank: its own process under torchrun


STAGES = {
    "agreement": Stage(agreement_stage, None),
    "sft": Stage(supervised_stage, "SFT"),
    "sft_lora": Stage(supervised_stage, "SFT", lora_rank=16),
    "discriminator": Stage(supervised_stage, "discriminator"),
    "reward": Stage(supervised_stage, "reward model"),
    "ppo": Stage(ppo_stage, "PPO"),
    "ppo_lora": Stage(ppo_stage, "PPO", lora_rank=16),
    "sft_fsdp": Stage(supervised_stage, "SFT", fsdp=True),
    "rollout": Stage(rollout_stage, None),
}
DEFAULT_STAGES = "agreement,sft,discriminator,reward,ppo,ppo_lora,sft_fsdp,rollout"


def run_job(job: dict) -> dict:
    """One stage of one model, in this process: measured figures (the caller adds the planner's).
    The FSDP stage runs here inside its torchrun process: one rank on this device, its process
    group torn down at the end."""
    device = torch.device(job["device"])
    torch.set_num_threads(job.get("threads") or torch.get_num_threads())
    hf_models._quiet_transformers()
    folder = Path(job["folder"])
    sizes = job["sizes"]
    job["config"] = hf_models.load_policy(folder / "policy", meta=True).config
    job["vocab"] = job["config"].vocab_size
    stage = STAGES[job["stage"]]
    job["lora_rank"] = stage.lora_rank
    dist_info = distributed.DistInfo(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    gc.collect()  # the previous stage's models (in-process runs)
    if stage.fsdp:  # FSDP2 on one rank: the sharding code path, the bf16 mixed-precision policy
        import torch.distributed as dist

        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        dist_info = distributed.DistInfo(device=device, fsdp=True)
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        else:
            before = rss_bytes()
        result = stage.run(job, folder, sizes, device, dist_info)
        if device.type == "cuda":
            result["peak_bytes"] = torch.cuda.max_memory_allocated(device) - before
        else:
            result["peak_bytes"] = peak_rss_bytes() - before
    finally:
        if stage.fsdp:
            dist.destroy_process_group()
    mfu = result.pop("mfu_flops_per_token", None)
    if mfu is not None:
        tokens_per_s = result.get("update_tokens_per_s", result["tokens_per_s"])
        result["tflops"] = tokens_per_s * mfu / 1e12
    return result


class StageTimeout(Exception):
    """A stage still running at --deadline."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise StageTimeout in this (main) thread after `seconds` (an in-process stage)."""
    def expire(signum, frame):
        raise StageTimeout(f"stopped at the deadline, after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc): torchrun starts its workers in sessions of their
    own."""
    found, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop(0)}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def run_process(cmd: list[str], timeout: float) -> dict:
    """A job's process (python gpu_check.py --job, or torchrun around it): its last stdout line as
    the result; killed with everything it started if still running after `timeout` seconds."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *descendants(proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.communicate()
        raise StageTimeout(f"stopped at the deadline, after {timeout:.0f} s") from None
    if proc.returncode:
        # the stage's own exception, not the launcher's (torchrun prints its ChildFailedError last)
        lines = [re.sub(r"^\[rank\d+\]:\s*", "", line) for line in err.splitlines()]
        raised = [line for line in lines if re.match(r"[\w.]+(Error|Exception)\b", line)
                  and "ChildFailedError" not in line]
        raise RuntimeError(f"exit status {proc.returncode}: "
                           f"{raised[-1] if raised else ''} (stderr: {err.strip()[-1500:]})")
    return json.loads(out.strip().splitlines()[-1])


def run_stage(job: dict, isolate: bool, seconds_left: float) -> dict:
    """Run one job where it belongs (torchrun for FSDP, a fresh process with --isolate, else this
    process) within `seconds_left`. Never raises: an error, an out-of-memory or the deadline is
    kept in the row (status error / oom / deadline), with the CUDA cache cleared after it."""
    command = [sys.executable, str(Path(__file__).resolve()), "--job", json.dumps(job)]
    try:
        if STAGES[job["stage"]].fsdp:
            # one rank, in its own process: its NCCL group never outlives the stage
            figures = run_process([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                   "--nproc_per_node", "1", *command[1:]], seconds_left)
        elif isolate:
            figures = run_process(command, seconds_left)
        else:
            with time_limit(seconds_left):
                figures = run_job(dict(job))
        return dict(status="ok", **figures)
    except StageTimeout as error:
        return dict(status="deadline", error=str(error))
    except Exception as error:  # whatever failed is the row's figure
        text = f"{type(error).__name__}: {error}"
        oom = isinstance(error, torch.OutOfMemoryError) or "out of memory" in text.lower()
        return dict(status="oom" if oom else "error", error=text[-2000:])
    finally:
        gc.collect()
        if torch.device(job["device"]).type == "cuda":
            torch.cuda.empty_cache()


def free_memory(device) -> int | None:
    """Bytes free on a CUDA device now (torch.cuda.mem_get_info); None on the CPU (not checked)."""
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.mem_get_info(device)[0]


# ----------------------------------------------------------------------------------------------
# The planner for the same shape
# ----------------------------------------------------------------------------------------------
def planned_bytes(config, job, sizes) -> int | None:
    """plan_memory's total for the stage's shape on one device (None: a stage without a plan)."""
    stage = STAGES[job["stage"]]
    if stage.planner is None:
        return None
    lora_rank = stage.lora_rank
    counts = plan_memory.count_parameters(config, lora_rank or 8)
    shape = plan_memory.shape_of(config)
    ppo = stage.planner == "PPO"
    bf16 = job["precision"] == "bf16"
    args = SimpleNamespace(frozen_dtype="bf16" if bf16 else "fp32", precision=job["precision"],
                           gpus=1, lora_rank=lora_rank or 8, micro_batch=sizes["micro_batch"],
                           prompt_len=sizes["prompt_len"],
                           response_len=sizes["new_tokens"] if ppo else sizes["response_len"])
    row = plan_memory.plan(stage.planner, bool(lora_rank), counts, shape, args,
                           sizes["rollout_batch"])
    return row["total"]


# ----------------------------------------------------------------------------------------------
# main: every stage of every model, a row each, the table rewritten after each
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny models and lengths (seconds on a CPU)")
    parser.add_argument("--models", default=None,
                        help="comma-separated subset of the models (gpt2, llama-1b)")
    parser.add_argument(
        "--stages", default=DEFAULT_STAGES,
        help=f"comma-separated stages, run in this order for each model: {', '.join(STAGES)}")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"),
                        help="the stages' --precision (bf16: the GPU path; on a CPU without bf16 "
                             "matmul units it is slow beyond --tiny)")
    parser.add_argument("--steps", type=int, default=3,
                        help="optimizer steps (PPO: iterations) per stage")
    parser.add_argument("--micro-batches", type=int, default=2,
                        help="micro-batches per supervised step")
    parser.add_argument("--ppo-epochs", type=int, default=1,
                        help="PPO epochs per iteration (the preset's: 4)")
    parser.add_argument("--rollout-batch", type=int, default=None,
                        help="PPO prompts per iteration (default: the preset's 64; --tiny 4)")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="sequences per micro-batch (preset: 8)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (preset: 512)")
    parser.add_argument("--response-len", type=int, default=None,
                        help="response tokens (preset: 256)")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="PPO response tokens (preset: 128)")
    parser.add_argument("--agreement", action=argparse.BooleanOptionalAction, default=True,
                        help="measure bf16 against fp32 on the SFT loss (the agreement stage; "
                             "--no-agreement: skip it; on a CPU without bf16 matmul units one "
                             "GPT-2-sized bf16 forward takes minutes)")
    parser.add_argument("--deadline", type=float, default=7.0,
                        help="minutes for all stages: a stage is not started when its estimate "
                             "(the same stage of the previous model, scaled by parameters) exceeds "
                             "the time left, and one still running at the deadline is stopped; "
                             "both rows say so")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak, TFLOP/s (default: looked up from the "
                             "device name)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="each stage in its own process (default: on CPU without --tiny, where "
                             "peak RSS needs it; --tiny figures of memory are noise either way). "
                             "The FSDP stage always runs in its own process, under torchrun")
    parser.add_argument("--out", default="gpu_check.json",
                        help="the rows as JSON; the table beside it (.md), both rewritten after "
                             "every stage")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [s for s in args.stages.split(",") if s not in STAGES]
    if unknown:
        parser.error(f"--stages: unknown {', '.join(unknown)} (known: {', '.join(STAGES)})")
    if args.deadline <= 0:
        parser.error("--deadline must be > 0 minutes")
    return args


def peak_tflops(args, device) -> tuple[float | None, str]:
    if args.peak_tflops:
        return args.peak_tflops, "--peak-tflops"
    if device.type != "cuda":
        return None, "CPU: no MFU"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value, name
    return None, f"{name}: unknown, give --peak-tflops"


def jobs_of(args) -> list[dict]:
    stages = [s for s in args.stages.split(",") if args.agreement or s != "agreement"]
    return [dict(stage=stage, steps=args.steps, micro_batches=args.micro_batches,
                 ppo_epochs=args.ppo_epochs) for stage in stages]


def fmt_gib(x):
    return "–" if x is None else f"{x / 2**30:.2f}"


TABLE_FIGURES = {"model", "stage", "status", "seconds", "peak_bytes", "planned_bytes", "error",
                 "planner_error", "tokens_per_s", "rollout_tokens_per_s", "mfu", "kl0_max",
                 "ratio_max", "sft_loss_bf16_vs_fp32", "free_bytes", "reason", "n_params",
                 "planner_failed", "tflops", "step_s", "loss", "update_tokens_per_s",
                 "response_len"}  # the rest of a row (a new stage's figures) goes in its notes


def format_table(rows, header) -> str:
    """The rows as a Markdown table; a row that did not run says why in its last column."""
    lines = [header,
             "| model | stage | status | s | peak GiB measured | planner GiB | error | tokens/s "
             "| rollout tok/s | MFU | bf16 vs fp32, notes |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        mfu = "–" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        rollout = f"{r['rollout_tokens_per_s']:.0f}" if "rollout_tokens_per_s" in r else "–"
        tokens = f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "–"
        error = "–" if r.get("planner_error") is None else f"{r['planner_error']:+.0%}"
        notes = []
        if "kl0_max" in r:
            notes.append(f"KL0 {r['kl0_max']:.1e}, ratio−1 {r['ratio_max']:.1e}")
        if "sft_loss_bf16_vs_fp32" in r:
            notes.append(f"SFT loss {r['sft_loss_bf16_vs_fp32']:.1e}")
        notes += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                  for k, v in r.items() if k not in TABLE_FIGURES]
        for why in ("reason", "error", "planner_failed"):
            if r.get(why):
                # the message, not the process's stderr after it (that is in the JSON)
                notes.append(" ".join(str(r[why]).split(" (stderr:")[0].split())[:300])
        lines.append(
            f"| {r['model']} | {r['stage']} | {r['status']} | {r.get('seconds', 0):.0f} | "
            f"{fmt_gib(r.get('peak_bytes'))} | {fmt_gib(r.get('planned_bytes'))} | {error} | "
            f"{tokens} | {rollout} | {mfu} | {'; '.join(notes).replace('|', '/')} |"
        )
    return "\n".join(lines)


def write_report(args, report: dict, header: str):
    """The JSON and the table, each written whole to a temporary file and renamed over the old."""
    checkpoint.atomic_write(args.out, json.dumps(report, indent=1))
    checkpoint.atomic_write(Path(args.out).with_suffix(".md"),
                            format_table(report["rows"], header) + "\n")


def stage_estimate(done: list[dict], stage: str, n_params: int) -> float | None:
    """Seconds the stage should take: the same stage of the last model that ran it, scaled by
    parameters (None when no model has run it yet)."""
    for row in reversed(done):
        if row["stage"] == stage and row["status"] == "ok":
            return row["seconds"] * n_params / row["n_params"]
    return None


def stage_row(args, name, config, folder, job, sizes, rows, started, device) -> dict:
    """One row: skipped (deadline, memory) or run; timed; measured against the planner."""
    row = dict(model=name, stage=job["stage"], n_params=sum(
        p.numel() for p in hf_models.load_policy(folder / "policy", meta=True).parameters()))
    try:
        row["planned_bytes"] = planned_bytes(config, job, sizes)
    except Exception as error:  # a planner that fails must not stop the check
        row["planned_bytes"], row["planner_failed"] = None, f"{type(error).__name__}: {error}"
    left = args.deadline * 60 - (time.perf_counter() - started)
    estimate = stage_estimate(rows, job["stage"], row["n_params"])
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    free = free_memory(device)
    if left <= 0:
        return dict(row, status="skipped", reason="deadline: no time left")
    if estimate is not None and estimate > left:
        return dict(row, status="skipped",
                    reason=f"deadline: ~{estimate:.0f} s estimated, {left:.0f} s left")
    if free is not None and row["planned_bytes"] is not None and row["planned_bytes"] > free:
        return dict(row, status="skipped", free_bytes=free,
                    reason=f"cannot fit: planner {fmt_gib(row['planned_bytes'])} GiB > "
                    f"{fmt_gib(free)} GiB free (torch.cuda.mem_get_info)")
    start = time.perf_counter()
    row.update(run_stage(job, bool(args.isolate), left))
    row["seconds"] = round(time.perf_counter() - start, 1)
    if free is not None:
        row["free_bytes"] = free
    if row["status"] == "ok" and row.get("planned_bytes"):
        row["planner_error"] = row["peak_bytes"] / row["planned_bytes"] - 1
    return row


def main(argv=None, configs=None, tokenizer=None):
    """configs: {name: config} instead of the built-in shapes; tokenizer: saved with the models.
    Returns the report; every row (measured, failed or skipped) is on disk as soon as it is made."""
    args = parse_args(argv)
    if args.job:  # a subprocess of run_stage (alone, or one rank under torchrun)
        print(json.dumps(run_job(json.loads(args.job))))
        return None
    device = distributed.resolve_device(args.device)  # cuda: the current GPU, by its index
    if args.isolate is None:
        args.isolate = device.type == "cpu" and not args.tiny
    sizes = dict(TINY if args.tiny else PRESET)
    for key in ("rollout_batch", "micro_batch", "prompt_len", "response_len", "new_tokens"):
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    sizes["minibatch"] = min(sizes["minibatch"], sizes["rollout_batch"])
    peak, peak_source = peak_tflops(args, device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows, started = [], time.perf_counter()
    report = dict(device=str(device), device_name=device_name, precision=args.precision,
                  sizes=sizes, steps=args.steps, deadline_minutes=args.deadline, peak_tflops=peak,
                  peak_source=peak_source, rows=rows)

    def header():
        return (
            f"## gpu_check on {device_name} "
            f"(measured; planner computed): {args.precision}, gradient checkpointing, micro-batch "
            f"{sizes['micro_batch']}, prompt {sizes['prompt_len']} + response "
            f"{sizes['response_len']} tokens (PPO: {sizes['new_tokens']} new, rollout "
            f"{sizes['rollout_batch']}, {args.ppo_epochs} epoch), {args.steps} steps; peak bf16 "
            f"{peak or '–'} TFLOP/s ({peak_source}); {time.perf_counter() - started:.0f} s so far "
            f"of a {args.deadline:g} min deadline\n"
        )

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        configs = configs or model_configs(
            args.tiny, args.models.split(",") if args.models else None
        )
        for name, config in configs.items():
            folder = Path(tmp) / name
            try:
                save_models(config, folder, tokenizer)
            except Exception as error:  # this model's rows: one error row
                rows.append(dict(model=name, stage="(models)", status="error",
                                 error=f"{type(error).__name__}: {error}"))
                write_report(args, report, header())
                continue
            for job in jobs_of(args):
                job.update(model=name, device=str(device), folder=str(folder), tiny=args.tiny,
                           precision=args.precision, threads=args.threads, sizes=sizes)
                row = stage_row(args, name, config, folder, job, sizes, rows, started, device)
                if row.get("tflops") is not None and peak:
                    row["mfu"] = row["tflops"] / peak
                rows.append(row)
                write_report(args, report, header())
                print(f"{name} {job['stage']}: {row['status']} {row.get('seconds', 0)} s "
                      f"{row.get('reason') or row.get('error') or ''}"[:400], file=sys.stderr,
                      flush=True)
    write_report(args, report, header())
    print("\n" + format_table(rows, header()))
    print(f"\nwritten: {args.out} and {Path(args.out).with_suffix('.md')}")
    return report


if __name__ == "__main__":
    if "--job" in sys.argv:  # a stage's own process: a failure is its exit status
        main()
        sys.exit(0)
    try:
        main()
    except Exception:  # outside any stage (stages keep their errors in their rows)
        traceback.print_exc()
        print("gpu_check: stopped by the error above; the rows measured before it are on disk",
              file=sys.stderr)
    sys.exit(0)  # whatever was measured is on disk: a failed stage is a row, not an exit status
