"""common.response_logprobs: log-probs and entropy over the vocabulary, a chunk of positions at a
time. Equal to the one-piece computation (fp32, 1e-6, values and gradients), on tiny GPT-2 and
Llama models, and measured to stay within one chunk of extra memory at a 128k vocabulary."""
import sys
from pathlib import Path

import pytest
import torch

import common
from plumbing import hf_models

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_logprobs_memory import measure, one_piece_logprobs  # noqa: E402

# a 1-layer Llama, 16 wide, with Llama 3's vocabulary; 16 rows of 16 + 32 tokens; chunks of 8 MiB
SHAPE = dict(arch="llama", vocab=128256, layers=1, width=16, rows=16, prompt_len=16, new_tokens=32,
             chunk_bytes=8 * 2**20)


def left_padded_batch(vocab, seed=0):
    """4 rows: left-padded prompts of 3-7 tokens, responses of 1-6 tokens then padding."""
    g = torch.Generator().manual_seed(seed)
    rows, masks, response_masks = [], [], []
    width = 13
    for prompt_len, response_len in [(7, 6), (3, 2), (5, 1), (6, 4)]:
        ids = torch.randint(3, vocab, (prompt_len + response_len,), generator=g).tolist()
        pad = width - 7 - response_len
        rows.append([0] * (7 - prompt_len) + ids + [0] * pad)
        masks.append([0] * (7 - prompt_len) + [1] * len(ids) + [0] * pad)
        response_masks.append([0] * 7 + [1] * response_len + [0] * pad)
    return torch.tensor(rows), torch.tensor(masks), torch.tensor(response_masks)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_chunked_equals_one_piece_values_and_gradients(arch, tiny_dir, llama_dir, monkeypatch):
    """Chunks of 3 positions (13 positions in all, so a ragged last chunk), temperature 0.7: the
    log-probs, the entropy and every parameter's gradient of a loss using both equal the one-piece
    computation within 1e-6 (fp32; a gradient within 1e-6 of its largest entry)."""
    model = common.disable_dropout(hf_models.load_policy(tiny_dir if arch == "gpt2" else
                                                            llama_dir))
    vocab = model.config.vocab_size
    monkeypatch.setattr(common, "CHUNK_BYTES", 3 * 4 * vocab)
    assert common.chunk_positions(vocab) == 3
    batch = left_padded_batch(vocab)
    weights = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))

    def run(fn):
        model.zero_grad()
        logprobs, entropy = fn(model, *batch, 0.7, with_entropy=True)
        ((logprobs * weights).sum() + (entropy * weights.flip(0)).sum()).backward()
        return logprobs, entropy, {n: p.grad.clone() for n, p in model.named_parameters()}

    logprobs, entropy, grads = run(common.response_logprobs)
    expected_logprobs, expected_entropy, expected_grads = run(one_piece_logprobs)
    _, valid = common.response_index(batch[2])
    assert valid.sum() == 13 and (logprobs[valid == 0] == 0).all()
    assert (entropy[valid.bool()] > 0).all()  # a random model is far from deterministic
    torch.testing.assert_close(logprobs, expected_logprobs, atol=1e-6, rtol=0)
    torch.testing.assert_close(entropy, expected_entropy, atol=1e-6, rtol=0)
    for name, grad in grads.items():
        assert grad.abs().max() > 0 or "wpe" in name, name  # every weight is reached
        # fp32 rounding of a sum over every position: 1e-6 of the tensor's largest gradient (a
        # bias's reaches ~10 on GPT-2, where the chunks' other summation order moves it by ~2e-6)
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, msg=name,
                                   atol=1e-6 * max(1.0, expected_grads[name].abs().max().item()))
    # without entropy: the same log-probs, and the same gradient of a log-prob loss
    model.zero_grad()
    alone, none = common.response_logprobs(model, *batch, 0.7)
    (alone * weights).sum().backward()
    chunked = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (one_piece_logprobs(model, *batch, 0.7)[0] * weights).sum().backward()
    assert none is None and torch.equal(alone, logprobs)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(chunked[name], parameter.grad, rtol=1e-5,
                                   atol=1e-6 * max(1.0, parameter.grad.abs().max().item()))


def test_token_logprobs_on_bf16_logits_by_hand():
    """bf16 logits (autocast's LM head): upcast a chunk at a time, the gradient comes back in bf16;
    the values by hand on a 2-row example."""
    logits = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]], [[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]]],
                          dtype=torch.bfloat16, requires_grad=True)  # [B=2, K=2, V=3]
    before = torch.tensor([[1, 0], [0, 0]])
    tokens = torch.tensor([[2, 1], [0, 0]])
    valid = torch.tensor([[1, 1], [1, 0]])
    logprobs, entropy = common.token_logprobs(logits, before, tokens, valid, with_entropy=True,
                                              chunk_bytes=1)  # one position per chunk
    z = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 2.0], [3.0, 0.0, 0.0]])
    p = z.softmax(-1)
    expected = torch.stack([p[0, 2], p[1, 1], p[2, 0]]).log()
    torch.testing.assert_close(logprobs, torch.tensor([[expected[0], expected[1]],
                                                       [expected[2], 0.0]]))
    h = -(p * p.log()).sum(-1)
    assert entropy[0, 0].item() == pytest.approx(h[0].item()) and entropy[1, 1] == 0
    assert entropy[0, 0].item() == pytest.approx(torch.log(torch.tensor(3.0)).item())  # uniform
    logprobs.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    # d log p_a / dz = onehot(a) − p, at the column that was read; unread columns get 0
    torch.testing.assert_close(logits.grad[0, 1].float(), torch.eye(3)[2] - p[0], atol=4e-3, rtol=0)
    assert (logits.grad[1, 1] == 0).all()


def test_memory_at_a_128k_vocabulary_is_one_chunk_above_the_logits():
    """Peak RSS growth of a fresh process (a 1-layer Llama with Llama 3's 128,256-token vocabulary,
    16 rows of 16 + 32 tokens, 33 × 16 positions of logits = 271 MB fp32, chunks of 8 MiB).
    Scoring (no grad, with entropy): the chunked path adds at most a few chunks to the model's own
    logits, where the one-piece path adds over twice the logits again. Training (log-probs and their
    backward): one more logits-sized tensor (their gradient) and a few chunks, where the one-piece
    path keeps fp32 copies for its backward."""
    floor = measure("forward", False, **SHAPE)
    logits = floor["logits"]
    chunked, one_piece = measure("chunked", False, **SHAPE), measure("one_piece", False, **SHAPE)
    print(f"scoring peak above the process: logits only {floor['peak'] / 2**20:.0f} MiB, chunked "
          f"{chunked['peak'] / 2**20:.0f} MiB, one piece {one_piece['peak'] / 2**20:.0f} MiB")
    assert floor["peak"] >= 0.9 * logits  # the measurement sees the logits
    assert chunked["peak"] - floor["peak"] < 0.2 * logits  # < 54 MB: a few 8 MiB chunks
    assert one_piece["peak"] - floor["peak"] > 2 * logits
    chunked, one_piece = measure("chunked", True, **SHAPE), measure("one_piece", True, **SHAPE)
    print(f"training peak: chunked {chunked['peak'] / 2**20:.0f} MiB, one piece "
          f"{one_piece['peak'] / 2**20:.0f} MiB")
    assert chunked["peak"] - floor["peak"] < 1.3 * logits  # the logits' gradient + chunks
    assert one_piece["peak"] - floor["peak"] > 3 * logits
