"""Sampler: the batched sampler against a per-row reference loop, each logits processor on its
own, logprob outputs, and per-request determinism under batching."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from shoal import kernels
from shoal.engine.sampler import Sampler, SampleResult, make_generator, prompt_logprobs
from shoal.engine.sampling_params import SamplingParams
from shoal.engine.sequence import Sequence

V = 50
EOS = [0]


def _seq(params: SamplingParams, generated=(), prompt=(7, 8, 9), *, gen_seed=None, idx=0):
    s = Sequence("r", list(prompt), params, sample_index=idx)
    for t in generated:
        s.append_token(t)
    if gen_seed is not None:
        s.generator = make_generator(gen_seed, idx)
    return s


def _logits(b: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(b, V, generator=torch.Generator().manual_seed(seed)) * scale


def _reference(row: torch.Tensor, seq: Sequence, eos: list[int]) -> SampleResult:
    """The Semantics loop of Sampler, one row at a time, written independently."""
    p = seq.params
    raw = torch.log_softmax(row, dim=-1)
    l = row.clone()
    c = torch.bincount(torch.tensor(seq.generated_ids, dtype=torch.long), minlength=V).float()
    l = l - p.frequency_penalty * c - p.presence_penalty * (c > 0).float()
    for j, b in (p.logit_bias or {}).items():
        l[j] += b
    if seq.num_generated < p.min_tokens:
        l[eos + p.stop_token_ids] = -math.inf
    if p.ignore_eos:
        l[eos] = -math.inf
    if p.temperature < 1e-5:
        tok = int(l.argmax())
    else:
        l = l / p.temperature
        if p.top_k:
            kth = l.sort(descending=True).values[p.top_k - 1]
            l[l < kth] = -math.inf
        if p.top_p < 1:
            probs = torch.softmax(l, dim=-1).tolist()
            mass = 0.0
            for rank, j in enumerate(sorted(range(V), key=lambda j: -probs[j])):
                if rank > 0 and mass >= p.top_p:
                    l[j] = -math.inf
                mass += probs[j]
        u = float(torch.empty(1, dtype=torch.float64).uniform_(generator=seq.generator))
        cdf = torch.softmax(l.double(), dim=-1).cumsum(0).tolist()
        tok = next(j for j, c in enumerate(cdf) if c > u * cdf[-1])
    top = None
    if p.logprobs is not None:
        order = sorted(range(V), key=lambda j: -float(raw[j]))[: p.logprobs]
        top = {j: float(raw[j]) for j in order}
    return SampleResult(tok, float(raw[tok]), top)


MIXED = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.0, frequency_penalty=1.5, presence_penalty=0.5, logprobs=3),
    SamplingParams(temperature=1.0, seed=1),
    SamplingParams(temperature=0.7, top_k=5, frequency_penalty=0.8, logprobs=0),
    SamplingParams(temperature=1.3, top_p=0.6, presence_penalty=-1.0),
    SamplingParams(temperature=1.0, top_k=10, top_p=0.8, logit_bias={3: 5.0, 4: -100.0}),
    SamplingParams(temperature=0.9, min_tokens=4, stop_token_ids=[2], logprobs=5),
    SamplingParams(temperature=1.0, ignore_eos=True, logit_bias={0: 8.0}, max_tokens=100),
    SamplingParams(temperature=0.0, min_tokens=2, logit_bias={0: 50.0}),
]


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_batched_equals_reference_loop(cpu_kernels):
    """With the CPU kernels and on the PyTorch path (GPUs, CPUs without a compiler)."""
    with contextlib.nullcontext() if cpu_kernels else kernels.disabled():
        _batched_equals_reference_loop()


def _batched_equals_reference_loop():
    sampler = Sampler(EOS)
    mk = lambda: [_seq(p, generated=[i, i + 1, i], gen_seed=100 + i)  # noqa: E731
                  for i, p in enumerate(MIXED)]
    batched, single = mk(), mk()
    for step in range(8):
        logits = _logits(len(MIXED), seed=step)
        before = logits.clone()
        got = sampler(logits, batched)
        want = [_reference(logits[i], s, EOS) for i, s in enumerate(single)]
        assert torch.equal(logits, before), "the sampler must not modify its input"
        for i, (g, w) in enumerate(zip(got, want)):
            assert g.token_id == w.token_id, (step, i)
            assert g.logprob == pytest.approx(w.logprob, abs=1e-5)
            assert (g.top_logprobs is None) == (w.top_logprobs is None)
            if w.top_logprobs is not None:
                assert list(g.top_logprobs) == list(w.top_logprobs)
                assert list(g.top_logprobs.values()) == pytest.approx(
                    list(w.top_logprobs.values()), abs=1e-5)
            batched[i].append_token(g.token_id)
            single[i].append_token(w.token_id)


def test_penalties_follow_openai_formula_over_generated_tokens_only():
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    seq = _seq(p, generated=[3, 3, 5, 3], prompt=[7, 7, 3])
    logits = _logits(1, seed=0)
    out = Sampler(EOS).process_logits(logits, [seq])
    want = logits.clone()
    want[0, 3] -= 0.5 * 3 + 0.25
    want[0, 5] -= 0.5 * 1 + 0.25
    torch.testing.assert_close(out, want)  # token 7 (prompt only) is untouched
    plain = Sampler(EOS).process_logits(logits, [_seq(SamplingParams(), generated=[3, 5])])
    torch.testing.assert_close(plain, logits)


def test_logit_bias_forces_and_forbids():
    logits = _logits(1, seed=1)
    target = int(logits[0].argmin())
    greedy = _seq(SamplingParams(temperature=0, logit_bias={target: 100.0}))
    assert Sampler(EOS)(logits, [greedy])[0].token_id == target

    top = int(logits[0].argmax())
    n = 300
    seqs = [_seq(SamplingParams(temperature=1.0, logit_bias={top: -100.0}), gen_seed=s)
            for s in range(n)]
    toks = [r.token_id for r in Sampler(EOS)(logits.expand(n, V), seqs)]
    assert top not in toks
    free = [_seq(SamplingParams(temperature=1.0), gen_seed=s) for s in range(n)]
    assert top in [r.token_id for r in Sampler(EOS)(logits.expand(n, V), free)]


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    sampler = Sampler(EOS)
    logits = torch.zeros(1, V)
    logits[0, 0], logits[0, 2] = 10.0, 9.0  # eos best, stop token second
    seq = _seq(SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[2]))
    for _ in range(3):
        l = sampler.process_logits(logits, [seq])
        assert l[0, 0] == -math.inf and l[0, 2] == -math.inf
        tok = sampler(logits, [seq])[0].token_id
        assert tok not in (0, 2)
        seq.append_token(tok)
    l = sampler.process_logits(logits, [seq])
    assert torch.isfinite(l).all()
    assert sampler(logits, [seq])[0].token_id == 0

    forever = _seq(SamplingParams(temperature=0, ignore_eos=True, stop_token_ids=[2]),
                   generated=[5] * 10)
    assert sampler(logits, [forever])[0].token_id == 2  # eos masked, stop ids are not


def test_top_k_one_and_tiny_top_p_equal_greedy():
    logits = _logits(6, seed=2)
    hist = [[1, 2], [], [3, 3, 3], [4], [5, 6], [7]]
    sampler = Sampler(EOS)
    for extra in (dict(top_k=1), dict(top_p=0.01)):
        greedy = [_seq(SamplingParams(temperature=0, frequency_penalty=1.0), h) for h in hist]
        sampled = [_seq(SamplingParams(temperature=1.0, frequency_penalty=1.0, **extra), h,
                        gen_seed=i) for i, h in enumerate(hist)]
        want = [r.token_id for r in sampler(logits, greedy)]
        assert [r.token_id for r in sampler(logits, sampled)] == want


def test_draws_stay_inside_top_k_and_nucleus():
    logits = _logits(1, seed=3, scale=1.0)
    n = 200
    probs = torch.softmax(logits[0], dim=-1)
    order = probs.argsort(descending=True).tolist()
    topk_set = set(order[:5])
    mass, nucleus = 0.0, set()
    for j in order:
        if mass >= 0.5:
            break
        nucleus.add(j)
        mass += float(probs[j])
    for params, allowed in ((SamplingParams(top_k=5), topk_set),
                            (SamplingParams(top_p=0.5), nucleus)):
        seqs = [_seq(params, gen_seed=s) for s in range(n)]
        toks = {r.token_id for r in Sampler(EOS)(logits.expand(n, V), seqs)}
        assert toks <= allowed
        assert len(toks) > 1  # it does sample

    # the smallest prefix whose mass reaches top_p: 0.40 < 0.5, so the 0.35 token stays too
    three = torch.tensor([[0.40, 0.35, 0.25]]).log()
    seqs = [_seq(SamplingParams(top_p=0.5), gen_seed=s) for s in range(n)]
    toks = {r.token_id for r in Sampler([99])(three.expand(n, 3), seqs)}
    assert toks == {0, 1}


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_draws_follow_the_tempered_distribution(temperature):
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    n = 4000
    g = make_generator(7, 0)
    seqs = [_seq(SamplingParams(temperature=temperature)) for _ in range(n)]
    for s in seqs:
        s.generator = g  # one shared stream: draws are consecutive
    toks = torch.tensor([r.token_id for r in Sampler([99])(logits.expand(n, 5), seqs)])
    freq = torch.bincount(toks, minlength=5).float() / n
    torch.testing.assert_close(freq, torch.softmax(logits[0] / temperature, -1), atol=0.03,
                               rtol=0)


def test_logprobs_come_from_the_raw_distribution():
    logits = _logits(3, seed=4)
    params = [SamplingParams(temperature=0.5, logprobs=4, frequency_penalty=2.0,
                             logit_bias={1: 30.0}),
              SamplingParams(temperature=0, logprobs=0), SamplingParams(temperature=0)]
    seqs = [_seq(p, generated=[1, 2], gen_seed=i) for i, p in enumerate(params)]
    out = Sampler(EOS)(logits, seqs)
    raw = torch.log_softmax(logits, dim=-1)
    for i, r in enumerate(out):
        assert r.logprob == pytest.approx(float(raw[i, r.token_id]), abs=1e-5)
    assert out[0].token_id == 1  # the bias moved the pick, not the reported logprobs
    top = out[0].top_logprobs
    assert len(top) == 4
    vals = list(top.values())
    assert vals == sorted(vals, reverse=True)
    want_ids = raw[0].topk(4).indices.tolist()
    assert list(top) == want_ids
    assert vals == pytest.approx(raw[0, want_ids].tolist(), abs=1e-5)
    assert out[1].top_logprobs == {}
    assert out[2].top_logprobs is None


def test_seeded_row_is_the_same_alone_and_in_a_batch():
    target = SamplingParams(temperature=0.8, top_p=0.9, frequency_penalty=0.5, seed=42)
    others = [SamplingParams(temperature=0), SamplingParams(temperature=1.5, top_k=3),
              SamplingParams(temperature=1.0, seed=42), SamplingParams(top_p=0.3, logprobs=2),
              SamplingParams(temperature=0, presence_penalty=2.0), SamplingParams(),
              SamplingParams(temperature=0.5, logit_bias={5: 10.0}),
              SamplingParams(min_tokens=10, stop_token_ids=[3])]
    sampler = Sampler(EOS)
    alone = _seq(target, gen_seed=42)
    mates = [_seq(p, gen_seed=42, idx=i + 1) for i, p in enumerate(others)]
    inside = _seq(target, gen_seed=42)
    batch = mates[:3] + [inside] + mates[3:]
    pos = 3
    solo_toks, batch_toks = [], []
    for step in range(20):
        row = _logits(1, seed=1000 + step)
        big = _logits(len(batch), seed=step)
        big[pos] = row[0]
        a = sampler(row, [alone])[0].token_id
        out = sampler(big, batch)
        alone.append_token(a)
        for s, r in zip(batch, out):
            s.append_token(r.token_id)
        solo_toks.append(a)
        batch_toks.append(out[pos].token_id)
    assert solo_toks == batch_toks
    assert len(set(solo_toks)) > 3  # a real sampled stream, not a constant


def test_make_generator_streams():
    draw = lambda g: torch.rand(16, generator=g)  # noqa: E731
    assert torch.equal(draw(make_generator(5, 0)), draw(make_generator(5, 0)))
    assert not torch.equal(draw(make_generator(5, 0)), draw(make_generator(5, 1)))
    assert not torch.equal(draw(make_generator(5, 0)), draw(make_generator(6, 0)))
    assert not torch.equal(draw(make_generator(None, 0)), draw(make_generator(None, 0)))


def test_greedy_rows_leave_their_generator_alone_and_missing_ones_are_made():
    greedy = _seq(SamplingParams(temperature=0), gen_seed=3)
    state = greedy.generator.get_state().clone()
    Sampler(EOS)(_logits(1, seed=5), [greedy])
    assert torch.equal(greedy.generator.get_state(), state)

    lazy = _seq(SamplingParams(seed=9), idx=2)
    tok = Sampler(EOS)(_logits(1, seed=5), [lazy])[0].token_id
    assert lazy.generator is not None
    ref = _seq(SamplingParams(seed=9), idx=2, gen_seed=9)
    assert _reference(_logits(1, seed=5)[0], ref, EOS).token_id == tok


def test_prompt_logprobs_match_log_softmax():
    logits = _logits(6, seed=6)
    nxt = [4, 0, 49, 7, 7, 1]
    raw = torch.log_softmax(logits, dim=-1)
    out = prompt_logprobs(logits, nxt, k=3)
    assert len(out) == 6
    for t, (lp, top) in enumerate(out):
        assert lp == pytest.approx(float(raw[t, nxt[t]]), abs=1e-5)
        ids = raw[t].topk(3).indices.tolist()
        assert list(top) == ids
        assert list(top.values()) == pytest.approx(raw[t, ids].tolist(), abs=1e-5)
    assert all(top == {} for _, top in prompt_logprobs(logits, nxt, k=0))
    with pytest.raises(ValueError):
        prompt_logprobs(logits, nxt[:-1], k=1)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_rows_draw_and_logprobs_are_bit_identical_alone_and_in_a_batch(threads):
    """At a real vocabulary size, where (B, V) reductions change their split with B: a seeded
    row samples the same token with the same logprob bits alone and among 31 other rows."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        vocab = 49152
        logits = torch.randn(32, vocab, generator=torch.Generator().manual_seed(5)) * 4
        params = SamplingParams(temperature=1.0, seed=11, logprobs=3)
        sampler = Sampler(EOS)
        alone = sampler(logits[7:8].clone(), [_seq(params)])[0]
        others = [_seq(SamplingParams(temperature=0.7 + 0.01 * i, seed=i, logprobs=2)) for i in range(32)]
        others[7] = _seq(params)
        mixed = sampler(logits.clone(), others)[7]
        assert mixed.token_id == alone.token_id
        assert mixed.logprob == alone.logprob  # exact float equality: the same bits
        assert mixed.top_logprobs == alone.top_logprobs
    finally:
        torch.set_num_threads(before)


