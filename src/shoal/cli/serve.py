"""`shoal serve`: the engine, the store and the API in one process, plus fine-tuning workers in
their own processes so training never takes the server's CPU time slice away from streaming."""

from __future__ import annotations

import argparse
import os
import sys
import time


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the OpenAI-compatible API on one base model, its adapters and fine-tuned models."""
    import torch
    import uvicorn

    from ..api.app import create_app
    from ..config import EngineConfig
    from ..engine.async_engine import AsyncEngine
    from ..settings import ServerSettings
    from ..store import Store

    settings = ServerSettings.from_env(host=args.host, port=args.port, database_url=args.database_url,
                                       rate_limit_rpm=args.rate_limit_rpm,
                                       rate_limit_tpm=args.rate_limit_tpm, workers=args.workers)
    store = Store.open(settings.database_url)
    if not settings.loopback and not store.has_keys():
        raise ValueError(f"host: refusing to serve on {settings.host} without API keys (open mode "
                         f"is for loopback only); create one: shoal keys create --org NAME")
    torch.set_num_threads(args.threads)
    sized = batch_defaults(args)
    cfg = EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                       max_num_seqs=sized["max_num_seqs"], max_num_batched_tokens=sized["max_num_batched_tokens"],
                       max_model_len=args.max_model_len, kv_cache_memory=sized["kv_cache_memory"],
                       enable_lora=not args.no_lora, max_loras=args.max_loras,
                       max_lora_rank=args.max_lora_rank, max_cpu_loras=args.max_cpu_loras,
                       quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                       lora_dtype=args.lora_dtype,
                       pack_weights=not args.no_pack_weights, cuda_graphs=not args.no_cuda_graphs,
                       async_scheduling=args.async_scheduling, speculative_tokens=args.speculative_tokens)
    t0 = time.perf_counter()
    engine = AsyncEngine(cfg)
    for spec in args.lora or []:
        name, _, path = spec.partition("=")
        if not path:
            raise ValueError(f"lora: expected NAME=PATH, got {spec!r}")
        if engine.engine.lora is None:
            raise ValueError("lora: adapters need LoRA enabled (drop --no-lora)")
        engine.engine.lora.add_adapter(name, path)
    app = create_app(engine, args.model, store, settings)
    workers = start_workers(settings, args)
    mode = "open mode (no API keys yet)" if settings.loopback and not store.has_keys() else "API keys"
    if cfg.device == "cpu":  # fused C++ kernels, or why not (`shoal.kernels`)
        from .. import kernels

        from ..kernels import qlinear

        mode += "; CPU kernels " + ("on" if kernels.enabled() else f"off ({kernels.reason()})")
        if kernels.enabled() and qlinear.packed_ready():
            mode += ", products on " + {"amx": "AMX tiles", "avx512-bf16": "AVX512-BF16", "avx512": "AVX-512 FMA",
                                        "avx2": "AVX2 FMA"}.get(qlinear.body(), str(qlinear.body()))
    if cfg.quantization:
        mode += f"; {cfg.quantization} weights"
    print(f"shoal: {args.model} ready in {time.perf_counter() - t0:.1f}s; {mode}; "
          f"{len(workers)} fine-tuning worker(s); OpenAI API at "
          f"http://{settings.host}:{settings.port}/v1", file=sys.stderr)
    freeze_startup_objects()
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait(timeout=10)
        engine.shutdown()
    return 0


# the batch's size where the flags leave it: (max_num_seqs, max_num_batched_tokens, KV MiB or None)
BATCH_DEFAULTS = {
    "cpu": (64, 512, 256),
    # a GPU runs 256 rows as cheaply as a few (the H200 benchmark's settings); tokens a step by
    # the model's size (`token_budget`); KV: half the memory free once the model is loaded
    # (`kv_cache_budget`)
    "cuda": (256, None, None),
}


def batch_defaults(args: argparse.Namespace) -> dict:
    """max_num_seqs, max_num_batched_tokens and kv_cache_memory (bytes, None = the engine's
    share of free GPU memory): the flags, else the device's defaults."""
    seqs, tokens, kv_mb = BATCH_DEFAULTS["cuda" if str(args.device).startswith("cuda") else "cpu"]
    kv_mb = args.kv_cache_mb if args.kv_cache_mb is not None else kv_mb
    return {"max_num_seqs": args.max_num_seqs if args.max_num_seqs is not None else seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens if args.max_num_batched_tokens is not None else tokens,
            "kv_cache_memory": kv_mb * 2**20 if kv_mb is not None else None}


