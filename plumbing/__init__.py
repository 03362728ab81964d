"""plumbing.py — what every stage needs and no reader has to study: skip it on a first reading.

Nothing here is part of an algorithm (those are in the stage files, and the ideas they share are in
common.py). This module keeps the stages short by holding the machinery three or more of them use,
in this order:

    errors     InputError / DataError -> one line and exit code 2 (`cli`)
    data       --data to files (the bundled slice, a local file, hh-rlhf downloaded), one split (load_data)
    models     load_tokenizer, load_policy, load_score_model / save_score_model (the project's, TRL's and
               OpenRLHF's formats), save_policy, build_tiny, tokenizer checks (the models of one run must agree)
    system     DistInfo / setup_distributed (torchrun), wrap_model (DDP, or FSDP2 with --fsdp), prepare_frozen,
               accumulate, clip, autocast, seeds, AdamW, cosine schedule, gradient checkpointing
    FSDP2      shard models that outgrow one GPU: one commented section, reached through wrap_model,
               accumulate, clip_grad_norm, the checkpoints and the final saves
    files      atomic_write, JsonlLogger, save_hf, save_checkpoint / resume / load_checkpoint (crash-safe,
               refuses to resume a different run; sharded under FSDP), clean_stale_temp
    network    one chat-completions client (label.py's reviser, eval.py's judge), the append-only JSONL
               cache of their answers, one download (hh-rlhf)
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import email.utils
import gzip
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from datetime import timezone
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import requests
import torch
import torch.distributed as torch_dist
import torch.nn as nn
import transformers
import urllib3
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import (ByteLevelBPETokenizer, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                        trainers)
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GPT2Config,
                          PreTrainedTokenizerFast)
from transformers.utils import logging as hf_logging

import common
import lora
from common import DataError, InputError, ScoreModel

try:  # FSDP2 (torch >= 2.6); the project runs without it on older torch, --fsdp then says what is missing
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    fully_shard = FSDPModule = DTensor = None


# ----------------------------------------------------------------------------------------------
# Errors: bad input is one line on stderr and exit code 2, never a traceback
# ----------------------------------------------------------------------------------------------
def cli(main):
    """Run a stage's main(); an InputError (bad data, a missing model, models that do not belong
    together) prints `error: ...` once (rank 0 under torchrun) and exits with code 2. Warnings print
    as one line each, `warning: ...`, without the source line Python shows by default."""
    warnings.formatwarning = lambda message, category, *rest, **kw: f"warning: {message}\n"
    try:
        return main()
    except InputError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


# ----------------------------------------------------------------------------------------------
# Data: --data to files (the bundled slice, a local file, or hh-rlhf downloaded), then one split
# ----------------------------------------------------------------------------------------------
HH_RLHF_URL = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main"
HH_RLHF_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")


def add_data_args(group, split: str | None = None, response_len: bool = True, prompt_len: bool = True,
                  limit: bool = True, preference: bool = False):
    """The data options the stages share: --data, --split, --split-seed, --limit, lengths, chat template."""
    group.add_argument("--data", default="bundled",
                       help="'bundled' (the hh-rlhf slice in data/), a local .jsonl/.jsonl.gz/.json/.parquet of "
                            "preference pairs (formats: README.md, Data), or 'hh-rlhf[:SUBSET,...]' to download")
    if split is not None:
        group.add_argument("--split", default=split, choices=("sft", "reward", "rl", "test", "all"),
                           help="which part of the 20/40/40 + test split (common.split_pairs) to use")
    group.add_argument("--split-seed", type=int, default=0,
                       help="seed of the data split; keep it equal across stages (nothing else depends on it)")
    if limit:
        group.add_argument("--limit", type=int, default=None, help="use at most this many pairs of the split")
    if prompt_len:
        group.add_argument("--max-prompt-len", type=int, default=256, help="prompt tokens kept (the last ones)")
    if response_len:
        group.add_argument("--max-response-len", type=int, default=256, help="response tokens kept, EOS included")
    if preference:
        group.add_argument("--preference", default="human", choices=("human", "gold"),
                           help="which reply of a pair is chosen: the data's (human) or the one with the higher gold.py "
                                "score (gold: the offline lab; ties are dropped)")
    group.add_argument("--no-chat-template", dest="chat_template", action="store_false",
                       help="render chat-message data as the hh-rlhf transcript even when the tokenizer has a "
                            "chat template (the bundled hh-rlhf data always uses the transcript)")
    return group


def data_paths(source: str, cache_dir=None) -> list[Path]:
    """The files behind --data: 'bundled', a local file, or 'hh-rlhf[:SUBSET,...]' (downloaded once)."""
    source = str(source)
    if source == "bundled":
        return [common.BUNDLED_DATA]
    if source.startswith("hh-rlhf") and not Path(source).exists():
        subsets = source.split(":", 1)[1].split(",") if ":" in source else list(HH_RLHF_SUBSETS)
        return [download_hh_rlhf(s, "train", cache_dir) for s in subsets]
    return [Path(source)]


def load_data(source: str, split: str, split_seed: int, limit: int | None = None, quiet: bool = False):
    """The pairs of one split of --data (common.load_pairs, common.select_split)."""
    return common.select_split(common.load_pairs(data_paths(source), quiet=quiet), split, split_seed, limit)


def download_hh_rlhf(subset: str = "harmless-base", split: str = "train", cache_dir=None,
                     base_url: str | None = None) -> Path:
    """Download one hh-rlhf file to the cache (download(): progress bar, resume, gzip check, atomic
    rename, retries with backoff). Without network: a one-line DataError that names the URL and says
    how to point --data at a local copy."""
    base_url = base_url or os.environ.get("HH_RLHF_URL", HH_RLHF_URL)
    cache_dir = Path(cache_dir or os.environ.get("TOKEN_RLHF_CACHE", Path.home() / ".cache" / "token-rlhf"))
    url = f"{base_url}/{subset}/{split}.jsonl.gz"
    try:
        return download(url, cache_dir / "hh-rlhf" / subset / f"{split}.jsonl.gz", verify=verify_gzip,
                        desc=f"hh-rlhf/{subset}")
    except DownloadError as e:
        raise DataError(f"hh-rlhf: {e}; without network, fetch that file elsewhere and give its path: "
                        "--data path/to/train.jsonl.gz (any .jsonl or .jsonl.gz of hh-rlhf rows)") from None


# ----------------------------------------------------------------------------------------------
# Models and tokenizers
# ----------------------------------------------------------------------------------------------
HUB_ENDPOINT = os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _quiet_transformers():
    """No progress bars or load reports for every frozen model (errors still show)."""
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def check_model_source(name_or_path, what: str = "model"):
    """Fail in a moment, with one line, when a model cannot be loaded: a local path that does not
    exist, a folder that is not a Hugging Face model, or a hub name that is neither cached nor
    reachable (transformers would retry for most of a minute and end in a traceback)."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise InputError(f"{what} {name}: a folder without config.json, not a Hugging Face model directory")
        return
    if path.exists():
        raise InputError(f"{what} {name}: a file, not a model directory or hub name")
    repo_id = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name)
    if not repo_id or name.startswith((".", "~")) or (path.parent != Path(".") and path.parent.exists()):
        raise InputError(f"{what} {name}: no such directory")
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return  # in the local hub cache
    except Exception:  # an old or missing huggingface_hub: let transformers decide
        return
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise InputError(f"{what} {name}: not a local directory, not in the hub cache, and HF_HUB_OFFLINE is set")
    try:
        requests.head(f"{HUB_ENDPOINT}/api/models/{name}", timeout=3)
    except requests.RequestException:
        raise InputError(f"{what} {name}: not a local directory and {HUB_ENDPOINT} cannot be reached to download "
                         "it (offline?); give the path of a local copy") from None


def configure_tokenizer(tokenizer):
    """No pad token (GPT-2, Llama): pad = eos, and every mask in the project is built from
    positions, never from pad ids. Left padding, for generation."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_tokenizer(name_or_path, trust_remote_code: bool = False, what: str = "tokenizer"):
    check_model_source(name_or_path, what)
    _quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise InputError(f"{what} {name_or_path}: the tokenizer has no EOS token")
    return configure_tokenizer(tokenizer)


def from_pretrained(auto_class, name_or_path, dtype: torch.dtype, trust_remote_code: bool = False, meta: bool = False):
    """auto_class.from_pretrained; with meta=True the same model built on the meta device instead (shapes, no
    storage, nothing read): what the ranks other than 0 build under --fsdp, where rank 0 alone reads the weights
    and wrap_model sends every rank its shards (see the FSDP2 section). Eval mode either way."""
    if not meta:
        return auto_class.from_pretrained(str(name_or_path), dtype=dtype, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = auto_class.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    if getattr(model, "generation_config", None) is not None:  # the EOS ids generation stops at, as rank 0 reads them
        try:
            model.generation_config = GenerationConfig.from_pretrained(str(name_or_path))
        except OSError:  # no generation_config.json: the defaults from the config, as from_pretrained does
            pass
    return model.eval()


def load_policy(name_or_path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                what: str = "policy", meta: bool = False):
    """Any Hugging Face causal LM, by hub name or local path (safetensors preferred); meta: see from_pretrained."""
    check_model_source(name_or_path, what)
    _quiet_transformers()
    model = from_pretrained(AutoModelForCausalLM, name_or_path, dtype, trust_remote_code, meta)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of what decides token ids: the vocabulary and the BOS / EOS tokens."""
    blob = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.bos_token, tokenizer.eos_token])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_same_tokenizer(policy_tokenizer, other_tokenizer, what: str):
    """Stop before any long work if a model reads token ids differently from the policy: every token
    of the policy's vocabulary must have the same id, and EOS must be the same token. (A score model
    may have extra tokens of its own, e.g. the pad token that save_score_model adds.)"""
    ours, theirs = policy_tokenizer.get_vocab(), other_tokenizer.get_vocab()
    differ = [(token, i, theirs.get(token)) for token, i in ours.items() if theirs.get(token) != i]
    if differ or policy_tokenizer.eos_token_id != other_tokenizer.eos_token_id:
        example = (f"; e.g. {differ[0][0]!r} is {differ[0][1]} for the policy and {differ[0][2]} here"
                   if differ else f"; EOS is {policy_tokenizer.eos_token_id} vs {other_tokenizer.eos_token_id}")
        raise InputError(f"{what}: its tokenizer differs from the policy's ({len(differ)} of {len(ours)} tokens "
                         f"have other ids{example}); train it from the same SFT model")


