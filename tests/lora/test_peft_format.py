"""PEFT adapter files: loading real PEFT adapters (Llama, GPT-2 Conv1D), scalings (rslora,
rank/alpha patterns), the `.default` and `.bin` variants, refusals by field, validation against a
model, and save_adapter's PEFT round trip and atomic replace."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from shoal.lora.peft_format import (AdapterError, LoRAAdapter, load_adapter, read_adapter_config,
                                    save_adapter, validate_adapter)
from tests.helpers import TINY_VOCAB
from tests.lora import make_peft_adapter, merged_hf, ours_like, pair

X = torch.randint(0, TINY_VOCAB, (2, 10), generator=torch.Generator().manual_seed(7))
QV = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def llama():
    return pair("llama")


@pytest.fixture(scope="module")
def qv_dir(llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("qv") / "qv"
    make_peft_adapter(llama[0], path, seed=1, **QV)
    return path


def edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    with open(dst / "adapter_config.json") as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(dst / "adapter_config.json", "w") as f:
        json.dump(cfg, f)
    return dst


def merged_ours(hf, adapter: LoRAAdapter):
    """Our model with W + scaling * B @ A for every adapter module."""
    model = ours_like(hf)
    mods = dict(model.named_modules())
    with torch.no_grad():
        for path, (a, b) in adapter.weights.items():
            mods[path].weight += adapter.scaling_for(path) * b @ a
    return model


def test_load_llama_adapter_in_our_paths(llama, qv_dir):
    ad = load_adapter(str(qv_dir), "qv")
    assert ad.name == "qv" and ad.r == 4 and ad.lora_alpha == 8 and ad.scaling == 2.0
    assert ad.target_modules == ["q_proj", "v_proj"]
    assert set(ad.weights) == {f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}
    a, b = ad.weights["model.layers.0.self_attn.v_proj"]
    assert a.shape == (4, 64) and b.shape == (32, 4)  # 2 kv heads x 16
    validate_adapter(ad, llama[1], max_lora_rank=4)
    with torch.no_grad():
        want = merged_hf(llama[0], qv_dir)(X).logits
        got = merged_ours(llama[0], ad).logits(X)
    assert (got - want).abs().max().item() <= 1e-4
    assert (want - llama[0](X).logits).abs().max().item() > 1e-2  # the adapter does something


def test_gpt2_conv1d_layout_is_r_in_and_out_r(tmp_path):
    """PEFT wraps GPT-2's Conv1D with fan_in_fan_out=True; lora_A is still (r, in), lora_B (out, r)."""
    hf, _ = pair("gpt2")
    peft_model = make_peft_adapter(hf, tmp_path / "g", seed=2, r=4, lora_alpha=16,
                                   target_modules=["c_attn", "c_proj", "c_fc"])
    ad = load_adapter(str(tmp_path / "g"))
    assert ad.name == "g" and ad.scaling == 4.0
    c_attn = peft_model.base_model.model.transformer.h[0].attn.c_attn
    a, b = ad.weights["transformer.h.0.attn.c_attn"]
    assert a.shape == (4, 64) and b.shape == (192, 4)
    assert torch.equal(a, c_attn.lora_A["default"].weight) and torch.equal(b, c_attn.lora_B["default"].weight)
    assert ad.weights["transformer.h.1.mlp.c_proj"][0].shape == (4, 256)
    merged = merged_hf(hf, tmp_path / "g")
    conv_w = merged.transformer.h[0].attn.c_attn.weight  # Conv1D (in, out)
    delta = (conv_w - hf.transformer.h[0].attn.c_attn.weight).T  # (out, in)
    assert (delta - ad.scaling * b @ a).abs().max().item() <= 1e-5
    with torch.no_grad():
        got = merged_ours(hf, ad).logits(X)
        assert (got - merged(X).logits).abs().max().item() <= 1e-4


