"""ModelRunner: pack one scheduled step into a flat batch, run the model, return logits.

It owns the paged KV cache. Per step it builds, in one place, the flat token ids and positions
(N,), the slot mapping, each sequence's context slots and causal mask, and the per-token LoRA
slot index; then one forward runs every sequence (prefill chunks and decodes together). Logits
are computed only for rows that sample (a sequence whose chunk reaches its last token) and for
prompt positions whose logprobs were asked for. The step's index tensors are built on the CPU
and moved to the device in a few copies (on a GPU, one small copy per sequence cost more than
the step's kernels). On CUDA, decode-only steps replay captured graphs (`decode_graphs`), and
attention reads the cache in place through Triton kernels (`triton_attention`).
No sampling or scheduling here.
"""

from __future__ import annotations

import contextlib
from array import array
from dataclasses import dataclass

import torch

from .. import kernels
from ..model.row_classes import step_rows
from ..model.transformer import Transformer
from .cpu_decode import CPUDecodeForward
from .decode_ahead import Feed
from .decode_graphs import DecodeGraphs
from .device_copy import array_to_device, move, to_device
from .paged_attention import DecodeRows, PagedAttention, PagedKVCache, SeqAttention, build_decode_buckets
from .sequence import Sequence
from .triton_attention import TritonAttention, chunk_slots
from .triton_attention import available as triton_available
from .triton_attention import supports as triton_supports


