"""Paged decode attention on CUDA GPUs, in Triton: one query token a row, reading the paged KV
cache in place through each row's block table (no gather copy), capturable in a CUDA graph.

Shapes (B rows, H query heads, Hkv kv heads, D head dim, H = Hkv * g):
  q            (B, H, D)      bf16 / fp16 / fp32, last dim contiguous (rows and heads may be strided:
                              a view into a fused projection output)
  k_cache      (Hkv, S, D)    contiguous, q's dtype; slot s of kv head j is k_cache[j, s]
  v_cache      (Hkv, S, D)    as k_cache
  block_tables (B, max_blocks) int32 / int64: position p of row b is at slot
                              block_tables[b, p // block_size] * block_size + p % block_size
  lengths      (B,)           int32 / int64, >= 1: row b attends positions [max(0, L - window), L)
  out          (B, H, D)      q's dtype, written for every row

out[b, h] = softmax(q[b, h] . k^T * D**-0.5) v over the row's allowed keys, with kv head h // g,
accumulated in fp32 (online softmax), cast to out's dtype.

Design: a grid of (B, Hkv) programs, one a row and kv head, each holding that kv head's g query
heads as a (G_PAD, BLOCK_D) tile (padded to 16 rows for tl.dot) and walking the row's positions in
tiles of BLOCK_N keys; each key's slot is looked up on its own, so tiles may start mid-block (a
window) and span blocks. Keys past the row's length are masked out of the loads and the scores
(stale slots may hold anything, NaN included). The grid depends on shapes alone and nothing reads
a value on the host, so a captured graph replays with new lengths and tables copied in.

Under Triton 3.6's interpreter (TRITON_INTERPRET=1, CI on CPU) two things differ, chosen at import:
it multiplies bf16 tl.dot operands as their raw uint16 bits, so there bf16 tiles are upcast to fp32
before each dot (compiled: bf16 tensor-core dots); and range() over loaded bounds fails with numpy
>= 2.4, so there the tile loop is a while loop (compiled: a for loop). The tile body is shared.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read at import: the test fixture reloads
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)
_NO_WINDOW = 2**31 - 1  # L - this <= 0: every position from 0
_LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
# tl.max / tl.sum / tl.zeros are @jit helpers that the test fixture's reload leaves compiled-only (the
# interpreter then refuses them); tl.reduce and tl.full are builtins, and these combine functions are
# the ones the interpreter maps to numpy. Compiled, tl.reduce(x, 1, _MAX) is what tl.max(x, 1) emits.
_MAX = tl.standard._elementwise_max
_SUM = tl.standard._sum_combine


@triton.jit
def _attend_tile(q, m_i, l_i, acc, tile, length, table_row, k_head, v_head, scale_log2,
                 HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                 IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """One tile of keys at positions [tile, tile + BLOCK_N) folded into the online softmax state."""
    dims = tl.arange(0, BLOCK_D)
    pos = tile + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    key_ok = pos < length
    block_ids = tl.load(table_row + pos // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
    slots = block_ids * BLOCK_SIZE + pos % BLOCK_SIZE
    kv_offs = slots[:, None] * HEAD_DIM + dims[None, :]  # (BLOCK_N, BLOCK_D)
    kv_mask = key_ok[:, None] & (dims < HEAD_DIM)[None, :]
    k = tl.load(k_head + kv_offs, mask=kv_mask, other=0.0)
    v = tl.load(v_head + kv_offs, mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)

    # scores (G_PAD, BLOCK_N), log2-scaled; masked keys at -inf (excluded, never NaN * 0)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(key_ok[None, :], s * scale_log2, float("-inf"))

    m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))  # finite: every tile has a valid key
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
    if IEEE:
        pv = tl.dot(p, v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, table_ptr, len_ptr, out_ptr,
                   stride_qb, stride_qh, stride_kvh, stride_tb, stride_ob, stride_oh,
                   scale_log2, window,
                   G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   G_PAD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                   IEEE: tl.constexpr, UPCAST: tl.constexpr, WHILE_LOOP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    heads = tl.arange(0, G_PAD)
    dims = tl.arange(0, BLOCK_D)
    q_mask = (heads < G)[:, None] & (dims < HEAD_DIM)[None, :]

    # q tile (G_PAD, BLOCK_D): the g query heads sharing this kv head, zeros in the padding
    q_heads = kv_head * G + heads
    q = tl.load(q_ptr + row * stride_qb + q_heads[:, None] * stride_qh + dims[None, :], mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    length = tl.load(len_ptr + row).to(tl.int32)
    first = tl.maximum(length - window, 0)
    table_row = table_ptr + row * stride_tb
    k_head = k_ptr + kv_head * stride_kvh
    v_head = v_ptr + kv_head * stride_kvh

    # online softmax state in base 2: running max, running sum, unnormalized output
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.full([G_PAD], 0.0, tl.float32)
    acc = tl.full([G_PAD, BLOCK_D], 0.0, tl.float32)
    if WHILE_LOOP:  # the interpreter: range() over tensor bounds fails with numpy >= 2.4 (triton #9171)
        tile = first
        while tile < length:
            m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, tile, length, table_row, k_head, v_head, scale_log2,
                                         HEAD_DIM, BLOCK_SIZE, BLOCK_D, BLOCK_N, IEEE, UPCAST)
            tile += BLOCK_N
    else:  # compiled: an scf.for the pipeliner can overlap
        for tile in range(first, length, BLOCK_N):
            m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, tile, length, table_row, k_head, v_head, scale_log2,
                                         HEAD_DIM, BLOCK_SIZE, BLOCK_D, BLOCK_N, IEEE, UPCAST)

    o = acc / l_i[:, None]
    out_ptrs = out_ptr + row * stride_ob + q_heads[:, None] * stride_oh + dims[None, :]
    tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=q_mask)


def _check(q, k_cache, v_cache, block_tables, lengths, block_size, window, out) -> None:
    """Shape / dtype / device / stride checks only (no tensor values read)."""
    if q.dim() != 3 or q.dtype not in _FLOAT_DTYPES or q.stride(-1) != 1:
        raise ValueError(f"q must be (B, H, D) bf16/fp16/fp32 with a contiguous last dim, got {tuple(q.shape)} "
                         f"{q.dtype} strides {q.stride()}")
    batch, heads, head_dim = q.shape
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q: head dim {head_dim} outside 1..{MAX_HEAD_DIM}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 3 or cache.shape[2] != head_dim or not cache.is_contiguous():
            raise ValueError(f"{name} must be contiguous (Hkv, num_slots, {head_dim}), got {tuple(cache.shape)}")
        if cache.dtype != q.dtype or cache.device != q.device:
            raise ValueError(f"{name} must be {q.dtype} on {q.device}, got {cache.dtype} on {cache.device}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}")
    kv_heads = k_cache.shape[0]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"k_cache: {kv_heads} kv heads do not divide q's {heads} heads")
    if (block_tables.dim() != 2 or block_tables.shape[0] != batch or block_tables.dtype not in _INDEX_DTYPES
            or block_tables.stride(-1) != 1 or block_tables.device != q.device):
        raise ValueError(f"block_tables must be int32/int64 ({batch}, max_blocks) with a contiguous last dim on "
                         f"{q.device}, got {tuple(block_tables.shape)} {block_tables.dtype} on {block_tables.device}")
    if (lengths.dim() != 1 or lengths.shape[0] != batch or lengths.dtype not in _INDEX_DTYPES
            or not lengths.is_contiguous() or lengths.device != q.device):
        raise ValueError(f"lengths must be contiguous int32/int64 ({batch},) on {q.device}, got "
                         f"{tuple(lengths.shape)} {lengths.dtype} on {lengths.device}")
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out must be {q.dtype} {tuple(q.shape)} on {q.device} with a contiguous last dim, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None or a positive int, got {window!r}")


def paged_decode_attention(q, k_cache, v_cache, block_tables, lengths, block_size: int,
                           window: int | None, out) -> None:
    """out[b, h] = softmax(q[b, h] . K_b^T / sqrt(D)) V_b over row b's positions [max(0, L - window), L)."""
    _check(q, k_cache, v_cache, block_tables, lengths, block_size, window, out)
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[0]
    group = heads // kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    _decode_kernel[(batch, kv_heads)](
        q, k_cache, v_cache, block_tables, lengths, out,
        q.stride(0), q.stride(1), k_cache.stride(0), block_tables.stride(0), out.stride(0), out.stride(1),
        head_dim ** -0.5 * _LOG2E, _NO_WINDOW if window is None else min(window, _NO_WINDOW),
        G=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        G_PAD=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d, BLOCK_N=64 if block_d <= 128 else 32,
        IEEE=q.dtype == torch.float32, UPCAST=_INTERPRETING and q.dtype == torch.bfloat16,
        WHILE_LOOP=_INTERPRETING,
        num_warps=4,
    )
