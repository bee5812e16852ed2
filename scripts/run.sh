#!/usr/bin/env bash
# The main job: set up if needed, then generate with the default model (SmolLM2-135M-Instruct).
# The first run converts the model's GGUF into the cache once (~15 s); later loads take ~1 s.
# Arguments replace the default prompt: bash scripts/run.sh "Your prompt" --max-tokens 100
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$#" -eq 0 ]; then
  set -- "In one paragraph, what is a shoal of fish?" --chat --max-tokens 96
fi
exec "${SHOAL_VENV:-.venv}/bin/shoal" generate "$@"
