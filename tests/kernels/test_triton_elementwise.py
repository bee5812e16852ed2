"""`kernels.triton_elementwise` (rms_norm, rope_, silu_mul, usable) under Triton's interpreter (CPU) against
PyTorch references: bit for bit where the reference's steps can be matched (rms_norm on inputs whose sums of
squares are exact in any order, rope_), within tolerances otherwise; strided views, argument checks; and on a
CUDA device the compiled kernels in bf16, in and out of a CUDA graph."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.triton_interp import interpreted

kern = interpreted("shoal.kernels.triton_elementwise")

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-6, torch.float16: 5e-3, torch.bfloat16: 1e-2}
# (N, K): SmolLM2-135M's and Llama-3.2-1B's hidden sizes, a small one, a non-power-of-2 one, the largest
NORM_SIZES = [(1, 576), (7, 64), (33, 2048), (7, 1000), (1, 8192)]
# (D, H, Hkv): SmolLM2-135M, Llama-3.2-1B, Qwen2.5-0.5B-like with D = 80 (half 40: masked), a tiny odd half
ROPE_SIZES = [(64, 9, 3), (64, 32, 8), (80, 14, 2), (6, 3, 1)]
SILU_SIZES = [(1, 1536), (7, 64), (33, 1000), (7, 2500)]  # (N, I): 2500 spans three 1024-wide programs


def rand(*shape, dtype, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def exact_sum_values(*shape, dtype, seed, steps=8):
    """Multiples of 1 / steps within [-32 / steps, 32 / steps]: exact in bf16, and with steps >= 8 their squares
    summed over K <= 8192 are exact in fp32 whatever the order (torch's CPU sum and the kernel's differ)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(-32, 33, shape, generator=gen).float() / steps).to(dtype)


def rms_norm_ref(x, weight, eps, residual=None):
    h = x if residual is None else residual + x
    return weight * F.rms_norm(h.float(), (x.shape[-1],), None, eps).to(x.dtype), h


def rope_ref(x, cos, sin):
    """x (N, Hx, D) rotated in fp32, rounded once."""
    xf, cos, sin = x.float(), cos.float()[:, None], sin.float()[:, None]
    first, second = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-second, first), dim=-1) * sin).to(x.dtype)


def silu_mul_ref(y):
    gate, up = y.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(y.dtype)


def rope_tables(rows, head_dim, dtype, seed, device="cpu"):
    """cos, sin (N, D) at random positions, HF rotate-half layout."""
    gen = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 8192, (rows,), generator=gen).float()
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = (pos[:, None] * inv_freq).repeat(1, 2)
    return angles.cos().to(dtype).to(device), angles.sin().to(dtype).to(device)


def assert_close(out, ref, dtype):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", FLOATS)
def test_rms_norm_bits(kern, dtype, with_residual):
    """Inputs whose sums of squares are exact: y and h are the reference's bits (bf16 included)."""
    for rows, hidden in NORM_SIZES:
        seed = rows * 10000 + hidden
        steps = 16 if with_residual else 8  # residual + x stays on the 1/16 grid within [-4, 4]
        x = exact_sum_values(rows, hidden, dtype=dtype, seed=seed, steps=steps)
        residual = exact_sum_values(rows, hidden, dtype=dtype, seed=seed + 1, steps=16) if with_residual else None
        weight = rand(hidden, dtype=dtype, seed=seed + 2)
        y, h = kern.rms_norm(x, weight, 1e-6, residual)
        y_ref, h_ref = rms_norm_ref(x, weight, 1e-6, residual)
        assert y.shape == (rows, hidden) and y.is_contiguous() and h.is_contiguous()
        assert torch.equal(y, y_ref), (rows, hidden)
        assert torch.equal(h, h_ref)
        assert (h is x) == (residual is None)


