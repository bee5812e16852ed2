"""JSON mode and Structured Outputs (`response_format` json_object / json_schema,
`shoal.engine.json_guide`) on the default model: what the constraint costs and what it buys,
against HF transformers `generate` constrained by lm-format-enforcer (`JsonSchemaParser(None)`:
any JSON, through `prefix_allowed_tokens_fn`), in the same run.

Workload: `--requests` chat prompts that ask for a JSON object (a cat, a city, an order, ...),
greedy, up to `--out` tokens. Shoal runs them one at a time and all at once: plain, in JSON
mode, and with each prompt's keys as a strict schema; HF runs them one at a time (batch 1,
bf16), with the enforcer and without. For each run: output tok/s, how many answers are one JSON
object (`json.loads` gives a dict) and how many are instances of their prompt's schema. Also the
first-use costs: Shoal's token index for the vocabulary (once per engine), the enforcer's
tokenizer data (once per tokenizer), and Shoal's mask per new automaton state (cached after).

    python bench/json_mode.py [--threads 2] [--requests 8] [--out 96] [--skip-hf] [--json F]

The baseline needs `pip install lm-format-enforcer` (not a Shoal dependency; 0.11.3 measured).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

THINGS = ["a cat with the keys name, age and color", "a city with the keys name, country and population",
          "an order with the keys id, items and total", "a book with the keys title, author and year",
          "a user with the keys name, email and roles", "a car with the keys make, model and year",
          "a recipe with the keys name, ingredients and minutes", "a planet with the keys name, moons and mass"]


NUMERIC = {"age", "population", "total", "year", "minutes", "moons", "mass"}


def schemas(n: int) -> list[dict]:
    """Each ask's keys as a strict schema (numbers where the key is one, else strings; `items`
    and `ingredients` and `roles` lists of strings)."""
    out = []
    for i in range(n):
        keys = THINGS[i % len(THINGS)].split("keys ")[1].replace(" and ", ", ").split(", ")
        props = {k: {"type": "number"} if k in NUMERIC else
                 {"type": "array", "items": {"type": "string"}} if k in ("items", "ingredients", "roles")
                 else {"type": "string"} for k in keys}
        out.append({"type": "object", "properties": props, "required": keys, "additionalProperties": False})
    return out


def instances(texts: list[str], schema_list: list[dict]) -> int:
    """How many texts are instances of their schema (keys as required, values of the types)."""
    n = 0
    for t, s in zip(texts, schema_list):
        try:
            x = json.loads(t)
        except ValueError:
            continue
        kinds = {"number": (int, float), "string": str, "array": list}
        n += (isinstance(x, dict) and list(x) == list(s["properties"])
              and all(isinstance(v, kinds[s["properties"][k]["type"]]) for k, v in x.items()))
    return n


def asks(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Describe {THINGS[i % len(THINGS)]} as a JSON object."}]
            for i in range(n)]


def whole(texts: list[str]) -> int:
    """How many texts are one JSON object."""
    n = 0
    for t in texts:
        try:
            n += isinstance(json.loads(t), dict)
        except ValueError:
            pass
    return n


def run_shoal(llm, prompts, params, together: bool) -> tuple[float, int, list[str]]:
    """(seconds, output tokens, texts)."""
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params) if together else [llm.generate([p], params)[0] for p in prompts]
    dt = time.perf_counter() - t0
    return dt, sum(len(o.outputs[0].token_ids) for o in outs), [o.outputs[0].text for o in outs]


def run_hf(model, tok, prompts, out: int, allowed=None) -> tuple[float, int, list[str]]:
    """Batch 1, greedy; `allowed`: a prefix_allowed_tokens_fn. Stops at the chat's end token."""
    total, texts = 0, []
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    t0 = time.perf_counter()
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=out, do_sample=False,
                                 eos_token_id=eos, pad_token_id=eos, prefix_allowed_tokens_fn=allowed)
        new = got[0, len(p):].tolist()
        new = new[:new.index(eos)] if eos in new else new
        total += len(new)
        texts.append(tok.decode(new, skip_special_tokens=True))
    return time.perf_counter() - t0, total, texts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--out", type=int, default=96)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from shoal.config import EngineConfig
    from shoal.engine import json_guide
    from shoal.engine.llm import LLM
    from shoal.engine.sampling_params import SamplingParams

    llm = LLM(EngineConfig(model=args.model))
    prompts = [llm.tokenizer.encode_chat(m) for m in asks(args.requests)]
    results: dict[str, dict] = {}

    # first use: the token index of the vocabulary, then the masks of new states
    sampler = llm.engine.sampler
    t0 = time.perf_counter()
    pieces = json_guide.token_pieces(llm.tokenizer)
    vocab = json_guide.JsonVocab(pieces, llm.engine.model_config.vocab_size, sampler.eos_token_ids)
    index_s = time.perf_counter() - t0
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=8, json_mode=True))  # (warm)

    plain = SamplingParams(temperature=0.0, max_tokens=args.out)
    guided = SamplingParams(temperature=0.0, max_tokens=args.out, json_mode=True)
    schema_list = schemas(args.requests)
    shaped = [SamplingParams(temperature=0.0, max_tokens=args.out, json_schema=sc) for sc in schema_list]
    for together in (False, True):
        for name, params in (("plain", plain), ("JSON mode", guided), ("JSON schema", shaped)):
            if together:
                dt, n, texts = run_shoal(llm, prompts, params if isinstance(params, list) else [params] * len(prompts),
                                         True)
            else:
                runs = [run_shoal(llm, [p], params[i] if isinstance(params, list) else params, False)
                        for i, p in enumerate(prompts)]
                dt, n, texts = sum(r[0] for r in runs), sum(r[1] for r in runs), [t for r in runs for t in r[2]]
            key = f"shoal {name}, " + ("all at once" if together else "one at a time")
            results[key] = {"tok_s": n / dt, "tokens": n, "seconds": dt, "json_objects": whole(texts),
                            "schema_instances": instances(texts, schema_list)}

    states, new_ms = set(), []
    for o in llm.generate(prompts, guided):  # each state a finished answer passed through, masked afresh
        state = json_guide.START
        for tid in o.outputs[0].token_ids[:-1]:
            state = json_guide.feed(state, pieces[tid])
            if state not in states:
                states.add(state)
                t0 = time.perf_counter()
                vocab.mask(state)
                new_ms.append((time.perf_counter() - t0) * 1e3)

    if not args.skip_hf:
        import sys
        import types

        import transformers
        from shoal.model.registry import ModelRegistry

        # (lm-format-enforcer 0.11 imports PreTrainedTokenizerBase from where transformers 4 kept it)
        try:
            import transformers.tokenization_utils as where
        except ImportError:
            where = sys.modules["transformers.tokenization_utils"] = types.ModuleType("transformers.tokenization_utils")
        if not hasattr(where, "PreTrainedTokenizerBase"):
            where.PreTrainedTokenizerBase = transformers.PreTrainedTokenizerBase
        from lmformatenforcer import JsonSchemaParser
        from lmformatenforcer.integrations.transformers import (build_token_enforcer_tokenizer_data,
                                                                build_transformers_prefix_allowed_tokens_fn)

        path = ModelRegistry().resolve(args.model)
        tok = transformers.AutoTokenizer.from_pretrained(path)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        t0 = time.perf_counter()
        data = build_token_enforcer_tokenizer_data(tok)
        enforcer_s = time.perf_counter() - t0
        allowed = build_transformers_prefix_allowed_tokens_fn(data, JsonSchemaParser(None))
        run_hf(model, tok, prompts[:1], 4)  # (warm)
        run_hf(model, tok, prompts[:1], 4, allowed)  # (warm)
        for name in ("plain", "lm-format-enforcer"):
            dt, n, texts = 0.0, 0, []
            for p in prompts:  # (the enforcer's parser state is per generation: a fresh one each)
                fn = None if name == "plain" else build_transformers_prefix_allowed_tokens_fn(
                    data, JsonSchemaParser(None))
                d, k, t = run_hf(model, tok, [p], args.out, fn)
                dt, n, texts = dt + d, n + k, texts + t
            results[f"HF generate {name}, one at a time (bf16)"] = {
                "tok_s": n / dt, "tokens": n, "seconds": dt, "json_objects": whole(texts),
                "schema_instances": instances(texts, schema_list)}
        results["lm-format-enforcer: tokenizer data, first use"] = {"seconds": enforcer_s}

    print(f"\n{'run':52s} {'tok/s':>8s} {'tokens':>7s} {'JSON objects':>13s} {'of the schema':>14s}")
    for k, v in results.items():
        if "tok_s" in v:
            print(f"{k:52s} {v['tok_s']:8.1f} {v['tokens']:7d} {v['json_objects']:>6d} of {args.requests} "
                  f"{v['schema_instances']:>7d} of {args.requests}")
    ratio = results["shoal JSON mode, one at a time"]["tok_s"] / results["shoal plain, one at a time"]["tok_s"]
    print(f"Shoal JSON mode / plain, one at a time: {ratio:.2f}x")
    if not args.skip_hf:
        hf = results["HF generate lm-format-enforcer, one at a time (bf16)"]["tok_s"]
        print(f"Shoal JSON mode / HF + lm-format-enforcer, one at a time: "
              f"{results['shoal JSON mode, one at a time']['tok_s'] / hf:.1f}x; the enforcer's first use "
              f"{results['lm-format-enforcer: tokenizer data, first use']['seconds']:.2f} s")
    print(f"Shoal's token index, first use: {index_s:.2f} s; a new state's mask: median "
          f"{statistics.median(new_ms):.2f} ms, max {max(new_ms):.2f} ms over {len(new_ms)} states")
    out = {"date": time.strftime("%Y-%m-%d"), "threads": args.threads, "requests": args.requests,
           "out_tokens": args.out, "index_s": index_s, "new_state_mask_ms_median": statistics.median(new_ms),
           "new_state_mask_ms_max": max(new_ms), "states": len(new_ms), "results": results}
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
