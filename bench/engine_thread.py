"""The engine on a thread of its own, as `AsyncEngine` (the server) runs it, with and without the
OpenMP workers of the thread that loaded the model (`kernels.release_omp_pool`): libgomp keeps a
pool of workers for each thread that opened a parallel region, and while the process holds more
of them than CPUs its barriers spin only ~100 times before sleeping. One process, one engine;
the two cases take turns (`--rounds`): before each "held" round this thread opens a parallel
region (its pool back), before each "released" round it releases it. Baseline in the same run:
the same workload on this thread (offline, `LLM.generate`). Prints output tok/s and the engine
thread's context switches per round.

    python bench/engine_thread.py [--streams 32] [--out 64] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time

import torch


def switches() -> int:
    """Context switches of the calling thread so far (/proc schedstat: run, wait, slices)."""
    with open(f"/proc/self/task/{threading.get_native_id()}/schedstat") as f:
        return int(f.read().split()[2])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--out", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from shoal import kernels
    from shoal.config import EngineConfig
    from shoal.engine.llm import LLM
    from shoal.engine.llm_engine import load_for_engine
    from shoal.engine.sampling_params import SamplingParams

    if kernels.library() is None:
        raise SystemExit(f"the kernels did not build: {kernels.reason()}")
    cfg = EngineConfig(model=args.model, max_num_seqs=max(64, args.streams), max_num_batched_tokens=512)
    llm = LLM(cfg, loaded=load_for_engine(cfg))  # loaded here: this thread's pool holds workers
    params = SamplingParams(temperature=0.0, max_tokens=args.out, ignore_eos=True)
    rng = random.Random(0)
    vocab = llm.engine.model_config.vocab_size

    def batch() -> list[list[int]]:  # new prompts each round (no prefix-cache hits)
        return [[rng.randrange(100, vocab - 1) for _ in range(rng.randint(64, 128))] for _ in range(args.streams)]

    def timed() -> tuple[float, int]:
        ps = batch()
        s0, t = switches(), time.perf_counter()
        llm.generate(ps, params)
        return args.streams * args.out / (time.perf_counter() - t), switches() - s0

    def on_thread() -> tuple[float, int]:
        out = {}

        def run():
            torch.set_num_threads(args.threads)
            out["r"] = timed()
        t = threading.Thread(target=run)
        t.start()
        t.join()
        return out["r"]

    x = torch.randn(64, 4096)
    llm.generate(batch()[:2], SamplingParams(max_tokens=2))
    seen: dict[str, list[tuple[float, int]]] = {"this thread (offline)": [], "thread, pool held": [],
                                                "thread, pool released": []}
    for _ in range(args.rounds):
        seen["this thread (offline)"].append(timed())
        kernels.row_stats(x)  # this thread's pool back
        seen["thread, pool held"].append(on_thread())
        kernels.release_omp_pool()
        seen["thread, pool released"].append(on_thread())
    base = statistics.median(r[0] for r in seen["this thread (offline)"])
    print(f"{args.streams} streams x {args.out} tokens, {args.threads} threads, {args.rounds} rounds (median):")
    rows = {}
    for name, rs in seen.items():
        tok_s, sw = statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)
        rows[name] = {"tok_s": tok_s, "context_switches": sw, "ratio": tok_s / base}
        print(f"  {name:24s} {tok_s:8.1f} tok/s  {tok_s / base:5.2f}x  {sw:8.0f} context switches")
    print(json.dumps({"streams": args.streams, "out": args.out, "threads": args.threads, "results": rows}))


if __name__ == "__main__":
    main()
