"""Memory planner: GPU bytes of each training stage, full fine-tuning vs LoRA, 1 GPU and FSDP.

    python bench/plan_memory.py                  # Llama-2-7B, LoRA r=64, 1 GPU and FSDP on 8 GPUs
    python bench/plan_memory.py --model gpt2 --gpus 1 --lora-rank 16
    python bench/plan_memory.py --model path/to/config.json --rollout-batch 32 --response-len 512

Nothing is downloaded and no weight is allocated: the model is built from its published config on
PyTorch's meta device, its parameters are counted exactly, and lora.add_lora is run on it to count
the adapters. Everything else is a formula, printed as "computed" (not measured). GiB = 2^30 bytes.

Per model (P its parameters; full fine-tuning as the stages run today: fp32 weights, bf16
autocast):
  weights      trained: 4·P fp32 + 2·P bf16 copies that autocast caches for the step; frozen: 2·P
               (bf16, --frozen-dtype) or 4·P. With LoRA the base is frozen and only the adapters
               are trained.
  gradients    4 bytes per trained parameter (fp32)
  AdamW        8 bytes per trained parameter (exp_avg and exp_avg_sq, fp32)
Per phase (b = --micro-batch sequences of T = prompt + response tokens; L layers, H hidden, Hkv = kv
heads × head dim, I = MLP width, V vocabulary):
  activations  gradient checkpointing on every decoder block:
               L·b·T·H·s          the saved block inputs (s = 4: fp32 residual stream when the
                                  weights are fp32; 2 with a bf16 base)
               + b·T·2·E          one block recomputed in backward: E activations per token,
                                  2 bytes each, E = 9H + 2Hkv + 4I (gated MLP: Llama, Qwen,
                                  Mistral) or 12H + 4I (GPT-2): what torch's saved-tensor hooks
                                  count (CPU, bf16 autocast, SDPA attention without T² scores)
                                  within 4%, for a 256-wide Llama and GPT-2 block; with LoRA
                                  at most 2·(in + r) more per adapted layer (the adapter's input
                                  copy and B·A·x's r values)
               + 4·b·T'·V + 5·C   the loss's logits: bf16 (2) and their gradient (2), over
                                  T' = T (SFT) or response + 1 (PPO) positions, plus the fp32
                                  log-softmax of one chunk of positions in the backward
                                  (common.token_logprobs, C = common.CHUNK_BYTES, or the whole
                                  loss when smaller); none for
                                  scalar heads
  generation   PPO rollout: KV cache 2·L·B·T·Hkv·2 bytes (keys and values of every layer, bf16)
               for B = --rollout-batch prompts, plus the prefill's live tensors in one block
               without autograd, 2·(3I + 4H) bytes per prompt token (the MLP's intermediates,
               a few [B, P, H])
  scoring      PPO rollout: log-probs and entropy of B responses at once: the logits,
               2·B·(R+1)·V bytes (bf16), plus 3·C for the fp32 log-softmax and entropy of one
               chunk of positions (common.token_logprobs), plus one block's live tensors over B·T
               tokens
  total        all weights, gradients and AdamW states + the largest of the phases (each frees its
               memory before the next starts)
Reward-model micro-batches hold b pairs = 2b sequences. PPO holds policy, reference, critic (a copy
of the reward model, trained) and reward model; with LoRA: the policy's base (its adapters off =
the reference) and the reward model's backbone (with the critic's adapters: the critic; off: the
reward), so two frozen backbones + two sets of adapters + a value head.
FSDP on N GPUs (--gpus): weights, gradients and AdamW states sharded (÷N; bf16 compute weights come
from the all-gather, so no autocast copies); activations, KV cache and logits not sharded (each GPU
runs its own micro-batch and rollout); plus what is gathered at a time: every model's root
(embeddings, LM head) in bf16, two decoder layers in bf16 (one computing, one prefetched) and one
layer's fp32 gradients before the reduce-scatter; in the PPO rollout (generation and scoring) also
the whole policy in bf16, which ppo_token.py keeps gathered across decode steps.
A plan "fits" when its total is at most 90% of --gpu-memory (the rest: CUDA context, allocator
fragmentation, temporaries not counted above).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import CHUNK_BYTES  # noqa: E402  the fp32 work of one chunk of log-prob positions

GiB = 2 ** 30
FP32, BF16 = 4, 2
HEADROOM = 0.9  # share of the GPU's memory a plan may use

# Published shapes (config.json of each model on the Hugging Face hub), as config dicts.
MODELS = {
    "gpt2": dict(
        model_type="gpt2", n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257
    ),
    "gpt2-xl": dict(
        model_type="gpt2", n_layer=48, n_embd=1600, n_head=25, n_positions=1024, vocab_size=50257
    ),
    "llama-3.2-1b": dict(
        model_type="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
    ),
    "llama-2-7b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
    "llama-3-8b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    ),
}
STAGES = ("SFT", "discriminator", "reward model", "PPO")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="llama-2-7b",
        help=f"one of {', '.join(MODELS)}, or a local config.json (or a directory holding one)")
    parser.add_argument("--gpus", type=int, default=8,
                        help="N of the FSDP table (per-GPU bytes); 1 = no FSDP table")
    parser.add_argument("--gpu-memory", type=float, default=80, help="GiB of one GPU (H100: 80)")
    parser.add_argument("--lora-rank", type=int, default=64, help="rank r of the LoRA rows")
    parser.add_argument("--lora-targets", default=None,
                        help="comma-separated module-name suffixes (as lora.py's --lora-targets); "
                             "default: all linear layers of the decoder blocks")
    parser.add_argument("--frozen-dtype", choices=("bf16", "fp32"), default="bf16",
                        help="dtype of frozen weights (the LoRA base, PPO's reference and reward "
                             "model)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                        help="the stages' --precision: bf16 (autocast, the GPU default) or fp32 "
                             "(the CPU default: no autocast copies, 4-byte activations, KV cache "
                             "and logits)")
    parser.add_argument("--micro-batch", type=int, default=4,
                        help="sequences per forward/backward pass (reward model: pairs, so twice "
                             "the sequences)")
    parser.add_argument("--prompt-len", type=int, default=512, help="prompt tokens per sequence")
    parser.add_argument("--response-len", type=int, default=256,
                        help="response tokens per sequence")
    parser.add_argument("--rollout-batch", type=int, default=0,
                        help="PPO prompts per rollout per GPU; 0 = the largest power of two for "
                             "which PPO with LoRA fits on one GPU")
    parser.add_argument("--json", action="store_true",
                        help="also print every figure as one JSON line")
    args = parser.parse_args(argv)
    if min(args.gpus, args.lora_rank, args.micro_batch, args.prompt_len, args.response_len) < 1:
        parser.error("--gpus, --lora-rank, --micro-batch, --prompt-len and --response-len must be "
                     ">= 1")
    return args


# ----------------------------------------------------------------------------------------------
# 1. The model's shape and exact parameter counts (built on the meta device: no memory, no download)
# ----------------------------------------------------------------------------------------------
def load_config(model: str):
    from transformers import AutoConfig

    if model in MODELS:
        spec = dict(MODELS[model])
        return AutoConfig.for_model(spec.pop("model_type"), **spec)
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise SystemExit(
            f"--model {model}: not one of {', '.join(MODELS)} and no config.json there")
    return AutoConfig.from_pretrained(str(path))


def shape_of(config) -> dict:
    """L, H, Hkv, I, V from a Hugging Face config (GPT-2 names its fields differently)."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    mlp = (
        getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    )
    return dict(layers=config.num_hidden_layers, hidden=hidden, kv_dim=kv_heads * head_dim, mlp=mlp,
                vocab=config.vocab_size)


