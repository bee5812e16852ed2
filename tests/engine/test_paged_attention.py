"""PagedAttention on its own: the (layers, Hkv, slots, D) cache layout (writes, copy-on-write),
decode buckets and prefill chunks against a naive per-row softmax reference, and a decode row's
bits independent of its bucket's other rows (fp32 and bf16)."""

from __future__ import annotations

import pytest
import torch

from shoal import kernels
from shoal.engine.paged_attention import (DecodeRows, PagedAttention, PagedKVCache, SeqAttention,
                                          build_decode_buckets)

D = 16
BLOCK = 8


def make_cache(hkv: int, dtype=torch.float32, blocks: int = 160, layers: int = 2) -> PagedKVCache:
    g = torch.Generator().manual_seed(hkv)
    c = PagedKVCache(layers, blocks, BLOCK, hkv, D, dtype)
    c.k.copy_(torch.randn(c.k.shape, generator=g))
    c.v.copy_(torch.randn(c.v.shape, generator=g))
    return c


def ctx_slots(lens: list[int], seed: int = 0) -> list[torch.Tensor]:
    """Disjoint slot lists over shuffled blocks, one per context length (position order)."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randperm(160, generator=g)
    out, b = [], 0
    for n in lens:
        nb = -(-n // BLOCK)
        out.append((blocks[b:b + nb, None] * BLOCK + torch.arange(BLOCK)).flatten()[:n])
        b += nb
    return out


def naive(cache: PagedKVCache, layer: int, q: torch.Tensor, slots: torch.Tensor,
          window: int | None) -> torch.Tensor:
    """q (T, H, D) at the last T positions of `slots` -> (T, H, D), fp64 softmax per query."""
    hkv = cache.k.shape[1]
    keys = cache.k[layer][:, slots].double()  # (Hkv, S, D)
    vals = cache.v[layer][:, slots].double()
    t, h, s, d = q.shape[0], q.shape[1], slots.numel(), q.shape[2]
    g = h // hkv
    out = torch.empty(t, h, d, dtype=torch.float64)
    for i in range(t):
        pos = s - t + i
        lo = 0 if window is None else max(0, pos + 1 - window)
        for head in range(h):
            kv = head // g
            sc = keys[kv, lo:pos + 1] @ q[i, head].double() / d ** 0.5  # (visible,)
            out[i, head] = sc.softmax(0) @ vals[kv, lo:pos + 1]
    return out


def decode_step(cache, layer, q, k, v, slots: list[torch.Tensor], window=None):
    """One step of decode rows only: row i's new token goes in the last of slots[i]."""
    hkv = cache.k.shape[1]
    buckets = build_decode_buckets(list(enumerate(slots)), window, "cpu")
    ctx = PagedAttention(cache, torch.stack([s[-1] for s in slots]), [], q.shape[1], hkv, buckets)
    return ctx.attend(layer, q, k, v)


def test_cache_layout_and_writes():
    c = make_cache(hkv=2)
    assert c.k.shape == (2, 2, 161 * BLOCK, D)  # 160 blocks for sequences + the scratch block
    assert c.num_blocks == 160 and c.scratch_slot == 160 * BLOCK
    n = 5
    q, k, v = torch.randn(n, 4, D), torch.randn(n, 2, D), torch.randn(n, 2, D)
    slots = torch.tensor([3, 17, 40, 41, 99])
    PagedAttention(c, slots, [SeqAttention(0, n, slots)], 4, 2).attend(1, q, k, v)
    assert torch.equal(c.k[1][:, slots], k.transpose(0, 1))
    assert torch.equal(c.v[1][:, slots], v.transpose(0, 1))


def test_copy_blocks_copies_whole_blocks_in_every_layer_and_head():
    c = make_cache(hkv=3)
    k0, v0 = c.k.clone(), c.v.clone()
    c.copy_blocks([(4, 9), (7, 2)])
    blk = lambda t, b: t[:, :, b * BLOCK:(b + 1) * BLOCK]  # noqa: E731
    for src, dst in [(4, 9), (7, 2)]:
        assert torch.equal(blk(c.k, dst), blk(k0, src)) and torch.equal(blk(c.v, dst), blk(v0, src))
    touched = torch.zeros(c.k.shape[2], dtype=torch.bool)
    touched[9 * BLOCK:10 * BLOCK] = touched[2 * BLOCK:3 * BLOCK] = True
    assert torch.equal(c.k[:, :, ~touched], k0[:, :, ~touched])
    assert torch.equal(c.v[:, :, ~touched], v0[:, :, ~touched])
    c.copy_blocks([])  # no-op


