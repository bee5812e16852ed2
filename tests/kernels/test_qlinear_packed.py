"""The packed products (`shoal.kernels.qlinear`) on each body this CPU runs (AMX tiles; AVX512-BF16
dot products; AVX-512F FMA; AVX2 FMA; the lesser bodies forced on a CPU that has a better one): the packed order and its inverse, the product against
the dequantized weight, row invariance at any row count and position, odd shapes, and int8
layers that fall back when the kernels are off."""

from __future__ import annotations

import pytest
import torch

from shoal import kernels
from shoal.kernels import qlinear as amx
from shoal.model.layers import Linear
from shoal.model.quant import QuantLinear, dequantize_int8, quant_linear, quantize_int8

needs_packed = pytest.mark.skipif(not amx.packed_ready(), reason="this CPU has no AVX2 (or the kernels did not build)")


def _runs(name: str) -> bool:
    if not amx.packed_ready():
        return False
    if name == "amx":
        return amx.amx_ready()
    try:
        with amx.force_body(name):
            return True
    except ValueError:
        return False


HERE = [b for b in ("amx", "avx512-bf16", "avx512", "avx2") if _runs(b)]  # an AMX CPU runs all four


@pytest.fixture(params=HERE or [None])
def body(request):
    """Each body this CPU runs, in turn."""
    if request.param is None:
        pytest.skip("this CPU has no AVX2 (or the kernels did not build)")
    with amx.force_body(request.param):
        yield request.param


def int8_layer(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, s = quantize_int8(torch.randn(n, k, generator=g) * torch.logspace(-2, 0, n)[:, None])
    return q, s.bfloat16()


@pytest.mark.parametrize("n,k", [(16, 32), (48, 64), (960, 576)])
def test_pack_unpack_and_row_gather_round_trip(n, k):
    q, _ = int8_layer(n, k)
    p = amx.qpack(q)
    assert p.shape == q.shape and p.dtype == torch.int8 and not torch.equal(p, q)
    assert torch.equal(amx.qunpack(p), q)
    ids = torch.tensor([[0, n - 1, 17 % n], [5, 5, n // 2]])
    assert torch.equal(amx.qrows(p, ids), q[ids])
    every = torch.arange(n).flip(0)  # each row once, every position in its block of 16
    assert torch.equal(amx.qrows(p, every), q[every])
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3)).bfloat16()  # bf16: no GROUP_ORDER
    assert torch.equal(amx.qrows(amx.qpack(w), every), w[every])
    # 16-aligned row slices and concatenations of packed matrices are packed matrices
    assert torch.equal(p[16:32], amx.qpack(q[16:32].contiguous()))
    assert torch.equal(torch.cat([p, p[:16]]), amx.qpack(torch.cat([q, q[:16]])))
    with pytest.raises(ValueError, match="qpack"):
        amx.qpack(q[:, :k - 1].contiguous())


@pytest.mark.parametrize("n,k,m", [(48, 64, 1), (960, 576, 7), (576, 1536, 40), (3072, 576, 300), (2064, 64, 5)])
def test_packed_product_is_the_dequantized_product(body, n, k, m):
    q, s = int8_layer(n, k, seed=1)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2)).bfloat16()
    y = amx.qlinear(x, amx.qpack(q), s)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    exact = x.double() @ dequantize_int8(q, s).double().T  # (m, n)
    # one bf16 rounding of the output, plus the fp32 sum's error (tiny next to it)
    sum_err = (x.double().abs() @ dequantize_int8(q, s).double().abs().T) * 2 ** -20
    assert ((y.double() - exact).abs() <= exact.abs() * 2 ** -8 + sum_err).all()
    # fp32 out (fp32 models): the same sum unrounded, so rounding it gives the bf16 result
    y32 = amx.qlinear(x, amx.qpack(q), s, out_dtype=torch.float32)
    assert y32.dtype == torch.float32 and torch.equal(y32.bfloat16(), y)
    assert ((y32.double() - exact).abs() <= exact.abs() * 2 ** -22 + sum_err).all()