def freeze_startup_objects() -> int:
    """Move everything alive after start-up (the model's modules, the tokenizer, imported
    modules: ~450k tracked objects in a process holding an engine and transformers) out of the
    garbage collector's scans; returns how many. A full collection over them took ~140 ms
    (measured, 2-core Xeon), and it stalls the engine loop, every stream with it, whenever enough
    new objects have piled up; the objects made while serving are collected as before."""
    import gc

    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def start_workers(settings, args) -> list:
    """`settings.workers` fine-tuning worker processes (`shoal worker`) sharing the database."""
    import subprocess

    if not settings.workers:
        return []
    env = dict(os.environ, SHOAL_HOME=str(settings.home))
    if settings.database_url:
        env["SHOAL_DATABASE_URL"] = settings.database_url
    cmd = [sys.executable, "-m", "shoal.cli", "worker", "--threads", str(args.worker_threads)]
    return [subprocess.Popen(cmd, env=env) for _ in range(settings.workers)]


def add_serve_args(p: argparse.ArgumentParser) -> None:
    from ..config import EngineConfig
    from ..config import DEFAULT_MODEL

    h = {k: v.replace("%", "%%") for k, v in EngineConfig.field_help().items()}  # argparse formats help with %
    p.add_argument("--model", default=os.environ.get("SHOAL_MODEL", DEFAULT_MODEL), help=h["model"])
    p.add_argument("--host", default=None, help="bind address (default $SHOAL_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default $SHOAL_PORT or 8000)")
    p.add_argument("--database-url", default=None,
                   help="SQLAlchemy URL (default $SHOAL_DATABASE_URL or SQLite in $SHOAL_HOME)")
    p.add_argument("--rate-limit-rpm", type=int, default=None, help="requests/min per key (0 = off)")
    p.add_argument("--rate-limit-tpm", type=int, default=None, help="tokens/min per key (0 = off)")
    p.add_argument("--workers", type=int, default=None, help="fine-tuning worker processes (default 1)")
    p.add_argument("--worker-threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--dtype", default="auto", help=h["dtype"])
    p.add_argument("--quantization", default=os.environ.get("SHOAL_QUANTIZATION") or None,
                   help=h["quantization"] + " (default $SHOAL_QUANTIZATION)")
    p.add_argument("--kv-cache-dtype", default=os.environ.get("SHOAL_KV_CACHE_DTYPE", "auto"),
                   help=h["kv_cache_dtype"] + " (default $SHOAL_KV_CACHE_DTYPE or auto)")
    p.add_argument("--lora-dtype", default=os.environ.get("SHOAL_LORA_DTYPE", "auto"),
                   help=h["lora_dtype"] + " (default $SHOAL_LORA_DTYPE or auto)")
    p.add_argument("--device", default="cpu", help=h["device"])
    p.add_argument("--no-pack-weights", action="store_true",
                   help="keep plain weights (no oneDNN packing): " + h["pack_weights"])
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="eager kernels on CUDA: " + h["cuda_graphs"])
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help=h["async_scheduling"])
    p.add_argument("--speculative-tokens", type=int, default=None, metavar="N", help=h["speculative_tokens"])
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: robust when other work shares the CPU)")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help=h["max_num_seqs"] + " (default 64 on a CPU, 256 on CUDA)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help=h["max_num_batched_tokens"] + " (default 512 on a CPU; on CUDA 8192-32768 by the model's size)")
    p.add_argument("--max-model-len", type=int, default=None, help=h["max_model_len"])
    p.add_argument("--kv-cache-mb", type=int, default=None,
                   help="MiB for the KV cache (default 256 on a CPU; on CUDA half the memory free "
                        "once the model is loaded)")
    p.add_argument("--lora", action="append", metavar="NAME=PATH",
                   help="serve a PEFT adapter to every org (repeatable)")
    p.add_argument("--no-lora", action="store_true", help="serve the base model only")
    p.add_argument("--max-loras", type=int, default=8, help=h["max_loras"])
    p.add_argument("--max-lora-rank", type=int, default=16,
                   help=h["max_lora_rank"] + " Fine-tuning jobs may not ask for more. (default 16)")
    p.add_argument("--max-cpu-loras", type=int, default=32, help=h["max_cpu_loras"])


def cmd_worker(args: argparse.Namespace) -> int:
    """Run a fine-tuning worker: claim queued jobs from the shared database and train them."""
    import logging

    import torch

    from ..finetune.worker import run_worker
    from ..settings import ServerSettings
    from ..store import Store

    logging.basicConfig(level=logging.INFO, format="shoal-worker: %(message)s")
    torch.set_num_threads(args.threads)
    settings = ServerSettings.from_env(database_url=args.database_url)
    store = Store.open(settings.database_url)
    n = run_worker(store, settings.home, poll_s=args.poll, lease_s=args.lease_s,
                   heartbeat_s=max(args.lease_s / 6, 0.2), once=args.once)
    print(f"shoal worker: ran {n} job(s)", file=sys.stderr)
    return 0


def add_worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--database-url", default=None,
                   help="SQLAlchemy URL (default $SHOAL_DATABASE_URL or SQLite in $SHOAL_HOME)")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between queue polls")
    p.add_argument("--lease-s", type=float, default=float(os.environ.get("SHOAL_WORKER_LEASE_S", 60)),
                   help="job lease; a worker silent this long loses its job to another")
    p.add_argument("--once", action="store_true", help="exit when the queue is empty")
