"""--fsdp (plumbing/distributed.py's FSDP2 section) and LoRA under torchrun: 2 gloo processes on
CPU, fp32, a tiny GPT-2 (tied embeddings) and a tiny Llama (RoPE buffers, no pad token).

ONE torchrun launch (a start costs seconds) runs every check; rank 0 writes what it measured to
results.json, the stage runs write their usual folders, and the tests below assert one
property each:
  - each training stage (sft, discriminator, reward model) run for a few steps with --fsdp logs the
    same losses and gradient norms and saves the same weights as under DDP and as one process with
    the same global batch (1e-4); with LoRA too, and DDP + LoRA matches one process;
  - PPO with --fsdp (and with --fsdp --lora-rank, gradient checkpointing on) matches PPO under DDP
    (one process cannot be compared: each rank samples its own prompts and tokens);
  - a sharded checkpoint resumes exactly (SFT; PPO with LoRA, whose checkpoint holds adapters and
    heads only);
  - the final models load with the standard Hugging Face classes (LoRA merged);
  - generation where one rank's rows end early and the other's never do finishes, samples what an
    unsharded model samples, and keeps the policy gathered during the rollout;
  - rank 0 loads, the others build on the meta device: the same logits (Llama's rotary buffers
    included), half the parameters per rank; a frozen model sharded under no_grad gives the
    unsharded logits and is left resharded; the bf16 mixed-precision policy computes in bf16 and
    keeps fp32 weights and gradients;
  - --precision bf16: one step of each stage with FSDP2's bf16 MixedPrecisionPolicy (it runs with
    gloo on CPU) agrees with DDP under bf16 autocast to bf16 rounding; PPO's KL is exactly 0 at
    iteration 0 in both.

    python -m pytest tests/test_fsdp.py        # ~1 min on 2 CPU cores
"""
import json
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    GPT2Config,
    GPT2LMHeadModel,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import common  # noqa: E402
import discriminator  # noqa: E402
import ppo_token  # noqa: E402
import redistribute  # noqa: E402
import sft  # noqa: E402
from conftest import run_torchrun, write_random_labels  # noqa: E402
from plumbing import checkpoint, decode, distributed, hf_models  # noqa: E402

TOL = 1e-4


