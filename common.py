"""Plumbing shared by every stage: data, tokenizers and models, distributed setup, checkpoint I/O.

Nothing in here is an RLHF algorithm; those live, written out, in their own stage files
(sft.py, label.py, discriminator.py, redistribute.py, ppo_token.py, eval.py). This module only
holds what three or more stages would otherwise copy:

    data      load_pairs, split_pairs, encode_prompt_response, pad_left / pad_right,
              global_batch (the seeded, resumable data order of one optimizer step)
    models    build_tiny, load_tokenizer, load_policy, ScoreModel (backbone + one scalar per token)
    system    setup_distributed, autocast, seed_everything, cosine schedule
    files     atomic_write, save_hf, save_checkpoint / load_checkpoint, JsonlLogger,
              save_training_state / resume_training_state (model + optimizer + schedule + step)
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import math
import os
import random
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

REPO_ROOT = Path(__file__).resolve().parent
BUNDLED_DATA = REPO_ROOT / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
ASSISTANT_TAG = "\n\nAssistant:"  # the prompt ends with the last occurrence of this tag
HH_RLHF_URL = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main"
HH_RLHF_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")


def _quiet_transformers():
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


class DataError(ValueError):
    """Bad input data; the message names the file and line."""


# ----------------------------------------------------------------------------------------------
# Data: hh-rlhf pairs
# ----------------------------------------------------------------------------------------------
@dataclass
class Pair:
    """One preference pair. `prompt` ends with "\\n\\nAssistant:"; responses follow it."""

    prompt: str
    chosen: str
    rejected: str
    id: str = ""  # stable content hash, set by load_pairs

    def __post_init__(self):
        if not self.id:
            digest = hashlib.sha256(f"{self.prompt}\x00{self.chosen}\x00{self.rejected}".encode())
            self.id = digest.hexdigest()[:16]


def split_dialogue(text: str) -> tuple[str, str]:
    """Split an hh-rlhf dialogue into (prompt, response) at the last "\\n\\nAssistant:"."""
    cut = text.rfind(ASSISTANT_TAG)
    if cut < 0:
        return "", text
    cut += len(ASSISTANT_TAG)
    return text[:cut], text[cut:]


def _open_text(path: Path):
    if str(path).endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a .jsonl or .jsonl.gz file; a malformed line raises DataError naming file and line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    rows = []
    with _open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {line_no}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {line_no}: expected a JSON object")
            rows.append(row)
    return rows


def row_to_pair(row: dict, where: str) -> tuple[Pair | None, str]:
    """Turn one JSON row into a Pair, or (None, reason) for a row to skip.

    Two forms are accepted: hh-rlhf ({"chosen", "rejected"}: whole dialogues) and full-hh-rlhf
    ({"prompt", "chosen", "rejected"}: the prompt apart, responses alone). Missing fields raise.
    """
    for key in ("chosen", "rejected"):
        if not isinstance(row.get(key), str):
            raise DataError(f"{where}: field {key!r} missing or not a string")
    if "prompt" in row:
        if not isinstance(row["prompt"], str):
            raise DataError(f"{where}: field 'prompt' is not a string")
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
        # full-hh-rlhf responses carry no leading space; hh-rlhf ones do. Normalise to hh-rlhf.
        if prompt.rstrip().endswith("Assistant:"):
            prompt = prompt.rstrip()
            chosen = chosen if chosen.startswith(" ") else " " + chosen
            rejected = rejected if rejected.startswith(" ") else " " + rejected
    else:
        prompt, chosen = split_dialogue(row["chosen"])
        prompt_r, rejected = split_dialogue(row["rejected"])
        if prompt != prompt_r:
            return None, "prompts of chosen and rejected differ"
    if not prompt:
        return None, "no '\\n\\nAssistant:' turn"
    if not chosen.strip() or not rejected.strip():
        return None, "empty response"
    return Pair(prompt, chosen, rejected), ""


def load_pairs(source: str | Path = BUNDLED_DATA, cache_dir: str | Path | None = None,
               limit: int | None = None, quiet: bool = False) -> list[Pair]:
    """Load preference pairs from a local .jsonl(.gz) file or the name "hh-rlhf".

    Rows that cannot be a pair (empty response, chosen and rejected prompts that differ) are
    skipped and counted, with one warning that says how many and why. "hh-rlhf" or
    "hh-rlhf:SUBSET[,SUBSET]" downloads Anthropic's train files (see download_hh_rlhf).
    """
    source = str(source)
    if source == "bundled":
        paths = [BUNDLED_DATA]
    elif source.startswith("hh-rlhf") and not Path(source).exists():
        subsets = source.split(":", 1)[1].split(",") if ":" in source else list(HH_RLHF_SUBSETS)
        paths = [download_hh_rlhf(s, "train", cache_dir) for s in subsets]
    else:
        paths = [Path(source)]
    pairs, skipped = [], {}
    for path in paths:
        for line_no, row in enumerate(read_jsonl(path), start=1):
            pair, reason = row_to_pair(row, f"{path} row {line_no}")
            if pair is None:
                skipped[reason] = skipped.get(reason, 0) + 1
            else:
                pairs.append(pair)
            if limit is not None and len(pairs) >= limit:
                break
    if skipped and not quiet:
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
        warnings.warn(f"{source}: skipped {sum(skipped.values())} rows ({why}); kept {len(pairs)}",
                      stacklevel=2)
    if not pairs:
        raise DataError(f"{source}: no usable preference pairs")
    return pairs


def download_hh_rlhf(subset: str = "harmless-base", split: str = "train",
                     cache_dir: str | Path | None = None, base_url: str | None = None) -> Path:
    """Download one hh-rlhf file to the cache (chat_draft.download: progress bar, resume, gzip check,
    atomic rename, retries with backoff). Without network: a one-line DataError that names the URL
    and says how to point --data at a local copy."""
    import chat_draft

    base_url = base_url or os.environ.get("HH_RLHF_URL", HH_RLHF_URL)
    cache_dir = Path(cache_dir or os.environ.get("TOKEN_RLHF_CACHE", Path.home() / ".cache" / "token-rlhf"))
    url = f"{base_url}/{subset}/{split}.jsonl.gz"
    try:
        return chat_draft.download(url, cache_dir / "hh-rlhf" / subset / f"{split}.jsonl.gz",
                                   verify=chat_draft.verify_gzip, desc=f"hh-rlhf/{subset}")
    except chat_draft.DownloadError as e:
        raise DataError(f"hh-rlhf: {e}; without network, fetch that file elsewhere and give its path: "
                        "--data path/to/train.jsonl.gz (any .jsonl or .jsonl.gz of hh-rlhf rows)") from None


def split_pairs(pairs: list[Pair], seed: int = 0, test_fraction: float = 0.05) -> dict[str, list[Pair]]:
    """Deterministic split: a held-out `test` part, then 20% SFT / 40% reward / 40% RL (TLCR paper).

    The order comes from sorting by a seeded hash of each pair's content id, so the same seed
    gives the same split on any machine, whatever order the file was read in.
    """
    def key(pair: Pair) -> str:
        return hashlib.sha256(f"{seed}:{pair.id}".encode()).hexdigest()

    ordered = sorted(pairs, key=key)
    n_test = max(1, round(len(ordered) * test_fraction))
    test, rest = ordered[:n_test], ordered[n_test:]
    n_sft, n_reward = round(len(rest) * 0.2), round(len(rest) * 0.4)
    return {"sft": rest[:n_sft], "reward": rest[n_sft:n_sft + n_reward],
            "rl": rest[n_sft + n_reward:], "test": test}


# ----------------------------------------------------------------------------------------------
# Tokenisation and batching
# ----------------------------------------------------------------------------------------------
def encode_prompt_response(tokenizer, prompt: str, response: str | None = None,
                           max_prompt_len: int = 256, max_response_len: int = 256,
                           add_eos: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (left-truncated: the last turns matter) and of the response.

    Prompt and response are tokenised separately and concatenated, so the response ids are the
    same alone as inside prompt + response (hh-rlhf responses start with a space, which byte-level
    BPE keeps as its own word boundary). The response gets EOS appended if add_eos.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][-max_prompt_len:]
    if response is None:
        return prompt_ids, []
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    response_ids = response_ids[: max_response_len - (1 if add_eos else 0)]
    if add_eos:
        response_ids = response_ids + [tokenizer.eos_token_id]
    return prompt_ids, response_ids


def pad_right(seqs: list[list[int]], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a list of id lists. Returns ids [B, T] and mask [B, T] (1 = real token)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def pad_left(seqs: list[list[int]], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad a list of id lists (prompts for generation). Returns ids [B, T] and mask [B, T]."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on the first real token, for left- or right-padded rows."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_index(response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each row's response sits. response_mask [B, T] marks one contiguous run per row.

    Returns index [B, T_resp] (position in T of the row's j-th response token, clamped inside
    the row) and valid [B, T_resp] (1 where j < that row's response length). T_resp is the
    longest response. Works for left-padded prompts and right-padded batches alike.
    """
    response_mask = response_mask.long()
    lengths = response_mask.sum(-1)  # [B]
    t_resp = max(int(lengths.max()), 1)
    start = response_mask.argmax(-1)  # first response position, [B]
    offsets = torch.arange(t_resp, device=response_mask.device)
    index = (start[:, None] + offsets[None]).clamp(max=response_mask.shape[1] - 1)  # [B, T_resp]
    valid = (offsets[None] < lengths[:, None]).long()  # [B, T_resp]
    return index, valid


