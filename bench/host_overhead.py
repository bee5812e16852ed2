"""What the engine's host side costs a decode step, per row: a tiny random model of the default
model's vocabulary (the `tiny` shape of `bench/gpu_engine.py`: 2 layers of 64 wide, so the
forward is small and the step is mostly the engine's own work), `--rows` requests decoding at
once, each stage of `LLMEngine.step` timed: the scheduler, the runner (index tensors, the
forward, the LM head), the sampler (its kernels and Python), the rest of the postprocess
(appending tokens, stop checks, detokenizing), building the outputs. On a GPU the model's share
shrinks and these stay (issue 3's 256-request target needs them small), so they are measured
here, on the CPU, where they run the same code.

    python bench/host_overhead.py [--rows 32,256] [--steps 100] [--temperature 0] [--top-p 1]
        [--async-scheduling] [--final-only]

No baseline runs beside it (HF `generate` has no scheduler or detokenizer to compare); the
numbers are for comparing Shoal's commits with each other.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch


def measure(path: str, rows: int, steps: int, temperature: float, top_p: float,
            async_scheduling: bool = False, final_only: bool = False) -> dict[str, float]:
    from shoal.config import EngineConfig
    from shoal.engine.llm_engine import LLMEngine
    from shoal.engine.sampling_params import SamplingParams
    from shoal.model.loader import load_dir

    cfg = EngineConfig(model=path, dtype="bfloat16", device="cpu", max_num_seqs=rows, max_num_batched_tokens=8192,
                       async_scheduling=async_scheduling)
    engine = LLMEngine(cfg, load_dir(path, dtype=torch.bfloat16, device="cpu"))
    rng = random.Random(0)
    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=steps + 16, ignore_eos=True)
    for i in range(rows):
        engine.add_request(f"r{i}", [rng.randrange(100, 40000) for _ in range(64)], params, final_only=final_only)
    for _ in range(8):  # the prompts' prefill and a few decode steps
        engine.step()
    spent: dict[str, list[float]] = {k: [] for k in ("schedule", "run", "sampler", "postprocess", "outputs", "step")}

    def timed(name, f):
        def call(*a, **k):
            t = time.perf_counter()
            r = f(*a, **k)
            spent[name].append(time.perf_counter() - t)
            return r
        return call

    engine.scheduler.schedule = timed("schedule", engine.scheduler.schedule)
    engine.runner.run = timed("run", engine.runner.run)
    if engine.ahead is not None:  # flights: a landing appends and checks stops (sampled at launch)
        engine.ahead._land = timed("postprocess", engine.ahead._land)
    else:
        engine._postprocess = timed("postprocess", engine._postprocess)
    engine._outputs = timed("outputs", engine._outputs)
    if hasattr(engine.sampler, "sample"):
        engine.sampler.sample = timed("sampler", engine.sampler.sample)
    else:  # (commits before `Sampler.sample`: the engine called the sampler)
        engine.sampler = timed("sampler", engine.sampler.__call__)
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        spent["step"].append(time.perf_counter() - t)
    ms = {k: statistics.median(v) * 1e3 if v else 0.0 for k, v in spent.items()}  # (flights: no schedule)
    if engine.ahead is None:
        ms["postprocess"] -= ms["sampler"]  # (the sampler runs inside the postprocess)
    return ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="32,256")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--final-only", action="store_true",
                    help="requests report only their finished output (as `LLM.generate`'s): no outputs a step")
    ap.add_argument("--async-scheduling", action="store_true",
                    help="decode steps in flight (`engine.decode_ahead`): chained and landed, not scheduled")
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "shoal-gpu-bench"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.dirname(__file__))
    from gpu_engine import build

    from shoal.model.registry import ModelRegistry

    path = build("tiny", args.work, ModelRegistry().resolve("SmolLM2-135M-Instruct"))
    results = {}
    print(f"{'rows':>5s} {'step ms':>8s} {'schedule':>9s} {'run':>7s} {'sampler':>8s} {'postprocess':>12s}"
          f" {'outputs':>8s} {'us a row (schedule, postprocess, outputs)':>42s}")
    for rows in (int(r) for r in args.rows.split(",")):
        ms = measure(path, rows, args.steps, args.temperature, args.top_p, args.async_scheduling, args.final_only)
        results[rows] = ms
        per_row = (ms["schedule"] + ms["postprocess"] + ms["outputs"]) / rows * 1e3
        print(f"{rows:5d} {ms['step']:8.2f} {ms['schedule']:9.2f} {ms['run']:7.2f} {ms['sampler']:8.2f}"
              f" {ms['postprocess']:12.2f} {ms['outputs']:8.2f} {per_row:42.1f}")
    print(json.dumps({"threads": args.threads, "temperature": args.temperature, "top_p": args.top_p,
                      "async_scheduling": args.async_scheduling, "final_only": args.final_only,
                      "steps": args.steps, "ms": results}))


if __name__ == "__main__":
    main()