# ----------------------------------------------------------------------------------------------
# The stage runs: argv of each, by name (the launch runs the 2-process ones, the fixture the others)
# ----------------------------------------------------------------------------------------------
def stage_runs(work: Path, llama_dir: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (stage, argv). Names ending in _one run in one process, the others under torchrun."""
    sft_args = [  # 9 held-out examples: the ranks get 3 and 2 micro-batches
        "--model", "tiny", "--tiny-dropout", "0", "--tiny-vocab", "512", "--limit", "200",
        "--max-prompt-len", "48", "--max-response-len", "32", "--batch-size", "6",
        "--micro-batch-size", "2", "--max-steps", "3", "--eval-every", "2", "--eval-examples", "9",
        "--eval-batch-size", "2", "--lr", "3e-3", "--device", "cpu",
    ]
    sft_lora = sft_args + ["--lora-rank", "4", "--lr", "1e-2"]
    disc_args = [
        "train", "--sft", str(llama_dir), "--labels", str(work / "labels.jsonl"),
        "--max-prompt-len", "24", "--max-response-len", "16", "--batch-size", "6",
        "--micro-batch-size", "2", "--max-steps", "2", "--log-every", "1", "--lr", "3e-3",
        "--eval-batch-size", "2", "--eval-fraction", "0.2", "--device", "cpu",
    ]
    rm_args = [  # 5 held out: 2 / 1
        "train", "--sft", str(llama_dir), "--limit", "50", "--eval-fraction", "0.1",
        "--max-prompt-len", "24", "--max-response-len", "16", "--batch-size", "4",
        "--micro-batch-size", "1", "--max-steps", "2", "--log-every", "1", "--lr", "3e-3",
        "--eval-batch-size", "2", "--device", "cpu",
    ]
    rm_lora = rm_args + ["--lora-rank", "4", "--lr", "1e-2"]
    ppo_args = [
        "--policy", str(llama_dir), "--reward", "red", "--reward-model", str(work / "rm_init"),
        "--iterations", "3", "--rollout-batch-size", "4", "--minibatch-size", "2",
        "--ppo-epochs", "2", "--max-prompt-len", "24", "--max-new-tokens", "8",
        "--policy-lr", "1e-3", "--critic-lr", "1e-3", "--limit", "40", "--device", "cpu",
    ]
    ppo_lora = ppo_args + [
        "--lora-rank", "4", "--policy-lr", "1e-2", "--critic-lr", "1e-2",
        "--gradient-checkpointing",
    ]
    def modes(prefix, stage, argv, kinds=("one", "ddp", "fsdp")):
        """PREFIX_one and PREFIX_ddp run argv as it is (in one process, under torchrun),
        PREFIX_fsdp adds --fsdp."""
        return {f"{prefix}_{kind}": (stage, argv + ["--fsdp"] * (kind == "fsdp")) for kind in kinds}

    runs = {
        **modes("sft", "sft", sft_args),
        **modes("sft_lora", "sft", sft_lora),
        # then again without: resumes
        "sft_fsdp_cut": ("sft", sft_args + ["--fsdp", "--stop-after", "2"]),
        # resumed in one process, no --fsdp
        "sft_fsdp_stop": ("sft", sft_args + ["--fsdp", "--stop-after", "2"]),
        **modes("disc", "discriminator", disc_args),
        **modes("rm", "redistribute", rm_args),
        **modes("rm_lora", "redistribute", rm_lora, ("one", "fsdp")),
        **modes("ppo", "ppo_token", ppo_args, ("ddp", "fsdp")),
        **modes("ppo_lora", "ppo_token", ppo_lora, ("ddp", "fsdp")),
        "ppo_lora_fsdp_cut": ("ppo_token", ppo_lora + ["--fsdp", "--stop-after", "2"]),
    }
    # FSDP2's bf16 MixedPrecisionPolicy against DDP + autocast
    bf16 = ["--precision", "bf16", "--max-steps", "1"]
    for name, (stage, argv) in {
        "sft": ("sft", sft_args),
        "disc": ("discriminator", disc_args),
        "rm": ("redistribute", rm_args),
        "rm_lora": ("redistribute", rm_lora),
    }.items():
        runs[f"{name}_bf16_ddp"] = (stage, argv + bf16)
        runs[f"{name}_bf16_fsdp"] = (stage, argv + bf16 + ["--fsdp"])
    for name, argv in (("ppo", ppo_args), ("ppo_lora", ppo_lora)):
        runs[f"{name}_bf16_ddp"] = (
            "ppo_token",
            argv + ["--precision", "bf16", "--iterations", "1"],
        )
        runs[f"{name}_bf16_fsdp"] = (
            "ppo_token",
            argv + ["--precision", "bf16", "--iterations", "1", "--fsdp"],
        )
    return {
        name: (stage, argv + ["--out", str(work / name)]) for name, (stage, argv) in runs.items()
    }


STAGES = {"sft": sft.main, "discriminator": discriminator.main, "redistribute": redistribute.main,
          "ppo_token": ppo_token.main}


def run_stage(name, stage, argv):
    STAGES[stage](argv)
    if name.endswith("_cut"):  # interrupted by --stop-after: run again without it, it resumes
        cut = argv.index("--stop-after")
        STAGES[stage](argv[:cut] + argv[cut + 2:])


# ----------------------------------------------------------------------------------------------
# Checks of the FSDP plumbing itself, run inside the launch
# ----------------------------------------------------------------------------------------------
def tiny_gpt2(seed=0, vocab=64):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=vocab,
            n_layer=2,
            n_head=2,
            n_embd=32,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )


def random_rows(n, seed, low=4, high=12, vocab=64):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(
            3, vocab, (int(torch.randint(low, high, (1,), generator=g)),), generator=g
        ).tolist()
        for _ in range(n)
    ]


def logits_of(model, rows):
    ids, mask = common.pad_left(rows, 0)
    return model(
        input_ids=ids, attention_mask=mask, position_ids=common.position_ids_from_mask(mask)
    ).logits


def check_generation(dist_info):
    """Rank 0's only row ends at a step s ≥ 1, rank 1's rows never end: generation must still
    finish."""
    rank = dist_info.rank
    policy = tiny_gpt2(5).eval()
    plain = tiny_gpt2(5).eval()
    n_rows, max_new = (1, 12) if rank == 0 else (3, 12)
    prompt, prompt_mask = common.pad_left(random_rows(n_rows, seed=20 + rank, low=3, high=7), 0)
    torch.manual_seed(100 + rank)  # 1. unsharded, no EOS: what each rank samples with its seed
    free = ppo_token.generate(plain, prompt, prompt_mask, [-1], 0, max_new)
    # 2. an EOS id that ends rank 0's row early and no row of rank 1
    everyone = [None] * dist_info.world_size
    dist.all_gather_object(everyone, free.tolist())
    row0, others = everyone[0][0], {t for r in everyone[1:] for row in r for t in row}
    end_step, eos = next(
        (s, row0[s]) for s in range(1, 6) if row0[s] not in row0[:s] and row0[s] not in others
    )
    expected = free.clone()
    for row in expected:  # after a row's EOS, pad (= the EOS id here) to the end
        hits = (row == eos).nonzero()
        if len(hits):
            row[hits[0, 0]:] = eos
    # 3. sharded: gathered per token, then for the whole rollout
    distributed.shard_model(policy, dist_info)
    # one entry per layer forward that found its weights sharded (= an all-gather)
    sharded_at_entry = []
    for layer in policy.transformer.h:
        layer.register_forward_pre_hook(
            lambda module, args: sharded_at_entry.append(
                isinstance(module.mlp.c_fc.weight, DTensor)
            ),
            prepend=True,
        )
    results = {"end_step": end_step}
    for mode in ("per_token", "gathered"):
        sharded_at_entry.clear()
        torch.manual_seed(100 + rank)
        with distributed.gathered(policy) if mode == "gathered" else torch.no_grad():
            response = ppo_token.generate(policy, prompt, prompt_mask, [eos], eos, max_new,
                                          decoder=decode.make_decoder(sharded=True))
        results[f"{mode}_steps"] = response.shape[1]
        results[f"{mode}_equal"] = bool(torch.equal(response, expected))
        results[f"{mode}_all_gathers_per_layer"] = sum(sharded_at_entry) / len(policy.transformer.h)
        results[f"{mode}_resharded_after"] = all(
            isinstance(p.data, DTensor) and p._local_tensor.numel() < p.numel()
            for p in policy.parameters()
        )
    policy.train()  # 4. training works after the rollout (backward all-gathers again)
    logits_of(policy, random_rows(2, seed=30 + rank)).sum().backward()
    results["grad_after_rollout"] = all(p.grad is not None for p in policy.parameters())
    return results


def check_rank0_loads(dist_info, paths: dict):
    """load_* with meta=True on rank 1, shard_model: rank 0's weights arrive, buffers included."""
    rows = random_rows(3, seed=60 + dist_info.rank, vocab=300)
    ids, mask = common.pad_left(rows, 0)
    results = {}
    loaders = {"gpt2": lambda meta: hf_models.load_policy(paths["gpt2"], meta=meta),
               "llama": lambda meta: hf_models.load_policy(paths["llama"], meta=meta),
               "score": lambda meta: hf_models.load_score_model(paths["score"], meta=meta)}
    for name, load in loaders.items():
        plain, built = load(False), load(dist_info.meta)
        results[f"{name}_built_on_meta"] = all(p.is_meta for p in built.parameters())
        results[f"{name}_same_modes"] = [m.training for m in built.modules()] == [
            m.training for m in plain.modules()
        ]
        sharded = distributed.shard_model(built, dist_info).eval()
        plain.eval()
        with torch.no_grad():
            a, b = (
                (plain(ids, mask), sharded(ids, mask))
                if name == "score"
                else (logits_of(plain, rows), logits_of(sharded, rows))
            )
        results[f"{name}_logits"] = (a - b).abs().max().item()
        buffers = dict(sharded.named_buffers())
        results[f"{name}_buffers"] = max(
            [(buffers[k] - v).abs().max().item() for k, v in plain.named_buffers()] or [0.0])
        local = sum(p.to_local().numel() for p in sharded.parameters())
        results[f"{name}_local_fraction"] = local / sum(p.numel() for p in plain.parameters())
    return results


def check_frozen_and_mixed_precision(dist_info, paths: dict):
    """prepare_frozen under FSDP: unsharded logits under no_grad, resharded after. Mixed precision
    (allowed on CPU too): layers compute in bf16, the sharded weights and their gradients stay
    fp32."""
    rows = random_rows(3, seed=70 + dist_info.rank, vocab=300)
    plain = hf_models.load_policy(paths["llama"]).eval()
    frozen = distributed.prepare_frozen(hf_models.load_policy(paths["llama"], meta=dist_info.meta),
                                        dist_info)
    with torch.no_grad():
        difference = (logits_of(frozen, rows) - logits_of(plain, rows)).abs().max().item()
    resharded = all(
        p._local_tensor.numel() < p.numel() for p in frozen.parameters() if p.numel() > 1
    )
    model = distributed.shard_model(hf_models.load_policy(paths["llama"], meta=dist_info.meta),
                                    dist_info, mixed_precision=True)
    seen = []
    model.model.layers[0].mlp.register_forward_hook(
        lambda module, args, out: seen.append(
            [str(args[0].dtype), str(module.up_proj.weight.dtype), str(out.dtype)]
        )
    )
    logits_of(model, rows).float().sum().backward()
    return {"frozen_logits": difference, "frozen_resharded": resharded, "requires_grad": any(
        p.requires_grad for p in frozen.parameters()), "mlp_input_weight_output": seen[0],
            "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
            "grad_dtypes": sorted({str(p.grad.dtype) for p in model.parameters()})}


def check_refusals(work: Path):
    """A checkpoint written without --fsdp is not resumed with it (one line, both ranks, no
    hang)."""
    argv = stage_runs(work, Path(json.loads((work / "inputs.json").read_text())["llama"]))[
        "sft_ddp"
    ][1]
    try:
        sft.main(argv + ["--fsdp"])
    except common.InputError as e:
        return {"refused": str(e)}
    return {"refused": None}


def launched(work: Path):
    torch.set_num_threads(1)
    hf_models._quiet_transformers()
    inputs = json.loads((work / "inputs.json").read_text())
    results, seconds = {}, {}
    dist_info = distributed.setup_distributed("cpu", fsdp=True)
    # one process group for the whole launch: the stages' setup_distributed finds it, and their
    # cleanup only waits (a second init_process_group in the same processes can pick up the first
    # one's rendezvous keys)
    cleanup, distributed.cleanup_distributed = (
        distributed.cleanup_distributed,
        lambda dist_info: distributed.barrier(),
    )
    for name, check in {
        "generation": lambda: check_generation(dist_info),
        "rank0_loads": lambda: check_rank0_loads(dist_info, inputs),
        "frozen_and_mixed_precision": lambda: check_frozen_and_mixed_precision(dist_info, inputs),
    }.items():
        start = time.time()
        everyone = [None] * dist_info.world_size
        dist.all_gather_object(everyone, check())
        results[name], seconds[name] = everyone, round(time.time() - start, 2)
    for name, (stage, argv) in stage_runs(work, Path(inputs["llama"])).items():
        if not name.endswith("_one"):
            start = time.time()
            run_stage(name, stage, argv)
            seconds[name] = round(time.time() - start, 2)
    results["refusals"] = check_refusals(work)
    if dist_info.master:
        (work / "results.json").write_text(json.dumps({**results, "seconds": seconds}, indent=1))
    cleanup(dist_info)


# ----------------------------------------------------------------------------------------------
# The fixture: inputs, the one launch, the one-process runs
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory, llama_dir, tiny_tokenizer):
    work = tmp_path_factory.mktemp("fsdp")
    llama_tokenizer = hf_models.load_tokenizer(llama_dir)
    write_random_labels(work / "labels.jsonl", llama_tokenizer, n=20)
    torch.manual_seed(1)
    # PPO's reward model, and its critic's start
    hf_models.save_score_model(hf_models.new_score_model(llama_dir, bias=False), llama_tokenizer,
                               work / "rm_init", "sequence")
    gpt2 = tiny_gpt2(7, vocab=300)
    gpt2.save_pretrained(work / "gpt2")
    (work / "inputs.json").write_text(
        json.dumps(
            {"llama": str(llama_dir), "gpt2": str(work / "gpt2"), "score": str(work / "rm_init")}
        )
    )
    # ~30 s; a hang fails here
    code, output = run_torchrun([__file__, "launch", work], timeout=480, cwd=ROOT)
    assert code == 0, output[-6000:]
    torch.set_num_threads(1)
    for name, (stage, argv) in stage_runs(work, llama_dir).items():
        if name.endswith("_one"):
            run_stage(name, stage, argv)
    stop = stage_runs(work, llama_dir)["sft_fsdp_stop"][1]
    # the sharded checkpoint, 1 rank
    sft.main([a for a in stop[:stop.index("--fsdp")] + stop[stop.index("--out"):]])
    return work


