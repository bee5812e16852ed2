"""Paged KV cache and the attention context the engine hands the model each step.

The cache is one tensor per K and V of shape (layers, num_blocks * block_size, Hkv, D): a slot
is `block * block_size + offset`. Each step packs all scheduled tokens into one flat batch (N,);
`PagedAttention.attend` writes the new keys/values to their slots, then attends each sequence's
queries over that sequence's own slots. Attention runs per sequence with exact lengths, so a
row's result never depends on what else is in the batch (batch invariance). Decode rows (one
query each) are batched by context-length bucket: each is padded to its own bucket (a multiple of
DECODE_BUCKET), never to the batch's longest, so its arithmetic is the same alone or in company.
Grouped-query heads fold the group into the query axis: no K/V is repeated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


DECODE_BUCKET = 64


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
class DecodeBucket:
    """Decode rows whose context lengths round up to the same bucket length Sb."""

    rows: torch.Tensor  # (Bb,) their rows in the flat batch
    slots: torch.Tensor  # (Bb * Sb,) context slots, padded with slot 0
    bias: torch.Tensor  # (Bb, 1, 1, Sb) fp32: 0 for real keys, -inf for padding / outside window
    length: int  # Sb


def build_decode_buckets(items: list[tuple[int, torch.Tensor]], window: int | None,
                         device) -> list[DecodeBucket]:
    """items: (row, ctx_slots) of every decode row -> one DecodeBucket per bucket length."""
    groups: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for row, slots in items:
        sb = -(-slots.numel() // DECODE_BUCKET) * DECODE_BUCKET
        groups.setdefault(sb, []).append((row, slots))
    out = []
    for sb, members in sorted(groups.items()):
        padded = torch.zeros(len(members), sb, dtype=torch.long, device=device)
        bias = torch.full((len(members), 1, 1, sb), float("-inf"), device=device)
        for i, (_, slots) in enumerate(members):
            n = slots.numel()
            padded[i, :n] = slots
            lo = 0 if window is None else max(0, n - window)
            bias[i, 0, 0, lo:n] = 0.0
        rows = torch.tensor([r for r, _ in members], device=device)
        out.append(DecodeBucket(rows, padded.flatten(), bias, sb))
    return out


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
                 num_heads: int, num_kv_heads: int,
                 decode: list[DecodeBucket] | None = None) -> None:
        self.cache = cache
        self.slot_mapping = slot_mapping  # (N,) where each new token's K/V goes
        self.seqs = seqs  # prefill chunks (and decodes, when not bucketed)
        self.decode = decode or []
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
        # 3) decode rows, one batched computation per bucket, in fp32 (small bf16 bmm is slow)
        for b in self.decode:
            bb, sb = b.rows.numel(), b.length
            # contiguous 3-D operands pin one bmm path whatever Bb is (4-D strided matmuls fold
            # differently for Bb = 1 and Bb > 1, which broke batch invariance)
            keys = kc.index_select(0, b.slots).view(bb, sb, hkv, d).transpose(1, 2).reshape(
                bb * hkv, sb, d).float()  # (Bb*Hkv, Sb, D)
            vals = vc.index_select(0, b.slots).view(bb, sb, hkv, d).transpose(1, 2).reshape(
                bb * hkv, sb, d).float()
            qb = q.index_select(0, b.rows).reshape(bb * hkv, g, d).float()  # (Bb*Hkv, g, D)
            scores = torch.bmm(qb, keys.transpose(1, 2)).mul_(d ** -0.5)  # (Bb*Hkv, g, Sb)
            scores = scores.view(bb, hkv, g, sb).add_(b.bias).view(bb * hkv, g, sb)
            o = torch.bmm(scores.softmax(-1), vals)  # (Bb*Hkv, g, D)
            out.index_copy_(0, b.rows, o.view(bb, hkv * g, d).to(out.dtype))
        return out

    def advance(self, n: int) -> None:
        pass