@pytest.mark.parametrize("dtype", FLOATS)
def test_rms_norm_random(kern, dtype):
    """Gaussian inputs (sums of squares rounded: fp32 may differ from torch's order by an ulp)."""
    for rows, hidden in NORM_SIZES[:4]:
        seed = rows + hidden
        x, residual = rand(rows, hidden, dtype=dtype, seed=seed), rand(rows, hidden, dtype=dtype, seed=seed + 1)
        weight = rand(hidden, dtype=dtype, seed=seed + 2)
        y, h = kern.rms_norm(x, weight, 1e-5, residual)
        y_ref, h_ref = rms_norm_ref(x, weight, 1e-5, residual)
        assert torch.equal(h, h_ref)
        assert_close(y, y_ref, dtype)
        assert_close(kern.rms_norm(x, weight, 1e-5)[0], rms_norm_ref(x, weight, 1e-5)[0], dtype)


def test_rms_norm_strided_rows(kern):
    """x a column slice of a wider buffer, residual every other row of one: the bits of contiguous copies."""
    rows, hidden = 7, 576
    x = rand(rows, hidden + 9, dtype=torch.bfloat16, seed=1)[:, 5:5 + hidden]
    residual = rand(2 * rows, hidden, dtype=torch.bfloat16, seed=2)[::2]
    weight = rand(hidden, dtype=torch.bfloat16, seed=3)
    assert not x.is_contiguous() and not residual.is_contiguous()
    y, h = kern.rms_norm(x, weight, 1e-6, residual)
    y_copy, h_copy = kern.rms_norm(x.contiguous(), weight, 1e-6, residual.contiguous())
    assert torch.equal(y, y_copy) and torch.equal(h, h_copy)
    assert torch.equal(kern.rms_norm(x, weight, 1e-6)[0], kern.rms_norm(x.contiguous(), weight, 1e-6)[0])


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("head_dim,heads,kv_heads", ROPE_SIZES)
def test_rope_fused_view(kern, head_dim, heads, kv_heads, dtype):
    """q | k of a fused (N, (H + 2 Hkv) D) projection output rotated in place through a strided view, then k
    alone (an offset view): the reference's bits, and the v columns untouched."""
    for rows in (1, 7, 33):
        seed = rows * 100 + head_dim
        fused = rand(rows, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=seed)
        cos, sin = rope_tables(rows, head_dim, dtype, seed)
        heads_view = fused.view(rows, heads + 2 * kv_heads, head_dim)
        before = fused.clone().view_as(heads_view)
        qk = heads_view[:, :heads + kv_heads]
        ref = rope_ref(qk, cos, sin)
        assert kern.rope_(qk, cos, sin) is None
        assert torch.equal(qk, ref), rows
        assert_close(qk, rope_ref(before[:, :heads + kv_heads], cos, sin), dtype)
        assert torch.equal(heads_view[:, heads + kv_heads:], before[:, heads + kv_heads:])  # v untouched

        k = heads_view[:, heads:heads + kv_heads]  # rotated once more: k alone
        ref_k = rope_ref(k, cos, sin)
        kern.rope_(k, cos, sin)
        assert torch.equal(k, ref_k)
        assert torch.equal(heads_view[:, :heads], ref[:, :heads])


def rope_store_ref(fused, cos, sin, heads, slot, k_cache, v_cache):
    """rope_ on q | k, then the cache writes of `TritonAttention.attend` (index_copy_ of k and v)."""
    kv = (fused.shape[1] - heads) // 2
    fused[:, :heads + kv] = rope_ref(fused[:, :heads + kv], cos, sin)
    k_cache.index_copy_(1, slot, fused[:, heads:heads + kv].transpose(0, 1))
    v_cache.index_copy_(1, slot, fused[:, heads + kv:].transpose(0, 1))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("head_dim,heads,kv_heads", ROPE_SIZES)
