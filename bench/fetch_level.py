"""Which cache level the memory-bound decode kernels should read ahead into on this CPU: decode
attention's keys and values and the LoRA slots, each into L1 or L2 (`kernels.probes.fetch_l2`).
One engine of the default model runs `--streams` requests, each on one of `--adapters` random
adapters (rank 8, all projections); the four choices take turns step by step in the same process,
so the machine's drift falls on all of them alike. Prints, per choice, the median decode step and
the one-call decode's timers (`kernels.probes.decode_profile`) for attention and the LoRA calls.
No baseline: it compares Shoal's settings with each other (the default is marked).

    python bench/fetch_level.py [--streams 32] [--adapters 32] [--lora-dtype auto] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from engine_throughput import make_adapters, make_prompts

LORA = ("q|k|v LoRA", "o LoRA", "gate|up LoRA", "down LoRA")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--lora-dtype", default="auto")
    ap.add_argument("--out", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from shoal.config import EngineConfig
    from shoal.engine.llm_engine import LLMEngine, load_for_engine
    from shoal.engine.sampling_params import SamplingParams
    from shoal.kernels import probes
    from shoal.model.registry import ModelRegistry

    default = probes.fetch_l2()
    if default is None:
        raise SystemExit("this build reads nothing ahead (no AVX2)")
    lora = args.adapters > 0
    cfg = EngineConfig(model=args.model, max_num_seqs=max(64, args.streams), max_num_batched_tokens=512,
                       enable_lora=lora, max_loras=max(args.adapters, 1), max_cpu_loras=max(args.adapters, 1),
                       max_lora_rank=8, lora_dtype=args.lora_dtype)
    engine = LLMEngine(cfg, load_for_engine(cfg))
    names = [None] * args.streams
    if lora:
        for i, p in enumerate(make_adapters(ModelRegistry().resolve(args.model), args.adapters,
                                            tempfile.mkdtemp(prefix="shoal-fetch-"))):
            engine.lora.add_adapter(f"a{i}", p)
        names = [f"a{i % args.adapters}" for i in range(args.streams)]
    prompts = make_prompts(args.streams, 64, 128, 1, engine.model_config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=args.out, ignore_eos=True)
    choices = [(kv, slots) for kv in (False, True) for slots in (False, True)]
    seen: dict[tuple[bool, bool], dict[str, list[float]]] = {c: {"step": [], "attention": [], "LoRA": []}
                                                            for c in choices}
    for r in range(args.rounds + 1):  # round 0 warms up (adapters in their slots, kernels loaded)
        for i, p in enumerate(prompts):
            engine.add_request(f"r{r}-{i}", p, params, names[i])
        k = 0
        while engine.has_unfinished():
            c = choices[k % len(choices)]
            probes.fetch_l2(*c)
            probes.decode_profile(True)
            t = time.perf_counter()
            engine.step()
            dt = time.perf_counter() - t
            sums = probes.decode_profile(False)
            if r and sums["calls"]:  # one-call decode steps only (prefill steps take another path)
                k += 1
                seen[c]["step"].append(dt * 1e3)
                seen[c]["attention"].append(sums["attention"] * 1e3)
                seen[c]["LoRA"].append(sum(sums[s] for s in LORA) * 1e3)
            elif not r:
                k += 1
    probes.fetch_l2(*default)
    level = {False: "L1", True: "L2"}
    print(f"{args.streams} rows, {args.adapters} adapters ({args.lora_dtype} slots), "
          f"{len(seen[choices[0]]['step'])} decode steps a choice, median ms:")
    print(f"{'kv':>3s} {'slots':>5s} {'step':>8s} {'attention':>10s} {'LoRA':>8s}")
    rows = []
    for c in choices:
        med = {key: statistics.median(v) for key, v in seen[c].items()}
        mark = "  (default)" if c == default else ""
        print(f"{level[c[0]]:>3s} {level[c[1]]:>5s} {med['step']:8.2f} {med['attention']:10.2f} {med['LoRA']:8.2f}{mark}")
        rows.append({"kv": level[c[0]], "slots": level[c[1]], **med, "default": c == default})
    print(json.dumps({"streams": args.streams, "adapters": args.adapters, "lora_dtype": args.lora_dtype,
                      "threads": args.threads, "choices": rows}))


if __name__ == "__main__":
    main()
