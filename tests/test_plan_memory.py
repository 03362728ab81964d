"""bench/plan_memory.py: its exact counts against real models, its KV-cache formula against a real
cache, and the figure docs/one-gpu.md quotes (PPO with LoRA r=64 on Llama-2-7B fits one 80 GiB
GPU)."""
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, GPT2Config, LlamaConfig

import lora

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import plan_memory  # noqa: E402

torch.set_num_threads(1)

CONFIGS = {
    "gpt2": lambda: GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=96),
    "llama": lambda: LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        bos_token_id=1,
        eos_token_id=2,
    ),
}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_counts_equal_the_real_models(kind):
    counts = plan_memory.count_parameters(CONFIGS[kind](), rank=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[kind]())
    backbone = AutoModel.from_config(CONFIGS[kind]())
    assert counts["lm"] == sum(p.numel() for p in model.parameters())
    # + Linear(H, 1)
    assert counts["backbone"] == sum(p.numel() for p in backbone.parameters()) + 32 + 1
    lora.add_lora(model, rank=4)
    assert counts["lora"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["layers"] * counts["layer_lora"] == counts["lora"]
    target = "c_attn" if kind == "gpt2" else "q_proj"
    restricted = plan_memory.count_parameters(CONFIGS[kind](), rank=4, targets=[target])
    assert 0 < restricted["lora"] < counts["lora"]


def test_kv_cache_formula_matches_a_real_cache():
    config = CONFIGS["llama"]()
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    input_ids = torch.randint(3, 96, (3, 10))
    with torch.no_grad():
        cache = model(input_ids=input_ids, use_cache=True).past_key_values
    real = sum(
        t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
    )
    assert plan_memory.kv_cache_bytes(plan_memory.shape_of(config), sequences=3, tokens=10) == real


def test_llama2_7b_ppo_lora_fits_one_80gib_gpu(capsys):
    plan_memory.main(["--model", "llama-2-7b", "--gpus", "8"])
    out = capsys.readouterr().out
    # published 7B shape; r=64 on 7 layers × 32
    assert "6.738B parameters" in out and "159.9M parameters" in out
    args = plan_memory.parse_args([])
    config = plan_memory.load_config("llama-2-7b")
    counts, shape = plan_memory.count_parameters(config, 64), plan_memory.shape_of(config)
    batch, ppo, above = plan_memory.recommend_rollout_batch(counts, shape, args)
    assert batch >= 32 and ppo["total"] <= 0.9 * 80 * plan_memory.GiB < above["total"]
    full = plan_memory.plan("PPO", False, counts, shape, args, batch)
    assert full["total"] > 80 * plan_memory.GiB  # full fine-tuning does not fit one GPU...
    # ...but fits with FSDP on 8 (per-GPU bytes)
    assert full["fsdp_total"] <= 0.9 * 80 * plan_memory.GiB