@pytest.fixture(scope="module")
def results(work):
    return json.loads((work / "results.json").read_text())


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def assert_logs_match(a: Path, b: Path, tol=TOL):
    """Every number logged at every step within tol (relative to the value when it exceeds 1: a
    perplexity)."""
    log_a, log_b = read_log(a), read_log(b)
    assert [r["step"] for r in log_a] == [r["step"] for r in log_b] and len(log_a) >= 2
    for ra, rb in zip(log_a, log_b):
        assert ra.keys() == rb.keys()
        for key, value in ra.items():
            if key not in ("elapsed_s", "tokens_per_s") and isinstance(value, float):
                assert abs(value - rb[key]) <= tol * max(1.0, abs(value)), (
                    a.name,
                    b.name,
                    ra["step"],
                    key,
                    value,
                    rb[key],
                )


def weights(path: Path, auto_class=AutoModelForCausalLM) -> dict:
    return auto_class.from_pretrained(path, dtype=torch.float32).state_dict()


def assert_weights_match(a: dict, b: dict, tol=TOL):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < tol, worst


# ----------------------------------------------------------------------------------------------
# Training stages: --fsdp = DDP = one process
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage,auto_class", [("sft", AutoModelForCausalLM),
                                              ("disc", AutoModelForTokenClassification),
                                              ("rm", AutoModelForSequenceClassification)])