def test_rope_store_equals_rope_then_cache_writes(kern, head_dim, heads, kv_heads, dtype):
    """The fused kernel: the fused projection's q | k rotated with rope_'s bits, v untouched, and the cache
    (a layer's (Hkv, S, D) view of the model's cache) holding exactly what rope_ and two index_copy_ write,
    every other slot as it was; rows in any slot order (a padding row's scratch slot, say)."""
    for rows in (1, 7, 33):
        seed = rows * 10 + head_dim
        fused = rand(rows, heads + 2 * kv_heads, head_dim, dtype=dtype, seed=seed)
        cos, sin = rope_tables(rows, head_dim, dtype, seed)
        slots = 64
        slot = torch.randperm(slots, generator=torch.Generator().manual_seed(seed))[:rows]
        caches = rand(2, 3, kv_heads, slots, head_dim, dtype=dtype, seed=seed + 1)[:, 1]  # (layer 1 of 3)
        k_cache, v_cache = caches[0], caches[1]
        want_x, want_k, want_v = fused.clone(), k_cache.clone(), v_cache.clone()
        rope_store_ref(want_x, cos, sin, heads, slot, want_k, want_v)
        assert kern.rope_store_(fused, cos, sin, heads, slot, k_cache, v_cache) is None
        assert torch.equal(fused, want_x), rows
        assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v), rows


def test_rope_store_bad_arguments(kern):
    x, cos = torch.randn(3, 4 + 2 * 2, 64), torch.randn(3, 64)
    kc = torch.zeros(2, 16, 64)
    good = dict(x=x, cos=cos, sin=cos.clone(), heads=4, slot=torch.tensor([0, 5, 9]), k_cache=kc,
                v_cache=kc.clone())
    bad = [
        ("x", x.double()), ("x", x[..., ::2]), ("x", torch.randn(3, 7, 64)), ("heads", 5), ("heads", 0),
        ("cos", cos[:2]), ("sin", cos.half()),
        ("k_cache", torch.zeros(3, 16, 64)), ("k_cache", torch.zeros(16, 64)), ("v_cache", kc.half()),
        ("k_cache", torch.zeros(16, 2, 64).transpose(0, 1)),
        ("slot", torch.tensor([0, 5, 9], dtype=torch.int32)), ("slot", torch.tensor([0, 5])),
    ]
    for name, value in bad:
        with pytest.raises(ValueError, match=name if name != "heads" else "heads"):
            kern.rope_store_(**{**good, name: value})
    kern.rope_store_(**good)


def test_rope_transposed_heads(kern):
    """x (N, H, D) as the transpose of a contiguous (H, N, D): head stride above row stride."""
    rows, heads, head_dim = 7, 5, 64
    x = rand(heads, rows, head_dim, dtype=torch.float32, seed=4).transpose(0, 1)
    cos, sin = rope_tables(rows, head_dim, torch.float32, 5)
    copy = x.contiguous()
    kern.rope_(x, cos, sin)
    kern.rope_(copy, cos, sin)
    assert x.stride(1) == rows * head_dim and torch.equal(x, copy)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy exp
@pytest.mark.parametrize("dtype", FLOATS)
def test_silu_mul(kern, dtype):
    """Contiguous y and y as a column slice of a wider buffer (row stride free), several programs a row."""
    for rows, inter in SILU_SIZES:
        wide = rand(rows, 2 * inter + 3, dtype=dtype, seed=rows + inter, scale=4.0)
        for y in (wide[:, :2 * inter].contiguous(), wide[:, 3:]):
            out = kern.silu_mul(y)
            assert out.shape == (rows, inter) and out.is_contiguous() and out.dtype == dtype
            assert_close(out, silu_mul_ref(y), dtype)
    # saturation: exp(-gate) overflows to inf for very negative gates (silu -> -0), huge gates pass through
    y = torch.tensor([[-200.0, -90.0, 0.0, 90.0, 2.0, 3.0, 4.0, 5.0]], dtype=dtype)
    assert_close(kern.silu_mul(y), silu_mul_ref(y), dtype)


