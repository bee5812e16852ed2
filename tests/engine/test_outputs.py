"""Request outputs hold their totals (text, token ids, logprobs) as prefixes of the sequence's
lists, copied only when read: an output taken mid-stream keeps what it had then, whatever the
engine appends later."""

from __future__ import annotations

import random

from shoal.engine.output_processor import SeqState
from shoal.engine.outputs import Prefix, TextPrefix
from shoal.engine.sampling_params import SamplingParams
from tests.engine.test_llm_engine import make_llm, prompts


def test_totals_stay_as_they_were_when_the_output_was_made(tiny_llama):
    eng = make_llm(tiny_llama, speculative_tokens=0).engine  # (one token a step)
    eng.add_request("a", prompts(1, seed=50)[0], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                                 logprobs=1))
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    assert len(outs) == 12
    first, last = outs[0].outputs[0], outs[-1].outputs[0]
    assert isinstance(first._token_ids, Prefix) and isinstance(first._logprobs, Prefix)  # not copied yet
    assert isinstance(first._text, TextPrefix) and isinstance(last._text, TextPrefix)
    assert last.text.startswith(first.text) and last.text == "".join(o.outputs[0].text_delta for o in outs)
    assert first.num_tokens == 1 and len(first.token_ids) == 1 and len(first.logprobs) == 1
    assert isinstance(first._token_ids, list)  # copied on first read, then kept
    assert last.token_ids[:1] == first.token_ids and last.num_tokens == 12 == len(last.logprobs)
    assert [o.outputs[0].num_tokens for o in outs] == list(range(1, 13))
    # the deltas spell the totals
    assert sum((o.outputs[0].token_ids_delta for o in outs), []) == last.token_ids
    assert outs[5].outputs[0] == outs[5].outputs[0] and outs[5].outputs[0] != outs[6].outputs[0]


def test_prefix_reads_its_span_only():
    src = [1, 2, 3]
    p = Prefix(src, 1, 3)
    src += [4, 5]
    assert p.get() == [2, 3] and p == [2, 3] and p == Prefix(src, 1, 3) and repr(p) == "[2, 3]"


def test_text_state_reads_its_end_and_cuts():
    """A sequence's text as its deltas: `tail(k)` is the text's last k chars, a cut keeps a
    prefix, and an output's `TextPrefix` taken before keeps the text it had."""
    rng = random.Random(3)
    st, text = SeqState(None, frozenset(), 0), ""
    for _ in range(200):
        delta = "".join(rng.choice("ab é日") for _ in range(rng.randint(1, 4)))
        st.add(delta)
        text += delta
        for k in (0, 1, 3, 7, len(text), len(text) + 5):
            assert st.tail(k) == (text[-k:] if k else "")
    assert st.text == text and st.length == len(text)
    before = TextPrefix(st.parts, 0, len(st.parts))
    st.cut(100)
    st.add("xyz")
    assert st.text == text[:100] + "xyz" and st.length == 103 and st.tail(5) == text[98:100] + "xyz"
    assert before.get() == text


def test_final_only_requests_report_once_what_a_stream_ends_with(tiny_llama):
    """`final_only` (`LLM.generate`, evaluations): one output, when finished, equal to the last
    output of the same request streamed; streamed requests beside it report every step."""
    ps = prompts(3, seed=51)
    params = [SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True, logprobs=1),
              SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=7, stop=["e"]),
              SamplingParams(temperature=1.0, seed=4, n=2, best_of=3, max_tokens=5)]

    def run(final_only: bool) -> dict:
        eng = make_llm(tiny_llama).engine
        for i, (p, sp) in enumerate(zip(ps, params)):
            eng.add_request(f"f{i}", p, sp, final_only=final_only)
        eng.add_request("streamed", ps[0], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
        seen: dict[str, list] = {}
        while eng.has_unfinished():
            for o in eng.step():
                seen.setdefault(o.request_id, []).append(o)
        return seen

    streamed, final = run(False), run(True)
    assert len(final["streamed"]) == len(streamed["streamed"]) == 6
    for i in range(3):
        assert len(final[f"f{i}"]) == 1 and final[f"f{i}"][0].finished
        got, want = final[f"f{i}"][0], streamed[f"f{i}"][-1]
        for g, w in zip(got.outputs, want.outputs, strict=True):
            assert (g.index, g.text, g.token_ids, g.finish_reason, g.stop_reason, g.cumulative_logprob, g.logprobs) == (
                w.index, w.text, w.token_ids, w.finish_reason, w.stop_reason, w.cumulative_logprob, w.logprobs)
            assert g.text_delta == g.text and g.token_ids_delta == g.token_ids  # all of it at once