def test_rslora_and_rank_alpha_patterns_match_peft(llama, tmp_path):
    hf = llama[0]
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj", "up_proj"],
              rank_pattern={"down_proj": 8}, alpha_pattern={"q_proj": 32})
    make_peft_adapter(hf, tmp_path / "pat", seed=3, **kw)
    ad = load_adapter(str(tmp_path / "pat"))
    assert ad.weights["model.layers.1.mlp.down_proj"][0].shape == (8, 96)
    assert ad.scaling_for("model.layers.1.mlp.down_proj") == 1.0
    assert ad.scaling_for("model.layers.0.self_attn.q_proj") == 8.0
    assert ad.scaling_for("model.layers.0.mlp.up_proj") == 2.0
    make_peft_adapter(hf, tmp_path / "rs", seed=4, r=16, lora_alpha=8, use_rslora=True,
                      target_modules=["o_proj"])
    rs = load_adapter(str(tmp_path / "rs"))
    assert rs.scaling == 8 / math.sqrt(16)
    for name, adapter in (("pat", ad), ("rs", rs)):
        with torch.no_grad():
            want = merged_hf(hf, tmp_path / name)(X).logits
            assert (merged_ours(hf, adapter).logits(X) - want).abs().max().item() <= 1e-4


def test_default_adapter_name_keys_and_bin_file(qv_dir, tmp_path):
    ref = load_adapter(str(qv_dir))
    tensors = load_file(qv_dir / "adapter_model.safetensors")
    renamed = {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}
    for variant, write in (("dflt", lambda d: save_file(renamed, d / "adapter_model.safetensors")),
                           ("bin", lambda d: torch.save(tensors, d / "adapter_model.bin"))):
        d = tmp_path / variant
        d.mkdir()
        shutil.copy(qv_dir / "adapter_config.json", d)
        write(d)
        assert read_adapter_config(str(d)).shapes == {m: ((4, 64), tuple(b.shape))
                                                      for m, (_, b) in ref.weights.items()}
        ad = load_adapter(str(d))
        assert ad.weights.keys() == ref.weights.keys()
        assert all(torch.equal(ad.weights[m][i], ref.weights[m][i]) for m in ref.weights for i in (0, 1))


@pytest.mark.parametrize("field,value", [
    ("use_dora", True), ("bias", "all"), ("modules_to_save", ["lm_head"]),
    ("layers_to_transform", [0]), ("lora_bias", True), ("peft_type", "IA3"),
])
def test_unsupported_config_fields_are_refused_by_name(qv_dir, tmp_path, field, value):
    d = edit_config(qv_dir, tmp_path / "bad", **{field: value})
    with pytest.raises(AdapterError, match=f"^{field}:"):
        read_adapter_config(str(d))
    with pytest.raises(ValueError, match=f"^{field}:"):
        load_adapter(str(d))


