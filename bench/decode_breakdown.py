"""Where a decode step's time goes on CPU: `--streams` requests decoding together through the
one-call decode (`shoal_llama_decode`), each of its kernel calls timed inside the call
(`kernels.probes.decode_profile`: a steady clock around every call, summed per stage over the layers)
and the output layer (`compute_logits`, timed from Python), against the step's wall time from
`engine.step()`. Prints ms a step and the share of each stage (products, their LoRA deltas,
attention, the elementwise kernels, the LM head), the rest being the step's Python, the sampler
and the embedding. No baseline: it splits Shoal's own step; `bench/engine_throughput.py`
compares whole steps with HF.

    python bench/decode_breakdown.py [--streams 32] [--out 128] [--adapters 0] [--lora-dtype auto]
                                     [--quantization int8|q4] [--threads 2]

With `--adapters N` each request runs on one of N random adapters (rank 8, all projections).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from engine_throughput import make_adapters, make_prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--out", type=int, default=128)
    ap.add_argument("--adapters", type=int, default=0)
    ap.add_argument("--lora-dtype", default="auto")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from shoal.config import EngineConfig
    from shoal.engine.llm_engine import LLMEngine, load_for_engine
    from shoal.engine.sampling_params import SamplingParams
    from shoal.kernels import probes as ops
    from shoal.model.registry import ModelRegistry

    lora = args.adapters > 0
    cfg = EngineConfig(model=args.model, max_num_seqs=max(64, args.streams), max_num_batched_tokens=512,
                       quantization=args.quantization, enable_lora=lora, max_loras=max(args.adapters, 1),
                       max_cpu_loras=max(args.adapters, 1), max_lora_rank=8, lora_dtype=args.lora_dtype)
    engine = LLMEngine(cfg, load_for_engine(cfg))
    names = None
    if lora:
        paths = make_adapters(ModelRegistry().resolve(args.model), args.adapters,
                              tempfile.mkdtemp(prefix="shoal-breakdown-"))
        for i, p in enumerate(paths):
            engine.lora.add_adapter(f"a{i}", p)
        names = [f"a{i % args.adapters}" for i in range(args.streams)]
    prompts = make_prompts(args.streams, 64, 128, 1, engine.model_config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=args.out, ignore_eos=True)

    head = {"s": 0.0}
    logits_fn = engine.model.compute_logits

    def timed_logits(*a, **kw):  # the output layer runs after the one-call decode, from Python
        t0 = time.perf_counter()
        out = logits_fn(*a, **kw)
        head["s"] += time.perf_counter() - t0
        return out

    engine.model.compute_logits = timed_logits
    for i, p in enumerate(prompts):  # warm-up: every adapter in its slot, the kernels loaded
        engine.add_request(f"warm-up-{i}", p, params, names[i] if names else None)
    while engine.has_unfinished():
        engine.step()
    totals: dict[str, float] = {}
    steps: list[float] = []
    for r in range(2):
        for i, p in enumerate(prompts):
            engine.add_request(f"timed-{r}-{i}", p, params, names[i] if names else None)
        while engine.has_unfinished():
            ops.decode_profile(True)
            head["s"] = 0.0
            t = time.perf_counter()
            engine.step()
            dt = time.perf_counter() - t
            sums = ops.decode_profile(False)
            if sums["calls"]:  # a one-call decode step (prefill steps take the Python path)
                steps.append(dt)
                sums["LM head"] = head["s"]
                for k, v in sums.items():
                    totals[k] = totals.get(k, 0.0) + v
    n = len(steps)
    if not n:
        raise SystemExit("no step ran the one-call decode (it needs packed products: an AVX-512 CPU)")
    wall = sum(steps) / n * 1e3
    per = {k: totals[k] / n * 1e3 for k in (*ops.DECODE_STAGES, "LM head")}
    kernels = sum(per.values())
    print(f"{n} decode steps of {args.streams} rows (bf16, {args.quantization or 'bf16'} weights"
          f"{f', {args.adapters} adapters, {args.lora_dtype} slots' if lora else ''}): "
          f"mean step {wall:.2f} ms, median {statistics.median(steps) * 1e3:.2f} ms")
    print(f"{'stage':16s} {'ms/step':>8s} {'share':>7s}")
    for k, v in per.items():
        if v > 0:
            print(f"{k:16s} {v:8.3f} {v / wall:7.1%}")
    print(f"{'(the above)':16s} {kernels:8.3f} {kernels / wall:7.1%}")
    print(f"{'(the rest)':16s} {wall - kernels:8.3f} {(wall - kernels) / wall:7.1%}  (Python, sampler, embedding)")
    print(json.dumps({"streams": args.streams, "adapters": args.adapters, "lora_dtype": args.lora_dtype,
                      "quantization": args.quantization, "threads": args.threads, "steps": n,
                      "step_ms": wall, "stage_ms": per}))


if __name__ == "__main__":
    main()
