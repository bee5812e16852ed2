"""Model registry: the built-in default, adding base models of other sizes from a directory or a
GGUF file, removal, atomic conversion into the cache, and errors that name the model."""

from __future__ import annotations

import json

import pytest
import torch

from shoal.model.convert import MARKER, convert_gguf
from shoal.model.loader import ModelLoadError
from shoal.model.registry import DEFAULT_MODEL, ModelRegistry
from tests.helpers import hf_tiny_config, save_tiny_hf_dir
from tests.model.test_gguf import tiny_hf, write_gguf


@pytest.fixture
def reg(tmp_path):
    return ModelRegistry(tmp_path / "home" / "models")


def test_default_is_listed_without_any_file(reg):
    names = [e.name for e in reg.list()]
    assert names == [DEFAULT_MODEL]
    e = reg.get(DEFAULT_MODEL)
    assert e.builtin and e.model_type == "llama" and e.context_length == 8192 and e.size_label == "135M"
    assert not reg.file.exists()


def test_add_directory_then_load_by_name(reg, tmp_path, tiny_tokenizer_dir):
    torch.manual_seed(0)
    src = tmp_path / "tiny-llama"
    hf = save_tiny_hf_dir(hf_tiny_config("llama"), src, tiny_tokenizer_dir)
    e = reg.add("tiny-llama", str(src))
    assert (e.kind, e.model_type, e.context_length) == ("dir", "llama", 256)
    assert e.num_params == sum(p.numel() for p in hf.parameters())
    # a second registry object (another process) sees it
    again = ModelRegistry(reg.root)
    assert [m.name for m in again.list()] == [DEFAULT_MODEL, "tiny-llama"]
    loaded = again.load("tiny-llama", dtype="float32")
    x = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert (hf(x).logits - loaded.model.logits(x)).abs().max().item() <= 1e-4


def test_several_sizes_side_by_side(reg, tmp_path, tiny_tokenizer_dir):
    for name, width in [("small", 64), ("large", 128)]:
        cfg = hf_tiny_config("llama", hidden_size=width, intermediate_size=2 * width)
        save_tiny_hf_dir(cfg, tmp_path / name, tiny_tokenizer_dir)
        reg.add(name, str(tmp_path / name))
    sizes = {e.name: e.num_params for e in reg.list()}
    assert sizes["large"] > sizes["small"]


def test_add_gguf_converts_into_the_cache(reg, tmp_path):
    model = tiny_hf("llama")
    path = write_gguf(tmp_path / "tiny.gguf", model, "llama")
    e = reg.add("tiny-gguf", path)
    assert e.kind == "gguf" and (reg.root / "tiny-gguf" / MARKER).is_file()
    loaded = reg.load("tiny-gguf", dtype="float32")
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert (model(x).logits - loaded.model.logits(x)).abs().max().item() <= 1e-4
    reg.remove("tiny-gguf")
    assert not (reg.root / "tiny-gguf").exists()
    assert [m.name for m in reg.list()] == [DEFAULT_MODEL]


def test_interrupted_conversion_is_redone(tmp_path):
    model = tiny_hf("llama")
    path = write_gguf(tmp_path / "tiny.gguf", model, "llama")
    out = tmp_path / "cache" / "tiny"
    out.mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"half-written")  # no marker: not a finished model
    convert_gguf(path, out)
    assert (out / MARKER).is_file()
    assert (out / "model.safetensors").stat().st_size > 1000
    assert not list(out.parent.glob(".tiny.tmp-*"))


def test_remove_keeps_a_users_directory(reg, tmp_path, tiny_tokenizer_dir):
    save_tiny_hf_dir(hf_tiny_config("gpt2"), tmp_path / "mine", tiny_tokenizer_dir)
    reg.add("mine", str(tmp_path / "mine"))
    reg.remove("mine")
    assert (tmp_path / "mine" / "config.json").is_file()


def test_errors_name_the_model(reg, tmp_path, tiny_tokenizer_dir):
    with pytest.raises(ModelLoadError, match="'nope' is not registered"):
        reg.get("nope")
    with pytest.raises(ValueError, match="built-in"):
        reg.remove(DEFAULT_MODEL)
    with pytest.raises(ModelLoadError, match="--hub"):
        reg.add("x", "HuggingFaceTB/SmolLM2-360M")
    with pytest.raises(ValueError, match="name"):
        reg.add("bad name!", str(tmp_path))
    save_tiny_hf_dir(hf_tiny_config("llama"), tmp_path / "m", tiny_tokenizer_dir)
    reg.add("m", str(tmp_path / "m"))
    with pytest.raises(ValueError, match="already registered"):
        reg.add("m", str(tmp_path / "m"))


def test_hub_download_offline_is_a_clear_error(reg):
    with pytest.raises(ModelLoadError, match="SmolLM2-360M.*hub"):
        reg.add("smollm2-360m", "HuggingFaceTB/SmolLM2-360M", allow_download=True)
    assert [m.name for m in reg.list()] == [DEFAULT_MODEL]


def test_corrupt_registry_file(reg):
    reg.root.mkdir(parents=True)
    reg.file.write_text("{oops")
    with pytest.raises(ModelLoadError, match="registry.json"):
        reg.list()


def test_registry_file_is_plain_json(reg, tmp_path, tiny_tokenizer_dir):
    save_tiny_hf_dir(hf_tiny_config("qwen2"), tmp_path / "q", tiny_tokenizer_dir)
    reg.add("q", str(tmp_path / "q"))
    data = json.loads(reg.file.read_text())
    assert data["q"]["model_type"] == "qwen2" and data["q"]["path"] == str(tmp_path / "q")
