"""The fused CPU kernels against the PyTorch op chains they stand for (`shoal.kernels`):
bit for bit where the docstrings say so, to float rounding elsewhere, and row-invariant."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shoal import kernels
from shoal.kernels import probes
from shoal.model.layers import apply_rope

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _built():
    assert kernels.library() is not None, kernels.reason()  # this machine has a C++ compiler


def rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_with_residual(dtype):
    x, r, w = rand(7, 576, dtype=dtype), rand(7, 576, dtype=dtype, seed=1), rand(576, dtype=dtype, seed=2)
    y, h = kernels.rms_norm(x, w, 1e-5, r)
    assert torch.equal(h, r + x)  # the residual sum, rounded as PyTorch rounds it
    want = w * F.rms_norm(h.float(), (576,), None, 1e-5).to(dtype)
    if dtype == torch.bfloat16:
        assert (y.float() - want.float()).abs().max().item() <= 2 ** -6 * want.abs().max().item()
    else:
        torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
    y2, none = kernels.rms_norm(h, w, 1e-5)
    assert none is None and torch.equal(y2, y)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_in_place_is_apply_rope_bit_for_bit(dtype):
    qkv = rand(5, 15 * 64, dtype=dtype)  # 9 q heads, 3 k heads, 3 v heads of 64
    pos = torch.tensor([0, 3, 17, 250, 4000])
    inv = 1.0 / (1e5 ** (torch.arange(0, 64, 2).float() / 64))
    emb = torch.cat([pos[:, None].float() * inv] * 2, dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    qk = qkv[:, :12 * 64].view(5, 12, 64)  # strided rows: the fused projection's output
    want = apply_rope(qk, cos, sin)
    v_before = qkv[:, 12 * 64:].clone()
    kernels.rope_(qk, cos, sin)
    assert torch.equal(qk, want) and torch.equal(qkv[:, 12 * 64:], v_before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype):
    y = rand(4, 2 * 1536, dtype=dtype, scale=4.0)
    want = F.silu(y[:, :1536]) * y[:, 1536:]
    got = kernels.silu_mul(y)
    if dtype == torch.bfloat16:
        assert torch.equal(got, want)  # (measured: the fp32 values round to the same bf16)
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def exp_neg_steps(x: torch.Tensor) -> torch.Tensor:
    """common.h's exp_neg, one fp32 op at a time (torch rounds each op once, as the kernel does)."""
    c = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    x = torch.where(x < -87, c(-87.0), x)
    n = (x * c(1.44269504088896341) + c(12582912.0)) - c(12582912.0)
    r = (x - n * c(0.693359375)) + n * c(2.12194440e-4)
    p = c(1.9875691500e-4)
    for k in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * r + c(k)
    p = ((p * r) * r + r) + c(1.0)
    return p * ((n.to(torch.int32) + 127) << 23).view(torch.float32)


def test_silu_mul_bf16_is_its_semantics_bit_for_bit():
    """The bf16 kernel (16 lanes at a time where the CPU has AVX-512) against its steps in torch:
    silu(a) = (a >= 0 ? a : a * e) / (1 + e), e = exp_neg(-|a|), rounded to bf16, times up, rounded."""
    y = rand(5, 2 * 37, scale=6.0).bfloat16()  # rows of 37: a 16-lane tail
    y[0, :6] = torch.tensor([0.0, -0.0, 100.0, -100.0, 1e-30, -3e38])
    gate, up = y[:, :37].float(), y[:, 37:].float()
    e = exp_neg_steps(-gate.abs())
    silu = (torch.where(gate >= 0, gate, gate * e) / (1 + e)).bfloat16().float()
    want = (silu * up).bfloat16()
    assert torch.equal(kernels.silu_mul(y), want)
    assert torch.equal(torch.cat([kernels.silu_mul(y[i:i + 1]) for i in range(5)]), want)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("heads", [(9, 3), (8, 1), (4, 4), (10, 2)])  # groups 3, 8, 1 and 5 (fp32 body)
