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
