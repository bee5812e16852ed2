"""Each step of the 256-request workload on its own, and where the prefill steps' time goes.

`gpu_engine.py` times the whole workload; `step_phases.py` splits a step into schedule, forward,
sample and the rest, but over prompts already in the prefix cache. Here, on fresh prompts
(same lengths, new tokens: no prefix-cache hits):
  timeline  every step's wall time (synchronized) with its rows: prompt tokens, decode rows;
  profile   PyTorch's profiler over the steps that hold prompt chunks, then over 16 decode-only
            steps: the ops that take the host's and the device's time, top `--top` each;
  python    cProfile over the same two kinds of steps: the engine's own Python functions.
Prints tables and one JSON line (the timeline). Usage (GPU machine):
  PYTHONPATH=src SHOAL_CPU_KERNELS=0 python bench/gpu_profile.py --device cuda --tokenizer-dir DIR
CPU smoke run: python bench/gpu_profile.py --device cpu --shape tiny --requests 16 --out 8
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import time

import torch


def params(i: int, out_tokens: int, temperature: float):
    """Request i's sampling: greedy, or seeded at `temperature`; `ignore_eos`."""
    from shoal.engine.sampling_params import SamplingParams

    return SamplingParams(temperature=temperature, max_tokens=out_tokens, ignore_eos=True,
                          seed=i if temperature else None)


def timeline(engine, prompts, out_tokens: int, sync, temperature: float = 0.0) -> list[dict]:
    """Run `prompts`; per step: wall ms (after `sync`), prompt tokens, decode rows."""
    run, cur = engine.runner.run, {}

    def counted(scheduled, *a, **k):
        cur["prompt"] = sum(n for s, n in scheduled if s.num_computed_tokens < s.num_prompt_tokens)
        cur["decode"] = sum(1 for s, _ in scheduled if s.num_computed_tokens >= s.num_prompt_tokens)
        return run(scheduled, *a, **k)

    engine.runner.run = counted
    steps = []
    try:
        for i, p in enumerate(prompts):
            engine.add_request(f"t{i}-{time.perf_counter()}", p, params(i, out_tokens, temperature))
        while engine.has_unfinished():
            cur.clear()
            t = time.perf_counter()
            engine.step()
            sync()
            if cur:
                steps.append({"ms": round(1e3 * (time.perf_counter() - t), 3), **cur})
    finally:
        del engine.runner.run  # (the instance's wrapper: the method shows again)
    return steps


def profile(engine, prompts, out_tokens: int, sync, make, decode_steps: int = 16, temperature: float = 0.0):
    """(profile of the steps with prompt chunks, profile of `decode_steps` decode-only steps);
    `make()` gives a fresh profiler, a context manager."""
    for i, p in enumerate(prompts):
        engine.add_request(f"p{i}-{time.perf_counter()}", p, params(i, out_tokens, temperature))

    def prompting() -> bool:
        return bool(engine.scheduler.waiting) or any(
            s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running)

    with make() as prefill:
        while engine.has_unfinished() and prompting():
            engine.step()
        sync()
    with make() as decode:
        for _ in range(decode_steps):
            if engine.has_unfinished():
                engine.step()
        sync()
    while engine.has_unfinished():
        engine.step()
    return prefill, decode


def table(prof, sort_by: str, top: int) -> str:
    try:
        return prof.key_averages().table(sort_by=sort_by, row_limit=top, max_name_column_width=60)
    except (AttributeError, KeyError, ValueError):  # (older names of the device columns)
        return prof.key_averages().table(sort_by=sort_by.replace("device", "cuda"), row_limit=top,
                                         max_name_column_width=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--out", type=int, default=128)
    ap.add_argument("--max-batched-tokens", type=int, default=None,
                    help="tokens a step (default: the engine's, by the model's size on CUDA)")
    ap.add_argument("--kv-cache-gb", type=float, default=16.0)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "shoal-gpu-bench"))
    ap.add_argument("--tokenizer-dir", default=None)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else seeded sampling")
    ap.add_argument("--mode", default="graphs", help="engine settings: one of gpu_engine.py's --modes")
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(__file__))
    from engine_throughput import make_prompts
    from gpu_engine import MODES, build, tweak

    from shoal.config import EngineConfig
    from shoal.engine.llm_engine import LLMEngine
    from shoal.model.loader import load_dir
    from shoal.model.registry import ModelRegistry

    cuda = args.device.startswith("cuda")
    path = build(args.shape, args.work, args.tokenizer_dir or ModelRegistry().resolve("SmolLM2-135M-Instruct"))
    cfg = EngineConfig(model=path, dtype=args.dtype, device=args.device, max_num_seqs=args.requests,
                       max_num_batched_tokens=args.max_batched_tokens,
                       kv_cache_memory=int(args.kv_cache_gb * 2**30) if cuda else 256 << 20, **MODES[args.mode])
    engine = LLMEngine(cfg, load_dir(path, dtype=getattr(torch, args.dtype), device=args.device))
    tweak(engine, args.mode)
    # (steps in flight, the CUDA default, are not waited for: that would serialize them; a step's
    # time is then the host's, the device's work overlapping the next)
    sync = torch.cuda.synchronize if cuda and engine.ahead is None else (lambda: None)
    T = args.temperature
    prompts = make_prompts(args.requests, 64, 512, 2, 49152)
    fresh = lambda x: [[t ^ x for t in p] for p in prompts]  # noqa: E731  (same lengths, new tokens)
    timeline(engine, fresh(1), args.out, sync, T)  # warm: graphs, Triton specializations
    steps = timeline(engine, fresh(2), args.out, sync, T)
    pre = [s for s in steps if s["prompt"]]
    dec = [s["ms"] for s in steps if not s["prompt"]]
    print(f"{args.shape}: {len(steps)} steps, {sum(s['ms'] for s in steps):.1f} ms; "
          f"{len(pre)} with prompt chunks, {sum(s['ms'] for s in pre):.1f} ms; "
          f"{len(dec)} decode-only, median {statistics.median(dec) if dec else 0:.2f} ms")
    for s in pre:
        print(f"  prompt tokens {s['prompt']:6d}  decode rows {s['decode']:4d}  {s['ms']:8.2f} ms")
    if not args.no_profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        dev = "self_device_time_total" if cuda else "self_cpu_time_total"
        kinds = ("steps with prompt chunks", "16 decode-only steps")
        profs = profile(engine, fresh(3), args.out, sync, lambda: torch_profile(activities=acts), temperature=T)
        for name, prof in zip(kinds, profs):
            print(f"\n== {name}: by host time\n{table(prof, 'self_cpu_time_total', args.top)}")
            if cuda:
                print(f"== {name}: by device time\n{table(prof, dev, args.top)}")
        profs = profile(engine, fresh(4), args.out, sync, cProfile.Profile, temperature=T)
        for name, prof in zip(kinds, profs):
            print(f"\n== {name}: Python functions by own time")
            pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
    print(json.dumps({"shape": args.shape, "mode": args.mode, "temperature": T, "device": args.device, "torch": torch.__version__,
                      "max_batched_tokens": engine.scheduler.max_num_batched_tokens, "steps": steps}))


if __name__ == "__main__":
    main()