@pytest.mark.parametrize("kv_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cache_write_and_decode_attention(dtype, kv_dtype, heads, d):
    h, hkv = heads
    slots_total = 1024
    kc = torch.zeros(hkv, slots_total, d, dtype=kv_dtype)
    vc = torch.zeros_like(kc)
    k, v = rand(40, hkv, d, dtype=dtype, seed=1), rand(40, hkv, d, dtype=dtype, seed=2)
    slots = torch.randperm(slots_total, generator=torch.Generator().manual_seed(3))[:40]
    kernels.cache_write(k, v, slots, kc, vc)
    assert torch.equal(kc[:, slots], k.transpose(0, 1).to(kv_dtype))
    assert torch.equal(vc[:, slots], v.transpose(0, 1).to(kv_dtype))
    q = rand(6, h, d, dtype=dtype, seed=4)
    lens = [40, 1, 17, 33, 40, 5]
    offsets = torch.tensor([0] + lens).cumsum(0)
    ctx = torch.cat([slots[:n] for n in lens])
    rows = torch.arange(6)
    tol = 1e-6 if dtype == kv_dtype == torch.float32 else 1e-2
    for window in (None, 8):
        out = torch.zeros_like(q)
        kernels.decode_attention(q, kc, vc, rows, ctx, offsets, window, out)
        for i, n in enumerate(lens):  # the reference: fp64 softmax attention, kv heads repeated
            lo = 0 if window is None else max(0, n - window)
            kk = kc[:, slots[lo:n]].double().repeat_interleave(h // hkv, 0)  # (H, n', D)
            vv = vc[:, slots[lo:n]].double().repeat_interleave(h // hkv, 0)
            p = (q[i].double()[:, None] @ kk.transpose(1, 2) / d ** 0.5).softmax(-1)
            assert (p @ vv)[:, 0].sub(out[i].double()).abs().max().item() < tol
    # a row's bits alone = among the others, at any position
    alone = torch.zeros_like(q)
    kernels.decode_attention(q, kc, vc, torch.tensor([2]), ctx[offsets[2]:offsets[3]],
                             torch.tensor([0, lens[2]]), None, alone)
    out = torch.zeros_like(q)
    kernels.decode_attention(q, kc, vc, rows, ctx, offsets, None, out)
    assert torch.equal(alone[2], out[2])


def test_vector_bf16_rounding_is_round_to_nearest_even():
    """The kernels' epilogues round fp32 to bf16 by one vector routine (VCVTNEPS2BF16 with denormal
    lanes lifted and dropped again where the CPU has AVX512-BF16, integer steps elsewhere): torch's
    round-to-nearest-even on every denormal bit pattern, ties, near-overflow values and random bits;
    NaNs stay NaN (quiet)."""
    g = torch.Generator().manual_seed(31)
    sub = torch.arange(0, 2 ** 23, 3, dtype=torch.int64)  # denormals (a third of them), both signs
    parts = [sub, sub | 2 ** 31,
             torch.randint(0, 2 ** 32, (1 << 20,), generator=g, dtype=torch.int64),
             (torch.randint(1, 255, (1 << 16,), generator=g, dtype=torch.int64) << 23) | 0x8000,  # ties
             (torch.randint(1, 255, (1 << 16,), generator=g, dtype=torch.int64) << 23) | 0x18000,
             torch.tensor([0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0xFF7FFFFF, 0x7F800000, 0x00800000, 0x007FFFFF,
                           0x00000000, 0x80000000, 0x7FC00001, 0xFF800001, 0x7F800001])]
    u = torch.cat(parts)
    u = torch.cat([u, u[: (-len(u)) % 16]])  # a multiple of 16
    x = (u - (u >= 2 ** 31).long() * 2 ** 32).to(torch.int32).view(torch.float32)
    got = probes.bf16_round(x)
    if got is None:
        pytest.skip("no AVX-512 on this CPU")
    want = x.bfloat16()
    nan = x.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))
    q = got[nan].view(torch.int16).int() & 0xFFFF  # NaN: the quiet bit set, the high payload kept
    assert bool(((q & 0x40) != 0).all()) and torch.equal(q >> 7, (u[nan] >> 23) & 0x1FF)


def test_callers_fall_back_when_disabled():
    """With the kernels switched off (or unavailable), the model's modules run PyTorch ops and
    give the same results within float rounding."""
    from shoal.model.layers import RMSNorm

    norm = RMSNorm(576, 1e-5)
    norm.weight.data = rand(576, seed=5)
    x = rand(3, 576)
    with torch.no_grad():
        fast = norm(x)
        with kernels.disabled():
            assert not kernels.usable(x)
            slow = norm(x)
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-6)
    assert kernels.usable(x) and not kernels.usable(x.requires_grad_())  # autograd: PyTorch ops


