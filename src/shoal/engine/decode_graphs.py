"""Decode steps as CUDA graphs: one captured forward per (batch, context) bucket.

A decode-only step on a GPU spends most of its time launching kernels (measured on an H200,
SmolLM2-135M shape, bf16: ~1,100 launches and 21 ms for a one-row step whose GPU work is
~2.5 ms). A CUDA graph replays the whole forward, head included, as one launch: 25.3 -> 2.7
ms/token at one stream, 3.2x the throughput at 256 requests (docs/benchmarks.md).

Each graph runs a fixed shape: Bp rows (the step's rows rounded up to `BATCH_GRID`) attending
over Sb context slots (the longest context rounded up by `context_bucket`). Its only input is
one int64 buffer, refreshed by one host-to-device copy per step:

    [ token ids (Bp) | positions (Bp) | LoRA slots (Bp), with adapters | block tables (Bp, Sb / bs) ]

Everything else is computed inside the graph from it: each new token's cache slot (from its
block table) and each row's context length; with Triton (the CUDA default) the attention kernel
reads each row's blocks in place up to its length (`TritonAttention`: Sb only sizes the tables),
else the context slots and the additive mask (keys at positions < length, and within the sliding
window) for a gather + SDPA. Padding rows carry position -1: they write their key/value to the cache's
scratch slot (`PagedKVCache.scratch_slot`, never handed to a sequence) and attend over one key.
Graphs are captured lazily, the first time a bucket is needed, into one shared memory pool, and
all write their logits into one (max rows, V) buffer: a graph keeps no memory of its own beyond
its kernels (per-graph outputs would cost 131 MB a graph at 256 rows of Llama-3's vocabulary).

With `capture=False` the same function runs eagerly each step (on CPU too): the tests use it to
check the graph path's inputs and padding against the plain path without a GPU.
Steps with adapter rows take graphs of their own, whose LoRA layers read each token's slot from
the buffer (`shoal.lora.grouping.add_indexed_`); base-only steps take graphs without LoRA work.
Not graphed: steps with a prefill chunk (they run the eager path).
"""

from __future__ import annotations

import bisect
from array import array

import torch

from .device_copy import pinned
from .paged_attention import DecodeBucket, PagedAttention, PagedKVCache
from .triton_attention import TritonAttention

BATCH_GRID = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


