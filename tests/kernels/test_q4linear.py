"""4-bit weights (`shoal.kernels.q4linear`): the Q4_1 rounding bound, the packed layout and its
inverse, the product against a float64 reference of its semantics on each body this CPU runs
(AMX, AVX-512 and AVX2), rows that keep their bits at any row count and position, zero and odd rows,
the fallback with the kernels off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shoal import kernels
from shoal.kernels import q4linear as q4
from shoal.kernels import qlinear as amx
from tests.kernels.test_qlinear_packed import HERE

# q4's bodies: AMX-INT8 tiles (from 4 rows, the AVX-512 body below that), AVX-512 (AVX512-BF16 or
# not: the same) and AVX2
Q4_BODIES = sorted({"amx" if b == "amx" else "avx512" if b != "avx2" else "avx2" for b in HERE})


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


def test_activation_quantization_in_registers_matches_the_scalar_code_and_torch():
    """The vector int8 step gives the scalar code's bits (and torch's fp32 ops'): ties to even,
    all-zero and subnormal groups, huge values, and non-finite groups (NaN scale)."""
    if kernels.library() is None:
        pytest.skip(f"the kernels did not build: {kernels.reason()}")
    if not kernels.library().shoal_packed_isa(-1):
        pytest.skip("a build without AVX2: no vector step to compare")
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(24, 256, generator=g) * torch.logspace(-3, 3, 24)[:, None]).bfloat16()
    x[0, :32] = 0  # all zero
    x[1, :32] = torch.linspace(-1e-39, 1e-39, 32)  # subnormal values and scale
    x[2, :32] = torch.tensor([127.0] + [v + 0.5 for v in range(-15, 16)])  # d = 1: halves tie to even
    x[3, :32] = 3e38
    x[4, 40], x[5, 100], x[6, 200] = float("nan"), float("inf"), -float("inf")
    vec, sca = q4.quantize_activations(x), q4.quantize_activations(x, scalar=True)
    assert torch.equal(vec[0], sca[0])
    for a, b in zip(vec[1:], sca[1:]):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    xq, xd, xs = vec
    assert torch.equal(xq[2, :32], torch.tensor([127] + [round(v + 0.5) for v in range(-15, 16)], dtype=torch.int8))
    assert xd[0, 0] == 0 and (xq[0, :32] == 0).all() and 0 < xd[1, 0] < 1e-40 and xq[1, 0] == -127
    assert xd[4, 1].isnan() and xd[5, 3].isnan() and xd[6, 6].isnan() and not xd[4, 0].isnan()
    # torch's fp32 ops on the finite groups
    xf = x.float().reshape(24, 8, 32)
    d = xf.abs().amax(-1) / 127
    want = torch.where(d[..., None] > 0, torch.round(xf / torch.where(d > 0, d, 1)[..., None]), 0.0).clamp(-127, 127)
    fin = xf.isfinite().all(-1)
    assert torch.equal(xq.reshape(24, 8, 32)[fin].float(), want[fin])
    assert torch.equal(xd[fin], torch.where(d > 0, d, 0.0)[fin])
    assert torch.equal(xs[fin], (xd * xq.reshape(24, 8, 32).sum(-1).float())[fin])


def test_the_bodies_give_the_same_bits():
    """Integer group sums and the same fp32 steps: AMX, AVX-512 and AVX2 agree to the bit, at
    row counts on both sides of the AMX body's start, with a bias and for fp32 outputs."""
    if len(Q4_BODIES) < 2:
        pytest.skip("this CPU runs one q4 body")
    g = torch.Generator().manual_seed(5)
    p = q4.q4pack(*q4.quantize_q4(weight(112, 192, seed=4)))  # 7 blocks: a one-block strip
    x = torch.randn(41, 192, generator=g).bfloat16()  # a chunk of 32 rows and one of 9
    x[3, 7] = float("nan")
    bias = torch.randn(112, generator=g).bfloat16()
    for rows, b, dt in ((x[:3], None, torch.bfloat16), (x[:9], bias, torch.bfloat16), (x, None, torch.bfloat16),
                        (x[:17], bias, torch.float32)):
        outs = []
        for body in Q4_BODIES:
            with amx.force_body(body):
                outs.append(q4.q4_linear(rows.to(dt), p, b))
        for o in outs[1:]:
            assert torch.equal(o.isnan(), outs[0].isnan()) and torch.equal(o.nan_to_num(), outs[0].nan_to_num())
    assert outs[0][3].isnan().all() and not outs[0][4].isnan().any()


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
