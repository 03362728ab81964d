"""Shared fixtures: the bundled pairs, and one tiny GPT-2 + BPE tokenizer built once per session."""
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


@pytest.fixture(scope="session")
def bundled_pairs():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return common.load_pairs(common.BUNDLED_DATA)


@pytest.fixture(scope="session")
def splits(bundled_pairs):
    return common.split_pairs(bundled_pairs, seed=0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, splits):
    """A tiny GPT-2 (2 layers, 64 wide) and a 2048-token byte-level BPE, saved with save_pretrained."""
    out = tmp_path_factory.mktemp("tiny")
    texts = [p.prompt + p.chosen for p in splits["sft"]]
    common.build_tiny(texts, out, vocab_size=2048, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    return common.load_tokenizer(tiny_dir)
