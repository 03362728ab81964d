"""How generate (ppo_token.py) runs the policy, chosen once when the models are loaded: a
decoder runs the prompt through the policy and then one token at a time, with a KV cache. By
default a static cache, allocated once per batch for prompt + max_new_tokens, its attention mask
and position ids computed before the loop; optionally the one-token forward compiled
(--compile); under FSDP a decoder that stops only when every rank has ended. docs/rollout-speed.md
has the measurements."""
from __future__ import annotations

import functools
import inspect
import time

import torch
from torch import Tensor
from transformers import StaticCache

import common
from common import position_ids_from_mask
from plumbing import distributed
from plumbing.distributed import unwrap


def add_sampling_args(group, max_new_tokens: int, max_new_help: str):
    """How every script that samples with generate draws (ppo_token.py, eval.py, gold_samples.py):
    --max-new-tokens, --temperature, --top-p and --compile."""
    group.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=max_new_help)
    group.add_argument("--temperature", type=float, default=1.0,
                       help="sampling temperature (log-probs are recomputed with it)")
    group.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the one-token decode step (CUDA: CUDA graphs; CPU: "
                            "inductor). Compiles on the first call of each batch shape (seconds, "
                            "printed); falls back to eager decoding with one line if it fails")
    return group


def check_sampling_args(parser, args):
    if args.temperature <= 0 or not 0 < args.top_p <= 1:
        parser.error(f"--temperature must be > 0 and --top-p in (0, 1], got {args.temperature} "
                     f"and {args.top_p}")


# How generate runs the policy: a decoder(policy, prompt, prompt_mask, max_new_tokens) runs the
# prompt and returns (logits of response token 0 [B, V], next_logits(token [B], t) -> [B, V], the
# logits after response token t, finished(done [B]) -> whether generation may stop). make_decoder
# picks one at load time.
@functools.cache
def make_decoder(compile: bool = False, device_type: str = "cpu", static: bool = True,
                 sharded: bool = False):
    """static: a KV cache allocated once per batch (static_cache_decoder, the default), else
    Hugging Face's dynamic cache, grown by a column per token (dynamic_cache_decoder, the decoder
    before the static cache; bench/bench_generate.py compares them). compile: the one-token forward
    through torch.compile (compiled_forward). sharded (FSDP): generation stops only when every row
    of every rank has ended (on_every_rank). One decoder per setting, so a compiled step is
    compiled once per process and shape."""
    if not static:
        decoder = dynamic_cache_decoder
    elif not compile:
        decoder = static_cache_decoder
    else:  # cache columns rounded up to 64: a compiled step sees a few shapes, not one per width
        decoder = functools.partial(static_cache_decoder, multiple=64,
                                    forward=compiled_forward(one_token_forward, device_type))
    return functools.partial(on_every_rank, decoder) if sharded else decoder


def on_every_rank(decoder, policy, prompt, prompt_mask, max_new_tokens):
    """`decoder` for a sharded policy: every forward all-gathers weights, a collective of all ranks,
    so no rank may stop while another still decodes."""
    logits, next_logits, _ = decoder(policy, prompt, prompt_mask, max_new_tokens)
    return logits, next_logits, lambda done: distributed.on_every_rank(bool(done.all()),
                                                                       done.device)


def all_rows_ended(done: Tensor) -> bool:
    return bool(done.all())


def dynamic_cache_decoder(policy, prompt, prompt_mask, max_new_tokens):
    """Hugging Face's dynamic cache: each forward returns the cache grown by one column (torch.cat
    in every layer), and the attention mask grows with it."""
    attention_mask = prompt_mask.long()
    out = policy(input_ids=prompt, attention_mask=attention_mask,
                 position_ids=position_ids_from_mask(attention_mask), use_cache=True,
                 **common.logits_to_keep(policy, 1))
    next_position = attention_mask.sum(-1, keepdim=True)  # [B, 1] position of the response's 1st

    def next_logits(token, t):
        nonlocal out, attention_mask
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], 1)
        out = policy(input_ids=token[:, None], attention_mask=attention_mask,
                     position_ids=next_position + t, use_cache=True, **cache_kwargs(policy, out))
        return out.logits[:, -1]
    return out.logits[:, -1], next_logits, all_rows_ended


