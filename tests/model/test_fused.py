"""Fused q/k/v and gate/up projections (`shoal.model.fused`): same model, one product each."""

from __future__ import annotations

import copy

import pytest
import torch

from shoal import kernels
from shoal.finetune.lora_train import apply_trainable_lora
from shoal.lora.layers import apply_lora, default_targets
from shoal.model.fused import fuse_projections
from shoal.model.layers import add_lora_deltas
from shoal.model.quant import quantize_model
from tests.model.test_transformer import pair


def ids(n: int = 2, t: int = 11) -> torch.Tensor:
    return torch.randint(3, 200, (n, t), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_fused_model_computes_the_same_logits(family):
    _, model = pair(family)
    ref = model.logits(ids())
    parts = [model.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].mlp.up_proj.weight]
    assert fuse_projections(model) == 2 * model.config.num_layers
    got = model.logits(ids())
    assert (got - ref).abs().max().item() < 1e-5
    # the parts are views of the fused weights (no second copy), with their old values
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert torch.equal(attn.q_proj.weight, parts[0]) and torch.equal(mlp.up_proj.weight, parts[1])
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.fused_qkv.weight.untyped_storage().data_ptr()
    assert attn.fused_qkv.weight.shape[0] == attn.q_proj.out_features + 2 * attn.k_proj.out_features
    assert fuse_projections(model) == 0  # once
    # never a LoRA target, and no name that suffix matching of q_proj / up_proj would pick
    assert not [p for p in default_targets(model) if "fused" in p]
    assert not [n for n, _ in model.named_modules() if n.endswith(("q_proj", "v_proj", "up_proj")) and "fused" in n]


def test_fused_int8_model_equals_unfused_int8():
    _, model = pair("llama")
    quantize_model(model)
    ref = model.logits(ids())
    fuse_projections(model)
    assert model.model.layers[1].mlp.fused_gate_up.weight is None  # int8 buffers stacked
    assert torch.equal(model.logits(ids()), ref)  # the int8 kernel is row- and column-exact here


def test_serving_lora_on_a_fused_model_adds_each_parts_delta():
    _, model = pair("llama")
    plain = copy.deepcopy(model)
    fuse_projections(model)
    outs = []
    for m in (plain, model):
        mapping = apply_lora(m, max_loras=2, max_rank=4)
        g = torch.Generator().manual_seed(5)
        for path, layer in mapping.layers.items():
            layer.set_lora(1, torch.randn(4, layer.in_features, generator=g),
                           torch.randn(layer.out_features, 4, generator=g), 0.5)
        mapping.set([1, -1])  # row 0 on the adapter, row 1 on the base model
        outs.append(m.logits(ids()))
    assert (outs[0] - outs[1]).abs().max().item() < 1e-4
    mapping.clear()
    base = model.logits(ids())
    assert (outs[1][0] - base[0]).abs().max().item() > 1e-3  # the adapter acted on row 0 only
    assert (outs[1][1] - base[1]).abs().max().item() < 1e-6


def test_a_trainers_lora_on_a_fused_model_takes_the_unfused_path():
    _, model = pair("llama")
    plain = copy.deepcopy(model)
    fuse_projections(model)
    outs = []
    for m in (plain, model):
        lora = apply_trainable_lora(m, r=4, lora_alpha=8, seed=0)
        with torch.no_grad():
            for p in lora.parameters():
                p.add_(0.1)  # lora_B starts at zero: make the update visible
        outs.append(m.logits(ids()))
    assert (outs[0] - outs[1]).abs().max().item() < 1e-5


@pytest.mark.parametrize("slots", [[-1] * 3 + [0] * 5 + [1] * 20 + [0] * 2, [1, 0, -1, 1, 0, 0, 1, 1]])
@pytest.mark.parametrize("kernel", [True, False])
def test_lora_group_serves_a_fused_projections_parts_with_one_shrink(slots, kernel, monkeypatch):
    """Packed (engine) inputs: the parts of fused q/k/v and gate/up share one buffer
    (`LoRAGroup`: their A rows, or where the CPU kernel reads them all their slots slot-major)
    and give the per-layer results; the kernel, and PyTorch's runs in place and tiles, exercised."""
    monkeypatch.setattr("shoal.lora.grouping.LONG_RUN", 16)
    if not kernel:  # PyTorch's products (on a slot-major group: each part from its own views)
        monkeypatch.setattr("shoal.lora.grouping.kernels.usable", lambda *t: False)
    _, model = pair("llama")
    plain = copy.deepcopy(model)
    fuse_projections(model)
    x = torch.randn(len(slots), model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    outs = []
    for m in (plain, model):
        mapping = apply_lora(m, max_loras=2, max_rank=4)
        mapping.grouped = True
        g = torch.Generator().manual_seed(6)
        for path, layer in mapping.layers.items():
            if path.endswith("k_proj"):
                continue  # a part without weights in any slot: skipped, its siblings served
            for slot in (0, 1):
                layer.set_lora(slot, torch.randn(2 + slot, layer.in_features, generator=g),
                               torch.randn(layer.out_features, 2 + slot, generator=g), 0.5 + slot)
        mapping.set(slots)
        attn, mlp = m.model.layers[0].self_attn, m.model.layers[0].mlp
        with torch.no_grad():
            if attn.fused_qkv is None:
                qkv = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)
            else:
                qkv = attn.fused_qkv(x)
                add_lora_deltas(x, qkv, (attn.q_proj, attn.k_proj, attn.v_proj))
            outs.append((qkv, mlp(x)))
    attn = model.model.layers[0].self_attn
    group = attn.q_proj.lora_group
    assert group is not None and group.layers == (attn.q_proj, attn.k_proj, attn.v_proj)
    r, hid = attn.q_proj.lora_a_stacked.shape[1:]
    if group.a is not None:  # one A buffer, the parts' rows in order
        assert attn.v_proj.lora_a_stacked.untyped_storage().data_ptr() == group.a.untyped_storage().data_ptr()
        assert torch.equal(group.a[1, 2 * r:2 * r + 3], attn.v_proj.lora_a_stacked[1, :3])  # set_lora wrote through
    else:  # slot-major: slot s's row is [A_q B_q A_k B_k A_v B_v]
        assert kernels.enabled()
        off = r * (2 * hid + attn.q_proj.out_features + attn.k_proj.out_features)
        v_a = group.slots[1, off:off + r * hid].view(r, hid)
        v_b = group.slots[1, off + r * hid:off + r * (hid + attn.v_proj.out_features)].view(r, -1)
        assert torch.equal(v_a[:3], attn.v_proj.lora_a_stacked[1, :3]) and v_a[:3].abs().sum() > 0
        assert torch.equal(v_b[:3], attn.v_proj.lora_b_stacked[1, :3]) and v_b[:3].abs().sum() > 0
    assert model.model.layers[0].mlp.up_proj.lora_group is not None
    for plain_out, fused_out in zip(*outs):  # (the fused MLP's SiLU may be the CPU kernel's)
        torch.testing.assert_close(fused_out, plain_out, rtol=1e-5, atol=1e-4)