def batch_bucket(n: int) -> int:
    """Rows a graph for n rows runs: the next size on BATCH_GRID, then multiples of 64."""
    i = bisect.bisect_left(BATCH_GRID, n)
    return BATCH_GRID[i] if i < len(BATCH_GRID) else -(-n // 64) * 64


def context_bucket(n: int, block_size: int) -> int:
    """Context slots a graph for a longest context of n reads: a multiple of 64 up to 512, then
    eight steps per doubling (padding under a quarter); always a multiple of block_size."""
    step = 64 if n <= 512 else 1 << ((n - 1).bit_length() - 3)
    step = -(-step // block_size) * block_size
    return -(-n // step) * step


class DecodeGraphs:
    """Runs decode-only steps through captured graphs (or the same function eagerly)."""

    def __init__(self, model, cache: PagedKVCache, num_heads: int, num_kv_heads: int,
                 window: int | None, capture: bool, max_rows: int, lora_mapping=None,
                 triton_attention: bool = False) -> None:
        self.model, self.cache = model, cache
        self.num_heads, self.num_kv_heads, self.window = num_heads, num_kv_heads, window
        self.capture = capture
        self.bs = cache.block_size
        self.device = cache.k.device
        self.max_rows = batch_bucket(max_rows)
        self.mapping = lora_mapping  # the LoRA layers' mapping (`shoal.lora.layers`), or None
        self.triton_attention = triton_attention  # attention by `TritonAttention` (block tables in place)
        # (rows, context slots, with LoRA) -> (graph or None, its input buffer)
        self.graphs: dict[tuple[int, int, bool], tuple[object, torch.Tensor]] = {}
        self.pool = None  # the graphs' shared memory pool (CUDA)
        self.out: torch.Tensor | None = None  # (max rows, V) logits in the head's dtype, every graph's output

    def run(self, ids: list[int], positions: list[int], tables: list[list[int]],
            lora_slots: list[int] | None = None, fed: tuple | None = None) -> torch.Tensor:
        """Logits (B, V) in the head's dtype (bf16 for a bf16 model: the sampler and the flights'
        kernels read them as they are) for B decode rows: token ids, their positions, block tables, and
        with adapters in the step each row's LoRA slot (-1 = base; resident in its slot). `fed`:
        (Feed, rows, their rows in its tokens): those rows' ids come from a step still on the
        device (`decode_ahead`)."""
        b = len(ids)
        lora = lora_slots is not None
        if lora and self.mapping is None:
            raise ValueError("decode graphs: LoRA slots given but the model has no LoRA layers")
        bp = batch_bucket(b)
        if bp > self.max_rows:
            raise ValueError(f"decode graphs: {b} rows exceed max_rows {self.max_rows}")
        sb = context_bucket(max(positions) + 1, self.bs)
        nb = sb // self.bs
        # built in an int64 array (2.5x faster than torch.tensor over a list: 256 rows of 36
        # blocks 0.58 -> 0.23 ms, measured), read by torch without a copy
        flat = array("q", ids)
        flat.extend([0] * (bp - b))
        flat.extend(positions)
        flat.extend([-1] * (bp - b))
        if lora:
            flat.extend(lora_slots)
            flat.extend([-1] * (bp - b))
        zeros = array("q", bytes(8 * nb))
        for t in tables:  # each row's first nb blocks, zero padded (padding slots are masked)
            n = min(len(t), nb)
            flat.extend(t if n == len(t) else t[:n])
            flat.extend(zeros[:nb - n])
        flat.extend(array("q", bytes(8 * (bp - b) * nb)))
        host = torch.frombuffer(flat, dtype=torch.long)
        key = (bp, sb, lora)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._build(*key)
        graph, inputs = entry
        inputs.copy_(pinned(host) if inputs.is_cuda else host, non_blocking=True)  # (`device_copy`)
        if fed is not None:  # (ids are inputs[:b])
            fed[0].apply(inputs, fed[1], fed[2])
        if graph is None:  # eager: the same function, run now
            self._step(inputs, *key)
        else:
            graph.replay()
        return self.out[:b]

    # ---- the function a graph holds --------------------------------------------------------

    def _step(self, inputs: torch.Tensor, bp: int, sb: int, lora: bool) -> None:
        if lora:
            self.mapping.graph_index = inputs[2 * bp:3 * bp]  # (Bp,) every LoRA layer reads it
        try:
            logits = self._forward(inputs, bp, sb, (2 + lora) * bp)  # (Bp, V) in the head's dtype
        finally:
            if lora:
                self.mapping.graph_index = None
        if self.out is None:  # (a first step: eager, or a warm-up before any capture)
            # logits kept in the head's dtype: an fp32 copy of bf16 ones made a step's logits
            # traffic 250 MB, not 100 (written, copied, read: 256 rows of SmolLM2's 49,152 tokens)
            self.out = torch.empty(self.max_rows, logits.shape[-1], dtype=logits.dtype, device=self.device)
        self.out[:bp].copy_(logits)

    def _forward(self, inputs: torch.Tensor, bp: int, sb: int, tables_at: int) -> torch.Tensor:
        bs, nb = self.bs, sb // self.bs
        ids, pos, tables = inputs[:bp], inputs[bp:2 * bp], inputs[tables_at:].view(bp, nb)
        valid = pos >= 0  # (Bp,) real rows
        p = pos.clamp(min=0)
        slot = tables.gather(1, (p // bs)[:, None]).squeeze(1) * bs + p % bs  # (Bp,) new K/V slot
        slot = torch.where(valid, slot, self.cache.scratch_slot)
        length = torch.where(valid, pos + 1, 1)  # (Bp,) context length
        if self.triton_attention:  # the kernel reads each row's blocks in place, up to its length
            ctx = TritonAttention(self.cache, slot, self.num_heads, self.num_kv_heads, self.window,
                                  decode=(tables, length))
            return self.model.compute_logits(self.model(ids, p, ctx), fp32=False)  # (Bp, V)
        k = torch.arange(sb, device=inputs.device)
        allowed = k[None, :] < length[:, None]  # (Bp, Sb)
        if self.window is not None:
            allowed &= k[None, :] >= (length - self.window)[:, None]
        bias = torch.zeros(bp, 1, sb, device=inputs.device).masked_fill_(~allowed[:, None], float("-inf"))
        slots = (tables[:, :, None] * bs + torch.arange(bs, device=inputs.device)).flatten()  # (Bp*Sb,)
        rows = torch.arange(bp, device=inputs.device)
        ctx = PagedAttention(self.cache, slot, [], self.num_heads, self.num_kv_heads,
                             [DecodeBucket(rows, slots, bias, sb)], self.window)
        hidden = self.model(ids, p, ctx)  # (Bp, hidden)
        return self.model.compute_logits(hidden, fp32=False)  # (Bp, V) in the head's dtype

    def _build(self, bp: int, sb: int, lora: bool):
        """(graph or None, input buffer) for one bucket; the buffer starts as all padding rows
        (base rows), so warm-up and capture touch only the scratch slot."""
        inputs = torch.zeros(bp * (2 + lora + sb // self.bs), dtype=torch.long, device=self.device)
        inputs[bp:(2 + lora) * bp] = -1
        if not self.capture:
            return None, inputs
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):  # warm-up: kernels chosen, workspaces allocated
                self._step(inputs, bp, sb, lora)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        # thread_local: CUDA calls other threads of the server make meanwhile (an adapter's
        # weights copied in, say) must not invalidate the capture
        recording = torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local")
        with recording, torch.inference_mode():
            self._step(inputs, bp, sb, lora)  # its temporaries return to the pool
        return graph, inputs
