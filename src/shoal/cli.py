"""The `shoal` command: a table of subcommands, each a small function.

Now: `serve` (the OpenAI-compatible API), `generate` (stream a completion from a model),
`models` (list / add / rm base models).
Errors print one line to stderr and exit non-zero; tracebacks only with SHOAL_DEBUG=1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def cmd_generate(args: argparse.Namespace) -> int:
    """Stream a completion for PROMPT from a registered model (or a path), through the engine."""
    import torch

    from .config import EngineConfig
    from .engine.llm_engine import LLMEngine
    from .engine.sampling_params import SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, device=args.device))
    tok = engine.tokenizer
    if args.chat:
        prompt_ids = tok.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        prompt_ids = tok.encode(args.prompt)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                            seed=args.seed, ignore_eos=args.ignore_eos, stop=args.stop or [])
    load_s = time.perf_counter() - t0
    engine.add_request("cli", prompt_ids, params)
    if not args.chat:
        sys.stdout.write(args.prompt)
    t1 = time.perf_counter()
    n, reason = 0, None
    while engine.has_unfinished():
        for out in engine.step():
            c = out.outputs[0]
            n, reason = len(c.token_ids), c.finish_reason
            sys.stdout.write(c.text_delta)
            sys.stdout.flush()
    sys.stdout.write("\n")
    dt = time.perf_counter() - t1
    dtype = str(next(engine.model.parameters()).dtype).replace("torch.", "")
    print(f"[{args.model} ({engine.model_config.model_type}, {dtype}): loaded in {load_s:.1f}s, "
          f"{len(prompt_ids)} prompt + {n} generated tokens, {n / dt if dt > 0 else 0:.1f} tok/s, "
          f"finish: {reason}]", file=sys.stderr)
    return 0


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the OpenAI-compatible API (completions, chat, models, tokenize) on one model."""
    import torch
    import uvicorn

    from .api.app import create_app
    from .config import EngineConfig
    from .engine.async_engine import AsyncEngine

    if args.host not in LOOPBACK and not args.insecure_open:
        raise ValueError(f"host: refusing to serve on {args.host} without API keys; bind "
                         f"127.0.0.1 (or pass --insecure-open on a trusted network)")
    torch.set_num_threads(args.threads)
    cfg = EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                       max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                       max_model_len=args.max_model_len, kv_cache_memory=args.kv_cache_mb * 2**20,
                       enable_lora=bool(args.lora), max_loras=args.max_loras,
                       max_lora_rank=args.max_lora_rank)
    t0 = time.perf_counter()
    engine = AsyncEngine(cfg)
    for spec in args.lora or []:
        name, _, path = spec.partition("=")
        if not path:
            raise ValueError(f"lora: expected NAME=PATH, got {spec!r}")
        engine.engine.lora.add_adapter(name, path)
    print(f"shoal: {args.model} ready in {time.perf_counter() - t0:.1f}s; "
          f"OpenAI API at http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(create_app(engine, args.model), host=args.host, port=args.port, log_level="warning")
    engine.shutdown()
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """List, add or remove base models."""
    from .model.registry import ModelRegistry

    reg = ModelRegistry()
    if args.action == "add":
        if not args.name or not args.source:
            raise ValueError("usage: shoal models add NAME SOURCE [--hub]")
        e = reg.add(args.name, args.source, allow_download=args.hub)
        print(f"added {e.name}: {e.model_type} {e.size_label}, context {e.context_length}, at {e.path}")
        return 0
    if args.action == "rm":
        if not args.name:
            raise ValueError("usage: shoal models rm NAME")
        reg.remove(args.name)
        print(f"removed {args.name}")
        return 0
    rows = [("NAME", "FAMILY", "SIZE", "CONTEXT", "SOURCE")]
    for e in reg.list():
        rows.append((e.name, e.model_type, e.size_label, str(e.context_length), f"{e.kind}:{e.source}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def _add_generate(p: argparse.ArgumentParser) -> None:
    from .model.registry import DEFAULT_MODEL

    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--model", default=os.environ.get("SHOAL_MODEL", DEFAULT_MODEL),
                   help="registered model name or a model path (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--stop", action="append", help="a stop sequence (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")


def _add_serve(p: argparse.ArgumentParser) -> None:
    from .config import EngineConfig
    from .model.registry import DEFAULT_MODEL

    h = EngineConfig.field_help()
    p.add_argument("--model", default=os.environ.get("SHOAL_MODEL", DEFAULT_MODEL), help=h["model"])
    p.add_argument("--host", default=os.environ.get("SHOAL_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("SHOAL_PORT", "8000")))
    p.add_argument("--dtype", default="auto", help=h["dtype"])
    p.add_argument("--device", default="cpu", help=h["device"])
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: robust when other work shares the CPU)")
    p.add_argument("--max-num-seqs", type=int, default=64, help=h["max_num_seqs"])
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help=h["max_num_batched_tokens"])
    p.add_argument("--max-model-len", type=int, default=None, help=h["max_model_len"])
    p.add_argument("--kv-cache-mb", type=int, default=256, help="MiB for the KV cache")
    p.add_argument("--lora", action="append", metavar="NAME=PATH", help="serve a PEFT adapter (repeatable)")
    p.add_argument("--max-loras", type=int, default=8, help=h["max_loras"])
    p.add_argument("--max-lora-rank", type=int, default=64, help=h["max_lora_rank"])
    p.add_argument("--insecure-open", action="store_true",
                   help="allow a non-loopback host without API keys")


def _add_models(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", default="list", choices=["list", "add", "rm"])
    p.add_argument("name", nargs="?", help="model name (add, rm)")
    p.add_argument("source", nargs="?", help="HF model directory, .gguf file, or hub id with --hub")
    p.add_argument("--hub", action="store_true", help="SOURCE is a Hugging Face hub id to download")


# name -> (function, help, argument builder)
COMMANDS = {
    "serve": (cmd_serve, "serve the OpenAI-compatible API", _add_serve),
    "generate": (cmd_generate, "stream a completion from a model", _add_generate),
    "models": (cmd_models, "list, add or remove base models", _add_models),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal", description="Self-hosted GPT-style models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, help_, add_args) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=fn.__doc__)
        add_args(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:  # our errors are ValueErrors that name the field or file
        if os.environ.get("SHOAL_DEBUG"):
            raise
        print(f"shoal: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