@dataclass
class StepResult:
    """Logits of one step: `sample_logits[i]` belongs to `sample_seqs[i]`."""

    sample_seqs: list[Sequence]
    sample_logits: torch.Tensor | None  # (B, V) fp32, or bf16 from a bf16 head
    prompt_logits: dict[int, tuple[int, torch.Tensor]]  # seq_id -> (first position, (T, V) logits)


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int, lora=None,
                 kv_dtype: torch.dtype | None = None, cuda_graphs: bool = False,
                 max_num_seqs: int = 256, triton_attention: bool = True) -> None:
        self.model = model
        c = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self._param = p  # (its device and dtype decide whether the CPU kernels apply)
        self.block_size = block_size
        self.cache = PagedKVCache(c.num_layers, num_blocks, block_size, c.num_kv_heads, c.head_dim,
                                  kv_dtype or p.dtype, p.device)
        self.num_heads, self.num_kv_heads = c.num_heads, c.num_kv_heads
        self.window = c.sliding_window
        self.lora = lora  # LoRAManager or None
        self._block_offsets = torch.arange(block_size)
        self.max_num_seqs = max_num_seqs  # most rows a step has (sizes the graphs' output)
        self.graphs: DecodeGraphs | None = None  # decode-only steps as graphs (CUDA)
        self.cpu_decode_forward = True  # all-decode CPU steps through `CPUDecodeForward`
        # a chunk of several generated tokens (a preempted sequence coming back) runs as that many
        # decode rows, each over its own prefix, as those tokens first ran (`Scheduler.chunk`):
        # the same bits as one a step, since a layer writes every row's key before any attends
        self.decode_chunks = False
        self._cpu_decode: CPUDecodeForward | None = None
        # Triton kernels reading the paged cache in place (`triton_attention`): on CUDA when
        # Triton is there (the engine's `triton_kernels` setting); the tests set it on the
        # CPU under Triton's interpreter
        self.triton_attention = (triton_attention and self.device.type == "cuda" and triton_available()
                                 and self.cache.k.dtype != torch.int8 and triton_supports(c.head_dim))
        if cuda_graphs and self.device.type == "cuda":
            self.use_decode_graphs(capture=True)

    def use_decode_graphs(self, capture: bool) -> None:
        """Run decode-only steps through `DecodeGraphs` (capture=False: the same fixed-shape
        function, eagerly; any device)."""
        self.graphs = DecodeGraphs(self.model, self.cache, self.num_heads, self.num_kv_heads,
                                   self.window, capture, self.max_num_seqs,
                                   self.lora.mapping if self.lora is not None else None,
                                   triton_attention=self.triton_attention)

    def _cpu_forward(self, input_ids: torch.Tensor) -> CPUDecodeForward | None:
        """The flat forward for all-decode CPU steps (`cpu_decode`), made on first use; None when
        off (`cpu_decode_forward`), on another device or model family, or without the kernels."""
        if not self.cpu_decode_forward or self.device.type != "cpu":
            return None
        if self._cpu_decode is None:
            if not CPUDecodeForward.supports(self.model):
                self.cpu_decode_forward = False
                return None
            self._cpu_decode = CPUDecodeForward(self.model)
        return self._cpu_decode if self._cpu_decode.usable(input_ids) else None

    def _decode_kernel(self) -> bool:
        """Do decode rows take the CPU kernel (`kernels.decode_attention`) this step?"""
        k = self.cache.k
        return kernels.usable(self._param) and (k.dtype == torch.int8 and k.is_cpu or kernels.usable(k))

    def _ctx_slots(self, seq: Sequence, ctx_len: int) -> torch.Tensor:
        """(ctx_len,) cache slots of positions 0..ctx_len-1, on the CPU."""
        nblocks = -(-ctx_len // self.block_size)
        blocks = torch.tensor(seq.block_table[:nblocks])
        return (blocks[:, None] * self.block_size + self._block_offsets).flatten()[:ctx_len]

    def _run_graphed(self, scheduled: list[tuple[Sequence, int]], feed: Feed | None) -> StepResult | None:
        """A decode-only step through the graphs; None when the step has a prefill chunk."""
        ids, positions, tables = [], [], []
        for seq, n in scheduled:
            pos = seq.num_computed_tokens
            if n != 1 or pos < seq.num_prompt_tokens or pos + 1 != len(seq.token_ids):
                return None
            ids.append(seq.token_ids[pos])
            positions.append(pos)
            tables.append(seq.block_table)
        fed = None
        if feed is not None:
            fed = (feed, *feed.pairs(range(len(scheduled)), [seq for seq, _ in scheduled]))
        lora_slots = None
        if self.lora is not None:
            names = {seq.adapter for seq, _ in scheduled if seq.adapter is not None}
            if names:  # adapters resident first; each row reads its slot inside the graph
                slots = self.lora.prepare(names)
                lora_slots = [slots[seq.adapter] if seq.adapter is not None else -1
                              for seq, _ in scheduled]
            else:  # base only: the LoRA layers add nothing (nor capture any work)
                self.lora.clear_mapping()
        logits = self.graphs.run(ids, positions, tables, lora_slots, fed)  # (B, V)
        return StepResult([seq for seq, _ in scheduled], logits, {})

    def _set_lora_mapping(self, adapters: list[tuple[str | None, int]], slots: dict[str, int]) -> None:
        """Give every token its adapter's slot (-1 = base), as a host list: torch ops here
        (tensors of the slots and counts, repeat_interleave) were ~11% of a serving process's
        samples at 128 streams on 2 cores (py-spy; their parallel regions wait for the
        OpenMP workers the event loop keeps busy)."""
        if not slots:  # base only: the LoRA layers add nothing
            self.lora.clear_mapping()
            return
        flat: list[int] = []  # (N,) sorted by slot
        for a, n in adapters:
            flat += [slots[a] if a is not None else -1] * n
        self.lora.set_mapping(flat)

    def run(self, scheduled: list[tuple[Sequence, int]], copies: list[tuple[int, int]] = (),
            feed: Feed | None = None) -> StepResult:
        """Run one step over `scheduled` (sequence, tokens to compute from num_computed_tokens).
        With `feed`, the listed sequences' last tokens (placeholders in `token_ids`) are read
        from a step still on the device (`decode_ahead`)."""
        with torch.inference_mode(), sdpa_backends(self.device):
            return self._run(scheduled, copies, feed)

    def _run(self, scheduled: list[tuple[Sequence, int]], copies: list[tuple[int, int]],
             feed: Feed | None = None) -> StepResult:
        self.cache.copy_blocks(list(copies))
        if self.graphs is not None:
            result = self._run_graphed(scheduled, feed)
            if result is not None:
                return result
        # decode rows first, then prefill chunks (bf16 CPU products take them in different row
        # classes: `shoal.model.row_classes`); LoRA: make the step's adapters resident, then
        # order each part by slot (base first) so an adapter's tokens are contiguous
        lora_slots: dict[str, int] = {}
        if self.lora is not None:
            names = {seq.adapter for seq, _ in scheduled if seq.adapter is not None}
            lora_slots = self.lora.prepare(names) if names else {}
        chunks = self.decode_chunks
        # (sequence, tokens, decode?): generated tokens run as decode rows; decode rows first,
        # then by slot (the order kept where it already is: every row a decode and no adapter)
        # (a sequence's drafts, `speculative`, are decode rows too)
        rows = [(seq, n, (n == 1 or chunks or bool(seq.draft))
                 and seq.num_computed_tokens >= seq.num_prompt_tokens) for seq, n in scheduled]
        if lora_slots:
            rows.sort(key=lambda r: (not r[2], lora_slots.get(r[0].adapter, -1)))
        elif not all(r[2] for r in rows):
            rows = [r for r in rows if r[2]] + [r for r in rows if not r[2]]
        n_decode = sum(n for _, n, decode in rows if decode)
        ids = array("q")  # (N,) token ids, then positions: filled in place, no list to convert
        positions = array("q")
        seq_attn: list[SeqAttention] = []
        slot_chunks: list[torch.Tensor] = []
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        prompt_rows: list[tuple[Sequence, int, int, int]] = []  # seq, first row, count, first pos
        adapters: list[tuple[str | None, int]] = []  # (adapter, number of tokens)
        decode_items: list[tuple[int, torch.Tensor]] = []
        # CPU kernel: the decode rows' slots for all rows at once (`DecodeRows.from_tables`);
        # Triton: decode rows by block table and length, prefill chunks likewise (`tri_chunks`)
        tri = self.triton_attention
        by_table = n_decode > 0 and (tri or self._decode_kernel())
        tables: list[list[int]] = []
        lengths: list[int] = []
        tri_chunks: list[tuple[list[int], int, int, int]] = []  # (block table, first row, rows, context)
        tri_slots: list[tuple[list[int], int, int]] = []  # (block table, start, end): the chunks' new slots
        for seq, n, decode in rows:
            start = seq.num_computed_tokens
            end = start + n
            q_start = len(ids)
            if n == 1:  # (per row per step: the common case kept plain)
                ids.append(seq.token_ids[start])
                positions.append(start)
            else:
                ids.extend(seq.token_ids[start:end])
                if end > len(seq.token_ids):  # drafts after the last token (`speculative`)
                    ids.extend(seq.draft[:end - len(seq.token_ids)])
                positions.extend(range(start, end))
            if by_table and decode:  # (decode rows come first: their new slots below)
                if n == 1:
                    tables.append(seq.block_table)
                    lengths.append(end)
                else:
                    tables += [seq.block_table] * n
                    lengths += range(start + 1, end + 1)
            elif tri:  # a prefill chunk for the Triton kernel: its new slots, no context slots
                tri_slots.append((seq.block_table, start, end))
                tri_chunks.append((seq.block_table, q_start, n, end))
            else:
                ctx = self._ctx_slots(seq, end)  # (end,)
                slot_chunks.append(ctx[start:end])
                if decode:
                    # decode rows: batched with others of their context-length bucket
                    decode_items += [(q_start + j, ctx[:start + j + 1]) for j in range(n)]
                else:  # prompt tokens always take the prefill path, however they were chunked
                    seq_attn.append(SeqAttention(q_start, n, ctx))
            adapters.append((seq.adapter, n))
            if end == len(seq.token_ids):  # the chunk reaches the last known token: it samples
                sample_rows.append(q_start + n - 1)
                sample_seqs.append(seq)
            elif end > len(seq.token_ids):  # drafts: the last known token's row and theirs sample
                first = q_start + len(seq.token_ids) - 1 - start
                sample_rows.extend(range(first, q_start + n))
                sample_seqs.extend([seq] * (q_start + n - first))
            if start < seq.num_prompt_tokens - 1 and seq.params.prompt_logprobs is not None:
                # logits at positions start..min(end, prompt_len-1)-1 predict prompt tokens
                cnt = min(end, seq.num_prompt_tokens - 1) - start
                prompt_rows.append((seq, q_start, cnt, start))
        input_ids = array_to_device(ids, self.device)  # (N,)
        if feed is not None:  # (a fed row is a decode row of one token: it samples)
            feed.apply(input_ids, *feed.pairs(sample_rows, sample_seqs))
        pos = array_to_device(positions, self.device)  # (N,)
        if self.device.type != "cpu":
            for s in seq_attn:
                s.ctx_slots = s.ctx_slots.to(self.device)
        buckets, decode_rows = [], None
        if tri:  # Triton: each decode row's new token goes to the slot of its last position
            bs = self.block_size
            last = [t[(n - 1) // bs] * bs + (n - 1) % bs for t, n in zip(tables, lengths)]
            slot_chunks.append(chunk_slots(last, tri_slots, bs))  # (then the chunks' new slots)
        elif by_table:  # CPU: one kernel call a layer, in place
            decode_rows = DecodeRows.from_tables(list(range(n_decode)), tables, lengths, self.block_size,
                                                 self.cache.k.shape[2])
            slot_chunks.insert(0, decode_rows.last)  # each decode row's new token goes to its last slot
        else:  # on a GPU all decode rows form one bucket (its kernels do not promise row invariance)
            buckets = build_decode_buckets(decode_items, self.window, self.device,
                                           single=self.device.type == "cuda")
        slot_mapping = move(torch.cat(slot_chunks), self.device)  # (N,)
        if tri:
            ctx = TritonAttention.build(self.cache, slot_mapping, self.num_heads, self.num_kv_heads, self.window,
                                        tables, lengths, tri_chunks)
        else:
            ctx = PagedAttention(self.cache, slot_mapping, seq_attn, self.num_heads, self.num_kv_heads, buckets,
                                 self.window, decode_rows)
        if self.lora is not None:
            self._set_lora_mapping(adapters, lora_slots)
        forward = self.model
        if n_decode == len(ids) and self._cpu_forward(input_ids) is not None and (
                not lora_slots or self._cpu_decode.native is not None):
            # all decodes: the flat CPU forward (with adapter rows: only its one-call path)
            forward = self._cpu_decode
        with step_rows(len(ids), n_decode):  # rows [0, n_decode) are decode rows
            hidden = forward(input_ids, pos, ctx)  # (N, hidden)
        logits = None
        if sample_rows:
            # (B, V) in the head's dtype: the sampler reads bf16 as it is
            logits = self.model.compute_logits(hidden[to_device(sample_rows, self.device, torch.long)], fp32=False)
        prompt_logits = {
            s.seq_id: (p0, self.model.compute_logits(hidden[r0:r0 + cnt]))
            for s, r0, cnt, p0 in prompt_rows
        }
        return StepResult(sample_seqs, logits, prompt_logits)


def sdpa_backends(device: torch.device):
    """On CUDA, SDPA limited to the memory-efficient kernel (math as the fallback). Measured on
    an H200 (torch 2.11, bf16): with the default choice each new sequence length cost ~60 ms
    the first time (flash alone ~10 ms, cuDNN 40-50 ms), the efficient kernel ~0.05 ms (once
    its first call had loaded it), and all ~0.15 ms per call after; a first pass over 96
    prompts of new lengths spent 5.6 of its 6.8 s there (the same lengths again: 0.58 s)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