# The tiny families build_tiny makes: the tokenizer layout and special tokens each family ships with
# (bytelevel: GPT-2-style byte-level BPE; sentencepiece: the "legacy" '▁' layout of Llama 2,
# Mistral, Gemma, Phi-3), whether it adds BOS, and its transformers model type. What users bring.
TINY_FAMILIES = {
    # arch: (model type, tokenizer layout, bos, eos, pad, adds BOS)
    "gpt2": ("gpt2", "bytelevel", "<|endoftext|>", "<|endoftext|>", None, False),
    "llama": ("llama", "sentencepiece", "<s>", "</s>", None, True),
    "llama3": ("llama", "bytelevel", "<|begin_of_text|>", "<|end_of_text|>", None, True),
    "mistral": ("mistral", "sentencepiece", "<s>", "</s>", None, True),
    "qwen2": ("qwen2", "bytelevel", None, "<|endoftext|>", None, False),
    "qwen3": ("qwen3", "bytelevel", None, "<|endoftext|>", None, False),
    "gemma2": ("gemma2", "sentencepiece", "<bos>", "<eos>", "<pad>", True),
    "phi3": ("phi3", "sentencepiece", "<s>", "<|endoftext|>", None, True),
    "gpt_neox": ("gpt_neox", "bytelevel", "<|endoftext|>", "<|endoftext|>", None, False),
    "opt": ("opt", "bytelevel", "</s>", "</s>", "<pad>", True),
}


def build_tiny(texts: list[str], out_dir=None, arch: str = "gpt2", vocab_size: int = 2048, seed: int = 0,
               layers: int = 2, width: int = 64, dropout: float = 0.1, max_positions: int = 512):
    """A tokenizer trained on `texts` and a tiny random model built from a config (saved to out_dir).

    arch "gpt2": byte-level BPE, no BOS, learned positions. arch "llama": a SentencePiece-style BPE
    (the "legacy" layout that puts '▁' before every text it tokenises) that adds BOS, RoPE, RMSNorm,
    SwiGLU, no pad token — what users bring from the Llama / Mistral family. The other TINY_FAMILIES
    (llama3, mistral, qwen2, qwen3, gemma2, phi3, gpt_neox, opt) are the same idea for the families
    users bring, each with its own tokenizer layout and special tokens: the test matrix of
    tests/test_families.py runs every stage on each.
    """
    if arch not in TINY_FAMILIES:
        raise ValueError(f"arch must be one of {', '.join(TINY_FAMILIES)}, not {arch!r}")
    tokenizer = train_tiny_tokenizer(texts, vocab_size, arch)
    torch.manual_seed(seed)
    config = tiny_config(arch, tokenizer, layers, width, dropout, max_positions)
    model = AutoModelForCausalLM.from_config(config)
    if out_dir is not None:
        save_hf(model, tokenizer, out_dir)
    return model, configure_tokenizer(tokenizer)


def tiny_config(arch: str, tokenizer, layers: int, width: int, dropout: float, max_positions: int):
    """The config of a tiny random `arch` model on `tokenizer`: 2 heads (one KV head where the
    family groups them), an MLP twice as wide, untied output embeddings where the family allows."""
    model_type = TINY_FAMILIES[arch][0]
    own_pad = tokenizer.pad_token is not None and tokenizer.pad_token != tokenizer.eos_token
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id if own_pad else None,
           "vocab_size": len(tokenizer)}
    if arch == "gpt2":
        ids.update(pad_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
        return GPT2Config(n_layer=layers, n_embd=width, n_head=2, n_positions=max_positions,
                          resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, **ids)
    if arch == "gpt_neox":
        return AutoConfig.for_model(model_type, hidden_size=width, intermediate_size=2 * width,
                                    num_hidden_layers=layers, num_attention_heads=2,
                                    max_position_embeddings=max_positions,
                                    attention_dropout=dropout, hidden_dropout=dropout,
                                    tie_word_embeddings=False, **ids)
    if arch == "opt":
        return AutoConfig.for_model(model_type, hidden_size=width, ffn_dim=2 * width,
                                    word_embed_proj_dim=width, num_hidden_layers=layers,
                                    num_attention_heads=2, max_position_embeddings=max_positions,
                                    dropout=dropout, attention_dropout=dropout, **ids)
    extra = {}
    if arch == "gemma2":
        extra = {"head_dim": width // 2, "query_pre_attn_scalar": width // 2,
                 "sliding_window": max_positions}
    if arch == "phi3":
        extra = {"original_max_position_embeddings": max_positions, "resid_pdrop": dropout,
                 "embd_pdrop": dropout}
    return AutoConfig.for_model(model_type, hidden_size=width, intermediate_size=2 * width,
                                num_hidden_layers=layers, num_attention_heads=2,
                                num_key_value_heads=1, max_position_embeddings=max_positions,
                                attention_dropout=dropout, tie_word_embeddings=False, **extra,
                                **ids)


def train_tiny_tokenizer(texts: list[str], vocab_size: int = 2048, arch: str = "gpt2"):
    """A BPE tokenizer trained on `texts` in the layout of `arch` (TINY_FAMILIES), with the family's
    special tokens, as a transformers fast tokenizer."""
    _, layout, bos, eos, pad, adds_bos = TINY_FAMILIES[arch]
    specials = list(dict.fromkeys(t for t in (bos, eos, pad) if t))
    pad_kwarg = {"pad_token": pad} if pad else {}
    if layout == "bytelevel":
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                                special_tokens=specials, show_progress=False)
        tok = bpe._tokenizer
        if adds_bos:  # Llama 3, OPT: BOS before every text (the byte-level offsets kept)
            tok.post_processor = processors.Sequence([
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                              special_tokens=[(bos, tok.token_to_id(bos))])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=bos,
                                       unk_token=eos, **pad_kwarg)
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    # the "legacy" SentencePiece layout of Llama 2 / Mistral: '▁' before every text, spaces as '▁'
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")  # pieces never span two words
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    specials = list(dict.fromkeys(["<unk>", *specials]))
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                                       special_tokens=[*specials, *byte_tokens]))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                   unk_token="<unk>", **pad_kwarg)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Every dropout probability to 0: RL and scoring must be deterministic functions of the input."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


# --- score models: the project's format, the Hugging Face standard classes, TRL, OpenRLHF ---------
# A ScoreModel (common.py) is a backbone plus one linear head. On disk it is a standard Hugging Face
# checkpoint, so other tools load it with no code of ours:
#   reward model  -> AutoModelForSequenceClassification (num_labels=1): the score of the last real token
#   discriminator -> AutoModelForTokenClassification (num_labels=1): one logit per token
# Both are read the same way by load_score_model, as are the project's older directories (a backbone
# plus score_head.safetensors), TRL reward models (sequence classification) and OpenRLHF ones
# (a backbone plus value_head.weight, with optional reward normalisation).
SCORE_KINDS = {"sequence": "AutoModelForSequenceClassification", "token": "AutoModelForTokenClassification"}
PAD_TOKEN = "<|pad|>"


def _head_name(hf_model) -> str:
    """The attribute holding the classification head (score, classifier, ...)."""
    names = [name for name, child in hf_model.named_children()
             if name != hf_model.base_model_prefix and isinstance(child, nn.Linear)]
    if len(names) != 1:
        raise ValueError(f"{type(hf_model).__name__}: expected one linear head, found {names}")
    return names[0]


def new_score_model(name_or_path, bias: bool, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                    what: str = "backbone", meta: bool = False) -> ScoreModel:
    """A ScoreModel with a fresh head on the backbone of a causal LM (the SFT model): what the
    discriminator, the reward model and a critic started from the policy train. The head is fp32
    whatever `dtype` the backbone has (it is trained). meta: see from_pretrained."""
    check_model_source(name_or_path, what)
    _quiet_transformers()
    backbone = from_pretrained(AutoModel, name_or_path, dtype, trust_remote_code, meta)
    with torch.device("meta") if meta else contextlib.nullcontext():
        return ScoreModel(backbone, bias=bias)


HEAD_FILE_FORMAT = "backbone + score_head.safetensors"


def standard_score_class(config, kind: str):
    """The transformers class a `kind` score model of this family saves as (e.g.
    LlamaForTokenClassification), or None where transformers has none (OPT, GPT-J, Gemma 3 and
    OLMo 2 have no token classifier)."""
    try:
        return getattr(transformers, SCORE_KINDS[kind])._model_mapping[type(config)]
    except KeyError:
        return None


def score_save_note(config, kind: str) -> str | None:
    """Why a `kind` model of this family is saved as backbone + score_head.safetensors (None: it is
    saved as the standard class)."""
    if standard_score_class(config, kind) is not None:
        return None
    missing = SCORE_KINDS[kind].removeprefix("AutoModel")
    return (f"transformers has no {missing} class for model type {config.model_type!r}: saved "
            "as its backbone (AutoModel) plus score_head.safetensors (the head's weight and bias), "
            "which plumbing.load_score_model reads (and so every stage of token-rlhf)")


