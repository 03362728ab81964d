"""plumbing/amp.py — --precision, one flag with the same meaning in every stage: bf16
autocast, the dtype frozen weights are stored in, and the rule that a frozen model computes the way
a trained one does (compute_in_fp32, round_like_frozen).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from common import ScoreModel

# ----------------------------------------------------------------------------------------------
# Precision: one flag, the same meaning in every stage
# ----------------------------------------------------------------------------------------------
# --precision bf16 is the path every GPU run takes, and it runs on the CPU too (torch.autocast has a
# CPU bf16 kernel set), so the tests exercise it:
#   trained weights, their gradients and AdamW states   fp32 ("master weights")
#   matmuls of the forward and backward                  bf16, by torch.autocast (fp32 accumulation)
#   frozen weights (reference, reward model,             stored in bf16 (--frozen-dtype auto)
#     discriminator, a LoRA base)
#   scalar heads (reward, discriminator logit, value)    fp32, outside autocast (common.ScoreModel)
#   log-probs, losses, rewards, advantages               fp32 (the logits are upcast before
#                                                        log_softmax)
# One design rule keeps PPO exact at its first iteration: a frozen model computes the way a trained
# model computes. A bf16-stored model run as it is keeps its residual stream, embeddings and norms
# in bf16, while the fp32 policy under autocast keeps them in fp32: the log-probs differ by bf16
# noise, KL is not 0 at iteration 0 and the KL penalty rewards noise. So a bf16 frozen model is
# *stored* in bf16 but run with each layer's weights upcast to fp32 for the duration of that
# layer's call (compute_in_fp32: one small layer's fp32 copy at a time), and PPO starts the policy
# at the bf16 values of its weights (round_like_frozen), the point the reference stores. The two
# then run the same arithmetic on the same numbers, and KL = 0, ratio = 1 hold at iteration 0 in
# bf16 as they do in fp32 (tests/test_precision.py). Under FSDP the same rule holds through the
# sharding: see prepare_frozen.
PRECISIONS = ("auto", "fp32", "bf16")


def add_precision_args(group):
    group.add_argument("--precision", default="auto", choices=PRECISIONS,
                       help="bf16: bf16 autocast, frozen models stored in bf16, trained weights, "
                            "heads and optimizer states in fp32 (the GPU path; runs on the CPU "
                            "too); fp32: everything in fp32; auto: bf16 on CUDA, fp32 on CPU")
    group.add_argument("--no-bf16", dest="precision", action="store_const", const="fp32",
                       help="the same as --precision fp32 (kept for older command lines)")
    group.add_argument("--frozen-dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                       help="storage dtype of the weights that are never trained (a LoRA base; "
                            "PPO's reference, reward model and discriminator); auto: bfloat16 when "
                            "--precision is bf16, else float32")
    return group


def use_bf16(precision, device: torch.device) -> bool:
    """Whether a run of --precision `precision` computes in bf16 on `device` (auto: on CUDA only).
    (True / False are read as auto / fp32: the meaning of the older bf16 switch.)"""
    if isinstance(precision, bool):
        precision = "auto" if precision else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: one of {', '.join(PRECISIONS)}")
    return precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda")


def autocast(device: torch.device, precision="auto"):
    """bf16 autocast where --precision asks for it (auto: on CUDA), on CUDA and CPU alike; else
    no-op."""
    device = torch.device(device)
    if use_bf16(precision, device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _upcast_params(module, _inputs):
    for param in module.parameters(recurse=False):
        if param.dtype == torch.bfloat16:
            param.data = param.data.float()


def _downcast_params(module, _inputs, _output):
    for param in module.parameters(recurse=False):
        if param.dtype == torch.float32:
            param.data = param.data.to(torch.bfloat16)  # exact: these values came from bf16


def compute_in_fp32(model: nn.Module) -> nn.Module:
    """A frozen bf16-stored model that computes like an fp32 model: each module that owns bf16
    weights (a linear, an embedding, a norm) gets them as fp32 for its own call and bf16 again right
    after (both casts exact). Under autocast the matmuls still run in bf16; embeddings, norms and
    the residual stream in fp32, as in the trained fp32 models. For frozen models run under no_grad
    only (not a LoRA base)."""
    if getattr(model, "_computes_in_fp32", False) or not any(
        p.dtype == torch.bfloat16 for p in model.parameters()
    ):
        return model
    for module in model.modules():
        if any(p.dtype == torch.bfloat16 for p in module.parameters(recurse=False)):
            module.register_forward_pre_hook(_upcast_params)
            module.register_forward_hook(_downcast_params)
    model._computes_in_fp32 = True
    return model


@torch.no_grad()
def round_like_frozen(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Round a trained model's fp32 weights to the values a frozen copy stored in `dtype` holds
    (bf16), so that PPO's policy starts exactly at its bf16 reference (a change below bf16's 3
    significant digits, the rounding every frozen copy already makes). Nothing for fp32."""
    if dtype != torch.float32:
        for param in model.parameters():
            if param.dtype == torch.float32:
                param.copy_(param.to(dtype))
    return model


def frozen_dtype(args, device: torch.device) -> torch.dtype:
    """--frozen-dtype as a torch dtype (auto: bfloat16 when the run computes in bf16, float32
    otherwise)."""
    if args.frozen_dtype == "auto":
        return torch.bfloat16 if use_bf16(args.precision, device) else torch.float32
    return getattr(torch, args.frozen_dtype)


def base_dtype(args, device: torch.device) -> torch.dtype:
    """The dtype to load a model to train in: float32, or --frozen-dtype when LoRA freezes it
    (--lora-rank > 0)."""
    return frozen_dtype(args, device) if getattr(args, "lora_rank", 0) else torch.float32


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A loaded model in the frozen dtype, a ScoreModel's scalar head kept fp32."""
    model = model.to(dtype)
    if isinstance(model, ScoreModel):
        model.head.float()
    return model
