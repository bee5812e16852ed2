"""Where an engine step's time goes: schedule, run (the forward; on a GPU the launch and then
the device work, split by a synchronize), sample, and the rest (appending tokens, stop checks,
outputs), per step kind (decode-only or with a prefill chunk), as medians and totals.

The probe wraps the engine's parts in place for one pass, so its numbers include a synchronize
after the forward (on a GPU the host no longer runs ahead of the device there); use it to see
the split, and `gpu_engine.py` / `engine_throughput.py` for throughput. Usage:
  python bench/step_phases.py --device cpu --shape tiny --requests 32 --out 16
  PYTHONPATH=src python bench/step_phases.py --device cuda --shape smollm2-135m --tokenizer-dir DIR
`probe(engine, prompts, out_tokens, sync)` is called by gpu_engine.py --phases.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch


def probe(engine, prompts, out_tokens: int, sync=None) -> dict:
    """Run `prompts` through `engine` with each part timed; {kind: {phase: ms median/total}}."""
    from shoal.engine.sampling_params import SamplingParams

    sync = sync or (lambda: None)
    clock = time.perf_counter
    cur: dict[str, float] = {}
    runner_run, schedule, sample = engine.runner.run, engine.scheduler.schedule, engine.sampler.sample

    def timed_schedule():
        t = clock()
        out = schedule()
        cur["schedule"] = clock() - t
        return out

    def timed_run(scheduled, copies=()):
        t = clock()
        res = runner_run(scheduled, copies)
        t1 = clock()
        sync()
        cur["run_host"], cur["run_wait"] = t1 - t, clock() - t1
        cur["rows"] = len(scheduled)
        cur["prefill"] = any(n > 1 or s.num_computed_tokens < s.num_prompt_tokens for s, n in scheduled)
        return res

    def timed_sampler(logits, seqs):
        t = clock()
        out = sample(logits, seqs)
        sync()
        cur["sample"] = cur.get("sample", 0.0) + clock() - t
        return out

    engine.scheduler.schedule, engine.runner.run, engine.sampler.sample = timed_schedule, timed_run, timed_sampler
    steps: list[dict] = []
    try:
        for i, p in enumerate(prompts):
            engine.add_request(f"probe{i}-{clock()}", p, SamplingParams(temperature=0.0, max_tokens=out_tokens,
                                                                       ignore_eos=True))
        while engine.has_unfinished():
            cur.clear()
            t = clock()
            engine.step()
            total = clock() - t
            if "rows" in cur:
                cur["total"] = total
                cur["rest"] = total - sum(cur.get(k, 0.0) for k in ("schedule", "run_host", "run_wait", "sample"))
                steps.append(dict(cur))
    finally:
        engine.scheduler.schedule, engine.runner.run = schedule, runner_run
        del engine.sampler.sample  # (the instance's wrapper: the method shows again)
    out: dict[str, dict] = {}
    for kind in ("decode", "prefill"):
        group = [s for s in steps if s["prefill"] == (kind == "prefill")]
        if not group:
            continue
        phases = ("total", "schedule", "run_host", "run_wait", "sample", "rest")
        out[kind] = {"steps": len(group), "rows_median": statistics.median(s["rows"] for s in group)}
        for ph in phases:
            vals = [1e3 * s.get(ph, 0.0) for s in group]
            out[kind][f"{ph}_ms_p50"] = round(statistics.median(vals), 3)
            out[kind][f"{ph}_ms_sum"] = round(sum(vals), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--out", type=int, default=128)
    ap.add_argument("--kv-cache-gb", type=float, default=1.0)
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "shoal-gpu-bench"))
    ap.add_argument("--tokenizer-dir", default=None)
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(__file__))
    from engine_throughput import make_prompts
    from gpu_engine import build

    from shoal.config import EngineConfig
    from shoal.engine.llm_engine import LLMEngine
    from shoal.model.loader import load_dir
    from shoal.model.registry import ModelRegistry

    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else None
    path = build(args.shape, args.work, args.tokenizer_dir or ModelRegistry().resolve("SmolLM2-135M-Instruct"))
    cfg = EngineConfig(model=path, dtype=args.dtype, device=args.device, max_num_seqs=args.requests,
                       kv_cache_memory=int(args.kv_cache_gb * 2**30), cuda_graphs=cuda)
    engine = LLMEngine(cfg, load_dir(path, dtype=getattr(torch, args.dtype), device=args.device))
    prompts = make_prompts(args.requests, 64, 512, 2, 49152)
    probe(engine, [[t ^ 1 for t in p] for p in prompts], args.out, sync)  # warm: graphs, kernels
    print(json.dumps(probe(engine, prompts, args.out, sync), indent=1))


if __name__ == "__main__":
    main()
