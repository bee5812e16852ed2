"""LoRALinear against its `Semantics:` reference loop (packed sorted/interleaved tokens, per-row
and per-token (B, T) inputs), slot padding/reset, and apply_lora keeping the model's Parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shoal import kernels
from shoal.lora.grouping import MIN_ROWS, lora_deltas
from shoal.lora.layers import LoRALinear, LoRAMapping, apply_lora
from tests.lora import pair

IN, OUT, MAX_LORAS, MAX_RANK = 24, 40, 4, 8
RANKS = {0: 2, 1: 8, 3: 5}  # slot 2 stays empty


def make_layer(seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(IN, OUT)
    with torch.no_grad():
        base.weight.copy_(torch.randn(OUT, IN, generator=g))
        base.bias.copy_(torch.randn(OUT, generator=g))
    base.to(device, dtype)
    mapping = LoRAMapping(MAX_LORAS, MAX_RANK, device)
    layer = LoRALinear(base, mapping)
    for slot, r in RANKS.items():
        layer.set_lora(slot, torch.randn(r, IN, generator=g), torch.randn(OUT, r, generator=g), 0.5 + slot)
    return base, layer, mapping


def reference(layer: LoRALinear, x: torch.Tensor, slots: list[int]) -> torch.Tensor:
    """The docstring's loop, over the full zero-padded stacked buffers."""
    y = x @ layer.weight.T + layer.bias
    for n, s in enumerate(slots):
        if s >= 0:
            y[n] += layer.scaling[s] * (x[n] @ layer.lora_a_stacked[s].T) @ layer.lora_b_stacked[s]
    return y


@pytest.mark.parametrize("slots", [
    [-1, -1, 0, 0, 0, 1, 1, 2, 3, 3],      # sorted by slot: contiguous slices
    [1, -1, 0, 3, 1, 0, -1, 3, 2, 1],      # interleaved: index gather/scatter
    [3, 3, 3, 3, 3, 3, 3, 3, 3, 3],        # one adapter for everything
])
def test_packed_tokens_match_reference_loop(slots):
    _, layer, mapping = make_layer()
    x = torch.randn(len(slots), IN, generator=torch.Generator().manual_seed(1))
    mapping.set(slots)
    with torch.no_grad():
        got = layer(x)
    assert (got - reference(layer, x, slots)).abs().max().item() <= 1e-4


def test_sorted_tokens_use_slices_and_interleaved_use_indices():
    mapping = LoRAMapping(MAX_LORAS, MAX_RANK)
    mapping.set([-1, 0, 0, 2, 2, 2])
    assert mapping.plan((6,)) == [(0, slice(1, 3)), (2, slice(3, 6))]
    mapping.set([0, 2, 0])
    plan = mapping.plan((3,))
    assert [s for s, _ in plan] == [0, 2]
    assert plan[0][1].tolist() == [0, 2] and plan[1][1].tolist() == [1]
    mapping.set(torch.tensor([1, -1]))  # per row of a (2, T) input
    assert mapping.plan((2, 5)) == [(1, slice(0, 5))]


def test_per_row_and_per_token_batched_inputs():
    _, layer, mapping = make_layer()
    x = torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(2))
    rows = [1, -1, 3]
    mapping.set(torch.tensor(rows))  # (B,) per row
    with torch.no_grad():
        got = layer(x)
    want = reference(layer, x.reshape(15, IN), [s for s in rows for _ in range(5)]).view(3, 5, OUT)
    assert (got - want).abs().max().item() <= 1e-4
    per_token = torch.tensor([[0, 0, 1, 1, -1], [3, -1, -1, 0, 0], [1, 1, 1, 1, 1]])
    mapping.set(per_token)  # (B, T) per token
    with torch.no_grad():
        got = layer(x)
    want = reference(layer, x.reshape(15, IN), per_token.flatten().tolist()).view(3, 5, OUT)
    assert (got - want).abs().max().item() <= 1e-4


