"""PyTorch-facing wrappers of the fused CPU kernels (`csrc/*.cpp`).

`usable(*tensors)` says whether the kernels may stand in for the PyTorch op chains: the library
is built (`build.library`), they are switched on (`set_enabled`, `SHOAL_CPU_KERNELS`), every
tensor is a float32/bfloat16 CPU tensor, and no autograd graph is being recorded (training keeps
PyTorch's ops). Each wrapper then computes what its docstring's "Semantics" says, for rows laid
out as (rows, ...) with a contiguous last dimension; callers check `usable` first.
"""

from __future__ import annotations

import contextlib
import ctypes
from array import array

import torch

from .build import library

_DT = {torch.float32: 0, torch.bfloat16: 1}
_DTC = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}  # KV cache dtypes (int8: with scales)

_enabled = True


def set_enabled(on: bool) -> None:
    """Use the kernels where `usable` (default) or never (the PyTorch paths, e.g. for an A/B)."""
    global _enabled
    _enabled = bool(on)


def enabled() -> bool:
    return _enabled and library() is not None


@contextlib.contextmanager
def disabled():
    """Within the block, every caller takes its PyTorch path."""
    global _enabled
    prev, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = prev


def release_omp_pool() -> bool:
    """End the calling thread's OpenMP worker threads (`shoal_omp_release`): for a thread that has
    handed the model's work to another one (`AsyncEngine`), whose parallel regions would otherwise
    barely spin while this thread's idle pool counts against the CPUs. True when they were
    released; False without the kernels or without OpenMP 5.0's pause in the runtime."""
    lib = library()
    return lib is not None and lib.shoal_omp_release() == 0


def _check(ok: bool, what: str) -> None:
    """The kernels read and write raw memory: a layout they do not expect must not reach them
    (a real check, kept under `python -O`)."""
    if not ok:
        raise ValueError(f"shoal.kernels: unexpected tensor {what}")


def _scales(kc: torch.Tensor, ks: torch.Tensor | None, vs: torch.Tensor | None) -> tuple:
    """The int8 cache's scale pointers (None, None for a float cache), checked: ks, vs (Hkv, S)
    fp32 contiguous beside an int8 kc (Hkv, S, D)."""
    if kc.dtype != torch.int8:
        _check(ks is None and vs is None, "scales: only an int8 cache has them")
        return None, None
    _check(ks is not None and vs is not None and ks.dtype == vs.dtype == torch.float32 and ks.is_contiguous()
           and vs.is_contiguous() and ks.shape == vs.shape == kc.shape[:2], "int8 cache: its scales")
    return ks.data_ptr(), vs.data_ptr()


def usable(*tensors: torch.Tensor) -> bool:
    if not _enabled:
        return False
    for t in tensors:  # (is_cpu: cheaper than building t.device; this runs ~6 times a layer)
        if not t.is_cpu or t.dtype not in _DT:
            return False  # (before `library()`: a GPU engine never builds the CPU kernels)
    if torch.is_grad_enabled():
        if any(t.requires_grad for t in tensors):
            return False
    return library() is not None


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., d) as 2-D (rows, d) with a contiguous last dim (a view when possible)."""
    if x.dim() == 2 and x.stride(1) == 1:
        return x
    return x.reshape(-1, x.shape[-1]) if x.is_contiguous() else x.contiguous().view(-1, x.shape[-1])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Semantics: r = x + residual (rounded to x's dtype; r = x without a residual);
    y = weight * (r_fp32 / sqrt(mean(r_fp32^2) + eps)).to(dtype), as `RMSNorm` does.
    Returns (y, r if a residual was given else None), both shaped like x."""
    lib = library()
    d = x.shape[-1]
    xr = _rows(x)
    n = xr.shape[0]
    out = torch.empty_like(xr, memory_format=torch.contiguous_format)
    res_out = rr = None
    if residual is not None:
        rr = _rows(residual)
        res_out = torch.empty_like(out)
    w = weight if weight.dtype == x.dtype and weight.is_contiguous() else weight.to(x.dtype).contiguous()
    lib.shoal_rms_norm(_DT[x.dtype], xr.data_ptr(), xr.stride(0),
                       rr.data_ptr() if rr is not None else None, rr.stride(0) if rr is not None else 0,
                       res_out.data_ptr() if res_out is not None else None, d,
                       w.data_ptr(), out.data_ptr(), d, n, d, float(eps))
    shape = x.shape
    return out.view(shape), (res_out.view(shape) if res_out is not None else None)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """In place on x (N, heads, D) (row stride free, heads and D contiguous), cos/sin (N, D) in
    x's dtype. Semantics, bit for bit: x = x * cos + cat(-x2, x1) * sin (`apply_rope`, each
    product and the sum rounded to x's dtype)."""
    n, heads, d = x.shape
    _check(x.stride(2) == 1 and x.stride(1) == d, "rope_: heads and head_dim must be contiguous")
    if cos.dtype != x.dtype or not (cos.is_contiguous() and sin.is_contiguous()) or cos.numel() != n * d:
        cos, sin = cos.to(x.dtype).reshape(n, d).contiguous(), sin.to(x.dtype).reshape(n, d).contiguous()
    _check(sin.dtype == x.dtype and sin.numel() == n * d, "cos/sin")
    library().shoal_rope(_DT[x.dtype], x.data_ptr(), x.stride(0), n, heads, d, cos.data_ptr(),
                         sin.data_ptr())
    return x


