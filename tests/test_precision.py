"""--precision bf16 on the CPU: the mixed-precision path of every GPU run (bf16 autocast,
bf16-stored frozen models, fp32 trained weights, heads and optimizer states), exercised here because
torch.autocast has a CPU bf16 kernel set. fp32 stays the CPU default (the other tests' numbers are
fp32).

Tolerance. bf16 keeps 8 significant bits: every rounding is off by at most 2^-9 ≈ 0.2% of the value.
In the tiny models here a loss or a log-probability passes through some ten bf16-rounded matmuls;
the errors have random signs, so they grow like the square root of their number (~0.6%) and shrink
again in a mean over tokens. We allow BF16_RTOL = 2% of a loss or gradient norm (about 10 roundings'
worth, all in the same direction: beyond it something other than rounding is at work, e.g. a head
computed in bf16 or a model left in fp32) and BF16_ATOL = 0.05 on a single log-probability or score
of magnitude ~1-7 (a few roundings of the largest logit). Each test also checks that bf16 really ran
(its numbers are not bitwise the fp32 ones). PPO's two invariants at iteration 0, KL = 0 and ratio =
1, hold *exactly* in bf16, by design (plumbing/amp.py), so they are tested to
1e-6, as in fp32.

    python -m pytest -q tests/test_precision.py        # ~1 min on 2 CPU cores
"""

import json

import pytest
import torch

import common
import discriminator
import eval as evaluation
import label
import ppo_token as ppo
import redistribute
import sft
from conftest import write_random_labels
from plumbing import amp, distributed, hf_models

BF16_RTOL = 2e-2  # a loss or a gradient norm: see the docstring
BF16_ATOL = 5e-2  # one log-probability or score
EXACT = 1e-6  # KL and ratio at PPO's first iteration
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one thread, then restored


# ----------------------------------------------------------------------------------------------
# The flag
# ----------------------------------------------------------------------------------------------
def test_one_precision_flag_with_the_same_meaning_in_every_stage():
    parsers = {
        "sft": lambda a: sft.parse_args(a),
        "discriminator": lambda a: discriminator.parse_args(
            ["train", "--sft", "x", "--labels", "y", "--out", "z", *a]
        ),
        "redistribute": lambda a: redistribute.parse_args(
            ["train", "--sft", "x", "--out", "z", *a]
        ),
        "ppo_token": lambda a: ppo.parse_args(
            ["--policy", "x", "--out", "z", "--reward", "seq", "--reward-model", "y", *a]
        ),
        "eval": lambda a: evaluation.parse_args(
            [
                "--policies", "a=x", "--reference", "x", "--reward-model", "y",
                "--discriminator", "z", *a,
            ]
        ),
        "label": lambda a: label.parse_args(["--reviser", "chosen", *a]),
    }
    for stage, parse in parsers.items():
        assert parse([]).precision == "auto", stage
        assert parse(["--precision", "bf16"]).precision == "bf16", stage
        assert parse(["--no-bf16"]).precision == "fp32", stage  # the older switch, kept
        args = parse(["--precision", "bf16"])
        assert amp.frozen_dtype(args, CPU) == torch.bfloat16, (
            stage
        )  # --frozen-dtype auto follows it
    args = sft.parse_args([])
    assert (
        amp.frozen_dtype(args, CPU) == torch.float32
    )  # auto on CPU: fp32, the tests' numbers
    assert amp.frozen_dtype(args, torch.device("cuda")) == torch.bfloat16  # auto on CUDA: bf16
    assert (
        amp.frozen_dtype(sft.parse_args(["--no-bf16"]), torch.device("cuda")) == torch.float32
    )
    assert (
        not amp.use_bf16("auto", CPU)
        and amp.use_bf16("auto", "cuda")
        and amp.use_bf16("bf16", CPU)
    )
    linear = torch.nn.Linear(4, 4)
    for precision, dtype in (
        ("auto", torch.float32),
        ("fp32", torch.float32),
        ("bf16", torch.bfloat16),
    ):
        with amp.autocast(CPU, precision):
            assert linear(torch.ones(2, 4)).dtype == dtype


