"""Engine throughput and latency against HF transformers `generate`, in one run.

Workloads (each sized by flags so a 2-core box finishes in minutes):
  single   1 stream: a 128-token prompt, `--out` tokens.
  streams  `--streams` concurrent requests (prompts `--stream-prompt`, 64-128 tokens), `--out` tokens each.
  many     `--requests` requests with prompts 64-512 tokens, `--out` tokens each.
  adapters the `streams` workload with `--adapters` random LoRA adapters mixed, against the
           same workload on the base model, and PEFT mixed-adapter batches as the baseline.
  many_adapters  the `many` workload with the adapters mixed (compare with `many`).
  prefill  8 prompts of 512 tokens, one output token each: prompt tokens/s (HF at batch 1).
Shoal reports output tok/s, TTFT and inter-token latency p50/p99; HF runs static batches (1 and
`--hf-batch`, padded) in fp32 and bf16. Prints a table and one JSON line; peak RSS is read after
Shoal's runs, before any baseline loads. Shoal runs with the engine's defaults, so on a CPU
small batches decode with prompt-lookup drafts (`--speculative-tokens 0`: without; the single
workload's random prompt makes the model repeat itself, easy drafts: `bench/speculative.py`
measures them on chat prompts). Usage:
  python bench/engine_throughput.py --workloads single,streams --threads 2
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import tempfile
import time

import torch


def rss_peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_prompts(n: int, lo: int, hi: int, seed: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 1) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(int(q * len(xs)), len(xs) - 1)] if xs else float("nan")


def run_shoal(engine, prompts, out_tokens: int, adapters=None, sync=None, temperature: float = 0.0,
              top_p: float = 1.0) -> dict:
    """Drive the engine's step loop; time every token as it is produced (after `sync()`, e.g.
    torch.cuda.synchronize, when given). temperature > 0: request i samples with seed i."""
    from shoal.engine.sampling_params import SamplingParams

    t0 = time.perf_counter()
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    gaps: list[float] = []
    for i, p in enumerate(prompts):
        params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=out_tokens,
                                ignore_eos=True, seed=i if temperature else None)
        engine.add_request(f"b{i}-{t0}", p, params, adapters[i] if adapters else None)
    total = 0
    while engine.has_unfinished():
        outs = engine.step()
        if sync is not None:
            sync()
        now = time.perf_counter()
        for o in outs:
            k = len(o.outputs[0].token_ids_delta)
            if not k:
                continue
            total += k
            if o.request_id not in first:
                first[o.request_id] = now - t0
            else:
                gaps.append(now - last[o.request_id])
            last[o.request_id] = now
    dt = time.perf_counter() - t0
    ttft = list(first.values())
    return {"tok_s": total / dt, "seconds": dt, "tokens": total,
            "ttft_p50_ms": 1e3 * pct(ttft, 0.5), "ttft_p99_ms": 1e3 * pct(ttft, 0.99),
            "itl_p50_ms": 1e3 * pct(gaps, 0.5), "itl_p99_ms": 1e3 * pct(gaps, 0.99)}


def run_hf(model, prompts, out_tokens: int, batch: int, adapter_names=None, device: str = "cpu",
           sync=None, temperature: float = 0.0, top_p: float = 1.0) -> dict:
    """Static batches of `batch` left-padded prompts through HF `generate` (greedy, or sampling
    at `temperature` and `top_p` with top_k off, as OpenAI's sampling)."""
    total, t0 = 0, time.perf_counter()
    for s in range(0, len(prompts), batch):
        chunk = prompts[s:s + batch]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        kw = {"adapter_names": adapter_names[s:s + batch]} if adapter_names else {}
        if temperature:
            kw.update(do_sample=True, temperature=temperature, top_k=0, top_p=top_p)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=out_tokens,
                                 min_new_tokens=out_tokens, pad_token_id=0, **({"do_sample": False} | kw))
        if sync is not None:
            sync()
        total += (out.shape[1] - width) * len(chunk)
    dt = time.perf_counter() - t0
    return {"tok_s": total / dt, "seconds": dt, "tokens": total}


