"""Entry points of the C++ kernels for tests and benchmarks, not for the engine: the primitives
behind two bit-for-bit claims (the FMAs that stand for VDPBF16PS on CPUs with AMX, the vector bf16
rounding of every epilogue) and the timing of the one-call decode's kernel calls
(`bench/decode_breakdown.py`)."""

from __future__ import annotations

import ctypes

import torch

from .build import library
from .ops import _check


def dot2_check(a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For tests: VDPBF16PS on lanes of bf16 pairs a, b (int32 (n,), n % 16 == 0) and fp32 acc (n,),
    and the two FMAs under FTZ/DAZ that stand for it in the LoRA shrink on CPUs with AMX (odd
    element first); None without AVX512-BF16."""
    _check(a.dtype == b.dtype == torch.int32 and acc.dtype == torch.float32 and a.shape == b.shape == acc.shape
           and a.is_contiguous() and b.is_contiguous() and acc.is_contiguous() and a.numel() % 16 == 0,
           "dot2_check: inputs")
    dp, fma = torch.empty_like(acc), torch.empty_like(acc)
    rc = library().shoal_dot2_check(a.numel(), a.data_ptr(), b.data_ptr(), acc.data_ptr(), dp.data_ptr(),
                                    fma.data_ptr())
    return None if rc else (dp, fma)


def bf16_round(x: torch.Tensor) -> torch.Tensor | None:
    """For tests: fp32 x (n,), n % 16 == 0 -> bf16 by the kernels' vector rounding (the epilogues'
    `to_bf16`); None without AVX-512."""
    _check(x.dtype == torch.float32 and x.dim() == 1 and x.is_contiguous() and x.numel() % 16 == 0,
           "bf16_round: input")
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    return None if library().shoal_bf16_round(x.numel(), x.data_ptr(), out.data_ptr()) else out


DECODE_STAGES = ("norm", "q|k|v", "q|k|v LoRA", "RoPE", "cache write", "attention", "o", "o LoRA", "MLP norm",
                 "gate|up", "gate|up LoRA", "SiLU", "down", "down LoRA", "final norm")


def decode_profile(on: bool) -> dict[str, float]:
    """Timing of the one-call decode's kernel calls (`shoal_llama_decode`), for benchmarks: True
    clears the sums and starts, False stops. Returns the sums so far: seconds per stage
    (`DECODE_STAGES`, summed over all layers and calls) and "calls"."""
    _check(library() is not None, "decode_profile: the kernels did not build")
    out = (ctypes.c_double * (len(DECODE_STAGES) + 1))()
    n = library().shoal_decode_profile(int(on), ctypes.addressof(out))
    _check(n == len(DECODE_STAGES), "decode_profile: stages")
    return {**{s: out[i] * 1e-9 for i, s in enumerate(DECODE_STAGES)}, "calls": out[n]}


def fetch_l2(kv: bool | None = None, slots: bool | None = None) -> tuple[bool, bool] | None:
    """Where the memory-bound kernels read ahead, for benchmarks that compare the levels on one CPU:
    decode attention's keys and values (`kv`) and the LoRA slots (`slots`), True = into L2, False =
    into L1, None = unchanged. Returns the levels in effect, or None in a build without AVX2."""
    _check(library() is not None, "fetch_l2: the kernels did not build")
    got = library().shoal_fetch_l2(-1 if kv is None else int(kv), -1 if slots is None else int(slots))
    return None if got < 0 else (bool(got & 1), bool(got & 2))