def test_no_compiler_means_pytorch_ops(monkeypatch):
    """Without a C++ compiler the library is None, `reason` says why, nothing is usable, and a
    model still runs (on PyTorch ops)."""
    from shoal.kernels import build
    from shoal.model.layers import RMSNorm

    monkeypatch.setattr(build, "_compiler", lambda: None)
    build.library.cache_clear()
    try:
        assert build.library() is None and "compiler" in build.reason()
        x = rand(2, 576)
        assert not kernels.usable(x)
        with torch.no_grad():
            assert RMSNorm(576, 1e-5)(x).shape == (2, 576)
    finally:
        monkeypatch.undo()
        build.library.cache_clear()
    assert build.library() is not None and build.reason() == "loaded"


def test_a_failing_compiler_means_pytorch_ops_and_no_half_written_library(monkeypatch, tmp_path):
    """A compiler that fails: no library (the reason names the failure), and nothing left in the
    cache that a later process could load."""
    from shoal.kernels import build

    monkeypatch.setattr(build, "_compiler", lambda: "/bin/false")
    monkeypatch.setenv("SHOAL_KERNEL_CACHE", str(tmp_path))
    build.library.cache_clear()
    try:
        assert build.library() is None and "failed" in build.reason()
        assert not list(tmp_path.rglob("*.so")) and not list(tmp_path.rglob("*.o"))
    finally:
        monkeypatch.undo()
        build.library.cache_clear()
    assert build.library() is not None


