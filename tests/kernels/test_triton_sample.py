"""`kernels.triton_sample.greedy_rows` under Triton's interpreter (CPU) against PyTorch: the
tokens exactly (torch.argmax of the row with the ignore_eos rows' eos ids masked; ties to the
first index), logsumexp and logprobs to fp32 rounding; strided rows, low-precision logits,
argument checks; on a CUDA device the compiled kernel, and `decode_ahead`'s launch through it."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.triton_interp import interpreted

kern = interpreted("shoal.kernels.triton_sample")


def reference(x: torch.Tensor, ignore: list[bool], eos: list[int]):
    raw = x.float()
    lse = torch.logsumexp(raw, dim=-1)
    m = raw.clone()
    for r, flag in enumerate(ignore):
        if flag:
            m[r, eos] = float("-inf")
    tok = m.argmax(dim=-1)
    return tok, raw.gather(1, tok[:, None]).squeeze(1) - lse, lse


def logits(B, V, dtype, seed, eos=(), device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, generator=gen) * 3
    x[:, list(eos)] += 20.0  # eos the argmax of every row: masked rows must pick another
    return x.to(dtype).to(device)


@pytest.mark.parametrize("B,V,dtype", [(5, 5000, torch.float32), (3, 4096, torch.bfloat16),
                                       (2, 49152, torch.float32), (4, 37, torch.float16)])
def test_greedy_rows_match_argmax_and_logsumexp(kern, B, V, dtype):
    eos = [0, V - 1]
    x = logits(B, V, dtype, seed=B + V, eos=eos)
    ignore = [r % 2 == 0 for r in range(B)]
    tok, pair, lse = kern.greedy_rows(x, torch.tensor(ignore, dtype=torch.int32),
                                      torch.tensor(eos, dtype=torch.int32))
    want_tok, want_lp, want_lse = reference(x, ignore, eos)
    assert tok.dtype == torch.long and tok.tolist() == want_tok.tolist()
    assert pair[0].tolist() == [float(t) for t in want_tok.tolist()]
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pair[1].float(), want_lp, rtol=1e-5, atol=1e-5)
    unmasked = [r for r in range(B) if not ignore[r]]
    assert all(tok[r].item() in eos for r in unmasked)  # (eos wins where it is not masked)
    assert not any(tok[r].item() in eos for r in range(B) if ignore[r])


def test_ties_take_the_first_index_across_tiles_and_no_mask(kern):
    x = torch.zeros(3, 5000)
    x[0, 7] = x[0, 4500] = 2.0  # a tie in different tiles: the first
    x[1, 3000] = x[1, 3001] = 5.0  # a tie in one tile
    x[2] = -1.0  # all equal: index 0
    tok, pair, lse = kern.greedy_rows(x, None, None)
    assert tok.tolist() == [7, 3000, 0]
    torch.testing.assert_close(lse, torch.logsumexp(x, dim=-1))


def test_strided_rows_and_bad_arguments(kern):
    base = logits(4, 300, torch.float32, seed=1)
    x = base[:, :250]  # rows strided by 300
    tok, _, lse = kern.greedy_rows(x, None, None)
    assert tok.tolist() == x.argmax(dim=-1).tolist()
    torch.testing.assert_close(lse, torch.logsumexp(x, dim=-1))
    with pytest.raises(ValueError, match="contiguous"):
        kern.greedy_rows(base.t(), None, None)
    with pytest.raises(ValueError, match="eos"):
        kern.greedy_rows(base, torch.ones(4, dtype=torch.int32), torch.arange(9, dtype=torch.int32))
    with pytest.raises(ValueError, match="fp32"):
        kern.greedy_rows(base.double(), None, None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_kernel_on_a_gpu():
    from shoal.kernels import triton_sample

    eos = [2, 49151]
    for dtype in (torch.float32, torch.bfloat16):
        x = logits(256, 49152, dtype, seed=5, eos=eos, device="cuda")
        ignore = [r % 3 == 0 for r in range(256)]
        tok, pair, lse = triton_sample.greedy_rows(x, torch.tensor(ignore, dtype=torch.int32, device="cuda"),
                                                   torch.tensor(eos, dtype=torch.int32, device="cuda"))
        want_tok, want_lp, want_lse = reference(x, ignore, eos)
        assert tok.tolist() == want_tok.tolist()
        torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(pair[1].float(), want_lp, rtol=1e-5, atol=1e-4)
    # draws at Llama 3's vocabulary, bf16, 256 rows: the inverse CDF at u (fp64 reference)
    x = logits(256, 128256, torch.bfloat16, seed=6, device="cuda")
    gen = torch.Generator().manual_seed(8)
    rows = torch.randperm(256, generator=gen).tolist()
    temps = (0.2 + 1.5 * torch.rand(256, generator=gen)).tolist()
    us = torch.rand(256, generator=gen, dtype=torch.float64).tolist()
    got = triton_sample.draw_rows(x, meta(rows, temps, us, device="cuda")).tolist()
    want, cdf, target = draw_reference(x.cpu(), rows, temps, us)
    for r, (g, w) in enumerate(zip(got, want)):
        if g != w:
            assert abs(cdf[r, min(g, w)] - target[r]) <= 1e-6 * cdf[r, -1], (r, g, w)
    assert sum(g == w for g, w in zip(got, want)) >= 250


def draw_reference(x: torch.Tensor, rows, temps, us) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """`device_draw._inverse_cdf` in fp64 on the CPU: tokens, each row's cdf and target u * sum."""
    xs = x[rows].float() / torch.tensor(temps, dtype=torch.float32)[:, None]
    w = (xs - xs.amax(dim=-1, keepdim=True)).exp().double()
    cdf = w.cumsum(dim=-1)
    target = torch.tensor(us, dtype=torch.float64) * cdf[:, -1]
    tok = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)
    last = torch.searchsorted(cdf, cdf[:, -1:].contiguous(), right=False).squeeze(1)
    return torch.minimum(tok, last).tolist(), cdf, target


