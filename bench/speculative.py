"""Speculative decoding by prompt lookup (`shoal.engine.speculative`) on one stream: output tok/s
with drafts (`speculative_tokens`, default 8 on the CPU) and without (0), on the same engine,
against HF transformers `generate` (greedy, batch 1) plain and with its own prompt lookup
(`prompt_lookup_num_tokens`, the same number of tokens), in the same run. Checks that Shoal's tokens are the same either
way and prints the tokens a step and the drafts confirmed.

Workloads (the default model's chat template; greedy, up to `--out` tokens):
  random     the issue's one-stream workload: a 128-token random prompt, 64 tokens, ignore_eos
             (the model repeats itself there: easy drafts)
  summarize  a paragraph to summarize in two sentences
  qa         a question answered from a paragraph
  extract    the numbers of a paragraph, with their context
  code       a Python function from a one-line description (little to copy)
  edit       the paragraph with three misspelt words, to write out corrected (it is in the prompt,
             misspelt)
  edit+prediction  the same with the corrected paragraph as OpenAI's Predicted Outputs
             (`prediction`: drafts from it first); HF has no such input (see `edit` for its lookup)
  4 streams  summarize, qa, extract and code at once (Shoal only)

    python bench/speculative.py [--threads 2] [--out 128] [--tokens 8] [--skip-hf] [--json F]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from engine_throughput import make_prompts

PARA = ("The Great Barrier Reef is the world's largest coral reef system, composed of over 2,900 individual "
        "reefs and 900 islands stretching for over 2,300 kilometres over an area of approximately 344,400 square "
        "kilometres. The reef is located in the Coral Sea, off the coast of Queensland, Australia. It can be seen "
        "from outer space and is the world's biggest single structure made by living organisms.")
ASKS = {
    "summarize": "Summarize this paragraph in two sentences:\n" + PARA,
    "qa": "Where is the Great Barrier Reef, and how big is it? Answer from the text.\n" + PARA,
    "extract": "List every number in this text, one per line, with the words around it:\n" + PARA,
    "code": "Write a Python function that returns the n-th Fibonacci number, with a docstring and a test.",
}
TYPOS = PARA.replace("largest", "largset").replace("located", "locatted").replace("living", "livng")
EDIT = "Fix the spelling mistakes in this paragraph and write it out again:\n" + TYPOS


def run_shoal(engine, prompts, params) -> tuple[float, list[list[int]], int]:
    """(seconds, token ids per prompt, steps) for prompts run together."""
    for i, p in enumerate(prompts):
        engine.add_request(f"b{i}", p, params)
    outs, steps = {}, 0
    t0 = time.perf_counter()
    while engine.has_unfinished():
        steps += 1
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o.outputs[0].token_ids
    return time.perf_counter() - t0, [outs[f"b{i}"] for i in range(len(prompts))], steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=8, help="speculative_tokens with drafts")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from shoal.config import EngineConfig
    from shoal.engine.llm_engine import LLMEngine, load_for_engine
    from shoal.engine.sampling_params import SamplingParams

    cfg = EngineConfig(model=args.model, speculative_tokens=args.tokens)
    engine = LLMEngine(cfg, load_for_engine(cfg))
    tok = engine.tokenizer

    def chat(text: str) -> list[int]:
        t = tok.apply_chat_template([{"role": "user", "content": text}])
        return tok.encode(t) if isinstance(t, str) else list(t)

    work = {"random": ([make_prompts(1, 128, 128, 0, engine.model_config.vocab_size)[0]],
                       SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True))}
    greedy = SamplingParams(temperature=0.0, max_tokens=args.out)
    for name, ask in ASKS.items():
        work[name] = ([chat(ask)], greedy)
    work["edit"] = ([chat(EDIT)], greedy)
    work["edit+prediction"] = ([chat(EDIT)], SamplingParams(temperature=0.0, max_tokens=args.out,
                                                           prediction=tok.encode(PARA, add_special_tokens=False)))
    work["4 streams"] = ([chat(a) for a in ASKS.values()], greedy)
    run_shoal(engine, work["random"][0], work["random"][1])  # warm-up
    results: dict[str, dict] = {}
    for name, (prompts, params) in work.items():
        row = {}
        for k in (0, args.tokens):  # alternated per workload, the same engine
            engine.speculative_tokens = k
            d0, a0 = engine.drafted, engine.accepted
            secs, toks, steps = run_shoal(engine, prompts, params)
            n = sum(len(t) for t in toks)
            row["plain" if k == 0 else "drafts"] = {"tok_s": n / secs, "tokens": n, "steps": steps,
                                                    "drafted": engine.drafted - d0,
                                                    "accepted": engine.accepted - a0, "ids": toks}
        same = row["plain"].pop("ids") == row["drafts"].pop("ids")
        if not same:
            raise SystemExit(f"{name}: tokens differ with drafts")
        results[name] = {"shoal": row}
    if not args.skip_hf:
        from transformers import AutoModelForCausalLM

        from shoal.model.registry import ModelRegistry

        path = ModelRegistry().resolve(args.model)
        for dtype in (torch.float32, torch.bfloat16):
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
            for name, (prompts, params) in work.items():
                if len(prompts) > 1 or params.prediction:
                    continue
                ids = torch.tensor([prompts[0]])
                kinds = {"plain": {}} if dtype == torch.float32 else {"plain": {}, "lookup": {
                    "prompt_lookup_num_tokens": args.tokens}}
                for kind, extra in kinds.items():
                    kw = dict(max_new_tokens=params.max_tokens, do_sample=False, **extra)
                    if params.ignore_eos:
                        kw["min_new_tokens"] = params.max_tokens
                    with torch.inference_mode():
                        hf.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
                        t0 = time.perf_counter()
                        out = hf.generate(ids, **kw)
                        secs = time.perf_counter() - t0
                    n = out.shape[1] - ids.shape[1]
                    results[name][f"hf {str(dtype).split('.')[1]} {kind}"] = {"tok_s": n / secs, "tokens": n}
            del hf
    print(f"{'workload':12s} {'Shoal plain':>12s} {'drafts':>8s} {'x':>6s} {'tok/step':>9s} {'confirmed':>10s}"
          f" {'HF fp32':>8s} {'HF bf16':>8s} {'bf16+lookup':>12s} {'vs HF fp32':>11s}")
    for name, r in results.items():
        s = r["shoal"]
        p, d = s["plain"], s["drafts"]
        hf = [r.get(f"hf {k}", {}).get("tok_s", float("nan")) for k in ("float32 plain", "bfloat16 plain",
                                                                             "bfloat16 lookup")]
        print(f"{name:12s} {p['tok_s']:12.1f} {d['tok_s']:8.1f} {d['tok_s'] / p['tok_s']:6.2f} "
              f"{d['tokens'] / d['steps']:9.2f} {d['accepted']:5d}/{d['drafted']:<4d} {hf[0]:8.1f} {hf[1]:8.1f} "
              f"{hf[2]:12.1f} {d['tok_s'] / hf[0]:10.1f}x")
    line = json.dumps({"date": time.strftime("%Y-%m-%d"), "threads": args.threads, "tokens": args.tokens,
                       "torch": torch.__version__, "results": results})
    print(line)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
