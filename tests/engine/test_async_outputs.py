"""`async_outputs`: a step's outputs built during the next step's forward (on by default on
CUDA). Forced on here on the CPU: the same streams, one step later, and aborts report nothing."""

from __future__ import annotations

from shoal.engine.sampling_params import SamplingParams
from tests.engine.test_llm_engine import check_abort_mid_stream, make_llm, prompts


def workload() -> list[tuple[list[int], SamplingParams]]:
    """Greedy and seeded samples, n and best_of, stop strings, logprobs, various lengths."""
    ps = prompts(10, seed=31, lo=3, hi=50)
    params = [
        SamplingParams(temperature=0.0, max_tokens=9),
        SamplingParams(temperature=1.0, seed=3, max_tokens=14, logprobs=2),
        SamplingParams(temperature=1.0, seed=4, n=2, best_of=3, max_tokens=6),
        SamplingParams(temperature=0.8, seed=5, n=2, max_tokens=11, stop=["e", "ab"]),
        SamplingParams(temperature=0.0, max_tokens=1),
        SamplingParams(temperature=1.0, seed=6, max_tokens=20, ignore_eos=True, min_tokens=4),
    ]
    return [(p, params[i % len(params)]) for i, p in enumerate(ps)]


def run(llm) -> tuple[dict, list[int]]:
    """Drive the step loop: per request its streamed deltas and final outputs; and the index
    of the step each request's first output came in."""
    eng = llm.engine
    for i, (p, sp) in enumerate(workload()):
        eng.add_request(f"w{i}", p, sp)
    seen: dict[str, dict] = {}
    first: dict[str, int] = {}
    step = 0
    while eng.has_unfinished():
        step += 1
        for out in eng.step():
            first.setdefault(out.request_id, step)
            record(seen, out)
    return seen, [first[f"w{i}"] for i in range(len(workload()))]


def record(seen: dict[str, dict], out) -> None:
    """Add one RequestOutput to `seen`: per completion index the deltas joined, and the finished
    output's totals under "final"."""
    got = seen.setdefault(out.request_id, {})
    for c in out.outputs:
        text, toks, lps = got.get(c.index, ("", [], []))
        got[c.index] = (text + c.text_delta, toks + c.token_ids_delta, lps + (c.logprobs_delta or []))
    if out.finished:
        got["final"] = [(c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason,
                         c.cumulative_logprob, c.logprobs) for c in out.outputs]


def test_deferred_outputs_stream_the_same_one_step_later(tiny_llama):
    want, first_sync = run(make_llm(tiny_llama, max_num_batched_tokens=64))
    llm = make_llm(tiny_llama, max_num_batched_tokens=64, async_outputs=True)
    assert llm.engine.async_outputs
    got, first_async = run(llm)
    assert got == want  # every delta, text, token, logprob and finish reason
    assert all("final" in v for v in got.values())
    # best_of > n reports only when done; the others one step later than without deferral
    assert [a - s for a, s in zip(first_async, first_sync)] == [1] * len(first_sync)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
    assert not llm.engine._deferred and not llm.engine.requests


def test_cpu_default_is_synchronous_and_generate_works_deferred(tiny_llama):
    assert not make_llm(tiny_llama).engine.async_outputs
    ps = prompts(5, seed=32)
    sp = SamplingParams(temperature=0.0, max_tokens=7)
    want = [o.outputs[0].token_ids for o in make_llm(tiny_llama).generate(ps, sp)]
    assert [o.outputs[0].token_ids for o in make_llm(tiny_llama, async_outputs=True).generate(ps, sp)] == want


def test_abort_with_deferred_outputs_reports_nothing_more(tiny_llama):
    llm = make_llm(tiny_llama, async_outputs=True)
    check_abort_mid_stream(llm)
    eng = llm.engine
    eng.add_request("a", prompts(1, seed=33)[0], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    eng.add_request("b", prompts(1, seed=34)[0], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    eng.step()
    eng.step()  # "a" and "b" sampled; their outputs wait for the next step
    assert eng.abort("a")
    rest = []
    while eng.has_unfinished():
        rest += eng.step()
    assert {o.request_id for o in rest} == {"b"} and rest[-1].finished
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
