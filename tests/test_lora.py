"""lora.py on a tiny GPT-2 (Conv1D layers) and a tiny random Llama (nn.Linear, RoPE, GQA), fp32,
dropout 0.

What a bug would break: the adapted model starting exactly at the base (KL 0 at step 0), the
switched-off adapters giving the base bit for bit after training, the merged model reloading as a
plain Hugging Face model with the adapted log-probs, gradients reaching the adapters (and a head)
only, the layers found by type, and merging that never touches the base weights. The last section
checks the same properties through the stage files (ppo_token.py, sft.py, redistribute.py); DDP and
FSDP with LoRA are in tests/test_fsdp.py.
"""
import argparse
import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
)

import common
import lora
import ppo_token as ppo
import redistribute
import sft
from plumbing import checkpoint, distributed, hf_models, ppo_setup

torch.set_num_threads(1)
VOCAB = 96


def gpt2_config():
    return GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=VOCAB,
                      bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0)


def llama_config():
    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                       max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                       pad_token_id=None, tie_word_embeddings=False)


def build(kind: str, backbone: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "gpt2":
        return (GPT2Model if backbone else GPT2LMHeadModel)(gpt2_config()).eval()
    return (LlamaModel if backbone else LlamaForCausalLM)(llama_config()).eval()


EXPECTED = {
    "gpt2": [
        f"transformer.h.{i}.{s}"
        for i in range(2)
        for s in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ],
    "llama": [
        f"model.layers.{i}.{s}"
        for i in range(2)
        for s in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
        )
    ],
}