def static_cache_decoder(policy, prompt, prompt_mask, max_new_tokens, forward=None, multiple=1):
    """A KV cache allocated once for the prompt and max_new_tokens (transformers' StaticCache,
    T = P + max_new_tokens columns, rounded up to `multiple`); the attention mask and the position
    ids of all T columns are computed here, once. Response token t is written to column P + t.
    `forward` runs one token (one_token_forward, or compiled_forward of it)."""
    forward = forward or one_token_forward
    B, P = prompt.shape
    T = -(-(P + max_new_tokens) // multiple) * multiple
    # [B, T]: the prompt's mask, then 1 on every response column (the causal mask hides columns
    # not yet written), 0 on columns past P + max_new_tokens
    attention_mask = torch.zeros(B, T, dtype=torch.long, device=prompt.device)
    attention_mask[:, :P] = prompt_mask
    attention_mask[:, P:P + max_new_tokens] = 1
    positions = position_ids_from_mask(attention_mask)  # [B, T], real tokens counted
    columns = torch.arange(T, device=prompt.device)  # [T]
    cache = static_cache(policy, B, T, prompt.device)
    logits = policy(input_ids=prompt, attention_mask=attention_mask, position_ids=positions[:, :P],
                    use_cache=True, **cache_arguments(policy, cache, columns[:P]),
                    **common.logits_to_keep(policy, 1)).logits[:, -1]

    def next_logits(token, t):
        return forward(policy, token[:, None], positions[:, P + t:P + t + 1], attention_mask,
                       cache_arguments(policy, cache, columns[P + t:P + t + 1]))
    return logits, next_logits, all_rows_ended


def one_token_forward(policy, token, position, attention_mask, cache_args: dict) -> Tensor:
    """One decode step: the logits after `token` [B, 1] at `position` [B, 1] -> [B, V], its keys and
    values written into the static cache. What --compile compiles."""
    return policy(input_ids=token, attention_mask=attention_mask, position_ids=position,
                  use_cache=True, **cache_args).logits[:, -1]


def compiled_forward(forward, device_type: str):
    """forward through torch.compile: on CUDA mode="reduce-overhead" (CUDA graphs), elsewhere
    inductor's default. The first call of each model class and shape compiles; its time is printed
    apart from the steady state. If compiling fails, one line says so and that class and shape run
    eagerly from then on; so do sliding-window layers: transformers' static cache keeps a Python
    count for them, which would recompile the step at every token."""
    compiled = torch.compile(forward, dynamic=False,
                             mode="reduce-overhead" if device_type == "cuda" else None)
    compiled_keys, eager_keys = set(), set()

    def call(policy, token, position, attention_mask, cache_args):
        key = (type(unwrap(policy)).__name__, *attention_mask.shape)  # class, B, T
        if key in eager_keys:
            return forward(policy, token, position, attention_mask, cache_args)
        if key in compiled_keys:
            if device_type == "cuda":  # a new CUDA graph replay; its logits copied out
                torch.compiler.cudagraph_mark_step_begin()
                return compiled(policy, token, position, attention_mask, cache_args).clone()
            return compiled(policy, token, position, attention_mask, cache_args)
        start = time.perf_counter()
        cache = cache_args.get("cache", cache_args.get("past_key_values"))
        try:
            if any(getattr(layer, "is_sliding", False) for layer in getattr(cache, "layers", [])):
                raise NotImplementedError("sliding-window layers")
            logits = compiled(policy, token, position, attention_mask, cache_args).clone()
        except Exception as error:  # noqa: BLE001 - whatever failed: decode without compile
            eager_keys.add(key)
            message = (str(error).strip().splitlines() or [""])[0][:200]
            print(f"--compile: {key[0]} not compiled ({type(error).__name__}: {message}); "
                  "decoding without compile")
            return forward(policy, token, position, attention_mask, cache_args)
        compiled_keys.add(key)
        print(f"--compile: decode step compiled for {key[0]}, batch {key[1]}, cache {key[2]}: "
              f"{time.perf_counter() - start:.1f} s (the first call; later calls run compiled)")
        return logits
    return call


def static_cache(policy, batch: int, columns: int, device):
    """An empty StaticCache of `columns` positions for the policy's layers (sliding-window layers
    where the family has them); transformers < 4.56 wants its size up front."""
    config = unwrap(policy).config
    try:
        return StaticCache(config=config, max_cache_len=columns)
    except TypeError:
        dtype = next(unwrap(policy).parameters()).dtype
        return StaticCache(config=config, max_batch_size=batch, max_cache_len=columns,
                           device=device, dtype=dtype)


def cache_arguments(policy, cache, columns: Tensor) -> dict:
    """The cache as the forward of this transformers version takes it: `cache` from 5.x on (which
    counts the columns written itself), before that `past_key_values` and `cache_position`, the
    columns this forward writes."""
    if "cache" in inspect.signature(unwrap(policy).forward).parameters:
        return {"cache": cache}
    return {"past_key_values": cache, "cache_position": columns}


def cache_kwargs(policy, out) -> dict:
    """The KV cache of the last forward, under the name this transformers version's forward takes it
    (`cache` from 5.x on, `past_key_values` before)."""
    cache = out.get("cache", None) if "cache" in out else out.past_key_values
    parameters = inspect.signature(unwrap(policy).forward).parameters
    return {"cache" if "cache" in parameters else "past_key_values": cache}