def test_stage_under_fsdp_matches_ddp_and_one_process(work, stage, auto_class):
    """Losses, gradient norms (clipping active in SFT), held-out metrics and the saved weights."""
    for other in ("ddp", "one"):
        assert_logs_match(work / f"{stage}_fsdp", work / f"{stage}_{other}")
        assert_weights_match(weights(work / f"{stage}_fsdp", auto_class),
                             weights(work / f"{stage}_{other}", auto_class))
    assert read_log(work / f"{stage}_fsdp")[0]["grad_norm"] > 0
    moved = weights(work / f"{stage}_fsdp", auto_class)  # and the steps did change the weights
    if stage == "sft":
        # --max-grad-norm 1: the clip acted
        assert read_log(work / "sft_fsdp")[0]["grad_norm"] > 1.0
        start = weights(work / "sft_fsdp" / "init")
        assert max((moved[k] - start[k]).abs().max().item() for k in start) > 1e-3


def test_lora_under_fsdp_and_ddp_matches_one_process(work):
    """LoRA: the frozen base and the adapters sharded alike (FSDP), or the adapters all-reduced
    (DDP)."""
    assert_logs_match(work / "sft_lora_fsdp", work / "sft_lora_one")
    assert_logs_match(work / "sft_lora_ddp", work / "sft_lora_one")
    assert_logs_match(work / "rm_lora_fsdp", work / "rm_lora_one")
    one = weights(work / "sft_lora_one")
    assert_weights_match(weights(work / "sft_lora_fsdp"), one)
    assert_weights_match(weights(work / "sft_lora_ddp"), one)
    assert_weights_match(weights(work / "rm_lora_fsdp", AutoModelForSequenceClassification),
                         weights(work / "rm_lora_one", AutoModelForSequenceClassification))