def count_parameters(config, rank: int, targets: list[str] | None = None) -> dict:
    """Exact counts: the causal LM, its backbone (AutoModel) + a scalar head, one decoder layer,
    and the LoRA adapters (lora.add_lora on the meta model) with what they add to activations."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    import lora

    def numel(module):
        return sum(p.numel() for p in module.parameters())  # parameters() lists tied weights once

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config)
        backbone = AutoModel.from_config(config)
    blocks = [m for m in lm.modules() if type(m).__name__ in lora.decoder_block_types(lm)]
    # + head: Linear(H, 1)
    counts = dict(lm=numel(lm), backbone=numel(backbone) + config.hidden_size + 1,
                  layer=numel(blocks[0]), layers=len(blocks))
    lora.add_lora(lm, rank, targets=targets)
    adapted = [layer for _, layer in lora.lora_layers(blocks[0])]
    counts["lora"] = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    counts["layer_lora"] = sum(layer.lora_A.numel() + layer.lora_B.numel() for layer in adapted)
    # per token, per block
    counts["lora_act"] = sum(layer.in_features + layer.rank for layer in adapted)
    counts["gated"] = any("gate" in name for name, _ in blocks[0].named_modules())
    return counts


# ----------------------------------------------------------------------------------------------
# 2. Activations, KV cache, logits (the formulas of the docstring)
# ----------------------------------------------------------------------------------------------
def block_bytes_per_token(shape: dict, counts: dict, lora_on: bool, act: int = BF16) -> int:
    """One decoder block's activations saved for backward, per token (bf16 autocast, SDPA attention;
    act = 4 bytes per activation under --precision fp32)."""
    H, Hkv, mlp = shape["hidden"], shape["kv_dim"], shape["mlp"]  # mlp: the docstring's I
    elements = 9 * H + 2 * Hkv + 4 * mlp if counts["gated"] else 12 * H + 4 * mlp
    extra = act * counts["lora_act"] if lora_on else 0  # each adapter's input copy and its r values
    return act * elements + extra


def forward_bytes_per_token(shape: dict, act: int = BF16) -> int:
    """The tensors alive at once inside one block in a forward pass without autograd (rollouts)."""
    return act * (3 * shape["mlp"] + 4 * shape["hidden"])


def train_activations(shape, counts, sequences: int, tokens: int, residual_bytes: int,
                      lora_on: bool, n_models: int = 1, logit_positions: int = 0,
                      act: int = BF16) -> int:
    """Gradient checkpointing: every block's input for n_models models, one block recomputed, the
    loss's logits (the logits and their gradient, 2·act bytes each) and one chunk's fp32
    log-softmax in the backward (common.token_logprobs)."""
    saved_inputs = (
        n_models * shape["layers"] * sequences * tokens * shape["hidden"] * residual_bytes
    )
    one_block = sequences * tokens * block_bytes_per_token(shape, counts, lora_on, act)
    positions = sequences * logit_positions * shape["vocab"]  # logit values
    logits = 2 * act * positions + 5 * min(CHUNK_BYTES, FP32 * positions)
    return saved_inputs + one_block + logits


def kv_cache_bytes(shape, sequences: int, tokens: int, act: int = BF16) -> int:
    # keys and values, bf16 (fp32)
    return 2 * shape["layers"] * sequences * tokens * shape["kv_dim"] * act


# ----------------------------------------------------------------------------------------------
# 3. One plan: a stage, full fine-tuning or LoRA, on 1 GPU and per GPU with FSDP
# ----------------------------------------------------------------------------------------------
def plan(stage: str, lora_on: bool, counts: dict, shape: dict, args, rollout_batch: int) -> dict:
    frozen_bytes = BF16 if args.frozen_dtype == "bf16" else FP32
    act = BF16 if getattr(args, "precision", "bf16") == "bf16" else FP32  # activation bytes
    autocast_copy = BF16 if act == BF16 else 0  # the bf16 copies autocast caches of fp32 weights
    lm, backbone, head = counts["lm"], counts["backbone"], shape["hidden"] + 1
    T, R, b = args.prompt_len + args.response_len, args.response_len, args.micro_batch
    # the models: (parameters trained, parameters frozen, root parameters for FSDP)
    lm_root = lm - counts["layers"] * counts["layer"]
    bb_root = backbone - counts["layers"] * counts["layer"]
    if lora_on:
        trained_lm, frozen_lm = counts["lora"], lm
        trained_bb, frozen_bb = counts["lora"] + head, backbone - head
    else:
        trained_lm, frozen_lm, trained_bb, frozen_bb = lm, 0, backbone, 0
    if stage == "SFT":
        trained, frozen, roots = trained_lm, frozen_lm, lm_root
    elif stage in ("discriminator", "reward model"):
        trained, frozen, roots = trained_bb, frozen_bb, bb_root
    # PPO: policy + critic trained; reference + reward model frozen (LoRA: the two frozen bases)
    else:
        trained = trained_lm + trained_bb
        # LoRA: + the reward head
        frozen = frozen_lm + frozen_bb + (head if lora_on else lm + backbone)
        roots = 2 * (lm_root + bb_root) if not lora_on else lm_root + bb_root
    residual_bytes = frozen_bytes if lora_on else FP32
    out = dict(stage=stage, method=f"LoRA r{args.lora_rank}" if lora_on else "full",
               trained_params=trained, frozen_params=frozen,
               # fp32 + autocast's bf16 copies
               weights=trained * (FP32 + autocast_copy) + frozen * frozen_bytes,
               gradients=trained * FP32, adamw=trained * 2 * FP32)
    if stage == "SFT":
        out["activations"] = train_activations(shape, counts, b, T, residual_bytes, lora_on, 1, T,
                                               act)
    elif stage == "discriminator":
        out["activations"] = train_activations(shape, counts, b, T, residual_bytes, lora_on, 1,
                                               act=act)
    elif stage == "reward model":
        out["activations"] = train_activations(shape, counts, 2 * b, T, residual_bytes, lora_on, 1,
                                               act=act)
    else:
        out["activations"] = train_activations(shape, counts, b, T, residual_bytes, lora_on, 2,
                                               R + 1, act)
        block = forward_bytes_per_token(shape, act)
        out["kv_cache"] = kv_cache_bytes(shape, rollout_batch, T, act)
        out["generation"] = out["kv_cache"] + rollout_batch * args.prompt_len * block
        scored = rollout_batch * (R + 1) * shape["vocab"]  # logit values
        out["scoring"] = (act * scored + 3 * min(CHUNK_BYTES, FP32 * scored)
                          + rollout_batch * T * block)
    phases = max(out["activations"], out.get("generation", 0), out.get("scoring", 0))
    out["total"] = out["weights"] + out["gradients"] + out["adamw"] + phases
    # FSDP: states sharded over N GPUs, bf16 compute weights gathered a layer at a time
    n = args.gpus
    out["fsdp_states"] = (trained * (FP32 + FP32 + 2 * FP32) + frozen * frozen_bytes) // n
    layer_trained = counts["layer_lora"] if lora_on else counts["layer"]
    out["fsdp_gathered"] = roots * BF16 + 2 * counts["layer"] * BF16 + layer_trained * FP32
    # the PPO rollout keeps the policy gathered whole, in bf16
    # (ppo_token.rollout: distributed.gathered)
    rollout_policy = (lm + (counts["lora"] if lora_on else 0)) * BF16 if stage == "PPO" else 0
    out["fsdp_phase"] = max(out["activations"], out.get("generation", 0) + rollout_policy,
                            out.get("scoring", 0) + rollout_policy)
    out["fsdp_total"] = out["fsdp_states"] + out["fsdp_gathered"] + out["fsdp_phase"]
    return out


def plans(counts, shape, args, rollout_batch: int) -> list[dict]:
    return [
        plan(stage, lora_on, counts, shape, args, rollout_batch)
        for stage in STAGES
        for lora_on in (False, True)
    ]


def recommend_rollout_batch(counts, shape, args) -> tuple[int, dict, dict | None]:
    """The largest power of two for which PPO with LoRA fits one GPU (and the plan just above
    it)."""
    budget = HEADROOM * args.gpu_memory * GiB
    best, above = None, None
    for batch in (2 ** k for k in range(0, 11)):
        ppo = plan("PPO", True, counts, shape, args, batch)
        if ppo["total"] > budget:
            above = ppo
            break
        best = (batch, ppo)
    if best is None:
        raise SystemExit(
            f"PPO with LoRA does not fit {args.gpu_memory} GiB even with a rollout batch of 1")
    return best[0], best[1], above


# ----------------------------------------------------------------------------------------------
# 4. Tables
# ----------------------------------------------------------------------------------------------
def gib(x) -> str:
    return "–" if x is None else f"{x / GiB:.1f}"


def print_tables(name, counts, shape, args, rollout_batch, rows):
    budget = HEADROOM * args.gpu_memory * GiB
    T = args.prompt_len + args.response_len
    print(f"## Memory plan (computed, not measured): {name}\n")
    print(
        f"{counts['lm'] / 1e9:.3f}B parameters (causal LM), "
        f"{counts['backbone'] / 1e9:.3f}B (backbone + scalar "
        f"head); {shape['layers']} layers, hidden {shape['hidden']}, "
        f"KV width {shape['kv_dim']}, MLP "
        f"{shape['mlp']}, vocabulary {shape['vocab']}. LoRA r={args.lora_rank} on "
        f"{args.lora_targets or 'all linear layers of the decoder blocks'}: "
        f"{counts['lora'] / 1e6:.1f}M "
        f"parameters ({100 * counts['lora'] / counts['lm']:.2f}%)."
    )
    print(
        f"Micro-batch {args.micro_batch} sequences of {T} tokens ({args.prompt_len} prompt + "
        f"{args.response_len} "
        f"response; reward model: {args.micro_batch} pairs), PPO rollout batch {rollout_batch} "
        f"per GPU, gradient "
        f"checkpointing, bf16 autocast, frozen weights {args.frozen_dtype}, trained weights and "
        f"AdamW fp32. "
        f"GiB; fits = total ≤ {HEADROOM:.0%} of {args.gpu_memory:g} GiB.\n"
    )
    print("| stage | training | weights | gradients | AdamW | activations | PPO generation (KV "
          "cache) | PPO scoring | total, 1 GPU | fits |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        generation = f"{gib(r['generation'])} ({gib(r['kv_cache'])})" if "generation" in r else "–"
        print(
            f"| {r['stage']} | {r['method']} | {gib(r['weights'])} | {gib(r['gradients'])} | "
            f"{gib(r['adamw'])} | "
            f"{gib(r['activations'])} | {generation} | {gib(r.get('scoring'))} | "
            f"**{gib(r['total'])}** | "
            f"{'yes' if r['total'] <= budget else 'no'} |"
        )
    print("\nweights: trained fp32 + the bf16 copies autocast caches of them, frozen in "
          "--frozen-dtype; activations: one micro-batch with gradient checkpointing; total = "
          "weights + gradients + AdamW + the largest phase (activations, PPO generation, PPO "
          "scoring). Formulas: python bench/plan_memory.py --help.")
    if args.gpus > 1:
        print(f"\n### FSDP on {args.gpus} GPUs (computed): bytes per GPU\n")
        print("| stage | training | weights + gradients + AdamW ÷ N | gathered (roots, 2 layers, 1 "
              "layer's grads) | largest phase | total per GPU | fits |")
        print("|---|---|---:|---:|---:|---:|---|")
        for r in rows:
            print(
                f"| {r['stage']} | {r['method']} | {gib(r['fsdp_states'])} | "
                f"{gib(r['fsdp_gathered'])} | "
                f"{gib(r['fsdp_phase'])} | **{gib(r['fsdp_total'])}** | "
                f"{'yes' if r['fsdp_total'] <= budget else 'no'} |"
            )


def main(argv=None):
    args = parse_args(argv)
    targets = [t.strip() for t in args.lora_targets.split(",")] if args.lora_targets else None
    config = load_config(args.model)
    try:
        shape, counts = shape_of(config), count_parameters(config, args.lora_rank, targets)
    except ValueError as error:  # e.g. a --lora-targets name the model does not have
        raise SystemExit(f"plan_memory.py: {error}")
    recommended, fitting, above = recommend_rollout_batch(counts, shape, args)
    rollout_batch = args.rollout_batch or recommended
    rows = plans(counts, shape, args, rollout_batch)
    print_tables(args.model, counts, shape, args, rollout_batch, rows)
    print(
        f"\nRecommended PPO rollout batch with LoRA r={args.lora_rank} on one "
        f"{args.gpu_memory:g} GiB GPU: "
        f"{recommended} prompts (total {gib(fitting['total'])} GiB = "
        f"{fitting['total'] / 1e9:.1f} GB, of which KV "
        f"cache {gib(fitting['kv_cache'])} GiB)"
        + (f"; {2 * recommended} would need {gib(above['total'])} GiB." if above else ".")
    )
    if args.json:
        print(
            json.dumps(
                dict(
                    model=args.model,
                    counts=counts,
                    shape=shape,
                    rollout_batch=rollout_batch,
                    rows=rows,
                )
            )
        )


if __name__ == "__main__":
    main()
