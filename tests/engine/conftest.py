"""Engine fixtures: a tiny random Llama (and GPT-2) with the tiny BPE tokenizer, loaded once.

Engines transform a passed-in model in place (fused projections, packed CPU weights): the
numbers stay the same, so tests share these; a test that needs the untouched modules loads the
directory again (`loaded.source`)."""

from __future__ import annotations

import pytest
import torch

from shoal.model.loader import load_dir
from tests.helpers import hf_tiny_config, save_tiny_hf_dir


def _tiny(tmp_path_factory, tiny_tokenizer_dir, family: str):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(f"engine_{family}")
    cfg = hf_tiny_config(family, max_position_embeddings=512) if family != "gpt2" else hf_tiny_config(
        family, n_positions=512)
    save_tiny_hf_dir(cfg, path, tiny_tokenizer_dir)
    return load_dir(str(path), dtype="float32")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tiny_tokenizer_dir):
    return _tiny(tmp_path_factory, tiny_tokenizer_dir, "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory, tiny_tokenizer_dir):
    return _tiny(tmp_path_factory, tiny_tokenizer_dir, "gpt2")


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory, tiny_tokenizer_dir):
    """Mistral: a sliding window of 8 positions."""
    return _tiny(tmp_path_factory, tiny_tokenizer_dir, "mistral")
