"""Decode steps launched before the last step's tokens are back on the host (async scheduling).

A synchronous step waits for its logits, samples, appends the tokens and checks stops before the
next step can be planned, so the device idles while the host does a step's bookkeeping and the
host idles while the device runs the forward. Here (as vLLM V1's async scheduling) a step whose
sampling needs nothing from the host is *launched*: its tokens are sampled on the device and
copied back without waiting (a `Flight`). The next call then *chains* the following step at once
(planned by the scheduler: admissions and prompt chunks too), each in-flight row's input read on
the device from the tokens still in flight (a `Feed`; its `token_ids` hold a placeholder
meanwhile), and only then *lands* the first: waits for its tokens, appends them, checks stops
and builds outputs while the device runs the chained step.

Semantics (what the engine does with `EngineConfig.async_scheduling`):

    take_off(step): every row of a planned and run step that samples needs nothing the device
        lacks (greedy, or temperature / top_k / top_p with the row's uniform number drawn now
        from its own generator; ignore_eos masks; no penalties, logit_bias, min_tokens still to
        reach, top logprobs, prompt logprobs or forks); rows that do not sample (prompts still
        in chunks) may be in it: count the rows' tokens computed, register their filled blocks
        (as a landed step does before the next plan: the KV is written first, in stream order),
        sample on the device, keep the step in flight instead of landing it.
    step() with a flight F:
        chain: if every row the next plan may sample is eligible (F's, the running ones outside
            F, the waiting ones it could admit), the scheduler's first pass reaches every
            sequence of F (no older prompt chunk takes the budget first) and the KV cache has
            room for the running rows: append a placeholder to each running sequence of F that
            F's token cannot finish by length, let the scheduler plan the next step (admissions
            and prompt chunks with the placeholders' decode rows), run it, each placeholder's
            input read on the device from F's tokens, register the filled blocks of the rows
            not fed, and launch its sampling (flight G)
        land F: wait for F's tokens; each sequence still running takes its token (in place of
            its placeholder), registers its full blocks in the prefix cache, appends, checks
            stops (a sequence F finished wastes its row of G, which G's landing skips)
        outputs of the requests F touched; G is now in flight

The tokens are those of the synchronous engine: the same sampling, the same draws in the same
order per sequence (a greedy row's argmax, a sampled row's inverse CDF at its own next uniform
number), on the CPU by the same kernels (`Sampler.sample`; nothing overlaps there: the forward
runs on the same cores). A step that needs the host (preemption, forks, penalties, prompt
logprobs, ...) runs synchronously after the flight has landed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .device_copy import to_device
from .device_draw import draw_rows, triton_sampling
from .sampler import make_generator
from .sampling_params import GREEDY_BELOW
from .sequence import SequenceStatus

if TYPE_CHECKING:
    from .llm_engine import LLMEngine
    from .output_processor import Request
    from .sampler import Sampler
    from .scheduler import SchedulerOutput
    from .model_runner import StepResult
    from .sequence import Sequence

PLACEHOLDER = 0  # a sequence's last token while the step that samples it is in flight
_RUNNING = SequenceStatus.RUNNING


@dataclass
class Feed:
    """Tokens a step in flight sampled, as the next step's inputs: `tokens` (R,) int64 on the
    model's device; `src` maps a fed sequence's id to its row of `tokens`."""

    tokens: torch.Tensor
    src: dict[int, int]

    def pairs(self, rows, seqs: list[Sequence]) -> tuple[list[int], list[int]]:
        """(dst, src): the flat rows among `rows` whose sequence is fed, and their rows in `tokens`."""
        dst, src = [], []
        for r, s in zip(rows, seqs):
            j = self.src.get(s.seq_id)
            if j is not None:
                dst.append(r)
                src.append(j)
        return dst, src

    def apply(self, ids: torch.Tensor, dst: list[int], src: list[int]) -> None:
        """ids[dst[j]] = tokens[src[j]], on the device (no host sync)."""
        n = len(dst)
        if n == 0:
            return
        if dst[-1] == n - 1 and src == dst:  # rows 0..n-1 from rows 0..n-1 (the usual chain)
            ids[:n].copy_(self.tokens[:n])
            return
        idx = to_device(dst + src, ids.device, torch.long)
        ids.index_copy_(0, idx[:n], self.tokens.index_select(0, idx[n:]))


class Launched:
    """One step's sampled tokens (B,) on the device and, once `result()` is asked for, on the
    host with their raw logprobs."""

    def __init__(self, tokens: torch.Tensor, host: torch.Tensor | None = None, event=None,
                 lists: tuple[list[int], list[float]] | None = None) -> None:
        self.tokens = tokens  # (B,) int64
        self._host, self._event, self._lists = host, event, lists  # (2, B) fp64: ids, logprobs

    def result(self) -> tuple[list[int], list[float]]:
        if self._lists is None:
            if self._event is not None:
                self._event.synchronize()  # the copy was queued after the step's sampling
            ids, lps = self._host.tolist()
            self._lists = [int(t) for t in ids], lps  # (ids exact in fp64 below 2**53)
        return self._lists


def launch_sample(sampler: Sampler, logits: torch.Tensor, seqs: list[Sequence], device_ops: bool,
                  host: torch.Tensor | None = None) -> Launched:
    """Sample each row of logits (B, V) without waiting for the device. `device_ops`: in PyTorch
    ops on the logits' device (a CUDA step; the tokens copied into `host`, a pinned fp64 buffer
    of >= 2B, behind an event); else `sampler.sample` (the CPU's kernels: the same bits as a
    synchronous step)."""
    if not device_ops:
        toks, lps, _ = sampler.sample(logits, seqs)
        return Launched(torch.tensor(toks, dtype=torch.long), lists=(toks, lps))
    with torch.inference_mode():  # (the logits are the runner's inference tensors)
        return _launch_on_device(sampler, logits, seqs, host)


def _launch_on_device(sampler: Sampler, logits: torch.Tensor, seqs: list[Sequence],
                      host: torch.Tensor | None) -> Launched:
    B, V = logits.shape
    dev = logits.device
    ignore = [i for i, s in enumerate(seqs) if s.params.ignore_eos]
    eos = [t for t in sampler.eos_token_ids if t < V]
    sampled = [i for i, s in enumerate(seqs) if s.params.temperature >= GREEDY_BELOW]
    fused = triton_sampling(logits) if sampler.triton else None
    if fused is not None and len(eos) > fused.MAX_EOS:
        fused = None
    # (B, V) fp32: the raw logits (an fp32 graph output is masked in place below); greedy rows
    # alone in the kernel read them as they are (bf16 widened per element: the same values)
    x = logits if fused is not None and not sampled else logits.float()
    if fused is not None:  # CUDA: argmax (eos masked where ignored), logprob, logsumexp in one pass
        flags = None
        if ignore and eos:
            flags = to_device([s.params.ignore_eos for s in seqs], dev, torch.int32)
        tokens, pair, lse = fused.greedy_rows(x, flags, _eos_ids(tuple(eos), dev) if flags is not None else None)
        if not sampled:
            return _copied(tokens, pair, host)
    else:
        lse = torch.logsumexp(x, dim=-1)  # (B,)
        tokens = None
    if ignore and eos and (tokens is None or sampled):  # (the raw logprob of a kept token is unchanged by the mask)
        # the value a device tensor: `x[rows, cols] = float("-inf")` made it a CPU scalar, which
        # index_put_ copied over with a blocking copy, waiting for the step in flight (H200
        # profile: 1.37 ms a launch in cudaStreamSynchronize, the flights serialized)
        neg_inf = torch.full((), float("-inf"), dtype=x.dtype, device=dev)
        x.index_put_((to_device(ignore, dev)[:, None], to_device(eos, dev)[None, :]), neg_inf)
    if tokens is None:
        tokens = x.argmax(dim=-1)  # (B,) the greedy rows' answer
    if sampled:
        us = []
        for i in sampled:  # one uniform number a row from its own generator, as `Sampler.sample`
            s = seqs[i]
            if s.generator is None:
                s.generator = make_generator(s.params.seed, s.sample_index)
            us.append(float(sampler._u.uniform_(generator=s.generator)))
        ps = [seqs[i].params for i in sampled]
        picked = draw_rows(x, sampled, [p.temperature for p in ps], us,
                           [min(p.top_k, V) or V for p in ps], [p.top_p for p in ps],
                           sampler.triton and sampler.triton_draw)
        tokens[to_device(sampled, dev)] = picked
    chosen = x.gather(1, tokens[:, None]).squeeze(1) - lse  # (B,) raw logprobs
    return _copied(tokens, torch.stack((tokens.double(), chosen.double())), host)  # (2, B)


def _copied(tokens: torch.Tensor, pair: torch.Tensor, host: torch.Tensor | None) -> Launched:
    """The launch of `tokens` (B,) with `pair` (2, B) fp64 copied into `host` behind an event (on
    CUDA; elsewhere `pair` as it is)."""
    if tokens.device.type != "cuda":
        return Launched(tokens, pair)
    B = tokens.shape[0]
    out = host[:2 * B].view(2, B)  # (contiguous: a strided destination would copy in two hops)
    out.copy_(pair, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return Launched(tokens, out, event)


_EOS: dict[tuple, torch.Tensor] = {}


def _eos_ids(eos: tuple[int, ...], dev: torch.device) -> torch.Tensor:
    """(E,) int32 eos ids on dev, made once per (ids, device)."""
    t = _EOS.get((eos, dev))
    if t is None:
        t = _EOS[(eos, dev)] = to_device(list(eos), dev, torch.int32)
    return t


@dataclass
class Flight:
    """A launched step: its plan, the sequence of each sampled row, its tokens."""

    scheduled: list[tuple[Sequence, int]]
    seqs: list[Sequence]
    launched: Launched
    feed: Feed | None  # what it read from the flight before it (its placeholders' sequences)


class DecodeAhead:
    """The engine's flights (see the module's Semantics)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.flight: Flight | None = None
        dev = next(engine.model.parameters()).device
        self.device_ops = dev.type == "cuda"
        self._host: list[torch.Tensor] = []  # two pinned (2 x max rows,) buffers, used in turn
        self._turn = 0
        self.launches = self.chains = 0  # counters (tests, benchmarks)
        self.mixed = 0  # chains whose plan also held other rows (admissions, prompt chunks)

    def eligible(self, seq: Sequence, pending: int) -> bool:
        """Whether seq's next draw needs nothing but its logits (with `pending` tokens of it
        still in flight)."""
        p = seq.params
        return not (p.presence_penalty or p.frequency_penalty or p.logit_bias or p.logprobs or p.structured
                    or p.prompt_logprobs is not None or p.max_tokens == 0
                    or (p.best_of > 1 and not seq.forked)
                    or (p.min_tokens and len(seq.token_ids) + pending - seq.num_prompt_tokens < p.min_tokens))

    def take_off(self, sched: SchedulerOutput, result: StepResult) -> bool:
        """Launch a step just run instead of landing it, if it may fly."""
        seqs = result.sample_seqs
        if result.prompt_logits or result.sample_logits is None:
            return False
        for s in seqs:
            if not self.eligible(s, 0):
                return False
        commit = self.engine.block_manager.commit
        for seq, n in sched.scheduled:  # (rows that do not sample: prompts still in chunks)
            seq.num_computed_tokens += n
            commit(seq)  # as a landed step, before the next plan (their KV is written first, in stream order)
        self.flight = Flight(sched.scheduled, seqs, self._launch(result.sample_logits, seqs), None)
        self.launches += 1
        return True

    def step(self) -> list[Request]:
        """Chain the next step if it may fly, land the one in flight; the requests it touched."""
        cur, self.flight = self.flight, None
        nxt = self._chain(cur)
        touched = self._land(cur, nxt)
        self.flight = nxt
        return touched

    def _launch(self, logits: torch.Tensor, seqs: list[Sequence]) -> Launched:
        host = None
        if self.device_ops and logits.device.type == "cuda":
            b = logits.shape[0]
            if not self._host or self._host[0].shape[0] < 2 * b:
                self._host = [torch.empty(2 * max(b, self.engine.config.max_num_seqs), dtype=torch.float64,
                                          pin_memory=True) for _ in range(2)]
            host, self._turn = self._host[self._turn], 1 - self._turn
        return launch_sample(self.engine.sampler, logits, seqs, self.device_ops, host)

    def _chain(self, cur: Flight) -> Flight | None:
        eng = self.engine
        sch, bm = eng.scheduler, eng.block_manager
        # 1) the sequences in flight that take a placeholder (not those cur's token ends by
        # length); every row the next step may sample must be eligible: theirs, the running
        # ones outside the flight (prompts in chunks), the waiting ones it could admit
        fed: dict[int, int] = {}  # seq_id -> its row in cur's tokens
        rows: list[Sequence] = []
        for i, s in enumerate(cur.seqs):
            if s.status is not _RUNNING:
                continue  # aborted, or finished by an earlier flight
            p, after = s.params, len(s.token_ids) + 1  # its tokens once cur lands
            if (p.max_tokens is not None and after - s.num_prompt_tokens >= p.max_tokens) or after >= eng.max_model_len:
                continue  # cur's token ends it by length
            if not self.eligible(s, 1):
                return None
            fed[s.seq_id] = i
            rows.append(s)
        if not rows:
            return None
        # decode rows alone (the steady state: every running sequence fed, none waiting) skip the
        # scheduler: one row each, as its plan would be (per row per step: kept plain)
        alone = not sch.waiting and len(sch.running) == len(rows) and len(rows) <= sch.max_num_batched_tokens
        if not alone:
            for s in sch.running:
                if s.seq_id not in fed and s.num_uncomputed and not self.eligible(s, 0):
                    return None
            for i, s in enumerate(sch.waiting):
                if i >= sch.max_num_seqs - len(sch.running):
                    break
                if not self.eligible(s, 0):
                    return None
            if not self._fits(sch, bm, fed):
                return None
        # 2) placeholders and room for them (else land first: the scheduler will preempt), then
        # the plan: the fed rows, or the scheduler's (admissions and prompt chunks too)
        for s in rows:
            s.token_ids.append(PLACEHOLDER)
        free = bm.num_free_blocks  # (a row's one new token takes at most one block: a new or a copied one)
        if len(sch.running) > free and sum(bm.append_cost(s) for s in sch.running) > free:
            for s in rows:
                s.token_ids.pop()
            return None
        if alone:
            for s in rows:
                bm.try_append(s)
            scheduled, copies = [(s, 1) for s in rows], bm.take_copies()
        else:
            plan = sch.schedule()
            if plan.preempted or sum(1 for s, _ in plan.scheduled if s.seq_id in fed) != len(rows):
                raise RuntimeError("decode_ahead: the plan preempted or left out a sequence in flight")
            scheduled, copies = plan.scheduled, plan.copies
            self.mixed += len(scheduled) != len(rows)
        feed = Feed(cur.launched.tokens, fed)
        result = eng.runner.run(scheduled, copies, feed)
        if alone:
            for s in rows:
                s.num_computed_tokens += 1
        else:
            for s, n in scheduled:
                s.num_computed_tokens += n
                if s.seq_id not in fed:  # (a fed row's block waits for its real token: `_land`)
                    bm.commit(s)
        self.chains += 1
        if result.sample_logits is None:  # (prompt chunks only: nothing to sample)
            return Flight(scheduled, [], Launched(torch.zeros(0, dtype=torch.long), lists=([], [])), feed)
        seqs = result.sample_seqs
        return Flight(scheduled, seqs, self._launch(result.sample_logits, seqs), feed)

    @staticmethod
    def _fits(sch, bm, fed: dict[int, int]) -> bool:
        """Whether the scheduler's first pass (running sequences oldest first, each its uncomputed
        tokens within the step's budget and row limit) reaches every fed sequence: a prompt chunk
        older than them could take the budget first. (Its arithmetic, before the placeholders.)"""
        budget, count, left = sch.max_num_batched_tokens, 0, len(fed)
        for s in sch.running_by_age():
            if left == 0:
                return True
            n = s.num_uncomputed + (s.seq_id in fed)
            if n == 0:
                continue
            if budget == 0 or count >= sch.max_num_seqs:
                return False
            if bm.path_keys and s.num_computed_tokens < s.num_prompt_tokens:
                n = min(n, s.num_prompt_tokens - s.num_computed_tokens)
            budget -= min(n, budget)
            count += 1
            left -= s.seq_id in fed
        return left == 0

    def _land(self, cur: Flight, nxt: Flight | None) -> list[Request]:
        eng = self.engine
        toks, lps = cur.launched.result()
        held = nxt.feed.src if nxt is not None else {}
        bm, seq_req, chained = eng.block_manager, eng._seq_req, cur.feed
        commit, bs = bm.commit, bm.block_size
        live, ltoks, llps = [], [], []
        touched: dict[str, Request] = {}
        for seq, tok, lp in zip(cur.seqs, toks, lps):
            if seq.status is not _RUNNING:
                continue  # aborted, or finished by the flight before: a wasted row
            # blocks to register: after a take-off any (a prompt chunk may have filled several);
            # after a chain only the block of the one position computed since the last landing
            # (the chained row's: the length counts its placeholder), when it is a block's last
            fills = chained is None or len(seq.token_ids) % bs == 0
            if seq.seq_id in held:  # its placeholder: the real token while its blocks register
                if fills:
                    seq.token_ids[-1] = tok
                    commit(seq)
                seq.token_ids.pop()  # (`_append` puts the token back)
            elif fills:
                commit(seq)
            live.append(seq)
            ltoks.append(tok)
            llps.append(lp)
            req = seq_req[seq.seq_id]
            touched[req.request_id] = req
        if len(cur.scheduled) != len(cur.seqs):  # rows that did not sample (prompts in chunks)
            for seq, _ in cur.scheduled:  # touch their requests too, as a landed step does
                req = seq_req.get(seq.seq_id) if seq.status is _RUNNING else None
                if req is not None:
                    touched.setdefault(req.request_id, req)
        eng._append(live, ltoks, llps, [None] * len(live))
        return list(touched.values())
