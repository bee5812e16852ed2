"""The products of one SmolLM2-135M decode step on CPU: Shoal's packed kernels (`kernels.qlinear`:
weight-only int8, and bf16; on AMX tiles, AVX512-BF16 dot products, or FMA; `kernels.q4linear`:
4-bit weights, the output layer int8 as the engine's q4 mode keeps it) against torch's int8 kernel (`_weight_int8pack_mm`) and bf16 `F.linear` (oneDNN), in the same
process. 30 layers of distinct random weights of the real shapes (fused q/k/v 960x576, o 576x576,
fused gate/up 3072x576, down 576x1536) plus the output layer (49152x576), so the weights come from
memory as in the engine. Prints ms a step per row count and the ratios.

    python bench/cpu_products.py [--rows 1,8,32,128] [--threads 2] [--layers 30]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
VOCAB = 49152


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,8,32,128")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from shoal.kernels import qlinear as amx
    from shoal.kernels import q4linear as q4
    from shoal.model.quant import quantize_int8

    if not amx.packed_ready():
        raise SystemExit("this CPU has neither AMX-BF16 nor AVX512-BF16 (or the kernels did not build)")
    body = amx.body()
    print(f"packed products on {body}")
    g = torch.Generator().manual_seed(0)
    layers = []  # (packed int8, bf16 scale, row-major int8, bf16 weight, packed bf16, packed q4 or None)
    for n, k in SHAPES * args.layers + [(VOCAB, 576)]:
        q, s = quantize_int8(torch.randn(n, k, generator=g) * 0.02)
        w = (q.float() * s[:, None]).bfloat16()
        p4 = q4.q4pack(*q4.quantize_q4(w)) if n != VOCAB else None
        layers.append((amx.qpack(q), s.bfloat16(), q, w, amx.qpack(w), p4))
    kinds = {
        f"int8 {body} (shoal)": lambda x, p, s, q, w, pb, p4: amx.qlinear(x, p, s),
        "int8 _weight_int8pack_mm": lambda x, p, s, q, w, pb, p4: torch.ops.aten._weight_int8pack_mm(x, q, s),
        f"bf16 {body} (shoal)": lambda x, p, s, q, w, pb, p4: amx.blinear(x, pb),
        "bf16 F.linear": lambda x, p, s, q, w, pb, p4: F.linear(x, w),
        "q4 (shoal)": lambda x, p, s, q, w, pb, p4: q4.q4_linear(x, p4) if p4 is not None else amx.qlinear(x, p, s),
    }
    results = {}
    print(f"{'rows':>5} " + "".join(f"{k:>26}" for k in kinds) + "  int8mm/int8  F.linear/bf16  bf16/q4")
    for m in map(int, args.rows.split(",")):
        xs = {k: torch.randn(m, k, generator=g).bfloat16() for k in (576, 1536)}
        row = {}
        for name, fn in list(kinds.items()) * 2:  # twice, alternated: the second pass is kept
            def step():
                for p, s, q, w, pb, p4 in layers:
                    fn(xs[q.shape[1]], p, s, q, w, pb, p4)
            step()
            t = time.perf_counter()
            for _ in range(args.repeat):
                step()
            row[name] = (time.perf_counter() - t) / args.repeat * 1e3
        results[m] = row
        a, b, c, d, e = row.values()
        print(f"{m:>5} " + "".join(f"{v:>26.2f}" for v in row.values())
              + f"  {b / a:10.2f}x {d / c:12.2f}x {c / e:7.2f}x")
    print(json.dumps({"threads": args.threads, "layers": args.layers, "ms_per_step": results}))


if __name__ == "__main__":
    main()
