"""Peak memory of the default model serving 32 streams of 1k tokens (issue 3's RSS target).

Each configuration runs in its own process (RSS is per process): the engine starts, 32 requests
of `--prompt` random prompt tokens and `--out` generated tokens arrive at once, all resident
(the KV budget is sized to hold them: no preemption). Prints RSS after start-up and the peak
(VmHWM) per configuration, then HF transformers `generate` on the same 32 sequences (one static
batch, fp32) as the baseline, also in its own process. Usage:
  python bench/memory.py --threads 2 [--configs fp32,bf16,fp32+bf16kv,int8+bf16kv,q4,bf16+int8kv,q4+int8kv] [--skip-hf]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CONFIGS = {  # name -> EngineConfig overrides (int8: activations in the CPU's default dtype)
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "bf16-unpacked": {"dtype": "bfloat16", "pack_weights": False},  # plain F.linear weights
    "fp32+bf16kv": {"dtype": "float32", "kv_cache_dtype": "bfloat16"},
    "int8+bf16kv": {"kv_cache_dtype": "bfloat16", "quantization": "int8"},
    "q4": {"quantization": "q4"},  # 4-bit decoder layers, int8 head; activations and KV bf16 (CPU)
    "bf16+int8kv": {"dtype": "bfloat16", "kv_cache_dtype": "int8"},  # int8 K/V with a scale a row
    "q4+int8kv": {"quantization": "q4", "kv_cache_dtype": "int8"},
}


def rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.dirname(__file__))
    from engine_throughput import make_prompts

    prompts = make_prompts(args.streams, args.prompt, args.prompt, 5, 49152)
    if args.child == "hf":
        import transformers

        from shoal.model.registry import ModelRegistry

        model = transformers.AutoModelForCausalLM.from_pretrained(
            ModelRegistry().resolve(args.model), dtype=torch.float32).eval()
        start = rss_mb("VmRSS")
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(torch.tensor(prompts), attention_mask=torch.ones(len(prompts), args.prompt, dtype=torch.long),
                           max_new_tokens=args.out, min_new_tokens=args.out, do_sample=False, pad_token_id=0)
        return {"startup_rss_mb": round(start), "peak_rss_mb": round(rss_mb("VmHWM")),
                "seconds": round(time.perf_counter() - t0, 1)}
    from shoal.config import EngineConfig
    from shoal.engine.llm import LLM
    from shoal.engine.sampling_params import SamplingParams

    from shoal.engine.paged_attention import PagedKVCache
    from shoal.model.loader import read_config
    from shoal.model.registry import ModelRegistry

    over = CONFIGS[args.child]
    tokens = args.streams * (args.prompt + args.out)
    mc = read_config(ModelRegistry().resolve(args.model))
    from shoal.engine.llm_engine import default_dtype

    model_dtype = over.get("dtype", "auto")
    bf16_model = model_dtype == "bfloat16" or (model_dtype == "auto" and default_dtype("cpu") == torch.bfloat16)
    kv_dtype = torch.bfloat16 if ("kv_cache_dtype" in over or bf16_model) else torch.float32
    if over.get("kv_cache_dtype") == "int8":
        kv_dtype = torch.int8
    per_token = PagedKVCache.bytes_per_block(mc.num_layers, 1, mc.num_kv_heads, mc.head_dim, kv_dtype)
    kv = int(tokens * per_token * 1.05) + (1 << 20)  # all sequences resident: no preemption
    llm = LLM(EngineConfig(model=args.model, kv_cache_memory=kv, max_num_seqs=args.streams,
                           max_num_batched_tokens=1024, **over))
    start = rss_mb("VmRSS")
    t0 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=args.out, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == args.out for o in outs)
    return {"startup_rss_mb": round(start), "peak_rss_mb": round(rss_mb("VmHWM")),
            "kv_cache_mb": round(kv / 2**20), "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=900)
    ap.add_argument("--out", type=int, default=100)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    runs = args.configs.split(",") + ([] if args.skip_hf else ["hf"])
    results = {}
    for name in runs:
        cmd = [sys.executable, __file__, "--child", name, "--model", args.model, "--threads", str(args.threads),
               "--streams", str(args.streams), "--prompt", str(args.prompt), "--out", str(args.out)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
        print(name, results[name], flush=True)
    print(f"\n{'config':14s} {'start-up RSS MB':>16s} {'peak RSS MB':>12s} {'seconds':>8s}")
    for name, r in results.items():
        print(f"{name:14s} {r['startup_rss_mb']:16d} {r['peak_rss_mb']:12d} {r['seconds']:8.1f}")
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "threads": args.threads, "streams": args.streams,
                      "prompt": args.prompt, "out": args.out, "results": results}))


if __name__ == "__main__":
    main()