def save_score_model(model: ScoreModel, tokenizer, out_dir, kind: str, extra: dict | None = None):
    """Save a ScoreModel as a standard Hugging Face checkpoint (see SCORE_KINDS) with its tokenizer.
    Every rank calls it (under FSDP the weights are gathered to rank 0, which writes); LoRA adapters
    are merged into the backbone (full_state_dict), so the directory holds the plain standard class.

    The standard sequence classifier reads the score at the last token that is not the pad token. With
    pad == eos (GPT-2, Llama) that would skip the EOS the reward model is read at, so a sequence model
    whose tokenizer has no pad of its own gets one extra token, <|pad|>, and one extra (never used, zero)
    embedding row; every other token keeps its id, so it still shares the policy's tokenizer.
    `extra` is written to token_rlhf.json (what the run was: role, data, held-out settings), with
    the format saved. A family without the standard class (OPT has no token classifier), or a
    standard save that fails, is saved as the backbone plus score_head.safetensors instead (the
    project's own format, which load_score_model reads), and token_rlhf.json says why: a trained
    model is never lost.
    """
    model = unwrap(model)
    if kind == "sequence" and model.head.bias is not None:
        raise ValueError("a sequence-classification head has no bias; build the reward model with bias=False")
    state = full_state_dict(model)  # {} on ranks other than 0
    if not state:
        return
    backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    head = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
    info, out_dir = dict(extra or {}), Path(out_dir)
    note = score_save_note(model.backbone.config, kind)
    if note is None:
        try:
            _save_standard(model, tokenizer, out_dir, kind, dict(backbone), head)
            (out_dir / "score_head.safetensors").unlink(missing_ok=True)  # an old one would win
            info["format"] = SCORE_KINDS[kind]
        except Exception as e:  # never lose a trained model to a format: the project's own instead
            note = (f"saving as {SCORE_KINDS[kind]} failed ({type(e).__name__}: {e}); "
                    f"saved as {HEAD_FILE_FORMAT}")
            warnings.warn(note)
    if note is not None:
        save_hf(model.backbone, tokenizer, out_dir, state_dict=backbone)
        tmp = out_dir / ".score_head.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in head.items()}, str(tmp))
        os.replace(tmp, out_dir / "score_head.safetensors")
        info.update(format=HEAD_FILE_FORMAT, format_note=note)
    atomic_write(out_dir / "token_rlhf.json", json.dumps(info, indent=2) + "\n")


def _save_standard(model, tokenizer, out_dir, kind: str, backbone: dict, head_state: dict):
    """save_score_model's standard checkpoint: AutoModelFor{Sequence,Token}Classification."""
    embedding = next(name for name, module in model.backbone.named_modules()
                     if module is model.backbone.get_input_embeddings()) + ".weight"
    tokenizer = copy.deepcopy(tokenizer)
    if kind == "sequence" and tokenizer.pad_token_id in (None, tokenizer.eos_token_id):
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        rows = backbone[embedding]
        if rows.shape[0] < len(tokenizer):  # the pad token's row
            backbone[embedding] = torch.cat([rows, rows.new_zeros(len(tokenizer) - rows.shape[0], rows.shape[1])])
    config = copy.deepcopy(model.backbone.config)
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    config.classifier_dropout = 0.0  # the token classifier's dropout; eval-time outputs are unaffected anyway
    config.vocab_size = backbone[embedding].shape[0]
    auto_class = getattr(transformers, SCORE_KINDS[kind])
    with torch.device("meta"):  # an empty shell of the standard class; our tensors go inside it
        hf_model = auto_class.from_config(config)
    head = _head_name(hf_model)
    if getattr(hf_model, head).bias is None and model.head.bias is not None:
        raise ValueError(f"{type(hf_model).__name__} has no head bias; this discriminator head has one")
    hf_state = {f"{hf_model.base_model_prefix}.{k}": v for k, v in backbone.items()}
    hf_state.update({f"{head}.{k}": v for k, v in head_state.items()})
    hf_model.load_state_dict(hf_state, strict=True, assign=True)
    save_hf(hf_model, tokenizer, out_dir)


def save_policy(model: nn.Module, tokenizer, out_dir):
    """Save the trained policy as an ordinary Hugging Face causal LM (AutoModelForCausalLM.from_pretrained
    loads it) with its tokenizer. Every rank calls it: under FSDP the full weights are gathered to rank 0,
    which writes; LoRA adapters are merged in (full_state_dict)."""
    state = full_state_dict(model)
    if state:
        save_hf(model, tokenizer, out_dir, state_dict=state)


def load_score_model(path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                     what: str = "score model", meta: bool = False) -> ScoreModel:
    """A trained ScoreModel from any of the formats above; a folder without trained head weights is an
    error (a random head would give random rewards without any sign of it). meta: see from_pretrained."""
    check_model_source(path, what)
    _quiet_transformers()
    with torch.device("meta") if meta else contextlib.nullcontext():  # meta: the heads built on it too
        model = _load_score_model(Path(path), dtype, trust_remote_code, what, meta)
    model.head.float()  # the scalar head stays fp32 whatever the backbone's dtype (a few hundred numbers)
    return model


def _load_score_model(path: Path, dtype, trust_remote_code, what, meta) -> ScoreModel:
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    architecture = (config.architectures or [""])[0]
    if (path / "score_head.safetensors").exists():  # this project's first format
        backbone = from_pretrained(AutoModel, path, dtype, trust_remote_code, meta)
        head_state = load_file(str(path / "score_head.safetensors"))
        model = ScoreModel(backbone, bias="bias" in head_state)
        model.head.load_state_dict(head_state)
        return model.to(dtype)
    for kind, auto_name in SCORE_KINDS.items():
        if architecture.endswith(auto_name.removeprefix("AutoModel")):
            if config.num_labels != 1:
                raise InputError(f"{what} {path}: a {architecture} with {config.num_labels} labels; "
                                 "a reward model or discriminator gives one score (num_labels=1)")
            hf_model = from_pretrained(getattr(transformers, auto_name), path, dtype, trust_remote_code, meta)
            head = getattr(hf_model, _head_name(hf_model))
            model = ScoreModel(hf_model.base_model, bias=head.bias is not None)
            model.head = head
            return model
    weights = _weight_names(path)
    if "value_head.weight" in weights:  # OpenRLHF: backbone + value_head, optional normalisation
        backbone = from_pretrained(AutoModel, path, dtype, trust_remote_code, meta)
        model = ScoreModel(backbone, bias=False)
        model.head.weight.data.copy_(_read_weight(path, "value_head.weight"))
        if getattr(config, "normalize_reward", False):  # score = (r − mean) / std, folded into the head
            std = float(getattr(config, "std", 1.0)) or 1.0
            model.head.weight.data /= std
            model.head.bias = nn.Parameter(torch.full((1,), -float(getattr(config, "mean", 0.0)) / std))
        return model.to(dtype)
    raise InputError(f"{what} {path}: no trained score head (expected a *ForSequenceClassification or "
                     "*ForTokenClassification checkpoint with num_labels=1, an OpenRLHF value_head, or "
                     "score_head.safetensors); train one with redistribute.py or discriminator.py")


def _weight_names(path: Path) -> set[str]:
    names = set()
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            names.update(f.keys())
    return names


def _read_weight(path: Path, name: str) -> torch.Tensor:
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            if name in f.keys():
                return f.get_tensor(name)
    raise KeyError(name)


def read_run_info(model_dir) -> dict:
    """token_rlhf.json of a saved score model ({} for one trained elsewhere)."""
    path = Path(model_dir) / "token_rlhf.json"
    if not path.exists():
        legacy = Path(model_dir) / "score_model.json"  # the project's first format
        path = legacy if legacy.exists() else path
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


# ----------------------------------------------------------------------------------------------
# System: torchrun, DDP, precision, optimisation
# ----------------------------------------------------------------------------------------------
@dataclass
class DistInfo:
    """Where this process stands under torchrun: rank, local rank, world size, device, and whether the
    trained models are sharded (--fsdp with more than one process) or replicated (DDP)."""

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
        """Build models on the meta device instead of reading them: under FSDP only rank 0 reads the weights."""
        return self.fsdp and not self.master


def add_system_args(parser):
    """The options every training stage shares (device, precision, memory, seed)."""
    group = parser.add_argument_group("system")
    group.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    add_precision_args(group)
    group.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute activations in the backward pass: less memory, ~30%% more compute")
    group.add_argument("--fsdp", action="store_true",
                       help="under torchrun: shard weights, gradients and optimizer states over the ranks (FSDP2) "
                            "instead of replicating them (DDP); for models that outgrow one GPU")
    group.add_argument("--seed", type=int, default=0,
                       help="random seed of initialisation, data order and sampling (not of the data split)")
    group.add_argument("--trust-remote-code", action="store_true",
                       help="allow model repos that ship their own Python code (off by default)")
    return group


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the docstring's layout and shows every option's default."""


def check_positive(parser, args, *names):
    for name in names:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")


# Options that change how a run is carried out but not what it computes: a resume may change them.
NOT_DEFINING = {"out", "resume", "force_resume", "device", "save_every", "eval_every", "log_every", "stop_after",
                "log_gold", "gradient_checkpointing", "trust_remote_code", "eval_batch_size", "eval_examples",
                "micro_batch_size", "offload_frozen", "command", "fsdp", "report_to"}


def frozen_dtype(args, device: torch.device) -> torch.dtype:
    """--frozen-dtype as a torch dtype (auto: bfloat16 when the run computes in bf16, float32 otherwise)."""
    if args.frozen_dtype == "auto":
        return torch.bfloat16 if use_bf16(args.precision, device) else torch.float32
    return getattr(torch, args.frozen_dtype)


def base_dtype(args, device: torch.device) -> torch.dtype:
    """The dtype to load a model to train in: float32, or --frozen-dtype when LoRA freezes it (--lora-rank > 0)."""
    return frozen_dtype(args, device) if getattr(args, "lora_rank", 0) else torch.float32


def run_config(args, ignore=(), **derived) -> dict:
    """The settings that define a run (all options but NOT_DEFINING and `ignore`, plus derived values
    such as the planned total steps): stored with every checkpoint, compared on resume."""
    config = {k: v for k, v in vars(args).items() if k not in NOT_DEFINING and k not in ignore}
    return json.loads(json.dumps({**config, **derived}, default=str))


def add_resume_args(group):
    group.add_argument("--no-resume", dest="resume", action="store_false",
                       help="ignore a checkpoint in --out and start over")
    group.add_argument("--force-resume", action="store_true",
                       help="resume even if the checkpoint was made with other settings (data, model, schedule)")
    return group


def setup_distributed(device: str = "auto", fsdp: bool = False) -> DistInfo:
    """Read RANK / LOCAL_RANK / WORLD_SIZE as torchrun sets them (nanoGPT style).

    NCCL on CUDA, gloo on CPU. Without torchrun this is a single process (and --fsdp has nothing to
    shard over: the run is the plain single-process one, with a warning).
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
            raise InputError(f"--fsdp needs torch >= 2.6 (FSDP2's fully_shard); this is torch {torch.__version__}")
        if not torch_dist.is_initialized():  # (a caller that set up the process group itself keeps it)
            torch_dist.init_process_group(backend="nccl" if want_cuda else "gloo")
        return DistInfo(rank, local_rank, world_size, dev, fsdp=fsdp)
    if fsdp:
        warnings.warn("--fsdp with one process: nothing to shard over, running unsharded (launch with torchrun)",
                      stacklevel=2)
    return DistInfo(device=torch.device("cuda" if want_cuda else (device if device != "auto" else "cpu")))


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
    """The trained model on this rank's device, data parallel over the ranks: replicated (DDP), or sharded
    (FSDP2, --fsdp: see shard_model; a bf16 `precision` then picks the bf16 mixed-precision policy, on CUDA
    and, since FSDP2 supports it with gloo, on CPU). The model itself in a single process. Call it before
    building the optimizer (FSDP replaces the parameters)."""
    if dist_info.fsdp:
        return shard_model(model, dist_info, mixed_precision=use_bf16(precision, dist_info.device))
    model = model.to(dist_info.device)
    if not dist_info.enabled:
        return model
    ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A loaded model in the frozen dtype, a ScoreModel's scalar head kept fp32."""
    model = model.to(dtype)
    if isinstance(model, ScoreModel):
        model.head.float()
    return model


