"""Products on packed weights (`csrc/qlinear.cpp`) for `shoal.model.quant`: int8 weights
(`qlinear`, weight-only int8) and bf16 weights (`blinear`, the engine's bf16 layers), on the best
body this CPU runs: AMX tiles ("amx"), AVX512-BF16 dot products ("avx512-bf16",
`csrc/qlinear_dot.cpp`: AMD Zen 4/5, Cooper Lake), or FMA on weights widened in registers
(`csrc/qlinear_fma.cpp`: "avx512" on Skylake-SP/Cascade Lake/Ice Lake, "avx2" on AMD Zen 2/3 and
older Intel). `body()` says which; `packed_ready()` whether any runs here; `SHOAL_PACKED_BODY=avx2`
(say) caps the process at a lesser body, `force_body` a block.

A (N, K) weight is packed once (`qpack`, int8 or bf16) into the tiles' B-operand order; rows
[16a, 16b) stay one contiguous run, so a packed matrix's 16-aligned row slices and row
concatenations are packed matrices too (fused projections keep their parts as views). The
products then take bf16 activations at any row count with the same bits per row
(batch-invariant: no row classes or split-K needed).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

from . import ops
from .build import library

ROW_ALIGN = 16  # N must be a multiple (one B tile's columns)
K_ALIGN = 32  # K must be a multiple (one TDPBF16PS step)


@functools.lru_cache(maxsize=None)
def amx_ready() -> bool:
    """The kernel library is loaded, was built with AMX-BF16, and the OS granted tile state."""
    lib = library()
    return lib is not None and bool(lib.shoal_amx_ready())


BODIES = {0: None, 1: "avx2", 2: "avx512", 3: "avx512-bf16", 4: "amx"}
BODY_IDS = {"none": 0, **{v: k for k, v in BODIES.items() if v}}


@functools.lru_cache(maxsize=None)
def _body() -> int:
    lib = library()
    if lib is None:
        return 0
    want = os.environ.get("SHOAL_PACKED_BODY")  # a lesser body for the whole process (tests, benchmarks)
    if want and not _capped:
        ops._check(want in BODY_IDS, f"SHOAL_PACKED_BODY: one of {sorted(BODY_IDS)} (got {want!r})")
        lib.shoal_packed_isa(BODY_IDS[want])
        _capped.append(want)
    return int(lib.shoal_packed_isa(-1))


_capped: list[str] = []  # SHOAL_PACKED_BODY applied


def body() -> str | None:
    """The body the packed products run: "amx", "avx512-bf16", "avx512", "avx2", or None (none here)."""
    return BODIES[_body()]


def packed_ready() -> bool:
    """The packed products run here (any body: x86 with AVX2 or better, the kernels built)."""
    return _body() > 0


@contextlib.contextmanager
def force_body(name: str) -> Iterator[None]:
    """Run the packed products on `name` (a `BODIES` name this CPU runs) inside the block (tests and
    benchmarks compare the bodies on one CPU); the body before it after."""
    want = BODY_IDS.get(name, 0)
    ops._check(library() is not None and want > 0, "force_body: no kernels or no such body")
    before = _body()
    try:
        library().shoal_packed_isa(want)
        _body.cache_clear()
        ops._check(_body() == want, f"force_body: this CPU cannot run {name}")
        yield
    finally:
        library().shoal_packed_isa(before if _capped else max(BODIES))
        _body.cache_clear()


def packable(n: int, k: int) -> bool:
    """Would an (n, k) weight be packed now (a body ready, the kernels on, the shape fits)?"""
    return ops.enabled() and packed_ready() and n % ROW_ALIGN == 0 and k % K_ALIGN == 0


def qpack(w: torch.Tensor) -> torch.Tensor:
    """w (N, K) int8 or bf16 -> the same dtype and shape, holding the packed order."""
    n, k = w.shape
    ops._check(w.dtype in (torch.int8, torch.bfloat16) and n % ROW_ALIGN == 0 and k % K_ALIGN == 0,
               "qpack: dtype or shape")
    w = w.detach().contiguous()
    out = torch.empty_like(w)
    fn = library().shoal_qpack if w.dtype == torch.int8 else library().shoal_bpack
    fn(w.data_ptr(), n, k, out.data_ptr())
    return out


def _group_order() -> torch.Tensor:
    """int8 packing stores value e of each 64-value group at byte GROUP_ORDER[e] (the byte
    interleave the kernel's widening undoes; `group_order` in csrc/qlinear.cpp)."""
    e = torch.arange(64)
    lo, hi = (e // 8) * 16 + e % 8, ((e - 32) // 8) * 16 + 8 + (e - 32) % 8
    return torch.where(e < 32, lo, hi)


GROUP_ORDER = _group_order()


def _b_order(p: torch.Tensor) -> torch.Tensor:
    """Whole packed blocks (any shape, contiguous, a multiple of 512 values) -> the same values
    in the B order (int8: GROUP_ORDER undone; bf16 is stored in it)."""
    if p.dtype != torch.int8:
        return p
    return p.reshape(-1, 64)[:, GROUP_ORDER].reshape(p.shape)


def qunpack(p: torch.Tensor) -> torch.Tensor:
    """The inverse of `qpack`: packed (N, K) -> row-major (N, K), the same dtype (a copy)."""
    n, k = p.shape
    blocks = _b_order(p).reshape(n // ROW_ALIGN, k // K_ALIGN, 16, ROW_ALIGN, 2)  # [nb][kb][kk][j][p]
    return blocks.permute(0, 3, 1, 2, 4).reshape(n, k)


@functools.lru_cache(maxsize=None)
def _row_index(k: int, int8: bool) -> torch.Tensor:
    """(16, K) int64: where row j % 16's K values lie in its packed block of 16 rows (K * 16
    values: [kb][kk][j][p], int8 groups of 64 stored in GROUP_ORDER)."""
    j, e = torch.arange(ROW_ALIGN)[:, None], torch.arange(k)[None, :]
    at = (e // K_ALIGN) * K_ALIGN * ROW_ALIGN + (e % K_ALIGN) // 2 * 2 * ROW_ALIGN + j * 2 + e % 2  # B order
    if int8:  # value v of a 64-value group is stored at byte GROUP_ORDER[v]
        at = at // 64 * 64 + GROUP_ORDER[at % 64]
    return at


def qrows(p: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` (...,) of the row-major matrix that packed `p` holds -> (..., K): one gather of
    each id's K values where they lie in its block of 16 rows (the embedding lookup of a tied,
    packed head). (Copying each id's whole block first, then gathering from it, moved 16x the
    bytes: ~1-11 ms for a 512-token prefill step of the default model, measured.)"""
    n, k = p.shape
    flat = ids.reshape(-1)
    at = (flat // ROW_ALIGN * (k * ROW_ALIGN))[:, None] + _row_index(k, p.dtype == torch.int8)[flat % ROW_ALIGN]
    return p.view(-1)[at].reshape(*ids.shape, k)  # (T, K) positions in p's storage


def usable(x: torch.Tensor) -> bool:
    """May `qlinear` take x now (kernels on, a body ready, a CPU float tensor, no autograd)?"""
    return ops.usable(x) and packed_ready()


def _bias(bias: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if bias is None:
        return None
    b = bias if bias.dtype == torch.bfloat16 and bias.is_contiguous() else bias.detach().to(torch.bfloat16).contiguous()
    ops._check(b.numel() == n and b.is_cpu, "bias")
    return b


def _out(out_dtype: torch.dtype) -> int:
    ops._check(out_dtype in (torch.bfloat16, torch.float32), "out_dtype: bfloat16 or float32")
    return 1 if out_dtype == torch.bfloat16 else 0


def qlinear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
            bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x (M, K) float (rows contiguous) -> (M, N) in out_dtype (bf16, or fp32 for fp32 models).

    Semantics: y[i, j] = out(s_ij * scale[j] + bias[j]) (bias as bf16, added in fp32; none when
    None; out() rounds to bf16 once, or keeps the fp32 value) where s_ij = sum_k bf16(x[i, k]) *
    w[j, k] is an fp32 sum computed in AMX tiles (TDPBF16PS over K in steps of 32), by AVX512-BF16
    dot products (VDPBF16PS: one chain over K, a pair of inputs a step) or by FMA (AVX-512F, AVX2:
    one chain for bf16, a few interleaved chains for int8); its rounding is the hardware's, within
    ~1e-6 relative of the exact sum (the bodies' bits differ), w = qunpack(packed). Row i's result
    depends on row i only (the same bits at any row count or position, on each body)."""
    m, k = x.shape
    n = packed.shape[0]
    xb = x if x.dtype == torch.bfloat16 and x.stride(1) == 1 else x.to(torch.bfloat16).contiguous()
    ops._check(packed.dtype == torch.int8 and packed.shape[1] == k and packed.is_contiguous()
               and scale.dtype == torch.bfloat16
               and scale.is_contiguous() and scale.numel() == n, "qlinear: weight, scale or input")
    b = _bias(bias, n)
    y = torch.empty(m, n, dtype=out_dtype)
    rc = library().shoal_qlinear(xb.data_ptr(), xb.stride(0), m, k, packed.data_ptr(), scale.data_ptr(),
                                 b.data_ptr() if b is not None else None, n, y.data_ptr(), n, _out(out_dtype))
    ops._check(rc == 0, "qlinear: kernel refused the shape")
    return y


def blinear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None,
            out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x (M, K) float (rows contiguous) -> (M, N) in out_dtype: y = out(bf16(x) @ w.T + bias), w =
    qunpack(packed) (bf16), the fp32 sum as `qlinear`'s (on the same body), the bias (as bf16) added
    in fp32 before the one rounding (as F.linear adds it); row i's bits depend on row i only."""
    m, k = x.shape
    n = packed.shape[0]
    xb = x if x.dtype == torch.bfloat16 and x.stride(1) == 1 else x.to(torch.bfloat16).contiguous()
    ops._check(packed.dtype == torch.bfloat16 and packed.shape[1] == k and packed.is_contiguous(),
               "blinear: weight or input")
    b = _bias(bias, n)
    y = torch.empty(m, n, dtype=out_dtype)
    rc = library().shoal_blinear(xb.data_ptr(), xb.stride(0), m, k, packed.data_ptr(),
                                 b.data_ptr() if b is not None else None, n, y.data_ptr(), n, _out(out_dtype))
    ops._check(rc == 0, "blinear: kernel refused the shape")
    return y