def batch():
    """Two sequences of 12 tokens, the second left-padded by 3 (as the rollouts are)."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (2, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    return input_ids, attention_mask


def logprobs(model, input_ids, attention_mask):
    """log π(token_t | tokens_<t) for t = 1..T−1: [B, T−1]."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=common.position_ids_from_mask(attention_mask)).logits
    return logits[:, :-1].float().log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def train_a_little(model, steps=3, lr=1e-2):
    """A few AdamW steps on a toy loss (raise the log-prob of the batch), adapters only."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    input_ids, attention_mask = batch()
    for _ in range(steps):
        loss = -logprobs(model, input_ids, attention_mask).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def base_state(model):
    return {
        k: v.clone()
        for k, v in model.state_dict().items()
        if not k.endswith((".lora_A", ".lora_B"))
    }


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_step0_equals_base_and_kl_is_zero(kind):
    base = build(kind)
    model = copy.deepcopy(base)
    lora.add_lora(model, rank=4, alpha=8)
    input_ids, attention_mask = batch()
    with torch.no_grad():
        ref, new = (
            logprobs(base, input_ids, attention_mask),
            logprobs(model, input_ids, attention_mask),
        )
    assert torch.equal(new, ref)
    kl = (new - ref).sum(-1)  # k1 estimator summed over tokens
    assert torch.equal(kl, torch.zeros_like(kl))
    # A is random, B = 0
    assert all(layer.lora_A.abs().sum() > 0 for _, layer in lora.lora_layers(model))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_disabled_adapters_reproduce_the_base_after_training(kind):
    model = build(kind)
    untouched = copy.deepcopy(model)
    before = base_state(model)
    lora.add_lora(model, rank=4, alpha=8)
    train_a_little(model)
    input_ids, attention_mask = batch()
    with torch.no_grad():
        ref = logprobs(untouched, input_ids, attention_mask)
        adapted = logprobs(model, input_ids, attention_mask)
        with lora.adapters_disabled(model):
            disabled = logprobs(model, input_ids, attention_mask)
            with lora.adapters_disabled(model):  # nested: still off inside, still off after
                nested = logprobs(model, input_ids, attention_mask)
            after_inner = logprobs(model, input_ids, attention_mask)
        restored = logprobs(model, input_ids, attention_mask)
    assert not torch.allclose(adapted, ref, atol=1e-3)  # the adapters learned something
    assert torch.equal(disabled, ref) and torch.equal(nested, ref) and torch.equal(after_inner, ref)
    assert torch.equal(restored, adapted)
    after = base_state(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_merged_save_reloads_as_plain_hf_model(kind, tmp_path):
    model = build(kind)
    lora.add_lora(model, rank=4, alpha=8)
    train_a_little(model)
    tokenizer = hf_models.configure_tokenizer(
        hf_models.train_tiny_tokenizer(["hello world, a tiny corpus"] * 20, vocab_size=300))
    lora.save_merged(model, tokenizer, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not any(isinstance(m, lora.LoRALinear) for m in reloaded.modules())
    input_ids, attention_mask = batch()
    with torch.no_grad():
        adapted = logprobs(model, input_ids, attention_mask)
        with lora.adapters_disabled(model):
            base = logprobs(model, input_ids, attention_mask)
        merged = logprobs(reloaded, input_ids, attention_mask)
    assert not torch.allclose(adapted, base, atol=1e-3)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
    if kind == "gpt2":  # the tied LM head came back tied to the (unchanged) embedding
        assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()
        assert torch.equal(reloaded.transformer.wte.weight, model.transformer.wte.weight)
    assert (tmp_path / "tokenizer.json").exists()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_only_adapters_get_gradients(kind):
    model = build(kind)
    lora.add_lora(model, rank=4, alpha=8)
    input_ids, attention_mask = batch()
    logprobs(model, input_ids, attention_mask).mean().backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    adapters = {
        name for name, _ in model.named_parameters() if name.endswith((".lora_A", ".lora_B"))
    }
    assert (
        with_grad == adapters == {name for name, p in model.named_parameters() if p.requires_grad}
    )
    assert len(adapters) == 2 * len(EXPECTED[kind])
    # at step 0, B = 0, so dL/dA = 0 but dL/dB ≠ 0
    assert all(layer.lora_B.grad.abs().sum() > 0 for _, layer in lora.lora_layers(model))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_backbone_with_value_head_trains_adapters_and_head_only(kind):
    backbone = build(kind, backbone=True)
    names = lora.add_lora(backbone, rank=4, alpha=8)
    # no "transformer."/"model." prefix
    assert names == [name.split(".", 1)[1] for name in EXPECTED[kind]]
    # a critic's value head, outside the blocks
    head = torch.nn.Linear(backbone.config.hidden_size, 1)
    input_ids, attention_mask = batch()
    train_a_little_critic = torch.optim.AdamW(
        [*head.parameters(), *(p for p in backbone.parameters() if p.requires_grad)], lr=1e-2)
    for _ in range(2):
        values = head(
            backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        ).squeeze(-1)
        loss = ((values - 1.0) ** 2).mean()
        train_a_little_critic.zero_grad()
        loss.backward()
        train_a_little_critic.step()
    assert head.weight.grad.abs().sum() > 0
    with_grad = {name for name, p in backbone.named_parameters() if p.grad is not None}
    assert with_grad and all(name.endswith((".lora_A", ".lora_B")) for name in with_grad)
    # B ≠ 0 by now
    assert all(layer.lora_A.grad.abs().sum() > 0 for _, layer in lora.lora_layers(backbone))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_layers_found_by_type_and_targets_restrict(kind):
    assert lora.add_lora(build(kind), rank=2) == EXPECTED[kind]
    # not mlp.c_proj
    targets = ["q_proj", "v_proj"] if kind == "llama" else ["c_attn", "attn.c_proj"]
    names = lora.add_lora(build(kind), rank=2, targets=targets)
    assert (
        names == [n for n in EXPECTED[kind] if any(n.endswith("." + t) for t in targets)]
        and len(names) == 4
    )
    with pytest.raises(ValueError, match="matches no linear layer"):
        lora.add_lora(build(kind), rank=2, targets=["proj"])  # a dotted suffix, not any substring
    model = build(kind)
    lora.add_lora(model, rank=2)
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.add_lora(model, rank=2)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        lora.add_lora(build(kind), rank=0)


def test_command_line_flags():
    parser = argparse.ArgumentParser()
    lora.add_lora_args(parser)
    args = parser.parse_args([])
    assert (args.lora_rank, args.lora_alpha, args.lora_targets) == (0, lora.DEFAULT_ALPHA, None)
    model = build("llama")
    assert lora.add_lora_from_args(model, args) == [] and all(
        p.requires_grad for p in model.parameters()
    )
    args = parser.parse_args(
        ["--lora-rank", "8", "--lora-alpha", "16", "--lora-targets", "q_proj, v_proj"])
    assert args.lora_targets == ["q_proj", "v_proj"]
    assert len(lora.add_lora_from_args(model, args)) == 4
    layer = model.model.layers[0].self_attn.q_proj
    assert (
        (layer.rank, layer.scale) == (8, 2.0)
        and layer.lora_A.shape == (8, 32)
        and layer.lora_B.shape == (32, 8)
    )
    with pytest.raises(SystemExit):
        lora.check_lora_args(parser, parser.parse_args(["--lora-rank", "-1"]))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_bf16_base_fp32_adapters_and_merge_never_drifts(kind):
    model = build(kind).to(torch.bfloat16)
    lora.add_lora(model, rank=4, alpha=8)  # after the cast: adapters stay fp32
    for _, layer in lora.lora_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.5)
    before = base_state(model)
    input_ids, attention_mask = batch()
    for context in (
        torch.autocast("cpu", dtype=torch.bfloat16),
        torch.autocast("cpu", enabled=False),
    ):
        with context:
            out = model(input_ids=input_ids, attention_mask=attention_mask).logits
        assert out.dtype == torch.bfloat16
        out.float().mean().backward()
    layer = lora.lora_layers(model)[0][1]
    assert (
        layer.lora_A.dtype == layer.lora_A.grad.dtype == torch.float32 and layer.weight.grad is None
    )
    first, second = lora.merged_state_dict(model), lora.merged_state_dict(model)
    # as FSDP's full state dict would give
    gathered = {k: v.clone() for k, v in model.state_dict().items()}
    third = lora.merged_state_dict(model, state=gathered)
    after = base_state(model)
    # the model's weights: bit-identical
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert first.keys() == before.keys()  # original names, no LoRA tensors
    assert all(torch.equal(first[k], second[k]) and torch.equal(first[k], third[k]) for k in first)
    assert all(first[k].dtype == before[k].dtype for k in first)
    changed = [k for k in first if not torch.equal(first[k], before[k])]
    assert sorted(changed) == sorted(f"{name}.weight" for name in EXPECTED[kind])


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_trainable_state_dict_round_trip(kind):
    model = build(kind)
    lora.add_lora(model, rank=4, alpha=8)
    train_a_little(model, steps=2)
    state = lora.trainable_state_dict(model)
    assert set(state) == {
        n for n, _ in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))
    }
    fresh = build(kind)
    lora.add_lora(fresh, rank=4, alpha=8)
    lora.load_trainable_state_dict(fresh, state)
    input_ids, attention_mask = batch()
    with torch.no_grad():
        assert torch.equal(
            logprobs(fresh, input_ids, attention_mask), logprobs(model, input_ids, attention_mask)
        )
    other_rank = build(kind)
    lora.add_lora(other_rank, rank=2, alpha=8)
    with pytest.raises(ValueError, match="shape"):
        lora.load_trainable_state_dict(other_rank, state)


def test_gradient_checkpointing_gives_the_same_adapter_gradients():
    """Non-reentrant checkpointing (what the stages use) reaches adapters behind frozen
    embeddings."""
    grads = []
    for checkpointing in (False, True):
        model = build("llama")
        lora.add_lora(model, rank=4, alpha=8)
        for _, layer in lora.lora_layers(model):
            torch.nn.init.normal_(layer.lora_B, std=0.1, generator=torch.Generator().manual_seed(3))
        if checkpointing:
            hf_models.enable_gradient_checkpointing(model)
        model.train()
        logprobs(model, *batch()).mean().backward()
        grads.append(
            torch.cat([p.grad.flatten() for n, p in model.named_parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)
    assert grads[1].abs().sum() > 0


def test_meta_device_model():
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(llama_config())
    names = lora.add_lora(model, rank=4)
    assert names == EXPECTED["llama"]
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # per layer r·(in + out): q 32+32, k 32+16, v 32+16, o 32+32, gate 32+64, up 32+64, down 64+32
    assert trained == 2 * 4 * (64 + 48 + 48 + 64 + 96 + 96 + 96)
    assert all(p.device.type == "meta" for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Through the stage files
# ----------------------------------------------------------------------------------------------
@pytest.fixture(params=["gpt2", "llama"])
def policy_and_rm(request, tmp_path_factory):
    """A saved policy (the conftest tiny GPT-2 or tiny Llama) and a reward model with a
    trained-looking head."""
    model_dir = request.getfixturevalue("tiny_dir" if request.param == "gpt2" else "llama_dir")
    rm_dir = tmp_path_factory.mktemp("rm")
    torch.manual_seed(1)
    rm = hf_models.new_score_model(model_dir, bias=False)
    torch.nn.init.normal_(rm.head.weight)
    hf_models.save_score_model(rm, hf_models.load_tokenizer(model_dir), rm_dir, "sequence")
    return model_dir, rm_dir


def ppo_argv(model_dir, rm_dir, out, *extra):
    return [
        "--policy",
        str(model_dir),
        "--reward",
        "red",
        "--reward-model",
        str(rm_dir),
        "--out",
        str(out),
        "--lora-rank",
        "4",
        "--rollout-batch-size",
        "4",
        "--minibatch-size",
        "2",
        "--ppo-epochs",
        "2",
        "--max-prompt-len",
        "24",
        "--max-new-tokens",
        "8",
        "--policy-lr",
        "3e-2",
        "--critic-lr",
        "3e-2",
        "--limit",
        "16",
        "--kl-coef",
        "0.05",
        *map(str, extra),
    ]


def trained_names(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_ppo_with_lora_reference_is_the_policy_with_adapters_off(policy_and_rm, monkeypatch):
    """One frozen copy of each base: no reference model, the reward read inside the critic. At step
    0 the policy IS the reference (KL exactly 0) and the reward is the reward model's, bit for bit;
    after PPO steps the adapters switched off still give the base policy and the base reward model
    bit for bit, and only adapters and the value head were trained."""
    model_dir, rm_dir = policy_and_rm
    args = ppo.parse_args(ppo_argv(model_dir, rm_dir, "unused"))
    loads = []

    def counted(name):
        load = getattr(hf_models, name)
        monkeypatch.setattr(hf_models, name, lambda *a, **kw: loads.append(name) or load(*a, **kw))

    counted("load_policy")
    counted("load_score_model")
    models = ppo.load_models(args, distributed.DistInfo())
    monkeypatch.undo()
    # no reference copy; the reward model read once
    assert loads == ["load_policy", "load_score_model"]
    policy, critic, reward_fn = models.policy, models.critic, models.reward_fn
    assert trained_names(policy) and all(".lora_" in n for n in trained_names(policy))
    assert {n for n in trained_names(critic) if ".lora_" not in n} == {"head.weight"}

    tokenizer = hf_models.load_tokenizer(model_dir)
    prompts = ppo_setup.load_prompts(args, tokenizer, quiet=True)[:4]
    prompt, prompt_mask = common.pad_left(prompts, tokenizer.pad_token_id)
    eos_ids, pad_id = common.eos_token_ids(tokenizer, policy), tokenizer.pad_token_id
    base_policy = common.disable_dropout(hf_models.load_policy(model_dir)).eval()
    base_rm = redistribute.load_reward_model(rm_dir)

    def check_against_the_bases(batch):
        inputs = [batch.query_response, batch.attention_mask, batch.full_response_mask]
        with torch.no_grad(), lora.adapters_disabled(policy):
            assert torch.equal(common.response_logprobs(policy, *inputs)[0],
                               common.response_logprobs(base_policy, *inputs)[0])
        assert torch.equal(reward_fn(*inputs), redistribute.redistribute(base_rm, *inputs))

    torch.manual_seed(0)
    batch = ppo.rollout(models, prompt, prompt_mask, eos_ids, pad_id, args)
    # step 0: KL = 0
    assert torch.equal(batch.logprobs, batch.ref_logprobs) and batch.kl.abs().max() == 0
    check_against_the_bases(batch)

    for step in range(3):  # main's loop: rollout, then PPO epochs
        torch.manual_seed(step + 1)
        ppo.ppo_update(models, ppo.rollout(models, prompt, prompt_mask, eos_ids, pad_id, args),
                       args, args.minibatch_size)
    assert {n for n, p in policy.named_parameters() if p.grad is not None} == trained_names(policy)
    assert {n for n, p in critic.named_parameters() if p.grad is not None} == trained_names(critic)
    torch.manual_seed(9)
    batch = ppo.rollout(models, prompt, prompt_mask, eos_ids, pad_id, args)
    assert batch.kl.abs().max() > 0  # the adapters moved the policy away from the reference...
    check_against_the_bases(batch)  # ...and switched off they are still exactly the bases
    state = policy.state_dict()  # the frozen weights are the base's, unchanged
    assert all(torch.equal(state[k], v) for k, v in base_policy.state_dict().items())


def adapted_from_checkpoint(model, out, name):
    """`model` (the base) with LoRA rank 4 and the trained tensors of checkpoint `name` (adapters,
    heads)."""
    lora.add_lora(model.backbone if isinstance(model, common.ScoreModel) else model, rank=4)
    lora.load_trainable_state_dict(
        model, load_file(str(checkpoint.latest_checkpoint(out) / f"{name}.safetensors")))
    return common.disable_dropout(model).eval()


def test_ppo_with_lora_saves_a_merged_policy_and_resumes_from_adapters(policy_and_rm, tmp_path):
    """The checkpoint holds adapters and the value head only; --stop-after then a resume gives the
    run an uninterrupted one gives; the final policy is a plain causal LM with the adapted model's
    log-probs."""
    model_dir, rm_dir = policy_and_rm
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    ppo.main(ppo_argv(model_dir, rm_dir, straight, "--iterations", 3))
    assert ppo.main(ppo_argv(model_dir, rm_dir, cut, "--iterations", 3, "--stop-after", 2)) is None
    ckpt = checkpoint.latest_checkpoint(cut)
    policy_keys = load_file(str(ckpt / "policy.safetensors")).keys()
    critic_keys = load_file(str(ckpt / "critic.safetensors")).keys()
    assert policy_keys and all(".lora_" in k for k in policy_keys)
    assert {k for k in critic_keys if ".lora_" not in k} == {"head.weight"}
    ppo.main(ppo_argv(model_dir, rm_dir, cut, "--iterations", 3))
    log_a, log_b = (
        [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        for out in (straight, cut)
    )
    assert [r["step"] for r in log_b] == [1, 2, 3] and log_a[0]["kl"] == 0 and log_a[-1]["kl"] != 0
    for key in ("task_reward", "kl", "policy_loss", "value_loss"):
        assert log_b[-1][key] == pytest.approx(log_a[-1][key], rel=1e-5, abs=1e-6), key

    merged = AutoModelForCausalLM.from_pretrained(straight / "policy", dtype=torch.float32).eval()
    adapted = adapted_from_checkpoint(hf_models.load_policy(model_dir), straight, "policy")
    assert not any("lora" in k for k in merged.state_dict())
    ids = torch.tensor([ppo_setup.load_prompts(ppo.parse_args(ppo_argv(model_dir, rm_dir, "x")),
                                         hf_models.load_tokenizer(model_dir), quiet=True)[0]])
    mask, response_mask = torch.ones_like(ids), torch.zeros_like(ids)
    response_mask[0, ids.shape[1] // 2:] = 1
    with torch.no_grad():
        torch.testing.assert_close(common.response_logprobs(merged, ids, mask, response_mask)[0],
                                   common.response_logprobs(adapted, ids, mask, response_mask)[0],
                                   atol=1e-5, rtol=0)
        assert not torch.allclose(
            common.response_logprobs(merged, ids, mask, response_mask)[0],
            common.response_logprobs(hf_models.load_policy(model_dir), ids, mask, response_mask)[0],
        )


def test_sft_and_reward_model_with_lora_save_merged_standard_models(tiny_dir, tmp_path):
    """SFT and the reward model train adapters (and the score head) only, checkpoint just those, and
    save the standard classes with the adapters merged: the same outputs as the adapted models
    (1e-5)."""
    out = tmp_path / "sft"
    sft.main(
        [
            "--model", str(tiny_dir), "--out", str(out), "--lora-rank", "4", "--limit", "40",
            "--max-steps", "3", "--batch-size", "4", "--micro-batch-size", "2",
            "--max-prompt-len", "32", "--max-response-len", "16", "--eval-examples", "4",
            "--lr", "1e-2",
        ]
    )
    keys = load_file(str(checkpoint.latest_checkpoint(out) / "model.safetensors")).keys()
    assert keys and all(".lora_" in k for k in keys)
    ids = torch.tensor([list(range(5, 25))])
    mask, response_mask = torch.ones_like(ids), (torch.arange(20) >= 8).long()[None]
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    adapted = adapted_from_checkpoint(hf_models.load_policy(tiny_dir), out, "model")
    with torch.no_grad():
        torch.testing.assert_close(common.response_logprobs(merged, ids, mask, response_mask)[0],
                                   common.response_logprobs(adapted, ids, mask, response_mask)[0],
                                   atol=1e-5, rtol=0)

    rm_out = tmp_path / "rm"
    redistribute.main(
        [
            "train", "--sft", str(tiny_dir), "--out", str(rm_out), "--lora-rank", "4",
            "--limit", "24", "--max-steps", "3", "--batch-size", "4", "--micro-batch-size", "2",
            "--max-prompt-len", "32", "--max-response-len", "16", "--lr", "1e-2",
        ]
    )
    keys = load_file(str(checkpoint.latest_checkpoint(rm_out) / "model.safetensors")).keys()
    assert {k for k in keys if ".lora_" not in k} == {"head.weight"}
    hf_model = AutoModelForSequenceClassification.from_pretrained(
        rm_out, dtype=torch.float32
    ).eval()
    adapted = adapted_from_checkpoint(hf_models.new_score_model(tiny_dir, bias=False), rm_out,
                                      "model")
    with torch.no_grad():
        ours = redistribute.sequence_reward(adapted, ids, mask, mask)  # at the last token
        theirs = hf_model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert not any("lora" in k for k in hf_model.state_dict())
