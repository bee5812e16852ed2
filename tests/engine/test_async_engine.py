"""AsyncEngine: many requests stream at once off the event loop, results equal the offline
engine's, an abandoned stream aborts its request and frees its blocks, bad input raises."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from shoal.config import EngineConfig
from shoal.engine.async_engine import AsyncEngine
from shoal.engine.sampling_params import SamplingParams
from tests.engine.test_llm_engine import STOPS, prompts
from shoal.model.generate import generate


@pytest.fixture(params=[False, True], ids=["sync", "async_scheduling"])
def engine(tiny_llama, request):
    """Also with `async_scheduling` (`engine.decode_ahead`): flights through the loop thread."""
    eng = AsyncEngine(EngineConfig(model="tiny", block_size=8, num_kv_blocks=256,
                                   max_num_batched_tokens=128, async_scheduling=request.param), loaded=tiny_llama)
    yield eng
    eng.shutdown()


async def collect(engine, prompt, params, **kw):
    deltas, last = [], None
    async for out in engine.generate(prompt, params, **kw):
        deltas += out.outputs[0].token_ids_delta
        last = out
    return deltas, last


def test_concurrent_streams_match_reference(engine, tiny_llama):
    ps = prompts(12, seed=20)
    params = SamplingParams(temperature=0.0, max_tokens=10)

    async def main():
        return await asyncio.gather(*(collect(engine, p, params) for p in ps))

    results = asyncio.run(main())
    for p, (deltas, last) in zip(ps, results):
        want = generate(tiny_llama.model, p, 10, stop_token_ids=STOPS)
        assert deltas == want == last.outputs[0].token_ids
        assert last.finished


def test_abandoned_stream_aborts_and_frees_blocks(engine):
    total = engine.engine.block_manager.num_free_blocks
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)

    async def main():
        seen = 0
        stream = engine.generate(prompts(1, seed=21)[0], params, request_id="long")
        async with contextlib.aclosing(stream):
            async for _ in stream:
                seen += 1
                if seen == 3:
                    break  # the client went away
        return await engine.stats()

    stats = asyncio.run(main())
    assert stats["running"] + stats["waiting"] == 0
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert stats["free_blocks"] == total
    assert not engine.engine.has_unfinished()


def test_bad_input_raises_value_error_and_engine_serves_on(engine, tiny_llama):
    async def main():
        with pytest.raises(ValueError, match="prompt"):
            await collect(engine, [1] * 600, SamplingParams(max_tokens=1))
        return await collect(engine, [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=4))

    deltas, _ = asyncio.run(main())
    assert deltas == generate(tiny_llama.model, [5, 6, 7], 4, stop_token_ids=STOPS)


def test_cancelled_task_aborts_its_request(engine):
    """A server cancels the handler task when a client disconnects: the request is aborted."""
    total = engine.engine.block_manager.num_free_blocks
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)

    started = asyncio.Event()

    async def consume():
        async for _ in engine.generate(prompts(1, seed=22)[0], params, request_id="cancel-me"):
            started.set()

    async def main():
        task = asyncio.create_task(consume())
        await started.wait()  # (a fixed sleep could outlast the whole request)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(50):  # the abort is queued for the loop thread; wait for it
            stats = await engine.stats()
            if stats["running"] + stats["waiting"] == 0:
                return stats
            await asyncio.sleep(0.02)
        return stats

    stats = asyncio.run(main())
    assert stats["running"] + stats["waiting"] == 0
    assert stats["free_blocks"] == total


class _Bill:
    """The two calls `run_all` makes on the API's Bill, recorded."""

    def __init__(self) -> None:
        self.charged: list[tuple[int, int]] = []
        self.engine_s = None

    def charge_nowait(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.charged.append((prompt_tokens, completion_tokens))


def test_non_streamed_requests_are_final_only_and_billed_when_cut_short(engine, tiny_llama):
    """The server's non-streamed path (`serving.common.run_all`) asks the engine for final outputs
    only; its answers equal the streamed ones, and a request cancelled midway is billed the
    tokens generated so far (its prompt, and each sample's tokens), with its blocks freed."""
    from shoal.serving.common import run_all

    total = engine.engine.block_manager.num_free_blocks
    ps = prompts(3, seed=23)
    short = SamplingParams(temperature=0.0, max_tokens=6)
    long = SamplingParams(temperature=1.0, n=2, max_tokens=400, ignore_eos=True, seed=4)
    seen: list = []
    add = engine.engine.add_request

    def spy(rid, prompt, params, adapter=None, final_only=False):
        seen.append(final_only)
        return add(rid, prompt, params, adapter, final_only)

    async def main():
        outs = await run_all(engine, ps, short, None, "short")
        bill = _Bill()
        engine.engine.add_request = spy
        task = asyncio.create_task(run_all(engine, ps[:2], long, None, "long", bill))
        try:
            for _ in range(200):  # until both requests have generated something
                await asyncio.sleep(0.02)
                reqs = [engine.engine.requests.get(f"long-{i}") for i in range(2)]
                if all(r is not None and r.tokens()[1] >= 4 for r in reqs):
                    break
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            engine.engine.add_request = add
        for _ in range(50):  # the aborts are queued for the loop thread
            stats = await engine.stats()
            if stats["running"] + stats["waiting"] == 0:
                break
            await asyncio.sleep(0.02)
        return outs, bill, stats

    outs, bill, stats = asyncio.run(main())
    for p, out in zip(ps, outs):
        assert out.finished and out.outputs[0].token_ids == generate(tiny_llama.model, p, 6, stop_token_ids=STOPS)
    assert seen == [True, True]
    ((p_tok, c_tok),) = bill.charged
    assert p_tok == len(ps[0]) + len(ps[1])
    assert 4 * 2 <= c_tok < 400 * 2 * 2  # two requests of two samples each, cut short
    assert stats["running"] + stats["waiting"] == 0 and stats["free_blocks"] == total


def test_a_slow_reader_takes_every_token_since_its_last_read(engine):
    """A caller slower than the engine is never behind by more than one output: the outputs it
    did not take are merged (`output_stream`), their deltas joined, the totals the newest; what
    it reads over the stream is the same (n = 2 with logprobs: each sample's deltas)."""
    p = prompts(1, seed=24)[0]
    params = SamplingParams(temperature=1.0, seed=5, n=2, max_tokens=30, ignore_eos=True, logprobs=1)

    async def main():
        outs = []
        async for out in engine.generate(p, params):
            outs.append(out)
            if len(outs) == 2:  # then wait until the engine has finished the request
                while engine.engine.has_unfinished():
                    await asyncio.sleep(0.01)
        return outs

    outs = asyncio.run(main())
    assert len(outs) <= 3 and outs[-1].finished  # two reads as they came, then the rest in one
    for i in range(2):
        last = outs[-1].outputs[i]
        assert last.index == i and len(last.token_ids) == 30
        deltas = [c for o in outs for c in o.outputs if c.index == i]
        assert sum((c.token_ids_delta for c in deltas), []) == last.token_ids
        assert "".join(c.text_delta for c in deltas) == last.text
        assert sum((c.logprobs_delta for c in deltas), []) == last.logprobs
        assert len(deltas) == len(outs) < 30  # (outputs merged: fewer reads than tokens)


def test_merge_joins_deltas_and_keeps_the_newer_totals():
    from shoal.engine.output_stream import merge
    from shoal.engine.outputs import CompletionOutput, RequestOutput

    def out(index, text, toks, finish=None):
        lps = [(t, -1.0, {}) for t in toks]
        return CompletionOutput(index, text, list(range(len(text))), finish, None, -float(len(text)), None,
                                text[-len(toks):], list(toks), lps)

    old = RequestOutput("r", [1], [out(0, "ab", [7, 8]), out(1, "x", [9])], False)
    new = RequestOutput("r", [1], [out(0, "abc", [10]), out(1, "xy", [11], "stop")], True)
    got = merge(old, new)
    assert got is new and got.finished
    a, b = got.outputs
    assert (a.text_delta, a.token_ids_delta, a.text) == ("abc", [7, 8, 10], "abc")
    assert (b.text_delta, b.token_ids_delta, b.finish_reason) == ("xy", [9, 11], "stop")
    assert [t for t, _, _ in b.logprobs_delta] == [9, 11] and b.cumulative_logprob == -2.0
    # a completion only the older output reports is kept, in index order
    lone = merge(RequestOutput("r", [1], [out(0, "a", [1]), out(1, "b", [2])], False),
                 RequestOutput("r", [1], [out(1, "bc", [3])], False))
    assert [(c.index, c.token_ids_delta) for c in lone.outputs] == [(0, [1]), (1, [2, 3])]
