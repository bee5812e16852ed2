"""Time from a fine-tuned model's registration to its first token, against the base model's
time to first token, on a running `shoal serve` process (target: within 0.5 s of the base).

A job's success is the moment the worker writes the model's row to the store (before the job's
status turns `succeeded`); the server has never seen the adapter. This benchmark writes a PEFT
adapter (rank 8 on every linear layer, random weights) and that row exactly as the worker does,
then streams one request to the new model and reads the first token, as a user would right
after `jobs.retrieve` says `succeeded`. Repeated with a fresh model each round.
Usage: python bench/new_model_ttft.py --rounds 5 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def ttft(client, model: str, prompt: str) -> float:
    t0 = time.perf_counter()
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0,
                                       stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            dt = time.perf_counter() - t0
            stream.close()
            return dt
    raise RuntimeError("no token streamed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import httpx
    import openai

    from shoal.lora.peft_format import LoRAAdapter, save_adapter
    from shoal.model.registry import ModelRegistry
    from shoal.store import Store

    home = tempfile.mkdtemp(prefix="shoal-ttft-")
    db = f"sqlite:///{home}/shoal.db"
    env = dict(os.environ, SHOAL_DATABASE_URL=db)  # $SHOAL_HOME as usual (the converted model)
    port = 8700 + os.getpid() % 200
    ModelRegistry().resolve(args.model)  # convert once before timing anything
    server = subprocess.Popen([sys.executable, "-m", "shoal.cli", "serve", "--model", args.model,
                               "--port", str(port), "--threads", str(args.threads), "--workers", "0"],
                              env=env, stderr=subprocess.DEVNULL)
    try:
        for _ in range(1200):
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        store = Store.open(db)
        org = store.default_org()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY", max_retries=0)
        base = [m.id for m in client.models.list().data][0]
        model = ModelRegistry().load(args.model, dtype="float32").model
        prompt = "Write a short note about the sea:"
        for _ in range(3):
            ttft(client, base, prompt)  # warm up
        rows = []
        for r in range(args.rounds):
            g = torch.Generator().manual_seed(r)
            weights = {n: (torch.randn(8, m.in_features, generator=g) * 0.01,
                           torch.randn(m.out_features, 8, generator=g) * 0.01)
                       for n, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and n != "lm_head"}
            path = os.path.join(home, "jobs", f"bench{r}", "adapter")
            save_adapter(path, LoRAAdapter.from_weights("x", weights, lora_alpha=16))
            base_t = statistics.median(ttft(client, base, prompt) for _ in range(3))
            name = f"ft:{base}:default::bench{r:04d}"
            store.add_model(name, org.id, base, path)  # the worker's "succeeded" moment
            t0 = time.perf_counter()
            first = ttft(client, name, prompt)
            since = time.perf_counter() - t0
            rows.append({"round": r, "base_ttft_s": base_t, "new_model_ttft_s": first,
                         "registered_to_first_token_s": since, "extra_s": first - base_t})
            print(f"round {r}: base TTFT {base_t * 1000:.0f} ms, new model first token "
                  f"{first * 1000:.0f} ms (+{(first - base_t) * 1000:.0f} ms)")
        extra = statistics.median(x["extra_s"] for x in rows)
        print(f"\nmedian extra time to the first token of a new model: {extra * 1000:.0f} ms "
              f"(target < 500 ms); worst {max(x['extra_s'] for x in rows) * 1000:.0f} ms")
        print(json.dumps({"model": args.model, "threads": args.threads, "rounds": rows,
                          "median_extra_s": extra}))
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
