#!/usr/bin/env bash
# One call on a GPU machine: the CUDA tests, then the 256-request benchmark (both real shapes,
# random weights, HF `generate` at batch 256 in the same process, Shoal's defaults alternated
# with `kvwrites` (the K/V cache writes outside the RoPE kernel, as before the twenty-sixth
# session) and `sync` (each decode step landed before the next), the step-phase probe). Logs and
# JSON go to ${OUT:-.}; ~4 minutes on an H200, then ~1.5 for the profiles of the defaults'
# steps, both shapes (T1=1 adds ~1.5 at temperature 1).
# Usage (repo root): TOKENIZER_DIR=DIR bash bench/gpu_check.sh   (DIR: tokenizer.json and
# tokenizer_config.json of the default model, e.g. $SHOAL_HOME/models/SmolLM2-135M-Instruct)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
export PYTHONPATH=src PYTHONUNBUFFERED=1 SHOAL_CPU_KERNELS=0  # (a GPU run never calls the CPU kernels)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout "${TEST_TIMEOUT:-120}" python3 -m pytest -p no:cacheprovider -q -m gpu tests/kernels \
  tests/engine/test_decode_graphs.py tests/engine/test_decode_ahead.py tests/engine/test_json_guide.py \
  tests/lora/test_layers.py > "$out/gpu-tests.log" 2>&1
tail -3 "$out/gpu-tests.log"
timeout "${BENCH_TIMEOUT:-420}" python3 bench/gpu_engine.py --device cuda --tokenizer-dir "${TOKENIZER_DIR:?}" \
  --modes "${MODES:-graphs,kvwrites,sync,graphs,kvwrites,sync}" --phases --json "$out/gpu-bench.json" > "$out/gpu-bench.log" 2>&1
grep -E "^(smollm2|llama)-[^{]*(requests|request|batch 256) \{" "$out/gpu-bench.log" | cut -c1-200
# then temperature 1 (the API's default), the sampled rows' draw kernel alternated with the
# defaults and Llama's shape first (twenty-fifth session: the kernel was slower on SmolLM2's
# shape, run first in that process, faster on Llama's; off unless T1=1, ~1.5 minutes)
if [ "${T1:-0}" != 0 ]; then
  timeout "${T1_TIMEOUT:-240}" python3 bench/gpu_engine.py --device cuda --tokenizer-dir "$TOKENIZER_DIR" \
    --temperature 1.0 --shapes llama-3.2-1b,smollm2-135m --modes "${T1_MODES:-graphs,fuseddraw}" \
    --json "$out/gpu-bench-t1.json" > "$out/gpu-bench-t1.log" 2>&1
  grep -E "^(smollm2|llama)-[^{]*(requests|batch 256) \{" "$out/gpu-bench-t1.log" | cut -c1-160
  # where the draw kernel's steps go on SmolLM2's shape (slower there, twenty-fifth session)
  timeout "${PROFILE_TIMEOUT:-120}" python3 bench/gpu_profile.py --device cuda --tokenizer-dir "$TOKENIZER_DIR" \
    --temperature 1.0 --mode fuseddraw --top 20 > "$out/gpu-profile-t1-fuseddraw.log" 2>&1
  head -1 "$out/gpu-profile-t1-fuseddraw.log"
fi
# then where the defaults' steps spend the host's and the device's time (PROFILE=0: skip; ~40 s a shape)
if [ "${PROFILE:-1}" != 0 ]; then
  for shape in ${PROFILE_SHAPES:-smollm2-135m llama-3.2-1b}; do
    timeout "${PROFILE_TIMEOUT:-120}" python3 bench/gpu_profile.py --device cuda --tokenizer-dir "$TOKENIZER_DIR" \
      --shape "$shape" --top 20 > "$out/gpu-profile-$shape.log" 2>&1
    head -1 "$out/gpu-profile-$shape.log"
    grep -E "cudaStreamSynchronize|_local_scalar_dense|Self CPU time total|Self CUDA time total" \
      "$out/gpu-profile-$shape.log" | cut -c1-120 | head -6
  done
fi
