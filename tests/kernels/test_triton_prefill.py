"""`kernels.triton_prefill` under Triton's interpreter (CPU): a packed batch of mixed chunks against a float64
reference (GQA, head dims, windows, dtypes, tile sizes), rows of no chunk untouched, a strided q, garbage outside
the chunks' contexts ignored, the tiling, argument checks; and on CUDA, bf16 against SDPA per chunk.

The interpreter's tl.dot multiplies bf16's raw bits, so under it the kernel multiplies bf16 in fp32 (see the
module docstring); fp16 runs the 16-bit dot as compiled."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.triton_interp import interpreted

kern = interpreted("shoal.kernels.triton_prefill")

BS = 16  # cache block size
SENTINEL = 7.0  # what `out` holds before a call
# (q_len, ctx_len): a whole prompt over a tile boundary, a chunk after a cached prefix, one token, one exact
# tile, a chunk starting at a block boundary, a short prompt
CHUNKS = [(70, 70), (20, 150), (1, 37), (64, 64), (33, 97), (17, 17)]


class Batch:
    """Chunks packed into q (N, H, D) with a spare row after each, their keys at shuffled cache blocks; slots
    outside every context (and block-table entries past one) hold NaN / 1e30 unless `clean`."""

    def __init__(self, chunks, hkv, g, d, dtype, seed=0, clean=False):
        gen = torch.Generator().manual_seed(seed)
        self.chunks, self.g, self.d = chunks, g, d
        n_blocks = [math.ceil(ctx / BS) for _, ctx in chunks]
        total = sum(n_blocks) + 2  # the last two blocks are never a context's
        perm = torch.randperm(total, generator=gen)
        self.tables = torch.full((len(chunks), max(n_blocks) + 1), int(perm[-1]), dtype=torch.int32)
        used = torch.zeros(total * BS, dtype=torch.bool)
        taken = 0
        for i, nb in enumerate(n_blocks):
            self.tables[i, :nb] = perm[taken:taken + nb]
            taken += nb
            pos = torch.arange(chunks[i][1])
            used[self.tables[i, pos // BS].long() * BS + pos % BS] = True
        self.k = torch.randn(hkv, total * BS, d, generator=gen)
        self.v = torch.randn(hkv, total * BS, d, generator=gen)
        if not clean:
            self.k[:, ~used], self.v[:, ~used] = float("nan"), 1e30
        self.k, self.v = self.k.to(dtype), self.v.to(dtype)
        self.starts = []
        row = 1
        for q_len, _ in chunks:
            self.starts.append(row)
            row += q_len + 1
        self.q = torch.randn(row, hkv * g, d, generator=gen).to(dtype)
        self.q_lens = [q_len for q_len, _ in chunks]
        self.ctx_lens = [ctx for _, ctx in chunks]

    def run(self, kern, window, q=None, block_m=64, tables_dtype=torch.int32):
        q = self.q if q is None else q
        out = torch.full(self.q.shape, SENTINEL, dtype=self.q.dtype)
        idx = lambda xs: torch.tensor(xs, dtype=torch.int64)  # noqa: E731
        kern.paged_prefill_attention(q, self.k, self.v, self.tables.to(tables_dtype), idx(self.starts),
                                     idx(self.q_lens), torch.tensor(self.ctx_lens, dtype=torch.int32),
                                     kern.prefill_tiles(self.q_lens, block_m), BS, window, out, block_m=block_m)
        return out

    def chunk_rows(self) -> torch.Tensor:
        mask = torch.zeros(self.q.shape[0], dtype=torch.bool)
        for s, n in zip(self.starts, self.q_lens):
            mask[s:s + n] = True
        return mask

    def reference(self, window) -> torch.Tensor:
        """float64 (N, H, D): per chunk, its keys gathered by position, masked softmax; zeros elsewhere."""
        out = torch.zeros(self.q.shape, dtype=torch.float64)
        for i, (s, (q_len, ctx)) in enumerate(zip(self.starts, self.chunks)):
            pos = torch.arange(ctx)
            slots = self.tables[i, pos // BS].long() * BS + pos % BS
            k = self.k[:, slots].double().repeat_interleave(self.g, 0)  # (H, ctx, D)
            v = self.v[:, slots].double().repeat_interleave(self.g, 0)
            qc = self.q[s:s + q_len].double().transpose(0, 1)  # (H, q_len, D)
            q_pos = torch.arange(ctx - q_len, ctx)[:, None]
            allowed = pos[None, :] <= q_pos
            if window is not None:
                allowed &= pos[None, :] > q_pos - window
            scores = (qc @ k.transpose(1, 2) * self.d ** -0.5).masked_fill(~allowed, float("-inf"))
            out[s:s + q_len] = (torch.softmax(scores, -1) @ v).transpose(0, 1)
        return out


TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype,hkv,g,d,window,block_m", [
    (torch.float32, 2, 1, 64, None, 64),
    (torch.float32, 1, 3, 64, 40, 64),
    (torch.float32, 2, 4, 128, 40, 64),
    (torch.float32, 1, 1, 80, None, 16),  # a head dim that is no power of 2, small tiles
    (torch.bfloat16, 1, 4, 64, None, 64),
    (torch.bfloat16, 2, 1, 64, 40, 16),
    (torch.float16, 1, 3, 64, 40, 64),
    (torch.float16, 1, 7, 64, None, 32),
])
def test_matches_reference(kern, dtype, hkv, g, d, window, block_m):
    b = Batch(CHUNKS, hkv, g, d, dtype)
    out = b.run(kern, window, block_m=block_m)
    rows = b.chunk_rows()
    tol = TOL[dtype]
    torch.testing.assert_close(out[rows].double(), b.reference(window)[rows], atol=tol, rtol=tol)
    assert (out[~rows] == SENTINEL).all()


def test_rows_of_no_chunk_untouched(kern):
    b = Batch([(5, 20), (0, 9), (18, 18)], 1, 2, 64, torch.float32)  # an empty chunk has no rows, no tiles
    out = b.run(kern, None, tables_dtype=torch.int64)
    rows = b.chunk_rows()
    assert rows.sum() == 23 and not rows[0] and not rows[-1]
    assert (out[~rows] == SENTINEL).all() and not (out[rows] == SENTINEL).any()
    empty = torch.zeros(0, 2, dtype=torch.int32)  # no tiles: no launch
    out = torch.full(b.q.shape, SENTINEL)
    i64 = torch.zeros(3, dtype=torch.int64)
    kern.paged_prefill_attention(b.q, b.k, b.v, b.tables, i64, i64, i64, empty, BS, None, out)
    assert (out == SENTINEL).all()


def test_strided_q_equals_contiguous(kern):
    b = Batch(CHUNKS[:3], 2, 3, 64, torch.float16, seed=1)
    n, h, d = b.q.shape
    proj = torch.randn(n, h + 4, d).to(torch.float16)  # (N, H + 2 Hkv, D): q, then k and v
    proj[:, :h] = b.q
    q_view = proj[:, :h]
    assert not q_view.is_contiguous()
    assert torch.equal(b.run(kern, 40, q=q_view), b.run(kern, 40))


def test_garbage_outside_context_ignored(kern):
    dirty = Batch(CHUNKS, 1, 2, 64, torch.float32, seed=2)
    clean = Batch(CHUNKS, 1, 2, 64, torch.float32, seed=2, clean=True)
    assert dirty.k.isnan().any() and (dirty.v == 1e30).any()
    for window in (None, 40):
        out = dirty.run(kern, window)
        assert torch.isfinite(out).all()
        assert torch.equal(out, clean.run(kern, window))


@pytest.mark.parametrize("block_m", [16, 64])
def test_prefill_tiles_cover_each_row_once(kern, block_m):
    q_lens = [0, 1, 15, 16, 17, 63, 64, 65, 200]
    tiles = kern.prefill_tiles(q_lens, block_m)
    assert tiles.dtype == torch.int32 and tiles.device.type == "cpu" and tiles.shape[1] == 2
    seen = [torch.zeros(n, dtype=torch.int64) for n in q_lens]
    for chunk, m0 in tiles.tolist():
        assert m0 % block_m == 0 and m0 < q_lens[chunk]
        seen[chunk][m0:m0 + block_m] += 1
    assert all((s == 1).all() for s in seen)
    assert kern.prefill_tiles([]).shape == (0, 2)


def _args():
    b = Batch([(4, 10), (3, 3)], 1, 2, 64, torch.float32, clean=True)
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    return dict(q=b.q, k_cache=b.k, v_cache=b.v, block_tables=b.tables, q_starts=i32(b.starts),
                q_lens=i32(b.q_lens), ctx_lens=i32(b.ctx_lens), tiles=torch.zeros(2, 2, dtype=torch.int32),
                block_size=BS, window=None, out=torch.empty_like(b.q))


BAD = [
    ("q", lambda a: a["q"][0]),
    ("q", lambda a: a["q"].int()),
    ("q", lambda a: a["q"].transpose(1, 2).contiguous().transpose(1, 2)),
    ("k_cache", lambda a: a["k_cache"].double()),
    ("k_cache", lambda a: torch.cat([a["k_cache"]] * 2, -1)[..., :64]),  # slots strided
    ("k_cache", lambda a: a["k_cache"].expand(3, -1, -1).contiguous()),  # 3 kv heads, 2 q heads
    ("k_cache", lambda a: a["k_cache"][..., :32].contiguous()),
    ("v_cache", lambda a: a["v_cache"][:, :16].contiguous()),
    ("block_tables", lambda a: a["block_tables"].float()),
    ("block_tables", lambda a: a["block_tables"][:1]),
    ("block_tables", lambda a: a["block_tables"].t()),
    ("q_starts", lambda a: a["q_starts"].to("meta")),
    ("q_lens", lambda a: a["q_lens"][:1]),
    ("ctx_lens", lambda a: a["ctx_lens"].float()),
    ("tiles", lambda a: a["tiles"].long()),
    ("tiles", lambda a: a["tiles"][:, :1]),
    ("block_size", lambda a: 0),
    ("window", lambda a: 0),
    ("out", lambda a: a["out"][1:]),
    ("out", lambda a: a["out"].half()),
]


@pytest.mark.parametrize("name,bad", BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD)])
def test_bad_arguments_raise(kern, name, bad):
    args = _args()
    args[name] = bad(args)
    with pytest.raises(ValueError, match=rf"^paged_prefill_attention: {name} "):
        kern.paged_prefill_attention(**args)


def test_bad_tile_sizes_raise(kern):
    for name in ("block_m", "block_n"):
        with pytest.raises(ValueError, match=rf"^paged_prefill_attention: {name} "):
            kern.paged_prefill_attention(**_args(), **{name: 24})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_matches_sdpa():
    pytest.importorskip("triton")
    from shoal.kernels import triton_prefill as tp

    gen = torch.Generator().manual_seed(0)
    hkv, g, d, dev = 3, 3, 64, torch.device("cuda")  # SmolLM2's attention shape
    lens = torch.randint(64, 513, (64,), generator=gen).tolist()  # whole prompts from position 0
    n_blocks = [math.ceil(n / BS) for n in lens]
    perm = torch.randperm(sum(n_blocks), generator=gen)
    tables = torch.zeros(len(lens), max(n_blocks), dtype=torch.int32)
    starts = [0]
    for i, nb in enumerate(n_blocks):
        tables[i, :nb] = perm[sum(n_blocks[:i]):sum(n_blocks[:i + 1])]
        starts.append(starts[-1] + lens[i])
    k = torch.randn(hkv, sum(n_blocks) * BS, d, generator=gen).to(dev, torch.bfloat16)
    v = torch.randn(hkv, sum(n_blocks) * BS, d, generator=gen).to(dev, torch.bfloat16)
    q = torch.randn(starts[-1], hkv * g, d, generator=gen).to(dev, torch.bfloat16)
    out = torch.empty_like(q)
    lens_t = torch.tensor(lens, device=dev)
    tables = tables.to(dev)
    tp.paged_prefill_attention(q, k, v, tables, torch.tensor(starts[:-1], device=dev), lens_t, lens_t,
                               tp.prefill_tiles(lens).to(dev), BS, None, out)
    for i, n in enumerate(lens):
        pos = torch.arange(n, device=dev)
        slots = tables[i, pos // BS].long() * BS + pos % BS
        kc = k[:, slots].repeat_interleave(g, 0)[None]  # (1, H, n, D)
        vc = v[:, slots].repeat_interleave(g, 0)[None]
        qc = q[starts[i]:starts[i + 1]].transpose(0, 1)[None]
        ref = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True)[0].transpose(0, 1)
        torch.testing.assert_close(out[starts[i]:starts[i + 1]], ref, atol=2e-2, rtol=2e-2)
