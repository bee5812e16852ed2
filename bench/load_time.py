"""Load time of the default model: Shoal's first-use GGUF conversion and its cached load,
against transformers loading the same GGUF and the same cached directory, in one run.

Each load runs in a fresh subprocess (imports included, as a user pays them), N times; the
table shows the median. Usage: python bench/load_time.py [--repeat 3] [--json out.json]
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

SNIPPETS = {
    "shoal: convert GGUF -> cache (first use)": (
        "from shoal.model.registry import ModelRegistry; import shutil, os;"
        "r = ModelRegistry(); shutil.rmtree(r.builtin().path, ignore_errors=True);"
        "r.resolve('SmolLM2-135M-Instruct')"),
    "shoal: load from cache (model + tokenizer)": (
        "from shoal.model.registry import ModelRegistry;"
        "ModelRegistry().load('SmolLM2-135M-Instruct', dtype='float32')"),
    "transformers: load the GGUF": (
        "import os, torch, transformers; from shoal.model.registry import default_gguf_path as g;"
        "p = g(); d, f = os.path.dirname(p), os.path.basename(p);"
        "transformers.AutoTokenizer.from_pretrained(d, gguf_file=f);"
        "transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)"),
    "transformers: load the cached directory": (
        "import torch, transformers; from shoal.model.registry import ModelRegistry;"
        "p = ModelRegistry().resolve('SmolLM2-135M-Instruct');"
        "transformers.AutoTokenizer.from_pretrained(p);"
        "transformers.AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)"),
}


def timed(code: str, env: dict) -> float:
    """Seconds of work inside a fresh interpreter, after `import torch` (which both pay)."""
    prog = f"import time, torch; t = time.perf_counter(); {code}; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", prog], env=env, capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    home = tempfile.mkdtemp(prefix="shoal-bench-")
    env = {**os.environ, "SHOAL_HOME": home, "HF_HUB_OFFLINE": "1"}
    rows = {}
    for name, code in SNIPPETS.items():
        rows[name] = statistics.median(timed(code, env) for _ in range(args.repeat))
    base = rows["transformers: load the GGUF"]
    print(f"{'load':45s} {'median s':>9s} {'vs HF GGUF':>11s}")
    for name, s in rows.items():
        print(f"{name:45s} {s:9.2f} {base / s:10.1f}x")
    result = {"date": time.strftime("%Y-%m-%d"), "repeat": args.repeat,
              "threads": os.environ.get("OMP_NUM_THREADS", "default"), "seconds": rows}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