@pytest.mark.parametrize("lora", [False, True])
def test_ppo_under_fsdp_matches_ddp(work, lora):
    """Same prompts and seeds per rank, so the same rollouts, rewards, losses and final policy. With
    LoRA also gradient checkpointing (switched on before sharding) and the reward read inside the
    critic."""
    name = "ppo_lora" if lora else "ppo"
    assert_logs_match(work / f"{name}_fsdp", work / f"{name}_ddp")
    # Adam moves a coordinate by up to lr a step whatever its gradient's size, so the reduction's
    # rounding in a tiny gradient reaches the weights in proportion to lr: the LoRA run's lr is 10×
    # the full run's (1e-2 against 1e-3), so is its tolerance (seen: 1.4e-4 on one machine, under
    # 1e-4 on another; a wrong gradient moves a weight by ~lr = 1e-2)
    assert_weights_match(weights(work / f"{name}_fsdp" / "policy"),
                         weights(work / f"{name}_ddp" / "policy"), tol=TOL * (10 if lora else 1))
    log = read_log(work / f"{name}_fsdp")
    assert log[0]["kl"] == 0.0 and log[-1]["kl"] != 0.0


# FSDP2's bf16 mixed-precision policy runs on the CPU with gloo (torch 2.13): weights all-gathered
# and used in bf16, gradients reduced in fp32. DDP under --precision bf16 keeps fp32 weights and
# lets autocast round the matmuls' inputs. The two compute the same step up to bf16 rounding
# (tolerance: tests/test_precision.py).
BF16_RTOL = 2e-2