def test_zero_rows(kern):
    x = torch.empty(0, 64)
    y, h = kern.rms_norm(x, torch.ones(64), 1e-6, torch.empty(0, 64))
    assert y.shape == h.shape == (0, 64)
    kern.rope_(torch.empty(0, 4, 64), torch.empty(0, 64), torch.empty(0, 64))
    assert kern.silu_mul(torch.empty(0, 128)).shape == (0, 64)


def test_bad_arguments(kern):
    x, w = torch.randn(3, 64), torch.randn(64)
    good = dict(x=x, weight=w, eps=1e-6, residual=torch.randn(3, 64))
    bad = [
        ("x", x.double()), ("x", x[:, ::2]), ("x", x[0]), ("x", torch.randn(2, 8193)),
        ("weight", w.half()), ("weight", w[:32]), ("weight", torch.randn(128)[::2]),
        ("residual", x.half()), ("residual", x[:2]), ("residual", torch.randn(3, 128)[:, ::2]),
        ("eps", -1.0), ("eps", None), ("eps", True),
    ]
    for name, value in bad:
        with pytest.raises(ValueError, match=name):
            kern.rms_norm(**{**good, name: value})
    kern.rms_norm(**good)  # the good arguments do run

    q, cos = torch.randn(3, 4, 64), torch.randn(3, 64)
    good = dict(x=q, cos=cos, sin=cos.clone())
    bad = [
        ("x", q.double()), ("x", q[..., ::2]), ("x", q[0]), ("x", torch.randn(3, 4, 7)),
        ("x", torch.randn(3, 1, 64).expand(3, 4, 64)),
        ("cos", cos.half()), ("cos", cos[:2]), ("cos", cos[:, :32]), ("cos", torch.randn(64, 3).t()),
        ("sin", cos[:, :32]), ("sin", torch.randn(3, 128)[:, ::2]),
    ]
    for name, value in bad:
        with pytest.raises(ValueError, match=name):
            kern.rope_(**{**good, name: value})
    kern.rope_(**good)

    for value in (torch.randn(3, 64).double(), torch.randn(3, 7), torch.randn(3, 128)[:, ::2], torch.randn(64)):
        with pytest.raises(ValueError, match="y"):
            kern.silu_mul(value)


