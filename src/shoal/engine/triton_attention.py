"""Attention context for a step on a GPU: Triton kernels that read the paged cache in place.

The gather path (`PagedAttention` on CUDA) copies every decode row's keys and values into a
padded (rows, context bucket) tensor per layer and runs one SDPA call over it, and runs each
prefill chunk as its own gather + SDPA (~7 launches per chunk per layer). Measured on an H200
(SmolLM2-135M shape, 256 requests, bf16): a decode step's device time 6.9 ms, a step with 256
prompt chunks 1.6 s (docs/benchmarks.md). Here a layer is one cache write per tensor and at most
two launches: every decode row in one kernel (`kernels.triton_decode`: block tables and
lengths), every prefill chunk in one (`kernels.triton_prefill`: causal, chunks that start
mid-sequence read their cached prefix). With the fused Triton elementwise kernels the cache
writes go into the RoPE kernel (`store_rotated`: one launch for RoPE, k and v, not three).

Step inputs (built once per step, on the device; all layers share them):
  slot_mapping (N,)           the cache slot of each new token's key/value
  decode rows  [0, nd)        decode_tables (nd, max blocks), decode_lengths (nd,) context lengths
  prefill chunks              tables (C, max blocks), q_starts, q_lens, ctx_lens (C,), tiles (T, 2)
Decode rows come first in the step's rows (`ModelRunner` orders them so).
"""

from __future__ import annotations

import functools
from array import array

import torch

from .device_copy import move, to_device


@functools.cache
def available() -> bool:
    """Is Triton importable (it ships with PyTorch's CUDA builds)?"""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


MAX_HEAD_DIM = 256  # both kernels' limit (`triton_decode.MAX_HEAD_DIM`, `triton_prefill`'s check)


def supports(head_dim: int) -> bool:
    """Can the kernels take this head size? (Else the engine keeps the gather path.)"""
    return 1 <= head_dim <= MAX_HEAD_DIM


SHORT_CHUNK_BLOCKS = 8  # chunks over at most this many blocks: their slots in the shared array


def chunk_slots(lead: list[int], chunks: list[tuple[list[int], int, int]], block_size: int) -> torch.Tensor:
    """(len(lead) + sum of chunk lengths,) int64 on the CPU: `lead` (the decode rows' new slots),
    then for each (block table, start, end) the cache slots of positions start..end-1 (position p
    at table[p // bs] * bs + p % bs). Short chunks go into one int64 array a block run at a time,
    long ones as a tensor each (2-core EPYC: 256 one-token chunks 2.9 ms as a tensor each, 0.12
    ms so; 28 chunks of 64-512 tokens 0.40 ms as tensors, 0.48 in the array)."""
    bs, parts, flat = block_size, [], array("q", lead)
    for table, start, end in chunks:
        b0, b1 = start // bs, -(-end // bs)
        if b1 - b0 > SHORT_CHUNK_BLOCKS:  # (a long prompt chunk: a few tensor ops, not a loop)
            if flat:
                parts.append(torch.frombuffer(flat, dtype=torch.long))
                flat = array("q")
            blocks = torch.tensor(table[b0:b1], dtype=torch.long)
            parts.append((blocks[:, None] * bs + torch.arange(bs)).flatten()[start - b0 * bs:end - b0 * bs])
            continue
        p = start
        while p < end:  # one run of positions per block
            b, off = divmod(p, bs)
            n = min(bs - off, end - p)
            first = table[b] * bs + off
            flat.extend(range(first, first + n))
            p += n
    if flat or not parts:
        parts.append(torch.frombuffer(flat, dtype=torch.long) if flat else torch.zeros(0, dtype=torch.long))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def pad_tables(tables: list[list[int]], device) -> torch.Tensor:
    """(R, longest table) int32 block tables, zero padded (a kernel never reads past a row's length)."""
    w = max((len(t) for t in tables), default=1) or 1
    flat = [0] * (len(tables) * w)
    for i, t in enumerate(tables):
        flat[i * w:i * w + len(t)] = t
    return move(torch.tensor(flat, dtype=torch.int32).view(len(tables), w), torch.device(device))