def gather_response(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """values [B, T] -> [B, T_resp]: each row's values at its response tokens, left-aligned, 0 after."""
    index, valid = response_index(response_mask)
    return values.gather(1, index) * valid.to(values.dtype)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of `values` where mask is 1; 0 (not NaN) where the mask is empty."""
    mask = mask.to(values.dtype)
    total = (values * mask).sum() if dim is None else (values * mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1)


def global_batch(examples: list, step: int, batch_size: int, seed: int) -> list:
    """The examples of optimizer step `step`: a fresh seeded permutation every epoch.

    Every rank computes the same global batch, so a run resumed at any step sees exactly the
    data an uninterrupted run would, and 1 process or N processes see the same data.
    """
    per_epoch = max(1, len(examples) // batch_size)
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return [examples[i] for i in order[index * batch_size: (index + 1) * batch_size].tolist()]


# ----------------------------------------------------------------------------------------------
# Tokenizers and models
# ----------------------------------------------------------------------------------------------
TINY_CONFIG = dict(n_layer=2, n_head=2, n_embd=64, n_positions=512)  # ~0.3M params + embeddings


def train_tiny_tokenizer(texts: list[str], vocab_size: int = 2048):
    """A byte-level BPE tokenizer (GPT-2 style) trained on `texts`, as a transformers tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                        bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    return configure_tokenizer(tokenizer)


def configure_tokenizer(tokenizer):
    """GPT-2 convention: no pad token, so pad = eos; left padding (for generation)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def build_tiny(texts: list[str], out_dir: str | Path | None = None, vocab_size: int = 2048, seed: int = 0,
               **config):
    """Train a tokenizer on `texts` and build a tiny GPT-2 from a config (saved to out_dir if given)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = train_tiny_tokenizer(texts, vocab_size)
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                     **{**TINY_CONFIG, **config})
    model = GPT2LMHeadModel(cfg)
    if out_dir is not None:
        save_hf(model, tokenizer, out_dir)
    return model, tokenizer


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    _quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    return configure_tokenizer(tokenizer)


