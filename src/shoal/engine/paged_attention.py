"""Paged KV cache and the attention context the engine hands the model each step.

The cache is one tensor per K and V of shape (layers, Hkv, num_blocks * block_size, D): a slot
is `block * block_size + offset`. Heads lead the slots so that gathering a sequence's slots
(`head_rows`) yields its keys already in the (Hkv, S, D) order attention reads: per layer, that
gather is the only copy of the cache a step makes (no transpose copy after it). Each step packs
all scheduled tokens into one flat batch (N,); `PagedAttention.attend` writes the new
keys/values to their slots, then attends each sequence's queries over that sequence's own slots.
Attention runs per sequence with exact lengths, so a row's result never depends on what else is
in the batch (batch invariance). Decode rows (one query each) are batched by context-length
bucket: each is padded to its own bucket (a multiple of DECODE_BUCKET), never to the batch's
longest, so its arithmetic is the same alone or in company.
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
        shape = (num_layers, num_kv_heads, num_blocks * block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks src -> dst in every layer and kv head."""
        if not copies:
            return
        bs = self.block_size
        ar = torch.arange(bs, device=self.k.device)
        src = torch.cat([s * bs + ar for s, _ in copies])  # (C * block_size,) slots
        dst = torch.cat([d * bs + ar for _, d in copies])
        for t in (self.k, self.v):  # (layers, Hkv, slots, D): slots are dim 2
            t.index_copy_(2, dst, t.index_select(2, src))


@dataclass
class DecodeBucket:
    """Decode rows whose context lengths round up to the same bucket length Sb."""

    rows: torch.Tensor  # (Bb,) their rows in the flat batch
    slots: torch.Tensor  # (Bb * Sb,) context slots, padded with slot 0
    bias: torch.Tensor  # (Bb, 1, Sb) fp32: 0 for real keys, -inf for padding / outside window
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
        bias = torch.full((len(members), 1, sb), float("-inf"), device=device)
        for i, (_, slots) in enumerate(members):
            n = slots.numel()
            padded[i, :n] = slots
            lo = 0 if window is None else max(0, n - window)
            bias[i, 0, lo:n] = 0.0
        rows = torch.tensor([r for r, _ in members], device=device)
        out.append(DecodeBucket(rows, padded.flatten(), bias, sb))
    return out


