"""Decode attention over a paged KV cache on CPU, SmolLM2-135M's heads (9 query, 3 kv, size
64), bf16 cache: Shoal's kernel (`kernels.decode_attention`, reading the cache in place through
the slot table) against PyTorch (gather each row's keys and values, then SDPA with the kv heads
repeated for their query groups), in the same process; and the kernel over the same keys and
values in an int8 cache (`kv_cache_dtype="int8"`: int8 rows with a scale each). 30 layers of distinct caches, so the
keys come from memory as in a decode step; each row's blocks scattered over the cache.

    python bench/decode_attention.py [--rows 32] [--ctx 200] [--threads 2] [--heads 9,3,64] [--flush-mb 0]

(`--flush-mb N`: N MB of other data read before each timed step, not timed, as the weights pass
through the caches in a decode step; see bench/lora_kernel.py.)

(--heads H,HKV,D: query heads, kv heads, head size; 32,8,128 is Llama-3-8B's.)
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

BLOCK = 16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=200)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--heads", default="9,3,64", help="H,HKV,D")
    ap.add_argument("--flush-mb", type=int, default=0, help="MB read before each timed step (0: none)")
    args = ap.parse_args()
    H, HKV, D = (int(x) for x in args.heads.split(","))
    torch.set_num_threads(args.threads)
    from shoal import kernels

    if kernels.library() is None:
        raise SystemExit(f"the C++ kernels did not build: {kernels.reason()}")
    b, ctx = args.rows, args.ctx // BLOCK * BLOCK
    nblocks = b * ctx // BLOCK + 8
    g = torch.Generator().manual_seed(0)
    caches = [(torch.randn(HKV, nblocks * BLOCK, D, generator=g).bfloat16(),
               torch.randn(HKV, nblocks * BLOCK, D, generator=g).bfloat16()) for _ in range(args.layers)]
    perm = torch.randperm(nblocks, generator=g)
    per_row = [(perm[i * (ctx // BLOCK):(i + 1) * (ctx // BLOCK), None] * BLOCK + torch.arange(BLOCK)).flatten()
               for i in range(b)]
    slots = torch.cat(per_row)
    offsets = torch.tensor([0] + [ctx] * b).cumsum(0)
    rows = torch.arange(b)
    q = torch.randn(b, H, D, generator=g).bfloat16()
    out = torch.empty_like(q)

    def kernel_step():
        for kc, vc in caches:
            kernels.decode_attention(q, kc, vc, rows, slots, offsets, None, out, prechecked=True)

    caches8 = []  # the same keys and values, written into int8 caches
    for kc, vc in caches:
        s = kc.shape[1]
        c8 = [torch.empty(kc.shape, dtype=torch.int8) for _ in range(2)] + [torch.empty(HKV, s) for _ in range(2)]
        kernels.cache_write(kc.transpose(0, 1).contiguous(), vc.transpose(0, 1).contiguous(), torch.arange(s), *c8)
        caches8.append(c8)

    def int8_step():
        for kc, vc, ks, vs in caches8:
            kernels.decode_attention(q, kc, vc, rows, slots, offsets, None, out, prechecked=True, ks=ks, vs=vs)

    def torch_step():
        for kc, vc in caches:
            for i in range(b):
                k = kc[:, per_row[i]].repeat_interleave(H // HKV, 0)  # (H, ctx, D)
                v = vc[:, per_row[i]].repeat_interleave(H // HKV, 0)
                out[i] = F.scaled_dot_product_attention(q[i][:, None], k, v)[:, 0]

    flush = torch.ones(args.flush_mb << 18) if args.flush_mb else None  # fp32: 4 bytes each
    times = {}
    for name, fn in [("kernel", kernel_step), ("kernel int8", int8_step), ("PyTorch", torch_step)] * 2:
        # (alternated; the second round kept)
        fn()
        spent = 0.0
        for _ in range(args.repeat):
            if flush is not None:
                flush.sum()  # (not timed)
            t = time.perf_counter()
            fn()
            spent += time.perf_counter() - t
        times[name] = spent / args.repeat * 1e3
    nbytes = args.layers * b * ctx * HKV * D * 2 * 2
    print(f"{args.layers} layers x {b} rows x {ctx} keys ({nbytes / 2**20:.0f} MB of KV): kernel "
          f"{times['kernel']:.2f} ms ({nbytes / times['kernel'] / 1e6:.1f} GB/s), PyTorch {times['PyTorch']:.2f} ms, "
          f"{times['PyTorch'] / times['kernel']:.2f}x; int8 cache {times['kernel int8']:.2f} ms "
          f"({nbytes * 17 / 32 / times['kernel int8'] / 1e6:.1f} GB/s, {times['kernel'] / times['kernel int8']:.2f}x bf16)")
    print(json.dumps({"threads": args.threads, "rows": b, "ctx": ctx, "flush_mb": args.flush_mb, "ms": times}))


if __name__ == "__main__":
    main()
