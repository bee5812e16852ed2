"""Streams whose readers are slower than the engine: `AsyncEngine` with `--streams` concurrent
requests, each reader spending `--work-us` of CPU on every output it takes (a stand-in for a
server formatting and sending a chunk: ~100-250 us a chunk measured through `shoal serve`,
`bench/api_throughput.py`). Shoal merges the outputs a reader has not taken yet
(`engine.output_stream`); the baseline in the same run is the queue it replaced (every output
kept and read one by one: one chunk a token). Reports output tok/s, outputs read per token and
the time between a reader's outputs (p99).

    python bench/slow_reader.py [--streams 128] [--out 64] [--work-us 200] [--model DIR]

The default model is a random-weight 2-layer model of the default vocabulary (`bench/gpu_engine.py`'s
`tiny` shape), so the engine outruns the readers on a CPU as a GPU engine outruns a server's.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import sys
import time

import torch


class QueueStream:
    """The replaced design: every output queued, read one by one."""

    __slots__ = ("loop", "_q", "_ready")

    def __init__(self, loop) -> None:
        self.loop, self._q, self._ready = loop, collections.deque(), asyncio.Event()

    def put(self, item) -> None:
        self._q.append(item)
        self._ready.set()

    async def get(self):
        await self._ready.wait()
        item = self._q.popleft()
        if not self._q:
            self._ready.clear()
        return item


def run(engine, streams: int, out: int, work_s: float, seed: int) -> dict:
    from shoal.engine.sampling_params import SamplingParams

    rng = random.Random(seed)
    prompts = [[rng.randrange(100, 40000) for _ in range(rng.randint(16, 64))] for _ in range(streams)]
    params = SamplingParams(temperature=0.0, max_tokens=out, ignore_eos=True)
    gaps: list[float] = []

    async def reader(p) -> tuple[int, int]:
        reads = tokens = 0
        last = None
        async for o in engine.generate(p, params):
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            reads += 1
            tokens += len(o.outputs[0].token_ids_delta)
            end = time.perf_counter() + work_s  # the per-chunk work, on the event loop's thread
            while time.perf_counter() < end:
                pass
            last = time.perf_counter()
            await asyncio.sleep(0)
        return reads, tokens

    async def main():
        return await asyncio.gather(*(reader(p) for p in prompts))

    t0 = time.perf_counter()
    got = asyncio.run(main())
    dt = time.perf_counter() - t0
    reads, tokens = sum(r for r, _ in got), sum(t for _, t in got)
    gaps.sort()
    return {"tok_s": tokens / dt, "seconds": dt, "tokens": tokens, "reads_per_token": reads / tokens,
            "gap_p99_ms": 1e3 * gaps[min(int(0.99 * len(gaps)), len(gaps) - 1)] if gaps else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=128)
    ap.add_argument("--out", type=int, default=64)
    ap.add_argument("--work-us", type=float, default=200.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None, help="a model directory (default: the tiny random model)")
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "shoal-gpu-bench"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.dirname(__file__))
    from shoal.config import EngineConfig
    from shoal.engine import async_engine
    from shoal.engine.async_engine import AsyncEngine
    from shoal.model.registry import ModelRegistry

    path = args.model
    if path is None:
        from gpu_engine import build

        path = build("tiny", args.work, ModelRegistry().resolve("SmolLM2-135M-Instruct"))
    engine = AsyncEngine(EngineConfig(model=path, max_num_seqs=args.streams, max_num_batched_tokens=4096,
                                      num_threads=args.threads))
    results = {}
    merged = async_engine.OutputStream
    try:
        run(engine, 8, 4, 0.0, 1)  # warm-up
        for name, stream in (("merged (Shoal)", merged), ("queued (baseline)", QueueStream),
                             ("merged (Shoal) again", merged)):
            async_engine.OutputStream = stream
            results[name] = run(engine, args.streams, args.out, args.work_us * 1e-6, 2)
            r = results[name]
            print(f"{name:22s} {r['tok_s']:9.1f} tok/s  {r['reads_per_token']:.3f} reads a token  "
                  f"gap p99 {r['gap_p99_ms']:.1f} ms", flush=True)
    finally:
        async_engine.OutputStream = merged
        engine.shutdown()
    base = results["queued (baseline)"]["tok_s"]
    print(f"ratio {results['merged (Shoal)']['tok_s'] / base:.2f}x / {results['merged (Shoal) again']['tok_s'] / base:.2f}x")
    print(json.dumps({"streams": args.streams, "out": args.out, "work_us": args.work_us, "threads": args.threads,
                      "results": results}))


if __name__ == "__main__":
    main()
