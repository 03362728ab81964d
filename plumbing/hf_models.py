"""plumbing/hf_models.py — Hugging Face models and tokenizers: load_tokenizer, load_policy,
new_score_model / load_score_model / save_score_model (the project's, the standard, TRL's and
OpenRLHF's formats), save_policy, save_hf, the tiny models of the tests (build_tiny, TINY_FAMILIES),
the tokenizer checks (the models of one run must agree), dropout off, gradient checkpointing.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import requests
import torch
import torch.nn as nn
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import (
    ByteLevelBPETokenizer,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    GPT2Config,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from common import InputError, ScoreModel
from plumbing import checkpoint, distributed

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
            raise InputError(
                f"{what} {name}: a folder without config.json, not a Hugging Face model directory")
        return
    if path.exists():
        raise InputError(f"{what} {name}: a file, not a model directory or hub name")
    repo_id = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name)
    if (
        not repo_id
        or name.startswith((".", "~"))
        or (path.parent != Path(".") and path.parent.exists())
    ):
        raise InputError(f"{what} {name}: no such directory")
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return  # in the local hub cache
    except Exception:  # an old or missing huggingface_hub: let transformers decide
        return
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise InputError(
            f"{what} {name}: not a local directory, not in the hub cache, and HF_HUB_OFFLINE is set"
        )
    try:
        requests.head(f"{HUB_ENDPOINT}/api/models/{name}", timeout=3)
    except requests.RequestException:
        raise InputError(
            f"{what} {name}: not a local directory and {HUB_ENDPOINT} cannot be reached to "
            "download it (offline?); give the path of a local copy"
        ) from None


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
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path),
                                              trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise InputError(f"{what} {name_or_path}: the tokenizer has no EOS token")
    return configure_tokenizer(tokenizer)


def from_pretrained(auto_class, name_or_path, dtype: torch.dtype, trust_remote_code: bool = False,
                    meta: bool = False):
    """auto_class.from_pretrained; with meta=True the same model built on the meta device instead
    (shapes, no storage, nothing read): what the ranks other than 0 build under --fsdp, where rank 0
    alone reads the weights and wrap_model sends every rank its shards (see the FSDP2 section). Eval
    mode either way."""
    if not meta:
        return auto_class.from_pretrained(str(name_or_path), dtype=dtype,
                                          trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = auto_class.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    # the EOS ids generation stops at, as rank 0 reads them
    if getattr(model, "generation_config", None) is not None:
        try:
            model.generation_config = GenerationConfig.from_pretrained(str(name_or_path))
        # no generation_config.json: the defaults from the config, as from_pretrained does
        except OSError:
            pass
    return model.eval()


def load_policy(name_or_path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                what: str = "policy", meta: bool = False):
    """Any Hugging Face causal LM, by hub name or local path (safetensors preferred); meta: see
    from_pretrained."""
    check_model_source(name_or_path, what)
    _quiet_transformers()
    model = from_pretrained(AutoModelForCausalLM, name_or_path, dtype, trust_remote_code, meta)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of what decides token ids: the vocabulary and the BOS / EOS tokens."""
    blob = json.dumps(
        [sorted(tokenizer.get_vocab().items()), tokenizer.bos_token, tokenizer.eos_token])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_same_tokenizer(policy_tokenizer, other_tokenizer, what: str):
    """Stop before any long work if a model reads token ids differently from the policy: every token
    of the policy's vocabulary must have the same id, and EOS must be the same token. (A score model
    may have extra tokens of its own, e.g. the pad token that save_score_model adds.)"""
    ours, theirs = policy_tokenizer.get_vocab(), other_tokenizer.get_vocab()
    differ = [(token, i, theirs.get(token)) for token, i in ours.items() if theirs.get(token) != i]
    if differ or policy_tokenizer.eos_token_id != other_tokenizer.eos_token_id:
        example = (
            f"; e.g. {differ[0][0]!r} is {differ[0][1]} for the policy and {differ[0][2]} here"
            if differ
            else f"; EOS is {policy_tokenizer.eos_token_id} vs {other_tokenizer.eos_token_id}"
        )
        raise InputError(
            f"{what}: its tokenizer differs from the policy's ({len(differ)} of {len(ours)} tokens "
            f"have other ids{example}); train it from the same SFT model"
        )


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


