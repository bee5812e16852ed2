"""Attention contexts for the reference path: full causal attention and a dense KV cache.

A context implements `attend(layer_idx, q, k, v) -> o` for one layer and `advance(n)` once per
forward. The model never sees how keys are stored: the engine supplies a paged context with the
same two methods. These two are deliberately simple (one contiguous cache, every row at the same
length) because they are the correctness reference the engine is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
          causal: bool) -> torch.Tensor:
    """q (B, T, H, D), k/v (B, S, Hkv, D), mask (T, S) bool (True = attend) -> (B, T, H, D)."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    if k.shape[1] != q.shape[1]:  # grouped-query attention: repeat each kv head for its group
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
    return o.transpose(1, 2)


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """(T,) query positions, (S,) key positions -> (T, S) bool: key visible to query."""
    diff = q_pos[:, None] - k_pos[None, :]
    allowed = diff >= 0
    if window is not None:
        allowed &= diff < window
    return allowed


class CausalAttention:
    """No cache: each forward attends causally within its own (B, T) input. Used for training
    and for the no-cache reference."""

    def __init__(self, sliding_window: int | None = None) -> None:
        self.window = sliding_window

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.window is None:
            return _sdpa(q, k, v, None, causal=True)
        pos = torch.arange(q.shape[1], device=q.device)
        return _sdpa(q, k, v, causal_mask(pos, pos, self.window), causal=False)

    def advance(self, n: int) -> None:
        pass


class DenseKVCache:
    """A contiguous per-layer KV cache for B rows that all have the same length.

    Semantics: after forwards over chunks c1, c2, ... of a sequence, attention at every position
    equals CausalAttention over the concatenation c1 + c2 + ...
    """

    def __init__(self, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu",
                 sliding_window: int | None = None) -> None:
        shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0  # tokens already cached (same for every row)
        self.window = sliding_window

    @classmethod
    def for_model(cls, model, batch: int, max_len: int) -> "DenseKVCache":
        c = model.config
        p = next(model.parameters())
        return cls(c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim, p.dtype, p.device,
                   c.sliding_window)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q (B, T, H, D); k, v (B, T, Hkv, D): write at [length, length+T), attend over [0, length+T)
        t = q.shape[1]
        start, end = self.length, self.length + t
        if end > self.max_len:
            raise ValueError(f"DenseKVCache: {end} tokens exceed max_len {self.max_len}")
        self.k[layer_idx, :, start:end] = k
        self.v[layer_idx, :, start:end] = v
        keys, values = self.k[layer_idx, :, :end], self.v[layer_idx, :, :end]
        if start == 0 and self.window is None:
            return _sdpa(q, keys, values, None, causal=True)
        q_pos = torch.arange(start, end, device=q.device)
        k_pos = torch.arange(0, end, device=q.device)
        return _sdpa(q, keys, values, causal_mask(q_pos, k_pos, self.window), causal=False)

    def advance(self, n: int) -> None:
        self.length += n