def make_adapters(model_dir: str, n: int, root: str, std: float = 0.02) -> list[str]:
    """n random PEFT adapters (r=8, all linear layers, weights N(0, std)) of the model at model_dir."""
    import transformers
    from peft import LoraConfig, get_peft_model

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        path = os.path.join(root, f"adapter{i}")
        peft_model.save_pretrained(path)
        paths.append(path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--workloads", default="single,streams,adapters")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=int, default=64, help="output tokens per request")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--stream-prompt", type=lambda a: tuple(int(x) for x in a.split(",")), default=(64, 128),
                    help="LO,HI: the streams' prompt lengths (default 64,128; e.g. 900,1000 for long contexts)")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--hf-batch", type=int, default=8)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantization", default=None,
                    help="int8: Shoal's weight-only int8 layers; q4: 4-bit (Q4_1) layers")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--kv-cache-mb", type=int, default=None, help="KV cache budget (default: EngineConfig's)")
    ap.add_argument("--lora-dtype", default="auto", help="adapter slots: auto or int8 (EngineConfig.lora_dtype)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--unpacked-too", action="store_true",
                    help="also run Shoal with pack_weights=False (plain F.linear), for an A/B")
    ap.add_argument("--kernels-too", action="store_true",
                    help="also run Shoal with the fused CPU kernels off (PyTorch ops), for an A/B")
    ap.add_argument("--int8-too", action="store_true",
                    help="also run with --quantization int8, in the same process (an A/B)")
    ap.add_argument("--one-call-too", action="store_true",
                    help="also run with the one-call decode step off (the per-layer Python path), for an A/B")
    ap.add_argument("--also", default="",
                    help="more --quantization modes to run in the same process, e.g. int8,q4")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="sample at this temperature (both sides; 0 = greedy). OpenAI's default is 1")
    ap.add_argument("--top-p", type=float, default=1.0, help="with --temperature: nucleus sampling")
    ap.add_argument("--speculative-tokens", type=int, default=None,
                    help="EngineConfig.speculative_tokens (default: the engine's, 8 on CPU; 0 = no drafts)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sample = {"temperature": args.temperature, "top_p": args.top_p}
    torch.set_num_threads(args.threads)
    from shoal.config import EngineConfig
    from shoal.engine.llm_engine import LLMEngine, load_for_engine
    from shoal.model.registry import ModelRegistry

    work = args.workloads.split(",")
    cfg = EngineConfig(model=args.model, dtype=args.dtype, max_num_seqs=max(64, args.streams),
                       max_num_batched_tokens=512, enable_lora=any(w.endswith("adapters") for w in work),
                       max_loras=max(args.adapters, 1), max_cpu_loras=max(args.adapters, 1),
                       max_lora_rank=8, quantization=args.quantization,
                       kv_cache_dtype=args.kv_cache_dtype, lora_dtype=args.lora_dtype,
                       speculative_tokens=args.speculative_tokens,
                       **({"kv_cache_memory": args.kv_cache_mb * 2**20} if args.kv_cache_mb else {}))
    loaded = load_for_engine(cfg)
    vocab = loaded.config.vocab_size
    sets = {
        "single": make_prompts(1, 128, 128, 0, vocab),
        "streams": make_prompts(args.streams, *args.stream_prompt, 1, vocab),
        "many": make_prompts(args.requests, 64, 512, 2, vocab),
        "prefill": make_prompts(8, 512, 512, 3, vocab),
    }
    prompt_tokens = sum(len(p) for p in sets["prefill"])
    results: dict[str, dict] = {}
    adapter_paths: list[str] = []
    if any(w.endswith("adapters") for w in work):
        root = tempfile.mkdtemp(prefix="shoal-adapters-")
        adapter_paths = make_adapters(ModelRegistry().resolve(args.model), args.adapters, root)
    from shoal import kernels

    q = args.quantization
    also = [m for m in args.also.split(",") if m] + ["int8"] * args.int8_too
    variants = ([(True, True, q)] + [(False, True, q)] * args.unpacked_too + [(True, False, q)] * args.kernels_too
                + [(True, True, m) for m in dict.fromkeys(also) if m != q])
    variants = [(*v, True) for v in variants] + [(True, True, q, False)] * args.one_call_too
    from shoal.engine.cpu_decode import CPUDecodeForward

    real_fits = CPUDecodeForward._native_fits  # put back after the Shoal runs
    for pack, cpu_kernels, quant, one_call in variants:
        CPUDecodeForward._native_fits = real_fits if one_call else (lambda self, h, ctx: False)
        cfg.pack_weights, cfg.quantization = pack, quant
        kernels.set_enabled(cpu_kernels)  # before the engine: LoRA slots follow it
        engine = LLMEngine(cfg, loaded or load_for_engine(cfg))  # a fresh model for the second
        loaded = None
        dtype = str(next(engine.model.parameters()).dtype).replace("torch.", "")
        dtype += f", {quant} weights" if quant else ""
        dtype += "" if pack else ", unpacked"
        dtype += "" if cpu_kernels else ", PyTorch ops"
        dtype += "" if one_call else ", per-layer decode"
        dtype += ", int8 adapter slots" if args.lora_dtype == "int8" else ""
        run_shoal(engine, make_prompts(2, 16, 16, 9, vocab), 4)  # warm-up
        for w in ("single", "streams", "many"):
            if w in work:
                results[f"shoal {w} ({dtype})"] = run_shoal(engine, sets[w], args.out, **sample)
        if "prefill" in work:
            r = run_shoal(engine, sets["prefill"], 1)
            results[f"shoal prefill, prompt tok/s ({dtype})"] = {**r, "tok_s": prompt_tokens / r["seconds"]}
        for i, p in enumerate(adapter_paths):
            engine.lora.add_adapter(f"a{i}", p)
        if adapter_paths and any(w.endswith("adapters") for w in work):
            # every adapter resident before the timed run (as PEFT's are loaded before its
            # run); the cold load from disk is reported on its own
            names = [f"a{i}" for i in range(len(adapter_paths))]
            r = run_shoal(engine, make_prompts(len(names), 16, 16, 8, vocab), 1, names)
            results[f"shoal: {len(names)} adapters loaded from disk + one step, s ({dtype})"] = {
                **r, "tok_s": r["seconds"]}
        for w in ("adapters", "many_adapters"):
            if w in work:
                prompts = sets["streams" if w == "adapters" else "many"]
                names = [f"a{i % args.adapters}" for i in range(len(prompts))]
                results[f"shoal {w.replace('adapters', '').strip('_') or 'streams'}, {args.adapters} "
                        f"adapters mixed ({dtype})"] = run_shoal(engine, prompts, args.out, names, **sample)
        if pack and cpu_kernels and quant == q:
            shoal_rss = rss_peak_mb()
        del engine
        gc.collect()  # the next variant must not run beside this one's model and KV cache
    kernels.set_enabled(True)
    CPUDecodeForward._native_fits = real_fits
    if not args.skip_hf:
        import transformers

        model_dir = ModelRegistry().resolve(args.model)
        for dt in (torch.float32, torch.bfloat16):
            hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dt).eval()
            name = str(dt).replace("torch.", "")
            run_hf(hf, make_prompts(1, 16, 16, 9, vocab), 4, 1)
            if "single" in work:
                results[f"HF generate single, batch 1 ({name})"] = run_hf(hf, sets["single"], args.out, 1,
                                                                          **sample)
            if "streams" in work or "adapters" in work:
                results[f"HF generate streams, batch {args.hf_batch} ({name})"] = run_hf(
                    hf, sets["streams"], args.out, args.hf_batch, **sample)
            if "many" in work:
                results[f"HF generate many, batch {args.hf_batch} ({name})"] = run_hf(
                    hf, sets["many"], args.out, args.hf_batch, **sample)
            if "prefill" in work:
                r = run_hf(hf, sets["prefill"], 1, 1)
                results[f"HF generate prefill, prompt tok/s, batch 1 ({name})"] = {
                    **r, "tok_s": prompt_tokens / r["seconds"]}
        if adapter_paths:
            from peft import PeftModel

            hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
            pm = PeftModel.from_pretrained(hf, adapter_paths[0], adapter_name="a0")
            for i, p in enumerate(adapter_paths[1:], 1):
                pm.load_adapter(p, adapter_name=f"a{i}")
            pm.eval()
            names = [f"a{i % args.adapters}" for i in range(len(sets["streams"]))]
            results[f"PEFT mixed adapters, batch {args.hf_batch} (bfloat16)"] = run_hf(
                pm, sets["streams"], args.out, args.hf_batch, names, **sample)
    report(results, {"threads": args.threads, "out_tokens": args.out, **sample,
                     "shoal_peak_rss_mb": round(shoal_rss)}, args.json)


def machine() -> dict:
    """What ran it: the CPU's model name, the body of Shoal's packed products (amx,
    avx512-bf16, avx512, avx2 or none), torch's version."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    from shoal.kernels import qlinear

    return {"cpu": cpu, "packed_body": qlinear.body() or "none", "torch": torch.__version__}


def report(results: dict[str, dict], meta: dict, json_path: str | None) -> None:
    """Print the table and one JSON line (date, machine, meta, results); also write it to json_path."""
    print(f"\n{'run':58s} {'tok/s':>8s} {'TTFT p50/p99 ms':>17s} {'ITL p50/p99 ms':>16s}")
    for k, r in results.items():
        if "tok_s" not in r:  # (another kind of entry: a step-phase split, say; in the JSON only)
            continue
        lat = (f"{r['ttft_p50_ms']:7.0f}/{r['ttft_p99_ms']:<7.0f}  {r['itl_p50_ms']:6.2f}/{r['itl_p99_ms']:<6.2f}"
               if "ttft_p50_ms" in r else "")
        print(f"{k:58s} {r['tok_s']:8.1f}  {lat}")
    out = {"date": time.strftime("%Y-%m-%d"), **machine(), **meta, "results": results}
    print(json.dumps(out))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
