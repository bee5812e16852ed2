"""Scheduler: which sequences run in the next step, and how many tokens each computes.

Iteration-level continuous batching with chunked prefill (as vLLM V1): running sequences first,
oldest first, then waiting ones FCFS, all within one token budget. When KV blocks run out the
newest running sequence is preempted and later recomputed. It never advances
`num_computed_tokens` (the engine does, then calls `block_manager.commit`); no torch here.

Recompute: by default a preempted sequence's prompt and generated tokens are computed again as
one prompt. With a block manager of `path_keys` (a batch-invariant engine on CPU) its prompt is,
but its generated tokens are computed as decode rows again, as they were the first time: a chunk
never spans the prompt's end (`chunk`), and the runner runs a chunk of generated tokens as one
decode row each (`ModelRunner.decode_chunks`). Prefill and decode round differently: a
prompt-style recompute changed later greedy tokens (2 of 23 requests in a run with a 40-block
cache).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..config import EngineConfig
from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class SchedulerOutput:
    """One step's plan."""

    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    """(sequence, tokens to compute from seq.num_computed_tokens), running ones first."""
    preempted: list[Sequence] = field(default_factory=list)
    """Sequences sent back to waiting this step (their KV is gone; they will be recomputed)."""
    copies: list[tuple[int, int]] = field(default_factory=list)
    """(src_block, dst_block) KV copies to perform before the step (copy-on-write)."""

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


_RUNNING = SequenceStatus.RUNNING  # (`is` a module constant: ~15 ns, `!=` the enum's ~90)


def _age(seq: Sequence) -> tuple[float, int]:
    return (seq.arrival_time, seq.seq_id)


class Scheduler:
    """Continuous batching over a BlockManager."""

    def __init__(self, config: EngineConfig, block_manager: BlockManager,
                 max_num_batched_tokens: int | None = None) -> None:
        """max_num_batched_tokens: the step's token budget as the engine resolved it
        (`preflight.token_budget`); default the config's, else 512."""
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens or config.max_num_batched_tokens or 512
        self.max_loras = config.max_loras if config.enable_lora else None
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._in_order = True  # running is sorted oldest first (`_age`)

    # ---- queues -----------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def running_by_age(self) -> list[Sequence]:
        """The running sequences in the order the next plan visits them (oldest first)."""
        return self.running if self._in_order else sorted(self.running, key=_age)

    def can_fit(self, num_tokens: int) -> bool:
        """Whether a sequence of num_tokens tokens could ever fit in the KV cache alone."""
        return self.block_manager.num_blocks_for(num_tokens) <= self.block_manager.num_blocks

    # ---- the step ---------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Plan one step.

        Semantics:
            budget = max_num_batched_tokens
            for seq in running, oldest first:          # 1) decodes and prefill chunks
                while not can_append(seq): preempt(newest running not yet scheduled)
                append_slot(seq); schedule chunk(seq, budget) tokens
            if nothing was preempted:                  # 2) admissions, FCFS
                for seq in waiting while room and budget:
                    skip if it would exceed max_loras adapters; stop if not can_allocate
                    allocate(seq); schedule chunk(seq, budget) tokens
        """
        bm, out = self.block_manager, SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()
        if not self._in_order:  # (sorting 256 rows every step cost ~40 us; they rarely move)
            self.running.sort(key=_age)
            self._in_order = True

        # 1) running sequences, oldest first (the loop is per row per step: kept plain)
        plan, max_seqs, path_keys = out.scheduled, self.max_num_seqs, bm.path_keys
        for seq in list(self.running):
            if budget == 0 or len(plan) >= max_seqs:
                break
            if seq.status is not _RUNNING:
                continue  # preempted above
            n = len(seq.token_ids) - seq.num_computed_tokens
            if n == 0:
                continue  # waiting on the engine (e.g. a fork)
            while not bm.try_append(seq):
                victim = max((s for s in self.running if s.seq_id not in scheduled), key=_age)
                self.preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not _RUNNING:
                continue
            if path_keys and seq.num_computed_tokens < seq.num_prompt_tokens:
                n = min(n, seq.num_prompt_tokens - seq.num_computed_tokens)  # as `chunk`
            if n > budget:
                n = budget
            if seq.draft:  # drafts to check after the last token (`speculative`): room or none
                if n + len(seq.draft) <= budget and bm.try_append(seq, len(seq.draft)):
                    n += len(seq.draft)
                else:
                    seq.draft = []
            plan.append((seq, n))
            scheduled.add(seq.seq_id)
            budget -= n

        # 2) waiting sequences, FCFS (not in a step that had to preempt: memory is short)
        if not out.preempted:
            adapters = {s.adapter for s in self.running if s.adapter is not None}
            skipped: list[Sequence] = []
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                seq = self.waiting[0]
                if (self.max_loras is not None and seq.adapter is not None
                        and seq.adapter not in adapters and len(adapters) >= self.max_loras):
                    skipped.append(self.waiting.popleft())  # no adapter slot this step
                    continue
                if not bm.can_allocate(seq):
                    break
                self.waiting.popleft()
                bm.allocate(seq)
                seq.status = SequenceStatus.RUNNING
                self._push(seq)
                if seq.adapter is not None:
                    adapters.add(seq.adapter)
                n = self.chunk(seq, budget)
                out.scheduled.append((seq, n))
                budget -= n
            self.waiting.extendleft(reversed(skipped))

        out.copies = bm.take_copies()
        return out

    def _push(self, seq: Sequence) -> None:
        """Append seq to running, noting when it breaks the oldest-first order (a recomputed one
        is older than those admitted after it)."""
        if self.running and _age(seq) < _age(self.running[-1]):
            self._in_order = False
        self.running.append(seq)

    def chunk(self, seq: Sequence, budget: int) -> int:
        """Tokens seq computes this step: its uncomputed ones within the budget; with `path_keys`,
        a chunk of prompt tokens stops at the prompt's end (generated ones run as decode rows)."""
        n = seq.num_uncomputed
        if self.block_manager.path_keys and seq.num_computed_tokens < seq.num_prompt_tokens:
            n = min(n, seq.num_prompt_tokens - seq.num_computed_tokens)
        return min(n, budget)

    def preempt(self, seq: Sequence) -> None:
        """Drop seq's KV and put it at the front of the waiting queue (recomputed later)."""
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    # ---- lifecycle --------------------------------------------------------------------------

    def fork(self, parent: Sequence, children: list[Sequence]) -> None:
        """Run a best_of>1 parent's samples right after it, sharing its blocks."""
        at = self.running.index(parent) + 1
        for i, child in enumerate(children):
            self.block_manager.fork(parent, child)
            child.status = SequenceStatus.RUNNING
            self.running.insert(at + i, child)
        self._in_order = False

    def finish(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def abort(self, request_id: str) -> list[Sequence]:
        """Free and drop every sequence of the request, waiting or running."""
        seqs = [s for s in self.running if s.request_id == request_id]
        seqs += [s for s in self.waiting if s.request_id == request_id]
        if not seqs:
            return []
        self.running = [s for s in self.running if s.request_id != request_id]
        self.waiting = deque(s for s in self.waiting if s.request_id != request_id)
        for seq in seqs:
            self.block_manager.free(seq)
            seq.status = SequenceStatus.FINISHED
        return seqs
