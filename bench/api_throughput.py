"""HTTP overhead: the same workload offline (LLMEngine step loop) and through the API with
concurrent streaming clients (the official AsyncOpenAI client), in one run. The server runs as
its own process (`shoal serve`), as in deployment; the clients run in this one.

Reports output tok/s of both and their ratio (target >= 0.9x), the CPU seconds of the offline
run, of the server and of the clients over HTTP (on a small box the clients' parsing takes cores
from the server), and the time the API layer adds per request: client-observed latency minus the engine's own time for that request (p50/p99).
Usage: python bench/api_throughput.py --clients 32 --out 64 --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import os
import socket
import subprocess
import sys
import time

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(int(q * len(xs)), len(xs) - 1)]


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (this one when pid is None), all its threads."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--out", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import openai

    from shoal.config import EngineConfig
    from shoal.engine.async_engine import AsyncEngine
    from shoal.engine.llm import LLM
    from shoal.engine.llm_engine import load_for_engine
    from shoal.engine.sampling_params import SamplingParams

    # the same engine settings as `shoal serve` (LoRA on, rank 16), so the ratio is the HTTP layer
    cfg = EngineConfig(model=args.model, max_num_seqs=max(64, args.clients), max_num_batched_tokens=512,
                       enable_lora=True, max_loras=8, max_lora_rank=16)
    loaded = load_for_engine(cfg)
    rng = random.Random(0)
    prompts = [[rng.randrange(100, loaded.config.vocab_size - 1) for _ in range(rng.randint(64, 128))]
               for _ in range(args.clients)]
    params = SamplingParams(temperature=0.0, max_tokens=args.out, ignore_eos=True)

    # 1) offline
    llm = LLM(cfg, loaded=loaded)
    llm.generate(prompts[:2], SamplingParams(max_tokens=2))
    t0, c0 = time.perf_counter(), cpu_seconds()
    llm.generate(prompts, params)
    offline_s, offline_cpu = time.perf_counter() - t0, cpu_seconds() - c0
    del llm

    # 2) through HTTP: a `shoal serve` process, N streaming clients here
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "shoal.cli", "serve", "--model", args.model,
                               "--port", str(port), "--threads", str(args.threads),
                               "--max-num-seqs", str(max(64, args.clients)), "--workers", "0"],
                              stderr=subprocess.DEVNULL, env=os.environ.copy())
    import httpx

    for _ in range(600):
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.1)
    engine = AsyncEngine(cfg, loaded=load_for_engine(cfg))  # the engine-alone side of the probe

    async def run_clients():
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench",
                                    max_retries=0, timeout=600)

        async def one(p):
            t = time.perf_counter()
            stream = await client.completions.create(model=args.model, prompt=p, max_tokens=args.out,
                                                     temperature=0, stream=True,
                                                     extra_body={"ignore_eos": True})
            n = 0
            async for ch in stream:
                n += bool(ch.choices and ch.choices[0].text)
            return time.perf_counter() - t, n

        await one(prompts[0][:8])  # warm-up
        t = time.perf_counter()
        res = await asyncio.gather(*(one(p) for p in prompts))
        await client.close()
        return time.perf_counter() - t, res

    s0, c0 = cpu_seconds(server.pid), cpu_seconds()
    http_s, _ = asyncio.run(run_clients())
    server_cpu, client_cpu = cpu_seconds(server.pid) - s0, cpu_seconds() - c0

    # 3) the API layer's own cost per request: one request at a time, HTTP vs engine alone
    # (a plain HTTP client, so the openai client's own parsing is not counted as the server's)
    async def overhead(k: int = 200):
        client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/v1", timeout=60,
                                   headers={"authorization": "Bearer bench"})
        added, server_api = [], []
        for i in range(k):
            p = prompts[i % len(prompts)][:16]
            body = {"model": args.model, "prompt": p, "max_tokens": 1, "temperature": 0}
            t = time.perf_counter()
            r = await client.post("/completions", json=body)
            r.raise_for_status()
            http = time.perf_counter() - t
            timing = dict(x.strip().split(";dur=") for x in r.headers["server-timing"].split(","))
            server_api.append(float(timing["api"]) / 1e3)
            t = time.perf_counter()
            async for _ in engine.generate(p, SamplingParams(max_tokens=1, temperature=0)):
                pass
            added.append(max(http - (time.perf_counter() - t), 0.0))
        await client.aclose()
        return added, server_api

    added, server_api = asyncio.run(overhead())
    server.terminate()
    server.wait(timeout=30)
    engine.shutdown()
    tokens = args.clients * args.out
    result = {"date": time.strftime("%Y-%m-%d"), "threads": args.threads, "clients": args.clients,
              "out_tokens": args.out, "offline_tok_s": tokens / offline_s, "http_tok_s": tokens / http_s,
              "ratio": offline_s / http_s, "added_ms_p50": 1e3 * pct(added, 0.5),
              "added_ms_p99": 1e3 * pct(added, 0.99),
              "server_api_ms_p50": 1e3 * pct(server_api, 0.5),
              "server_api_ms_p99": 1e3 * pct(server_api, 0.99),
              "cpu_s": {"offline": offline_cpu, "server": server_cpu, "clients": client_cpu}}
    print(f"offline {result['offline_tok_s']:.1f} tok/s; HTTP ({args.clients} streaming clients) "
          f"{result['http_tok_s']:.1f} tok/s; ratio {result['ratio']:.2f}x; API layer adds "
          f"p50 {result['added_ms_p50']:.1f} ms, p99 {result['added_ms_p99']:.1f} ms per request "
          f"as the client sees it; {result['server_api_ms_p50']:.2f} / "
          f"{result['server_api_ms_p99']:.2f} ms measured in the server (server-timing)")
    print(f"CPU seconds: offline {offline_cpu:.2f}; over HTTP the server {server_cpu:.2f} and the clients "
          f"{client_cpu:.2f} (the workload's {tokens} tokens each way)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