def prepare_frozen(model: nn.Module, dist_info: DistInfo, offload: bool = False, precision="fp32") -> nn.Module:
    """A model that is only read (PPO's reference, reward model, discriminator): eval mode, no gradients,
    dropout off; on this rank's device (the CPU with offload), or sharded like the trained ones under FSDP.
    It computes the way the trained models do (the precision section): one process or DDP, bf16 weights
    upcast layer by layer (compute_in_fp32); FSDP, the trained models' mixed-precision policy (bf16
    weights all-gathered and used in bf16, which the bf16-rounded policy then shares exactly)."""
    model = disable_dropout(model).eval().requires_grad_(False)
    if dist_info.fsdp:
        if offload:
            raise InputError("--offload-frozen and --fsdp do not go together: FSDP already spreads the frozen "
                             "models over the ranks")
        return shard_model(model, dist_info, mixed_precision=use_bf16(precision, dist_info.device))
    return compute_in_fp32(model.to("cpu" if offload else dist_info.device))


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself: FSDP shards in place)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def accumulate(models, last: bool):
    """Gradient accumulation: DDP skips the all-reduce of gradients except on a step's last micro-batch.
    Call the micro-batch's forward and backward inside this block.

    FSDP reduce-scatters after every micro-batch instead: its gradients then stay sharded (1/N of them
    per rank). Skipping the sync (FSDP's set_requires_gradient_sync(False)) would keep a full, unsharded
    fp32 gradient on every rank until the last micro-batch, 4 bytes per parameter: the memory FSDP is
    there to save. The accumulated gradient is the same (an average of sums is a sum of averages).
    """
    stack = contextlib.ExitStack()
    for model in (models if isinstance(models, (list, tuple)) else [models]):
        if not last and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            stack.enter_context(model.no_sync())
    return stack


def micro_batches(examples: list, size: int) -> list[list]:
    return [examples[i: i + size] for i in range(0, len(examples), size)]


def rank_batches(examples: list, size: int, dist_info: DistInfo) -> list[tuple[list, float]]:
    """This rank's share of `examples` (every world_size-th) in micro-batches of `size`, as (micro-batch,
    weight) pairs for an evaluation loop to add up weight × its sums. The weight is 1, except under FSDP:
    every forward of a sharded model is a collective (it all-gathers weights), so every rank must run as
    many; a rank with fewer micro-batches repeats a real one with weight 0 (computed, not counted)."""
    batches = [(chunk, 1.0) for chunk in micro_batches(examples[dist_info.rank::dist_info.world_size], size)]
    if dist_info.fsdp and examples:
        most = math.ceil(math.ceil(len(examples) / dist_info.world_size) / size)  # rank 0's count, the largest
        batches += [(examples[:1], 0.0)] * (most - len(batches))
    return batches


def check_batch_size(batch_size: int, dist_info: DistInfo, what: str = "--batch-size"):
    """Every rank needs a share of the global batch; under FSDP an equal one (each micro-batch is a collective)."""
    if batch_size < dist_info.world_size:
        raise InputError(f"{what} {batch_size} is smaller than the {dist_info.world_size} processes")
    if dist_info.fsdp and batch_size % dist_info.world_size:
        raise InputError(f"{what} {batch_size}: with --fsdp it must be a multiple of the {dist_info.world_size} "
                         "processes (every rank runs as many forward passes)")


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip the gradient norm to max_norm (0 = off); return the norm before clipping. Under FSDP the
    gradients are DTensor shards: torch reduces the norm over the ranks and every rank scales its shard
    by the same factor; the norm comes back as a DTensor, made a number here."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None],
                                          max_norm if max_norm > 0 else float("inf"))
    if DTensor is not None and isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


# ----------------------------------------------------------------------------------------------
# Precision: one flag, the same meaning in every stage
# ----------------------------------------------------------------------------------------------
# --precision bf16 is the path every GPU run takes, and it runs on the CPU too (torch.autocast has a
# CPU bf16 kernel set), so the tests exercise it:
#   trained weights, their gradients and AdamW states   fp32 ("master weights")
#   matmuls of the forward and backward                  bf16, by torch.autocast (fp32 accumulation)
#   frozen weights (reference, reward model, discriminator, a LoRA base)   stored in bf16 (--frozen-dtype auto)
#   scalar heads (reward, discriminator logit, value)    fp32, outside autocast (common.ScoreModel)
#   log-probs, losses, rewards, advantages               fp32 (the logits are upcast before log_softmax)
# One design rule keeps PPO exact at its first iteration: a frozen model computes the way a trained model
# computes. A bf16-stored model run as it is keeps its residual stream, embeddings and norms in bf16,
# while the fp32 policy under autocast keeps them in fp32: the log-probs differ by bf16 noise, KL is not 0
# at iteration 0 and the KL penalty rewards noise. So a bf16 frozen model is *stored* in bf16 but run with
# each layer's weights upcast to fp32 for the duration of that layer's call (compute_in_fp32: one small
# layer's fp32 copy at a time), and PPO starts the policy at the bf16 values of its weights
# (round_like_frozen), the point the reference stores. The two then run the same arithmetic on the
# same numbers, and KL = 0, ratio = 1 hold at iteration 0 in bf16 as they do in fp32
# (tests/test_precision.py). Under FSDP the same rule holds through the sharding: see prepare_frozen.
PRECISIONS = ("auto", "fp32", "bf16")


