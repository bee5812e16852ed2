"""Multi-LoRA deltas on CPU for SmolLM2-135M's shapes: Shoal's BGMV kernel (`kernels.lora_bgmv`
through `kernels.BGMVLayers`, as the engine calls it) against the same deltas in PyTorch ops
(each token gathers its slot's A and B and two batched products run, the form of
`shoal.lora.grouping.add_indexed_`), in the same process.

Three workloads over 30 layers x (q|k|v, o, gate|up, down), rank 8, bf16 slots, each layer with
its own buffers so the slots come from memory as in a decode step:
- decode: 32 tokens, each with its own adapter slot (32 slots read, ~150 MB);
- decode: 64 tokens, two on each slot, 32 rows apart (requests on the same adapter, scattered
  through the batch: the kernel gathers each slot's tokens into one block);
- prefill: 512 tokens of one adapter (a prompt run).
On an AVX-512 CPU the kernel also runs on the same slots as int8 rows with fp32 scales
(`EngineConfig.lora_dtype="int8"`).

    python bench/lora_kernel.py [--threads 2] [--repeat 5] [--flush-mb 0]

`--flush-mb N` reads N MB of other data before each timed step (not timed), as a decode step's
base weights pass through the caches between its LoRA calls: on a CPU whose last-level cache holds
a good part of the slots (the 2-core Xeon with AMX: ~64 MB of 480 MB), the timings without it are
warmer than the engine's (32 tokens on 32 slots there, int8 slots: 8.3 ms without, 10.0 with 400;
this loop's own Python and output buffers are ~1-2 ms of either).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

GROUPS = [(576, [576, 192, 192]), (576, [576]), (576, [1536, 1536]), (1536, [576])]  # (in, outs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--flush-mb", type=int, default=0, help="MB read before each timed step (0: none)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from shoal import kernels

    if kernels.library() is None:
        raise SystemExit(f"the C++ kernels did not build: {kernels.reason()}")
    g = torch.Generator().manual_seed(0)
    r, nslots = args.rank, args.slots
    layers, nbytes, nbytes8 = [], 0, 0
    from shoal.lora.layers import quantize_rows

    int8 = kernels.lora_int8_ready()
    for _ in range(args.layers):
        for k, widths in GROUPS:
            a = (torch.randn(nslots, len(widths) * r, k, generator=g) * 0.05).bfloat16()
            bs = [(torch.randn(nslots, r, w, generator=g) * 0.05).bfloat16() for w in widths]
            scales = [torch.ones(nslots)] * len(widths)
            ranks = [torch.full((nslots,), r)] * len(widths)
            plan = kernels.BGMVLayers([a[:, i * r:(i + 1) * r] for i in range(len(widths))], bs, scales, ranks)
            plan8 = None
            if int8:  # the same slots as int8 rows with fp32 scales (EngineConfig.lora_dtype="int8")
                aq, asc = (torch.stack(t) for t in zip(*(quantize_rows(a[s]) for s in range(nslots))))
                bq = [[torch.stack(t) for t in zip(*(quantize_rows(b[s]) for s in range(nslots)))] for b in bs]
                plan8 = kernels.BGMVLayers([aq[:, i * r:(i + 1) * r] for i in range(len(widths))],
                                           [q for q, _ in bq], scales, ranks,
                                           [asc[:, i * r:(i + 1) * r] for i in range(len(widths))],
                                           [sc for _, sc in bq])
                nbytes8 += aq.numel() + asc.numel() * 4 + sum(q.numel() + sc.numel() * 4 for q, sc in bq)
            layers.append((k, widths, a, bs, plan, plan8))
            nbytes += a.numel() * 2 + sum(b.numel() * 2 for b in bs)

    def torch_bgmv(x, slots, outs, a, bs):
        # (N, 1, in) @ (N, in, n*R) -> (N, 1, n*R); then each layer's (N, 1, R) @ (N, R, out)
        xa = torch.bmm(x[:, None, :], a.index_select(0, slots).transpose(1, 2))
        for i, (o, b) in enumerate(zip(outs, bs)):
            o.add_(torch.bmm(xa[:, :, i * r:(i + 1) * r], b.index_select(0, slots))[:, 0])

    flush = torch.ones(args.flush_mb << 18) if args.flush_mb else None  # fp32: 4 bytes each
    results = {}
    for name, n, slots in [("decode: 32 tokens, 32 slots", 32, torch.arange(32) % nslots),
                           ("decode: 64 tokens, 2 a slot apart", 64, torch.arange(64) % nslots),
                           ("prefill: 512 tokens, 1 slot", 512, torch.zeros(512, dtype=torch.long))]:
        xs = {k: (torch.randn(n, k, generator=g)).bfloat16() for k in (576, 1536)}
        row = {}
        kinds = ("kernel", "int8 slots", "PyTorch") if int8 else ("kernel", "PyTorch")
        for kind in kinds * 2:  # alternated; the second pass kept
            def step():
                for k, widths, a, bs, plan, plan8 in layers:
                    o = [torch.zeros(n, w, dtype=torch.bfloat16) for w in widths]  # (all pay this)
                    if kind == "kernel":
                        plan(xs[k], slots, o, True)
                    elif kind == "int8 slots":
                        plan8(xs[k], slots, o, True)
                    else:
                        torch_bgmv(xs[k], slots, o, a, bs)
            step()
            spent = 0.0
            for _ in range(args.repeat):
                if flush is not None:
                    flush.sum()  # (not timed)
                t = time.perf_counter()
                step()
                spent += time.perf_counter() - t
            row[kind] = spent / args.repeat * 1e3
        results[name] = row
        q8 = f"   int8 slots {row['int8 slots']:8.2f} ms ({row['kernel'] / row['int8 slots']:4.2f}x)" if int8 else ""
        print(f"{name:34s} kernel {row['kernel']:8.2f} ms   PyTorch {row['PyTorch']:8.2f} ms   "
              f"{row['PyTorch'] / row['kernel']:5.2f}x{q8}")
    print(f"slots: {nbytes / 2**20:.0f} MB bf16" + (f", {nbytes8 / 2**20:.0f} MB int8 with scales" if int8 else ""))
    print(json.dumps({"threads": args.threads, "layers": args.layers, "flush_mb": args.flush_mb, "ms": results}))


if __name__ == "__main__":
    main()