def cache_write(k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, kc: torch.Tensor,
                vc: torch.Tensor, ks: torch.Tensor | None = None, vs: torch.Tensor | None = None) -> None:
    """k, v (N, Hkv, D) (row stride free); slots (N,) int64; kc, vc (Hkv, S, D) one layer's
    cache. Semantics: kc[:, slots[i]] = k[i].to(kc.dtype), the same for v (`index_copy_`).
    An int8 cache (ks, vs (Hkv, S) fp32 its scales): each (token, kv head) row x of D values is
    stored as round(x * (127 / amax)) (half to even; amax = max |x| in fp32) with the scale
    amax / 127 (an all-zero row: 0 and 0), so x ~ q * scale."""
    n, hkv, d = k.shape
    _check(k.stride(1) == d and v.stride(1) == d and k.stride(2) == 1 and v.stride(2) == 1, "layout")
    _check(kc.is_contiguous() and vc.is_contiguous() and slots.dtype == torch.int64
           and slots.numel() == n and kc.dtype == vc.dtype, "cache or slots")
    kp, vp = _scales(kc, ks, vs)
    slots = slots.contiguous()
    rc = library().shoal_cache_write(_DT[k.dtype], k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
                                     n, hkv, d, slots.data_ptr(), _DTC[kc.dtype], kc.data_ptr(),
                                     vc.data_ptr(), kc.shape[1], kp, vp)
    _check(rc == 0, "cache_write: unsupported dtypes")


def decode_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, rows: torch.Tensor,
                     slots: torch.Tensor, offsets: torch.Tensor, window: int | None,
                     out: torch.Tensor, prechecked: bool = False, ks: torch.Tensor | None = None,
                     vs: torch.Tensor | None = None) -> None:
    """Decode rows attending over a paged cache, read in place (no gather).

    q (N, H, D) (row stride free), out (N, H, D) likewise; kc, vc (Hkv, S, D) one layer's cache;
    rows (B,) int64: the query rows; slots (sum of lengths,) int64, row i's keys in position
    order at slots[offsets[i]:offsets[i + 1]]; window: attend over the last `window` keys only.
    Semantics: out[r] = softmax(q[r] k^T / sqrt(D)) v per query head, kv head h // (H / Hkv),
    in fp32; the same bits for a row whatever the other rows are. An int8 cache (ks, vs its
    scales, see `cache_write`; head size 64 or 128, up to 8 query heads a kv head): the query in
    int16 with its own scale, q.k in exact int32 sums times the key's scale, p times the value's
    scale in int16 against the row's largest, p.v in exact int32 sums."""
    n, h, d = q.shape
    hkv = kc.shape[0]
    kp, vp = _scales(kc, ks, vs)
    _check(q.stride(2) == 1 and q.stride(1) == d and out.stride(2) == 1 and out.stride(1) == d, "layout")
    _check(kc.is_contiguous() and vc.is_contiguous() and out.dtype == q.dtype
           and offsets.numel() == rows.numel() + 1, "cache, rows or slots")
    if not prechecked:  # (the engine checks a step's rows and slots once, for all layers)
        _check(int(offsets[-1]) == slots.numel() and (rows.numel() == 0 or 0 <= int(rows.min())
               <= int(rows.max()) < n) and (slots.numel() == 0 or 0 <= int(slots.min())
               <= int(slots.max()) < kc.shape[1]), "cache, rows or slots")
    rc = library().shoal_decode_attention(
        _DT[q.dtype], q.data_ptr(), q.stride(0), rows.data_ptr(), rows.numel(), h, hkv, d,
        _DTC[kc.dtype], kc.data_ptr(), vc.data_ptr(), kc.shape[1], slots.data_ptr(),
        offsets.data_ptr(), int(window or 0), d ** -0.5, out.data_ptr(), out.stride(0), kp, vp)
    _check(rc == 0, "decode_attention: unsupported (an int8 cache needs head size 64 or 128, <= 8 heads a group)")


