"""Commands that need no server: `generate` (stream a completion through the engine) and
`base-models` (the base-model registry on this machine)."""

from __future__ import annotations

import argparse
import os
import sys
import time


def cmd_generate(args: argparse.Namespace) -> int:
    """Stream a completion for PROMPT from a registered model (or a path), through the engine."""
    import torch

    from ..config import EngineConfig
    from ..engine.llm_engine import LLMEngine
    from ..engine.sampling_params import SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                                    quantization=args.quantization))
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
            n, reason = c.num_tokens, c.finish_reason
            sys.stdout.write(c.text_delta)
            sys.stdout.flush()
    sys.stdout.write("\n")
    dt = time.perf_counter() - t1
    dtype = str(next(engine.model.parameters()).dtype).replace("torch.", "")
    if args.quantization:
        dtype += f", {args.quantization} weights"
    print(f"[{args.model} ({engine.model_config.model_type}, {dtype}): loaded in {load_s:.1f}s, "
          f"{len(prompt_ids)} prompt + {n} generated tokens, {n / dt if dt > 0 else 0:.1f} tok/s, "
          f"finish: {reason}]", file=sys.stderr)
    return 0


def cmd_base_models(args: argparse.Namespace) -> int:
    """List, add or remove the base models registered on this machine."""
    from ..model.registry import ModelRegistry

    reg = ModelRegistry()
    if args.action == "add":
        if not args.name or not args.source:
            raise ValueError("usage: shoal base-models add NAME SOURCE [--hub]")
        e = reg.add(args.name, args.source, allow_download=args.hub)
        print(f"added {e.name}: {e.model_type} {e.size_label}, context {e.context_length}, at {e.path}")
        return 0
    if args.action == "rm":
        if not args.name:
            raise ValueError("usage: shoal base-models rm NAME")
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


def add_generate_args(p: argparse.ArgumentParser) -> None:
    from ..config import DEFAULT_MODEL

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
    p.add_argument("--quantization", default=os.environ.get("SHOAL_QUANTIZATION") or None,
                   help="int8: weight-only int8 linear layers; q4: 4-bit (Q4_1) layers, CPU (default "
                   "$SHOAL_QUANTIZATION, else none)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")


def add_base_models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", default="list", choices=["list", "add", "rm"])
    p.add_argument("name", nargs="?", help="model name (add, rm)")
    p.add_argument("source", nargs="?", help="HF model directory, .gguf file, or hub id with --hub")
    p.add_argument("--hub", action="store_true", help="SOURCE is a Hugging Face hub id to download")
