"""4-bit weights (`shoal.kernels.q4linear`): the Q4_1 rounding bound, the packed layout and its
inverse, the product against a float64 reference of its semantics on each body this CPU runs
(AVX-512 and AVX2), rows that keep their bits at any row count and position, zero and odd rows,
the fallback with the kernels off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shoal import kernels
from shoal.kernels import q4linear as q4
from shoal.kernels import qlinear as amx
from tests.kernels.test_qlinear_packed import HERE

BODIES = [b for b in HERE if b != "amx"]  # q4's bodies: AVX-512 (any of the three) and AVX2
Q4_BODIES = sorted({"avx512" if b != "avx2" else "avx2" for b in BODIES})


@pytest.fixture(params=Q4_BODIES or [None])
def body(request):
    if request.param is None:
        pytest.skip("this CPU has no AVX2 (or the kernels did not build)")
    with amx.force_body(request.param):
        yield request.param


def weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * torch.logspace(-2, 0, n)[:, None] + 0.01 * torch.rand(n, 1, generator=g)


def reference(x: torch.Tensor, q, d, m, bias=None) -> torch.Tensor:
    """The module docstring's semantics in float64: x's rows as bf16, quantized per 32 inputs
    (xd = max|x| / 127 in fp32, xq = round(x / xd), nearest even), exact group sums."""
    n, k = q.shape
    xg = x.bfloat16().float().reshape(x.shape[0], k // 32, 32)
    xd = xg.abs().amax(-1) / 127
    xq = torch.where(xd[..., None] > 0, torch.round(xg / torch.where(xd > 0, xd, 1)[..., None]), 0.0)
    xq = xq.clamp(-127, 127).double()
    isum = torch.einsum("mcs,ncs->mnc", xq, q.double().reshape(n, k // 32, 32))  # (M, N, groups)
    xs = xd.double() * xq.sum(-1)  # (M, groups)
    y = (isum * d.double()[None] * xd.double()[:, None]).sum(-1) + (m.double()[None] * xs[:, None]).sum(-1)
    return y if bias is None else y + bias.bfloat16().double()


def test_quantize_q4_bound_codes_and_constant_groups():
    w = weight(48, 96)
    w[3, 32:64] = 0.25  # a constant group: d = 0, every code 0, the value exact in m
    q, d, m = q4.quantize_q4(w)
    assert q.dtype == torch.uint8 and q.shape == (48, 96) and int(q.max()) <= 15
    assert d.dtype == m.dtype == torch.float16 and d.shape == m.shape == (48, 3)
    deq = q4.dequantize_q4(q, d, m)
    err = (deq - w).abs().reshape(48, 3, 32).amax(-1)
    assert (err <= d.float() * 0.5 + 1e-3 * w.abs().reshape(48, 3, 32).amax(-1) + 1e-6).all()
    assert d[3, 1] == 0 and (q[3, 32:64] == 0).all() and torch.equal(deq[3, 32:64], w[3, 32:64])
    assert (q.reshape(48, 3, 32).amin(-1) == 0).all()  # m is each group's minimum
    with pytest.raises(ValueError, match="multiple of 32"):
        q4.quantize_q4(torch.randn(16, 40))


@pytest.mark.parametrize("n,k", [(16, 32), (48, 96), (960, 576)])
def test_pack_unpack_round_trip_and_row_blocks(n, k):
    q, d, m = q4.quantize_q4(weight(n, k))
    p = q4.q4pack(q, d, m)
    assert p.dtype == torch.uint8 and p.shape == (n, k * 5 // 8) and q4.in_features(p) == k
    back = q4.q4unpack(p)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, d, m)))
    # rows [16a, 16b) are one run: slices and concatenations of packed matrices are packed matrices
    assert torch.equal(p[:16], q4.q4pack(q[:16], d[:16], m[:16]))
    assert torch.equal(torch.cat([p, p[:16]]), q4.q4pack(torch.cat([q, q[:16]]), torch.cat([d, d[:16]]),
                                                         torch.cat([m, m[:16]])))
    assert torch.equal(q4.dequantize_packed(p), q4.dequantize_q4(q, d, m))
    with pytest.raises(ValueError, match="q4pack"):
        q4.q4pack(q[:8], d[:8], m[:8])


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 17])
@pytest.mark.parametrize("out", [torch.bfloat16, torch.float32])
def test_product_matches_the_reference(body, rows, out):
    n, k = 80, 320  # 5 blocks: both strip widths' tails
    q, d, m = q4.quantize_q4(weight(n, k, seed=1))
    p = q4.q4pack(q, d, m)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=g).to(out)
    bias = torch.randn(n, generator=g).bfloat16()
    for b in (None, bias):
        want = reference(x, q, d, m, b)
        got = q4.q4_linear(x, p, b)
        assert got.dtype == out and got.shape == (rows, n)
        tol = 1e-5 if out == torch.float32 else 8e-3  # fp32 group adds; one bf16 rounding
        assert ((got.double() - want).abs() <= tol * want.abs() + 1e-4 * want.abs().max()).all()
    # an fp32 bias is added after the kernel, in fp32
    fb = torch.randn(n, generator=g)
    torch.testing.assert_close(q4.q4_linear(x.float(), p, fb), q4.q4_linear(x.float(), p) + fb)


@pytest.mark.parametrize("threads", [1, 2])
def test_rows_keep_their_bits_at_any_count_and_position(body, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n, k = 2048 + 48, 576  # >= 128 blocks: strips of 4, and a tail
        p = q4.q4pack(*q4.quantize_q4(weight(n, k, seed=2) * 0.05))
        x = torch.randn(70, k, generator=torch.Generator().manual_seed(3)).bfloat16()
        x[5] = 0  # a zero row: its groups' scale is 0
        full = q4.q4_linear(x, p)
        alone = torch.cat([q4.q4_linear(x[i:i + 1], p) for i in range(70)])
        assert torch.equal(full, alone)
        assert torch.equal(q4.q4_linear(x[7:40], p), full[7:40])
        assert torch.equal(q4.q4_linear(x.flip(0), p).flip(0), full)
        assert torch.equal(full[5], torch.zeros(n, dtype=torch.bfloat16))
    finally:
        torch.set_num_threads(before)


def test_a_non_finite_input_makes_its_row_nan(body):
    p = q4.q4pack(*q4.quantize_q4(weight(32, 96, seed=8)))
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(9)).bfloat16()
    clean = q4.q4_linear(x, p)
    x[1, 40], x[2, 7] = float("nan"), float("inf")
    y = q4.q4_linear(x, p)
    assert y[1].isnan().all() and y[2].isnan().all()
    assert torch.equal(y[0], clean[0]) and torch.equal(y[3], clean[3])


def test_the_bodies_give_the_same_bits():
    """Integer group sums and the same fp32 steps: AVX-512 and AVX2 agree to the bit."""
    if len(Q4_BODIES) < 2:
        pytest.skip("this CPU runs one q4 body")
    p = q4.q4pack(*q4.quantize_q4(weight(96, 192, seed=4)))
    x = torch.randn(9, 192, generator=torch.Generator().manual_seed(5)).bfloat16()
    outs = []
    for b in Q4_BODIES:
        with amx.force_body(b):
            outs.append(q4.q4_linear(x, p))
    assert torch.equal(*outs)


def test_kernels_off_use_the_dequantized_weight():
    q, d, m = q4.quantize_q4(weight(32, 64, seed=6))
    p = q4.q4pack(q, d, m)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(7))
    bias = torch.randn(32)
    kernels.set_enabled(False)
    try:
        got = q4.q4_linear(x, p, bias)
    finally:
        kernels.set_enabled(True)
    torch.testing.assert_close(got, F.linear(x, q4.dequantize_q4(q, d, m), bias))
    if amx.packed_ready():  # the kernel's int8 activations: close to it, not equal
        fast = q4.q4_linear(x, p, bias)
        assert not torch.equal(fast, got)
        assert (fast - got).abs().max() < 0.02 * got.abs().max()
