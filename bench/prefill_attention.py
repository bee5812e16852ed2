"""Prefill attention on CPU, SmolLM2-135M's heads by default (9 query, 3 kv, size 64), bf16, one prompt of
L tokens a layer: Shoal's kernel (`kernels.prefill_attention`, one call reading the paged cache in
place) against, in the same process, PyTorch's SDPA as one causal call (kv heads repeated for
their groups; not batch-invariant across chunkings) and Shoal's SDPA path (the engine's path
without the kernel: blocks of 64 query positions, each under its causal mask). Each time is one
layer's attention (the cache write included for the two `PagedAttention` paths).

    python bench/prefill_attention.py [--lengths 128,512,2048] [--heads 9,3,64] [--threads 2]

(--heads H,HKV,D: query heads, kv heads, head size; 32,8,128 is Llama-3-8B's.)
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

BLOCK = 16


def timed(fn, repeat: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="128,512,2048")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--heads", default="9,3,64", help="H,HKV,D")
    args = ap.parse_args()
    H, HKV, D = (int(x) for x in args.heads.split(","))
    torch.set_num_threads(args.threads)
    from shoal import kernels
    from shoal.engine.paged_attention import PagedAttention, PagedKVCache, SeqAttention

    if kernels.library() is None:
        raise SystemExit(f"the C++ kernels did not build: {kernels.reason()}")
    g = torch.Generator().manual_seed(0)
    results = {}
    for n in (int(x) for x in args.lengths.split(",")):
        nblocks = -(-n // BLOCK) + 4
        cache = PagedKVCache(1, nblocks, BLOCK, HKV, D, torch.bfloat16)
        blocks = torch.randperm(nblocks, generator=g)[: -(-n // BLOCK)]
        slots = (blocks[:, None] * BLOCK + torch.arange(BLOCK)).flatten()[:n]  # scattered blocks
        q = torch.randn(n, H, D, generator=g).bfloat16()
        k, v = (torch.randn(n, HKV, D, generator=g).bfloat16() for _ in range(2))

        def paged():
            return PagedAttention(cache, slots, [SeqAttention(0, n, slots)], H, HKV).attend(0, q, k, v)

        kk = k.transpose(0, 1).repeat_interleave(H // HKV, 0)[None]  # (1, H, n, D)
        vv = v.transpose(0, 1).repeat_interleave(H // HKV, 0)[None]
        qq = q.transpose(0, 1)[None]
        ms = {"kernel": timed(paged, args.repeat)}
        with kernels.disabled():
            ms["Shoal SDPA blocks"] = timed(paged, args.repeat)
        ms["SDPA causal"] = timed(lambda: F.scaled_dot_product_attention(qq, kk, vv, is_causal=True), args.repeat)
        flops = 2 * 2 * H * D * n * (n + 1) / 2  # q.k and p.v over the causal half
        print(f"L={n}: kernel {ms['kernel']:.3f} ms ({flops / ms['kernel'] / 1e6:.0f} GFLOP/s), "
              f"Shoal SDPA blocks {ms['Shoal SDPA blocks']:.3f} ms "
              f"({ms['Shoal SDPA blocks'] / ms['kernel']:.2f}x), SDPA causal {ms['SDPA causal']:.3f} ms "
              f"({ms['SDPA causal'] / ms['kernel']:.2f}x)")
        results[n] = ms
    body = {3: "amx", 2: "avx512-bf16", 1: "avx512"}.get(kernels.library().shoal_prefill_attention_isa(), "none")
    print(f"kernel body: {body}")
    print(json.dumps({"threads": args.threads, "body": body, "ms_per_layer": results}))


if __name__ == "__main__":
    main()