def add_precision_args(group):
    group.add_argument("--precision", default="auto", choices=PRECISIONS,
                       help="bf16: bf16 autocast, frozen models stored in bf16, trained weights, heads and optimizer "
                            "states in fp32 (the GPU path; runs on the CPU too); fp32: everything in fp32; "
                            "auto: bf16 on CUDA, fp32 on CPU")
    group.add_argument("--no-bf16", dest="precision", action="store_const", const="fp32",
                       help="the same as --precision fp32 (kept for older command lines)")
    group.add_argument("--frozen-dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                       help="storage dtype of the weights that are never trained (a LoRA base; PPO's reference, "
                            "reward model and discriminator); auto: bfloat16 when --precision is bf16, else float32")
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
    """bf16 autocast where --precision asks for it (auto: on CUDA), on CUDA and CPU alike; else no-op."""
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
    """A frozen bf16-stored model that computes like an fp32 model: each module that owns bf16 weights
    (a linear, an embedding, a norm) gets them as fp32 for its own call and bf16 again right after (both
    casts exact). Under autocast the matmuls still run in bf16; embeddings, norms and the residual stream
    in fp32, as in the trained fp32 models. For frozen models run under no_grad only (not a LoRA base)."""
    if getattr(model, "_computes_in_fp32", False) or not any(p.dtype == torch.bfloat16 for p in model.parameters()):
        return model
    for module in model.modules():
        if any(p.dtype == torch.bfloat16 for p in module.parameters(recurse=False)):
            module.register_forward_pre_hook(_upcast_params)
            module.register_forward_hook(_downcast_params)
    model._computes_in_fp32 = True
    return model


@torch.no_grad()
def round_like_frozen(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Round a trained model's fp32 weights to the values a frozen copy stored in `dtype` holds (bf16), so
    that PPO's policy starts exactly at its bf16 reference (a change below bf16's 3 significant digits,
    the rounding every frozen copy already makes). Nothing for fp32."""
    if dtype != torch.float32:
        for param in model.parameters():
            if param.dtype == torch.float32:
                param.copy_(param.to(dtype))
    return model


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay from the base learning rate to 0 over total_steps, no warm-up."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps))))


def adamw(model: nn.Module, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW over the trained parameters, with weight decay on matrices only (not on biases and norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def total_steps_of(n_examples: int, batch_size: int, epochs: float, max_steps: int | None) -> int:
    """The planned optimizer steps of a run: --max-steps, or --epochs passes of full global batches."""
    if max_steps is not None:
        return max_steps
    return max(1, math.ceil(epochs * max(1, n_examples // batch_size)))


def enable_gradient_checkpointing(model: nn.Module):
    """Recompute activations in the backward pass (Hugging Face's own, non-reentrant: works with DDP
    and with frozen inputs). Active in train() mode only, so generation in eval() keeps its KV cache."""
    hf_model = model.backbone if isinstance(model, ScoreModel) else model
    if hasattr(hf_model, "activation_checkpointing_enable"):  # transformers >= 5
        hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf_model.config.use_cache = False


# ----------------------------------------------------------------------------------------------
# FSDP2: shard models that outgrow one GPU
# ----------------------------------------------------------------------------------------------
# DDP keeps a full copy of every weight, gradient and AdamW state on every GPU (16 bytes per trained
# parameter), so more GPUs buy speed, not room. FSDP (fully sharded data parallel) cuts each of them
# into world_size pieces, one per rank. Before a decoder layer runs, its pieces are all-gathered into
# the full weights, which are freed again right after (in the forward, and once more in the backward);
# gradients are reduce-scattered, each rank receiving the average of its own piece. So a rank holds
# 1/N of the training state plus one layer's full weights at a time. The maths of a step is that of
# DDP and of one process with the same global batch (tests/test_fsdp.py checks it to 1e-4).
#
# --fsdp reaches this section through the functions the stages already call:
#   wrap_model          shard_model: each decoder layer (the model's own _no_split_modules), then the root;
#                       with --precision bf16 (CUDA, or CPU with gloo) mixed precision: bf16 weights for
#                       compute, fp32 gradient reduction;
#                       activation checkpointing is switched on before (enable_gradient_checkpointing)
#   prepare_frozen      the frozen models (reference, reward model, discriminator) are sharded too
#   load_*(meta=...)    rank 0 reads the weights; the other ranks build the model on the meta device
#                       and shard_model sends each its pieces (host memory: see shard_model)
#   accumulate, clip_grad_norm, rank_batches    gradient accumulation, clipping, equal forward counts
#   save_checkpoint / load_checkpoint           every rank writes and reads its own shards (DCP format)
#   save_policy / save_score_model              full_state_dict: gathered to rank 0, LoRA merged
# and in ppo_token.py: gathered (the policy stays whole during the rollout), on_every_rank (generation
# stops when every rank is done).
# Rules that come with it: every rank runs the same sequence of forwards, backwards and state-dict
# calls on a sharded model (each is a collective); frozen models are not offloaded to the CPU.
# LoRA and FSDP together: the frozen base and the trained adapters are sharded alike (FSDP accepts a
# bf16 base beside fp32 adapters in one layer: only the trained parameters must share a dtype).


def is_sharded(model: nn.Module) -> bool:
    return FSDPModule is not None and isinstance(model, FSDPModule)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules sharded one by one: those of a class the model lists in _no_split_modules (GPT2Block,
    LlamaDecoderLayer, ...: Hugging Face's name for the blocks that must stay whole), the outermost ones."""
    names = {name for module in model.modules() for name in (getattr(module, "_no_split_modules", None) or [])}
    if not names:  # (every Hugging Face transformer lists them; also found inside a ScoreModel)
        raise ValueError(f"{type(model).__name__} names no decoder layer class (_no_split_modules): --fsdp shards "
                         "a Hugging Face transformer layer by layer")
    layers, inside = [], []
    for name, module in model.named_modules():
        if type(module).__name__ in names and not any(name.startswith(prefix + ".") for prefix in inside):
            layers.append(module)
            inside.append(name)
    return layers


def shard_model(model: nn.Module, dist_info: DistInfo, mixed_precision: bool = False) -> nn.Module:
    """fully_shard each decoder layer, then the root (embeddings, final norm, heads: what is left), and
    give every rank its pieces of rank 0's weights. Changed in place: the class becomes FSDP<Class>, every
    parameter a DTensor holding this rank's piece.

    Each fully_shard call makes one unit that is all-gathered together just before it runs; layer by layer
    keeps one layer's full weights in memory at a time. reshard_after_forward=True for the root too: a
    frozen model runs under no_grad and never reaches the backward where a root left whole would be freed.
    mixed_precision (--precision bf16; CUDA, and CPU with gloo): weights all-gathered and used in bf16 (half
    the traffic), gradients reduced in fp32, the sharded fp32 weights stepped by AdamW in fp32.

    Weights come from rank 0. The other ranks may have built the model on the meta device (load_policy,
    load_score_model, new_score_model with meta=True) instead of reading it: they allocate their pieces
    only, and rank 0 sends each tensor in turn (broadcast_from_rank0), each rank keeping its piece.
    Non-persistent buffers (Llama's rotary inv_freq) are in no state dict, so they are broadcast apart.
    Host memory for W bytes of weights on N ranks: rank 0 peaks at W + W/N (the model it read and its
    piece), every other rank at W/N plus the largest single tensor in transit, instead of W + W/N on every
    rank. Measured on 2 gloo ranks, growth of the peak RSS while loading and sharding a GPT-2 of 55 M
    parameters (210 MiB fp32, 16 layers, largest tensor 16 MiB; bench/bench_fsdp_load.py): rank 1 123 MiB
    instead of 239, rank 0 319 either way. When one tensor is most of the model (a 50k vocabulary on a
    51 M model: 98 MiB of 196) it travels whole and little is saved (197 instead of 209 MiB). For a 7B
    model (28 GB fp32, largest tensor 0.5 GB) on 8 ranks: ~32 GB on rank 0 and ~4 GB on each other rank,
    ~60 GB for the node instead of ~250 GB.
    Fresh heads and LoRA adapters come from rank 0 the same way, so every rank starts from the same ones.
    """
    # FSDP warns about every model output that is a view (a ScoreModel's squeeze) in case the caller modifies it
    # in place, which would skip a hook; no code here does
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(dist_info.device.type, (dist_info.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
        else MixedPrecisionPolicy()
    on_meta = any(p.is_meta for p in model.parameters())
    rank0_weights = model.state_dict() if dist_info.master else {}  # references to the loaded tensors, no copy
    if not on_meta:
        model.to(dist_info.device)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    if on_meta:
        model.to_empty(device=dist_info.device)  # this rank's pieces and the buffers, not yet filled
    set_model_state_dict(model, rank0_weights,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del rank0_weights
    for buffer in model.buffers():
        torch_dist.broadcast(buffer.data, src=0)
    return model


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Under FSDP: keep a model's full weights from its first forward in this block to the end of the
    block, then reshard. Nothing otherwise. (Memory: the whole model on every rank meanwhile, as DDP.)"""
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
    """True when `flag` is True on every rank (one all-reduce of a number; the flag itself in one process)."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return flag
    value = torch.tensor([int(flag)], device=device)  # on the rows' device: NCCL wants CUDA tensors
    torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MIN)
    return bool(value.item())


def _rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_available() and torch_dist.is_initialized() else 0


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0's CPU ({} on the other ranks), LoRA adapters merged in:
    W' = W + (α/r)·B·A for every adapted layer, in fp32, no adapter tensors left (lora.merged_state_dict).
    Every rank calls it. Under FSDP the shards are gathered one tensor at a time and moved to the CPU,
    so no GPU ever holds the whole model; rank 0's host memory holds one full copy."""
    model = unwrap(model)
    if is_sharded(model):
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        first = {}  # a tied weight (GPT-2's lm_head = wte) comes back under both names: keep the first, as state_dict()
        for name, parameter in model.named_parameters(remove_duplicate=False):
            if first.setdefault(id(parameter), name) != name:
                state.pop(name, None)
    else:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()} if _rank() == 0 else {}
    if state and lora.lora_layers(model):  # merged in fp32: a bf16 base would round small changes away
        state = lora.merged_state_dict(model, {k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return state


def frozen_copy(linear: nn.Linear) -> nn.Linear:
    """A frozen, unsharded fp32 copy of a linear layer (a score head) on every rank (FSDP: all-gathered)."""
    weight, bias = (None if t is None else (t.full_tensor() if isinstance(t, DTensor) else t).detach().float()
                    for t in (linear.weight, linear.bias))
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device)
    with torch.no_grad():
        head.weight.copy_(weight)
        if bias is not None:
            head.bias.copy_(bias)
    return head.requires_grad_(False)


def _sharded_state(models: dict, optimizers: dict) -> dict:
    """What a sharded checkpoint holds: each model's trained tensors and its optimizer's states, as this
    rank's pieces (DTensors: nothing is gathered). Frozen weights (a LoRA base) are left out."""
    state = {}
    for name, model in models.items():
        model = unwrap(model)
        state[f"model.{name}"] = get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True))
        state[f"optimizer.{name}"] = get_optimizer_state_dict(model, optimizers[name])
    return state


def _load_sharded(path: Path, models: dict, optimizers: dict):
    """Read a sharded checkpoint into models and optimizers (in place): each rank reads its pieces (DCP also
    reshards for another world size, and fills an unsharded model when resumed without --fsdp)."""
    state = _sharded_state(models, optimizers)  # the layout to fill
    with warnings.catch_warnings():  # one process reading it is what we mean
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))
    for name, model in models.items():
        model = unwrap(model)
        set_model_state_dict(model, state[f"model.{name}"],
                             options=StateDictOptions(ignore_frozen_params=True, strict=False))
        set_optimizer_state_dict(model, optimizers[name], state[f"optimizer.{name}"])


# ----------------------------------------------------------------------------------------------
# Files: atomic writes, logs, caches, checkpoints
# ----------------------------------------------------------------------------------------------
def atomic_write(path, text: str):
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


def read_jsonl_tolerant(path, what: str = "line") -> list[dict]:
    """Rows of a JSONL file this project appends to (a log, an answer cache). A line cut short by a kill
    or a full disk (the last one, usually) is skipped with a warning on stderr instead of stopping the run."""
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    for line_no, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            print(f"warning: {path} line {line_no}: unreadable {what} (cut short by a kill?), skipped", file=sys.stderr)
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


# --- live curves: --report-to tensorboard | wandb, beside log.jsonl (the source of truth) ---------
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --report-to -> the package it needs


