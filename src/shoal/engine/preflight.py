"""What the engine decides once at start-up, beside building itself: the KV cache's budget where
none is given, whether an int8 cache or int8 adapter slots can serve (refused naming what is
missing), and the bf16 CPU layers' batch-invariant settings."""

from __future__ import annotations

import functools

import torch

from .. import kernels
from ..config import EngineConfig
from ..lora.grouping import MIN_ROWS
from ..model.fused import fused_part_ids
from ..model.layers import linear
from ..model.row_classes import INVARIANT_ROWS, PREFILL_ROWS, amx_class_consistent


def kv_cache_budget(device: torch.device) -> int:
    """`EngineConfig.kv_cache_memory=None`: on CUDA half the memory free now (after the weights),
    on a CPU 256 MiB."""
    if device.type != "cuda":
        return 256 * 2**20
    free, _ = torch.cuda.mem_get_info(device)
    return max(free // 2, 64 * 2**20)


CPU_TOKEN_BUDGET = 512  # a CPU's step: prompt chunks of 512 tokens keep decode rows' gaps short
GPU_TOKEN_BUDGET = (8192, 32768)  # a GPU step's tokens: from (models of ~1B+ parameters) to (<= 250M)


def decoder_parameters(mc) -> int:
    """The decoder layers' weights (what each token's products read; embeddings and the output
    layer aside), from the config: q, k, v, o and the MLP's two (GPT-2) or three matrices."""
    h, d = mc.hidden_size, mc.head_dim
    attn = 2 * h * mc.num_heads * d + 2 * h * mc.num_kv_heads * d
    mlp = (2 if mc.family == "gpt2" else 3) * h * mc.intermediate_size
    return mc.num_layers * (attn + mlp)


def token_budget(config: EngineConfig, mc, device: torch.device) -> int:
    """`EngineConfig.max_num_batched_tokens`, or where None the device's: 512 on a CPU; on CUDA
    8,192 tokens a step for a model of ~1B decoder parameters, doubled for each halving of that
    (rounded down), at most 32,768: SmolLM2-135M 32,768, SmolLM2-360M 16,384, Llama-3.2-1B 8,192.

    Why (H200, bf16, 256 prompts of 64-512 tokens, `bench/gpu_profile.py`): an eager step with
    prompt chunks cost the SmolLM2-135M shape 23-26 ms whether it held 2,059 or 8,192 prompt
    tokens (its device work ~6 ms: the rest is the host launching ~12 kernels a layer), the
    Llama-3.2-1B shape 32-37 ms at 8,192 (its device work most of it). The 256-request workload
    on the SmolLM2 shape: 30,035 tok/s at 8,192 tokens a step, 51,553 at 16,384, 55,827 at
    32,768; Llama-3.2-1B 35,246 / 27,554 / 31,888 (no gain: its steps are device-bound)."""
    if config.max_num_batched_tokens is not None:
        return config.max_num_batched_tokens
    if device.type != "cuda":
        return CPU_TOKEN_BUDGET
    lo, hi = GPU_TOKEN_BUDGET
    tokens = lo
    while tokens < hi and decoder_parameters(mc) * tokens * 2 <= 1e9 * lo:
        tokens *= 2
    return tokens


def check_int8_kv(config: EngineConfig, mc, dtype: torch.dtype) -> None:
    """An int8 KV cache is read only by the CPU kernels (`kernels.cache_write`,
    `decode_attention`, `prefill_attention`): a bf16 model on a CPU with AVX-512, head size 64 or
    128, at most 8 query heads a kv head. Anything else is refused here, naming what is missing."""
    why = None
    if config.device != "cpu":
        why = f"device {config.device} (CPU only)"
    elif dtype != torch.bfloat16:
        why = f"a {str(dtype).replace('torch.', '')} model (bf16 only)"
    elif mc.head_dim not in (64, 128) or mc.num_heads // mc.num_kv_heads > 8:
        why = (f"head size {mc.head_dim} and {mc.num_heads // mc.num_kv_heads} query heads a kv head "
               "(64 or 128, and <= 8 only)")
    elif not kernels.enabled():
        why = f"no CPU kernels ({kernels.reason()})"
    elif not kernels.library().shoal_prefill_attention_isa():
        why = "a CPU without AVX-512"
    if why:
        raise ValueError(f"kv_cache_dtype: int8 is not available for {why}; use auto or bfloat16")


def check_int8_lora(config: EngineConfig, dtype: torch.dtype) -> None:
    """int8 LoRA slots are read only by the CPU kernel (`kernels.lora_bgmv`): a bf16 or fp32
    model on a CPU with AVX-512. Anything else is refused here, naming what is missing."""
    why = None
    if config.device != "cpu":
        why = f"device {config.device} (CPU only)"
    elif dtype not in (torch.float32, torch.bfloat16):
        why = f"a {str(dtype).replace('torch.', '')} model (bf16 or fp32 only)"
    elif not kernels.enabled():
        why = f"no CPU kernels ({kernels.reason()})"
    elif not kernels.lora_int8_ready():
        why = "a CPU without AVX-512"
    if why:
        raise ValueError(f"lora_dtype: int8 is not available for {why}; use auto")


INVARIANT_K = 1024  # bf16 CPU matmuls were measured row-invariant up to this input width


def set_batch_invariant(model: torch.nn.Module) -> int:
    """Give bf16 CPU linears row classes (`shoal.model.row_classes`), switch wide unpacked ones to
    split-K (see `shoal.model.layers.linear`; packed ones are packed in the same chunks,
    `shoal.model.packed`) and pad LoRA's
    grouped CPU products to MIN_ROWS rows; returns how many bf16 linears changed. fp32, CUDA and
    int8 linears (`weight` None: the int8 kernel is row-invariant as it is) are left alone."""
    p = next(model.parameters())
    if p.device.type != "cpu":
        return 0
    for m in model.modules():
        if hasattr(m, "mapping"):  # LoRA's grouped products (`shoal.lora.grouping.lora_deltas`)
            m.mapping.min_rows = MIN_ROWS
    if p.dtype != torch.bfloat16:
        return 0
    n = 0
    parts = fused_part_ids(model)  # computed by their fused layer, never alone
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and m.weight is not None and m.weight.dtype == torch.bfloat16:
            if m.weight.device.type == "cpu" and m.in_features > INVARIANT_K:
                m.k_chunk = INVARIANT_K  # (packed weights, on meta, were cut when packed)
            # row classes (`shoal.model.row_classes`): decode rows on the one-row kernel;
            # prefill rows in AMX-sized blocks where this layer's shape was checked consistent
            # (the output layer only ever sees sampled rows: one-row kernel)
            m.max_rows = INVARIANT_ROWS
            n += 1
            if id(m) in parts or name.endswith("lm_head"):
                continue
            key = (m.out_features, m.in_features, m.k_chunk, type(m.weight).__name__, torch.get_num_threads())
            product = functools.partial(linear, weight=m.weight, bias=None, k_chunk=m.k_chunk)
            m.prefill_rows = PREFILL_ROWS if amx_class_consistent(product, m.in_features, key) else 0
    return n