def test_usable_on_cpu(kern):
    assert not kern.usable(torch.randn(2, 4))
    assert not kern.usable(torch.randn(2, 4, dtype=torch.bfloat16), torch.randn(4))
    if torch.cuda.is_available():
        assert kern.usable(torch.randn(2, 4, device="cuda").bfloat16(), torch.randn(4, device="cuda"))
        assert not kern.usable(torch.randn(2, 4, device="cuda").bfloat16(), torch.randn(4))
        assert not kern.usable(torch.zeros(4, dtype=torch.int64, device="cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_and_graph_replay():
    """The compiled kernels in bf16 at Llama-3.2-1B's sizes (K = 2048, 32 + 8 heads of 64, I = 8192) with
    N = 64; then the three calls captured in one CUDA graph, replayed with new inputs copied into the same
    tensors (the outputs of the captured calls hold the new results)."""
    pytest.importorskip("triton")
    mod = importlib.import_module("shoal.kernels.triton_elementwise")
    if mod._INTERPRETING:
        pytest.skip("TRITON_INTERPRET is set: no compiled kernels")
    rows, hidden, heads, kv_heads, head_dim, inter = 64, 2048, 32, 8, 64, 8192
    dtype, tol = torch.bfloat16, 2e-2

    def inputs(seed):
        fused = rand(rows, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=seed + 3).cuda()
        return dict(x=rand(rows, hidden, dtype=dtype, seed=seed).cuda(),
                    residual=rand(rows, hidden, dtype=dtype, seed=seed + 1).cuda(),
                    weight=rand(hidden, dtype=dtype, seed=seed + 2).cuda(), fused=fused,
                    cos_sin=rope_tables(rows, head_dim, dtype, seed + 4, device="cuda"),
                    gate_up=rand(rows, 2 * inter, dtype=dtype, seed=seed + 5, scale=4.0).cuda())

    def qk_view(fused):
        return fused.view(rows, heads + 2 * kv_heads, head_dim)[:, :heads + kv_heads]

    def run(t):
        y, h = mod.rms_norm(t["x"], t["weight"], 1e-5, t["residual"])
        mod.rope_(qk_view(t["fused"]), *t["cos_sin"])
        return y, h, mod.silu_mul(t["gate_up"])

    def check(outs, t, fused_before):
        y_ref, h_ref = rms_norm_ref(t["x"], t["weight"], 1e-5, t["residual"])
        y, h, act = outs
        torch.testing.assert_close(y.float(), y_ref.float(), atol=tol, rtol=tol)
        torch.testing.assert_close(h.float(), h_ref.float(), atol=tol, rtol=tol)
        rope_want = rope_ref(qk_view(fused_before), *t["cos_sin"])
        torch.testing.assert_close(qk_view(t["fused"]).float(), rope_want.float(), atol=tol, rtol=tol)
        v_cols = (heads + kv_heads) * head_dim
        assert torch.equal(t["fused"][:, v_cols:], fused_before[:, v_cols:])
        torch.testing.assert_close(act.float(), silu_mul_ref(t["gate_up"]).float(), atol=tol, rtol=tol)

    t = inputs(0)
    fused_before = t["fused"].clone()
    check(run(t), t, fused_before)

    # capture (after a warm-up launch on a side stream: compiled already, but as graph capture wants)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(t)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = run(t)
    for seed in (10, 20):  # new values into the same tensors, outputs poisoned before each replay
        fresh = inputs(seed)
        for name in ("x", "residual", "weight", "fused", "gate_up"):
            t[name].copy_(fresh[name])
        for table, new in zip(t["cos_sin"], fresh["cos_sin"]):
            table.copy_(new)
        fused_before = t["fused"].clone()
        for out in outs:
            out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check(outs, t, fused_before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rope_store():
    """The compiled rope_store_ in bf16 at Llama-3.2-1B's head sizes, 256 rows into a (layers, Hkv, S, D)
    cache: q | k as the reference rotation, every cached k and v exactly the row's (rotated) heads, the other
    slots untouched."""
    pytest.importorskip("triton")
    mod = importlib.import_module("shoal.kernels.triton_elementwise")
    if mod._INTERPRETING:
        pytest.skip("TRITON_INTERPRET is set: no compiled kernels")
    rows, heads, kv_heads, head_dim, slots, dtype = 256, 32, 8, 64, 4096, torch.bfloat16
    fused = rand(rows, heads + 2 * kv_heads, head_dim, dtype=dtype, seed=1).cuda()
    cos, sin = rope_tables(rows, head_dim, dtype, 2, device="cuda")
    slot = torch.randperm(slots, generator=torch.Generator().manual_seed(3))[:rows].cuda()
    cache = torch.zeros(2, 3, kv_heads, slots, head_dim, dtype=dtype, device="cuda")
    before = fused.clone()
    mod.rope_store_(fused, cos, sin, heads, slot, cache[0, 1], cache[1, 1])
    torch.testing.assert_close(fused[:, :heads + kv_heads].float(),
                               rope_ref(before[:, :heads + kv_heads], cos, sin).float(), atol=2e-2, rtol=2e-2)
    assert torch.equal(fused[:, heads + kv_heads:], before[:, heads + kv_heads:])
    assert torch.equal(cache[0, 1][:, slot].transpose(0, 1), fused[:, heads:heads + kv_heads])
    assert torch.equal(cache[1, 1][:, slot].transpose(0, 1), fused[:, heads + kv_heads:])
    rest = cache.clone()
    rest[:, 1, :, slot] = 0
    assert not rest.any()  # no other slot, head or layer written