class TritonAttention:
    """Attention context for one step: `attend(layer, q, k, v)` as `PagedAttention.attend`."""

    def __init__(self, cache, slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int,
                 window: int | None, decode: tuple | None = None, prefill: tuple | None = None) -> None:
        """decode: (decode_tables, decode_lengths) or None; prefill: (tables, q_starts, q_lens,
        ctx_lens, tiles) or None; all on the cache's device."""
        from ..kernels import triton_decode, triton_prefill

        self._decode_kernel = triton_decode.paged_decode_attention
        self._prefill_kernel = triton_prefill.paged_prefill_attention
        self.cache = cache
        self.slot_mapping = slot_mapping
        self.num_heads, self.num_kv_heads, self.window = num_heads, num_kv_heads, window
        self.decode = decode
        self.prefill = prefill
        self.num_decode = decode[0].shape[0] if decode is not None else 0
        self._stored = -1  # the layer whose K/V `store_rotated` wrote (its `attend` writes none)

    @classmethod
    def build(cls, cache, slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int, window: int | None,
              decode_tables: list[list[int]], decode_lengths: list[int],
              chunks: list[tuple[list[int], int, int, int]]) -> "TritonAttention":
        """From host lists: each decode row's block table and context length; each prefill
        chunk's (block table, first query row, query count, context length)."""
        from ..kernels.triton_prefill import prefill_tiles

        dev = cache.k.device
        decode = prefill = None
        if decode_tables:
            lengths = to_device(decode_lengths, dev, torch.int32)
            decode = (pad_tables(decode_tables, dev), lengths)
        if chunks:
            meta = move(torch.tensor([[c[1], c[2], c[3]] for c in chunks], dtype=torch.int32).t().contiguous(), dev)
            prefill = (pad_tables([c[0] for c in chunks], dev), meta[0], meta[1], meta[2],
                       move(prefill_tiles([c[2] for c in chunks]), dev))
        return cls(cache, slot_mapping, num_heads, num_kv_heads, window, decode, prefill)

    def store_rotated(self, layer_idx: int, rows: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      num_heads: int, kernels) -> bool:
        """RoPE on a fused projection's q | k heads (rows (N, H + 2 Hkv, D), in place) and the
        layer's cache writes of k and v, as one kernel (`kernels.rope_store_`); False (nothing
        done) when the cache's dtype is not the rows' (an int8 cache)."""
        kc, vc = self.cache.k[layer_idx], self.cache.v[layer_idx]  # (Hkv, slots, D)
        if kc.dtype != rows.dtype or rows.shape[0] != self.slot_mapping.shape[0]:
            return False
        kernels.rope_store_(rows, cos, sin, num_heads, self.slot_mapping, kc, vc)
        self._stored = layer_idx
        return True

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q (N, H, D); k, v (N, Hkv, D): possibly strided views of the fused projection
        kc, vc = self.cache.k[layer_idx], self.cache.v[layer_idx]  # (Hkv, slots, D)
        if self._stored != layer_idx:  # 1) this step's K/V (unless `store_rotated` wrote them)
            kc.index_copy_(1, self.slot_mapping, k.transpose(0, 1).to(kc.dtype))
            vc.index_copy_(1, self.slot_mapping, v.transpose(0, 1).to(vc.dtype))
        self._stored = -1
        out = q.new_empty(q.shape)  # (N, H, D)
        bs, nd = self.cache.block_size, self.num_decode
        if nd:  # 2) decode rows [0, nd): one launch
            self._decode_kernel(q[:nd], kc, vc, *self.decode, bs, self.window, out[:nd])
        if self.prefill is not None:  # 3) every prefill chunk: one launch
            tables, q_starts, q_lens, ctx_lens, tiles = self.prefill
            self._prefill_kernel(q, kc, vc, tables, q_starts, q_lens, ctx_lens, tiles, bs, self.window, out)
        return out

    def advance(self, n: int) -> None:
        pass
