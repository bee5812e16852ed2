"""Packed CPU weights (`shoal.model.packed`): the same products from oneDNN's layout, rows
invariant to the batch, fused parts kept as shapes only, tied heads copied, deep copies."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from shoal.model.fused import fuse_projections
from shoal.model.layers import INVARIANT_ROWS, Linear, linear
from shoal.model.packed import PackedWeight, bf16_packing_ok, pack_linears, packing_available
from tests.model.test_fused import ids
from tests.model.test_transformer import pair

pytestmark = pytest.mark.skipif(not packing_available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_packed_model_computes_the_same_logits(family):
    _, model = pair(family)
    ref = model.logits(ids())
    fused = fuse_projections(model)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    n = pack_linears(model, pack_tied=True)
    # every linear but the fused parts is packed; the parts keep only shape and dtype
    assert n == len(linears) - (3 + 2) * fused // 2 > 0
    assert pack_linears(model) == 0  # once
    with torch.inference_mode():
        got = model.logits(ids())
    assert (got - ref).abs().max().item() < 1e-5
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            assert isinstance(m.weight, PackedWeight) and m.weight.device.type == "meta"


def test_fused_parts_become_shapes_that_refuse_to_run():
    _, model = pair("llama")
    fuse_projections(model)
    attn = model.model.layers[0].self_attn
    q_before = attn.q_proj.weight.detach().clone()
    fused_before = attn.fused_qkv.weight.detach().clone()
    pack_linears(model)
    assert attn.q_proj.weight.device.type == "meta" and attn.q_proj.weight.shape == q_before.shape
    assert torch.equal(attn.fused_qkv.weight.dense(), fused_before)  # same numbers, bit for bit
    assert attn.q_proj.weight.chunks == ()
    with pytest.raises(RuntimeError, match="fused"):
        attn.q_proj(torch.randn(1, q_before.shape[1]))


@pytest.mark.parametrize("pack_tied", [False, True])
def test_tied_head_stays_shared_unless_asked(pack_tied):
    _, model = pair("llama")
    if not model.config.tie_word_embeddings:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    emb = model.model.embed_tokens.weight
    assert model.lm_head.weight is emb
    n_linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert pack_linears(model, pack_tied=pack_tied) == n_linears - (0 if pack_tied else 1)
    assert model.model.embed_tokens.weight is emb and not isinstance(emb, PackedWeight)  # lookups stay plain
    if pack_tied:  # its own packed copy
        assert isinstance(model.lm_head.weight, PackedWeight)
        assert torch.equal(model.lm_head.weight.dense(), emb)
    else:  # no second copy
        assert model.lm_head.weight is emb


@pytest.mark.parametrize("k_chunk", [0, 40])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_linear_matches_f_linear(dtype, k_chunk):
    if dtype == torch.bfloat16 and not bf16_packing_ok():
        pytest.skip("no native bf16 in oneDNN here: bf16 layers stay plain")
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 64, generator=g).to(dtype), torch.randn(96, generator=g).to(dtype)
    x = torch.randn(5, 3, 64, generator=g).to(dtype)
    p = PackedWeight.of(w, k_chunk)
    assert [(a, z) for a, z, _ in p.chunks] == ([(0, 64)] if not k_chunk else [(0, 32), (32, 64)])
    got = linear(x, p, b)
    assert got.shape == (5, 3, 96) and got.dtype == dtype
    # |y| up to ~30: a bf16 ulp is 0.125 there, and split-K rounds twice
    tol = 1e-4 if dtype == torch.float32 else 0.26
    assert (got.float() - F.linear(x, w, b).float()).abs().max().item() <= tol
    if dtype == torch.bfloat16 and not k_chunk:  # one row: F.linear's bits exactly
        assert torch.equal(linear(x[:1, 0], p, b), F.linear(x[:1, 0], w, b))


@pytest.mark.skipif(not bf16_packing_ok(), reason="no native bf16 in oneDNN here: bf16 layers stay plain")
@pytest.mark.parametrize("n", [192, 3072])
@pytest.mark.parametrize("k", [576, 1536])
def test_packed_bf16_rows_are_batch_invariant(k, n):
    """With the engine's row cap (`INVARIANT_ROWS`), a row's bits do not change with the number
    of rows or its position: as they are at K <= 1024, and in split-K chunks beyond (packed with
    k_chunk), each chunk added to the rounded running sum. (Without the cap, on a CPU with AMX,
    products of 33+ rows round differently: see `INVARIANT_ROWS`.)"""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    x = torch.randn(130, k, generator=g).to(torch.bfloat16)
    p = PackedWeight.of(w, 1024)
    assert len(p.chunks) == (1 if k <= 1024 else 2) and torch.equal(p.dense(), w)
    one = torch.cat([linear(x[i:i + 1], p) for i in range(130)])
    for m in (2, 3, 7, 13, 32, 33, 64, 130):
        assert torch.equal(linear(x[:m], p, max_rows=INVARIANT_ROWS), one[:m]), m
        assert torch.equal(linear(x[:m], w, max_rows=INVARIANT_ROWS, k_chunk=1024)[:1],
                           linear(x[:1], w, k_chunk=1024)), m  # plain weights too
    shifted = torch.cat([x[1:40], x[:1]])  # row 0 last in a 40-row batch
    assert torch.equal(linear(shifted, p, max_rows=INVARIANT_ROWS)[-1], one[0])
    if k <= 1024:
        assert torch.equal(one[:1], F.linear(x[:1], w))
    else:  # Semantics: chunk 1's product in fp32 plus chunk 0's, rounded
        y0 = F.linear(x[:, :768], w[:, :768])
        want = (x[:, 768:].double() @ w[:, 768:].double().T + y0.double()).to(torch.bfloat16)
        assert (one.float() - want.float()).abs().max().item() <= 0.5  # |y| ~ 40: bf16 ulp 0.25
    assert (one.float() - F.linear(x.float(), w.float())).abs().max().item() <= 1.0


def test_deep_copy_of_a_packed_model_is_packed_and_equal():
    _, model = pair("llama")
    fuse_projections(model)
    pack_linears(model, pack_tied=True)
    twin = copy.deepcopy(model)
    w, w2 = model.lm_head.weight, twin.lm_head.weight
    assert isinstance(w2, PackedWeight) and w2 is not w and torch.equal(w2.dense(), w.dense())
    with torch.inference_mode():
        assert torch.equal(twin.logits(ids()), model.logits(ids()))


def test_non_cpu_float_layers_are_left_alone():
    layer = Linear(8, 4, device="meta")
    model = torch.nn.Sequential(layer, Linear(8, 4).to(torch.float16))
    assert pack_linears(model) == 0
    assert layer.weight.device.type == "meta" and not isinstance(model[1].weight, PackedWeight)


def test_bf16_stays_plain_without_onednn_bf16_kernels(monkeypatch):
    """On a CPU where oneDNN has no native bf16 kernels (torch's check says no), bf16 layers keep
    plain weights (F.linear's fallback); fp32 layers are packed as usual."""
    import shoal.model.packed as packed

    monkeypatch.setattr(packed, "bf16_packing_ok", lambda: False)
    model = torch.nn.Sequential(Linear(8, 4).to(torch.bfloat16), Linear(8, 4))
    assert pack_linears(model) == 1
    assert not isinstance(model[0].weight, PackedWeight) and isinstance(model[1].weight, PackedWeight)
