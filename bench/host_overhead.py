"""What the engine's host side costs a decode step, per row: a tiny random model of the default
model's vocabulary (the `tiny` shape of `bench/gpu_engine.py`: 2 layers of 64 wide, so the
forward is small and the step is mostly the engine's own work), `--rows` requests decoding at
once, each stage of `LLMEngine.step` timed: the scheduler, the runner (index tensors, the
forward, the LM head), the sampler (its kernels and Python), the rest of the postprocess
(appending tokens, stop checks, detokenizing), building the outputs. On a GPU the model's share
shrinks and these stay (issue 3's 256-request target needs them small), so they are measured
here, on the CPU, where they run the same code.

    python bench/host_overhead.py [--rows 32,256] [--steps 100] [--temperature 0] [--top-p 1]
        [--async-scheduling] [--final-only] [--graphs]

`--graphs`: decode steps take the GPU's path (`DecodeGraphs`' fixed-shape step, run eagerly on the
CPU: its input packing, no CPU decode kernel). The `host` column is the step less the model's work
(`forward`: the forward and LM head; with `--graphs` the graph's whole function) and the sampler:
the engine's own work, as a GPU host pays it (there the sampler is a few launches).

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
            async_scheduling: bool = False, final_only: bool = False, graphs: bool = False) -> dict[str, float]:
    from shoal.config import EngineConfig
    from shoal.engine.llm_engine import LLMEngine
    from shoal.engine.sampling_params import SamplingParams
    from shoal.model.loader import load_dir

    cfg = EngineConfig(model=path, dtype="bfloat16", device="cpu", max_num_seqs=rows, max_num_batched_tokens=8192,
                       async_scheduling=async_scheduling)
    engine = LLMEngine(cfg, load_dir(path, dtype=torch.bfloat16, device="cpu"))
    if graphs:
        engine.runner.cpu_decode_forward = False
        engine.runner.use_decode_graphs(capture=False)
    rng = random.Random(0)
    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=steps + 16, ignore_eos=True)
    for i in range(rows):
        engine.add_request(f"r{i}", [rng.randrange(100, 40000) for _ in range(64)], params, final_only=final_only)
    for _ in range(8):  # the prompts' prefill and a few decode steps
        engine.step()
    spent: dict[str, list[float]] = {k: [] for k in ("schedule", "run", "sampler", "postprocess", "outputs", "step",
                                                     "forward")}

    acc = dict.fromkeys(spent, 0.0)  # this step's time in each part (the forward's is two calls)

    def timed(name, f):
        def call(*a, **k):
            t = time.perf_counter()
            r = f(*a, **k)
            acc[name] += time.perf_counter() - t
            return r
        return call

    engine.scheduler.schedule = timed("schedule", engine.scheduler.schedule)
    if graphs:  # the graph's whole function (one replay on a GPU: the slots, masks, forward, head)
        engine.runner.graphs._step = timed("forward", engine.runner.graphs._step)
    else:  # the model's own time (`run` holds it)
        engine.model.forward = timed("forward", engine.model.forward)
        engine.model.compute_logits = timed("forward", engine.model.compute_logits)
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
        acc["step"] = time.perf_counter() - t
        for k in spent:
            spent[k].append(acc[k])
            acc[k] = 0.0
    ms = {k: statistics.median(v) * 1e3 for k, v in spent.items()}  # (flights: no schedule)
    if engine.ahead is None:
        ms["postprocess"] -= ms["sampler"]  # (the sampler runs inside the postprocess)
    ms["host"] = statistics.median(s - f - p for s, f, p in zip(spent["step"], spent["forward"], spent["sampler"])) * 1e3
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
    ap.add_argument("--graphs", action="store_true",
                    help="decode steps through the decode graphs' step, run eagerly (the GPU's path)")
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "shoal-gpu-bench"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.dirname(__file__))
    from gpu_engine import build

    from shoal.model.registry import ModelRegistry

    path = build("tiny", args.work, ModelRegistry().resolve("SmolLM2-135M-Instruct"))
    results = {}
    print(f"{'rows':>5s} {'step ms':>8s} {'schedule':>9s} {'run':>7s} {'forward':>8s} {'sampler':>8s}"
          f" {'postprocess':>12s} {'outputs':>8s} {'host':>6s} {'us a row (schedule, postprocess, outputs)':>42s}"
          f" {'host us a row':>14s}")
    for rows in (int(r) for r in args.rows.split(",")):
        ms = measure(path, rows, args.steps, args.temperature, args.top_p, args.async_scheduling, args.final_only,
                     args.graphs)
        results[rows] = ms
        per_row = (ms["schedule"] + ms["postprocess"] + ms["outputs"]) / rows * 1e3
        print(f"{rows:5d} {ms['step']:8.2f} {ms['schedule']:9.2f} {ms['run']:7.2f} {ms['forward']:8.2f}"
              f" {ms['sampler']:8.2f} {ms['postprocess']:12.2f} {ms['outputs']:8.2f} {ms['host']:6.2f}"
              f" {per_row:42.1f} {ms['host'] / rows * 1e3:14.1f}")
    print(json.dumps({"threads": args.threads, "temperature": args.temperature, "top_p": args.top_p,
                      "async_scheduling": args.async_scheduling, "final_only": args.final_only,
                      "graphs": args.graphs, "steps": args.steps, "ms": results}))


if __name__ == "__main__":
    main()