def head_rows(slots: torch.Tensor, num_kv_heads: int, num_slots: int) -> torch.Tensor:
    """(S,) slots -> (Hkv * S,) rows of one layer's cache viewed as (Hkv * num_slots, D), head
    major: gathering them gives that head-by-head (Hkv, S, D) block of keys in one copy."""
    heads = torch.arange(num_kv_heads, device=slots.device)[:, None] * num_slots  # (Hkv, 1)
    return (heads + slots).flatten()


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
        # gather indices into the cache viewed as (Hkv * slots, D), built once per step for all
        # layers: a dim-0 index_select copies whole rows and runs on all threads (measured 2x
        # faster than index_select along dim 1 at 2 threads)
        n_slots = cache.k.shape[2]
        self._seq_rows = [head_rows(s.ctx_slots, num_kv_heads, n_slots) for s in self.seqs]
        self._decode_rows = [head_rows(b.slots, num_kv_heads, n_slots) for b in self.decode]

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
        kc, vc = self.cache.k[layer_idx], self.cache.v[layer_idx]  # (Hkv, slots, D)
        # 1) store this step's keys/values in their slots (rounded once to the cache's dtype)
        kc.index_copy_(1, self.slot_mapping, k.transpose(0, 1).to(kc.dtype))
        vc.index_copy_(1, self.slot_mapping, v.transpose(0, 1).to(vc.dtype))
        out = torch.empty_like(q)
        hkv, d = k.shape[1], k.shape[2]
        g = self.group
        kf, vf = kc.view(-1, d), vc.view(-1, d)  # (Hkv * slots, D)
        # 2) each sequence attends over its own slots
        for s, rows in zip(self.seqs, self._seq_rows):
            qs = q[s.q_start:s.q_start + s.q_len]  # (T, H, D)
            keys = kf.index_select(0, rows).view(hkv, -1, d).to(q.dtype)  # (Hkv, S, D)
            vals = vf.index_select(0, rows).view(hkv, -1, d).to(q.dtype)
            # fold each kv head's query group into the query axis: (Hkv, T*g, D)
            qf = qs.view(s.q_len, hkv, g, d).permute(1, 0, 2, 3).reshape(hkv, s.q_len * g, d)
            o = F.scaled_dot_product_attention(qf, keys, vals, attn_mask=s.causal_mask)
            out[s.q_start:s.q_start + s.q_len] = o.view(hkv, s.q_len, g, d).permute(1, 0, 2, 3).reshape(
                s.q_len, hkv * g, d)
        # 3) decode rows, one batched computation per bucket
        for b, rows in zip(self.decode, self._decode_rows):
            self._attend_bucket(b, rows, q, kf, vf, out)
        return out

    def _attend_bucket(self, b: DecodeBucket, rows: torch.Tensor, q: torch.Tensor, kf: torch.Tensor,
                       vf: torch.Tensor, out: torch.Tensor) -> None:
        """One decode bucket: out[b.rows] = softmax(q k^T / sqrt(D) + bias) v, in fp32 (bf16 on
        CPU: SDPA on the bf16 cache, fp32 accumulation).

        rows (Hkv*Bb*Sb,) = head_rows(b.slots); q, out (N, H, D); kf, vf (Hkv*slots, D) this
        layer's cache. Batch index i = h * Bb + r (kv head h, bucket row r).
        """
        bb, sb = b.rows.numel(), b.length
        d = kf.shape[1]
        g = self.group
        hkv = out.shape[1] // g
        if q.dtype == kf.dtype == torch.bfloat16 and q.device.type == "cpu":
            # bf16: SDPA reads the gathered bf16 keys as they are (fp32 accumulation inside),
            # no fp32 copies. Per layer, Bb = 32, Sb = 192: 652 -> 458 us (1 row: 45 -> 34);
            # a row's bits measured the same for any Bb (torch 2.13, AVX-512, 2 threads)
            keys = kf.index_select(0, rows).view(hkv, bb, sb, d).transpose(0, 1)  # (Bb, Hkv, Sb, D)
            vals = vf.index_select(0, rows).view(hkv, bb, sb, d).transpose(0, 1)
            qb = q.index_select(0, b.rows).view(bb, hkv, g, d)  # (Bb, Hkv, g, D)
            mask = b.bias.view(bb, 1, 1, sb).to(q.dtype)  # 0 / -inf, broadcast over heads
            o = F.scaled_dot_product_attention(qb, keys, vals, attn_mask=mask)  # (Bb, Hkv, g, D)
            out.view(out.shape[0], hkv, g, d).index_copy_(0, b.rows, o)
            return
        # the gather is the only copy of the cache: (Hkv*Bb*Sb, D) is already (Hkv*Bb, Sb, D).
        # fp32 math (small bf16 bmm is slow); the cast is a no-op for an fp32 cache
        keys = kf.index_select(0, rows).view(hkv * bb, sb, d).float()
        vals = vf.index_select(0, rows).view(hkv * bb, sb, d).float()
        # queries (Bb, Hkv, g, D) -> (Hkv, Bb, g, D), contiguous fp32, in one small copy
        qb = q.new_empty((hkv, bb, g, d), dtype=torch.float32)
        qb.copy_(q.index_select(0, b.rows).view(bb, hkv, g, d).transpose(0, 1))
        qb = qb.view(hkv * bb, g, d)
        # contiguous 3-D operands (and the same transposed view of keys) pin one bmm path
        # whatever Bb is (4-D strided matmuls fold differently for Bb = 1 and Bb > 1, which
        # broke batch invariance)
        scores = torch.bmm(qb, keys.transpose(1, 2)).mul_(d ** -0.5)  # (Hkv*Bb, g, Sb)
        scores.view(hkv, bb, g, sb).add_(b.bias)  # bias (Bb, 1, Sb) broadcast over heads
        o = torch.bmm(scores.softmax(-1), vals)  # (Hkv*Bb, g, D)
        # back to (Bb, Hkv, g, D) rows; index_copy_ reads the strided view, no extra copy in fp32
        o = o.view(hkv, bb, g, d).transpose(0, 1).to(out.dtype)
        out.view(out.shape[0], hkv, g, d).index_copy_(0, b.rows, o)

    def advance(self, n: int) -> None:
        pass