def report_to(value: str) -> str:
    """--report-to's type: none, or a tracker whose package is installed; a missing one is one line
    naming the package (an InputError: exit code 2 under cli, before any work)."""
    package = TRACKERS.get(value)
    if package and importlib.util.find_spec(package) is None:
        raise InputError(f"--report-to {value} needs the {package} package: pip install {package}")
    return value


def add_report_args(group):
    group.add_argument("--report-to", default="none", type=report_to, choices=("none", *TRACKERS),
                       help="also send every log.jsonl line to a tracker, from rank 0, with the "
                            "run's arguments as its config: tensorboard (OUT/tensorboard; "
                            "`tensorboard --logdir OUT`) or wandb (project $WANDB_PROJECT, default "
                            "token-rlhf); log.jsonl is written either way")
    return group


class Tracker:
    """The numbers of each log record, sent to TensorBoard or Weights & Biases (rank 0 only) under
    their log.jsonl names, at the record's own step. Strings, lists and None stay in log.jsonl."""

    def __init__(self, kind: str, out_dir, config: dict, start_step: int = 0):
        self.kind, self.out_dir, self.run = kind, Path(out_dir), None
        config = json.loads(json.dumps(config, default=str))
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            # purge_step: on a resume, what was logged after the checkpoint is dropped
            self.writer = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"),
                                        purge_step=start_step + 1 if start_step else None)
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)
        elif kind == "wandb":
            import wandb

            id_file = self.out_dir / "wandb_run_id"  # a resumed run continues the same W&B run
            resumed = start_step and id_file.exists()
            run_id = id_file.read_text().strip() if resumed else wandb.util.generate_id()
            atomic_write(id_file, run_id + "\n")
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "token-rlhf"),
                                  name=self.out_dir.name, id=run_id, resume="allow",
                                  dir=str(self.out_dir), config=config)
        else:
            raise ValueError(f"unknown tracker {kind!r}")
        atexit.register(self.close)

    def log(self, record: dict):
        step = int(record.get("step", 0))
        scalars = {k: float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.kind == "tensorboard":
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()  # a run killed a moment later still shows its curves
        else:
            self.run.log(scalars, step=step)

    def close(self):
        if self.kind == "tensorboard":
            self.writer.close()
        elif self.run is not None:
            self.run.finish()
            self.run = None


def open_tracker(args, out_dir, start_step: int = 0, enabled: bool = True) -> Tracker | None:
    """The tracker --report-to asks for; None for none, on ranks but 0, or without the option."""
    kind = getattr(args, "report_to", "none")
    return Tracker(kind, out_dir, vars(args), start_step) if enabled and kind != "none" else None


class JsonlLogger:
    """Appends one JSON object per line (rank 0 only); prints nothing itself. With a tracker
    (--report-to), every record goes there too."""

    def __init__(self, path, enabled: bool = True, tracker: Tracker | None = None):
        self.path = Path(path) if path else None
        self.enabled = enabled and self.path is not None
        self.tracker = tracker if self.enabled else None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def rewind(self, step: int):
        """On resume from a checkpoint at `step`: drop the lines of later steps (they will be logged
        again) and a torn last line, so the log never holds a step twice or a broken line."""
        if self.enabled and self.path.exists():
            kept = [row for row in read_jsonl_tolerant(self.path) if row.get("step", 0) <= step]
            atomic_write(self.path, "".join(json.dumps(row) + "\n" for row in kept))

    def log(self, record: dict):
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if self.tracker is not None:
                self.tracker.log(record)


def save_hf(model: nn.Module, tokenizer, out_dir, **save_kwargs):
    """Save a model and its tokenizer in Hugging Face format into out_dir (save_kwargs go to save_pretrained,
    e.g. state_dict=: the tensors to write instead of the model's own, a copy is passed: it pops keys).

    Everything is written to a temp folder first and then renamed file by file, so a crash never
    leaves half a weight file; other files in out_dir (checkpoint/, log.jsonl) are kept. A temp
    folder left by a kill is removed by clean_stale_temp at the next start.
    """
    _quiet_transformers()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".save-"))
    if "state_dict" in save_kwargs:
        save_kwargs["state_dict"] = dict(save_kwargs["state_dict"])
    try:
        unwrap(model).save_pretrained(tmp, **save_kwargs)
        tokenizer.save_pretrained(tmp)
        for item in tmp.iterdir():
            os.replace(item, out_dir / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def clean_stale_temp(out_dir):
    """Remove the temp folders a kill during a save leaves behind (.save-*, checkpoint/.tmp-*)."""
    out_dir = Path(out_dir)
    for pattern in (".save-*", "checkpoint/.tmp-*", "*/.save-*"):
        for stale in out_dir.glob(pattern):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)


# A checkpoint is OUT/checkpoint/step-000120/: the trained tensors of each model (safetensors), and
# state.pt (optimizer and schedule states, step, RNG, the run's defining settings) that loads with
# weights_only=True. It is written as checkpoint/.tmp-step-000120 and renamed into place in ONE
# rename; older steps are deleted only after that. A kill at any moment therefore leaves at least one
# complete step folder, and resuming takes the newest complete one.
# Trained tensors only: with LoRA the adapters and heads (the base is read again from the model folder),
# so a checkpoint of a 7B LoRA run is megabytes, not gigabytes.
# Under FSDP the models and optimizer states go to step-000120/sharded/ instead, in the
# torch.distributed.checkpoint format (one .distcp file per rank and a .metadata index): every rank
# writes and reads its own pieces, none holds the whole model. All ranks must see the same folder.
STEP_DIR = re.compile(r"step-(\d{9})")
SHARDED = "sharded"


