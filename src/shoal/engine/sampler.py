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
from .sequence import Sequence

_NEG_INF = float("-inf")


def make_generator(seed: int | None, sample_index: int, device="cpu") -> torch.Generator:
    """A generator for sample `sample_index` of a request.

    Args:
        seed: the request's seed; None seeds from fresh OS randomness.
        sample_index: which of the request's `best_of` samples this is; with a seed, each index
            gets its own reproducible stream.
        device: where the generator draws (must match the logits' device to avoid copies).
    """
    if seed is None:
        state = secrets.randbits(63)
    else:  # stable across processes (unlike hash()), and mixes both numbers
        digest = hashlib.blake2b(f"shoal:{seed}:{sample_index}".encode(), digest_size=8).digest()
        state = int.from_bytes(digest, "little") & (2**63 - 1)
    gen = torch.Generator(device=device)
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
    """Picks one token per row of a (B, V) logits batch.

    Semantics (the batched code must match this loop; V = vocab size, eos = `eos_token_ids`):

        for i, seq in enumerate(seqs):
            p, l = seq.params, logits[i].clone()
            raw = log_softmax(logits[i])
            c = bincount(seq.generated_ids, minlength=V)           # generated tokens only
            l -= p.frequency_penalty * c + p.presence_penalty * (c > 0)
            for j, b in (p.logit_bias or {}).items(): l[j] += b    # ids >= V are ignored
            if seq.num_generated < p.min_tokens: l[eos + p.stop_token_ids] = -inf
            if p.ignore_eos: l[eos] = -inf
            if p.temperature == 0:
                tok = argmax(l)                                    # no generator draw
            else:
                l = l / p.temperature
                if p.top_k: l[all but the top_k largest of l] = -inf
                if p.top_p < 1: in softmax(l) sorted descending, l[every token whose
                                preceding mass is >= top_p] = -inf # the top token stays
                q = empty(V).exponential_(generator=seq.generator)
                tok = argmax(softmax(l) / q)                       # a draw from softmax(l)
            out.append(SampleResult(tok, raw[tok], top `p.logprobs` of raw, or None))

    A sampled row whose `seq.generator` is None gets `make_generator(seed, sample_index)` first.
    """

    def __init__(self, eos_token_ids: list[int]):
        self.eos_token_ids = list(eos_token_ids)

    # ---- steps 2-5: penalties, bias, masks ------------------------------------------------------

    def process_logits(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """The logits after penalties, logit_bias and the eos/stop masks; before temperature.

        Args:
            logits: (B, V) raw logits; not modified.
            seqs: the B sequences, row i belongs to seqs[i].
        """
        B, V = logits.shape
        if len(seqs) != B:
            raise ValueError(f"logits has {B} rows but {len(seqs)} sequences were given")
        dev = logits.device
        l = logits.float()  # (B, V); copied before the first edit (`own`), so logits is untouched
        copied = l is not logits

        def own() -> torch.Tensor:
            nonlocal l, copied
            if not copied:
                l, copied = l.clone(), True
            return l

        # 2) penalties: counts only for the rows that ask for them
        pen = [i for i, s in enumerate(seqs) if s.params.needs_penalties and s.num_generated]
        if pen:
            hist = [seqs[i].generated_ids for i in pen]
            width = max(len(h) for h in hist)
            ids = torch.tensor([h + [0] * (width - len(h)) for h in hist], device=dev)  # (R, W)
            ones = torch.tensor([[1.0] * len(h) + [0.0] * (width - len(h)) for h in hist],
                                device=dev)
            counts = torch.zeros(len(pen), V, device=dev).scatter_add_(1, ids, ones)  # (R, V)
            fp = torch.tensor([seqs[i].params.frequency_penalty for i in pen], device=dev)
            pp = torch.tensor([seqs[i].params.presence_penalty for i in pen], device=dev)
            rows = torch.tensor(pen, device=dev)
            own()[rows] -= fp[:, None] * counts + pp[:, None] * (counts > 0).float()

        # 3) logit_bias
        b_rows, b_cols, b_vals = [], [], []
        for i, s in enumerate(seqs):
            for tok, val in (s.params.logit_bias or {}).items():
                if tok < V:
                    b_rows.append(i)
                    b_cols.append(tok)
                    b_vals.append(float(val))
        if b_rows:
            own().index_put_((torch.tensor(b_rows, device=dev), torch.tensor(b_cols, device=dev)),
                         torch.tensor(b_vals, device=dev), accumulate=True)

        # 4-5) min_tokens masks eos + stop ids; ignore_eos masks eos
        m_rows, m_cols = [], []
        for i, s in enumerate(seqs):
            banned = set()
            if s.num_generated < s.params.min_tokens:
                banned.update(self.eos_token_ids, s.params.stop_token_ids)
            if s.params.ignore_eos:
                banned.update(self.eos_token_ids)
            cols = [t for t in banned if t < V]
            m_rows += [i] * len(cols)
            m_cols += cols
        if m_rows:
            own()[torch.tensor(m_rows, device=dev), torch.tensor(m_cols, device=dev)] = _NEG_INF
        return l

    # ---- steps 6-7: pick ------------------------------------------------------------------------

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampleResult]:
        """One SampleResult per row of `logits` (B, V); row i belongs to seqs[i]."""
        B, V = logits.shape
        dev = logits.device
        l = self.process_logits(logits, seqs)  # (B, V)
        raw = logits.float()  # (B, V) for the logprobs
        lse = None
        if dev.type == "cpu" and kernels.usable(raw, l) and raw.stride(1) == 1 and l.stride(1) == 1:
            # one pass a row for argmax and logsumexp, each row alone (row-invariant)
            tokens, _, lse = kernels.row_stats(raw)
            if l is not logits:  # penalties, biases or masks changed the greedy answer's logits
                tokens = kernels.row_stats(l, with_lse=False)[0]
        else:
            tokens = l.argmax(dim=-1)  # (B,) greedy answer; sampled rows are overwritten below

        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if sampled:
            ps = [seqs[i].params for i in sampled]
            rows = torch.tensor(sampled, device=dev)
            temps = torch.tensor([p.temperature for p in ps], device=dev)
            ls = l[rows] / temps[:, None]  # (S, V)
            if any(p.top_k for p in ps) or any(p.top_p < 1.0 for p in ps):
                ls = _top_k_top_p(ls, [min(p.top_k, V) or V for p in ps],
                                  [p.top_p for p in ps])
            # argmax(softmax(l) / q) without the normalizing sum: exp(l - max) has the same
            # argmax, and max and exp are exact per row, so the draw cannot depend on how many
            # rows share the call (a row-sum's reduction order can; batch invariance)
            probs = (ls - ls.amax(dim=-1, keepdim=True)).exp_()  # (S, V), unnormalized
            q = torch.empty_like(probs)  # (S, V) Exp(1) noise, each row from its own generator
            for r, i in enumerate(sampled):
                seq = seqs[i]
                if seq.generator is None:
                    seq.generator = make_generator(seq.params.seed, seq.sample_index, dev)
                g = seq.generator
                q[r] = torch.empty(V, device=g.device).exponential_(generator=g).to(dev)
            q.clamp_(min=torch.finfo(q.dtype).tiny)
            tokens[rows] = (probs / q).argmax(dim=-1)

        # raw logprobs: logits[tok] - logsumexp, without materialising log_softmax for all rows
        # on CPU one row at a time: a (B, V) logsumexp splits its reductions differently as B
        # changes, so a row's logprob would depend on the batch (measured); a 1-D row's does
        # not. On a GPU (whose model math is not row-invariant anyway) in one call: per row it
        # cost 2 launches, 512 for 256 rows, ~40% of a decode step's host time (H200, measured)
        # (the CPU kernel above computed each row alone, like the per-row loop)
        if lse is None and dev.type == "cpu":
            lse = torch.stack([torch.logsumexp(raw[i], dim=-1) for i in range(B)])  # (B,)
        elif lse is None:
            lse = torch.logsumexp(raw, dim=-1)  # (B,)
        chosen = raw.gather(1, tokens[:, None]).squeeze(1) - lse  # (B,)
        ks = [s.params.logprobs for s in seqs]
        k_max = min(max((k for k in ks if k is not None), default=0), V)
        top_vals = top_ids = None
        if k_max:
            want = [i for i, k in enumerate(ks) if k]
            rows = torch.tensor(want, device=dev)
            v, ix = raw[rows].topk(k_max, dim=-1)  # (R, k_max), sorted highest first
            v = v - lse[rows, None]
            top_vals, top_ids = dict(zip(want, v.tolist())), dict(zip(want, ix.tolist()))

        out = []
        for i, (tok, lp, k) in enumerate(zip(tokens.tolist(), chosen.tolist(), ks)):
            top = None if k is None else (
                dict(zip(top_ids[i][:k], top_vals[i][:k])) if k else {})
            out.append(SampleResult(tok, lp, top))
        return out


def _top_k_top_p(l: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """`l` (S, V) with everything outside each row's top_k, then its nucleus, set to -inf.

    top_k[r] is in 1..V (V = off); top_p[r] in (0, 1] (1 = off).
    """
    S, V = l.shape
    dev = l.device
    sl, idx = l.sort(dim=-1, descending=True, stable=True)  # (S, V)
    rank = torch.arange(V, device=dev)
    k = torch.tensor(top_k, device=dev)
    sl = sl.masked_fill(rank[None, :] >= k[:, None], _NEG_INF)
    p = torch.tensor(top_p, device=dev)
    if (p < 1.0).any():
        probs = torch.softmax(sl, dim=-1)  # (S, V), descending
        before = probs.cumsum(dim=-1) - probs  # mass of the strictly better tokens
        drop = (before >= p[:, None]) & (p[:, None] < 1.0)
        drop[:, 0] = False
        sl = sl.masked_fill(drop, _NEG_INF)
    return torch.full_like(l, _NEG_INF).scatter_(1, idx, sl)


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