def test_bias_joins_the_fp32_sum_before_the_one_rounding(body):
    """bf16 weights with a bias: F.linear's result (the same sum, the bias added in fp32, one
    rounding) up to the sum's order; int8 likewise against the dequantized weight."""
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(96, 576, generator=g) * 0.05).bfloat16()
    b = torch.randn(96, generator=g).bfloat16()
    x = torch.randn(9, 576, generator=g).bfloat16()
    exact = x.double() @ w.double().T + b.double()
    y = amx.blinear(x, amx.qpack(w), b)
    assert ((y.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-5).all()
    assert (y == torch.nn.functional.linear(x, w, b)).float().mean() > 0.99
    assert torch.equal(amx.blinear(x, amx.qpack(w), b, torch.float32).bfloat16(), y)  # one rounding
    q, s = int8_layer(96, 576, seed=6)
    exact = x.double() @ dequantize_int8(q, s).double().T + b.double()
    yq = amx.qlinear(x, amx.qpack(q), s, b)
    assert ((yq.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-5).all()
    assert torch.equal(amx.qlinear(x[2:3], amx.qpack(q), s, b), yq[2:3])  # still row by row


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n", [80, 2096])
def test_packed_rows_are_batch_invariant(body, threads, n):
    """A row's bits do not depend on how many rows share the call (1..70: AMX's tile heights,
    32-row groups and whole-strip widening; the other bodies' tiles of 1-8 rows (by body and
    dtype), their strips of 2 or 4 blocks with their tails (80 = 5 blocks, 2096 = 131), int8
    widened on the fly or once a strip) nor on where it sits; bf16 weights likewise."""
    q, s = int8_layer(n, 576, seed=3)
    p = amx.qpack(q)
    x = torch.randn(70, 576, generator=torch.Generator().manual_seed(4)).bfloat16()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        one = torch.cat([amx.qlinear(x[i:i + 1], p, s) for i in range(70)])
        for m in range(2, 71):
            for start in sorted({0, (70 - m) // 2, 70 - m}):
                assert torch.equal(amx.qlinear(x[start:start + m], p, s), one[start:start + m]), (m, start)
        strided = torch.zeros(70, 640, dtype=torch.bfloat16)
        strided[:, :576] = x  # rows with a stride wider than K
        assert torch.equal(amx.qlinear(strided[:, :576], p, s), one)
        pb = amx.qpack(dequantize_int8(q, s.float()).bfloat16())
        oneb = torch.cat([amx.blinear(x[i:i + 1], pb) for i in range(70)])
        for m in (2, 3, 4, 5, 8, 33, 70):
            assert torch.equal(amx.blinear(x[70 - m:], pb), oneb[70 - m:]), m
    finally:
        torch.set_num_threads(before)


@needs_packed
def test_packed_layer_falls_back_when_kernels_are_off():
    layer = Linear(576, 96, bias=True)
    ql = QuantLinear.from_linear(layer)
    assert ql.packed
    x = torch.randn(5, 576)
    with torch.no_grad():
        on = ql(x)
        with kernels.disabled():
            off = ql(x)  # the row-major kernel on an unpacked copy
        want = quant_linear(x, ql.plain_weight(), ql.qscale, ql.bias)
    assert torch.equal(off, want)
    torch.testing.assert_close(on, off, rtol=2 ** -7, atol=1e-3)


def test_shapes_the_tiles_cannot_take_stay_row_major():
    odd = QuantLinear.from_linear(Linear(40, 24))  # 24 rows: not a multiple of 16
    assert not odd.packed and torch.equal(odd.qweight, odd.plain_weight())
    x = torch.randn(3, 40)
    with torch.no_grad():
        torch.testing.assert_close(odd(x), torch.nn.functional.linear(x, dequantize_int8(odd.qweight, odd.qscale.float()))
                                   + odd.bias, rtol=2 ** -7, atol=1e-3)


@pytest.mark.skipif("avx2" not in HERE, reason="this CPU has no AVX2 (or the kernels did not build)")
def test_env_caps_the_process_at_a_lesser_body():
    """SHOAL_PACKED_BODY=avx2 runs every packed product of the process on the AVX2 body (what an
    AVX2-only CPU runs), force_body still reaches the best one, and a bad name is refused."""
    import subprocess
    import sys

    code = ("from shoal.kernels import qlinear as q\n"
            "print(q.body())\n"
            f"with q.force_body({HERE[0]!r}): print(q.body())\n"
            "print(q.body())\n")
    env = {**__import__("os").environ, "SHOAL_PACKED_BODY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["avx2", HERE[0], "avx2"]
    env["SHOAL_PACKED_BODY"] = "avx3"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "SHOAL_PACKED_BODY: one of" in bad.stderr
