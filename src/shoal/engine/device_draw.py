"""Sampled rows drawn on the logits' device without a host sync: the inverse CDF of each row's
tempered distribution (cut to its top_k / top_p) at the row's own uniform number.

Shared by the synchronous sampler (`Sampler._draw`, where the CPU kernels do not run) and the
steps in flight (`decode_ahead.launch_sample`), so both give the same tokens. On CUDA the rows
without a cut may take `kernels.triton_sample.draw_rows`; the others, and everything elsewhere,
run in PyTorch ops with (S, V) temporaries.
"""

from __future__ import annotations

import torch

from .device_copy import to_device

_NEG_INF = float("-inf")


def draw_rows(src: torch.Tensor, rows: list[int], temps: list[float], us: list[float], top_k: list[int],
              top_p: list[float], triton: bool = True) -> torch.Tensor:
    """The listed rows of src (*, V) drawn on its device (no host sync): (S,) token ids, each row
    tempered, cut to its top_k / top_p, then its inverse CDF at u. On CUDA the rows without a
    cut (OpenAI's default top_p = 1) in one Triton kernel (`kernels.triton_sample.draw_rows`,
    the same semantics), the others in PyTorch ops (all with `triton` off)."""
    dev, V = src.device, src.shape[1]
    fused = triton_sampling(src) if triton else None
    plain = [j for j, (k, p) in enumerate(zip(top_k, top_p)) if k >= V and p >= 1.0] if fused else []
    if not plain:
        return _draw_in_ops(src, rows, temps, us, top_k, top_p)
    # meta (3, P) fp64: the plain rows, their temperatures, their uniform numbers (one copy)
    meta = to_device([float(rows[j]) for j in plain] + [temps[j] for j in plain] + [us[j] for j in plain],
                     dev, torch.float64).view(3, len(plain))
    got = fused.draw_rows(src, meta)  # (P,)
    if len(plain) == len(rows):
        return got
    keep = set(plain)
    cut = [j for j in range(len(rows)) if j not in keep]
    out = torch.empty(len(rows), dtype=torch.long, device=dev)
    at = to_device(plain + cut, dev, torch.long)  # (S,): where each result goes
    out[at[:len(plain)]] = got
    out[at[len(plain):]] = _draw_in_ops(src, [rows[j] for j in cut], [temps[j] for j in cut],
                                        [us[j] for j in cut], [top_k[j] for j in cut], [top_p[j] for j in cut])
    return out


def _draw_in_ops(src: torch.Tensor, rows: list[int], temps: list[float], us: list[float], top_k: list[int],
                 top_p: list[float]) -> torch.Tensor:
    """`draw_rows` in PyTorch ops: (S, V) temporaries."""
    dev = src.device
    x = src[to_device(rows, dev)].float() / to_device(temps, dev)[:, None]
    if any(k < x.shape[1] for k in top_k) or any(p < 1.0 for p in top_p):
        x = _top_k_top_p(x, top_k, top_p)
    return _inverse_cdf(x, to_device(us, dev, torch.float64))


def triton_sampling(x: torch.Tensor):
    """`kernels.triton_sample` where it serves the logits x (CUDA, last dim contiguous, Triton
    importable), else None."""
    if x.device.type != "cuda" or x.stride(-1) != 1:
        return None
    try:
        from ..kernels import triton_sample
    except ImportError:  # (a CUDA build of PyTorch without Triton)
        return None
    return triton_sample


def _inverse_cdf(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """x (S, V) tempered logits, u (S,) fp64 in [0, 1) -> (S,) the first j where
    cumsum(exp(x - max x))[j] > u * sum; the last token of weight > 0 if rounding leaves none."""
    w = (x - x.amax(dim=-1, keepdim=True)).exp()  # (S, V); 0 where x = -inf
    cdf = w.double().cumsum(dim=-1)  # (S, V), each row's sum in index order
    total = cdf[:, -1:].contiguous()  # (S, 1)
    tok = torch.searchsorted(cdf, u[:, None] * total, right=True)  # (S, 1)
    last = torch.searchsorted(cdf, total, right=False)  # the first index reaching the sum
    return torch.minimum(tok, last).squeeze(1).clamp_(max=x.shape[1] - 1)


def _top_k_top_p(l: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """`l` (S, V) with everything outside each row's top_k, then its nucleus, set to -inf.

    top_k[r] is in 1..V (V = off); top_p[r] in (0, 1] (1 = off).
    """
    S, V = l.shape
    dev = l.device
    sl, idx = l.sort(dim=-1, descending=True, stable=True)  # (S, V)
    rank = torch.arange(V, device=dev)
    k = to_device(top_k, dev)
    sl = sl.masked_fill(rank[None, :] >= k[:, None], _NEG_INF)
    p = to_device(top_p, dev)
    if any(v < 1.0 for v in top_p):  # (on the host: `(p < 1).any()` would wait for the device)
        probs = torch.softmax(sl, dim=-1)  # (S, V), descending
        before = probs.cumsum(dim=-1) - probs  # mass of the strictly better tokens
        drop = (before >= p[:, None]) & (p[:, None] < 1.0)
        drop[:, 0] = False
        sl = sl.masked_fill(drop, _NEG_INF)
    return torch.full_like(l, _NEG_INF).scatter_(1, idx, sl)
