#!/usr/bin/env bash
# One call on a GPU machine: the CUDA tests, then the 256-request benchmark (both real shapes,
# random weights, HF `generate` at batch 256 in the same process, Shoal's defaults alternated
# with `frozen` (the start-up heap out of the collector's scans) and the `ahead` mode, the
# step-phase probe). Logs and JSON go to ${OUT:-.}; ~2.8 minutes on an H200 with three modes
# (twenty-fourth session), so ~4 with the default five, then ~1 for the `ahead` profile.
# Usage (repo root): TOKENIZER_DIR=DIR bash bench/gpu_check.sh   (DIR: tokenizer.json and
# tokenizer_config.json of the default model, e.g. $SHOAL_HOME/models/SmolLM2-135M-Instruct)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
export PYTHONPATH=src PYTHONUNBUFFERED=1 SHOAL_CPU_KERNELS=0  # (a GPU run never calls the CPU kernels)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout "${TEST_TIMEOUT:-120}" python3 -m pytest -p no:cacheprovider -q -m gpu tests/kernels \
  tests/engine/test_decode_graphs.py tests/engine/test_decode_ahead.py tests/lora/test_layers.py > "$out/gpu-tests.log" 2>&1
tail -3 "$out/gpu-tests.log"
timeout "${BENCH_TIMEOUT:-420}" python3 bench/gpu_engine.py --device cuda --tokenizer-dir "${TOKENIZER_DIR:?}" \
  --modes "${MODES:-graphs,frozen,ahead,graphs,frozen}" --phases --json "$out/gpu-bench.json" > "$out/gpu-bench.log" 2>&1
grep -E "^(smollm2|llama)-[^{]*(requests|request|batch 256) \{" "$out/gpu-bench.log" | cut -c1-200
# then where the `ahead` mode's decode steps spend the host's time (PROFILE=0: skip; ~40 s)
if [ "${PROFILE:-1}" != 0 ]; then
  timeout "${PROFILE_TIMEOUT:-120}" python3 bench/gpu_profile.py --device cuda --tokenizer-dir "$TOKENIZER_DIR" \
    --mode ahead --top 20 > "$out/gpu-profile-ahead.log" 2>&1
  head -1 "$out/gpu-profile-ahead.log"
  grep -E "cudaStreamSynchronize|_local_scalar_dense" "$out/gpu-profile-ahead.log" | cut -c1-120 | head -4
fi