def test_all_base_skips_lora_and_equals_base_exactly():
    base, layer, mapping = make_layer()
    x = torch.randn(7, IN)
    for slots in ([-1] * 7, []):
        mapping.set(slots)
        assert not mapping.active and mapping.plan((7,)) == []
        with torch.no_grad():
            assert torch.equal(layer(x), base(x))
    mapping.set([2] * 7)  # an empty slot (rank 0) is the base model too
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))


def test_set_lora_zero_pads_and_reset_empties():
    _, layer, _ = make_layer()
    layer.set_lora(1, torch.ones(3, IN), torch.ones(OUT, 3), 2.0)  # rank 8 -> 3 in the same slot
    assert layer.ranks[1] == 3 and layer.scaling[1].item() == 2.0
    assert layer.lora_a_stacked[1, 3:].abs().sum() == 0 and layer.lora_b_stacked[1, 3:].abs().sum() == 0
    layer.reset_lora(1)
    assert layer.ranks[1] == 0 and layer.scaling[1].item() == 0.0
    assert layer.lora_a_stacked[1].abs().sum() == 0 and layer.lora_b_stacked[1].abs().sum() == 0
    with pytest.raises(ValueError, match="r: adapter rank 9 exceeds max_lora_rank 8"):
        layer.set_lora(0, torch.ones(9, IN), torch.ones(OUT, 9), 1.0)
    with pytest.raises(ValueError, match="shapes"):
        layer.set_lora(0, torch.ones(2, IN + 1), torch.ones(OUT, 2), 1.0)


def test_mapping_errors():
    _, layer, mapping = make_layer()
    with pytest.raises(ValueError, match="out of range"):
        mapping.set([0, MAX_LORAS])
    mapping.set([0, 1, 0])
    with pytest.raises(ValueError, match="does not fit"):
        layer(torch.randn(4, IN))


def test_backward_flows_through_lora_tokens():
    _, layer, mapping = make_layer()
    x = torch.randn(4, IN, requires_grad=True)
    mapping.set([0, 0, -1, 3])
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


def test_apply_lora_keeps_parameters_and_state_dict():
    _, model = pair("llama")
    before = dict(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    mapping = apply_lora(model, 3, 4)
    want = {n for n, m in pair("llama")[1].named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    assert set(mapping.layers) == want and len(want) == 14
    assert not isinstance(model.lm_head, LoRALinear)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] or torch.equal(after[k], before[k]) for k in before)
    assert {n: p for n, p in model.named_parameters()}.keys() == params.keys()
    assert model.model.layers[0].self_attn.q_proj.weight is params["model.layers.0.self_attn.q_proj.weight"]
    assert model.model.layers[1].mlp.down_proj.lora_a_stacked.shape == (3, 4, 96)
    assert model.model.layers[1].mlp.down_proj.lora_b_stacked.shape == (3, 4, 64)
    with pytest.raises(ValueError, match="already applied"):
        apply_lora(model, 3, 4)


