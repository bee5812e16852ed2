"""Paged prefill attention in Triton: every prompt chunk of a step in one launch per layer.

A step packs the query rows of C chunks into q (N, H, D). Chunk i owns rows
q[q_starts[i] : q_starts[i] + q_lens[i]], which are positions ctx_lens[i] - q_lens[i] ... ctx_lens[i] - 1 of its
sequence (a chunk may start mid-sequence: the earlier positions are already in the cache). Its keys and values,
its own rows' included, are read in place from the paged cache k_cache / v_cache (Hkv, num_slots, D): position p
lives at slot block_tables[i, p // block_size] * block_size + p % block_size.

Query row at position p, head h attends to the keys of kv head h // (H / Hkv) at positions k with k <= p (causal)
and, given a window, k > p - window: out = softmax(q.k^T * D**-0.5) v, accumulated in fp32, stored in q's dtype
(bf16, fp16 or fp32). Rows of `out` that belong to no chunk are left untouched.

Design (flash-attention 2): `prefill_tiles` cuts each chunk into tiles of BLOCK_M query rows; the grid is
(tiles, H), one program per tile and query head. A program walks the keys in tiles of BLOCK_N positions with an
online softmax, q.k^T and p.v on tl.dot: first the key tiles that precede every row of its tile (no causal mask),
then the one or two that straddle the diagonal (masked), and stops at its last row's position. Keys are gathered
slot by slot through the block table, so a key tile may span cache blocks.

Under Triton's interpreter (TRITON_INTERPRET=1, read at import) the kernel loops with `while` (the interpreter's
`range` cannot take tensor bounds with numpy >= 2.4) and multiplies bf16 in fp32 (its tl.dot multiplies bf16's
raw bits); compiled, it uses `range` loops (software-pipelined) and bf16 tensor-core dots.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

PREFILL_BLOCK_M = 64  # query rows a program covers
PREFILL_BLOCK_N = 64  # key positions an inner step covers
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
_INTS = (torch.int32, torch.int64)
_LOG2E = 1.4426950408889634
# tl.max / tl.sum / tl.zeros are @jit helpers, left compiled-only when triton was imported before the interpreter
# was switched on (the test fixture reloads this module, not triton): use the builtins tl.reduce and tl.full with
# the combine functions the interpreter maps to numpy; compiled, this is what tl.max / tl.sum emit.
_MAX = tl.standard._elementwise_max
_SUM = tl.standard._sum_combine


def prefill_tiles(q_lens: list[int], block_m: int = PREFILL_BLOCK_M) -> torch.Tensor:
    """(T, 2) int32 on the CPU: for each query tile, (chunk index, first query offset within the chunk).

    Each chunk's rows are cut into ceil(q_len / block_m) tiles; tiles further into their chunk (more keys) come
    first, so the longest programs start first."""
    if block_m < 1:
        raise ValueError(f"prefill_tiles: block_m must be positive, got {block_m}")
    if any(n < 0 for n in q_lens):
        raise ValueError("prefill_tiles: q_lens must be >= 0")
    tiles = [(i, m0) for i, n in enumerate(q_lens) for m0 in range(0, n, block_m)]
    tiles.sort(key=lambda t: (-t[1], t[0]))
    return torch.tensor(tiles, dtype=torch.int32).reshape(-1, 2)


@triton.jit
def _attend(acc, l_i, m_i, q, k_head, v_head, bt_row, n0, q_pos, key_hi, window, stride_ks, qk_scale,
            BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
            CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile [n0, n0 + BLOCK_N) folded into the running (acc, l_i, m_i) of a query tile."""
    key_pos = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,) positions
    offs_d = tl.arange(0, D_PAD)
    key_ok = key_pos < key_hi  # keys past the tile's last row are neither read nor used
    block = tl.load(bt_row + key_pos // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
    slot = block * BLOCK_SIZE + key_pos % BLOCK_SIZE  # (BLOCK_N,) cache slots
    kv_off = slot[:, None] * stride_ks + offs_d[None, :]
    kv_mask = key_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(k_head + kv_off, mask=kv_mask, other=0.0)  # (BLOCK_N, D_PAD)
    v = tl.load(v_head + kv_off, mask=kv_mask, other=0.0)
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
    if CAUSAL:
        qk = tl.where(key_pos[None, :] <= q_pos[:, None], qk, float("-inf"))
    if HAS_WINDOW:
        qk = tl.where(key_pos[None, :] > q_pos[:, None] - window, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.reduce(qk, 1, _MAX))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet keeps p = 0, not NaN
    p = tl.math.exp2(qk - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _paged_prefill_kernel(q_ptr, k_ptr, v_ptr, out_ptr, bt_ptr, q_starts_ptr, q_lens_ptr, ctx_lens_ptr, tiles_ptr,
                          stride_qn, stride_qh, stride_on, stride_oh, stride_kh, stride_ks, stride_bt,
                          window, qk_scale,
                          GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                          HAS_WINDOW: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
                          WHILE_LOOPS: tl.constexpr):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    chunk = tl.load(tiles_ptr + tile * 2)
    m0 = tl.load(tiles_ptr + tile * 2 + 1)  # first row of the tile within its chunk
    q_start = tl.load(q_starts_ptr + chunk).to(tl.int64)
    q_len = tl.load(q_lens_ptr + chunk).to(tl.int32)
    ctx_len = tl.load(ctx_lens_ptr + chunk).to(tl.int32)

    # the tile's query rows (BLOCK_M, D_PAD), their positions in the sequence
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < q_len
    rows = q_start + offs_m
    q_pos = ctx_len - q_len + offs_m
    q_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + rows[:, None] * stride_qn + head * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    kv_head = (head // GROUP).to(tl.int64)
    k_head = k_ptr + kv_head * stride_kh
    v_head = v_ptr + kv_head * stride_kh
    bt_row = bt_ptr + chunk.to(tl.int64) * stride_bt

    # keys [lo, mid) precede every row of the tile; [mid, key_hi) straddle the diagonal
    first_pos = ctx_len - q_len + m0
    key_hi = ctx_len - q_len + tl.minimum(m0 + BLOCK_M, q_len)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(first_pos - window + 1, 0) // BLOCK_N * BLOCK_N
    mid = lo + (first_pos + 1 - lo) // BLOCK_N * BLOCK_N

    acc = tl.full([BLOCK_M, D_PAD], 0.0, tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    if WHILE_LOOPS:
        n0 = lo
        while n0 < mid:
            acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_head, v_head, bt_row, n0, q_pos, key_hi, window,
                                    stride_ks, qk_scale, BLOCK_N, BLOCK_SIZE, HEAD_DIM, D_PAD,
                                    False, HAS_WINDOW, DOT_FP32, PRECISION)
            n0 += BLOCK_N
        while n0 < key_hi:
            acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_head, v_head, bt_row, n0, q_pos, key_hi, window,
                                    stride_ks, qk_scale, BLOCK_N, BLOCK_SIZE, HEAD_DIM, D_PAD,
                                    True, HAS_WINDOW, DOT_FP32, PRECISION)
            n0 += BLOCK_N
    else:
        for n0 in range(lo, mid, BLOCK_N):
            acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_head, v_head, bt_row, n0, q_pos, key_hi, window,
                                    stride_ks, qk_scale, BLOCK_N, BLOCK_SIZE, HEAD_DIM, D_PAD,
                                    False, HAS_WINDOW, DOT_FP32, PRECISION)
        for n0 in range(mid, key_hi, BLOCK_N):
            acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_head, v_head, bt_row, n0, q_pos, key_hi, window,
                                    stride_ks, qk_scale, BLOCK_N, BLOCK_SIZE, HEAD_DIM, D_PAD,
                                    True, HAS_WINDOW, DOT_FP32, PRECISION)

    # every valid row saw at least its own key (l_i > 0); rows past the chunk are not stored
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out_ptrs = out_ptr + rows[:, None] * stride_on + head * stride_oh + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def _check(ok: bool, name: str, what: str) -> None:
    if not ok:
        raise ValueError(f"paged_prefill_attention: {name} {what}")


