"""The multi-LoRA BGMV kernel (`kernels.lora_bgmv`) against float64 references: each token's own
slot (fp32, bf16 or int8 slots), base rows left alone, and a row's bits the same alone as in a
batch, a prefill run or a decode block; and the FMA pair that stands for VDPBF16PS in its shrink
on CPUs with AMX."""

from __future__ import annotations

import pytest
import torch

from shoal import kernels
from shoal.kernels import probes
from tests.kernels.test_cpu_kernels import DTYPES, rand


@pytest.fixture(autouse=True)
def _built():
    assert kernels.library() is not None, kernels.reason()  # this machine has a C++ compiler


@pytest.mark.parametrize("k", [576, 72])
@pytest.mark.parametrize("wdtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_bgmv_per_token_slots(dtype, wdtype, k):
    """Each token's own slot (fp32 or bf16 slots); -1 left alone; a zero-rank slot adds nothing;
    strided outputs (column slices of one fused output); a row's bits do not depend on the
    other rows. k = 72: inputs that end in a partial step of 32 (blocks of several tokens read
    whole steps with plain loads, lone tokens with masks: the same bits)."""
    n_tok, slots_n, r = 9, 4, 8
    x = rand(n_tok, k, dtype=dtype)
    a = rand(slots_n, 2 * r, k, seed=1, scale=0.05, dtype=wdtype)  # two layers' A stacked
    bs = [rand(slots_n, r, 96, seed=2, scale=0.05, dtype=wdtype), rand(slots_n, r, 32, seed=3, scale=0.05, dtype=wdtype)]
    scales = [torch.tensor([1.0, 2.0, 0.5, 1.5]), torch.tensor([2.0, 1.0, 1.0, 1.0])]
    ranks = [torch.tensor([8, 8, 3, 0]), torch.tensor([8, 0, 8, 8])]
    slots = torch.tensor([0, -1, 1, 2, 3, 0, 2, -1, 1])
    base = rand(n_tok, 128, dtype=dtype, seed=4)
    y = base.clone()
    outs = [y[:, :96], y[:, 96:]]
    kernels.lora_bgmv(x, slots, [a[:, :r], a[:, r:]], bs, scales, ranks, outs, accumulate=True)
    for t, s in enumerate(slots.tolist()):
        if s < 0:
            assert torch.equal(y[t], base[t])
            continue
        for i, (lo, hi) in enumerate(((0, 96), (96, 128))):
            rk = int(ranks[i][s])
            xa = x[t].double() @ a[s, i * r:i * r + rk].double().T * float(scales[i][s])
            want = base[t, lo:hi].double() + xa @ bs[i][s, :rk].double()
            tol = 1e-4 if dtype == torch.float32 else 0.05
            assert (y[t, lo:hi].double() - want).abs().max().item() < tol
    one = base[3:4].clone()
    kernels.lora_bgmv(x[3:4], slots[3:4], [a[:, :r], a[:, r:]], bs, scales, ranks,
                      [one[:, :96], one[:, 96:]], accumulate=True)
    assert torch.equal(one[0], y[3])
    # a run of one slot (a prefill chunk: tokens in blocks of 4 sharing each weight load) gives
    # every token the bits it gets alone, however the run is cut
    run = torch.full((11,), 2)
    xr = rand(11, k, dtype=dtype, seed=6)
    yr = rand(11, 128, dtype=dtype, seed=7)
    got = yr.clone()
    kernels.lora_bgmv(xr, run, [a[:, :r], a[:, r:]], bs, scales, ranks, [got[:, :96], got[:, 96:]], accumulate=True)
    for lo, hi in ((0, 1), (0, 3), (2, 9), (5, 11)):
        part = yr[lo:hi].clone()
        kernels.lora_bgmv(xr[lo:hi], run[lo:hi], [a[:, :r], a[:, r:]], bs, scales, ranks,
                          [part[:, :96], part[:, 96:]], accumulate=True)
        assert torch.equal(part, got[lo:hi]), (lo, hi)
    # decode rows of requests on the same adapter, scattered through the batch, share their
    # slot's weight loads (blocks of up to 4 gathered across the batch): each row still gets the
    # bits it gets alone
    mixed = torch.tensor([2, 0, 2, -1, 1, 2, 0, 2, 2, 2, 1, 0, 2])
    xm = rand(len(mixed), k, dtype=dtype, seed=8)
    ym = rand(len(mixed), 128, dtype=dtype, seed=9)
    got = ym.clone()
    kernels.lora_bgmv(xm, mixed, [a[:, :r], a[:, r:]], bs, scales, ranks, [got[:, :96], got[:, 96:]], accumulate=True)
    for t in range(len(mixed)):
        one = ym[t:t + 1].clone()
        kernels.lora_bgmv(xm[t:t + 1], mixed[t:t + 1], [a[:, :r], a[:, r:]], bs, scales, ranks,
                          [one[:, :96], one[:, 96:]], accumulate=True)
        assert torch.equal(one[0], got[t]), t
    assert torch.equal(got[3], ym[3])


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_bgmv_int8_slots(dtype):
    """int8 slots with a scale per row of A and of B: the deltas of the dequantized weights (float64
    reference), base rows left alone, and each row's bits the same alone as in the batch."""
    from shoal.lora.layers import quantize_rows

    if not kernels.lora_int8_ready():
        pytest.skip("int8 LoRA slots need the kernels on an AVX-512 CPU")
    k, r, nslots = 576, 8, 4
    a = rand(nslots, 2 * r, k, seed=11, scale=0.05)  # two layers' A stacked
    bs = [rand(nslots, r, 96, seed=12, scale=0.05), rand(nslots, r, 40, seed=13, scale=0.05)]
    aq = torch.stack([quantize_rows(a[s])[0] for s in range(nslots)])
    asc = torch.stack([quantize_rows(a[s])[1] for s in range(nslots)])
    bq = [(torch.stack([quantize_rows(b[s])[0] for s in range(nslots)]),
           torch.stack([quantize_rows(b[s])[1] for s in range(nslots)])) for b in bs]
    assert aq.dtype == torch.int8 and aq.abs().max() == 127
    scales = [torch.tensor([1.0, 2.0, 0.5, 1.5]), torch.tensor([2.0, 1.0, 1.0, 1.0])]
    ranks = [torch.tensor([8, 8, 3, 0]), torch.tensor([8, 0, 8, 8])]
    slots = torch.tensor([0, 3, -1, 1, 2, 3, 3, 0, 1, 2, 2, -1, 0])
    n = len(slots)
    x = rand(n, k, dtype=dtype, seed=14)
    base = rand(n, 136, dtype=dtype, seed=15)

    def run(rows):
        y = base[rows].clone()
        kernels.lora_bgmv(x[rows], slots[rows], [aq[:, :r], aq[:, r:]], [b[0] for b in bq], scales, ranks,
                          [y[:, :96], y[:, 96:]], True, [asc[:, :r], asc[:, r:]], [b[1] for b in bq])
        return y

    y = run(slice(None))
    for t, s in enumerate(slots.tolist()):
        if s < 0:
            assert torch.equal(y[t], base[t])
            continue
        for i, (lo, hi) in enumerate(((0, 96), (96, 136))):
            rk = int(ranks[i][s])
            ad = aq[s, i * r:i * r + rk].double() * asc[s, i * r:i * r + rk, None].double()
            bd = bq[i][0][s, :rk].double() * bq[i][1][s, :rk, None].double()
            want = base[t, lo:hi].double() + (x[t].double() @ ad.T * float(scales[i][s])) @ bd
            tol = 1e-4 if dtype == torch.float32 else 0.05
            assert (y[t, lo:hi].double() - want).abs().max().item() < tol
            if rk and s in (0, 1):  # the rounding is real: the exact weights give another delta
                exact = base[t, lo:hi].double() + (x[t].double() @ a[s, i * r:i * r + rk].double().T
                                                   * float(scales[i][s])) @ bs[i][s, :rk].double()
                assert (exact - want).abs().max().item() > 1e-6
    for t in range(n):
        assert torch.equal(run(slice(t, t + 1))[0], y[t]), t
    # a run of one slot (blocks of 4 widen the slot to bf16 once; a lone row widens in registers):
    # the same bits either way
    slots = torch.tensor([1] * 11 + [0, 1])
    y = run(slice(None))
    for t in range(len(slots)):
        assert torch.equal(run(slice(t, t + 1))[0], y[t]), t
    if dtype == torch.bfloat16:
        # inputs near and below bf16's smallest normal (partial sums pass through denormals; the
        # row scales make the deltas visible): still the same bits both ways (on CPUs with AMX
        # both run FMAs under FTZ/DAZ for VDPBF16PS: see test_fma_pairs_give_vdpbf16ps_bits)
        x = rand(n, k, dtype=torch.float32, seed=16, scale=2e-38).to(dtype)
        assert (x.float().abs() < 2.0 ** -126).sum() > 1000 and (x != 0).sum() > 6000
        asc = asc * 1e36
        y = run(slice(None))
        assert (y != base).any(dim=1).sum() >= 10  # the deltas show
        for t in range(len(slots)):
            assert torch.equal(run(slice(t, t + 1))[0], y[t]), t


def test_fma_pairs_give_vdpbf16ps_bits():
    """The LoRA shrink on CPUs with AMX stands two FMAs under FTZ/DAZ (odd pair element first) for
    VDPBF16PS: the same bits on lanes of random bits (NaN, inf, denormals), tiny exponents (sums
    through denormals) and ordinary values."""
    g = torch.Generator().manual_seed(21)
    n = 16 * 4096

    def bits(lo, hi):
        return torch.randint(lo, hi, (n,), generator=g, dtype=torch.int64)

    def pairs(kind, seed):
        if kind == "any":
            halves = bits(0, 2 ** 16), bits(0, 2 ** 16)
        elif kind == "tiny":  # bf16 exponents 0-40: denormals, products far below the smallest normal
            halves = [bits(0, 2) << 15 | bits(0, 41) << 7 | bits(0, 128) for _ in range(2)]
        else:
            v = rand(2 * n, seed=seed).bfloat16().view(torch.int16).to(torch.int64) & 0xFFFF
            halves = v[0::2], v[1::2]
        return (halves[0] | halves[1] << 16).to(torch.int32)

    for kind in ("any", "tiny", "normal"):
        a, b = pairs(kind, 22), pairs(kind, 23)
        acc = (bits(0, 2 ** 32) - 2 ** 31).to(torch.int32).view(torch.float32) if kind == "any" else \
            (rand(n, seed=24) * (1e-37 if kind == "tiny" else 1.0))
        got = probes.dot2_check(a, b, acc.contiguous())
        if got is None:
            pytest.skip("no AVX512-BF16 on this CPU")
        dp, fma = got
        same = (dp.view(torch.int32) == fma.view(torch.int32)) | (dp.isnan() & fma.isnan())
        assert bool(same.all()), (kind, int((~same).sum()))
        if kind == "tiny":  # the flushing is exercised: plain FMAs would differ here
            assert int((dp == 0).sum()) > 1000