def load_policy(name_or_path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """Any Hugging Face causal LM, by hub name or local path (safetensors weights preferred)."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype, use_safetensors=None,
                                                 trust_remote_code=trust_remote_code)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability to 0 (RL and scoring must be deterministic)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


class ScoreModel(nn.Module):
    """A transformer backbone plus a linear head giving one scalar per position.

    One class serves three roles: the TLCR discriminator (scalar = logit of "token is good"),
    the Bradley–Terry reward model (scalar read at the last token), and the PPO critic (value).
    `forward` returns scores [B, T]; the score at position t has seen tokens 0..t (causal).
    Saved as the backbone in Hugging Face format plus `score_head.safetensors`.
    """

    HEAD_FILE = "score_head.safetensors"

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.head = nn.Linear(hidden, 1)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(hidden + 1))
        nn.init.zeros_(self.head.bias)

    @property
    def config(self):
        return self.backbone.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids_from_mask(attention_mask),
                               use_cache=False).last_hidden_state  # [B, T, H]
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)  # [B, T]

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, dtype: torch.dtype = torch.float32,
                        trust_remote_code: bool = False) -> "ScoreModel":
        """Load a saved ScoreModel, or start one from any causal LM (a fresh head)."""
        from transformers import AutoModel

        _quiet_transformers()
        backbone = AutoModel.from_pretrained(str(name_or_path), dtype=dtype, trust_remote_code=trust_remote_code)
        model = cls(backbone)
        head_file = Path(name_or_path) / cls.HEAD_FILE
        if head_file.exists():
            from safetensors.torch import load_file
            model.head.load_state_dict(load_file(str(head_file)))
        return model.to(dtype)

    def save_pretrained(self, out_dir: str | Path, extra: dict | None = None):
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(out_dir)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()},
                  str(out_dir / self.HEAD_FILE))
        if extra is not None:
            atomic_write(out_dir / "score_model.json", json.dumps(extra, indent=2))


def save_hf(model: nn.Module, tokenizer, out_dir: str | Path, **save_kwargs):
    """Save a model (plain or ScoreModel) and its tokenizer in Hugging Face format into out_dir.

    Everything is written to a temp folder first and then renamed file by file, so a crash never
    leaves half a weight file; other files in out_dir (checkpoint/, log.jsonl) are kept.
    `save_kwargs` go to the model's save_pretrained (ScoreModel: extra={...} -> score_model.json).
    """
    _quiet_transformers()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".save-"))
    try:
        unwrap(model).save_pretrained(tmp, **save_kwargs)
        tokenizer.save_pretrained(tmp)
        for item in tmp.iterdir():
            os.replace(item, out_dir / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


# ----------------------------------------------------------------------------------------------
# System: device, distributed, precision, schedule
# ----------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def add_system_args(parser):
    """The options every training stage shares (device, precision, memory, seed)."""
    group = parser.add_argument_group("system")
    group.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    group.add_argument("--no-bf16", dest="bf16", action="store_false",
                       help="disable bf16 autocast on CUDA (it is on by default there; CPU runs in fp32)")
    group.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute activations in the backward pass: less memory, ~30%% more compute")
    group.add_argument("--seed", type=int, default=0, help="random seed (data order, init, sampling)")
    group.add_argument("--trust-remote-code", action="store_true",
                       help="allow model repos that ship their own Python code (off by default)")
    return group


def setup_distributed(device: str = "auto") -> Dist:
    """Read RANK / LOCAL_RANK / WORLD_SIZE as torchrun sets them (nanoGPT style).

    NCCL on CUDA, gloo on CPU. Without torchrun this is a single process.
    """
    want_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        import torch.distributed as dist

        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        if want_cuda:
            torch.cuda.set_device(local_rank)
            dev = torch.device("cuda", local_rank)
        else:
            dev = torch.device("cpu")
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
        return Dist(rank, local_rank, world_size, dev)
    return Dist(device=torch.device("cuda" if want_cuda else (device if device != "auto" else "cpu")))


def cleanup_distributed(dist_info: Dist):
    """Wait for every rank, then tear the process group down.

    Gloo's worker threads free a finished collective (and the Python tensors it holds, which needs
    the GIL) just after the collective returns. If the process group's destructor runs first (it
    holds the GIL, e.g. when the DDP wrapper is freed as main() returns), the two wait on each other
    for ever. Sleeping a moment hands the GIL to the workers so they finish first.
    """
    if dist_info.enabled:
        import time

        import torch.distributed as dist

        dist.barrier()
        if dist.get_backend() == "gloo":
            time.sleep(0.5)
        dist.destroy_process_group()


def all_reduce_sum(values, dist_info: Dist) -> torch.Tensor:
    """Element-wise sum over ranks of a number, a list of numbers or a tensor: float64, on the CPU.
    Pass several counters in one list to pay for one all-reduce."""
    tensor = torch.as_tensor(values, dtype=torch.float64).detach().clone().to(dist_info.device)
    if dist_info.enabled:
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor.cpu()


def all_reduce_mean(value: torch.Tensor | float, dist_info: Dist) -> float:
    """Mean of a scalar over ranks (a plain float back)."""
    return all_reduce_sum(value, dist_info).item() / dist_info.world_size


def autocast(device: torch.device, bf16: bool = True):
    """bf16 autocast on CUDA (if asked); a no-op context on CPU."""
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay from the base learning rate to 0 over total_steps, no warm-up."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps))))


def adamw(model: nn.Module, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases and LayerNorm gains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


# ----------------------------------------------------------------------------------------------
# Files: atomic writes, checkpoints, logs
# ----------------------------------------------------------------------------------------------
def atomic_write(path: str | Path, text: str):
    """Write text to a temp file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    os.replace(tmp, path)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
             "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt_dir: str | Path, models: dict[str, nn.Module], others: dict):
    """Write a resumable checkpoint atomically: models as safetensors, the rest (optimizer and
    scheduler states, step, RNG) as a torch file that loads with weights_only=True."""
    from safetensors.torch import save_file

    ckpt_dir = Path(ckpt_dir)
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, model in models.items():
        state = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
        # tied weights (GPT-2's lm_head = wte) share storage; safetensors wants them apart
        seen, unique = set(), {}
        for k, v in state.items():
            key = (v.data_ptr(), v.shape, v.stride()) if v.numel() else None
            if key in seen:
                continue
            seen.add(key)
            unique[k] = v
        save_file(unique, str(tmp / f"{name}.safetensors"))
    torch.save({**others, "rng": rng_state()}, tmp / "state.pt")
    old = ckpt_dir.with_name(ckpt_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if ckpt_dir.exists():
        os.replace(ckpt_dir, old)
    os.replace(tmp, ckpt_dir)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(ckpt_dir: str | Path, models: dict[str, nn.Module], map_location="cpu") -> dict | None:
    """Load what save_checkpoint wrote into `models` (in place); return the other state, or None
    when there is no checkpoint. RNG states are restored."""
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "state.pt").exists():
        return None
    for name, model in models.items():
        state = load_file(str(ckpt_dir / f"{name}.safetensors"))
        missing, unexpected = unwrap(model).load_state_dict(state, strict=False)
        tied = {k for k in missing if any(k.endswith(s) for s in ("lm_head.weight",))}
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"{ckpt_dir}/{name}.safetensors does not match the model: "
                               f"missing {sorted(set(missing) - tied)[:5]}, unexpected {unexpected[:5]}")
    others = torch.load(ckpt_dir / "state.pt", map_location=map_location, weights_only=True)
    set_rng_state(others.pop("rng"))
    return others