def meta(rows, temps, us, device="cpu"):
    return torch.tensor([[float(r) for r in rows], temps, us], dtype=torch.float64, device=device)


@pytest.mark.parametrize("V,dtype", [(5000, torch.float32), (4096, torch.bfloat16), (37, torch.float16)])
def test_draws_are_the_inverse_cdf_at_u(kern, V, dtype):
    """Each row's token is the first whose running weight passes u * total (fp64 reference),
    unless the reference's crossing is within rounding of the target."""
    x = logits(6, V, dtype, seed=V)
    rows, temps = [5, 0, 3, 3, 1, 2], [1.0, 0.7, 1.3, 1.3, 0.05, 2.0]
    us = [0.0, 0.25, 0.5, 0.999999, 0.75, 0.123456789]
    got = kern.draw_rows(x, meta(rows, temps, us)).tolist()
    want, cdf, target = draw_reference(x, rows, temps, us)
    for r, (g, w) in enumerate(zip(got, want)):
        if g != w:  # only where the crossing is a rounding question
            assert abs(cdf[r, min(g, w)] - target[r]) <= 1e-6 * cdf[r, -1], (r, g, w)
    assert got[0] == 0  # u = 0: the first id of weight > 0 (every weight is, at these logits)
    assert all(0 <= g < V for g in got)


def test_draws_follow_the_softmax_and_skip_masked_ids(kern):
    """4,000 draws from one row of five logits at T = 1 land as softmax(x) (each share within 3
    standard errors); an id at -inf is never drawn; temperature sharpens the distribution."""
    x = torch.tensor([[1.0, 2.0, 0.5, float("-inf"), 1.5]])
    gen = torch.Generator().manual_seed(7)
    n = 4000
    us = torch.rand(n, generator=gen, dtype=torch.float64).tolist()
    got = kern.draw_rows(x, meta([0] * n, [1.0] * n, us))
    counts = torch.bincount(got, minlength=5).double() / n
    p = torch.softmax(x[0], dim=-1).double()
    assert counts[3] == 0
    assert torch.all((counts - p).abs() <= 3 * (p * (1 - p) / n).sqrt() + 1e-9), (counts, p)
    cold = kern.draw_rows(x, meta([0] * 200, [0.05] * 200, us[:200]))
    assert torch.bincount(cold, minlength=5)[1] >= 199  # T = 0.05: the argmax, 200 of 200 (p ~ 1 - 5e-5)


def test_draw_arguments(kern):
    x = logits(2, 64, torch.float32, seed=2)
    with pytest.raises(ValueError, match="meta"):
        kern.draw_rows(x, torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous"):
        kern.draw_rows(x.t(), meta([0], [1.0], [0.5]))
    assert kern.draw_rows(x, meta([], [], [])).shape == (0,)