def build_tiny(texts: list[str], out_dir=None, arch: str = "gpt2", vocab_size: int = 2048,
               seed: int = 0, layers: int = 2, width: int = 64, dropout: float = 0.1,
               max_positions: int = 512):
    """A tokenizer trained on `texts` and a tiny random model built from a config (saved to
    out_dir).

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
    family groups them), an MLP twice as wide, untied output embeddings where the family allows.

    `dropout` is the residual and embedding dropout of the families that have one (GPT-2, NeoX,
    OPT, Phi-3). Attention dropout is 0 in every family, as in Llama's and Qwen's released
    configs: on CPU, scaled_dot_product_attention with dropout leaves its fused kernel (2.1×
    slower forward and backward at the demo model's training batch, bench/bench_attention.py).
    GPT-2's activation is "gelu_pytorch_tanh": the same tanh approximation as GPT-2's "gelu_new"
    (to 3e-7), in one fused op instead of seven (4.5× faster forward and backward). Together: a
    training step 1.29× faster, measured."""
    model_type = TINY_FAMILIES[arch][0]
    own_pad = tokenizer.pad_token is not None and tokenizer.pad_token != tokenizer.eos_token
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id if own_pad else None,
           "vocab_size": len(tokenizer)}
    if arch == "gpt2":
        ids.update(pad_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
        return GPT2Config(n_layer=layers, n_embd=width, n_head=2, n_positions=max_positions,
                          resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=0.0,
                          activation_function="gelu_pytorch_tanh", **ids)
    if arch == "gpt_neox":
        return AutoConfig.for_model(model_type, hidden_size=width, intermediate_size=2 * width,
                                    num_hidden_layers=layers, num_attention_heads=2,
                                    max_position_embeddings=max_positions,
                                    attention_dropout=0.0, hidden_dropout=dropout,
                                    tie_word_embeddings=False, **ids)
    if arch == "opt":
        return AutoConfig.for_model(model_type, hidden_size=width, ffn_dim=2 * width,
                                    word_embed_proj_dim=width, num_hidden_layers=layers,
                                    num_attention_heads=2, max_position_embeddings=max_positions,
                                    dropout=dropout, attention_dropout=0.0, **ids)
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
                                attention_dropout=0.0, tie_word_embeddings=False, **extra,
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
    # pieces never span two words
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    specials = list(dict.fromkeys(["<unk>", *specials]))
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            show_progress=False,
            special_tokens=[*specials, *byte_tokens],
        ),
    )
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                       pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                   unk_token="<unk>", **pad_kwarg)


# --- score models: the project's format, the Hugging Face standard classes, TRL, OpenRLHF ---------
# A ScoreModel (common.py) is a backbone plus one linear head. On disk it is a standard Hugging Face
# checkpoint, so other tools load it with no code of ours:
#   reward model  -> AutoModelForSequenceClassification (num_labels=1): the score of the last
#                    real token
#   discriminator -> AutoModelForTokenClassification (num_labels=1): one logit per token
# Both are read the same way by load_score_model, as are the project's older directories (a backbone
# plus score_head.safetensors), TRL reward models (sequence classification) and OpenRLHF ones
# (a backbone plus value_head.weight, with optional reward normalisation).
SCORE_KINDS = {
    "sequence": "AutoModelForSequenceClassification",
    "token": "AutoModelForTokenClassification",
}


PAD_TOKEN = "<|pad|>"


def _head_name(hf_model) -> str:
    """The attribute holding the classification head (score, classifier, ...)."""
    names = [name for name, child in hf_model.named_children()
             if name != hf_model.base_model_prefix and isinstance(child, nn.Linear)]
    if len(names) != 1:
        raise ValueError(f"{type(hf_model).__name__}: expected one linear head, found {names}")
    return names[0]