def _check_index(t, name: str, ndim: int, device: torch.device) -> None:
    _check(isinstance(t, torch.Tensor) and t.dim() == ndim, name, f"must be a {ndim}-d tensor")
    _check(t.dtype in _INTS, name, f"must be int32 or int64, got {t.dtype}")
    _check(t.device == device, name, f"must be on {device}, got {t.device}")
    _check(t.is_contiguous(), name, "must be contiguous")


def _validate(q, k_cache, v_cache, block_tables, q_starts, q_lens, ctx_lens, tiles, block_size, window, out,
              block_m, block_n) -> None:
    _check(isinstance(q, torch.Tensor) and q.dim() == 3, "q", "must be a 3-d tensor (N, H, D)")
    _check(q.dtype in _FLOATS, "q", f"must be bf16, fp16 or fp32, got {q.dtype}")
    _check(q.stride(-1) == 1, "q", "must have a contiguous last dim")
    dev, (_, heads, dim) = q.device, q.shape
    _check(1 <= dim <= 256, "q", f"head dim must be in 1..256, got {dim}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check(isinstance(c, torch.Tensor) and c.dim() == 3, name, "must be a 3-d tensor (Hkv, num_slots, D)")
        _check(c.dtype == q.dtype, name, f"must have q's dtype {q.dtype}, got {c.dtype}")
        _check(c.device == dev, name, f"must be on {dev}, got {c.device}")
        _check(c.is_contiguous(), name, "must be contiguous")
    _check(k_cache.shape[2] == dim, "k_cache", f"head dim {k_cache.shape[2]} != q's {dim}")
    _check(k_cache.shape[0] >= 1 and heads % k_cache.shape[0] == 0, "k_cache",
           f"kv heads {k_cache.shape[0]} must divide q's {heads} heads")
    _check(v_cache.shape == k_cache.shape, "v_cache", f"shape {tuple(v_cache.shape)} != k_cache's")
    _check_index(q_starts, "q_starts", 1, dev)
    chunks = q_starts.shape[0]
    for name, t in (("q_lens", q_lens), ("ctx_lens", ctx_lens)):
        _check_index(t, name, 1, dev)
        _check(t.shape[0] == chunks, name, f"has {t.shape[0]} chunks, q_starts {chunks}")
    _check_index(block_tables, "block_tables", 2, dev)
    _check(block_tables.shape[0] == chunks, "block_tables", f"has {block_tables.shape[0]} rows, expected {chunks}")
    _check_index(tiles, "tiles", 2, dev)
    _check(tiles.dtype == torch.int32 and tiles.shape[1] == 2, "tiles", "must be (T, 2) int32")
    _check(isinstance(block_size, int) and block_size > 0, "block_size", f"must be a positive int, got {block_size}")
    _check(window is None or (isinstance(window, int) and window > 0), "window",
           f"must be None or a positive int, got {window}")
    _check(isinstance(out, torch.Tensor) and out.shape == q.shape, "out", "must have q's shape")
    _check(out.dtype == q.dtype and out.device == dev, "out", "must have q's dtype and device")
    _check(out.is_contiguous(), "out", "must be contiguous")
    for name, b in (("block_m", block_m), ("block_n", block_n)):
        _check(isinstance(b, int) and b >= 16 and b & (b - 1) == 0, name, f"must be a power of 2 >= 16, got {b}")


def paged_prefill_attention(q, k_cache, v_cache, block_tables, q_starts, q_lens, ctx_lens, tiles,
                            block_size: int, window: int | None, out, *, block_m: int = PREFILL_BLOCK_M,
                            block_n: int = PREFILL_BLOCK_N) -> None:
    """Causal (optionally windowed) GQA attention of the chunks' query rows over their paged keys into `out`.

    q (N, H, D) bf16/fp16/fp32, last dim contiguous; k_cache, v_cache (Hkv, num_slots, D) contiguous;
    block_tables (C, max_blocks), q_starts, q_lens, ctx_lens (C,) int32/int64; tiles (T, 2) int32 from
    `prefill_tiles(q_lens, block_m)` (the same block_m); out (N, H, D) contiguous. All on one device; shapes
    are checked, values are not read (no host sync)."""
    _validate(q, k_cache, v_cache, block_tables, q_starts, q_lens, ctx_lens, tiles, block_size, window, out,
              block_m, block_n)
    n_tiles, heads, dim = tiles.shape[0], q.shape[1], q.shape[2]
    if n_tiles == 0:
        return
    dot_fp32 = q.dtype == torch.float32 or (_INTERPRETED and q.dtype == torch.bfloat16)
    grid = (n_tiles, heads)
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, q_starts, q_lens, ctx_lens, tiles,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        block_tables.stride(0),
        window or 0, dim ** -0.5 * _LOG2E,
        GROUP=heads // k_cache.shape[0], HEAD_DIM=dim, D_PAD=max(16, triton.next_power_of_2(dim)),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_SIZE=block_size,
        HAS_WINDOW=window is not None, DOT_FP32=dot_fp32, PRECISION="ieee" if dot_fp32 else "tf32",
        WHILE_LOOPS=_INTERPRETED, num_warps=4, num_stages=2)