def table_slots(tables: list[list[int]], lengths: list[int], block_size: int,
                num_slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode rows' key slots from their block tables: row r's position p is in slot
    tables[r][p // block_size] * block_size + p % block_size. Returns slots (sum of lengths,),
    offsets (B + 1,) (row r's slots at slots[offsets[r]:offsets[r + 1]]) and each row's last slot
    (B,), all int64. Raises ValueError for a length < 1 or past its table, or a slot outside
    [0, num_slots). (Tensor ops for this took 0.16 ms for 32 rows of up to 640 tokens, 1.0 ms for
    256; this 0.03 and 0.20: docs/benchmarks.md.)"""
    flat, counts = array("q"), array("q")
    for t in tables:  # (array: ~10x cheaper than torch.tensor on nested lists)
        flat.extend(t)
        counts.append(len(t))
    b = len(tables)
    _check(len(lengths) == b, "table_slots: one length a table")
    lens = array("q", lengths)
    slots = torch.empty(sum(lengths), dtype=torch.int64)
    offsets = torch.empty(b + 1, dtype=torch.int64)
    last = torch.empty(b, dtype=torch.int64)
    rc = library().shoal_table_slots(flat.buffer_info()[0], counts.buffer_info()[0], lens.buffer_info()[0], b,
                                     block_size, num_slots,
                                     slots.data_ptr(), offsets.data_ptr(), last.data_ptr())
    if rc == 1:
        raise ValueError("decode rows: a context length < 1 or longer than its block table")
    if rc == 2:
        raise ValueError(f"slots: outside the cache's {num_slots} slots")
    return slots, offsets, last


def prefill_attention_ready(q: torch.Tensor, kc: torch.Tensor) -> bool:
    """Does `prefill_attention` serve these: bf16 queries, a bf16 or int8 cache, head size 64 or
    128, on a CPU with a body for it (AVX-512; `shoal_prefill_attention_isa`)."""
    lib = library()
    return (lib is not None and q.dtype == torch.bfloat16 and kc.dtype in (torch.bfloat16, torch.int8)
            and q.shape[-1] in (64, 128) and lib.shoal_prefill_attention_isa() > 0)


def prefill_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, q_start: torch.Tensor,
                      q_len: torch.Tensor, slots: torch.Tensor, offsets: torch.Tensor,
                      window: int | None, out: torch.Tensor, ks: torch.Tensor | None = None,
                      vs: torch.Tensor | None = None, prechecked: bool = False) -> None:
    """Prompt chunks attending causally over a paged cache (their own keys already written), all
    chunks of a step in one call.

    q, out (N, H, D) bf16 (row stride free), D = 64 or 128; kc, vc (Hkv, S, D) bf16 or int8, one
    layer's cache; chunk c has q_len[c] query rows from row q_start[c] and its L_c keys at
    slots[offsets[c]:offsets[c+1]] in position order, so its queries are positions
    L_c - q_len[c] .. L_c - 1 (all int64). `prechecked`: the caller ran `check_prefill_chunks`.
    Semantics: out[r] = softmax(q[r] k^T / sqrt(D)) v over the keys at positions <= the row's (and
    within `window`), query head j on kv head j // (H / Hkv); the products bf16 x bf16 in fp32,
    the probabilities rounded to bf16 for the product with v (as PyTorch's CPU flash kernel does),
    summed in key order. A row's bits depend on that row alone: not on the chunking or the other
    rows. An int8 cache (ks, vs its scales, see `cache_write`): its values widened to bf16
    (exact), each score times its key's scale, each rounded p times its value's scale (rounded to
    bf16 again). Callers check `prefill_attention_ready` first."""
    n, h, d = q.shape
    hkv = kc.shape[0]
    kp, vp = _scales(kc, ks, vs)
    _check(q.stride(2) == 1 and q.stride(1) == d and out.stride(2) == 1 and out.stride(1) == d
           and out.shape == q.shape and out.dtype == q.dtype and kc.dtype == vc.dtype and kc.is_contiguous()
           and vc.is_contiguous() and kc.shape == vc.shape, "prefill_attention: layout")
    if not prechecked:  # (the engine checks a step's chunks once, for all layers)
        check_prefill_chunks(n, kc.shape[1], q_start, q_len, slots, offsets)
    nc = q_start.numel()
    rc = library().shoal_prefill_attention(
        _DT[q.dtype], q.data_ptr(), q.stride(0), h, hkv, d, kc.data_ptr(), vc.data_ptr(), kc.shape[1],
        nc, q_start.data_ptr(), q_len.data_ptr(), slots.data_ptr(), offsets.data_ptr(),
        int(window or 0), d ** -0.5, out.data_ptr(), out.stride(0), _DTC[kc.dtype], kp, vp)
    _check(rc == 0, "prefill_attention: unsupported (see prefill_attention_ready)")


def check_prefill_chunks(n: int, num_slots: int, q_start: torch.Tensor, q_len: torch.Tensor,
                         slots: torch.Tensor, offsets: torch.Tensor) -> None:
    """`prefill_attention`'s chunk tensors fit N query rows and a cache of num_slots slots (the
    kernel reads raw memory: a real check, kept under `python -O`)."""
    nc = q_start.numel()
    for t in (q_start, q_len, slots, offsets):
        _check(t.dtype == torch.int64 and t.is_contiguous(), "prefill_attention: index tensors")
    _check(offsets.numel() == nc + 1 and q_len.numel() == nc, "prefill_attention: chunks or slots")
    lens = offsets[1:] - offsets[:-1]
    _check(int(offsets[0]) == 0 and int(offsets[-1]) == slots.numel() and bool((q_len >= 1).all())
           and bool((q_len <= lens).all()) and bool((q_start >= 0).all()) and bool((q_start + q_len <= n).all())
           and (slots.numel() == 0 or 0 <= int(slots.min()) <= int(slots.max()) < num_slots),
           "prefill_attention: chunks or slots")


def silu_mul(y: torch.Tensor) -> torch.Tensor:
    """y (..., 2M) = gate | up -> (..., M). Semantics: F.silu(gate) * up, each rounded to y's dtype."""
    yr = _rows(y)
    n, m = yr.shape[0], yr.shape[1] // 2
    out = torch.empty((n, m), dtype=y.dtype)
    library().shoal_silu_mul(_DT[y.dtype], yr.data_ptr(), yr.stride(0), n, m, out.data_ptr())
    return out.view(*y.shape[:-1], m)


_DTW = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}  # LoRA slot dtypes (int8: with row scales)


def lora_int8_ready() -> bool:
    """True when the LoRA kernel of this build takes int8 slots (an AVX-512 CPU)."""
    return _enabled and library() is not None and bool(library().shoal_lora_int8())


class BGMVLayers:
    """The fixed part of a `lora_bgmv` call for one set of layers: pointers to their slot
    buffers, made once and reused every step (building them per call cost ~100 us of Python,
    12 ms of a 32-adapter decode step). The buffers must stay where they are (LoRA slots are
    written in place)."""

    def __init__(self, as_: list[torch.Tensor], bs: list[torch.Tensor], scales: list[torch.Tensor],
                 ranks: list[torch.Tensor], a_scales: list[torch.Tensor] | None = None,
                 b_scales: list[torch.Tensor] | None = None) -> None:
        k = as_[0].shape[2]
        _check(len({a.stride(0) for a in as_}) == 1 and len({a.dtype for a in as_}) == 1, "layout")
        q8 = as_[0].dtype == torch.int8
        _check(q8 == (a_scales is not None and b_scales is not None), "int8 LoRA slots need their row scales")
        for i, (a, b, sc, r) in enumerate(zip(as_, bs, scales, ranks)):
            _check(a.dtype == b.dtype and a.dtype in _DTW and a.stride(2) == 1 and a.stride(1) == k,
                   "LoRA A/B layout")
            _check(b.stride(2) == 1 and b.stride(1) == b.shape[2], "layout")
            _check(sc.dtype == torch.float32 and sc.is_contiguous() and r.dtype == torch.int64
                   and r.is_contiguous(), "LoRA scales/ranks")
            if q8:  # a row's scale where its A or B row sits: (L, R) fp32, slot stride = rows a slot
                sa, sb = a_scales[i], b_scales[i]
                _check(sa.dtype == sb.dtype == torch.float32 and sa.stride(1) == sb.stride(1) == 1
                       and sa.stride(0) * k == a.stride(0) and sb.stride(0) * b.shape[2] == b.stride(0)
                       and sa.shape == a.shape[:2] and sb.shape == b.shape[:2], "int8 LoRA row scales")
        self.keep = (as_, bs, scales, ranks, a_scales, b_scales)
        self.table = torch.tensor([[a.data_ptr() for a in as_], [b.data_ptr() for b in bs],
                                   [b.stride(0) for b in bs], [sc.data_ptr() for sc in scales],
                                   [r.data_ptr() for r in ranks], [b.shape[2] for b in bs],
                                   [t.data_ptr() for t in a_scales] if q8 else [0] * len(as_),
                                   [t.data_ptr() for t in b_scales] if q8 else [0] * len(as_)],
                                  dtype=torch.int64)  # (8, n layers)
        self.ptrs = [row.data_ptr() for row in self.table]
        self.n, self.k, self.sa, self.dtw = len(as_), k, as_[0].stride(0), _DTW[as_[0].dtype]
        self.widths = [b.shape[2] for b in bs]
        self._arr = ctypes.c_int64 * self.n

    def __call__(self, x: torch.Tensor, slots: torch.Tensor, outs: list[torch.Tensor],
                 accumulate: bool) -> None:
        """See `lora_bgmv`; slots (N,) int64 contiguous."""
        n = x.shape[0]
        _check(x.stride(1) == 1 and x.shape[1] == self.k and slots.dtype == torch.int64
               and slots.is_contiguous() and slots.numel() == n, "LoRA input or slots")
        for o, w in zip(outs, self.widths):
            _check(o.dtype == x.dtype and o.stride(1) == 1 and o.shape == (n, w), "layout")
        out_ptr = self._arr(*[o.data_ptr() for o in outs])
        out_stride = self._arr(*[o.stride(0) for o in outs])
        a, b, bst, sc, rk, wd, asc, bsc = self.ptrs
        rc = library().shoal_lora_bgmv(_DT[x.dtype], self.dtw, x.data_ptr(), x.stride(0), n, self.k,
                                       slots.data_ptr(), self.sa, self.n, a, b, bst, sc, rk,
                                       ctypes.addressof(out_ptr), ctypes.addressof(out_stride), wd,
                                       int(accumulate), asc, bsc)
        _check(rc == 0, "lora_bgmv: int8 slots need an AVX-512 build")


def lora_bgmv(x: torch.Tensor, slots: torch.Tensor, as_: list[torch.Tensor], bs: list[torch.Tensor],
              scales: list[torch.Tensor], ranks: list[torch.Tensor], outs: list[torch.Tensor],
              accumulate: bool, a_scales: list[torch.Tensor] | None = None,
              b_scales: list[torch.Tensor] | None = None) -> None:
    """The LoRA deltas of n layers fed the same input, each token with its own slot (BGMV).

    x (N, K) (row stride free); slots (N,) int64, -1 = base (left alone); as_[i] (L, R, K)
    layer i's A slots, fp32, bf16 or int8 (rows contiguous; dim 0 may be a stride-0 expand, all
    with one stride); bs[i] (L, R, N_i) B transposed, the same dtype; scales[i] (L,); ranks[i]
    (L,): rows of the slot that hold weights (the rest are zero padding and skipped); outs[i]
    (N, N_i) in x's dtype (row stride free, e.g. column slices of one fused output). int8 slots:
    a_scales[i] (L, R) and b_scales[i] (L, R) fp32, one per row of A and of B (transposed), each
    laid out as its rows (slot stride = rows a slot).
    Semantics per token t, s = slots[t] >= 0, the fp32 product (bf16 weights widened exactly)
    rounded once to x's dtype:
        d_i = ((x[t] @ as_[i][s].T) * scales[i][s]) @ bs[i][s]
        int8: c = ((x[t] @ as_[i][s].T) * a_scales[i][s]) * scales[i][s] * b_scales[i][s]
              d_i = c @ bs[i][s]          (the int8 values widened exactly)
        outs[i][t] = d_i (accumulate False) or outs[i][t] + d_i (True, rounded again)
    Each token is computed alone, in a fixed order: its bits do not depend on the other rows.
    (The engine keeps a `BGMVLayers` per layer group instead of rebuilding it per call.)"""
    scales = [sc.to(torch.float32).contiguous() for sc in scales]
    ranks = [r.to(torch.int64).contiguous() for r in ranks]
    BGMVLayers(as_, bs, scales, ranks, a_scales, b_scales)(x, slots.to(torch.int64).contiguous(), outs,
                                                          accumulate)


def row_stats(x: torch.Tensor, with_lse: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x (B, V) float32/bfloat16 (rows contiguous) -> (argmax (B,) int64, max (B,) fp32,
    logsumexp (B,) fp32 or None). Semantics: torch.argmax (the first maximum; a NaN is the
    maximum), the row's max, and max + log(sum(exp(x - max))) in fp32 (exp to ~1e-7 relative,
    lanes summed in a fixed order; -inf for a row of -inf). Each row is computed alone."""
    b, v = x.shape
    _check(x.stride(1) == 1 and x.dtype in _DT, "row_stats: layout")
    arg = torch.empty(b, dtype=torch.int64)
    mx = torch.empty(b)
    lse = torch.empty(b) if with_lse else None
    library().shoal_row_stats(_DT[x.dtype], x.data_ptr(), x.stride(0), b, v, arg.data_ptr(), mx.data_ptr(),
                              lse.data_ptr() if lse is not None else None)
    return arg, mx, lse


def sample_rows(x: torch.Tensor, rows: torch.Tensor, temps: torch.Tensor, u: torch.Tensor,
                masked: list[list[int]] | None = None, top_k: list[int] | None = None,
                top_p: list[float] | None = None) -> torch.Tensor:
    """One token per listed row of x (B, V) float32/bfloat16 (rows contiguous), drawn from
    softmax(x[rows[i]] / temps[i]) by its inverse CDF at u[i]: rows (n,) int64, temps (n,) fp32
    > 0, u (n,) fp64 in [0, 1); per row (None: off) the ids `masked[i]` set to -inf,
    `top_k[i]` (1..V; V = off) and `top_p[i]` (in (0, 1]; 1 = off) -> (n,) int64.

    Semantics: l = x with the masked ids at -inf; w = exp((l - max l) / t), 0 below e^-87.
    Without top_k / top_p: the token is the first j where the running sum of w exceeds
    u * sum(w) (w summed in blocks of 256 in a fixed order, blocks in fp64). With them: keep the
    top_k largest w (ties: the lower index first), then in that order the tokens whose preceding
    mass is below top_p of the kept mass (the first always), and draw the same way from the
    kept ones in index order. A row with NaN gives its first NaN, with +inf its first +inf, of
    -inf only 0. Each row is computed alone."""
    b, v = x.shape
    n = rows.numel()
    _check(x.stride(1) == 1 and x.dtype in _DT, "sample_rows: layout")
    _check(rows.dtype == torch.int64 and temps.dtype == torch.float32 and u.dtype == torch.float64
           and temps.numel() == n and u.numel() == n and rows.is_contiguous() and temps.is_contiguous()
           and u.is_contiguous(), "sample_rows: arguments")
    _check(n == 0 or 0 <= int(rows.min()) and int(rows.max()) < b, "sample_rows: row index")
    masked = masked or [[]] * n
    _check(len(masked) == n and all(0 <= j < v for m in masked for j in m), "sample_rows: masked ids")
    off = torch.tensor([0] + [len(m) for m in masked], dtype=torch.int64).cumsum_(0)  # (n + 1,)
    ids = torch.tensor([j for m in masked for j in m] or [0], dtype=torch.int64)
    ks = torch.tensor([min(k, v) if k else v for k in top_k] if top_k else [v] * n, dtype=torch.int64)
    ps = torch.tensor(top_p or [1.0] * n, dtype=torch.float32)
    # (a top_p below fp32's range rounds to 0: the top token only, as any top_p that small)
    _check(ks.numel() == n and ps.numel() == n and bool((ps >= 0).all()), "sample_rows: top_k / top_p")
    tok = torch.empty(n, dtype=torch.int64)
    library().shoal_sample_rows(_DT[x.dtype], x.data_ptr(), x.stride(0), v, n, rows.data_ptr(),
                                temps.data_ptr(), u.data_ptr(), off.data_ptr(), ids.data_ptr(),
                                ks.data_ptr(), ps.data_ptr(), tok.data_ptr())
    return tok