@pytest.mark.parametrize("hkv,group", [(1, 1), (2, 3), (3, 3), (1, 4)])
@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_decode_buckets_equal_naive_softmax(hkv, group, window, dtype, tol):
    """fp32: bmm + softmax in fp32; bf16: SDPA on the bf16 cache (bf16 output, so ~1e-2)."""
    lens = [1, 2, 20, 63, 64, 65, 100, 128, 129, 200]  # several buckets, edges included
    slots = ctx_slots(lens, seed=hkv * 10 + group)
    c = make_cache(hkv, dtype)
    g = torch.Generator().manual_seed(1)
    n, h = len(lens), hkv * group
    q, k, v = (torch.randn(n, h, D, generator=g).to(dtype), torch.randn(n, hkv, D, generator=g).to(dtype),
               torch.randn(n, hkv, D, generator=g).to(dtype))
    out = decode_step(c, 1, q, k, v, slots, window)
    assert out.dtype == dtype
    for i, s in enumerate(slots):
        ref = naive(c, 1, q[i:i + 1], s, window)[0]
        assert (out[i].double() - ref).abs().max().item() < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_row_bits_do_not_depend_on_its_bucket(dtype):
    """Batch invariance: a row alone in its bucket, first or last among many, same bits."""
    hkv, group = 3, 3
    lens = [5, 40, 64, 70, 100, 120, 127, 128, 190, 256, 33, 64]
    slots = ctx_slots(lens, seed=3)
    c = make_cache(hkv, dtype)
    g = torch.Generator().manual_seed(2)
    n = len(lens)
    q = torch.randn(n, hkv * group, D, generator=g).to(dtype)
    k, v = (torch.randn(n, hkv, D, generator=g).to(dtype) for _ in range(2))
    many = decode_step(c, 0, q, k, v, slots)
    rev = decode_step(c, 0, q.flip(0), k.flip(0), v.flip(0), slots[::-1]).flip(0)
    assert torch.equal(rev, many)
    for i, s in enumerate(slots):
        alone = decode_step(c, 0, q[i:i + 1], k[i:i + 1], v[i:i + 1], [s])
        assert torch.equal(alone[0], many[i])


@pytest.mark.parametrize("ctx_len,t,window", [(42, 12, None), (142, 82, None), (142, 82, 50), (64, 64, None),
                                             (65, 1, None), (200, 7, 30), (90, 90, 40)])
@pytest.mark.parametrize("gpu_style", [False, True])
def test_prefill_chunk_and_decode_rows_in_one_step_equal_naive(ctx_len, t, window, gpu_style):
    """A mixed step: a prefill chunk (positions ctx_len-t .. ctx_len-1, causal mask; chunks
    within one block and across several, aligned and not) beside decode rows. gpu_style: the
    CUDA layout, each chunk in one call (causal kernel for a first chunk without a window,
    folded groups under a mask otherwise) and all decode rows in one bucket."""
    hkv, group = 2, 2
    c = make_cache(hkv)
    pre, d1, d2 = ctx_slots([ctx_len, 70, 9], seed=5)
    g = torch.Generator().manual_seed(4)
    n, h = t + 2, hkv * group
    q, k, v = (torch.randn(n, h, D, generator=g), torch.randn(n, hkv, D, generator=g),
               torch.randn(n, hkv, D, generator=g))
    seqs = [SeqAttention(0, t, pre)]
    buckets = build_decode_buckets([(t, d1), (t + 1, d2)], window, "cpu", single=gpu_style)
    assert len(buckets) == (1 if gpu_style else 2)
    mapping = torch.cat([pre[-t:], d1[-1:], d2[-1:]])
    ctx = PagedAttention(c, mapping, seqs, h, hkv, buckets, window)
    ctx.whole_chunks = gpu_style
    for layer in (0, 1):  # the second layer reuses the step's masks
        out = ctx.attend(layer, q, k, v)
        assert (out[:t].double() - naive(c, layer, q[:t], pre, window)).abs().max().item() < 1e-5
        assert (out[t].double() - naive(c, layer, q[t:t + 1], d1, window)[0]).abs().max().item() < 1e-5
        assert (out[t + 1].double() - naive(c, layer, q[t + 1:], d2, window)[0]).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompt_row_bits_do_not_depend_on_chunking(dtype):
    """Batch invariance across chunked prefill: a prompt position's attention output has the
    same bits whether its prompt was computed in one chunk or split anywhere."""
    hkv, group, length = 3, 3, 300
    c = make_cache(hkv, dtype)
    slots = ctx_slots([length], seed=6)[0]
    g = torch.Generator().manual_seed(7)
    q = torch.randn(length, hkv * group, D, generator=g).to(dtype)
    k, v = (torch.randn(length, hkv, D, generator=g).to(dtype) for _ in range(2))

    def run(cuts: list[int]) -> torch.Tensor:
        outs = []
        for a, b in zip(cuts, cuts[1:]):  # one step per chunk, keys written as they come
            ctx = PagedAttention(c, slots[a:b], [SeqAttention(0, b - a, slots[:b])], hkv * group, hkv)
            outs.append(ctx.attend(0, q[a:b], k[a:b], v[a:b]))
        return torch.cat(outs)

    whole = run([0, length])
    for cuts in ([0, 100, length], [0, 1, 2, 64, 65, 200, 299, length], [0, 128, 256, length]):
        assert torch.equal(run(cuts), whole), cuts


