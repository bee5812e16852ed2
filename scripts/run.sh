#!/usr/bin/env bash
# The main job: set up if needed, then serve the OpenAI-compatible API on the default model
# (SmolLM2-135M-Instruct) at http://127.0.0.1:8000/v1. The first run converts the model's GGUF
# into the cache once (~15 s). Arguments go to `shoal serve` (e.g. --port 8080 --threads 2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${SHOAL_VENV:-.venv}/bin/shoal" serve "$@"
