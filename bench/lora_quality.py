"""What int8 adapter slots (`EngineConfig.lora_dtype="int8"`) cost in quality: the default
model's perplexity on real text (this repository's docs, windows of `--window` tokens), window i
read through adapter i, for each slot format, and how far each one's next-token logprobs move
from the reference, the fp32 model with fp32 slots, all in the same run. The base model's
perplexity (no adapter) shows how much the adapters change the text's logprobs at all.

    python bench/lora_quality.py [--windows 8] [--window 512] [--adapter PATH ...] [--threads 2]

Adapters: the PEFT adapters given (`--adapter`, one per window in turn), else random ones (rank
8 on every projection, `--std` the weights' standard deviation, as `bench/engine_throughput.py`
makes them). Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch
from engine_throughput import make_adapters
from kv_cache_quality import report, windows

CONFIGS = {  # name -> EngineConfig overrides
    "fp32, fp32 slots": {"dtype": "float32"},  # the reference
    "bf16, bf16 slots": {"dtype": "bfloat16"},
    "bf16, int8 slots": {"dtype": "bfloat16", "lora_dtype": "int8"},
}


def score(cfg_over: dict, model: str, texts: list[list[int]], adapters: list[str] | None,
          paths: list[str]) -> list[tuple[float, int]]:
    """(logprob of the text's next token, top-1 id) at every position after the first."""
    from shoal.config import EngineConfig
    from shoal.engine.llm import LLM
    from shoal.engine.sampling_params import SamplingParams

    n = max(len(paths), 1)
    llm = LLM(EngineConfig(model=model, max_num_batched_tokens=512, enable_lora=True, max_loras=n,
                           max_cpu_loras=n, max_lora_rank=64, **cfg_over))
    for i, p in enumerate(paths):
        llm.add_adapter(f"a{i}", p)
    outs = llm.generate(texts, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1), adapter=adapters)
    res = []
    for o in outs:
        for _, lp, top in o.prompt_logprobs[1:]:
            res.append((lp, max(top, key=top.get)))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--adapter", action="append", default=[], help="a PEFT adapter directory (repeatable)")
    ap.add_argument("--std", type=float, default=0.02, help="random adapters' weight std")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from shoal.model.registry import ModelRegistry
    from shoal.model.tokenizer import Tokenizer

    model_dir = ModelRegistry().resolve(args.model)
    texts = windows(Tokenizer.from_dir(model_dir), args.windows, args.window)
    paths = args.adapter or make_adapters(model_dir, len(texts), tempfile.mkdtemp(prefix="shoal-lora-q-"),
                                          std=args.std)
    names = [f"a{i % len(paths)}" for i in range(len(texts))]
    ref_name = next(iter(CONFIGS))
    scores = {"base model (no adapter)": score(CONFIGS[ref_name], args.model, texts, None, [])}
    scores |= {name: score(over, args.model, texts, names, paths) for name, over in CONFIGS.items()}
    print(f"{len(texts)} windows of {args.window} tokens, {len(paths)} adapters, "
          f"{len(scores[ref_name])} next-token predictions")
    results = report(scores, ref_name, 24)
    print(json.dumps({"threads": args.threads, "windows": len(texts), "window": args.window,
                      "adapters": len(paths), "results": results}))


if __name__ == "__main__":
    main()