def trained_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: every parameter that requires grad (all of them in full fine-tuning,
    only adapters and heads with LoRA), on the CPU."""
    return {name: p.detach().contiguous().cpu() for name, p in unwrap(model).named_parameters() if p.requires_grad}


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


def latest_checkpoint(out_dir) -> Path | None:
    """The newest complete checkpoint folder in out_dir/checkpoint, or None."""
    steps = [p for p in (Path(out_dir) / "checkpoint").glob("step-*") if STEP_DIR.fullmatch(p.name)
             and (p / "state.pt").exists()]
    return max(steps, key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)), default=None)


def save_checkpoint(out_dir, step: int, models: dict, optimizers: dict, schedulers: dict | None = None,
                    run_config: dict | None = None, **extra):
    """Write OUT/checkpoint/step-N atomically (see above), then delete the older steps. Every rank calls
    it: rank 0 writes, and under FSDP every rank writes its pieces too. `optimizers` has the keys of `models`."""
    sharded = any(is_sharded(unwrap(model)) for model in models.values())
    master = _rank() == 0
    if not (master or sharded):
        return
    root = Path(out_dir) / "checkpoint"
    final = root / f"step-{step:09d}"
    tmp = root / f".tmp-{final.name}"
    if master:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / SHARDED if sharded else tmp).mkdir(parents=True)
    if sharded:
        barrier()
        dcp.save(_sharded_state(models, optimizers), checkpoint_id=str(tmp / SHARDED))
        barrier()  # every rank's pieces are written
        if master:
            _publish_checkpoint(tmp, final, step, {}, schedulers, run_config, extra)
        barrier()  # no rank reads or writes on before the new step is in place
        return
    for name, model in models.items():
        state = trained_state_dict(model)
        # tied weights (GPT-2's lm_head = wte) share storage; safetensors wants each tensor once
        seen, unique = set(), {}
        for key, tensor in state.items():
            ident = (tensor.data_ptr(), tensor.shape, tensor.stride()) if tensor.numel() else None
            if ident is None or ident not in seen:
                seen.add(ident)
                unique[key] = tensor
        save_file(unique, str(tmp / f"{name}.safetensors"))
    _publish_checkpoint(tmp, final, step, {k: opt.state_dict() for k, opt in optimizers.items()}, schedulers,
                        run_config, extra)


def _publish_checkpoint(tmp: Path, final: Path, step: int, optimizer_states: dict, schedulers, run_config, extra):
    """state.pt into the temp folder, then the one rename, then the older steps go."""
    root = final.parent
    state = {"step": step, "run_config": run_config or {}, "rng": rng_state(), "optimizers": optimizer_states,
             "schedulers": {k: s.state_dict() for k, s in (schedulers or {}).items()}, **extra}
    torch.save(state, tmp / "state.pt")
    if final.exists():  # the same step saved twice (resumed at the end): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)  # the one rename that publishes the checkpoint
    for old in root.glob("step-*"):
        if old != final and STEP_DIR.fullmatch(old.name):
            shutil.rmtree(old, ignore_errors=True)


def resume(out_dir, models: dict, optimizers: dict, schedulers: dict | None, run_config: dict, args,
           dist_info: DistInfo, map_location="cpu") -> tuple[int, "JsonlLogger"]:
    """Where a training stage starts: step 0, or the step of the newest checkpoint in out_dir, loaded into
    the models, optimizers and schedules (it must be of this run: load_checkpoint; --no-resume ignores it,
    --force-resume takes it anyway); and OUT/log.jsonl rewound to that step (rank 0 logs)."""
    state = load_checkpoint(out_dir, models, optimizers, schedulers, run_config, args.force_resume,
                            map_location) if args.resume else None
    step = state["step"] if state else 0
    logger = JsonlLogger(Path(out_dir) / "log.jsonl", enabled=dist_info.master,
                         tracker=open_tracker(args, out_dir, step, enabled=dist_info.master))
    logger.rewind(step)  # the lines of steps after the checkpoint will be logged again
    return step, logger


def load_checkpoint(out_dir, models: dict, optimizers: dict, schedulers: dict | None = None,
                    run_config: dict | None = None, force: bool = False, map_location="cpu") -> dict | None:
    """Load the newest complete checkpoint into models, optimizers and schedulers (in place) and
    restore the RNG; return its state (step and the extra fields), or None when there is none.

    A checkpoint of a different run (another data set, model, reward or schedule: any key of
    run_config that differs) stops with the differences named, unless force.
    """
    ckpt = latest_checkpoint(out_dir)
    if ckpt is None:
        return None
    state = torch.load(ckpt / "state.pt", map_location=map_location, weights_only=True)
    saved_config = state.get("run_config", {})
    changed = {k: (saved_config.get(k), v) for k, v in (run_config or {}).items() if saved_config.get(k) != v}
    if changed and not force:
        what = "; ".join(f"--{k.replace('_', '-')} was {old!r}, now {new!r}" for k, (old, new) in changed.items())
        raise InputError(f"{ckpt} belongs to a different run ({what}); use --no-resume to start over in this "
                         "folder, another --out, or --force-resume to continue with the new settings")
    if changed:
        warnings.warn(f"--force-resume: continuing {ckpt} with changed settings {sorted(changed)}", stacklevel=2)
    if (ckpt / SHARDED).is_dir():
        _load_sharded(ckpt / SHARDED, models, optimizers)
    elif any(is_sharded(unwrap(model)) for model in models.values()):
        raise InputError(f"{ckpt} was written without --fsdp; resume it without --fsdp, or start over with "
                         "--no-resume")
    else:
        for name, model in models.items():
            tensors = load_file(str(ckpt / f"{name}.safetensors"))
            expected = trained_state_dict(model).keys()
            tied = {k for k in expected if k not in tensors and k.endswith("lm_head.weight")}
            if set(expected) - tied != set(tensors):
                raise InputError(f"{ckpt}/{name}.safetensors does not match the model (missing "
                                 f"{sorted(set(expected) - set(tensors) - tied)[:3]}, unexpected "
                                 f"{sorted(set(tensors) - set(expected))[:3]}); use --no-resume")
            unwrap(model).load_state_dict(tensors, strict=False)
        for key, optimizer in optimizers.items():
            optimizer.load_state_dict(state["optimizers"][key])
    for key, scheduler in (schedulers or {}).items():
        scheduler.load_state_dict(state["schedulers"][key])
    set_rng_state(state["rng"])
    return state


# ----------------------------------------------------------------------------------------------
# Network: one chat-completions client (label.py's reviser, eval.py's judge), an append-only JSONL
# cache for their answers, one download
# ----------------------------------------------------------------------------------------------
# label.py (the reviser) and eval.py (the judge) talk to any OpenAI-compatible
# chat-completions endpoint through ChatClient; both keep their answers in a JsonlCache; plumbing.download_hh_rlhf
# downloads hh-rlhf with download().
#
# The chat client, what it promises:
#   - The API key comes from the environment only (api_key_from_env). It is removed from every text a
#     server sends back (scrub) BEFORE that text is cut to a snippet, so no part of it can survive in an
#     error message, a cached answer, a summary or an exception.
#   - `timeout` bounds the whole request: connect, status line and headers, and the body. A server that
#     trickles its answer a byte at a time is cut off at the deadline and retried like a timeout.
#     (urllib3 bounds the connect and each read of the headers by the time left; a watchdog shuts the
#     socket at the deadline, which ends a body read in progress. A server that trickles its headers
#     themselves is bounded per read only, since urllib3 gives no hold on the socket before the
#     headers are in; the request then fails as a timeout as soon as they are.)
#   - What is retried, with exponential backoff and jitter (or the server's Retry-After, capped):
#         429, 5xx, timeouts, connection errors, a body that is not the expected JSON, a `null` or
#         non-string answer, and an answer the caller's parse() rejects (e.g. no delimiter)
#     401 / 403 / 404 and a malformed URL raise ChatFatal (bad key, base URL or model: no retry can
#     fix them); any other 4xx fails that one request without a retry.
#   - check() makes one tiny request, so a bad key, model or URL fails in one line before a long run.
#   - Thread-safe: one requests.Session per thread; `calls` counts every HTTP request made.
#
#     client = ChatClient("https://api.openai.com/v1", "gpt-4-0125-preview",
#                         api_key_from_env("OPENAI_API_KEY", "https://api.openai.com/v1"))
#     client.check()                                     # raises ChatFatal with a one-line reason
#     reply = client.complete([{"role": "user", "content": "Say hi."}], temperature=0, max_tokens=8)
#     reply.value, reply.text, reply.error, reply.calls  # value is None when every try failed

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")  # servers that may go without an API key
SNIPPET_CHARS = 300  # how much of a server's (scrubbed) text an error message shows
RETRY_AFTER_CAP = 120.0  # seconds: the longest Retry-After honoured (a longer one is cut to this)
FATAL_STATUS = (401, 403, 404)  # bad key, no access, wrong base URL or model name
DOWNLOAD_ATTEMPTS, DOWNLOAD_BACKOFF = 4, 0.5  # tries, and the first wait between them (s, doubling)


# ----------------------------------------------------------------------------------------------
# Secrets
# ----------------------------------------------------------------------------------------------
def api_key_from_env(env_name: str, api_base: str) -> str:
    """The API key from the environment variable `env_name` (never from a flag or a file). Only a
    localhost server may go without one; otherwise a missing key is a ChatFatal."""
    key = os.environ.get(env_name, "")
    if not key and urlparse(api_base).hostname not in LOCAL_HOSTS:
        raise ChatFatal(f"set the {env_name} environment variable to the API key for {api_base} "
                        "(only a localhost server may go without one)")
    return key


def scrub(text: str, secret: str) -> str:
    """Replace the API key wherever it shows up. Call it on the WHOLE text, before any cut: a key
    that straddles the cut would otherwise survive in part."""
    return text.replace(secret, "***") if secret and text else text


def snippet(text: str, limit: int = SNIPPET_CHARS) -> str:
    """An already scrubbed text as one line of at most `limit` characters (for an error message)."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


# ----------------------------------------------------------------------------------------------
# When to try again
# ----------------------------------------------------------------------------------------------
def backoff_delay(attempt: int, base: float, cap: float, rng=random) -> float:
    """Exponential backoff with jitter: uniform in [d/2, d], d = min(cap, base · 2^attempt)."""
    d = min(cap, base * 2.0 ** min(attempt, 60))
    return d / 2 + rng.random() * d / 2


def retry_after_seconds(value: str | None, cap: float = RETRY_AFTER_CAP, now: float | None = None) -> float | None:
    """Retry-After as seconds to wait, in [0, cap]: a number of seconds, or an HTTP date.

    None when absent or unusable (nan, negative, not a number or a date): the caller's own backoff
    applies then. inf, 1e12 or a date far ahead wait `cap` seconds; a date in the past waits 0.
    """
    if not value or not value.strip():
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value.strip())
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:  # "-0000": an HTTP date is always GMT
            when = when.replace(tzinfo=timezone.utc)
        seconds = max(0.0, when.timestamp() - (time.time() if now is None else now))
    if math.isnan(seconds) or seconds < 0:
        return None
    return min(seconds, cap)


# ----------------------------------------------------------------------------------------------
# One POST with a deadline on the whole request
# ----------------------------------------------------------------------------------------------
class RequestTimeout(requests.Timeout):
    """The whole request (connect, headers, body) did not finish within the timeout."""


def post_json(session: requests.Session, url: str, headers: dict, body: dict, timeout: float):
    """POST `body` as JSON; returns (status, response headers, body text). Raises RequestTimeout when
    the whole request takes longer than `timeout` seconds, requests.RequestException when it fails."""
    deadline = time.monotonic() + timeout
    try:  # connect, then each read of the status line and headers, within the time left
        resp = session.post(url, headers=headers, json=body, stream=True,
                            timeout=urllib3.util.Timeout(total=timeout, read=timeout))
    except requests.Timeout:
        raise RequestTimeout(f"no answer within {timeout:g} s") from None
    fired = threading.Event()

    def cut_off():  # at the deadline: end a body read in progress (a trickling server)
        fired.set()
        try:
            getattr(resp.raw, "shutdown", resp.raw.close)()  # urllib3 >= 2.3: shutdown wakes a blocked read
        except (OSError, RuntimeError, ValueError):
            pass  # the read had just finished

    watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), cut_off)
    watchdog.daemon = True
    watchdog.start()
    try:
        data = resp.content  # the body, read to its end (or cut off by the watchdog)
    except requests.RequestException:
        if fired.is_set():
            raise RequestTimeout(f"answer not complete within {timeout:g} s") from None
        raise
    finally:
        watchdog.cancel()
        resp.close()
    if fired.is_set():
        raise RequestTimeout(f"answer not complete within {timeout:g} s")
    return resp.status_code, resp.headers, data.decode("utf-8", errors="replace")


def answer_content(text: str) -> str | None:
    """choices[0].message.content of a chat-completions body, or None if the body is not that JSON
    or the content is not a string (null, a list, a number)."""
    try:
        content = json.loads(text)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


# The errors ChatClient reports for a failure a later run may not meet again: the network, a
# timeout, 429, 5xx, a body cut off. Every other failure is an answer that came back and could not
# be used (no delimiter, not A / B / tie, another 4xx): at temperature 0 the same question gets the
# same answer, so a rerun does not pay for it again unless asked (--retry-failed).
TRANSIENT_ERRORS = ("timeout", "request failed", "HTTP 429", "HTTP 5", "malformed answer")


def transient_error(error: str) -> bool:
    """True for a failure worth asking again in a later run (see TRANSIENT_ERRORS)."""
    return str(error).startswith(TRANSIENT_ERRORS)


def failure_counts(errors) -> dict:
    """{"transient": n, "unusable": m} of a list of failure messages."""
    transient = sum(transient_error(e) for e in errors)
    return {"transient": transient, "unusable": len(errors) - transient}


def rerun_note(counts: dict, what: str = "pairs") -> str:
    """One line: the failures of each kind and the calls a rerun will make for them."""
    transient, unusable = counts["transient"], counts["unusable"]
    asks = (f"a rerun asks again for the {transient} transient ones (at least {transient + 1} "
            "calls with the test request)" if transient else "a rerun makes no calls for them")
    return (f"failed {what}: {transient} transient (network, timeout, 429, 5xx), {unusable} with "
            f"an unusable answer (not asked again unless --retry-failed); {asks}")


