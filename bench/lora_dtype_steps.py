"""What int8 adapter slots (`EngineConfig.lora_dtype="int8"`) save in a decode step: two engines
of the default model in one process, bf16 slots and int8 slots, each running 32 requests
(prompts of 64-128 tokens, 48 greedy tokens) base-only and then each on its own random adapter
(rank 8, all projections), alternated `--repeat` times so the machine's drift falls on both.
Prints the median step of the last 40 steps of each run (all 32 rows decoding) and the adapters'
cost a step.

    python bench/lora_dtype_steps.py [--repeat 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from engine_throughput import make_adapters, make_prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from shoal.config import EngineConfig
    from shoal.engine.llm_engine import LLMEngine, load_for_engine
    from shoal.engine.sampling_params import SamplingParams
    from shoal.model.registry import ModelRegistry

    paths = make_adapters(ModelRegistry().resolve(args.model), 32, tempfile.mkdtemp(prefix="shoal-lora-steps-"))
    engines = {}
    for ld in ("auto", "int8"):
        cfg = EngineConfig(model=args.model, max_num_seqs=64, max_num_batched_tokens=512, enable_lora=True,
                           max_loras=32, max_cpu_loras=32, max_lora_rank=8, lora_dtype=ld)
        engines[ld] = LLMEngine(cfg, load_for_engine(cfg))
        for i, p in enumerate(paths):
            engines[ld].lora.add_adapter(f"a{i}", p)
    prompts = make_prompts(32, 64, 128, 1, 49152)
    names = [f"a{i}" for i in range(32)]

    def run(engine, adapters) -> list[float]:
        params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}-{time.time()}", p, params, adapters[i] if adapters else None)
        steps = []
        while engine.has_unfinished():
            t = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - t)
        return steps[-40:]  # decode-only steps of all 32 rows

    for e in engines.values():  # warm-up: every adapter in its slot
        run(e, None), run(e, names)
    times = {(ld, w): [] for ld in engines for w in ("base", "adapters")}
    for _ in range(args.repeat):
        for ld, e in engines.items():
            times[(ld, "base")] += run(e, None)
            times[(ld, "adapters")] += run(e, names)
    for ld in engines:
        b = statistics.median(times[(ld, "base")]) * 1e3
        a = statistics.median(times[(ld, "adapters")]) * 1e3
        print(f"lora_dtype {ld}: 32-row decode step base {b:.2f} ms, 32 adapters {a:.2f} ms, "
              f"adapters' cost {a - b:.2f} ms, ratio {b / a:.3f}")


if __name__ == "__main__":
    main()
