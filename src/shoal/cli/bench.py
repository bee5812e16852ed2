"""`shoal bench`: a quick client-side load test of a running server. N streamed completions, C at
a time, through the async `openai` client; reports requests/s, output tokens/s, time to first
token and inter-token latency (p50/p99) as a table or JSON.

Every request asks for exactly --max-tokens tokens (`ignore_eos`), so runs compare. Not here:
the engine's own benchmarks (the project's `bench/`), or server-side metrics (`/metrics`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from .admin import table
from .remote import (Server, add_connection_args, api_key, base_url, error_line,
                     talks_to_server)


def percentile(xs: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation; None for no data."""
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def one_request(client, model: str, prompt: str, max_tokens: int) -> dict:
    """Stream one completion; its TTFT, inter-token gaps and token count."""
    t0 = time.perf_counter()
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    ttft, last, gaps, chunks, tokens = None, None, [], 0, None
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].text:
            chunks += 1
            if ttft is None:
                ttft = now - t0
            else:
                gaps.append(now - last)
            last = now
    return {"ttft": ttft, "gaps": gaps, "tokens": tokens if tokens is not None else chunks,
            "latency": time.perf_counter() - t0}


async def run_bench(args: argparse.Namespace, model: str) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url(args), api_key=api_key(args), max_retries=0,
                                timeout=openai.Timeout(600.0, connect=5.0))
    sem = asyncio.Semaphore(args.concurrency)

    async def limited(i: int):
        async with sem:
            return await one_request(client, model, args.prompt, args.max_tokens)

    t0 = time.perf_counter()
    try:
        results = await asyncio.gather(*(limited(i) for i in range(args.requests)),
                                       return_exceptions=True)
    finally:
        await client.close()
    wall = time.perf_counter() - t0
    ok = [r for r in results if isinstance(r, dict)]
    errors = [r for r in results if isinstance(r, BaseException)]
    if not ok and errors:
        raise errors[0]
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    gaps = [g for r in ok for g in r["gaps"]]
    out_tokens = sum(r["tokens"] for r in ok)
    ms = lambda v: None if v is None else round(v * 1000, 2)  # noqa: E731
    return {"model": model, "requests": args.requests, "concurrency": args.concurrency,
            "max_tokens": args.max_tokens, "completed": len(ok), "failed": len(errors),
            "duration_s": round(wall, 3), "requests_per_s": round(len(ok) / wall, 3),
            "output_tokens": out_tokens, "output_tokens_per_s": round(out_tokens / wall, 2),
            "ttft_p50_ms": ms(percentile(ttfts, 50)), "ttft_p99_ms": ms(percentile(ttfts, 99)),
            "itl_p50_ms": ms(percentile(gaps, 50)), "itl_p99_ms": ms(percentile(gaps, 99)),
            "first_error": error_line(errors[0], base_url(args)) if errors else None}


@talks_to_server
def cmd_bench(args: argparse.Namespace) -> int:
    """Load-test the running server: --requests streamed completions, --concurrency at a time;
    print throughput and latency percentiles."""
    for name in ("requests", "concurrency", "max_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name}: must be at least 1")
    model = args.model or Server(args).default_model()
    r = asyncio.run(run_bench(args, model))
    if args.json:
        print(json.dumps(r, indent=2))
        return 0 if not r["failed"] else 1
    show = lambda v: "-" if v is None else v  # noqa: E731
    table([("METRIC", "VALUE"),
           ("model", model), ("requests (ok/failed)", f"{r['completed']}/{r['failed']}"),
           ("concurrency", r["concurrency"]), ("duration (s)", r["duration_s"]),
           ("requests/s", r["requests_per_s"]), ("output tokens", r["output_tokens"]),
           ("output tok/s", r["output_tokens_per_s"]),
           ("TTFT p50 (ms)", show(r["ttft_p50_ms"])), ("TTFT p99 (ms)", show(r["ttft_p99_ms"])),
           ("ITL p50 (ms)", show(r["itl_p50_ms"])), ("ITL p99 (ms)", show(r["itl_p99_ms"]))])
    if r["failed"]:
        print(f"shoal: error: {r['failed']} request(s) failed; first: {r['first_error']}",
              file=sys.stderr)
        return 1
    return 0


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model id (default: the server's base model)")
    p.add_argument("--requests", type=int, default=64, help="requests in all (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per request (default %(default)s)")
    p.add_argument("--prompt", default="Once upon a time", help="the prompt of every request")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    add_connection_args(p)
