"""plumbing/distributed.py — torchrun: DistInfo / setup_distributed, the trained model wrapped
(wrap_model: DDP, or FSDP2 with --fsdp), frozen models prepared (prepare_frozen), gradient
accumulation and clipping, barriers and all-reduces, each rank's share of a batch, and the FSDP2
section (shard_model, gathered, full_state_dict).
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as torch_dist
import torch.nn as nn

import common
import lora
from common import InputError
from plumbing import amp

# FSDP2 (torch >= 2.6); the project runs without it on older torch, --fsdp then says what is missing
try:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    fully_shard = FSDPModule = DTensor = None


# ----------------------------------------------------------------------------------------------
# torchrun and DDP: where this process stands, the trained and the frozen models, batches
# ----------------------------------------------------------------------------------------------
@dataclass
class DistInfo:
    """Where this process stands under torchrun: rank, local rank, world size, device, and whether
    the trained models are sharded (--fsdp with more than one process) or replicated (DDP)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    fsdp: bool = False

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def meta(self) -> bool:
        """Build models on the meta device instead of reading them: under FSDP only rank 0 reads
        the weights."""
        return self.fsdp and not self.master


def resolve_device(device: str = "auto") -> torch.device:
    """--device of a single process as a torch.device: auto = cuda if there is a GPU, else cpu;
    cuda:N keeps its index (checked against the GPUs there are) and cuda alone is the current GPU,
    by its index. A CUDA device becomes the current one, so that whatever is put on "cuda" (a
    library's tensor, torch.cuda's memory counters) lands on the same GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"--device {device!r}: not a device (auto, cpu, cuda, cuda:N)") from None
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA GPU is visible to this process")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise InputError(f"--device {device}: this machine has {count} CUDA device(s), "
                         f"cuda:0 to cuda:{count - 1}")
    dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
    torch.cuda.set_device(dev)
    return dev


def setup_distributed(device: str = "auto", fsdp: bool = False) -> DistInfo:
    """Read RANK / LOCAL_RANK / WORLD_SIZE as torchrun sets them (nanoGPT style).

    NCCL on CUDA, gloo on CPU; under torchrun each rank takes the GPU of its LOCAL_RANK. Without
    torchrun this is a single process on --device (resolve_device: cuda:N is honoured), and --fsdp
    has nothing to shard over: the run is the plain single-process one, with a warning.
    """
    want_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        if want_cuda:
            torch.cuda.set_device(local_rank)
            dev = torch.device("cuda", local_rank)
        else:
            dev = torch.device("cpu")
        if fsdp and fully_shard is None:
            raise InputError(
                "--fsdp needs torch >= 2.6 (FSDP2's fully_shard); "
                f"this is torch {torch.__version__}"
            )
        # (a caller that set up the process group itself keeps it)
        if not torch_dist.is_initialized():
            torch_dist.init_process_group(backend="nccl" if want_cuda else "gloo")
        return DistInfo(rank, local_rank, world_size, dev, fsdp=fsdp)
    if fsdp:
        warnings.warn("--fsdp with one process: nothing to shard over, running unsharded "
                      "(launch with torchrun)", stacklevel=2)
    return DistInfo(device=resolve_device(device))


def cleanup_distributed(dist_info: DistInfo):
    """Wait for every rank, then tear the process group down.

    Gloo's worker threads free a finished collective (and the Python tensors it holds, which needs
    the GIL) just after the collective returns. If the process group's destructor runs first (it
    holds the GIL, e.g. when the DDP wrapper is freed as main() returns), the two wait on each other
    for ever. Sleeping a moment hands the GIL to the workers so they finish first.
    """
    if dist_info.enabled and torch_dist.is_initialized():
        torch_dist.barrier()
        if torch_dist.get_backend() == "gloo":
            time.sleep(0.5)
        torch_dist.destroy_process_group()


def barrier():
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()


def all_reduce_sum(values, dist_info: DistInfo) -> torch.Tensor:
    """Element-wise sum over ranks of a number, a list of numbers or a tensor: float64, on the CPU.
    Pass several counters in one list to pay for one all-reduce."""
    tensor = torch.as_tensor(values, dtype=torch.float64).detach().clone().to(dist_info.device)
    if dist_info.enabled:
        torch_dist.all_reduce(tensor)
    return tensor.cpu()


def all_reduce_mean(value, dist_info: DistInfo) -> float:
    """Mean of a scalar over ranks (a plain float back)."""
    return all_reduce_sum(value, dist_info).item() / dist_info.world_size


def wrap_model(model: nn.Module, dist_info: DistInfo, precision="auto") -> nn.Module:
    """The trained model on this rank's device, data parallel over the ranks: replicated (DDP), or
    sharded (FSDP2, --fsdp: see shard_model; a bf16 `precision` then picks the bf16 mixed-precision
    policy, on CUDA and, since FSDP2 supports it with gloo, on CPU). The model itself in a single
    process. Call it before building the optimizer (FSDP replaces the parameters)."""
    if dist_info.fsdp:
        mixed_precision = amp.use_bf16(precision, dist_info.device)
        return shard_model(model, dist_info, mixed_precision=mixed_precision)
    model = model.to(dist_info.device)
    if not dist_info.enabled:
        return model
    ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def prepare_frozen(model: nn.Module, dist_info: DistInfo, offload: bool = False,
                   precision="fp32") -> nn.Module:
    """A model that is only read (PPO's reference, reward model, discriminator): eval mode, no
    gradients, dropout off; on this rank's device (the CPU with offload), or sharded like the
    trained ones under FSDP. It computes the way the trained models do (the precision section): one
    process or DDP, bf16 weights upcast layer by layer (compute_in_fp32); FSDP, the trained models'
    mixed-precision policy (bf16 weights all-gathered and used in bf16, which the bf16-rounded
    policy then shares exactly)."""
    model = common.disable_dropout(model).eval().requires_grad_(False)
    if dist_info.fsdp:
        if offload:
            raise InputError("--offload-frozen and --fsdp do not go together: FSDP already spreads "
                             "the frozen models over the ranks")
        mixed_precision = amp.use_bf16(precision, dist_info.device)
        return shard_model(model, dist_info, mixed_precision=mixed_precision)
    return amp.compute_in_fp32(model.to("cpu" if offload else dist_info.device))


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself: FSDP shards in
    place)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def accumulate(models, last: bool):
    """Gradient accumulation: DDP skips the all-reduce of gradients except on a step's last
    micro-batch. Call the micro-batch's forward and backward inside this block.

    FSDP reduce-scatters after every micro-batch instead: its gradients then stay sharded (1/N of
    them per rank). Skipping the sync (FSDP's set_requires_gradient_sync(False)) would keep a full,
    unsharded fp32 gradient on every rank until the last micro-batch, 4 bytes per parameter: the
    memory FSDP is there to save. The accumulated gradient is the same (an average of sums is a sum
    of averages).
    """
    stack = contextlib.ExitStack()
    for model in (models if isinstance(models, (list, tuple)) else [models]):
        if not last and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            stack.enter_context(model.no_sync())
    return stack


def micro_batches(examples: list, size: int) -> list[list]:
    return [examples[i: i + size] for i in range(0, len(examples), size)]


def rank_batches(examples: list, size: int, dist_info: DistInfo) -> list[tuple[list, float]]:
    """This rank's share of `examples` (every world_size-th) in micro-batches of `size`, as
    (micro-batch, weight) pairs for an evaluation loop to add up weight × its sums. The weight is 1,
    except under FSDP: every forward of a sharded model is a collective (it all-gathers weights), so
    every rank must run as many; a rank with fewer micro-batches repeats a real one with weight 0
    (computed, not counted)."""
    batches = [
        (chunk, 1.0)
        for chunk in micro_batches(examples[dist_info.rank :: dist_info.world_size], size)
    ]
    if dist_info.fsdp and examples:
        # rank 0's count, the largest
        most = math.ceil(math.ceil(len(examples) / dist_info.world_size) / size)
        batches += [(examples[:1], 0.0)] * (most - len(batches))
    return batches


def check_batch_size(batch_size: int, dist_info: DistInfo, what: str = "--batch-size"):
    """Every rank needs a share of the global batch; under FSDP an equal one (each micro-batch is a
    collective)."""
    if batch_size < dist_info.world_size:
        raise InputError(
            f"{what} {batch_size} is smaller than the {dist_info.world_size} processes")
    if dist_info.fsdp and batch_size % dist_info.world_size:
        raise InputError(
            f"{what} {batch_size}: with --fsdp it must be a multiple of the {dist_info.world_size} "
            "processes (every rank runs as many forward passes)"
        )


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip the gradient norm to max_norm (0 = off); return the norm before clipping. Under FSDP the
    gradients are DTensor shards: torch reduces the norm over the ranks and every rank scales its
    shard by the same factor; the norm comes back as a DTensor, made a number here."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None],
                                          max_norm if max_norm > 0 else float("inf"))
    if DTensor is not None and isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


# ----------------------------------------------------------------------------------------------
# FSDP2: shard models that outgrow one GPU
# ----------------------------------------------------------------------------------------------
# DDP keeps a full copy of every weight, gradient and AdamW state on every GPU (16 bytes per trained
# parameter), so more GPUs buy speed, not room. FSDP (fully sharded data parallel) cuts each of them
# into world_size pieces, one per rank. Before a decoder layer runs, its pieces are all-gathered
# into the full weights, which are freed again right after (in the forward, and once more in the
# backward); gradients are reduce-scattered, each rank receiving the average of its own piece. So a
# rank holds 1/N of the training state plus one layer's full weights at a time. The maths of a step
# is that of DDP and of one process with the same global batch (tests/test_fsdp.py checks it to
# 1e-4).
#
# --fsdp reaches this section through the functions the stages already call:
#   wrap_model          shard_model: each decoder layer (the model's own _no_split_modules), then
#                       the root; with --precision bf16 (CUDA, or CPU with gloo) mixed precision:
#                       bf16 weights for compute, fp32 gradient reduction;
#                       activation checkpointing is switched on before
#                       (enable_gradient_checkpointing)
#   prepare_frozen      the frozen models (reference, reward model, discriminator) are sharded too
#   hf_models.load_*(meta=...)  rank 0 reads the weights; the other ranks build the model on the
#                       meta device; shard_model sends them their pieces (host memory: shard_model)
#   accumulate, clip_grad_norm, rank_batches    gradient accumulation, clipping, equal forward
#                                               counts
#   checkpoint.save_checkpoint / load_checkpoint    every rank writes and reads its own shards (DCP)
#   hf_models.save_policy / save_score_model    full_state_dict: gathered to rank 0, LoRA merged
# and in ppo_token.py: gathered (the policy stays whole during the rollout), on_every_rank
# (generation stops when every rank is done).
# Rules that come with it: every rank runs the same sequence of forwards, backwards and state-dict
# calls on a sharded model (each is a collective); frozen models are not offloaded to the CPU.
# LoRA and FSDP together: the frozen base and the trained adapters are sharded alike (FSDP accepts a
# bf16 base beside fp32 adapters in one layer: only the trained parameters must share a dtype).


def is_sharded(model: nn.Module) -> bool:
    return FSDPModule is not None and isinstance(model, FSDPModule)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules sharded one by one: those of a class the model lists in _no_split_modules
    (GPT2Block, LlamaDecoderLayer, ...: Hugging Face's name for the blocks that must stay whole),
    the outermost ones."""
    names = {
        name
        for module in model.modules()
        for name in (getattr(module, "_no_split_modules", None) or [])
    }
    if not names:  # (every Hugging Face transformer lists them; also found inside a ScoreModel)
        raise ValueError(
            f"{type(model).__name__} names no decoder layer class (_no_split_modules): "
            "--fsdp shards a Hugging Face transformer layer by layer"
        )
    layers, inside = [], []
    for name, module in model.named_modules():
        if type(module).__name__ in names and not any(
            name.startswith(prefix + ".") for prefix in inside
        ):
            layers.append(module)
            inside.append(name)
    return layers


def shard_model(model: nn.Module, dist_info: DistInfo, mixed_precision: bool = False) -> nn.Module:
    """fully_shard each decoder layer, then the root (embeddings, final norm, heads: what is left),
    and give every rank its pieces of rank 0's weights. Changed in place: the class becomes
    FSDP<Class>, every parameter a DTensor holding this rank's piece.

    Each fully_shard call makes one unit that is all-gathered together just before it runs; layer by
    layer keeps one layer's full weights in memory at a time. reshard_after_forward=True for the
    root too: a frozen model runs under no_grad and never reaches the backward where a root left
    whole would be freed. mixed_precision (--precision bf16; CUDA, and CPU with gloo): weights
    all-gathered and used in bf16 (half the traffic), gradients reduced in fp32, the sharded fp32
    weights stepped by AdamW in fp32.

    Weights come from rank 0. The other ranks may have built the model on the meta device
    (load_policy, load_score_model, new_score_model with meta=True) instead of reading it: they
    allocate their pieces only, and rank 0 sends each tensor in turn (broadcast_from_rank0), each
    rank keeping its piece. Non-persistent buffers (Llama's rotary inv_freq) are in no state dict,
    so they are broadcast apart.
    Host memory for W bytes of weights on N ranks: rank 0 peaks at W + W/N (the model it read and
    its piece), every other rank at W/N plus the largest single tensor in transit, instead of
    W + W/N on every rank. Measured on 2 gloo ranks, growth of the peak RSS while loading and
    sharding a GPT-2 of 55 M parameters (210 MiB fp32, 16 layers, largest tensor 16 MiB;
    bench/bench_fsdp_load.py): rank 1 123 MiB instead of 239, rank 0 319 either way. When one
    tensor is most of the model (a 50k vocabulary on a 51 M model: 98 MiB of 196) it travels whole
    and little is saved (197 instead of 209 MiB). For a 7B model (28 GB fp32, largest tensor
    0.5 GB) on 8 ranks: ~32 GB on rank 0 and ~4 GB on each other rank, ~60 GB for the node instead
    of ~250 GB.
    Fresh heads and LoRA adapters come from rank 0 the same way, so every rank starts from the same
    ones.
    """
    # FSDP warns about every model output that is a view (a ScoreModel's squeeze) in case the caller
    # modifies it in place, which would skip a hook; no code here does
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(dist_info.device.type, (dist_info.world_size,))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision
        else MixedPrecisionPolicy()
    )
    on_meta = any(p.is_meta for p in model.parameters())
    rank0_weights = (
        model.state_dict() if dist_info.master else {}
    )  # references to the loaded tensors, no copy
    if not on_meta:
        model.to(dist_info.device)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    if on_meta:
        # this rank's pieces and the buffers, not yet filled
        model.to_empty(device=dist_info.device)
    set_model_state_dict(model, rank0_weights,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del rank0_weights
    for buffer in model.buffers():
        torch_dist.broadcast(buffer.data, src=0)
    return model


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Under FSDP: keep a model's full weights from its first forward in this block to the end of
    the block, then reshard. Nothing otherwise. (Memory: the whole model on every rank meanwhile, as
    DDP.)"""
    model = unwrap(model)
    if not is_sharded(model):
        yield model
        return
    model.set_reshard_after_forward(False)  # every sharded layer
    try:
        yield model
    finally:
        model.set_reshard_after_forward(True)
        for module in model.modules():  # free the full weights now
            if is_sharded(module):
                module.reshard()


def on_every_rank(flag: bool, device: torch.device) -> bool:
    """True when `flag` is True on every rank (one all-reduce of a number; the flag itself in one
    process)."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return flag
    value = torch.tensor([int(flag)], device=device)  # on the rows' device: NCCL wants CUDA tensors
    torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MIN)
    return bool(value.item())


def _rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_available() and torch_dist.is_initialized() else 0


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0's CPU ({} on the other ranks), LoRA adapters merged in:
    W' = W + (α/r)·B·A for every adapted layer, in fp32, no adapter tensors left
    (lora.merged_state_dict). Every rank calls it. Under FSDP the shards are gathered one tensor at
    a time and moved to the CPU, so no GPU ever holds the whole model; rank 0's host memory holds
    one full copy."""
    model = unwrap(model)
    if is_sharded(model):
        state = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # a tied weight (GPT-2's lm_head = wte) comes back under both names: keep the first, as
        # state_dict()
        first = {}
        for name, parameter in model.named_parameters(remove_duplicate=False):
            if first.setdefault(id(parameter), name) != name:
                state.pop(name, None)
    else:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()} if _rank() == 0 else {}
    if state and lora.lora_layers(
        model
    ):  # merged in fp32: a bf16 base would round small changes away
        state = lora.merged_state_dict(
            model, {k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return state


def frozen_copy(linear: nn.Linear) -> nn.Linear:
    """A frozen, unsharded fp32 copy of a linear layer (a score head) on every rank (FSDP:
    all-gathered)."""
    weight, bias = (
        None if t is None else (t.full_tensor() if isinstance(t, DTensor) else t).detach().float()
        for t in (linear.weight, linear.bias)
    )
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device)
    with torch.no_grad():
        head.weight.copy_(weight)
        if bias is not None:
            head.bias.copy_(bias)
    return head.requires_grad_(False)
