"""LoRA, written out: train a low-rank change of the linear layers of a frozen model (no peft).

Low-Rank Adaptation (Hu et al., 2021, arXiv 2106.09685). A linear layer y = W·x + b keeps its
weight W [out, in] frozen and learns a change of rank r:

    y = W·x + b + (α/r)·B·A·x          A [r, in], B [out, r], r ≪ min(in, out)

- A starts Kaiming-uniform (the way nn.Linear initialises a weight), B starts at 0. So B·A = 0 and
  the adapted model starts exactly at the base model: in RLHF the KL to the reference starts at 0.
- The scale α/r: with α fixed, doubling r halves the scale, so the first updates move y by about
  the same amount at any rank and a learning rate tuned at one rank works at another (Hu et al.
  §4.1). Default α = 32 (see add_lora_args).
- Only A and B are trained. Llama-2-7B with r = 64 on all 7 linear layers of its 32 blocks trains
  160M parameters (2.4%); gradients and AdamW states exist for those only
  (bench/plan_memory.py prints the bytes).

How the RL stages use it:
- the reference policy is the policy with its adapters switched off (`adapters_disabled`), so no
  second copy of the base model is kept;
- the critic is a LoRA on the reward model's backbone plus a trainable value head; the reward is
  read from the same backbone with the critic's adapters switched off;
- the final model is saved merged, W' = W + (α/r)·B·A, as an ordinary Hugging Face model
  (`save_merged`); checkpoints hold only what is trained (`trainable_state_dict`).

dtypes. Frozen base weights may be bf16 while A, B and their AdamW states are fp32. The adapter
branch casts its input to the adapters' dtype and its result back to the dtype of the base output,
so it runs with a bf16 base, on CPU in fp32, and under torch.autocast on CUDA (which then does
the matmuls in bf16 and keeps the fp32 adapters as master weights). Add the adapters *after*
casting the base (`model.to(torch.bfloat16)` after add_lora would make the adapters bf16 too).
Merging is computed in fp32 into a new tensor and never in place: adding and later subtracting
B·A in a bf16 weight rounds twice, and the base drifts a little every time.

Usage:
    import lora
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)  # the frozen base
    names = lora.add_lora(model, rank=64, alpha=32)   # every q/k/v/o/gate/up/down of every block
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ...                                               # train: only lora_A, lora_B get gradients
    with torch.no_grad(), lora.adapters_disabled(model):
        ref_logits = model(input_ids).logits          # the base model = the reference policy
    torch.save(lora.trainable_state_dict(model), "checkpoint.pt")   # a few hundred MB, not 13 GB
    lora.save_merged(model, tokenizer, "out/policy")  # AutoModelForCausalLM.from_pretrained
                                                      # loads it
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

DEFAULT_ALPHA = 32.0


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank change: y = W·x + b + (α/r)·B·A·x.

    Wraps nn.Linear (weight [out, in], y = x·Wᵀ + b) or transformers' Conv1D, which GPT-2 uses
    for its attention and MLP layers (weight stored transposed, [in, out], y = x·W + b). The base
    weight and bias become this module's own (frozen) `weight` and `bias`, so the base model's
    state-dict keys do not change ("h.0.attn.c_attn.weight" stays that); the adapter adds
    "h.0.attn.c_attn.lora_A" and "...lora_B".
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 adapter_dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise TypeError(
                f"LoRALinear wraps nn.Linear or transformers Conv1D, not {type(base).__name__}")
        self.transposed = isinstance(base, Conv1D)  # Conv1D: weight [in, out]
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.in_features, self.out_features = (
            base.weight.shape if self.transposed else base.weight.shape[::-1]
        )
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank  # α/r
        device = base.weight.device
        self.lora_A = nn.Parameter(  # [r, in]
            torch.empty(rank, self.in_features, device=device, dtype=adapter_dtype))
        self.lora_B = nn.Parameter(  # [out, r]
            torch.zeros(self.out_features, rank, device=device, dtype=adapter_dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init: U(±1/√in)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # False inside adapters_disabled(...): the layer is the base layer, bit for bit
        self.enabled = True

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """W·x + b, computed exactly the way the wrapped module computes it (same kernels, same
        bits)."""
        if self.transposed:  # transformers Conv1D.forward: b + x·W on the flattened tokens
            y = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)  # nn.Linear.forward: x·Wᵀ + b

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        y = self.base_forward(x)
        if not self.enabled:
            return y
        h = self.dropout(x).to(self.lora_A.dtype)  # the adapter works in its own dtype (fp32)
        delta = F.linear(F.linear(h, self.lora_A), self.lora_B)  # B·A·x: [..., r] then [..., out]
        # + (α/r)·B·A·x, back in the base output's dtype
        return y + (self.scale * delta).to(y.dtype)

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.transposed else "Linear"
        return (
            f"{kind}(in={self.in_features}, out={self.out_features}), rank={self.rank}, "
            f"alpha={self.alpha}, "
            f"enabled={self.enabled}"
        )


@torch.no_grad()
def merge_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
                 transposed: bool = False) -> torch.Tensor:
    """W' = W + (α/r)·B·A, computed in fp32 and returned in W's dtype, as a new tensor.
    weight [out, in] (nn.Linear) or [in, out] (Conv1D, transposed=True); lora_A [r, in]; lora_B
    [out, r]."""
    delta = scale * (lora_B.float() @ lora_A.float())  # [out, in]
    if transposed:
        delta = delta.t()  # Conv1D stores [in, out]
    return (weight.float() + delta).to(weight.dtype)


# ----------------------------------------------------------------------------------------------
# Finding the layers: decoder blocks by type, linear layers inside them
# ----------------------------------------------------------------------------------------------
def decoder_block_types(model: nn.Module) -> set[str]:
    """Class names of the model's decoder blocks, from Hugging Face's `_no_split_modules`
    (GPT2Block, LlamaDecoderLayer, Qwen2DecoderLayer, MistralDecoderLayer, ...). Also found on a
    submodule, so a wrapper holding a backbone (e.g. common.ScoreModel) works."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(
            f"{type(model).__name__} does not name its decoder block class (_no_split_modules); "
            f"LoRA needs a Hugging Face transformer"
        )
    return names


