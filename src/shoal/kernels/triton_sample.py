"""A decode step's sampling in Triton kernels (CUDA): greedy rows' token, raw logprob and logsumexp
in one pass; sampled rows' inverse-CDF draw in three.

greedy_rows(logits, ignore, eos) -> (tokens, pair, lse)
  logits (B, V) fp32 / bf16 / fp16, last dim contiguous, rows strided freely
  ignore (B,) int32 (nonzero: the row's eos ids are masked for the argmax) or None; eos: the ids
  tokens (B,) int64   argmax of the row, eos ids masked where `ignore` (first index of the max,
                      as torch.argmax)
  pair   (2, B) fp64  [tokens, tokens' raw logprobs]: what `decode_ahead` copies to the host
  lse    (B,) fp32    logsumexp of the raw row (the mask does not touch it)
  One program a row, the row read once in BLOCK-wide tiles: a running max and sum of exp (the
  logsumexp, rescaled as the max grows) and a running masked max with its first index.

What it replaces (H200 profile, 256 rows x 49,152, 16 decode steps of the SmolLM2-135M shape):
logsumexp (amax, sub, exp, sum, log), an index_put_ of the eos mask, argmax, gather, sub, stack
and two casts, ~15 launches and ~0.2 ms of device time a step for what is one pass over 50 MB.
The kernel reads no host value (sizes from shapes) and launches once. Sums run in another order
than torch.logsumexp's, so logprobs agree to fp32 rounding; the tokens are the same.

draw_rows(x, meta) -> tokens
  x (*, V) fp32 / bf16 / fp16, last dim contiguous; meta (3, S) fp64: which rows draw, their
  temperatures (> 0), one uniform number a row in [0, 1) (from the row's own generator, drawn
  on the host)
  tokens (S,) int64: the first j with cumsum(w)[j] > u * sum(w), w = exp(x / T - max(x / T))
                     (fp32 weights, fp64 sums), else the last j of weight > 0
  `engine.device_draw.draw_rows`'s semantics without top_k / top_p (OpenAI's default top_p = 1): one program
  a row, three passes over it (max; sum and last nonzero weight; the scan to the crossing), no
  (S, V) temporaries. Replaces a gather, division, amax, exp, fp64 cast, cumsum and two
  searchsorted over (S, V) (~12 launches; fp64 copies of 256 x 128,256 logits are 263 MB).
  Sums run in another order than torch.cumsum's, so a draw within rounding of a boundary may
  pick the neighbour: the same kernel serves the synchronous sampler and the steps in flight.

Under the interpreter (TRITON_INTERPRET=1, CI on CPU) as `triton_elementwise`: tl.reduce and
tl.associative_scan with the standard combine functions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX = tl.standard._elementwise_max
_MIN = tl.standard._elementwise_min
_SUM = tl.standard._sum_combine
BLOCK = 2048
MAX_EOS = 8  # eos ids masked in-kernel (more: the caller masks itself)


@triton.jit
def _greedy_kernel(x_ptr, stride_x, ignore_ptr, eos_ptr, tok_ptr, pair_ptr, lse_ptr, B, V,
                   NUM_EOS: tl.constexpr, HAS_IGNORE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * stride_x
    masked = False
    if HAS_IGNORE:
        masked = tl.load(ignore_ptr + row) != 0
    m = -3.0e38  # running max (finite: exp(m - m_new) is never inf - inf)
    s = 0.0  # running sum of exp(x - m)
    best = float("-inf")  # running max of the masked row, and its first column
    best_i = 0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)  # (BLOCK,)
        m_new = tl.maximum(m, tl.reduce(x, 0, _MAX))
        s = s * tl.exp(m - m_new) + tl.reduce(tl.exp(x - m_new), 0, _SUM)
        m = m_new
        xm = x
        if HAS_IGNORE:
            hit = cols < 0
            for e in tl.static_range(NUM_EOS):
                hit = hit | (cols == tl.load(eos_ptr + e))
            xm = tl.where(hit & masked, float("-inf"), x)
        bb = tl.reduce(xm, 0, _MAX)
        bi = tl.reduce(tl.where(xm == bb, cols, 2147483647), 0, _MIN)  # its first column here
        take = bb > best  # (strict: an earlier tile keeps a tie)
        best_i = tl.where(take, bi, best_i)
        best = tl.maximum(best, bb)
    lse = m + tl.log(s)
    tl.store(tok_ptr + row, best_i.to(tl.int64))
    tl.store(pair_ptr + row, best_i.to(tl.float64))
    tl.store(pair_ptr + B + row, (best - lse).to(tl.float64))
    tl.store(lse_ptr + row, lse)


@triton.jit
def _draw_kernel(x_ptr, stride_x, meta_ptr, out_ptr, S, V, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    row = tl.load(meta_ptr + r).to(tl.int64)  # meta (3, S) fp64: rows, temperatures, uniforms
    t = tl.load(meta_ptr + S + r).to(tl.float32)
    u = tl.load(meta_ptr + 2 * S + r)
    base = x_ptr + row * stride_x
    m = -3.0e38  # 1) the row's max (of x / t: the same, t > 0)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m = tl.maximum(m, tl.reduce(x, 0, _MAX))
    mt = m / t
    total = tl.full((), 0.0, tl.float64)  # 2) the sum of weights, and the last column of weight > 0
    last = 0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        w = tl.exp(x / t - mt)  # (BLOCK,) fp32; 0 past V
        total += tl.reduce(w.to(tl.float64), 0, _SUM)
        last = tl.maximum(last, tl.reduce(tl.where(w > 0, cols, 0), 0, _MAX))
    target = u * total
    c = tl.full((), 0.0, tl.float64)  # 3) the first column whose running sum passes the target
    found = last * 0 + V  # (a tensor, as `last`)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        end = tl.where(found == V, V, 0)  # (nothing more to read once the crossing is found)
        x = tl.load(base + cols, mask=cols < end, other=float("-inf")).to(tl.float32)
        w = tl.exp(x / t - mt).to(tl.float64)
        run = c + tl.associative_scan(w, 0, _SUM)  # (BLOCK,) inclusive running sums
        found = tl.minimum(found, tl.reduce(tl.where((run > target) & (cols < V), cols, V), 0, _MIN))
        c += tl.reduce(w, 0, _SUM)
    tl.store(out_ptr + r, tl.where(found < V, tl.minimum(found, last), last).to(tl.int64))


def draw_rows(x: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """See the module's docstring. meta (3, S) fp64 on x's device: the rows, their temperatures
    (> 0) and uniform numbers (one host-to-device copy for all three). (S,) int64 tokens,
    queued (no host sync)."""
    if x.stride(-1) != 1:
        raise ValueError("x: the last dim must be contiguous")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x: fp32 / bf16 / fp16, got {x.dtype}")
    if meta.dim() != 2 or meta.shape[0] != 3 or meta.dtype != torch.float64 or not meta.is_contiguous():
        raise ValueError(f"meta: (3, S) contiguous fp64 (rows, temperatures, uniforms), got "
                         f"{tuple(meta.shape)} {meta.dtype}")
    S, V = meta.shape[1], x.shape[-1]
    out = torch.empty(S, dtype=torch.long, device=x.device)
    if S:
        _draw_kernel[(S,)](x, x.stride(0), meta, out, S, V, BLOCK=BLOCK, num_warps=8)
    return out


def greedy_rows(logits: torch.Tensor, ignore: torch.Tensor | None,
                eos: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See the module's docstring. `eos`: (E,) int32 on the logits' device, E <= MAX_EOS."""
    B, V = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("logits: the last dim must be contiguous")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"logits: fp32 / bf16 / fp16, got {logits.dtype}")
    has_ignore = ignore is not None and eos is not None and eos.numel() > 0
    if has_ignore and eos.numel() > MAX_EOS:
        raise ValueError(f"eos: at most {MAX_EOS} ids, got {eos.numel()}")
    dev = logits.device
    tokens = torch.empty(B, dtype=torch.long, device=dev)
    pair = torch.empty(2, B, dtype=torch.float64, device=dev)
    lse = torch.empty(B, dtype=torch.float32, device=dev)
    if B == 0:
        return tokens, pair, lse
    dummy = tokens  # (an unread pointer where there is no mask)
    _greedy_kernel[(B,)](logits, logits.stride(0), ignore if has_ignore else dummy,
                         eos if has_ignore else dummy, tokens, pair, lse, B, V,
                         NUM_EOS=eos.numel() if has_ignore else 0, HAS_IGNORE=has_ignore,
                         BLOCK=BLOCK, num_warps=8)
    return tokens, pair, lse
