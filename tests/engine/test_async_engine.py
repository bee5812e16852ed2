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

    async def consume():
        async for _ in engine.generate(prompts(1, seed=22)[0], params, request_id="cancel-me"):
            pass

    async def main():
        task = asyncio.create_task(consume())
        await asyncio.sleep(0.2)
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