def new_score_model(name_or_path, bias: bool, dtype: torch.dtype = torch.float32,
                    trust_remote_code: bool = False, what: str = "backbone",
                    meta: bool = False) -> ScoreModel:
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

    The standard sequence classifier reads the score at the last token that is not the pad token.
    With pad == eos (GPT-2, Llama) that would skip the EOS the reward model is read at, so a
    sequence model whose tokenizer has no pad of its own gets one extra token, <|pad|>, and one
    extra (never used, zero) embedding row; every other token keeps its id, so it still shares the
    policy's tokenizer.
    `extra` is written to token_rlhf.json (what the run was: role, data, held-out settings), with
    the format saved. A family without the standard class (OPT has no token classifier), or a
    standard save that fails, is saved as the backbone plus score_head.safetensors instead (the
    project's own format, which load_score_model reads), and token_rlhf.json says why: a trained
    model is never lost.
    """
    model = distributed.unwrap(model)
    if kind == "sequence" and model.head.bias is not None:
        raise ValueError("a sequence-classification head has no bias; build the reward model with "
                         "bias=False")
    state = distributed.full_state_dict(model)  # {} on ranks other than 0
    if not state:
        return
    backbone = {
        k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")
    }
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
    checkpoint.atomic_write(out_dir / "token_rlhf.json", json.dumps(info, indent=2) + "\n")


def _save_standard(model, tokenizer, out_dir, kind: str, backbone: dict, head_state: dict):
    """save_score_model's standard checkpoint: AutoModelFor{Sequence,Token}Classification."""
    embedding = next(name for name, module in model.backbone.named_modules()
                     if module is model.backbone.get_input_embeddings()) + ".weight"
    tokenizer = copy.deepcopy(tokenizer)
    if kind == "sequence" and tokenizer.pad_token_id in (None, tokenizer.eos_token_id):
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        rows = backbone[embedding]
        if rows.shape[0] < len(tokenizer):  # the pad token's row
            backbone[embedding] = torch.cat(
                [rows, rows.new_zeros(len(tokenizer) - rows.shape[0], rows.shape[1])])
    config = copy.deepcopy(model.backbone.config)
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    # the token classifier's dropout; eval-time outputs are unaffected anyway
    config.classifier_dropout = 0.0
    config.vocab_size = backbone[embedding].shape[0]
    auto_class = getattr(transformers, SCORE_KINDS[kind])
    with torch.device("meta"):  # an empty shell of the standard class; our tensors go inside it
        hf_model = auto_class.from_config(config)
    head = _head_name(hf_model)
    if getattr(hf_model, head).bias is None and model.head.bias is not None:
        raise ValueError(
            f"{type(hf_model).__name__} has no head bias; this discriminator head has one")
    hf_state = {f"{hf_model.base_model_prefix}.{k}": v for k, v in backbone.items()}
    hf_state.update({f"{head}.{k}": v for k, v in head_state.items()})
    hf_model.load_state_dict(hf_state, strict=True, assign=True)
    save_hf(hf_model, tokenizer, out_dir)


def save_policy(model: nn.Module, tokenizer, out_dir):
    """Save the trained policy as an ordinary Hugging Face causal LM
    (AutoModelForCausalLM.from_pretrained loads it) with its tokenizer. Every rank calls it: under
    FSDP the full weights are gathered to rank 0, which writes; LoRA adapters are merged in
    (full_state_dict)."""
    state = distributed.full_state_dict(model)
    if state:
        save_hf(model, tokenizer, out_dir, state_dict=state)


def load_score_model(path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                     what: str = "score model", meta: bool = False) -> ScoreModel:
    """A trained ScoreModel from any of the formats above; a folder without trained head weights is
    an error (a random head would give random rewards without any sign of it). meta: see
    from_pretrained."""
    check_model_source(path, what)
    _quiet_transformers()
    # meta: the heads built on it too
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = _load_score_model(Path(path), dtype, trust_remote_code, what, meta)
    # the scalar head stays fp32 whatever the backbone's dtype (a few hundred numbers)
    model.head.float()
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
                raise InputError(
                    f"{what} {path}: a {architecture} with {config.num_labels} labels; "
                    "a reward model or discriminator gives one score (num_labels=1)"
                )
            hf_model = from_pretrained(getattr(transformers, auto_name), path, dtype,
                                       trust_remote_code, meta)
            head = getattr(hf_model, _head_name(hf_model))
            model = ScoreModel(hf_model.base_model, bias=head.bias is not None)
            model.head = head
            return model
    weights = _weight_names(path)
    if "value_head.weight" in weights:  # OpenRLHF: backbone + value_head, optional normalisation
        backbone = from_pretrained(AutoModel, path, dtype, trust_remote_code, meta)
        model = ScoreModel(backbone, bias=False)
        model.head.weight.data.copy_(_read_weight(path, "value_head.weight"))
        # score = (r − mean) / std, folded into the head
        if getattr(config, "normalize_reward", False):
            std = float(getattr(config, "std", 1.0)) or 1.0
            model.head.weight.data /= std
            model.head.bias = nn.Parameter(
                torch.full((1,), -float(getattr(config, "mean", 0.0)) / std))
        return model.to(dtype)
    raise InputError(
        f"{what} {path}: no trained score head (expected a *ForSequenceClassification or "
        "*ForTokenClassification checkpoint with num_labels=1, an OpenRLHF value_head, or "
        "score_head.safetensors); train one with redistribute.py or discriminator.py"
    )


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


def save_hf(model: nn.Module, tokenizer, out_dir, **save_kwargs):
    """Save a model and its tokenizer in Hugging Face format into out_dir (save_kwargs go to
    save_pretrained, e.g. state_dict=: the tensors to write instead of the model's own, a copy is
    passed: it pops keys).

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
        distributed.unwrap(model).save_pretrained(tmp, **save_kwargs)
        tokenizer.save_pretrained(tmp)
        for item in tmp.iterdir():
            os.replace(item, out_dir / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def enable_gradient_checkpointing(model: nn.Module):
    """Recompute activations in the backward pass (Hugging Face's own, non-reentrant: works with DDP
    and with frozen inputs). Active in train() mode only, so generation in eval() keeps its KV
    cache."""
    hf_model = model.backbone if isinstance(model, ScoreModel) else model
    if hasattr(hf_model, "activation_checkpointing_enable"):  # transformers >= 5
        hf_model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    hf_model.config.use_cache = False