def save_training_state(ckpt_dir: str | Path, model: nn.Module, optimizer, scheduler, step: int, **extra):
    """Checkpoint one trained model with its optimizer, scheduler, step and any `extra` fields
    (e.g. total_steps=..., which resume_training_state then checks)."""
    save_checkpoint(ckpt_dir, {"model": model}, {"optimizer": optimizer.state_dict(),
                                                 "scheduler": scheduler.state_dict(), "step": step, **extra})


def resume_training_state(ckpt_dir: str | Path, model: nn.Module, optimizer, scheduler, total_steps: int,
                          master: bool = True, map_location="cpu") -> dict | None:
    """Load what save_training_state wrote into model, optimizer and scheduler (and the RNG states);
    return the saved state (step and extra fields), or None when there is no checkpoint.

    A checkpoint saved with total_steps must be for a run of this length: the cosine schedule and
    the data order depend on it, so a mismatch stops the run instead of resuming a different plan.
    """
    state = load_checkpoint(ckpt_dir, {"model": model}, map_location=map_location)
    if state is None:
        return None
    if state.get("total_steps", total_steps) != total_steps:
        raise SystemExit(f"{ckpt_dir}: made for a {state['total_steps']}-step run, this one has {total_steps} "
                         f"steps (data, batch or epochs changed); use --no-resume to start fresh")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if master:
        print(f"resumed from {ckpt_dir} at step {state['step']}/{total_steps}")
    return state


class JsonlLogger:
    """Appends one JSON object per line (rank 0 only); prints nothing itself."""

    def __init__(self, path: str | Path | None, enabled: bool = True):
        self.path = Path(path) if path else None
        self.enabled = enabled and self.path is not None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def rewind(self, step: int):
        """On resume from a checkpoint at `step`: drop the lines of steps after it (they will be
        logged again), so the log never holds a step twice."""
        if self.enabled and self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
            atomic_write(self.path, "".join(line + "\n" for line in kept))

    def log(self, record: dict):
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
