"""Sampler: one next token per running sequence, from the last position's logits.

Applies OpenAI penalties, logit_bias, min_tokens / ignore_eos masks, temperature, top_k and top_p,
batched over rows; only the random draw is per row, with that row's own generator, so a seeded
request gives the same tokens whatever else is in the batch. Reports logprobs from the raw model
distribution. Not here: stop-string matching and finishing (output_processor.py), best_of ranking.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import torch

from .. import kernels
from .device_copy import to_device
from .device_draw import draw_rows
from .json_guide import StructuredOutput
from .sampling_params import GREEDY_BELOW
from .sequence import Sequence

_NEG_INF = float("-inf")

# How a seeded row turns its generator into tokens; it changes whenever the same seed and
# logits could give other tokens (the API's `system_fingerprint` carries it). "icdf1": one
# uniform number a row, the inverse CDF (before: V exponential draws a row).
SCHEME = "icdf1"


def make_generator(seed: int | None, sample_index: int) -> torch.Generator:
    """A CPU generator for sample `sample_index` of a request (a draw takes one number a row, on
    the host, whatever the logits' device: the same seed gives the same tokens on any device).

    Args:
        seed: the request's seed; None seeds from fresh OS randomness.
        sample_index: which of the request's `best_of` samples this is; with a seed, each index
            gets its own reproducible stream.
    """
    if seed is None:
        state = secrets.randbits(63)
    else:  # stable across processes (unlike hash()), and mixes both numbers
        digest = hashlib.blake2b(f"shoal:{seed}:{sample_index}".encode(), digest_size=8).digest()
        state = int.from_bytes(digest, "little") & (2**63 - 1)
    gen = torch.Generator()
    gen.manual_seed(state)
    return gen


@dataclass(slots=True)
class SampleResult:
    """The sampled token for one row, with logprobs under the raw model distribution."""

    token_id: int
    logprob: float
    """log_softmax of the raw logits (before penalties, bias, temperature) at `token_id`."""
    top_logprobs: dict[int, float] | None
    """The `params.logprobs` most likely raw tokens -> logprob, highest first; None when not
    asked for, {} when 0."""


class Sampler:
    """Picks one token per row of a (B, V) logits batch (float32 or bfloat16).

    Semantics (the batched code must match this loop; V = vocab size, eos = `eos_token_ids`):

        for i, seq in enumerate(seqs):
            p, l = seq.params, logits[i].float()
            raw = log_softmax(l)
            c = bincount(seq.generated_ids, minlength=V)           # generated tokens only
            l -= p.frequency_penalty * c + p.presence_penalty * (c > 0)
            for j, b in (p.logit_bias or {}).items(): l[j] += b    # ids >= V are ignored
            if seq.num_generated < p.min_tokens: l[eos + p.stop_token_ids] = -inf
            if p.ignore_eos: l[eos] = -inf
            if p.json_mode or p.json_schema: l[every token that cannot continue the row's JSON
                                                 object, or instance of the schema] = -inf
            if p.greedy:                                   # temperature < GREEDY_BELOW (1e-5)
                tok = argmax(l)                                    # no generator draw
            else:
                l = l / p.temperature
                if p.top_k: l[all but the top_k largest of l] = -inf
                if p.top_p < 1: in softmax(l) sorted descending, l[every token whose
                                preceding mass is >= top_p] = -inf # the top token stays
                u = uniform [0, 1) from seq.generator              # one fp64 number
                w = exp(l - max(l))                                # 0 where l = -inf
                tok = first j with sum(w[:j + 1]) > u * sum(w)     # inverse CDF of softmax(l)
            out.append(SampleResult(tok, raw[tok], top `p.logprobs` of raw, or None))

    A sampled row whose `seq.generator` is None gets `make_generator(seed, sample_index)` first.
    The sums' order is fixed per row (`kernels.sample_rows` on the CPU: blocks of 256; else a
    row's cumulative sum), so a row's draw does not depend on the other rows. On the CPU the
    kernel also applies the masks, top_k and top_p without copying or sorting the row (a
    histogram of the weights finds the bucket each cut falls in). Measured (SmolLM2-135M, bf16,
    2-vCPU EPYC, `bench/engine_throughput.py --temperature 1`): 32 streams at temperature 1 went
    from 175-274 to 396-424 tok/s; V exponential draws a row (Exp(1) noise, argmax(softmax(l) /
    q)) took ~1 ms a row at V = 49152, and top_p's sort of the row 4.5 ms (now ~0.1 ms).
    """

    def __init__(self, eos_token_ids: list[int], triton: bool = True, tokenizer=None):
        self.eos_token_ids = list(eos_token_ids)
        self.structured = StructuredOutput(tokenizer, self.eos_token_ids)  # JSON mode, schemas
        self.triton = triton  # CUDA logits: the Triton sampling kernels (`EngineConfig.triton_kernels`)
        # ... and for sampled rows' draws too: off until understood (H200, temperature 1, 256
        # requests: ITL p50 4.97 -> 4.46 ms on the Llama-3.2-1B shape, but 4.73 -> 7.56-8.15 ms
        # on SmolLM2-135M's, TTFT 109 -> 185-198 ms; `bench/gpu_engine.py --modes fuseddraw`)
        self.triton_draw = False
        self._u = torch.empty(1, dtype=torch.float64)  # one uniform draw at a time

    # ---- steps 2-5: penalties, bias, masks ------------------------------------------------------

    def process_logits(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """The logits after penalties, logit_bias and the eos/stop masks, before temperature: a
        new (B, V) fp32 tensor (logits is not modified).

        Args:
            logits: (B, V) raw logits.
            seqs: the B sequences, row i belongs to seqs[i].
        """
        B, V = logits.shape
        if len(seqs) != B:
            raise ValueError(f"logits has {B} rows but {len(seqs)} sequences were given")
        l = logits.float()
        l = l.clone() if l is logits else l
        self._edit_(l, seqs)
        return l

    def _banned(self, s: Sequence, V: int) -> list[int]:
        """Token ids the eos/stop masks set to -inf for this row now."""
        p = s.params
        if p.min_tokens and s.num_generated < p.min_tokens:
            return [t for t in {*self.eos_token_ids, *p.stop_token_ids} if t < V]
        if p.ignore_eos:
            return [t for t in self.eos_token_ids if t < V]
        return []

    @staticmethod
    def _shifts(s: Sequence, V: int) -> bool:
        """Whether penalties or logit_bias change this row's logits now."""
        p = s.params
        return bool(p.needs_penalties and s.num_generated) or bool(
            p.logit_bias and any(t < V for t in p.logit_bias))

    def _edit_(self, l: torch.Tensor, seqs: list[Sequence]) -> None:
        """Steps 2-5 (and JSON mode's mask) on l (B, V) fp32, in place."""
        B, V = l.shape
        dev = l.device
        # 2) penalties: counts only for the rows that ask for them, and only of the tokens they
        # generated (one sort of (row, token) keys; the (B, V) tensors this used to build cost
        # ~9 passes over the rows' logits)
        pen = [i for i, s in enumerate(seqs) if s.params.needs_penalties and s.num_generated]
        if pen:
            keys = torch.tensor([i * V + t for i in pen for t in seqs[i].generated_ids], device=dev)
            keys, counts = torch.unique(keys, return_counts=True)  # (K,) distinct (row, token)
            rows, cols = keys // V, keys % V
            fp = torch.tensor([s.params.frequency_penalty for s in seqs], device=dev)  # (B,)
            pp = torch.tensor([s.params.presence_penalty for s in seqs], device=dev)
            l.index_put_((rows, cols), -(fp[rows] * counts.float() + pp[rows]), accumulate=True)

        # 3) logit_bias
        b_rows, b_cols, b_vals = [], [], []
        for i, s in enumerate(seqs):
            for tok, val in (s.params.logit_bias or {}).items():
                if tok < V:
                    b_rows.append(i)
                    b_cols.append(tok)
                    b_vals.append(float(val))
        if b_rows:
            l.index_put_((torch.tensor(b_rows, device=dev), torch.tensor(b_cols, device=dev)),
                         torch.tensor(b_vals, device=dev), accumulate=True)

        # 4-5) min_tokens masks eos + stop ids; ignore_eos masks eos
        m_rows, m_cols = [], []
        for i, s in enumerate(seqs):
            cols = self._banned(s, V)
            m_rows += [i] * len(cols)
            m_cols += cols
        if m_rows:
            l[torch.tensor(m_rows, device=dev), torch.tensor(m_cols, device=dev)] = _NEG_INF

        # 5b) structured output: the tokens that cannot continue the row's JSON object or
        # instance of its schema (`json_guide`)
        # (the rows' masks in one (R, V) copy to the logits' device)
        rows = [i for i, s in enumerate(seqs) if s.params.structured]
        if rows:
            allowed = torch.stack([self.structured.mask(seqs[i], V) for i in rows]).to(dev)  # (R, V)
            idx = torch.tensor(rows, device=dev)
            l[idx] = l[idx].masked_fill_(~allowed, _NEG_INF)

    # ---- steps 6-7: pick ------------------------------------------------------------------------

    def draw_uniform(self, generator: torch.Generator) -> float:
        """A sampled row's number for its draw (one from its generator, in [0, 1))."""
        return float(self._u.uniform_(generator=generator))

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampleResult]:
        """One SampleResult per row of `logits` (B, V); row i belongs to seqs[i]."""
        return [SampleResult(*r) for r in zip(*self.sample(logits, seqs))]

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]
               ) -> tuple[list[int], list[float], list[dict[int, float] | None]]:
        """`__call__`'s results as columns (the engine's per-step call: no object a row):
        token ids, their raw logprobs, and the top alternatives (None where not asked for)."""
        B, V = logits.shape
        if len(seqs) != B:
            raise ValueError(f"logits has {B} rows but {len(seqs)} sequences were given")
        dev = logits.device
        fast = dev.type == "cpu" and kernels.usable(logits) and logits.stride(1) == 1
        raw = logits if fast else logits.float()  # (B, V); the CPU kernels read bf16 as it is
        # 1) the raw distribution: argmax (an unedited greedy row's answer) and logsumexp, each
        # row alone on the CPU (a (B, V) logsumexp splits its reductions differently as B
        # changes, so a row's logprob would depend on the batch: measured); on a GPU (whose model
        # math is not row-invariant anyway) in one call: per row it cost 2 launches, 512 for
        # 256 rows, ~40% of a decode step's host time (H200, measured)
        # `top_lp` (B,): each row's raw argmax logprob, max - logsumexp (a row that keeps its
        # argmax needs no gather below); on a GPU ids and logprobs come back in one copy
        if fast:
            tokens, mx, lse = kernels.row_stats(raw)
            toks, top_lp = tokens.tolist(), (mx - lse).tolist()
        elif dev.type == "cpu":
            mx, tokens = raw.max(dim=-1)
            lse = torch.stack([torch.logsumexp(raw[i], dim=-1) for i in range(B)])  # (B,)
            toks, top_lp = tokens.tolist(), (mx - lse).tolist()
        else:
            mx, tokens = raw.max(dim=-1)
            lse = torch.logsumexp(raw, dim=-1)
            both = torch.stack((tokens.double(), (mx - lse).double())).tolist()  # (2, B): ids exact below 2**53
            toks, top_lp = [int(t) for t in both[0]], both[1]
        argmax = list(toks)

        # 2) rows whose logits the penalties or bias change get a fp32 copy `le` (E, V) with the
        # edits. Masks alone (min_tokens, ignore_eos: a few ids) copy nothing: a greedy row keeps
        # its raw argmax unless that is masked (then it is copied); a sampled row's draw skips
        # the ids (`kernels.sample_rows`; copied where the kernels do not run)
        # (one pass a row, plain: a row with no penalty, bias or min_tokens reads four fields)
        edit: list[int] = []
        masks: dict[int, list[int]] = {}  # row -> ids its draw skips
        sampled: list[int] = []  # rows that draw (not greedy)
        ks: list[int | None] = []  # rows' `logprobs`
        eos = [t for t in self.eos_token_ids if t < V]
        for i, s in enumerate(seqs):
            p = s.params
            ks.append(p.logprobs)
            greedy = p.temperature < GREEDY_BELOW
            if not greedy:
                sampled.append(i)
            if p.structured:  # its mask: a greedy row keeps an allowed raw argmax, a sampled
                # row's CPU draw skips a short list of left-out ids (in a string: the few tokens
                # that close or break it); else a copy with every edit
                if self._shifts(s, V):
                    edit.append(i)
                    continue
                guide, states = self.structured.guide(s, V)
                if greedy:
                    if not guide.vocab.mask(states, guide.grammar)[toks[i]]:
                        edit.append(i)
                elif fast and (ban := guide.vocab.banned(states, guide.grammar)) is not None:
                    masks[i] = ban
                else:
                    edit.append(i)
                continue
            if p.presence_penalty or p.frequency_penalty or p.logit_bias or p.min_tokens:
                if self._shifts(s, V):
                    edit.append(i)
                    continue
                ban = self._banned(s, V)
            elif p.ignore_eos:
                ban = eos
            else:
                continue
            if ban:
                if (toks[i] in ban) if greedy else not fast:
                    edit.append(i)
                elif not greedy:
                    masks[i] = ban
        le = None
        if edit:
            le = raw[torch.tensor(edit, device=dev)].float()  # (E, V), a copy
            self._edit_(le, [seqs[i] for i in edit])
            greedy = [r for r, i in enumerate(edit) if seqs[i].params.greedy]
            if greedy:
                sub = le[torch.tensor(greedy, device=dev)] if len(greedy) < len(edit) else le
                e_arg = (kernels.row_stats(sub, with_lse=False)[0] if fast else sub.argmax(dim=-1)).tolist()
                for r, t in zip(greedy, e_arg):
                    toks[edit[r]] = t
        at = {i: r for r, i in enumerate(edit)}  # row i's edited logits are le[at[i]]

        # 3) sampled rows: one uniform number each, from the row's own generator; then one draw
        # from the raw or the edited logits (top_k / top_p on the PyTorch path: from a filtered
        # copy, `device_draw._top_k_top_p`)
        drawn: dict[bool, list[int]] = {False: [], True: []}  # edited? -> rows
        us: dict[int, float] = {}
        for i in sampled:
            s = seqs[i]
            p = s.params
            if s.generator is None:
                s.generator = make_generator(p.seed, s.sample_index)
            us[i] = self.draw_uniform(s.generator)
            drawn[i in at].append(i)
        for edited, rows in drawn.items():
            if not rows:
                continue
            src = le if edited else raw
            ps = [seqs[i].params for i in rows]
            picked = self._draw(src, [at[i] for i in rows] if edited else rows, [p.temperature for p in ps],
                                [us[i] for i in rows], [masks.get(i, []) for i in rows],
                                [min(p.top_k, V) or V for p in ps], [p.top_p for p in ps])
            for i, t in zip(rows, picked):
                toks[i] = t

        # 4) raw logprobs: logits[tok] - logsumexp (gathered for the rows whose token is not
        # their argmax: edited or drawn)
        chosen = top_lp
        moved = [i for i in range(B) if toks[i] != argmax[i]] if edit or sampled else []
        if moved:
            rows_t = torch.tensor(moved, device=dev)
            tok_t = torch.tensor([toks[i] for i in moved], device=dev)
            got = (raw[rows_t, tok_t].float() - lse[rows_t]).tolist()  # (M,)
            chosen = list(top_lp)
            for i, v in zip(moved, got):
                chosen[i] = v
        k_max = min(max((k for k in ks if k is not None), default=0), V)
        top_vals = top_ids = None
        if k_max:
            want = [i for i, k in enumerate(ks) if k]
            rows = torch.tensor(want, device=dev)
            v, ix = raw[rows].float().topk(k_max, dim=-1)  # (R, k_max), sorted highest first
            v = v - lse[rows, None]
            top_vals, top_ids = dict(zip(want, v.tolist())), dict(zip(want, ix.tolist()))

        tops: list[dict[int, float] | None] = [None] * B
        for i, k in enumerate(ks):
            if k is not None:
                tops[i] = dict(zip(top_ids[i][:k], top_vals[i][:k])) if k else {}
        return toks, chosen, tops

    def _draw(self, src: torch.Tensor, rows: list[int], temps: list[float], us: list[float],
              masks: list[list[int]], top_k: list[int], top_p: list[float]) -> list[int]:
        """For each listed row of src (*, V): its draw at u (steps 6-7 of the Semantics), its
        `masks` ids at -inf (rows with masks reach here only where the kernel runs: elsewhere
        they were copied and edited)."""
        dev = src.device
        if dev.type == "cpu" and kernels.usable(src) and src.stride(1) == 1:
            return kernels.sample_rows(src, torch.tensor(rows), torch.tensor(temps, dtype=torch.float32),
                                       torch.tensor(us, dtype=torch.float64), masks, top_k, top_p).tolist()
        assert not any(masks), "masked rows are copied and edited where the kernels do not run"
        return draw_rows(src, rows, temps, us, top_k, top_p, self.triton and self.triton_draw).tolist()


def prompt_logprobs(logits: torch.Tensor, next_ids: list[int],
                    k: int) -> list[tuple[float, dict[int, float]]]:
    """Logprobs of the prompt tokens, from the raw distribution.

    Args:
        logits: (T, V) logits at T prompt positions.
        next_ids: next_ids[t] is the token that actually follows position t.
        k: alternatives per position (0 gives {}).

    Returns:
        Per position: (logprob of next_ids[t], {top-k id: logprob}, highest first).
    """
    T = logits.shape[0]
    if len(next_ids) != T:
        raise ValueError(f"logits has {T} positions but {len(next_ids)} next ids were given")
    raw = logits.float()
    lse = torch.logsumexp(raw, dim=-1)  # (T,)
    nxt = torch.tensor(next_ids, device=raw.device)
    chosen = (raw.gather(1, nxt[:, None]).squeeze(1) - lse).tolist()  # (T,)
    if not k:
        return [(c, {}) for c in chosen]
    v, ix = raw.topk(min(k, raw.shape[1]), dim=-1)  # (T, k)
    v = (v - lse[:, None]).tolist()
    return [(c, dict(zip(i, vv))) for c, i, vv in zip(chosen, ix.tolist(), v)]
