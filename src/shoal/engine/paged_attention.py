"""Paged KV cache and the attention context the engine hands the model each step.

The cache is one tensor per K and V of shape (layers, num_blocks * block_size, Hkv, D): a slot
is `block * block_size + offset`. Each step packs all scheduled tokens into one flat batch (N,);
`PagedAttention.attend` writes the new keys/values to their slots, then attends each sequence's
queries over that sequence's own slots. Attention runs per sequence with exact lengths, so a
row's result never depends on what else is in the batch (batch invariance). Grouped-query heads
are handled by folding the group into the query axis: no K/V is repeated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


class PagedKVCache:
    """K and V slot arrays for every layer."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: str | torch.device = "cpu") -> None:
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks src -> dst in every layer."""
        if not copies:
            return
        bs = self.block_size
        ar = torch.arange(bs, device=self.k.device)
        src = torch.cat([s * bs + ar for s, _ in copies])
        dst = torch.cat([d * bs + ar for _, d in copies])
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]


@dataclass
class SeqAttention:
    """One sequence's share of the packed batch."""

    q_start: int  # first of its query rows in the flat batch
    q_len: int  # query tokens this step
    ctx_slots: torch.Tensor  # (ctx_len,) slots of all its keys, in position order
    causal_mask: torch.Tensor | None  # (q_len * group, ctx_len) bool, None when all keys are visible


class PagedAttention:
    """Attention context for one engine step (see module docstring)."""

    def __init__(self, cache: PagedKVCache, slot_mapping: torch.Tensor, seqs: list[SeqAttention],
                 num_heads: int, num_kv_heads: int) -> None:
        self.cache = cache
        self.slot_mapping = slot_mapping  # (N,) where each new token's K/V goes
        self.seqs = seqs
        self.group = num_heads // num_kv_heads

    @staticmethod
    def build_mask(q_len: int, ctx_len: int, group: int, window: int | None,
                   device) -> torch.Tensor | None:
        """Causal mask for queries at positions ctx_len-q_len .. ctx_len-1, rows repeated per
        query head of a kv group (the folded layout). None when every key is visible."""
        if q_len == 1 and (window is None or ctx_len <= window):
            return None
        q_pos = torch.arange(ctx_len - q_len, ctx_len, device=device).repeat_interleave(group)
        k_pos = torch.arange(ctx_len, device=device)
        diff = q_pos[:, None] - k_pos[None, :]
        allowed = diff >= 0
        if window is not None:
            allowed &= diff < window
        return allowed

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q (N, H, D); k, v (N, Hkv, D)
        kc, vc = self.cache.k[layer_idx], self.cache.v[layer_idx]  # (slots, Hkv, D)
        # 1) store this step's keys/values in their slots
        kc.index_copy_(0, self.slot_mapping, k)
        vc.index_copy_(0, self.slot_mapping, v)
        out = torch.empty_like(q)
        hkv, d = k.shape[1], k.shape[2]
        g = self.group
        # 2) each sequence attends over its own slots
        for s in self.seqs:
            qs = q[s.q_start:s.q_start + s.q_len]  # (T, H, D)
            keys = kc.index_select(0, s.ctx_slots).transpose(0, 1)  # (Hkv, S, D)
            vals = vc.index_select(0, s.ctx_slots).transpose(0, 1)
            # fold each kv head's query group into the query axis: (Hkv, T*g, D)
            qf = qs.view(s.q_len, hkv, g, d).permute(1, 0, 2, 3).reshape(hkv, s.q_len * g, d)
            o = F.scaled_dot_product_attention(qf, keys, vals, attn_mask=s.causal_mask)
            out[s.q_start:s.q_start + s.q_len] = o.view(hkv, s.q_len, g, d).permute(1, 0, 2, 3).reshape(
                s.q_len, hkv * g, d)
        return out

    def advance(self, n: int) -> None:
        pass