def test_real_dora_and_embedding_adapters_are_refused(llama, tmp_path):
    make_peft_adapter(llama[0], tmp_path / "dora", seed=5, r=2, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(AdapterError, match="use_dora"):
        read_adapter_config(str(tmp_path / "dora"))
    make_peft_adapter(llama[0], tmp_path / "emb", seed=6, r=2, target_modules=["embed_tokens", "q_proj"])
    with pytest.raises(AdapterError, match="target_modules: 'model.embed_tokens' is an embedding"):
        read_adapter_config(str(tmp_path / "emb"))
    with pytest.raises(AdapterError, match="embedding"):
        load_adapter(str(tmp_path / "emb"))


def test_missing_and_corrupt_files(qv_dir, tmp_path):
    with pytest.raises(AdapterError, match="no such adapter directory"):
        read_adapter_config(str(tmp_path / "nope"))
    d = tmp_path / "noweights"
    shutil.copytree(qv_dir, d)
    os.remove(d / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="adapter_model.safetensors: not found"):
        read_adapter_config(str(d))
    os.remove(d / "adapter_config.json")
    with pytest.raises(AdapterError, match="adapter_config.json: not found"):
        load_adapter(str(d))
    c = tmp_path / "corrupt"
    shutil.copytree(qv_dir, c)
    (c / "adapter_model.safetensors").write_bytes(b"\x10\x00garbage")
    with pytest.raises(AdapterError, match="corrupt"):
        read_adapter_config(str(c))


def test_tensor_problems_name_the_tensor(qv_dir, tmp_path):
    tensors = load_file(qv_dir / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    for variant, bad, pattern in [
        ("missing", {k: v for k, v in tensors.items() if k != key}, "q_proj.lora_B.weight: missing"),
        ("rank", {**tensors, key: torch.zeros(64, 3)}, r"q_proj.lora_B.weight: shape \(64, 3\)"),
        ("extra", {**tensors, "base_model.model.lm_head.weight": torch.zeros(2, 2)}, "lm_head.weight"),
    ]:
        d = tmp_path / variant
        d.mkdir()
        shutil.copy(qv_dir / "adapter_config.json", d)
        save_file(bad, d / "adapter_model.safetensors")
        with pytest.raises(AdapterError, match=pattern):
            read_adapter_config(str(d))


def test_validate_against_model(llama, qv_dir, tmp_path):
    _, ours = llama
    cfg = read_adapter_config(str(qv_dir))
    validate_adapter(cfg, ours, max_lora_rank=4)
    with pytest.raises(AdapterError, match="r: adapter rank 4 exceeds max_lora_rank 2"):
        validate_adapter(cfg, ours, max_lora_rank=2)
    _, gpt2 = pair("gpt2")
    with pytest.raises(AdapterError, match="target_modules: 'q_proj' is not a module"):
        validate_adapter(cfg, gpt2, max_lora_rank=8)
    # same names, wrong width: an adapter for a wider model of the same family
    tensors = load_file(qv_dir / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    d = tmp_path / "wide"
    d.mkdir()
    shutil.copy(qv_dir / "adapter_config.json", d)
    save_file({**tensors, key: torch.zeros(4, 128)}, d / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"layers.1.self_attn.q_proj.lora_A.weight: shape \(4, 128\)"):
        validate_adapter(read_adapter_config(str(d)), ours, max_lora_rank=8)
    with pytest.raises(AdapterError, match="lm_head"):
        validate_adapter(read_adapter_config(str(edit_config(qv_dir, tmp_path / "lm",
                         target_modules=["q_proj", "lm_head"])), with_shapes=False), ours, 8)


def test_save_round_trip_loads_in_peft(llama, qv_dir, tmp_path):
    from peft import PeftModel

    hf = llama[0]
    ad = load_adapter(str(qv_dir), "qv")
    out = tmp_path / "saved" / "qv"
    save_adapter(str(out), ad)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert os.listdir(tmp_path / "saved") == ["qv"]  # no temporary directory left behind
    with torch.no_grad():
        want = merged_hf(hf, qv_dir)(X).logits
        import copy
        peft_model = PeftModel.from_pretrained(copy.deepcopy(hf), str(out)).eval()
        assert (peft_model(X).logits - want).abs().max().item() <= 1e-4
        assert (merged_hf(hf, out)(X).logits - want).abs().max().item() <= 1e-4
    back = load_adapter(str(out))
    assert all(torch.equal(back.weights[m][0], ad.weights[m][0]) for m in ad.weights)


def test_from_weights_with_mixed_ranks_round_trips_through_peft(llama, tmp_path):
    hf = llama[0]
    g = torch.Generator().manual_seed(9)
    weights = {"model.layers.0.self_attn.q_proj": (torch.randn(2, 64, generator=g) * 0.1,
                                                   torch.randn(64, 2, generator=g) * 0.1),
               "model.layers.1.self_attn.q_proj": (torch.randn(2, 64, generator=g) * 0.1,
                                                   torch.randn(64, 2, generator=g) * 0.1),
               "model.layers.1.mlp.down_proj": (torch.randn(6, 96, generator=g) * 0.1,
                                                torch.randn(64, 6, generator=g) * 0.1)}
    ad = LoRAAdapter.from_weights("t", weights, lora_alpha=4.0)
    assert ad.r == 2 and ad.scaling_for("model.layers.1.mlp.down_proj") == 4 / 6
    save_adapter(str(tmp_path / "t"), ad)
    with torch.no_grad():
        want = merged_ours(hf, ad).logits(X)
        assert (merged_hf(hf, tmp_path / "t")(X).logits - want).abs().max().item() <= 1e-4


def test_save_replaces_atomically_and_failure_keeps_old(llama, qv_dir, tmp_path, monkeypatch):
    ad = load_adapter(str(qv_dir), "qv")
    out = tmp_path / "a"
    save_adapter(str(out), ad)
    ad2 = LoRAAdapter(**{**{f: getattr(ad, f) for f in ad.__slots__}, "lora_alpha": 2.0})
    save_adapter(str(out), ad2)  # replaces an existing adapter
    assert read_adapter_config(str(out)).lora_alpha == 2.0
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(str(out), ad)
    assert read_adapter_config(str(out)).lora_alpha == 2.0  # old files intact
    assert os.listdir(tmp_path) == ["a"]
