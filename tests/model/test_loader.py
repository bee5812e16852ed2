"""Loading Hugging Face model directories, and clear errors for bad input: a missing path, a
corrupt safetensors file, an unknown architecture, missing/unexpected/misshapen tensors, and
missing tokenizer files. Each error must name the file, tensor or field."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from shoal.model.loader import ModelLoadError, load, load_dir
from shoal.model.weights import hf_state_dict
from tests.helpers import TINY_VOCAB, hf_model, hf_tiny_config, save_tiny_hf_dir


def _logits_hf_vs_ours(path):
    hf = hf_model_from_dir(path)
    ours = load_dir(path, dtype="float32")
    x = torch.randint(0, TINY_VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (hf(x).logits - ours.model.logits(x)).abs().max().item(), ours


def hf_model_from_dir(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_loads_each_family_from_a_directory(tiny_hf_dir):
    family, path = tiny_hf_dir
    diff, ours = _logits_hf_vs_ours(path)
    assert diff <= 1e-4
    assert ours.tokenizer is not None and ours.tokenizer.eos_token_id is not None
    assert ours.config.family == ("gpt2" if family == "gpt2" else "llama")


def test_bfloat16_load_casts_every_parameter(tiny_hf_dir):
    _, path = tiny_hf_dir
    m = load_dir(path, dtype="bfloat16").model
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}


def test_hf_state_dict_round_trips(tiny_hf_dir, tmp_path):
    """Saving our weights in HF layout gives back the checkpoint (Conv1D transposes included)."""
    _, path = tiny_hf_dir
    ours = load_dir(path, dtype="float32", with_tokenizer=False)
    saved = hf_state_dict(ours.model)
    original = load_file(os.path.join(path, "model.safetensors"))
    for name, t in saved.items():
        assert torch.equal(t, original[name]), name


def test_gpt2_checkpoint_without_prefix_and_with_mask_buffers(tmp_path, tiny_tokenizer_dir):
    """The original gpt2 checkpoints name tensors `h.0...` and carry `attn.bias` buffers."""
    torch.manual_seed(0)
    path = tmp_path / "gpt2_old"
    hf = save_tiny_hf_dir(hf_tiny_config("gpt2"), path, tiny_tokenizer_dir)
    st = load_file(str(path / "model.safetensors"))
    old = {k.removeprefix("transformer."): v for k, v in st.items()}
    old["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 256, 256))
    save_file(old, str(path / "model.safetensors"))
    ours = load_dir(str(path), dtype="float32")
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert (hf(x).logits - ours.model.logits(x)).abs().max().item() <= 1e-4


def test_missing_path_is_named(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="nope"):
        load(missing)
    with pytest.raises(ModelLoadError, match="no such model directory"):
        load_dir(missing)


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_dir(str(tmp_path / "empty"))


def test_corrupt_safetensors_names_the_file(tiny_hf_dir):
    _, path = tiny_hf_dir
    f = os.path.join(path, "model.safetensors")
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_dir(path)
    with open(f, "wb") as fh:
        fh.write(b"\x00garbage" * 10)
    with pytest.raises(ModelLoadError, match="corrupt or unreadable safetensors"):
        load_dir(path)


def test_unknown_architecture_names_the_field(tiny_hf_dir):
    _, path = tiny_hf_dir
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["model_type"] = "mamba"
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ModelLoadError, match=r"config\.json.*model_type.*mamba"):
        load_dir(path)


def test_invalid_json_config(tiny_hf_dir):
    _, path = tiny_hf_dir
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_dir(path)


def _rewrite(path, edit):
    f = os.path.join(path, "model.safetensors")
    st = load_file(f)
    edit(st)
    save_file(st, f)


def test_missing_tensor_is_named(tmp_path, tiny_tokenizer_dir):
    path = tmp_path / "m"
    save_tiny_hf_dir(hf_tiny_config("llama"), path, tiny_tokenizer_dir)
    _rewrite(str(path), lambda st: st.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(ModelLoadError, match=r"missing tensor 'model\.layers\.1\.mlp\.down_proj\.weight'"):
        load_dir(str(path))


def test_unexpected_tensor_is_named(tmp_path, tiny_tokenizer_dir):
    path = tmp_path / "m"
    save_tiny_hf_dir(hf_tiny_config("llama"), path, tiny_tokenizer_dir)
    _rewrite(str(path), lambda st: st.__setitem__("model.layers.9.extra.weight", torch.zeros(2)))
    with pytest.raises(ModelLoadError, match=r"unexpected tensor 'model\.layers\.9\.extra\.weight'"):
        load_dir(str(path))


def test_wrong_shape_is_named(tmp_path, tiny_tokenizer_dir):
    path = tmp_path / "m"
    save_tiny_hf_dir(hf_tiny_config("llama"), path, tiny_tokenizer_dir)
    _rewrite(str(path), lambda st: st.__setitem__("model.norm.weight", torch.ones(63)))
    with pytest.raises(ModelLoadError, match=r"'model\.norm\.weight' has shape \(63,\)"):
        load_dir(str(path))


def test_missing_tokenizer_is_named(tmp_path):
    path = tmp_path / "m"
    save_tiny_hf_dir(hf_tiny_config("llama"), path)
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        load_dir(str(path))
    assert load_dir(str(path), with_tokenizer=False).tokenizer is None


def test_sharded_checkpoint(tmp_path, tiny_tokenizer_dir):
    torch.manual_seed(0)
    hf = hf_model(hf_tiny_config("qwen2"))
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shutil.copy(os.path.join(tiny_tokenizer_dir, "tokenizer.json"), tmp_path / "sharded")
    shards = [f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]
    assert len(shards) > 1
    ours = load_dir(str(tmp_path / "sharded"), dtype="float32", with_tokenizer=False)
    x = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        assert (hf(x).logits - ours.model.logits(x)).abs().max().item() <= 1e-4


def test_loading_and_serving_do_not_import_torch_dynamo(tiny_hf_dir):
    """The model is built on the meta device, where ops go through torch's reference ops, whose
    first use imports torch._dynamo (and Triton where installed: ~150 MB of RSS, the issue's
    memory target's margin). Loading a model and running an engine step must not (fresh process)."""
    import subprocess
    import sys

    _, path = tiny_hf_dir
    code = (
        "import sys\n"
        "from shoal.config import EngineConfig\n"
        "from shoal.engine.llm_engine import LLMEngine\n"
        "from shoal.engine.sampling_params import SamplingParams\n"
        "from shoal.model.loader import load_dir\n"
        f"m = load_dir({str(path)!r}, dtype='float32')\n"
        "e = LLMEngine(EngineConfig(model='tiny', num_kv_blocks=64, block_size=8), m)\n"
        "e.add_request('a', [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=3))\n"
        "while e.has_unfinished():\n"
        "    e.step()\n"
        "print(sorted(k for k in sys.modules if k == 'torch._dynamo' or k.startswith('triton')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
