"""4-bit weights (`quantization="q4"`): GGUF's Q4_1 scheme, computed as llama.cpp computes it on
CPUs (`csrc/q4linear.cpp`).

A weight's 32-input groups of one output are stored as q in 0..15 with an fp16 scale d and
minimum m (w ~ d * q + m: 5 bits a weight with the two fp16s, against 16 for bf16). The product
quantizes each row's activations per group of 32 to int8 (xd = max|x| / 127, xq = round(x / xd)),
sums q * xq exactly in int32 per group (VNNI's VPDPBUSD where the CPU has it), and adds the groups
in fp32 in order: y[j] = sum_c isum_c * (d_c * xd_c) + m_c * (xd_c * sum(xq)_c), + bias. A row's
result depends on that row alone (batch-invariant), on the AVX-512 and the AVX2 bodies.

Why: a decode step reads every weight once, so one stream is bound by the bytes it reads: 5 bits
instead of 16. The default model's GGUF stores its layers in exactly this scheme.

`quantize_q4` / `dequantize_q4` (N, K) <-> (q, d, m); `q4pack` / `q4unpack` <-> the kernel's
layout (uint8 (N, K * 5 / 8), rows [16a, 16b) one run, so row slices and concatenations at
multiples of 16 stay packed matrices); `q4_linear` the product (the kernel, or with the kernels
off a dequantized `F.linear`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ops
from .build import library
from .qlinear import packed_ready

GROUP = 32  # inputs a (d, m) pair covers
ROW_ALIGN = 16  # outputs a packed block holds
BLOCK_BYTES = 320  # 16 x 32 nibbles, then 16 d and 16 m (fp16)


def fits(n: int, k: int) -> bool:
    """Can an (n, k) weight be packed (n % 16 == 0, k % 32 == 0)?"""
    return n % ROW_ALIGN == 0 and k % GROUP == 0 and n > 0 and k > 0


@torch.no_grad()
def quantize_q4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K) float, K % 32 == 0 -> q (N, K) uint8 in 0..15, d and m (N, K / 32) fp16.

    Per group of 32: m = fp16(min), d = fp16((max - min) / 15), q = round((w - m) / d) clamped to
    0..15 (0 where d is 0), so |w - (d q + m)| <= d / 2 up to the fp16 roundings (Q4_1)."""
    n, k = w.shape
    ops._check(k % GROUP == 0, f"quantize_q4: in_features {k} is not a multiple of {GROUP}")
    g = w.detach().float().reshape(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    m = lo.to(torch.float16)
    d = ((hi - lo) / 15).to(torch.float16)
    df, mf = d.float().unsqueeze(-1), m.float().unsqueeze(-1)
    q = torch.where(df > 0, (g - mf) / torch.where(df > 0, df, 1.0), 0.0)
    q = q.round_().clamp_(0, 15).to(torch.uint8)
    return q.reshape(n, k), d, m


def dequantize_q4(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q, d, m) -> (N, K): d * q + m computed in fp32, rounded once to dtype."""
    n, k = q.shape
    g = q.reshape(n, k // GROUP, GROUP).float() * d.float().unsqueeze(-1) + m.float().unsqueeze(-1)
    return g.reshape(n, k).to(dtype)


def q4pack(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(q, d, m) of an (N, K) weight -> packed uint8 (N, K * 5 / 8) (layout: csrc/q4linear.cpp)."""
    n, k = q.shape
    ops._check(fits(n, k) and d.shape == m.shape == (n, k // GROUP), "q4pack: shape")
    nb, kb = n // ROW_ALIGN, k // GROUP
    qv = q.reshape(nb, ROW_ALIGN, kb, 4, 2, 4)  # [nb][j][c][g][h][t]: input 32 c + 8 g + 4 h + t
    nib = (qv[:, :, :, :, 0] | (qv[:, :, :, :, 1] << 4)).permute(0, 2, 3, 1, 4)  # [nb][c][g][j][t]
    def halves(v: torch.Tensor) -> torch.Tensor:  # (N, kb) fp16 -> (nb, kb, 32) bytes
        return v.to(torch.float16).reshape(nb, ROW_ALIGN, kb).permute(0, 2, 1).contiguous().view(torch.uint8)
    out = torch.cat([nib.reshape(nb, kb, 256), halves(d), halves(m)], dim=-1)  # (nb, kb, 320)
    return out.reshape(n, kb * BLOCK_BYTES // ROW_ALIGN)


def q4unpack(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of `q4pack`: packed (N, K * 5 / 8) -> q (N, K) uint8, d and m (N, K / 32) fp16."""
    n = p.shape[0]
    nb, kb = n // ROW_ALIGN, p.shape[1] * ROW_ALIGN // BLOCK_BYTES
    blk = p.reshape(nb, kb, BLOCK_BYTES)
    nib = blk[..., :256].reshape(nb, kb, 4, ROW_ALIGN, 4)  # [nb][c][g][j][t]
    q = torch.stack([nib & 15, nib >> 4], dim=4)  # [nb][c][g][j][h][t]
    q = q.permute(0, 3, 1, 2, 4, 5).reshape(n, kb * GROUP)
    def halves(b: torch.Tensor) -> torch.Tensor:  # (nb, kb, 32) bytes -> (N, kb) fp16
        return b.contiguous().view(torch.float16).permute(0, 2, 1).reshape(n, kb)
    return q, halves(blk[..., 256:288]), halves(blk[..., 288:])


def in_features(p: torch.Tensor) -> int:
    """K of a packed (N, K * 5 / 8) weight."""
    return p.shape[1] * ROW_ALIGN // BLOCK_BYTES * GROUP


def dequantize_packed(p: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed -> the (N, K) weight it stands for, in dtype."""
    return dequantize_q4(*q4unpack(p), dtype=dtype)


def quantize_activations(x: torch.Tensor, scalar: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The products' int8 step on x (M, K) (as bf16): (xq (M, K) int8, xd (M, K / 32), xsum (M, K / 32))
    with xsum = xd * sum(xq) per group; `scalar` runs the scalar code the vector code matches (tests)."""
    m, k = x.shape
    ops._check(library() is not None and k % GROUP == 0, "quantize_activations: kernels or K")
    xb = x.to(torch.bfloat16).contiguous()
    xq = torch.empty(m, k, dtype=torch.int8)
    xd, xs = torch.empty(m, k // GROUP), torch.empty(m, k // GROUP)
    rc = library().shoal_q4_quantize(xb.data_ptr(), k, m, k, xq.data_ptr(), xd.data_ptr(), xs.data_ptr(),
                                     int(scalar))
    ops._check(rc == 0, "quantize_activations: no AVX2 build")
    return xq, xd, xs


def q4_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) float -> (M, N) in x's dtype, as the module docstring describes: the kernel where
    one runs (x CPU, no autograd, the kernels on; a bf16 bias joins the fp32 sum, any other is added
    after), else `F.linear` on the dequantized weight (kernels off: the weights' values, without the
    activations' int8 step)."""
    m, k = x.shape
    n = packed.shape[0]
    if not (ops.usable(x) and packed_ready()):
        return F.linear(x, dequantize_packed(packed, x.dtype), bias)
    ops._check(in_features(packed) == k and packed.dtype == torch.uint8 and packed.is_contiguous(),
               "q4_linear: weight or input")
    xb = x if x.dtype == torch.bfloat16 and x.stride(1) == 1 else x.to(torch.bfloat16).contiguous()
    kb = bias if bias is not None and bias.dtype == torch.bfloat16 and bias.is_contiguous() else None
    odt = torch.float32 if x.dtype == torch.float32 else torch.bfloat16
    y = torch.empty(m, n, dtype=odt)
    rc = library().shoal_q4linear(xb.data_ptr(), xb.stride(0), m, k, packed.data_ptr(),
                                  kb.data_ptr() if kb is not None else None, n, y.data_ptr(), n,
                                  1 if odt == torch.bfloat16 else 0)
    ops._check(rc == 0, "q4_linear: kernel refused the shape")
    y = y.to(x.dtype)
    if bias is not None and kb is None:
        y.add_(bias)
    return y