def test_frozen_bf16_model_computes_like_its_fp32_original(llama_dir):
    """compute_in_fp32: stored in bf16 between calls; the rounded fp32 model's logits in them."""
    rows, mask = common.pad_left([[5, 6, 7, 8], [9, 10]], 0)
    rounded = amp.round_like_frozen(hf_models.load_policy(llama_dir), torch.bfloat16).eval()
    frozen = distributed.prepare_frozen(hf_models.load_policy(llama_dir, torch.bfloat16),
                                        distributed.DistInfo())
    with torch.no_grad(), amp.autocast(CPU, "bf16"):
        kw = dict(input_ids=rows, attention_mask=mask,
                  position_ids=common.position_ids_from_mask(mask))
        assert torch.equal(frozen(**kw).logits, rounded(**kw).logits)
    assert {p.dtype for p in frozen.parameters()} == {torch.bfloat16}  # back to bf16 after the call


# ----------------------------------------------------------------------------------------------
# One step of each training stage: bf16 against fp32
# ----------------------------------------------------------------------------------------------
def first_log_line(out):
    return json.loads((out / "log.jsonl").read_text().splitlines()[0])


def stage_argv(stage, model_dir, tmp_path):
    common_args = [
        "--max-prompt-len", "32", "--max-response-len", "16", "--batch-size", "4",
        "--max-steps", "1", "--device", "cpu",
    ]
    if stage == "sft":
        return sft.main, [
            "--model", str(model_dir), "--limit", "40", "--eval-examples", "4", *common_args,
        ]
    if stage == "discriminator":
        write_random_labels(tmp_path / "labels.jsonl", hf_models.load_tokenizer(model_dir))
        return discriminator.main, [
            "train", "--sft", str(model_dir), "--labels", str(tmp_path / "labels.jsonl"),
            "--log-every", "1", "--eval-fraction", "0", *common_args,
        ]
    return redistribute.main, [
        "train", "--sft", str(model_dir), "--limit", "40", "--eval-fraction", "0.1",
        "--log-every", "1", "--eval-batch-size", "4", *common_args,
    ]


@pytest.mark.parametrize(
    "stage,arch,lora",
    [
        ("sft", "gpt2", 0),
        ("sft", "llama", 0),
        ("sft", "llama", 4),
        ("discriminator", "llama", 0),
        ("redistribute", "gpt2", 0),
        ("redistribute", "llama", 4),
    ],
)
def test_training_step_in_bf16_agrees_with_fp32(stage, arch, lora, tiny_dir, llama_dir, tmp_path):
    """The first step's loss and gradient norm (fp32 weights, bf16 autocast; LoRA: a bf16 base)."""
    main, argv = stage_argv(stage, tiny_dir if arch == "gpt2" else llama_dir, tmp_path)
    argv += ["--lora-rank", str(lora)] if lora else []
    logs = {}
    for precision in ("fp32", "bf16"):
        main(argv + ["--precision", precision, "--out", str(tmp_path / precision)])
        logs[precision] = first_log_line(tmp_path / precision)
    loss_key = "train_loss" if stage == "sft" else "loss"
    for key in (loss_key, "grad_norm"):
        fp32, bf16 = logs["fp32"][key], logs["bf16"][key]
        assert bf16 == pytest.approx(fp32, rel=BF16_RTOL), key
        assert bf16 != fp32, f"{key}: bitwise equal, bf16 did not run"


# ----------------------------------------------------------------------------------------------
# PPO: iteration 0 exact in bf16; one update agrees with fp32
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reward_models(tmp_path_factory, tiny_dir, llama_dir):
    out = tmp_path_factory.mktemp("rm")
    for arch, model_dir in (("gpt2", tiny_dir), ("llama", llama_dir)):
        torch.manual_seed(1)
        hf_models.save_score_model(hf_models.new_score_model(model_dir, bias=False),
                                   hf_models.load_tokenizer(model_dir), out / arch, "sequence")
    return out