@pytest.mark.skipif(not kernels.enabled(), reason="the slot-major layout is the CPU kernel's")
def test_apply_lora_lays_each_slot_out_as_one_run_for_the_cpu_kernel():
    """Where the CPU kernel reads the slots, a lone layer's slot s is [A B] in one row of one
    buffer (`slot_major_`), views that set_lora writes through; the deltas are those of the
    separate buffers (the Semantics loop)."""
    _, model = pair("llama")
    mapping = apply_lora(model, 3, 4)
    down = model.model.layers[1].mlp.down_proj  # (96 -> 64), not part of a fused projection
    a, b = down.lora_a_stacked, down.lora_b_stacked
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    assert a.stride() == b.stride()[:1] + (96, 1) and a.stride(0) == 4 * (96 + 64)
    assert b.storage_offset() == a.storage_offset() + 4 * 96  # B right after A, slot by slot
    g = torch.Generator().manual_seed(3)
    for slot in (0, 2):
        down.set_lora(slot, torch.randn(3, 96, generator=g), torch.randn(64, 3, generator=g), 0.5)
    x = torch.randn(6, 96, generator=g)
    mapping.set([0, 2, -1, 2, 0, 0])
    with torch.no_grad():
        got = down(x)
        want = x @ down.weight.T + (down.bias if down.bias is not None else 0)
        for n, s in enumerate([0, 2, -1, 2, 0, 0]):
            if s >= 0:
                want[n] += down.scaling[s] * (x[n] @ a[s].T) @ b[s]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_apply_lora_target_subset_and_unknown():
    _, model = pair("gpt2")
    mapping = apply_lora(model, 2, 4, target_modules=["c_attn", "transformer.h.1.mlp.c_fc"])
    assert set(mapping.layers) == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn",
                                   "transformer.h.1.mlp.c_fc"}
    _, model = pair("gpt2")
    with pytest.raises(ValueError, match="target_modules: 'q_proj'"):
        apply_lora(model, 2, 4, target_modules=["q_proj"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_matches_fp32_reference_loop():
    _, cpu_layer, _ = make_layer()
    _, layer, mapping = make_layer(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(10, IN, generator=torch.Generator().manual_seed(1))
    for slots in ([-1, 0, 0, 1, 1, 1, 3, 3, -1, -1], [1, -1, 0, 3, 1, 0, -1, 3, 2, 1]):
        mapping.set(slots)
        with torch.no_grad():
            got = layer(x.to("cuda", torch.bfloat16)).float().cpu()
            want = reference(cpu_layer, x, slots)
        assert (got - want).abs().max().item() <= 2e-2 * want.abs().max().item()


@pytest.mark.parametrize("tile_cap", [64, 2])  # 2: a slot's run spans several tiles
@pytest.mark.parametrize("slots", [
    [-1, -1, 0, 0, 0, 1, 1, 2, 3, 3],      # every slot once: the stacked buffers, no gather
    [1, -1, 0, 3, 1, 0, -1, 3, 2, 1],      # interleaved
    [3, 3, 3, 3, 3, 3, 3, 3, 3, 3],        # one adapter for everything
    [-1, 1, -1, -1, -1, -1, -1, -1, -1, 0],  # mostly base
    [2, 2, 2, -1, 2, 2, 2, 2, 2, 2],       # only the empty slot (rank 0 everywhere)
    [-1, -1, 0, 0, 1, 1, 3, 3, 3, 3],      # sorted runs that fill their tiles: views, no copies
    [-1, 0, 0, 0, 1, 3, 3, 3, 3, 3],       # sorted runs of unequal length
])
@pytest.mark.parametrize("long_run", [3, 100])  # 3: runs of 3+ in place, the rest in tiles
def test_grouped_products_match_reference_loop(slots, tile_cap, long_run, monkeypatch):
    monkeypatch.setattr("shoal.lora.grouping.LONG_RUN", long_run)
    _, layer, mapping = make_layer()
    mapping.grouped, mapping.tile_cap = True, tile_cap
    x = torch.randn(len(slots), IN, generator=torch.Generator().manual_seed(1))
    mapping.set(slots)
    with torch.no_grad():
        got = layer(x)
    assert (got - reference(layer, x, slots)).abs().max().item() <= 1e-4


def test_group_plan_serves_long_contiguous_runs_in_place(monkeypatch):
    monkeypatch.setattr("shoal.lora.grouping.LONG_RUN", 3)
    mapping = LoRAMapping(MAX_LORAS, MAX_RANK)
    mapping.set([-1, 1, 1, 1, 1, 0, 2, 3, 3, 0, 0])  # slot 0 has 3 rows, but not contiguous
    g = mapping.groups()
    assert g.runs == [(1, slice(1, 5))]
    assert g.tile_slots.tolist() == [0, 2, 3] and g.rows == 3 and g.tok.tolist() == [5, 9, 10, 6, 7, 8]


def test_group_plan_tiles_each_slot_and_pads():
    mapping = LoRAMapping(MAX_LORAS, MAX_RANK)
    mapping.tile_cap = 2
    mapping.set([3, -1, 0, 3, 3, 0])
    g = mapping.groups()
    assert g.rows == 2 and g.slots == (0, 3)
    assert g.tile_slots.tolist() == [0, 3, 3]  # slot 3's three tokens take two tiles
    assert g.tok.tolist() == [2, 5, 0, 3, 4] and g.dst.tolist() == [0, 1, 2, 3, 4]
    assert not g.all_slots and g.span is None
    mapping.set([0, 1, 2, 3])  # one tile per slot, in slot order: no gather needed
    assert mapping.groups().all_slots and mapping.groups().rows == 1
    mapping.set([-1, -1, 0, 0, 2, 2])  # sorted, equal runs: the tiles are a view of x
    assert mapping.groups().span == slice(2, 6) and mapping.groups().rows == 2
    mapping.set([-1, 0, 0, 0, 2, 1, 0])  # sorted, unequal runs: padded tiles
    assert mapping.groups().span is None and mapping.groups().runs == []


@pytest.mark.parametrize("long_run", [3, 100])
def test_grouped_row_is_bit_identical_alone_and_in_any_batch(long_run, monkeypatch):
    """bf16: a row's output does not depend on the rest of the batch (batch invariance), on the
    tiles and on the run-by-run path alike."""
    monkeypatch.setattr("shoal.lora.grouping.LONG_RUN", long_run)
    _, layer, mapping = make_layer(dtype=torch.bfloat16)
    layer.to(torch.bfloat16)
    mapping.grouped, mapping.min_rows = True, MIN_ROWS  # as the engine sets them
    g = torch.Generator().manual_seed(3)
    row = torch.randn(1, IN, generator=g).bfloat16()
    with torch.no_grad():
        mapping.set([1])
        alone = layer(row)[0]
        for others in ([0, 3], [1, 1, 1, -1], [3] * 20 + [0] * 5, [2, 0, 1, 3, 1], [1] * 9):
            for pos in (0, len(others)):
                x = torch.randn(len(others) + 1, IN, generator=g).bfloat16()
                x[pos] = row[0]
                mapping.set(others[:pos] + [1] + others[pos:])
                assert torch.equal(layer(x)[pos], alone), (others, pos)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,n,r", [(576, 1536, 8), (1536, 576, 16), (2048, 192, 64)])
def test_lora_delta_row_is_bit_identical_for_any_tile_shape(dtype, k, n, r):
    """The grouped shrink-expand product gives a row the same bits whatever its tile's height
    and however many groups share the call (the fp32 products and the padding to
    MIN_ROWS; decode tiles have 1-3 rows, prefill runs hundreds)."""

    def lora_delta(x, a, b, scale, out_dtype, min_rows):  # one layer's lora_deltas
        return lora_deltas(x, a, [b], [scale], out_dtype, min_rows)[0]

    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, k, generator=g).to(dtype)
    a = (torch.randn(1, r, k, generator=g) * 0.05).to(dtype)
    b = (torch.randn(1, r, n, generator=g) * 0.05).to(dtype)
    scale = torch.tensor([2.0], dtype=dtype)
    ref = lora_delta(x[:1].view(1, 1, k), a, b, scale, dtype, MIN_ROWS)[0, 0]
    for groups, rows in ((1, 2), (1, 3), (1, 4), (1, 17), (1, 64), (4, 1), (8, 3), (16, 4), (2, 32)):
        xs = x[:groups * rows].view(groups, rows, k)
        got = lora_delta(xs, a.expand(groups, -1, -1), b.expand(groups, -1, -1), scale.expand(groups), dtype,
                         MIN_ROWS)
        assert got.shape == (groups, rows, n) and got.dtype == dtype
        assert torch.equal(got[0, 0], ref), (groups, rows)
    exact = (x[0].double() @ a[0].double().t() * 2.0) @ b[0].double()
    assert torch.allclose(ref.double(), exact, rtol=2e-2 if dtype == torch.bfloat16 else 1e-4, atol=1e-3)