@pytest.mark.parametrize("stage", ["sft", "disc", "rm", "rm_lora"])
def test_stage_under_fsdp_mixed_precision_matches_ddp_in_bf16(work, stage):
    fsdp, ddp = read_log(work / f"{stage}_bf16_fsdp")[0], read_log(work / f"{stage}_bf16_ddp")[0]
    loss = "train_loss" if stage == "sft" else "loss"
    for key in (loss, "grad_norm"):
        assert fsdp[key] == pytest.approx(ddp[key], rel=BF16_RTOL), key
    # bf16 did run (not bitwise the fp32 loss)
    assert fsdp[loss] != read_log(work / f"{stage}_fsdp")[0][loss]


@pytest.mark.parametrize("name", ["ppo", "ppo_lora"])
def test_ppo_under_fsdp_mixed_precision_starts_exactly_at_its_reference(work, name):
    """Iteration 0 in bf16, sharded and not: KL = 0 exactly (the policy and its bf16 reference
    compute alike), and the first iteration's statistics of FSDP and DDP agree to bf16 rounding.
    Full fine-tuning samples other tokens under the two: DDP's fp32 weights keep embeddings, norms
    and the residual stream in fp32, FSDP's bf16 policy casts every weight of a layer; the sampling
    distributions differ by bf16 rounding, so do some draws. Only per-token averages that hardly
    depend on which tokens were drawn are compared then. With LoRA both run the same bf16 base and
    draw the same tokens: the rewards and the value loss are compared too. (policy_loss is a mean of
    whitened advantages, a sum that cancels to ~0: a relative tolerance means nothing there.)"""
    fsdp, ddp = read_log(work / f"{name}_bf16_fsdp")[0], read_log(work / f"{name}_bf16_ddp")[0]
    assert fsdp["kl"] == 0.0 and ddp["kl"] == 0.0
    keys = ("entropy", "perplexity", "response_length") + (
        ("task_reward", "rm_score", "value_loss") if "lora" in name else ()
    )
    for key in keys:
        assert fsdp[key] == pytest.approx(ddp[key], rel=BF16_RTOL, abs=1e-3), key


def test_fsdp_resume_continues_exactly(work):
    """--stop-after 2, then the same command: sharded checkpoint -> the run an uninterrupted one
    makes."""
    assert_logs_match(work / "sft_fsdp_cut", work / "sft_fsdp", tol=1e-6)
    assert_weights_match(weights(work / "sft_fsdp_cut"), weights(work / "sft_fsdp"), tol=1e-6)
    assert_logs_match(work / "ppo_lora_fsdp_cut", work / "ppo_lora_fsdp", tol=1e-6)
    assert_weights_match(weights(work / "ppo_lora_fsdp_cut" / "policy"),
                         weights(work / "ppo_lora_fsdp" / "policy"), tol=1e-6)


def test_sharded_checkpoint_resumes_in_one_process(work):
    """Written by 2 ranks at step 2, read by one process without --fsdp (DCP reshards weights and
    AdamW states): step 3 is the step of an uninterrupted run."""
    assert [r["step"] for r in read_log(work / "sft_fsdp_stop")] == [1, 2, 3]
    assert_logs_match(work / "sft_fsdp_stop", work / "sft_one")
    assert_weights_match(weights(work / "sft_fsdp_stop"), weights(work / "sft_one"))