def test_bf16_logits_give_what_their_fp32_values_give():
    """The engine hands a bf16 head's logits over as they are: the same draws and logprobs as
    their (exact) fp32 upcast, on every kind of row."""
    logits = _logits(len(MIXED), seed=9).bfloat16()
    mk = lambda: [_seq(p, generated=[i, i + 1], gen_seed=200 + i) for i, p in enumerate(MIXED)]  # noqa: E731
    a, b = mk(), mk()
    for _ in range(4):
        got = Sampler(EOS)(logits, a)
        want = Sampler(EOS)(logits.float(), b)
        assert got == want
        for s, r in zip(a + b, got + want):
            s.append_token(r.token_id)


def test_masked_sampled_rows_never_draw_a_masked_token():
    """ignore_eos / min_tokens on sampled rows: the kernel skips the ids without a copy; the
    eos token is the likeliest and still never drawn, and the rest follow the masked softmax."""
    logits = torch.tensor([[3.0, 1.0, 0.5, 0.0, -1.0]])
    n = 3000
    g = make_generator(3, 0)
    seqs = [_seq(SamplingParams(temperature=1.0, ignore_eos=True)) for _ in range(n)]
    for s in seqs:
        s.generator = g
    toks = torch.tensor([r.token_id for r in Sampler(EOS)(logits.expand(n, 5), seqs)])
    assert not (toks == 0).any()
    freq = torch.bincount(toks, minlength=5).float() / n
    want = torch.softmax(torch.tensor([-math.inf, 1.0, 0.5, 0.0, -1.0]), -1)
    torch.testing.assert_close(freq, want, atol=0.03, rtol=0)


def test_a_temperature_that_rounds_to_zero_is_greedy():
    """5e-324 passes `temperature >= 0` but is 0 in fp32: dividing by it gave NaN logits."""
    logits = _logits(3, seed=8)
    for t in (5e-324, 1e-7):
        seqs = [_seq(SamplingParams(temperature=t), gen_seed=i) for i in range(3)]
        assert [r.token_id for r in Sampler(EOS)(logits, seqs)] == logits.argmax(-1).tolist()
