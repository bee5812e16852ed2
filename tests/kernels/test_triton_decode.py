"""`kernels.triton_decode.paged_decode_attention` under Triton's interpreter (CPU) against a float64
reference that gathers each row's keys by position through its block table; strided q, stale cache
data, argument checks; and on a CUDA device the compiled kernel, in and out of a CUDA graph."""

from __future__ import annotations

import importlib

import pytest
import torch

from tests.kernels.triton_interp import interpreted

kern = interpreted("shoal.kernels.triton_decode")

TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# lengths from 1 to 100: block boundaries (16, 32, 64), one past them, a full 64-key tile and a bit
LENGTHS = [1, 16, 17, 33, 64, 100, 7, 48]


class Case:
    """A paged cache (Hkv, num_slots, D) with each row's blocks at shuffled ids, and a batch of q."""

    def __init__(self, lengths, heads, kv_heads, d, dtype, block_size=16, seed=0, device="cpu"):
        gen = torch.Generator().manual_seed(seed)
        batch = len(lengths)
        self.block_size = block_size
        self.max_blocks = -(-max(lengths) // block_size) + 1  # one spare entry a row
        num_blocks = batch * self.max_blocks + 3
        ids = torch.randperm(num_blocks, generator=gen)[:batch * self.max_blocks]
        num_slots = num_blocks * block_size

        def rand(*shape):
            return torch.randn(*shape, generator=gen).to(dtype).to(device)

        self.q = rand(batch, heads, d)
        self.k_cache, self.v_cache = rand(kv_heads, num_slots, d), rand(kv_heads, num_slots, d)
        self.tables = ids.view(batch, self.max_blocks).to(device)
        self.lengths = torch.tensor(lengths, device=device)
        self.out = torch.empty_like(self.q)

    def run(self, mod, window=None, q=None):
        mod.paged_decode_attention(self.q if q is None else q, self.k_cache, self.v_cache, self.tables, self.lengths,
                                   self.block_size, window, self.out)
        return self.out.clone()

    def reference(self, window=None):
        return reference(self.q, self.k_cache, self.v_cache, self.tables, self.lengths, self.block_size, window)


def reference(q, k_cache, v_cache, tables, lengths, block_size, window):
    """(B, H, D) float64: softmax(q k^T / sqrt(D)) v over each row's positions [max(0, L - window), L)."""
    batch, heads, d = q.shape
    kv_heads = k_cache.shape[0]
    lengths = lengths.long()
    pos = torch.arange(tables.shape[1] * block_size, device=q.device)  # (P,)
    first = (lengths - window).clamp(min=0) if window else torch.zeros_like(lengths)
    allowed = (pos[None] < lengths[:, None]) & (pos[None] >= first[:, None])  # (B, P)
    slots = tables.long()[:, pos // block_size] * block_size + pos % block_size  # (B, P)
    slots = slots.where(allowed, 0)
    keep = allowed[None, :, :, None]  # stale keys out of the sums, not multiplied by 0 (NaN * 0 = NaN)
    k = k_cache[:, slots].double().where(keep, 0.0)  # (Hkv, B, P, D)
    v = v_cache[:, slots].double().where(keep, 0.0)
    qg = q.double().view(batch, kv_heads, heads // kv_heads, d)  # (B, Hkv, g, D)
    scores = torch.einsum("bjgd,jbpd->bjgp", qg, k) * d ** -0.5
    probs = scores.masked_fill(~allowed[:, None, None, :], float("-inf")).softmax(-1)
    return torch.einsum("bjgp,jbpd->bjgd", probs, v).reshape(batch, heads, d)


def assert_close(out, ref, dtype):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), ref.to(out.device), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_matches_reference(kern, group, d, dtype):
    """Shuffled block tables, lengths 1..100 (block boundaries too), no window and a window of 24 (shorter
    than most rows: tiles start mid-block). bf16: the interpreter upcasts its dot operands (see the module)."""
    kv_heads = 2
    case = Case(LENGTHS, kv_heads * group, kv_heads, d, dtype, seed=group * 1000 + d)
    for window in (None, 24):
        assert_close(case.run(kern, window), case.reference(window), dtype)


@pytest.mark.parametrize("block_size", [8, 128])
def test_odd_head_dim_block_size_and_int32_indices(kern, block_size):
    """D = 80 (padded to 128 with masks), g = 7 (Qwen2.5-0.5B), blocks smaller and larger than a tile,
    int32 tables and lengths; a window longer than every row is no window."""
    case = Case([1, 80, 129, 64, 65], 14, 2, 80, torch.float32, block_size=block_size, seed=block_size)
    case.tables, case.lengths = case.tables.int(), case.lengths.int()
    assert_close(case.run(kern), case.reference(), torch.float32)
    assert_close(case.run(kern, 40), case.reference(40), torch.float32)
    assert torch.equal(case.run(kern, 1000), case.run(kern))


def test_strided_q(kern):
    """q as a slice of a fused (B, H + 2 * Hkv, D) projection output, and as a (H, B, D) transpose,
    gives the bits of a contiguous copy."""
    heads, kv_heads, d = 9, 3, 64
    case = Case(LENGTHS[:5], heads, kv_heads, d, torch.float32, seed=7)
    fused = torch.randn(len(case.lengths), heads + 2 * kv_heads, d)
    q_view = fused[:, :heads]
    q_trans = case.q.transpose(0, 1).contiguous().transpose(0, 1)
    assert q_view.stride(0) == (heads + 2 * kv_heads) * d and q_trans.stride(1) == len(case.lengths) * d
    assert torch.equal(case.run(kern, q=q_view), case.run(kern, q=q_view.contiguous()))
    assert torch.equal(case.run(kern, q=q_trans), case.run(kern))


@pytest.mark.parametrize("window", [None, 20])
def test_stale_data_ignored(kern, window):
    """Every slot no row may read (past a row's length in its last block, before its window, other
    rows' spare blocks, never-used blocks) holds NaN or 1e30, and unused table entries are -1: the same bits."""
    case = Case(LENGTHS, 8, 2, 64, torch.float32, seed=11)
    clean = case.run(kern, window)
    bs = case.block_size
    read = torch.zeros(case.k_cache.shape[1], dtype=torch.bool)
    for row, length in enumerate(LENGTHS):
        pos = torch.arange(max(0, length - window) if window else 0, length)
        read[case.tables[row, pos // bs] * bs + pos % bs] = True
        case.tables[row, -(-length // bs):] = -1
    stale = torch.full_like(case.k_cache, float("nan"))
    stale[:, 1::2] = 1e30
    case.k_cache[:, ~read] = stale[:, ~read]
    case.v_cache[:, ~read] = stale[:, ~read].flip(1)
    assert torch.isfinite(case.run(kern, window)).all()
    assert torch.equal(case.run(kern, window), clean)


def test_bad_arguments(kern):
    case = Case([5, 9], 4, 2, 64, torch.float32)
    good = dict(q=case.q, k_cache=case.k_cache, v_cache=case.v_cache, block_tables=case.tables,
                lengths=case.lengths, block_size=16, window=None, out=case.out)
    bad = [
        ("q", case.q.double()), ("q", case.q[..., ::2]), ("q", case.q[0]), ("q", case.q[:, :3]),
        ("k_cache", case.k_cache.half()), ("k_cache", case.k_cache[..., :32]),
        ("k_cache", case.k_cache.transpose(0, 1).contiguous().transpose(0, 1)),
        ("v_cache", case.v_cache[:, :10]),
        ("block_tables", case.tables.float()), ("block_tables", case.tables[:1]), ("block_tables", case.tables[0]),
        ("lengths", case.lengths.float()), ("lengths", case.lengths[:1]),
        ("out", case.out.half()), ("out", case.out[:1]),
        ("block_size", 0), ("block_size", 16.0), ("window", 0), ("window", 2.5),
    ]
    for name, value in bad:
        with pytest.raises(ValueError, match=name):
            kern.paged_decode_attention(**{**good, name: value})
    kern.paged_decode_attention(**good)  # the good arguments do run


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (32, 8)])  # SmolLM2-135M, Llama-3.2-1B
def test_cuda_bf16_and_graph_replay(heads, kv_heads):
    """The compiled kernel in bf16 at B = 256, D = 64; then one call captured in a CUDA graph,
    replayed with new q, lengths and tables copied into the same tensors."""
    pytest.importorskip("triton")
    mod = importlib.import_module("shoal.kernels.triton_decode")
    if mod._INTERPRETING:
        pytest.skip("TRITON_INTERPRET is set: no compiled kernels")
    gen = torch.Generator().manual_seed(heads)

    def random_lengths():
        return torch.randint(1, 400, (256,), generator=gen).tolist()

    lengths = random_lengths()
    lengths[:4] = [1, 16, 64, 399]
    case = Case(lengths, heads, kv_heads, 64, torch.bfloat16, seed=heads, device="cuda")
    for window in (None, 100):
        assert_close(case.run(mod, window), case.reference(window), torch.bfloat16)

    # capture (after a warm-up launch on a side stream that compiles the kernel)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        case.run(mod)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mod.paged_decode_attention(case.q, case.k_cache, case.v_cache, case.tables, case.lengths,
                                   case.block_size, None, case.out)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(case.out, case.reference(), torch.bfloat16)

    # new values in the same tensors: other lengths, other block ids, other queries
    fresh = Case(random_lengths(), heads, kv_heads, 64, torch.bfloat16, seed=heads + 1, device="cuda")
    num_blocks = case.k_cache.shape[1] // case.block_size
    case.lengths.copy_(fresh.lengths.clamp(max=(case.max_blocks - 1) * case.block_size))
    case.tables.copy_(torch.randperm(num_blocks, generator=gen)[:case.tables.numel()].view_as(case.tables))
    case.q.copy_(fresh.q)
    case.out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(case.out, case.reference(), torch.bfloat16)
