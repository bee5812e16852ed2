"""A decoder layer's elementwise chains on CUDA GPUs, in Triton: each kernel replaces 3-10 PyTorch ops of a
one-token decode step, reads no value on the host and sizes its grid from shapes alone (capturable in a
CUDA graph). Inputs are bf16 / fp16 / fp32, math is fp32, each result is rounded once to the input dtype.

rms_norm(x, weight, eps, residual=None) -> (y, h)
  x (N, K), residual (N, K) or None: last dim contiguous, rows strided freely; weight (K,) contiguous
  h = residual + x (rounded to the dtype; h is x itself without a residual)
  y = weight * (h_fp32 * rsqrt(mean(h_fp32^2) + eps)).to(dtype), the product rounded to the dtype:
      `weight * F.rms_norm(h.float(), (K,), None, eps).to(dtype)`; y and a new h are contiguous (N, K)
  One program a row holding the whole row (BLOCK = next_pow2(K), K <= MAX_HIDDEN).

rope_(x, cos, sin) -> None, in place
  x (N, Hx, D): last dim contiguous, row and head strides free (a view into a fused q|k|v output)
  cos, sin (N, D) contiguous in x's dtype, HF rotate-half layout
  x = x * cos + cat(-x[..., D/2:], x[..., :D/2]) * sin
  Grid (N, ceil(Hx / HEADS_BLOCK)): a program rotates HEADS_BLOCK heads of a row as two (HEADS_BLOCK, D/2) halves.

rope_store_(x, cos, sin, heads, slot, k_cache, v_cache) -> None, in place
  x (N, H + 2 Hkv, D): a fused projection's q | k | v heads (last dim contiguous, strides free)
  q and k rotated in place as rope_(x[:, :H + Hkv], cos, sin); then each row's rotated k heads and its v
  heads written to the layer's cache at the row's slot: k_cache[:, slot[n]] = x[n, H:H + Hkv],
  v_cache[:, slot[n]] = x[n, H + Hkv:]; k_cache, v_cache (Hkv, S, D) in x's dtype, slot (N,) int64 (each
  slot in [0, S): device values, not checked). The rotation and the two cache writes (index_copy_ each) of
  a decode layer in one kernel. Grid (N, ceil((H + 2 Hkv) / HEADS_BLOCK)).

silu_mul(y) -> out
  y (N, 2I) = gate | up, last dim contiguous; out (N, I) contiguous = silu(gate) * up
  Grid (N, ceil(I / BLOCK)), BLOCK = min(next_pow2(I), 1024).

usable(*tensors): every tensor on CUDA in bf16 / fp16 / fp32 (the caller's cheap gate).

Under Triton 3.6's interpreter (TRITON_INTERPRET=1, read at import; CI on CPU) a cast from fp32 to bf16
truncates instead of rounding to nearest even, so there bf16 results are first rounded to nearest even in
fp32 bits by hand (compiled: the hardware's round-to-nearest-even cast alone). Sums of squares use tl.reduce
(see triton_decode: the fixture's reload leaves tl.sum compiled-only).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read at import: the test fixture reloads
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_SUM = tl.standard._sum_combine  # tl.reduce(x, 0, _SUM) is tl.sum(x, 0), and runs under the fixture's interpreter
MAX_HIDDEN = 8192  # rms_norm keeps a whole row in registers
MAX_HEAD_DIM = 1024
_ROPE_TILE = 2048  # heads x half dims a rope program holds
_SILU_BLOCK = 1024


@triton.jit
def _round_to(v, dtype: tl.constexpr, RNE_BF16: tl.constexpr):
    """fp32 v rounded to dtype (nearest, ties to even). RNE_BF16: by hand on the fp32 bits first (the
    interpreter's fp32 -> bf16 cast truncates); the cast then drops zero bits. Canonical NaNs stay NaN."""
    if RNE_BF16:
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536  # -65536: 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, h_ptr, stride_x, stride_r, eps,
                     HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                     RNE_BF16: tl.constexpr):
    dtype = y_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    # h (BLOCK,) fp32 holding dtype values: x, or residual + x rounded to the dtype (stored as h)
    h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        h_out = _round_to(r + h, dtype, RNE_BF16)
        tl.store(h_ptr + row * HIDDEN + cols, h_out, mask=mask)
        h = h_out.to(tl.float32)
    # normalize in fp32 (padding is 0: out of the sum), round to the dtype, then scale and round again
    inv_rms = tl.rsqrt(tl.reduce(h * h, 0, _SUM) / HIDDEN + eps)
    normed = _round_to(h * inv_rms, dtype, RNE_BF16).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * HIDDEN + cols, _round_to(w * normed, dtype, RNE_BF16), mask=mask)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, heads, stride_xn, stride_xh,
                 HALF: tl.constexpr, HALF_BLOCK: tl.constexpr, HEADS_BLOCK: tl.constexpr, RNE_BF16: tl.constexpr):
    dtype = x_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1) * HEADS_BLOCK + tl.arange(0, HEADS_BLOCK)  # (HEADS_BLOCK,)
    dims = tl.arange(0, HALF_BLOCK)  # (HALF_BLOCK,) within a half
    dim_ok = dims < HALF
    # this row's cos / sin halves (HALF_BLOCK,), shared by its heads
    trig = row * (2 * HALF) + dims
    cos1 = tl.load(cos_ptr + trig, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(cos_ptr + trig + HALF, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(sin_ptr + trig, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(sin_ptr + trig + HALF, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    # x halves (HEADS_BLOCK, HALF_BLOCK): first = x[..., :D/2], second = x[..., D/2:]
    mask = (head < heads)[:, None] & dim_ok[None, :]
    first_ptrs = x_ptr + row * stride_xn + head.to(tl.int64)[:, None] * stride_xh + dims[None, :]
    first = tl.load(first_ptrs, mask=mask, other=0.0).to(tl.float32)
    second = tl.load(first_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    # x * cos + rotate_half(x) * sin, rotate_half(x) = (-second | first)
    tl.store(first_ptrs, _round_to(first * cos1 - second * sin1, dtype, RNE_BF16), mask=mask)
    tl.store(first_ptrs + HALF, _round_to(second * cos2 + first * sin2, dtype, RNE_BF16), mask=mask)


@triton.jit
def _rope_store_kernel(x_ptr, cos_ptr, sin_ptr, slot_ptr, kc_ptr, vc_ptr, heads, kv_heads, stride_xn, stride_xh,
                       stride_ch, stride_cs, HALF: tl.constexpr, HALF_BLOCK: tl.constexpr,
                       HEADS_BLOCK: tl.constexpr, RNE_BF16: tl.constexpr):
    dtype = x_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1) * HEADS_BLOCK + tl.arange(0, HEADS_BLOCK)  # (HEADS_BLOCK,) over q | k | v
    dims = tl.arange(0, HALF_BLOCK)
    dim_ok = (dims < HALF)[None, :]
    trig = row * (2 * HALF) + dims
    cos1 = tl.load(cos_ptr + trig, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(cos_ptr + trig + HALF, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(sin_ptr + trig, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(sin_ptr + trig + HALF, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]
    is_q = head < heads
    is_k = (head >= heads) & (head < heads + kv_heads)
    is_v = (head >= heads + kv_heads) & (head < heads + 2 * kv_heads)
    first_ptrs = x_ptr + row * stride_xn + head.to(tl.int64)[:, None] * stride_xh + dims[None, :]
    mask = (is_q | is_k | is_v)[:, None] & dim_ok
    first = tl.load(first_ptrs, mask=mask, other=0.0)  # (HEADS_BLOCK, HALF_BLOCK) in the dtype
    second = tl.load(first_ptrs + HALF, mask=mask, other=0.0)
    f, s = first.to(tl.float32), second.to(tl.float32)
    r1 = _round_to(f * cos1 - s * sin1, dtype, RNE_BF16)  # rope_'s bits
    r2 = _round_to(s * cos2 + f * sin2, dtype, RNE_BF16)
    rot = (is_q | is_k)[:, None] & dim_ok
    tl.store(first_ptrs, r1, mask=rot)
    tl.store(first_ptrs + HALF, r2, mask=rot)
    # the cache: a k head its rotated values, a v head its own, at this row's slot
    slot = tl.load(slot_ptr + row).to(tl.int64)
    kv = tl.where(is_k, head - heads, tl.maximum(head - heads - kv_heads, 0)).to(tl.int64)
    cache_off = kv[:, None] * stride_ch + slot * stride_cs + dims[None, :]
    k_mask = is_k[:, None] & dim_ok
    tl.store(kc_ptr + cache_off, r1, mask=k_mask)
    tl.store(kc_ptr + cache_off + HALF, r2, mask=k_mask)
    v_mask = is_v[:, None] & dim_ok
    tl.store(vc_ptr + cache_off, first, mask=v_mask)
    tl.store(vc_ptr + cache_off + HALF, second, mask=v_mask)


@triton.jit
def _silu_mul_kernel(y_ptr, out_ptr, stride_y, INTER: tl.constexpr, BLOCK: tl.constexpr, RNE_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) within a half
    mask = cols < INTER
    gate = tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(y_ptr + row * stride_y + INTER + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up  # silu(gate) * up; exp overflow -> gate / inf = -0
    tl.store(out_ptr + row * INTER + cols, _round_to(out, out_ptr.dtype.element_ty, RNE_BF16), mask=mask)


def usable(*tensors) -> bool:
    """True when every tensor is on a CUDA device in bf16 / fp16 / fp32."""
    return all(t.is_cuda and t.dtype in _FLOAT_DTYPES for t in tensors)


def _check_like(name, t, like, shape) -> None:
    """t must be `shape` in like's dtype on like's device with a contiguous last dim."""
    if t.shape != shape or t.dtype != like.dtype or t.device != like.device or (t.dim() and t.stride(-1) != 1):
        raise ValueError(f"{name} must be {like.dtype} {tuple(shape)} on {like.device} with a contiguous last dim, "
                         f"got {t.dtype} {tuple(t.shape)} on {t.device} strides {t.stride()}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h): h = residual + x (x without a residual), y = weight * rms_norm(h) (see the module)."""
    if x.dim() != 2 or x.dtype not in _FLOAT_DTYPES or x.stride(1) != 1:
        raise ValueError(f"x must be (N, K) bf16/fp16/fp32 with a contiguous last dim, got {tuple(x.shape)} "
                         f"{x.dtype} strides {x.stride()}")
    rows, hidden = x.shape
    if not 1 <= hidden <= MAX_HIDDEN:
        raise ValueError(f"x: hidden size {hidden} outside 1..{MAX_HIDDEN}")
    _check_like("weight", weight, x, (hidden,))
    if residual is not None:
        _check_like("residual", residual, x, x.shape)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")
    y = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
    h = x if residual is None else torch.empty_like(y)
    if rows:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(rows,)](
            x, x if residual is None else residual, weight, y, h,
            x.stride(0), 0 if residual is None else residual.stride(0), float(eps),
            HIDDEN=hidden, BLOCK=block, HAS_RESIDUAL=residual is not None,
            RNE_BF16=_INTERPRETING and x.dtype == torch.bfloat16,
            num_warps=min(16, max(4, block // 256)),
        )
    return y, h


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """x (N, Hx, D) rotated in place: x * cos + rotate_half(x) * sin (see the module)."""
    if x.dim() != 3 or x.dtype not in _FLOAT_DTYPES or x.stride(2) != 1:
        raise ValueError(f"x must be (N, Hx, D) bf16/fp16/fp32 with a contiguous last dim, got {tuple(x.shape)} "
                         f"{x.dtype} strides {x.stride()}")
    rows, heads, head_dim = x.shape
    if head_dim % 2 or not 2 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"x: head dim {head_dim} must be even, 2..{MAX_HEAD_DIM}")
    # a cheap overlap check (expanded views): each dim of size > 1 steps past a whole head
    if (rows > 1 and x.stride(0) < head_dim) or (heads > 1 and x.stride(1) < head_dim):
        raise ValueError(f"x: rows or heads overlap (strides {x.stride()}, head dim {head_dim})")
    for name, trig in (("cos", cos), ("sin", sin)):
        _check_like(name, trig, x, (rows, head_dim))
        if trig.stride(0) != head_dim and rows > 1:
            raise ValueError(f"{name} must be contiguous, got strides {trig.stride()}")
    if rows and heads:
        half = head_dim // 2
        half_block = triton.next_power_of_2(half)
        heads_block = min(triton.next_power_of_2(heads), max(1, _ROPE_TILE // half_block))
        _rope_kernel[(rows, triton.cdiv(heads, heads_block))](
            x, cos, sin, heads, x.stride(0), x.stride(1),
            HALF=half, HALF_BLOCK=half_block, HEADS_BLOCK=heads_block,
            RNE_BF16=_INTERPRETING and x.dtype == torch.bfloat16,
            num_warps=4,
        )


def rope_store_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, slot: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """q | k of x (N, H + 2 Hkv, D) rotated in place, k and v written to the caches at slot (see the module)."""
    if x.dim() != 3 or x.dtype not in _FLOAT_DTYPES or x.stride(2) != 1:
        raise ValueError(f"x must be (N, H + 2 Hkv, D) bf16/fp16/fp32 with a contiguous last dim, got "
                         f"{tuple(x.shape)} {x.dtype} strides {x.stride()}")
    rows, total, head_dim = x.shape
    kv_heads = (total - heads) // 2
    if heads < 1 or kv_heads < 1 or heads + 2 * kv_heads != total:
        raise ValueError(f"x: {total} heads are not {heads} q heads and two equal k and v groups")
    if head_dim % 2 or not 2 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"x: head dim {head_dim} must be even, 2..{MAX_HEAD_DIM}")
    if (rows > 1 and x.stride(0) < total * head_dim) or x.stride(1) < head_dim:
        raise ValueError(f"x: rows or heads overlap (strides {x.stride()}, head dim {head_dim})")
    for name, trig in (("cos", cos), ("sin", sin)):
        _check_like(name, trig, x, (rows, head_dim))
        if trig.stride(0) != head_dim and rows > 1:
            raise ValueError(f"{name} must be contiguous, got strides {trig.stride()}")
    if k_cache.dim() != 3:
        raise ValueError(f"k_cache must be (Hkv, S, D), got {tuple(k_cache.shape)}")
    _check_like("k_cache", k_cache, x, (kv_heads, k_cache.shape[1], head_dim))
    _check_like("v_cache", v_cache, x, k_cache.shape)
    if k_cache.stride() != v_cache.stride():
        raise ValueError(f"k_cache and v_cache must share strides, got {k_cache.stride()} and {v_cache.stride()}")
    if slot.shape != (rows,) or slot.dtype != torch.int64 or slot.device != x.device:
        raise ValueError(f"slot must be int64 ({rows},) on {x.device}, got {slot.dtype} {tuple(slot.shape)} "
                         f"on {slot.device}")
    if rows:
        half = head_dim // 2
        half_block = triton.next_power_of_2(half)
        heads_block = min(triton.next_power_of_2(total), max(1, _ROPE_TILE // half_block))
        _rope_store_kernel[(rows, triton.cdiv(total, heads_block))](
            x, cos, sin, slot, k_cache, v_cache, heads, kv_heads, x.stride(0), x.stride(1),
            k_cache.stride(0), k_cache.stride(1),
            HALF=half, HALF_BLOCK=half_block, HEADS_BLOCK=heads_block,
            RNE_BF16=_INTERPRETING and x.dtype == torch.bfloat16,
            num_warps=4,
        )


def silu_mul(y: torch.Tensor) -> torch.Tensor:
    """y (N, 2I) = gate | up -> (N, I) silu(gate) * up (see the module)."""
    if y.dim() != 2 or y.dtype not in _FLOAT_DTYPES or y.stride(1) != 1 or y.shape[1] % 2:
        raise ValueError(f"y must be (N, 2I) bf16/fp16/fp32 with a contiguous last dim, got {tuple(y.shape)} "
                         f"{y.dtype} strides {y.stride()}")
    rows, inter = y.shape[0], y.shape[1] // 2
    out = torch.empty((rows, inter), dtype=y.dtype, device=y.device)
    if rows and inter:
        block = min(triton.next_power_of_2(inter), _SILU_BLOCK)
        _silu_mul_kernel[(rows, triton.cdiv(inter, block))](
            y, out, y.stride(0), INTER=inter, BLOCK=block,
            RNE_BF16=_INTERPRETING and y.dtype == torch.bfloat16,
            num_warps=4,
        )
    return out
