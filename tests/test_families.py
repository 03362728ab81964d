"""Every stage on every model family users bring: tiny random models built from a config (no
download), each with a tokenizer in its family's layout and special tokens
(hf_models.TINY_FAMILIES): GPT-2, Llama 2 (SentencePiece layout) and Llama 3 (byte-level, BOS),
Mistral, Qwen2, Qwen3, Gemma 2, Phi-3, GPT-NeoX, OPT.

One step or one iteration of each stage, in process: SFT, labels, the discriminator, the reward
model, PPO with TLCR rewards (the reward model loaded too), eval (RED, TLCR and reward-model scores
of two policies). Then what was saved loads as docs/models.md's table says: the reward model as the
standard AutoModelForSequenceClassification; the discriminator as AutoModelForTokenClassification
where transformers has one for the family, else as a backbone plus score_head.safetensors, said so
in token_rlhf.json.
"""

import json
import warnings

import pytest
import torch
import transformers

import common
import discriminator
import eval as ev
import label
import ppo_token
import redistribute
import sft
from plumbing import hf_models

FAMILIES = list(hf_models.TINY_FAMILIES)
TINY = ["--device", "cpu", "--max-prompt-len", "24"]


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory, splits):
    """family -> a tiny random model of it (1 layer, 32 wide, 512 tokens), built once."""
    texts = [p.prompt + p.chosen for p in splits["sft"][:300]]
    root, built = tmp_path_factory.mktemp("families"), {}

    def get(family):
        if family not in built:
            built[family] = root / family
            hf_models.build_tiny(texts, built[family], arch=family, vocab_size=512, layers=1,
                                 width=32, dropout=0.0, max_positions=128)
        return built[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_every_stage_runs_on_every_family(family, family_dir, tmp_path):
    base = family_dir(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_stages(base, tmp_path)
    policy_tokenizer = hf_models.load_tokenizer(tmp_path / "sft")

    # the reward model: the standard class, the same score as the project reads (at the EOS)
    rm = hf_models.load_score_model(tmp_path / "rm")
    standard = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "rm"
    ).eval()
    rm_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "rm")
    pair = common.load_pairs(common.BUNDLED_DATA, quiet=True)[0]
    prompt = common.encode_prompt(policy_tokenizer, pair.prompt, 24)
    response = common.encode_response(policy_tokenizer, pair.chosen, 8)
    ids = torch.tensor([prompt + response])
    response_mask = torch.tensor([[0] * len(prompt) + [1] * len(response)])
    ours = redistribute.sequence_reward(rm.eval(), ids, torch.ones_like(ids), response_mask)
    padded = rm_tokenizer.pad({"input_ids": [prompt + response]}, return_tensors="pt")
    torch.testing.assert_close(standard(**padded).logits[:, 0], ours, atol=1e-5, rtol=1e-4)

    # the discriminator: the standard token classifier where there is one, else the head file
    info = hf_models.read_run_info(tmp_path / "disc")
    config = transformers.AutoConfig.from_pretrained(base)
    has_class = hf_models.standard_score_class(config, "token") is not None
    assert has_class == (family != "opt")
    assert info["format"] == (
        "AutoModelForTokenClassification" if has_class else hf_models.HEAD_FILE_FORMAT
    )
    assert (tmp_path / "disc" / "score_head.safetensors").exists() != has_class
    disc = hf_models.load_score_model(tmp_path / "disc").eval()
    if has_class:
        standard = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "disc")
        torch.testing.assert_close(standard.eval()(input_ids=ids).logits[..., 0],
                                   disc(ids, torch.ones_like(ids)).float(), atol=1e-5, rtol=1e-4)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(results["policies"]) == {"sft", "ppo"}
    assert all(
        torch.isfinite(torch.tensor(v))
        for v in results["policies"]["ppo"].values()
        if isinstance(v, float)
    )


def run_stages(base, out):
    small = [
        "--max-steps", "1", "--batch-size", "2", "--micro-batch-size", "2",
        "--max-response-len", "12", *TINY,
    ]
    sft.main(
        [
            "--model", str(base), "--out", str(out / "sft"), "--limit", "4", "--eval-examples", "2",
            "--eval-batch-size", "2", *small,
        ]
    )
    label.main(
        [
            "--reviser", "chosen", "--tokenizer", str(out / "sft"),
            "--out", str(out / "labels.jsonl"), "--limit", "12", "--max-response-len", "12",
        ]
    )
    discriminator.main(
        [
            "train", "--sft", str(out / "sft"), "--labels", str(out / "labels.jsonl"),
            "--out", str(out / "disc"), "--eval-batch-size", "4", *small,
        ]
    )
    redistribute.main(
        [
            "train", "--sft", str(out / "sft"), "--out", str(out / "rm"), "--limit", "8",
            "--eval-batch-size", "4", *small,
        ]
    )
    ppo_token.main(
        [
            "--policy", str(out / "sft"), "--reward", "tlcr", "--discriminator", str(out / "disc"),
            "--reward-model", str(out / "rm"), "--out", str(out / "ppo"), "--iterations", "1",
            "--rollout-batch-size", "2", "--minibatch-size", "2", "--ppo-epochs", "1",
            "--max-new-tokens", "6", "--limit", "4", *TINY,
        ]
    )
    ev.main(
        [
            "--policies", f"sft={out / 'sft'}", f"ppo={out / 'ppo' / 'policy'}",
            "--reference", str(out / "sft"), "--reward-model", str(out / "rm"),
            "--discriminator", str(out / "disc"), "--num-prompts", "2", "--eval-batch-size", "2",
            "--max-new-tokens", "6", "--show-prompts", "1", "--out", str(out / "eval"), *TINY,
        ]
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_models_drop_out_of_the_residual_only(family):
    """No family's tiny model has attention dropout (on CPU it takes SDPA off its fused kernel);
    the GPT-2 one keeps its residual and embedding dropout, and its activation is GPT-2's own tanh
    GELU ("gelu_new") to float precision, in one op, not the exact erf GELU (off by up to ~1e-3)."""
    tokenizer = hf_models.train_tiny_tokenizer(["a small text to train on"] * 4, 300, family)
    config = hf_models.tiny_config(family, tokenizer, 1, 32, 0.1, 64)
    attention = [k for k in ("attn_pdrop", "attention_dropout") if hasattr(config, k)]
    assert attention and all(getattr(config, k) == 0.0 for k in attention)
    if family == "gpt2":
        assert config.resid_pdrop == config.embd_pdrop == 0.1
        x = torch.linspace(-6, 6, 10_001)
        act = transformers.activations.ACT2FN[config.activation_function]
        torch.testing.assert_close(act(x), transformers.activations.ACT2FN["gelu_new"](x),
                                   atol=1e-6, rtol=0)
        assert (act(x) - torch.nn.functional.gelu(x)).abs().max() > 1e-4
