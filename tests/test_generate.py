"""ppo_token.generate's decoders (docs/rollout-speed.md): the static KV cache and the compiled
decode step give the tokens a naive loop gives, recomputing every prefix without a cache, on GPT-2
and Llama-style models (RoPE, GQA), a sliding window shorter than the sequence, and under LoRA with
the adapters on and off. The nucleus sampler draws from the nucleus of the sort-based definition,
at its renormalised probabilities."""
import warnings

import pytest
import torch
import transformers

import common
import lora
import ppo_token as ppo
from plumbing import decode

ROWS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]  # left-padded to 7 columns
NEW = 10
GREEDY = dict(temperature=1e-6, top_p=1.0)  # logits / 1e-6: the sampler's mass is on the argmax


def tiny(arch: str, **extra):
    """A 2-layer random model, weights scaled up so that its next-token argmax is decided by a wide
    margin (not by rounding)."""
    torch.manual_seed(0)
    if arch == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=300,
                                         n_positions=128)
    else:  # Llama-style: RoPE, RMSNorm, one KV head for two query heads (GQA)
        config = transformers.AutoConfig.for_model(arch, hidden_size=64, intermediate_size=128,
                                                   num_hidden_layers=2, num_attention_heads=2,
                                                   num_key_value_heads=1, vocab_size=300,
                                                   max_position_embeddings=128, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    return model


@torch.no_grad()
def naive_greedy(policy, prompt, prompt_mask, n):
    """The reference: every step runs the whole sequence again, no cache, and takes the argmax."""
    ids, mask, tokens = prompt, prompt_mask, []
    for _ in range(n):
        logits = policy(input_ids=ids, attention_mask=mask,
                        position_ids=common.position_ids_from_mask(mask)).logits[:, -1]
        tokens.append(logits.argmax(-1))
        ids = torch.cat([ids, tokens[-1][:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(tokens, 1)


def generate(policy, decoder, n=NEW, rows=ROWS, **sampling):
    prompt, prompt_mask = common.pad_left(rows, 0)
    return ppo.generate(policy, prompt, prompt_mask, [-1], 0, n, decoder=decoder,
                        **sampling or GREEDY)


DECODERS = {"dynamic": dict(static=False), "static": dict(), "compiled": dict(compile=True)}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("decoder", list(DECODERS))
def test_greedy_equals_the_no_cache_loop(arch, decoder):
    policy = tiny(arch)
    want = naive_greedy(policy, *common.pad_left(ROWS, 0), NEW)
    assert len(set(want.flatten().tolist())) > 5  # the rows do not just repeat one token
    got = generate(policy, decode.make_decoder(**DECODERS[decoder]))
    assert torch.equal(got, want)


def test_sliding_window_shorter_than_the_sequence():
    """Mistral with a window of 6 over 7 prompt + 10 response columns: the static cache's sliding
    layers (rolled once full) give what the full forward with its sliding mask gives."""
    policy = tiny("mistral", sliding_window=6)
    want = naive_greedy(policy, *common.pad_left(ROWS, 0), NEW)
    assert not torch.equal(want, naive_greedy(tiny("mistral"), *common.pad_left(ROWS, 0), NEW))
    for decoder in ("static", "compiled"):  # compiled: falls back to eager for sliding layers
        assert torch.equal(generate(policy, decode.make_decoder(**DECODERS[decoder])), want)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lora_adapters_on_and_off(arch):
    """The policy with trained-looking adapters (B ≠ 0) and the same policy with them switched off
    (the reference) each decode as their no-cache loop does, eager and compiled."""
    policy = tiny(arch)
    base = naive_greedy(policy, *common.pad_left(ROWS, 0), NEW)
    lora.add_lora(policy, rank=4, alpha=32)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    adapted = naive_greedy(policy, *common.pad_left(ROWS, 0), NEW)
    assert not torch.equal(adapted, base)
    for decoder in ("static", "compiled"):
        assert torch.equal(generate(policy, decode.make_decoder(**DECODERS[decoder])), adapted)
        with lora.adapters_disabled(policy):
            assert torch.equal(generate(policy, decode.make_decoder(**DECODERS[decoder])), base)


def test_compiled_step_sees_weight_updates():
    """PPO changes the policy's weights in place between rollouts: the compiled step must read the
    new weights, not constants captured at compile time."""
    policy = tiny("gpt2")
    decoder = decode.make_decoder(compile=True)
    before = generate(policy, decoder)
    with torch.no_grad():
        policy.transformer.h[0].mlp.c_fc.weight.mul_(-1.5)  # what an optimizer step does: in place
    want = naive_greedy(policy, *common.pad_left(ROWS, 0), NEW)
    assert not torch.equal(want, before)
    assert torch.equal(generate(policy, decoder), want)


def test_compile_failure_falls_back_with_one_line(monkeypatch, capsys):
    def broken_compile(fn, **kwargs):
        def fail(*args):
            raise RuntimeError("no C compiler\nsecond line")
        return fail
    monkeypatch.setattr(torch, "compile", broken_compile)
    policy = tiny("gpt2")
    decoder = decode.make_decoder.__wrapped__(compile=True)  # a fresh one, not the cached decoder
    want = naive_greedy(policy, *common.pad_left(ROWS, 0), NEW)
    assert torch.equal(generate(policy, decoder), want)
    lines = [line for line in capsys.readouterr().out.splitlines() if "--compile" in line]
    assert lines == ["--compile: GPT2LMHeadModel not compiled (RuntimeError: no C compiler); "
                     "decoding without compile"]


def test_sampling_with_a_seed_is_the_same_in_every_decoder():
    """Temperature 1, top-p 0.9: the decoders feed the same sampler the same logits (to rounding),
    so one seed gives one response, whichever runs the policy; another seed gives another."""
    policy = tiny("llama")
    responses = {}
    for name, options in DECODERS.items():
        torch.manual_seed(3)
        responses[name] = generate(policy, decode.make_decoder(**options), temperature=1.0,
                                   top_p=0.9)
    assert torch.equal(responses["static"], responses["dynamic"])
    assert torch.equal(responses["compiled"], responses["dynamic"])
    torch.manual_seed(4)
    other = generate(policy, decode.make_decoder(), temperature=1.0, top_p=0.9)
    assert not torch.equal(other, responses["static"])


def test_compile_is_refused_with_fsdp(capsys):
    with pytest.raises(SystemExit):
        ppo.parse_args(["--policy", "p", "--reward", "seq", "--reward-model", "r", "--out", "o",
                        "--fsdp", "--compile"])
    assert "--compile does not go together with --fsdp" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The sampler
# ----------------------------------------------------------------------------------------------
def nucleus_by_sorting(probs, top_p):
    """The definition, with ids: sort descending, keep a token while the mass before it is
    < top_p."""
    sorted_probs, ids = probs.sort(-1, descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, ids, keep)


def test_sorted_descending_is_torch_sort():
    x = torch.randn(5, 1000).softmax(-1)
    assert torch.equal(ppo.sorted_descending(x), x.sort(-1, descending=True).values)


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.99])
def test_nucleus_matches_the_sort_based_definition(top_p):
    """Every token ppo.sample_top_p can draw is in the sort-based nucleus, and every nucleus token
    is drawn (flat and peaked rows; the draws of 3000 repeats of each row)."""
    torch.manual_seed(0)
    logits = torch.cat([torch.randn(4, 40), 4 * torch.randn(4, 40)])  # [8, 40]
    nucleus = nucleus_by_sorting(logits.softmax(-1), top_p)  # [8, 40]
    draws = ppo.sample_top_p(logits.repeat_interleave(3000, 0), top_p).view(8, 3000)
    drawn = torch.zeros_like(nucleus).scatter(-1, draws, True)
    assert torch.equal(drawn, nucleus)


def test_sampler_frequencies_are_the_renormalised_nucleus():
    """The draws' frequencies are p_i / Σ_nucleus p (within 4 binomial standard deviations), on a
    distribution where the nucleus ends mid-way."""
    torch.manual_seed(0)
    probs = torch.tensor([0.30, 0.25, 0.15, 0.12, 0.08, 0.05, 0.03, 0.02])
    n = 40000
    draws = ppo.sample_top_p(probs.log().repeat(n, 1), 0.8)
    counts = torch.bincount(draws, minlength=8).float() / n
    # mass before: 0, .30, .55, .70, .82 -> the first four are in the nucleus
    expected = torch.cat([probs[:4] / probs[:4].sum(), torch.zeros(4)])
    std = (expected * (1 - expected) / n).sqrt()
    assert (counts[4:] == 0).all()
    assert ((counts - expected).abs() <= 4 * std + 1e-9).all(), (counts, expected)
