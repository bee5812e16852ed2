"""Paged KV cache and the attention context the engine hands the model each step.

The cache is one tensor per K and V of shape (layers, Hkv, num_blocks * block_size, D): a slot
is `block * block_size + offset`. Heads lead the slots so that gathering a sequence's slots
(`head_rows`) yields its keys already in the (Hkv, S, D) order attention reads: per layer, that
gather is the only copy of the cache a step makes (no transpose copy after it). Each step packs
all scheduled tokens into one flat batch (N,); `PagedAttention.attend` writes the new
keys/values to their slots, then attends each sequence's queries over that sequence's own slots.
Every product's shape is fixed by the row itself, never by what else is in the batch (batch
invariance): a prefill chunk attends per sequence, in blocks of PREFILL_BLOCK query positions
aligned to position 0 (so chunking does not change a row either); decode rows (one query each)
are batched by context-length bucket, each padded to its own bucket (a multiple of
DECODE_BUCKET), never to the batch's longest, so its arithmetic is the same alone or in company.
On CPU with the fused kernels (`shoal.kernels`), decode rows instead go to one kernel call per
layer that reads each row's slots in place (`DecodeRows`; no buckets, padding or gathers), the
cache write is one call, and with bf16 and head size 64 or 128 all prefill chunks
of the step go to one `kernels.prefill_attention` call a layer (each row computed alone, so
invariant to chunking too; 4.1x the blocked SDPA path at 512 tokens: bench/prefill_attention.py).
Grouped-query heads fold the group into the query axis: no K/V is repeated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import kernels


DECODE_BUCKET = 64
PREFILL_BLOCK = 64  # query positions per prefill attention block (see `_attend_chunk`)


def _pad_to_block(slots: torch.Tensor) -> torch.Tensor:
    """(n,) slots -> (n rounded up to PREFILL_BLOCK,), padded with slot 0 (masked when read)."""
    pad = -slots.numel() % PREFILL_BLOCK
    return torch.cat((slots, slots.new_zeros(pad))) if pad else slots


class PagedKVCache:
    """K and V slot arrays for every layer: `num_blocks` blocks for sequences, then one scratch
    block that no sequence is given (padding rows of a fixed-shape step write there). An int8
    cache (CPU kernels only) also holds each (layer, kv head, slot) row's fp32 scale, `ks` and `vs`
    (layers, Hkv, slots): a stored row is q * scale (`kernels.cache_write`)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: str | torch.device = "cpu") -> None:
        shape = (num_layers, num_kv_heads, (num_blocks + 1) * block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.ks = self.vs = None
        if dtype == torch.int8:
            self.ks = torch.zeros(shape[:3], dtype=torch.float32, device=device)
            self.vs = torch.zeros(shape[:3], dtype=torch.float32, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.scratch_slot = num_blocks * block_size  # first slot of the scratch block

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        row = head_dim * torch.tensor([], dtype=dtype).element_size() + (4 if dtype == torch.int8 else 0)
        return 2 * num_layers * block_size * num_kv_heads * row

    def scales(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One layer's (ks, vs) (Hkv, slots), or (None, None) for a float cache."""
        if self.ks is None:
            return None, None
        return self.ks[layer_idx], self.vs[layer_idx]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks src -> dst in every layer and kv head."""
        if not copies:
            return
        bs = self.block_size
        ar = torch.arange(bs, device=self.k.device)
        src = torch.cat([s * bs + ar for s, _ in copies])  # (C * block_size,) slots
        dst = torch.cat([d * bs + ar for _, d in copies])
        for t in (self.k, self.v, self.ks, self.vs):  # (layers, Hkv, slots[, D]): slots are dim 2
            if t is not None:
                t.index_copy_(2, dst, t.index_select(2, src))


@dataclass
class DecodeBucket:
    """Decode rows whose context lengths round up to the same bucket length Sb."""

    rows: torch.Tensor  # (Bb,) their rows in the flat batch
    slots: torch.Tensor  # (Bb * Sb,) context slots, padded with slot 0
    bias: torch.Tensor  # (Bb, 1, Sb) fp32: 0 for real keys, -inf for padding / outside window
    length: int  # Sb
    _masks: dict = field(default_factory=dict)  # bias as SDPA's (Bb, 1, 1, Sb) mask, by dtype

    def mask(self, dtype: torch.dtype) -> torch.Tensor:
        """`bias` in `dtype` as a (Bb, 1, 1, Sb) SDPA mask, made once per step (not per layer)."""
        m = self._masks.get(dtype)
        if m is None:
            m = self._masks[dtype] = self.bias.view(-1, 1, 1, self.length).to(dtype)
        return m


def build_decode_buckets(items: list[tuple[int, torch.Tensor]], window: int | None,
                         device, single: bool = False) -> list[DecodeBucket]:
    """items: (row, ctx_slots) of every decode row -> one DecodeBucket per bucket length (with
    `single`, one bucket padded to the longest: fewer launches, for a GPU). Built on the CPU
    and moved in three copies per bucket (per-row writes into device tensors cost a launch each)."""
    groups: dict[int, list[tuple[int, torch.Tensor]]] = {}
    top = max((s.numel() for _, s in items), default=0)
    for row, slots in items:
        sb = -(-(top if single else slots.numel()) // DECODE_BUCKET) * DECODE_BUCKET
        groups.setdefault(sb, []).append((row, slots))
    out = []
    for sb, members in sorted(groups.items()):
        padded = torch.zeros(len(members), sb, dtype=torch.long)
        bias = torch.full((len(members), 1, sb), float("-inf"))
        for i, (_, slots) in enumerate(members):
            n = slots.numel()
            padded[i, :n] = slots
            lo = 0 if window is None else max(0, n - window)
            bias[i, 0, lo:n] = 0.0
        rows = torch.tensor([r for r, _ in members])
        out.append(DecodeBucket(rows.to(device), padded.flatten().to(device), bias.to(device), sb))
    return out


@dataclass
class DecodeRows:
    """All decode rows of a step for the CPU kernel (`kernels.decode_attention`), which reads
    each row's keys in place: no buckets, no padding, no gather. Row i's key slots, in position
    order, are slots[offsets[i]:offsets[i + 1]]."""

    rows: torch.Tensor  # (B,) int64: their rows in the flat batch
    slots: torch.Tensor  # (sum of context lengths,) int64
    offsets: torch.Tensor  # (B + 1,) int64
    last: torch.Tensor | None = None  # (B,) int64: each row's last slot (its new token's)
    checked: int = 0  # the cache size (slots) every slot was checked against, 0 = not checked

    @classmethod
    def from_tables(cls, rows: list[int], tables: list[list[int]], lengths: list[int],
                    block_size: int, num_slots: int = 0) -> "DecodeRows":
        """Position p of a row at table[p // bs] * bs + p % bs. With `num_slots` and the kernels
        built: in one kernel call (`kernels.table_slots`, which also checks the slots against the
        cache's `num_slots`); else in a few tensor ops (a tensor a row cost a 32-row step's Python
        0.77 ms against 0.52: docs/benchmarks.md)."""
        if not rows:
            return cls(*(torch.zeros(n, dtype=torch.long) for n in (0, 0, 1)), torch.zeros(0, dtype=torch.long))
        if num_slots and kernels.enabled() and kernels.library() is not None:
            slots, offsets, last = kernels.table_slots(tables, lengths, block_size, num_slots)
            return cls(torch.tensor(rows, dtype=torch.long), slots, offsets, last, num_slots)
        nb = [-(-n // block_size) for n in lengths]
        width = max(nb)
        padded = torch.tensor([t[:k] + [0] * (width - k) for t, k in zip(tables, nb)], dtype=torch.long)
        slots = (padded[:, :, None] * block_size + torch.arange(block_size)).view(len(rows), -1)  # (B, width * bs)
        lens = torch.tensor(lengths, dtype=torch.long)
        keep = torch.arange(width * block_size)[None, :] < lens[:, None]
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
        flat = slots[keep]
        return cls(torch.tensor(rows, dtype=torch.long), flat, offsets, flat[offsets[1:] - 1])


def _check_float_cache(kc: torch.Tensor) -> None:
    if kc.dtype == torch.int8:  # (the engine refuses an int8 cache where its kernels cannot serve)
        raise ValueError("kv_cache_dtype: an int8 cache is read by the CPU kernels only "
                         "(bf16 queries, head size 64 or 128)")


def kernel_layout(t: torch.Tensor) -> bool:
    """(N, heads, D) with heads and D contiguous (any row stride): what the kernels read."""
    return t.dim() == 3 and t.stride(2) == 1 and t.stride(1) == t.shape[2]


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


class PagedAttention:
    """Attention context for one engine step (see module docstring)."""

    whole_chunks: bool | None = None  # prefill chunks in one call each; None = on CUDA only

    def __init__(self, cache: PagedKVCache, slot_mapping: torch.Tensor, seqs: list[SeqAttention],
                 num_heads: int, num_kv_heads: int,
                 decode: list[DecodeBucket] | None = None, window: int | None = None,
                 decode_rows: DecodeRows | None = None) -> None:
        self.cache = cache
        self.slot_mapping = slot_mapping  # (N,) where each new token's K/V goes
        self.seqs = seqs  # prefill chunks
        self.decode = decode or []
        self.decode_rows = decode_rows  # decode rows for the CPU kernel (instead of `decode`)
        n_slots = cache.k.shape[2]  # the kernels read raw memory: slots are checked once a step
        checked = decode_rows is not None and decode_rows.checked == n_slots
        for t in (slot_mapping, decode_rows.slots if decode_rows is not None and not checked else None):
            if t is not None and t.numel() and t.device.type == "cpu":
                if not 0 <= int(t.min()) <= int(t.max()) < n_slots:
                    raise ValueError(f"slots: outside the cache's {n_slots} slots")
        if decode_rows is not None:  # rows inside the step's N, offsets ending at the slots
            r, n = decode_rows.rows, slot_mapping.numel()
            if int(decode_rows.offsets[-1]) != decode_rows.slots.numel() or (
                    r.numel() and not 0 <= int(r.min()) <= int(r.max()) < n):
                raise ValueError("decode_rows: rows or offsets do not fit the step")
        self.group = num_heads // num_kv_heads
        self.window = window
        self._masks: dict[tuple, torch.Tensor] = {}  # `block_mask`s by (start, end, dtype)
        # gather indices into the cache viewed as (Hkv * slots, D), built once per step for all
        # layers: a dim-0 index_select copies whole rows and runs on all threads (measured 2x
        # faster than index_select along dim 1 at 2 threads). A prefill sequence's slots are
        # padded (slot 0, always masked) up to its last block's end.
        # When blocks tile the padded lengths, whole blocks are gathered: the cache viewed as
        # (Hkv * num_blocks, block_size * D), one index per block instead of per slot (slots
        # come from block tables, so each block_size run of them is one block, in order)
        bs = cache.block_size
        self._unit = bs if PREFILL_BLOCK % bs == 0 and DECODE_BUCKET % bs == 0 else 1
        n_rows = cache.k.shape[2] // self._unit

        def rows_of(slots: torch.Tensor) -> torch.Tensor:
            first = slots.view(-1, self._unit)[:, 0] // self._unit  # block (or slot) ids
            return head_rows(first, num_kv_heads, n_rows)

        self._rows_of = rows_of
        self._seq_rows_made: list[torch.Tensor] | None = None  # (`_seq_rows`: for SDPA only)
        self._decode_rows = [rows_of(b.slots) for b in self.decode]
        self._prefill_args: tuple | None = None  # `kernels.prefill_attention`'s chunk tensors

    @property
    def _seq_rows(self) -> list[torch.Tensor]:
        if self._seq_rows_made is None:
            self._seq_rows_made = [self._rows_of(_pad_to_block(s.ctx_slots)) for s in self.seqs]
        return self._seq_rows_made

    def _prefill_kernel_args(self, n: int) -> tuple:
        """(q_start, q_len, slots, offsets) of every prefill chunk, made and checked once a step
        (n: the step's query rows)."""
        if self._prefill_args is None:
            lens = torch.tensor([0] + [s.ctx_slots.numel() for s in self.seqs])
            args = (torch.tensor([s.q_start for s in self.seqs]), torch.tensor([s.q_len for s in self.seqs]),
                    torch.cat([s.ctx_slots for s in self.seqs]), lens.cumsum(0))
            kernels.ops.check_prefill_chunks(n, self.cache.k.shape[2], *args)
            self._prefill_args = args
        return self._prefill_args

    def block_mask(self, start: int, end: int, dtype: torch.dtype, device) -> torch.Tensor:
        """((end - start) * group, end) additive mask in `dtype`: 0 where query position
        start + r // group may see key position c (causal, and within the sliding window), -inf
        elsewhere; made once per step for all layers. The folded layout: rows are repeated per
        query head of a kv group. Additive, since SDPA turns a bool mask into one on every call
        (measured 2 `where`s per call, 2-3% of a prefill step)."""
        m = self._masks.get((start, end, dtype))
        if m is None:
            q_pos = torch.arange(start, end, device=device).repeat_interleave(self.group)
            diff = q_pos[:, None] - torch.arange(end, device=device)[None, :]
            allowed = diff >= 0
            if self.window is not None:
                allowed &= diff < self.window
            m = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
            self._masks[(start, end, dtype)] = m
        return m

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q (N, H, D); k, v (N, Hkv, D)
        kc, vc = self.cache.k[layer_idx], self.cache.v[layer_idx]  # (Hkv, slots, D)
        ks, vs = self.cache.scales(layer_idx)  # an int8 cache's (Hkv, slots) scales, else None
        int8 = kc.dtype == torch.int8  # (only the kernels read an int8 cache: the engine checks)
        # 1) store this step's keys/values in their slots (rounded once to the cache's dtype)
        if kernel_layout(k) and kernel_layout(v) and kernels.usable(k, v) and (int8 or kernels.usable(kc)):
            kernels.cache_write(k, v, self.slot_mapping, kc, vc, ks, vs)  # one call, the same bits
        else:
            _check_float_cache(kc)
            kc.index_copy_(1, self.slot_mapping, k.transpose(0, 1).to(kc.dtype))
            vc.index_copy_(1, self.slot_mapping, v.transpose(0, 1).to(vc.dtype))
        out = q.new_empty(q.shape)  # (N, H, D) contiguous (q may be a strided view)
        if self.decode_rows is not None:  # 2') decode rows: the kernel reads the cache in place
            r = self.decode_rows
            kernels.decode_attention(q, kc, vc, r.rows, r.slots, r.offsets, self.window, out, prechecked=True,
                                     ks=ks, vs=vs)
        hkv, d = k.shape[1], k.shape[2]
        g = self.group
        kf, vf = kc.view(-1, self._unit * d), vc.view(-1, self._unit * d)  # (Hkv * slots / unit, unit * D)
        # 2) each prefill chunk attends over its own slots
        # one product per chunk on a GPU (its kernels are not row-invariant anyway)
        whole = self.whole_chunks if self.whole_chunks is not None else q.device.type == "cuda"
        if self.seqs and not whole and kernels.usable(q) and kernels.prefill_attention_ready(q, kc):
            # CPU, bf16, head size 64 or 128: every chunk in one kernel call reading the cache in place
            kernels.prefill_attention(q, kc, vc, *self._prefill_kernel_args(q.shape[0]), self.window, out, ks, vs,
                                      prechecked=True)
            seqs = ()
        else:
            seqs = self.seqs
            if seqs or self.decode:
                _check_float_cache(kc)
        for s, rows in zip(seqs, self._seq_rows if seqs else ()):
            keys = kf.index_select(0, rows).view(hkv, -1, d).to(q.dtype)  # (Hkv, S', D), S' padded
            vals = vf.index_select(0, rows).view(hkv, -1, d).to(q.dtype)
            (self._attend_chunk_whole if whole else self._attend_chunk)(s, q, keys, vals, out)
        # 3) decode rows, one batched computation per bucket
        for b, rows in zip(self.decode, self._decode_rows):
            self._attend_bucket(b, rows, q, kf, vf, out)
        return out

    def _attend_chunk(self, s: SeqAttention, q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor,
                      out: torch.Tensor) -> None:
        """One prefill chunk (query positions a..b-1, b = its context length), block by block.

        Queries go in blocks of PREFILL_BLOCK positions aligned to position 0, a partial block
        padded to full size; the block ending at position e attends over keys 0..e-1 with its
        causal mask. Every product therefore has a shape fixed by the block, not by the chunk:
        a row's bits do not depend on how its prompt was chunked (batch invariance; one SDPA
        call per chunk was not, its kernels change with the query count), keys past a block
        are never read, and 4-D inputs take PyTorch's flash kernel on CPU. Measured per layer,
        a 512-token prompt, bf16, 2 threads: 7.3 ms (one masked SDPA call, 3-D) -> 3.0 ms.
        keys, vals (Hkv, S', D) with S' >= the last block's end; q, out (N, H, D).
        """
        pb, g = PREFILL_BLOCK, self.group
        hkv, d = keys.shape[0], keys.shape[2]
        b = s.ctx_slots.numel()
        a = b - s.q_len
        for lo in range(a - a % pb, b, pb):
            hi = lo + pb
            qa, qz = max(a, lo), min(b, hi)  # this chunk's positions in the block
            rows = slice(s.q_start + qa - a, s.q_start + qz - a)
            blk = q[rows] if qz - qa == pb else q.new_zeros(pb, hkv * g, d)
            if qz - qa < pb:
                blk[qa - lo:qz - lo] = q[rows]
            # fold each kv head's query group into the query axis: (1, Hkv, pb * g, D)
            qf = blk.view(pb, hkv, g, d).permute(1, 0, 2, 3).reshape(1, hkv, pb * g, d)
            o = F.scaled_dot_product_attention(qf, keys[None, :, :hi], vals[None, :, :hi],
                                               attn_mask=self.block_mask(lo, hi, q.dtype, q.device))
            o = o.view(hkv, pb, g, d)[:, qa - lo:qz - lo]  # (Hkv, qz - qa, g, D)
            out[rows] = o.permute(1, 0, 2, 3).reshape(qz - qa, hkv * g, d)

    def _attend_chunk_whole(self, s: SeqAttention, q: torch.Tensor, keys: torch.Tensor,
                            vals: torch.Tensor, out: torch.Tensor) -> None:
        """One prefill chunk in one SDPA call (for a GPU, where the per-block loop of
        `_attend_chunk` costs launches and buys no invariance). A chunk that starts the sequence
        (no sliding window) takes the causal kernel, each kv head repeated for its group; a later
        chunk folds each kv head's query group into the query axis under `block_mask`.
        keys, vals (Hkv, S', D) with S' >= its context length b; q, out (N, H, D)."""
        g = self.group
        hkv, d = keys.shape[0], keys.shape[2]
        b, t = s.ctx_slots.numel(), s.q_len
        a = b - t
        rows = slice(s.q_start, s.q_start + t)
        k, v = keys[None, :, :b], vals[None, :, :b]  # (1, Hkv, b, D)
        if a == 0 and self.window is None:  # (each kv head repeated for its group: a small copy)
            if g > 1:
                k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # (1, H, T, D)
            o = F.scaled_dot_product_attention(q[rows].transpose(0, 1)[None], k, v, is_causal=True)
            out[rows] = o[0].transpose(0, 1)  # (T, H, D)
            return
        qf = q[rows].view(t, hkv, g, d).permute(1, 0, 2, 3).reshape(1, hkv, t * g, d)
        mask = self.block_mask(a, b, q.dtype, q.device)  # (T * g, b)
        o = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask)  # (1, Hkv, T * g, D)
        out[rows] = o.view(hkv, t, g, d).permute(1, 0, 2, 3).reshape(t, hkv * g, d)

    def _attend_bucket(self, b: DecodeBucket, rows: torch.Tensor, q: torch.Tensor, kf: torch.Tensor,
                       vf: torch.Tensor, out: torch.Tensor) -> None:
        """One decode bucket: out[b.rows] = softmax(q k^T / sqrt(D) + bias) v, in fp32 (bf16 on
        CPU: SDPA on the bf16 cache, fp32 accumulation).

        rows: this bucket's gather rows into kf, vf, this layer's cache viewed as (Hkv * slots /
        unit, unit * D) (`__init__`); q, out (N, H, D). Batch index i = h * Bb + r (kv head h, bucket row r).
        """
        bb, sb = b.rows.numel(), b.length
        d = q.shape[-1]
        g = self.group
        hkv = out.shape[1] // g
        if q.dtype == kf.dtype and (q.dtype == torch.bfloat16 or q.device.type == "cuda"):
            # bf16 (or CUDA): SDPA reads the gathered keys as they are (fp32 accumulation
            # inside), no fp32 copies. Per layer, Bb = 32, Sb = 192: 652 -> 458 us (1 row: 45 -> 34);
            # a row's bits measured the same for any Bb (torch 2.13, AVX-512, 2 threads)
            keys = kf.index_select(0, rows).view(hkv, bb, sb, d).transpose(0, 1)  # (Bb, Hkv, Sb, D)
            vals = vf.index_select(0, rows).view(hkv, bb, sb, d).transpose(0, 1)
            qb = q.index_select(0, b.rows).view(bb, hkv, g, d)  # (Bb, Hkv, g, D)
            mask = b.mask(q.dtype)  # (Bb, 1, 1, Sb) 0 / -inf, broadcast over heads
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