def ppo_setup(model_dir, rm_dir, precision, lora=0, extra=()):
    args = ppo.parse_args(
        [
            "--policy", str(model_dir), "--out", "unused", "--reward", "red",
            "--reward-model", str(rm_dir), "--max-new-tokens", "12", "--device", "cpu",
            "--precision", precision, "--lora-rank", str(lora), "--gradient-checkpointing",
            "--ppo-epochs", "1", *extra,
        ]
    )
    dist_info = distributed.DistInfo()
    torch.manual_seed(0)  # the same LoRA adapters in every precision
    loaded = []  # the policies load_models reads: the trained one, then (no LoRA) the reference
    load_policy = hf_models.load_policy
    hf_models.load_policy = lambda *a, **kw: loaded.append(load_policy(*a, **kw)) or loaded[-1]
    try:
        models = ppo.load_models(args, dist_info)
    finally:
        hf_models.load_policy = load_policy
    tokenizer = hf_models.load_tokenizer(model_dir)
    prompt, prompt_mask = common.pad_left([[5, 6, 7, 8], [9, 10], [11, 12, 13], [14]] * 2,
                                          tokenizer.pad_token_id)
    return (
        args,
        models,
        loaded[1] if len(loaded) > 1 else None,
        prompt,
        prompt_mask,
        common.eos_token_ids(tokenizer, models.policy),
        tokenizer.pad_token_id,
    )


def first_ratio(policy, batch, args, idx=(6, 1, 3)):
    """π_θ / π_old on a minibatch in the training forward (train mode, checkpointing)."""
    unwrap = distributed.unwrap(policy)
    unwrap.train()
    idx = torch.tensor(idx)
    width = int(batch.response_mask[idx].sum(-1).max())
    columns = batch.prompt_width + width
    inputs = [
        t[idx, :columns]
        for t in (batch.query_response, batch.attention_mask, batch.full_response_mask)
    ]
    with amp.autocast(CPU, args.precision):
        new_logprobs, _ = common.response_logprobs(policy, *inputs, args.temperature)
    mask = batch.response_mask[idx, :width].bool()
    return torch.exp(new_logprobs - batch.logprobs[idx, :width])[mask]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("lora", [0, 4])
def test_ppo_iteration_zero_in_bf16_kl_is_zero_and_ratio_is_one(
        arch, lora, tiny_dir, llama_dir, reward_models):
    """The reference stored in bf16 (full fine-tuning: a bf16 copy; LoRA: the base, no adapters)."""
    model_dir = tiny_dir if arch == "gpt2" else llama_dir
    args, models, ref_policy, prompt, prompt_mask, eos_ids, pad_id = ppo_setup(
        model_dir, reward_models / arch, "bf16", lora)
    if not lora:
        assert {p.dtype for p in ref_policy.parameters()} == {torch.bfloat16}
        assert {p.dtype for p in models.policy.parameters()} == {torch.float32}
    torch.manual_seed(0)
    batch = ppo.rollout(models, prompt, prompt_mask, eos_ids, pad_id, args)
    assert batch.response_mask.sum() > 8
    assert batch.kl.abs().max() <= EXACT  # KL_j at iteration 0, every token
    ratio = first_ratio(models.policy, batch, args)
    assert (ratio - 1).abs().max() <= EXACT


def test_without_the_design_a_bf16_reference_gives_kl_at_iteration_zero(
        tiny_dir, reward_models, monkeypatch):
    """Why amp.compute_in_fp32 and round_like_frozen exist: a bf16 reference run as it is,
    beside the fp32 policy under autocast, puts bf16 noise into KL (and so into every token's
    reward) from the first step."""
    monkeypatch.setattr(amp, "compute_in_fp32", lambda model: model)
    monkeypatch.setattr(amp, "round_like_frozen", lambda model, dtype: model)
    args, models, _, prompt, prompt_mask, eos_ids, pad_id = ppo_setup(
        tiny_dir, reward_models / "gpt2", "bf16")
    torch.manual_seed(0)
    batch = ppo.rollout(models, prompt, prompt_mask, eos_ids, pad_id, args)
    assert batch.kl.abs().max() > 1e-4