def block_linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Linear / Conv1D inside a decoder block, by its full module name (in model order)."""
    block_types = decoder_block_types(model)
    layers = {}
    for block_name, block in model.named_modules():
        if type(block).__name__ not in block_types:
            continue
        for name, module in block.named_modules():
            if isinstance(module, (nn.Linear, Conv1D)):
                layers[f"{block_name}.{name}"] = module
    if not layers:
        raise ValueError(
            f"no decoder block ({', '.join(sorted(block_types))}) with linear layers in "
            f"{type(model).__name__}"
        )
    return layers


def matches(name: str, target: str) -> bool:
    """`target` is a dotted suffix of the module name: 'q_proj' and 'self_attn.q_proj' match
    'model.layers.0.self_attn.q_proj'; 'proj' does not."""
    return name == target or name.endswith("." + target)


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [
        (name, module) for name, module in model.named_modules() if isinstance(module, LoRALinear)
    ]


# ----------------------------------------------------------------------------------------------
# Adding, switching off, merging, saving
# ----------------------------------------------------------------------------------------------
def add_lora(model: nn.Module, rank: int, alpha: float = DEFAULT_ALPHA,
             targets: list[str] | None = None, dropout: float = 0.0,
             adapter_dtype: torch.dtype = torch.float32) -> list[str]:
    """Wrap the linear layers of the decoder blocks in LoRALinear; freeze every other parameter.

    targets: None = every nn.Linear / Conv1D inside the decoder blocks (embeddings, the final norm
    and the LM head are outside the blocks and stay frozen); else only the layers whose name ends
    with one of them ("q_proj", "self_attn.v_proj", "c_attn", "mlp.c_proj"). Works on a causal LM,
    on a bare backbone (AutoModel, no LM head), and on a model built on the meta device. Call it on
    the backbone of a model with a head you want to train (common.ScoreModel: model.backbone),
    since every parameter of `model` other than the adapters is frozen here.
    Returns the names of the wrapped modules.
    """
    if rank < 1:
        raise ValueError(
            f"LoRA rank must be >= 1 (got {rank}); rank 0 means full fine-tuning: don't call "
            "add_lora"
        )
    if alpha <= 0:
        raise ValueError(f"LoRA alpha must be > 0 (got {alpha})")
    if lora_layers(model):
        raise ValueError(f"{type(model).__name__} already has LoRA adapters")
    layers = block_linear_layers(model)
    chosen = list(layers)
    if targets:
        for target in targets:
            if not any(matches(name, target) for name in layers):
                suffixes = sorted(set(_suffixes_in_block(layers)))
                raise ValueError(
                    f"--lora-targets: {target!r} matches no linear layer of the decoder blocks; "
                    f"their names end with: {', '.join(suffixes)}"
                )
        chosen = [name for name in layers if any(matches(name, t) for t in targets)]
    model.requires_grad_(False)
    for name in chosen:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, LoRALinear(layers[name], rank, alpha, dropout, adapter_dtype))
    return chosen


def _suffixes_in_block(layers: dict[str, nn.Module]) -> list[str]:
    """'model.layers.3.self_attn.q_proj' -> 'self_attn.q_proj' (the name inside its block), for
    error messages."""
    out = []
    for name in layers:
        parts = name.split(".")
        digits = [i for i, part in enumerate(parts) if part.isdigit()]
        out.append(".".join(parts[digits[-1] + 1:]) if digits else name)
    return out


def add_lora_from_args(model: nn.Module, args) -> list[str]:
    """add_lora with --lora-rank/--lora-alpha/--lora-targets; nothing (full fine-tuning) when the
    rank is 0."""
    if args.lora_rank == 0:
        return []
    return add_lora(model, args.lora_rank, args.lora_alpha, args.lora_targets)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside this block every adapter of `model` is off: the model computes its base exactly
    (the reference policy, the reward read from a critic's backbone). Restores each adapter's
    previous state on exit, so blocks nest. Do not switch adapters between a forward pass and its
    backward under gradient checkpointing (the recomputed forward would differ)."""
    layers = [layer for _, layer in lora_layers(model)]
    previous = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, previous):
            layer.enabled = enabled


