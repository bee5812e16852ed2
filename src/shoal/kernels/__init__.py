"""Fused C++ kernels for the engine on CPU, built on first use with the system compiler.

On a few cores, a decode step's non-matmul time is mostly the fixed cost of dozens of small
PyTorch ops a layer (norm casts, rotary halves, cache index copies, gathers, masks). These
kernels do each chain in one call: RMSNorm (with the residual add), rotary embedding in place,
the KV cache write, decode and prefill attention that read the paged cache in place, SiLU-and-multiply,
the multi-LoRA deltas one slot per token, the sampler's per-row argmax and logsumexp; with AMX or
AVX512-BF16, bf16 and int8 products on packed weights (`qlinear`) and a Llama decode step's blocks in one call
(`csrc/llama_decode.cpp`, driven by `shoal.engine.cpu_decode`). The model, the paged attention and the LoRA
layers call them where `usable`; without a compiler everything runs on PyTorch ops.
"""

from .build import library, reason
from .ops import (BGMVLayers, cache_write, decode_attention, disabled, enabled, lora_bgmv, lora_int8_ready,
                  prefill_attention, prefill_attention_ready, release_omp_pool, rms_norm, rope_, row_stats,
                  sample_rows, set_enabled, silu_mul, table_slots, usable)

__all__ = ["library", "reason", "usable", "enabled", "set_enabled", "disabled", "rms_norm", "rope_",
           "cache_write", "decode_attention", "prefill_attention", "prefill_attention_ready", "silu_mul", "lora_bgmv", "lora_int8_ready",
           "BGMVLayers", "release_omp_pool", "row_stats", "sample_rows", "table_slots"]