@pytest.mark.parametrize("lora", [0, 4])
def test_ppo_scoring_and_update_in_bf16_agree_with_fp32(lora, llama_dir, reward_models):
    """One rollout's responses (sampled once, in fp32), scored and learned from in each precision:
    log-probs, values, RED rewards, then one minibatch's losses and gradient norms."""
    results = {}
    batch = None
    for precision in ("fp32", "bf16"):
        args, models, _, prompt, prompt_mask, eos_ids, pad_id = ppo_setup(
            llama_dir, reward_models / "llama", precision, lora)
        policy, critic, reward_fn = models.policy, models.critic, models.reward_fn
        if batch is None:
            torch.manual_seed(0)
            batch = ppo.rollout(models, prompt, prompt_mask, eos_ids, pad_id, args)
        qr, am, rm = batch.query_response, batch.attention_mask, batch.full_response_mask
        with torch.no_grad(), amp.autocast(CPU, precision):
            logprobs, _ = common.response_logprobs(policy, qr, am, rm)
            values = ppo.critic_values(critic, qr, am, rm)
        rewards = reward_fn(qr, am, rm)  # the frozen reward model, in --frozen-dtype (bf16 here)
        losses = ppo.minibatch_losses(policy, critic, batch, torch.arange(4),
                                      batch.response_mask[:4].sum(), args)
        (losses[0] + losses[1]).backward()
        results[precision] = dict(logprobs=logprobs, values=values, rewards=rewards,
                                  policy_loss=losses[0].item(), value_loss=losses[1].item(),
                                  policy_grad=distributed.clip_grad_norm(policy, 0),
                                  critic_grad=distributed.clip_grad_norm(critic, 0))
    fp32, bf16 = results["fp32"], results["bf16"]
    for key in ("logprobs", "values", "rewards"):
        torch.testing.assert_close(bf16[key], fp32[key], atol=BF16_ATOL, rtol=0)
        assert not torch.equal(bf16[key], fp32[key]), key
    for key in ("policy_loss", "value_loss", "policy_grad", "critic_grad"):
        assert bf16[key] == pytest.approx(fp32[key], rel=BF16_RTOL, abs=1e-4), key


def test_eval_scoring_in_bf16_agrees_with_fp32(tiny_dir, reward_models, tmp_path):
    """eval.py's score_batch with its models loaded as eval.py loads them, in each precision."""
    torch.manual_seed(2)
    hf_models.save_score_model(hf_models.new_score_model(tiny_dir, bias=True),
                               hf_models.load_tokenizer(tiny_dir), tmp_path / "disc", "token")
    tokenizer = hf_models.load_tokenizer(tiny_dir)
    prompt, prompt_mask = common.pad_left([[5, 6, 7, 8], [9, 10], [11, 12, 13]],
                                          tokenizer.pad_token_id)
    scores = {}
    for precision in ("fp32", "bf16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32

        def frozen(model):
            return distributed.prepare_frozen(amp.cast_frozen(model, dtype), distributed.DistInfo(),
                                              precision=precision)

        policy = frozen(hf_models.load_policy(tiny_dir))
        reward_model = frozen(hf_models.load_score_model(reward_models / "gpt2"))
        disc = frozen(hf_models.load_score_model(tmp_path / "disc"))
        assert reward_model.head.weight.dtype == torch.float32  # heads stay fp32
        if precision == "fp32":
            torch.manual_seed(0)
            generated = evaluation.generate_responses(policy, prompt, prompt_mask, 10,
                                                      [tokenizer.eos_token_id],
                                                      tokenizer.pad_token_id)
        with amp.autocast(CPU, precision):
            scores[precision] = evaluation.score_batch(policy, policy, reward_model, disc,
                                                       *generated, 1.0, True)
    for key in ("logprobs", "rm_score", "tlcr", "red"):
        torch.testing.assert_close(scores["bf16"][key], scores["fp32"][key], atol=BF16_ATOL, rtol=0)
        assert not torch.equal(scores["bf16"][key], scores["fp32"][key]), key