@torch.no_grad()
def merged_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None,
                      device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """The state dict of the merged model under the original key names, no LoRA tensors:
    each wrapped weight replaced by W + (α/r)·B·A (computed in fp32, stored in W's dtype).
    The model's own weights are not modified.

    state: the state dict to merge, default model.state_dict(); under FSDP pass the gathered full
    one (same keys). device (e.g. "cpu"): where each merged weight goes as soon as it is computed,
    to spare GPU memory; the other tensors are returned as they are (shared, not copied).
    """
    state = model.state_dict() if state is None else state
    merged = {}
    for name, layer in lora_layers(model):
        weight = merge_weight(state[f"{name}.weight"], state[f"{name}.lora_A"],
                              state[f"{name}.lora_B"], layer.scale, layer.transposed)
        merged[f"{name}.weight"] = weight if device is None else weight.to(device)
    return {
        key: merged.get(key, value)
        for key, value in state.items()
        if not key.endswith((".lora_A", ".lora_B"))
    }


def save_merged(model: nn.Module, tokenizer, out_dir: str | Path,
                device: torch.device | str | None = "cpu"):
    """Save a LoRA model merged as a plain Hugging Face model (+ tokenizer, if given) into out_dir;
    AutoModelForCausalLM.from_pretrained (or AutoModel for a backbone) loads it, no LoRA code
    needed. Tied weights (GPT-2's lm_head = wte) are outside the blocks, untouched, and saved
    once."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, state_dict=merged_state_dict(model, device=device))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What is trained, for cheap checkpoints: every parameter with requires_grad (after add_lora:
    the LoRA factors, plus a head left trainable such as a critic's value head)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor]):
    """Copy what trainable_state_dict saved back into the model (in place). The keys must be
    exactly the model's trainable parameters: a checkpoint of another rank, targets or head
    fails."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"trained state does not match the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]} (same --lora-rank/--lora-targets?)")
    for name, p in params.items():
        if state[name].shape != p.shape:
            raise ValueError(f"trained state: {name} has shape {tuple(state[name].shape)}, "
                             f"the model {tuple(p.shape)} (same --lora-rank?)")
        p.copy_(state[name])


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def comma_list(text: str) -> list[str]:
    """'q_proj, v_proj' -> ['q_proj', 'v_proj']"""
    return [part.strip() for part in text.split(",") if part.strip()]


def add_lora_args(parser):
    """--lora-rank, --lora-alpha, --lora-targets on a training stage's argparse parser."""
    group = parser.add_argument_group("LoRA")
    group.add_argument("--lora-rank", type=int, default=0,
                       help="rank r of the LoRA adapters; 0 = full fine-tuning (every weight "
                            "trained)")
    group.add_argument("--lora-alpha", type=float, default=DEFAULT_ALPHA,
                       help="α of the LoRA scale α/r. Kept fixed when r changes, so a learning "
                            "rate tuned at one rank carries over (Hu et al. 2021 §4.1); 32 as in "
                            "Schulman et al. 2025 'LoRA Without Regret', who find LoRA's best "
                            "learning rate about 10x full fine-tuning's")
    group.add_argument("--lora-targets", type=comma_list, default=None,
                       help="comma-separated module-name suffixes to adapt, e.g. q_proj,v_proj "
                            "(Llama) or c_attn (GPT-2); default: every linear layer of the decoder "
                            "blocks")
    return group


def check_lora_args(parser, args):
    """One-line errors for bad LoRA flags (call after parse_args)."""
    if args.lora_rank < 0:
        parser.error(f"--lora-rank must be >= 0 (0 = full fine-tuning), got {args.lora_rank}")
    if args.lora_alpha <= 0:
        parser.error(f"--lora-alpha must be > 0, got {args.lora_alpha}")
    if args.lora_targets is not None and args.lora_rank == 0:
        parser.error("--lora-targets needs --lora-rank > 0")