# ----------------------------------------------------------------------------------------------
# The chat client
# ----------------------------------------------------------------------------------------------
class ChatFatal(InputError):
    """An error no retry can fix (bad key, base URL or model): the run stops. The message is scrubbed."""


@dataclass
class Reply:
    """What complete() got: value (parse(text), or the text without a parse), None if every try
    failed; text, the last answer (scrubbed) or None; error, why the last try failed ("" on success);
    calls, the HTTP requests made."""
    value: object
    text: str | None
    error: str
    calls: int


class ChatClient:
    """An OpenAI-compatible chat-completions endpoint with the retry policy of this module's docstring."""

    def __init__(self, api_base: str, model: str, api_key: str = "", key_env: str = "OPENAI_API_KEY",
                 timeout: float = 60.0, max_retries: int = 5, backoff_base: float = 1.0, backoff_cap: float = 60.0,
                 retry_after_cap: float = RETRY_AFTER_CAP, rng=random):
        self.url = api_base.rstrip("/") + "/chat/completions"
        self.model, self.key_env = model, key_env
        self._api_key = api_key  # sent in the Authorization header only; never shown
        self.timeout, self.max_retries = timeout, max_retries
        self.backoff_base, self.backoff_cap, self.retry_after_cap = backoff_base, backoff_cap, retry_after_cap
        self.rng = rng
        self.calls = 0  # HTTP requests made, by all threads
        self._lock, self._local = threading.Lock(), threading.local()

    def __repr__(self):
        return f"ChatClient({self.url!r}, {self.model!r})"  # no key

    def scrub(self, text: str) -> str:
        return scrub(text, self._api_key)

    def _post(self, body: dict):
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()  # one keep-alive connection pool per thread
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        with self._lock:
            self.calls += 1
        return post_json(self._local.session, self.url, headers, body, self.timeout)

    def complete(self, messages: list[dict], parse=None, invalid: str = "unusable answer", **params) -> Reply:
        """The answer to `messages` (params: temperature, max_tokens, ...), tried up to 1 + max_retries
        times. parse(answer) -> value, or None to ask again (e.g. no delimiter; `invalid` says why)."""
        body = {"model": self.model, "messages": messages, **params}
        return self._ask(body, answer_content, parse, invalid)

    def check(self):
        """One tiny request (max_tokens 1), retried like any other; raises ChatFatal with a one-line
        reason unless the endpoint answers with a chat-completions body (its content may be empty)."""
        body = {"model": self.model, "messages": [{"role": "user", "content": "Reply with OK."}],
                "max_tokens": 1, "temperature": 0}

        def read(text):  # any body with a list of choices will do
            try:
                return "" if isinstance(json.loads(text)["choices"], list) else None
            except (ValueError, KeyError, TypeError):
                return None

        reply = self._ask(body, read, None, "")
        if reply.value is None:
            raise ChatFatal(f"{self.url} failed a one-token test request ({reply.calls} tries): {reply.error}")

    def _ask(self, body: dict, read, parse, invalid: str) -> Reply:
        """The retry loop. read(body text) -> the answer, or None when the body is malformed;
        parse(answer) -> value, or None to ask again."""
        error, answer, wait = "", None, 0.0
        for attempt in range(self.max_retries + 1):
            time.sleep(wait)
            wait = backoff_delay(attempt, self.backoff_base, self.backoff_cap, self.rng)
            try:
                status, headers, text = self._post(body)
            except RequestTimeout as e:
                error = f"timeout: {e}"
                continue
            except requests.RequestException as e:
                reason = snippet(self.scrub(f"{type(e).__name__}: {e}"))
                if isinstance(e, ValueError):  # MissingSchema, InvalidURL, ...: the base URL is wrong
                    raise ChatFatal(f"cannot send a request to {self.url}: {reason}") from None
                error = f"request failed: {reason}"
                continue
            text = self.scrub(text)  # the whole text, before any cut: no piece of the key can survive
            if status in FATAL_STATUS:
                raise ChatFatal(f"HTTP {status} from {self.url}: {snippet(text)} (check the key in "
                                f"${self.key_env}, the base URL and the model name {self.model!r})")
            if status == 429 or status >= 500:
                error = f"HTTP {status}: {snippet(text)}"
                retry_after = retry_after_seconds(headers.get("Retry-After"), self.retry_after_cap)
                wait = wait if retry_after is None else retry_after  # the server knows best
                continue
            if status != 200:  # another 4xx: this request is wrong, asking again will not help
                return Reply(None, answer, f"HTTP {status}: {snippet(text)}", attempt + 1)
            content = read(text)
            if content is None:  # not JSON, no choices, a null or non-string content
                error = f"malformed answer: {snippet(text)}"
                continue
            answer = content
            value = content if parse is None else parse(content)
            if value is not None:
                return Reply(value, answer, "", attempt + 1)
            error = invalid
        return Reply(None, answer, error, self.max_retries + 1)


# ----------------------------------------------------------------------------------------------
# An append-only JSONL cache (label.py's answers, eval.py's verdicts)
# ----------------------------------------------------------------------------------------------
class JsonlCache:
    """Records kept by key in a JSONL file that only grows: a run appends each record as it arrives
    (flushed and fsynced), so a kill loses at most the records in flight, and a rerun reads them back.

    A line torn by a kill (or otherwise unreadable) is skipped with a warning; before the first
    append a torn last line is closed off with a newline, so the new record starts a line of its own.
    The first record of a key wins. fresh=True starts the file anew (the old records are dropped).
    Records that `valid` refuses (a failure kept with its error) are in `refused`, the last wins.
    """

    def __init__(self, path, fresh: bool = False, valid=None):
        self.path, self.records, self.refused, self._lock = Path(path), {}, {}, threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not fresh and self.path.exists():
            self._read(valid or (lambda record: True))
        self._file = open(self.path, "w" if fresh else "a", encoding="utf-8")
        if not fresh and self.path.stat().st_size and not self._ends_with_newline():
            self._file.write("\n")  # close off the torn last line

    def _read(self, valid):
        for record in read_jsonl_tolerant(self.path):
            if not isinstance(record.get("key"), str):
                continue
            if valid(record):
                self.records.setdefault(record["key"], record)
            else:
                self.refused[record["key"]] = record

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def __contains__(self, key) -> bool:
        return key in self.records

    def get(self, key, default=None):
        return self.records.get(key, default)

    def add(self, record: dict):
        """Append one record (it must have a string "key"); safe to call from several threads."""
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self.records.setdefault(record["key"], record)
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())  # on disk before the next record

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------------------------
# Download a file (hh-rlhf): resume, verify, atomic rename, retries with backoff
# ----------------------------------------------------------------------------------------------
class DownloadError(OSError):
    """A download that failed after its retries; the message is one line and names the URL."""


def short_reason(error: BaseException) -> str:
    """A one-line reason for a network error: the OS's words ("[Errno 111] Connection refused")
    when requests buried them in a long message, else the message itself."""
    text = " ".join(str(error).split())
    found = re.search(r"\[Errno -?\d+\] [^'\")(]+", text)
    return f"{type(error).__name__}: {found.group(0).strip() if found else snippet(text, 200)}"


def download(url: str, target: str | Path, verify=None, attempts: int | None = None, backoff_base: float | None = None,
             backoff_cap: float = 8.0, timeout: float = 60.0, desc: str | None = None) -> Path:
    """Download `url` to `target` (progress bar); returns target, at once if it already exists.

    A partial download is kept as `<target>.part`; the next attempt resumes it with an HTTP Range
    request (or starts over if the server ignores ranges). verify(path) may raise (OSError, EOFError)
    on a broken file; the finished file is renamed into place only after it passes, so `target` is
    never a broken file. Connection errors, timeouts (per read: a large file takes long) and 5xx are
    retried with backoff; any other HTTP error fails at once. Raises DownloadError (one line).
    """
    from tqdm import tqdm

    attempts = DOWNLOAD_ATTEMPTS if attempts is None else attempts
    backoff_base = DOWNLOAD_BACKOFF if backoff_base is None else backoff_base
    target = Path(target)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    reason = ""
    for attempt in range(attempts):
        if attempt:
            time.sleep(backoff_delay(attempt - 1, backoff_base, backoff_cap))
        have = part.stat().st_size if part.exists() else 0
        try:
            with requests.get(url, stream=True, timeout=(min(timeout, 10.0), timeout),
                              headers={"Range": f"bytes={have}-"} if have else {}) as resp:
                if resp.status_code == 416:  # range past the end: the part is complete
                    pass
                elif resp.status_code in (200, 206):
                    mode = "ab" if resp.status_code == 206 else "wb"
                    total = int(resp.headers.get("Content-Length", 0)) + (have if mode == "ab" else 0)
                    with open(part, mode) as f, tqdm(total=total or None, initial=have if mode == "ab" else 0,
                                                     unit="B", unit_scale=True, desc=desc or target.name) as bar:
                        for chunk in resp.iter_content(1 << 16):
                            f.write(chunk)
                            bar.update(len(chunk))
                elif resp.status_code >= 500 or resp.status_code in (408, 429):
                    reason = f"HTTP {resp.status_code}"
                    continue
                else:
                    raise DownloadError(f"could not download {url}: HTTP {resp.status_code}")
            try:
                if verify is not None:
                    verify(part)
            except (OSError, EOFError) as e:
                part.unlink(missing_ok=True)  # complete but broken: start clean
                reason = f"downloaded file is broken ({type(e).__name__}: {snippet(str(e), 100)})"
                continue
            os.replace(part, target)
            return target
        except requests.RequestException as e:
            reason = short_reason(e)
    raise DownloadError(f"could not download {url} after {attempts} attempts ({reason})")


def verify_gzip(path: Path):
    """Raise (EOFError, gzip.BadGzipFile) if `path` is not a complete gzip file."""
    with gzip.open(path, "rb") as f:
        while f.read(1 << 20):
            pass
