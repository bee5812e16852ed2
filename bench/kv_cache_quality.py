"""What a KV cache format costs in quality: the default model's perplexity on real text (this
repository's docs, in windows of `--window` tokens, prompts chunked by the engine as served) for
each configuration, and how far each one's next-token logprobs move from the fp32 model with an
fp32 cache, the reference, all in the same run.

    python bench/kv_cache_quality.py [--windows 4] [--window 1024] [--threads 2]

Prints a table and JSON: perplexity, mean and max |logprob - reference| of the text's own next
token, and how often the top-1 token agrees with the reference's.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {  # name -> EngineConfig overrides
    "fp32+fp32kv": {"dtype": "float32", "kv_cache_dtype": "float32"},  # the reference
    "bf16+bf16kv": {"dtype": "bfloat16"},
    "bf16+int8kv": {"dtype": "bfloat16", "kv_cache_dtype": "int8"},
    "q4+bf16kv": {"quantization": "q4"},
    "q4+int8kv": {"quantization": "q4", "kv_cache_dtype": "int8"},
}


def windows(tokenizer, n: int, size: int) -> list[list[int]]:
    text = "\n\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    ids = tokenizer.encode(text)
    return [ids[i * size:(i + 1) * size] for i in range(n) if len(ids) >= (i + 1) * size]


def score(cfg_over: dict, model: str, texts: list[list[int]]) -> list[tuple[float, int]]:
    """(logprob of the text's next token, top-1 id) at every position after the first."""
    from shoal.config import EngineConfig
    from shoal.engine.llm import LLM
    from shoal.engine.sampling_params import SamplingParams

    llm = LLM(EngineConfig(model=model, max_num_batched_tokens=512, **cfg_over))
    outs = llm.generate(texts, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1))
    res = []
    for o in outs:
        for entry in o.prompt_logprobs[1:]:
            tok, lp, top = entry
            res.append((lp, max(top, key=top.get)))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from shoal.model.registry import ModelRegistry
    from shoal.model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(ModelRegistry().resolve(args.model))
    texts = windows(tok, args.windows, args.window)
    names = [n for n in CONFIGS if n in args.configs.split(",")]
    ref_name = next(iter(CONFIGS))
    scores = {name: score(CONFIGS[name], args.model, texts) for name in dict.fromkeys([ref_name, *names])}
    print(f"{len(texts)} windows of {args.window} tokens, {len(scores[ref_name])} next-token predictions")
    results = report(scores, ref_name, 16)
    print(json.dumps({"threads": args.threads, "windows": len(texts), "window": args.window, "results": results}))


def report(scores: dict[str, list[tuple[float, int]]], ref_name: str, width: int) -> dict:
    """Print each configuration's perplexity, |logprob - reference| (mean, max) and top-1
    agreement with the reference; return them by name."""
    ref = scores[ref_name]
    results = {}
    print(f"{'configuration':{width}} {'perplexity':>10} {'mean |dlp|':>11} {'max |dlp|':>10} {'top-1 agree':>12}")
    for name, sc in scores.items():
        ppl = math.exp(-sum(lp for lp, _ in sc) / len(sc))
        d = [abs(a[0] - b[0]) for a, b in zip(sc, ref)]
        agree = sum(a[1] == b[1] for a, b in zip(sc, ref)) / len(sc)
        results[name] = {"perplexity": ppl, "mean_abs_dlogprob": sum(d) / len(d), "max_abs_dlogprob": max(d),
                         "top1_agreement": agree}
        print(f"{name:{width}} {ppl:10.3f} {sum(d) / len(d):11.4f} {max(d):10.3f} {agree:12.2%}")
    return results


if __name__ == "__main__":
    main()