def test_bad_layouts_and_slots_raise_instead_of_touching_memory():
    q = rand(2, 9, 64)
    kc = torch.zeros(3, 64, 64)
    out = torch.empty_like(q)
    with pytest.raises(ValueError, match="rows or slots"):  # offsets do not end at len(slots)
        kernels.decode_attention(q, kc, kc, torch.tensor([0, 1]), torch.arange(5), torch.tensor([0, 2, 9]),
                                 None, out)
    with pytest.raises(ValueError, match="rows or slots"):  # a row past q
        kernels.decode_attention(q, kc, kc, torch.tensor([0, 7]), torch.arange(5), torch.tensor([0, 2, 5]),
                                 None, out)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.rope_(rand(2, 64, 9).transpose(1, 2), rand(2, 64), rand(2, 64))
    from shoal.engine.paged_attention import PagedAttention, PagedKVCache

    cache = PagedKVCache(1, 4, 16, 3, 64, torch.float32)  # 5 blocks of 16 slots (one scratch)
    with pytest.raises(ValueError, match="outside the cache"):
        PagedAttention(cache, torch.tensor([3, 80]), [], 9, 3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_stats_argmax_max_logsumexp(dtype):
    """torch.argmax's answer (first maximum, NaN wins, ties, -inf rows), the max, logsumexp to
    fp32 rounding, and each row's bits the same alone as in the batch."""
    x = rand(9, 1003, scale=4.0, seed=5)  # an odd width: the lane tail is used
    x[1, 700] = x[1, 20] = 50.0  # a tie: the first index
    x[2] = float("-inf")
    x[3, 5] = float("inf")
    x[4, 30] = x[4, 900] = float("nan")
    x[5, :500] = float("-inf")  # masked vocabulary (logit_bias / penalties)
    x = x.to(dtype)
    arg, mx, lse = kernels.row_stats(x)
    assert torch.equal(arg, x.argmax(-1))
    assert arg[1] == 20 and arg[4] == 30
    want = torch.stack([torch.logsumexp(r.float(), -1) for r in x])
    torch.testing.assert_close(lse, want, rtol=2e-6, atol=2e-6, equal_nan=True)
    torch.testing.assert_close(mx, x.float().amax(-1), equal_nan=True)
    for i in range(9):
        a1, m1, l1 = kernels.row_stats(x[i:i + 1])
        assert a1.item() == arg[i].item()
        assert torch.equal(l1.view(torch.int32), lse[i:i + 1].view(torch.int32))  # the same bits
    only = kernels.row_stats(x, with_lse=False)
    assert only[2] is None and torch.equal(only[0], arg)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_rows_is_the_inverse_cdf_of_the_tempered_softmax(dtype):
    """The token whose cumulative probability first exceeds u (a float64 reference: it agrees
    away from rounding at a boundary), masked tokens never, the odd rows as documented, and
    each row's answer the same alone as among the others."""
    v = 1003  # three blocks of 256 and a tail
    x = rand(64, v, scale=3.0, seed=6)
    x[:, ::7] = float("-inf")  # masked: never drawn
    x = x.to(dtype)
    g = torch.Generator().manual_seed(1)
    u = torch.rand(64, dtype=torch.float64, generator=g)
    temps = (0.3 + torch.rand(64, generator=g) * 2).float()
    rows = torch.arange(64)
    tok = kernels.sample_rows(x, rows, temps, u)
    p = torch.softmax(x.double() / temps.double()[:, None], -1)
    cdf = p.cumsum(-1)
    want = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).squeeze(1)
    assert torch.equal(tok, want)
    assert not (tok % 7 == 0).any()
    for i in (0, 17, 63):  # alone, and listed out of order
        assert kernels.sample_rows(x, torch.tensor([i]), temps[i:i + 1], u[i:i + 1]).item() == tok[i]
    back = kernels.sample_rows(x, rows.flip(0).contiguous(), temps.flip(0).contiguous(), u.flip(0).contiguous())
    assert torch.equal(back.flip(0), tok)
    # u at the ends: the first and the last token of weight > 0
    ends = kernels.sample_rows(x, torch.tensor([3, 3]), torch.ones(2), torch.tensor([0.0, 1.0 - 2**-53],
                                                                                   dtype=torch.float64))
    live = (x[3].float() > float("-inf")).nonzero().squeeze(1)
    assert ends.tolist() == [live[0].item(), live[-1].item()]
    odd = torch.zeros(4, v, dtype=dtype)
    odd[0] = float("-inf")
    odd[1, 9] = float("inf")
    odd[2, 40] = odd[2, 50] = float("nan")
    odd[3, 500] = 10.0  # a near one-hot row at a low temperature: always the maximum
    got = kernels.sample_rows(odd, torch.arange(4), torch.tensor([1.0, 1.0, 1.0, 0.01]),
                              torch.full((4,), 0.999, dtype=torch.float64))
    assert got.tolist() == [0, 9, 40, 500]
    with pytest.raises(ValueError, match="row index"):
        kernels.sample_rows(x, torch.tensor([64]), temps[:1], u[:1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_rows_with_top_k_and_top_p_keeps_what_the_sorted_filter_keeps(dtype):
    """Without a full sort, the kept set is the sorted filter's (`engine.device_draw._top_k_top_p`),
    and the draw is the inverse CDF over it; masked ids drop out before the filter."""
    from shoal.engine.device_draw import _top_k_top_p

    v, n = 1003, 48
    x = rand(n, v, scale=2.5, seed=7).to(dtype)
    g = torch.Generator().manual_seed(2)
    u = torch.rand(n, dtype=torch.float64, generator=g)
    temps = (0.5 + torch.rand(n, generator=g)).float()
    ks = [[0, 1, 5, 40, 2000][i % 5] for i in range(n)]  # 0 and > v: off
    ps = [[1.0, 0.9, 0.5, 0.05, 0.999][i // 5 % 5] for i in range(n)]
    masked = [[int(x[i].float().argmax())] if i % 3 == 0 else [] for i in range(n)]
    tok = kernels.sample_rows(x, torch.arange(n), temps, u, masked, ks, ps)
    for i in range(n):
        row = x[i].float().clone()
        row[masked[i]] = float("-inf")
        kept = _top_k_top_p((row / temps[i])[None], [min(ks[i], v) or v], [ps[i]])[0]
        w = torch.softmax(kept.double(), -1)
        cdf = w.cumsum(0)
        want = int(torch.searchsorted(cdf, u[i] * cdf[-1], right=True))
        assert tok[i].item() == want, i
        assert torch.isfinite(kept[tok[i]])
    # top_k = 1 and a tiny top_p are the argmax, whatever u
    one = kernels.sample_rows(x, torch.arange(n), temps, torch.full((n,), 0.999, dtype=torch.float64),
                              None, [1] * n, None)
    assert torch.equal(one, x.float().argmax(-1))
    for p in (1e-6, 5e-324):  # the second rounds to 0 in fp32
        tiny = kernels.sample_rows(x, torch.arange(n), temps, u, None, None, [p] * n)
        assert torch.equal(tiny, x.float().argmax(-1))
    flat = torch.zeros(1, v, dtype=dtype)  # every token tied: top_k keeps the lowest ids
    got = {kernels.sample_rows(flat, torch.tensor([0]), torch.ones(1), torch.tensor([q], dtype=torch.float64),
                               None, [3], None).item() for q in (0.0, 0.4, 0.8, 0.99)}
    assert got == {0, 1, 2}


@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_rows_cuts_flat_rows_and_tiny_weights_as_the_sorted_filter(dtype):
    """Cuts inside a bucket of thousands of tokens (flat rows, as a random model's or a high
    temperature's: groups of it taken whole, one sorted; bf16 makes many ties) and among weights
    too small for exact sums (walked token by token): the sorted filter's kept set, and the
    inverse CDF over it, u from 0 to nearly 1."""
    from shoal.engine.device_draw import _top_k_top_p

    v = 6000
    g = torch.Generator().manual_seed(11)
    flat = torch.randn(8, v, generator=g) * 0.05
    tiny = torch.full((4, v), -40.0)  # e^-40 ~ 2^-58: the cut among these (ties: the lowest ids)
    tiny[:, torch.randperm(v, generator=g)[:50]] = torch.randn(50, generator=g)
    x = torch.cat([flat, tiny]).to(dtype)
    n = x.shape[0]
    u = torch.tensor([0.0, 0.37, 0.999, 0.5, 0.81, 0.05, 0.62, 0.9999, 0.3, 0.7, 0.0, 0.95], dtype=torch.float64)
    temps = torch.tensor([0.7, 1.0, 2.0, 0.7, 1.3, 0.7, 1.0, 0.7, 1.0, 1.0, 0.7, 2.0])
    ks = [0, 0, 0, 2500, 1000, 4000, 0, 300, 60, 120, 51, 500]
    ps = [0.95, 0.5, 0.9, 1.0, 0.8, 0.97, 0.999, 0.6, 1.0, 1.0, 1.0, 0.99]
    tok = kernels.sample_rows(x, torch.arange(n), temps.float(), u, None, ks, ps)
    for i in range(n):
        kept = _top_k_top_p((x[i].float() / temps[i])[None], [ks[i] or v], [ps[i]])[0]
        w = torch.softmax(kept.double(), -1)
        cdf = w.cumsum(0)
        want = int(torch.searchsorted(cdf, u[i] * cdf[-1], right=True))
        assert tok[i].item() == want, i


def test_usable_looks_at_the_tensors_before_building_the_library(monkeypatch):
    """A GPU engine asks `usable` about its (CUDA) tensors: the answer is no without building
    the CPU kernels (a compiler run on a machine that may lack one)."""
    import shoal.kernels.ops as ops

    def no_build():
        raise AssertionError("library() was called")

    monkeypatch.setattr(ops, "library", no_build)
    assert not ops.usable(torch.empty(2, 2, device="meta"))  # (meta: not a CPU tensor, like CUDA ones)
    assert not ops.usable(torch.zeros(2, dtype=torch.int64))  # a dtype the kernels do not take