def test_sharded_checkpoints(work, results):
    """One .distcp file per rank; with LoRA only what is trained (adapters, the critic's value
    head)."""
    from torch.distributed.checkpoint import FileSystemReader

    step = checkpoint.latest_checkpoint(work / "sft_fsdp")
    assert sorted(p.name for p in (step / "sharded").glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    assert not list((step / "sharded").glob("*.safetensors")) and (step / "state.pt").exists()
    saved = FileSystemReader(
        str(checkpoint.latest_checkpoint(work / "ppo_lora_fsdp") / "sharded")
    ).read_metadata()
    names = [k for k in saved.state_dict_metadata if k.startswith("model.")]
    assert names and all(".lora_" in k or k.startswith("model.critic.head.") for k in names), names
    assert any(k.startswith("model.critic.head.") for k in names)
    # resuming a checkpoint written without --fsdp under --fsdp is refused in one line (no hang)
    assert "was written without --fsdp" in results["refusals"]["refused"]


def test_final_models_are_standard_hugging_face_models(work):
    """Written by rank 0 from a gathered state dict: the standard classes load them; LoRA merged
    in."""
    policy = AutoModelForCausalLM.from_pretrained(work / "sft_fsdp")
    # GPT-2's tied embeddings stay tied
    assert policy.lm_head.weight is policy.transformer.wte.weight
    for name in ("sft_lora_fsdp", "ppo_lora_fsdp/policy"):
        state = weights(work / name)
        assert not any("lora" in k for k in state)
    for name, auto_class in (("disc_fsdp", AutoModelForTokenClassification),
                             ("rm_lora_fsdp", AutoModelForSequenceClassification)):
        state = weights(work / name, auto_class)
        assert (
            not any("lora" in k for k in state)
            and hf_models.load_score_model(work / name) is not None
        )


# ----------------------------------------------------------------------------------------------
# The FSDP plumbing
# ----------------------------------------------------------------------------------------------
def test_decoder_layers_are_the_units_of_sharding(llama_dir):
    """The model's own decoder-layer class (_no_split_modules), also inside a ScoreModel or under
    LoRA."""
    from torch import nn

    import lora

    assert [type(m).__name__ for m in distributed.decoder_layers(tiny_gpt2())] == ["GPT2Block"] * 2
    llama = hf_models.load_policy(llama_dir)
    lora.add_lora(llama, rank=2)
    layers = distributed.decoder_layers(llama)
    assert [type(m).__name__ for m in layers] == ["LlamaDecoderLayer"] * 2
    score = hf_models.new_score_model(llama_dir, bias=True)
    assert distributed.decoder_layers(score) == list(score.backbone.layers)
    with pytest.raises(ValueError, match="_no_split_modules"):
        distributed.decoder_layers(nn.Sequential(nn.Linear(2, 2)))


def test_generation_with_uneven_ends_finishes_and_keeps_the_policy_gathered(results):
    r0, r1 = results["generation"]
    assert r0["end_step"] < 11  # rank 0's only row ended early...
    for r in (r0, r1):
        for mode in ("per_token", "gathered"):
            assert r[f"{mode}_steps"] == 12  # ...yet every rank took 12 decode steps
            assert r[f"{mode}_equal"] and r[f"{mode}_resharded_after"], r
        assert r["per_token_all_gathers_per_layer"] == 12  # every token gathers every layer
        assert r["gathered_all_gathers_per_layer"] == 1  # once per rollout
        assert r["grad_after_rollout"]


@pytest.mark.parametrize("name", ["gpt2", "llama", "score"])
def test_rank0_loads_the_others_build_on_meta(results, name):
    for rank, r in enumerate(results["rank0_loads"]):
        assert r[f"{name}_built_on_meta"] == (rank == 1)
        assert (
            r[f"{name}_logits"] < TOL and r[f"{name}_buffers"] == 0.0 and r[f"{name}_same_modes"]
        ), r
        assert 0.45 < r[f"{name}_local_fraction"] < 0.55, r  # each rank holds half


def test_frozen_model_sharded_and_mixed_precision(results):
    for r in results["frozen_and_mixed_precision"]:
        assert r["frozen_logits"] < TOL and r["frozen_resharded"] and not r["requires_grad"], r
        assert r["mlp_input_weight_output"] == ["torch.bfloat16"] * 3  # compute in bf16
        assert r["param_dtypes"] == ["torch.float32"] and r["grad_dtypes"] == ["torch.float32"]


def test_offload_with_fsdp_is_refused():
    with pytest.raises(SystemExit):
        ppo_token.parse_args(
            [
                "--policy", "p", "--out", "o", "--reward", "seq", "--reward-model", "r", "--fsdp",
                "--offload-frozen",
            ]
        )


if __name__ == "__main__":
    launched(Path(sys.argv[2]))