@pytest.mark.parametrize("window", [None, 50])
def test_bf16_head_size_64_prefill_takes_the_kernel(window, monkeypatch):
    """bf16 with head size 64 (the default model's): every prefill chunk of a step goes to
    `kernels.prefill_attention` in one call a layer, beside decode rows; it matches the fp64
    softmax and the SDPA path (kernels off) to bf16 rounding, and a prompt row's bits do not
    depend on the chunking."""
    q0 = torch.zeros(1, 1, 64, dtype=torch.bfloat16)
    if not (kernels.usable(q0) and kernels.prefill_attention_ready(q0, q0)):
        pytest.skip("no prefill attention kernel on this CPU")
    hkv, group, d = 3, 3, 64
    c = PagedKVCache(2, 160, BLOCK, hkv, d, torch.bfloat16)
    g = torch.Generator().manual_seed(11)
    c.k.copy_(torch.randn(c.k.shape, generator=g))
    c.v.copy_(torch.randn(c.v.shape, generator=g))
    a, b, dec = ctx_slots([150, 37, 20], seed=8)
    n, h = 60 + 37 + 1, hkv * group
    q, k, v = (torch.randn(n, nh, d, generator=g).to(torch.bfloat16) for nh in (h, hkv, hkv))
    calls = []
    real = kernels.prefill_attention
    monkeypatch.setattr(kernels, "prefill_attention", lambda *args, **kw: calls.append(1) or real(*args, **kw))

    def step():  # a later chunk of a 150-token prompt, a whole 37-token prompt, a decode row
        seqs = [SeqAttention(0, 60, a), SeqAttention(60, 37, b)]
        buckets = build_decode_buckets([(97, dec)], window, "cpu")
        ctx = PagedAttention(c, torch.cat([a[-60:], b, dec[-1:]]), seqs, h, hkv, buckets, window)
        return ctx.attend(1, q, k, v)

    out = step()
    assert len(calls) == 1
    tol = dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out[:60].double(), naive(c, 1, q[:60], a, window), **tol)
    torch.testing.assert_close(out[60:97].double(), naive(c, 1, q[60:97], b, window), **tol)
    torch.testing.assert_close(out[97:].double(), naive(c, 1, q[97:], dec, window), **tol)
    with kernels.disabled():
        sdpa = step()
    assert len(calls) == 1
    torch.testing.assert_close(out.double(), sdpa.double(), **tol)
    # the 37-token prompt in chunks of 5, 1 and 31 rows: the same bits
    pieces, at = [], 0
    for m in (5, 1, 31):
        ctx = PagedAttention(c, b[at:at + m], [SeqAttention(0, m, b[:at + m])], h, hkv, window=window)
        pieces.append(ctx.attend(1, q[60 + at:60 + at + m], k[60 + at:60 + at + m], v[60 + at:60 + at + m]))
        at += m
    assert torch.equal(torch.cat(pieces), out[60:97])


def test_decode_rows_from_block_tables_match_per_row_slots():
    """`DecodeRows.from_tables` (all rows' slots in a few tensor ops) gives each row's slots in
    position order and the offsets between rows: lengths of one token, a whole number of blocks,
    a block and one, and tables longer than their context."""
    g = torch.Generator().manual_seed(5)
    lengths = [1, BLOCK, BLOCK + 1, 3 * BLOCK - 2, 5, 4 * BLOCK]
    tables = [torch.randperm(160, generator=g)[:-(-n // BLOCK) + (i % 2)].tolist() for i, n in enumerate(lengths)]
    rows = list(range(len(lengths)))
    got = DecodeRows.from_tables(rows, tables, lengths, BLOCK)
    per_row = [[t[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)] for t, n in zip(tables, lengths)]
    assert got.rows.tolist() == rows
    assert got.slots.tolist() == [s for row in per_row for s in row]
    assert got.offsets.tolist() == [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    assert got.slots.dtype == got.offsets.dtype == got.rows.dtype == torch.int64
    assert got.last.tolist() == [row[-1] for row in per_row]
    empty = DecodeRows.from_tables([], [], [], BLOCK)
    assert empty.slots.numel() == 0 and empty.offsets.tolist() == [0]
    if kernels.library() is None:
        return
    # the kernel (`kernels.table_slots`, with the cache's size): the same slots, offsets and last
    # slots, checked against the cache
    fast = DecodeRows.from_tables(rows, tables, lengths, BLOCK, 160 * BLOCK)
    for name in ("rows", "slots", "offsets", "last"):
        assert torch.equal(getattr(fast, name), getattr(got, name)), name
    assert fast.checked == 160 * BLOCK and got.checked == 0
    top = max(t[j] for t, n in zip(tables, lengths) for j in range(-(-n // BLOCK)))  # the last block read
    DecodeRows.from_tables(rows, tables, lengths, BLOCK, (top + 1) * BLOCK)
    with pytest.raises(ValueError, match="outside the cache's"):  # that block past the cache
        DecodeRows.from_tables(rows, tables, lengths, BLOCK, top * BLOCK)
    with pytest.raises(ValueError, match="longer than its block table"):
        DecodeRows.from_tables(rows[:1], [tables[2][:1]], [BLOCK + 1], BLOCK, 160 * BLOCK)
    with pytest.raises(ValueError, match="< 1"):
        DecodeRows.from_tables(rows[:1], [tables[0]], [0], BLOCK, 160 * BLOCK)
