"""`kernels.prefill_attention`: prompt chunks over a paged bf16 cache, against a float64
reference, and a row's bits independent of the chunking and of the other chunks."""

from __future__ import annotations

import pytest
import torch

from shoal import kernels

BF = torch.bfloat16


@pytest.fixture(autouse=True)
def _ready():
    q, kc = torch.zeros(1, 1, 64, dtype=BF), torch.zeros(1, 1, 64, dtype=BF)
    if kernels.library() is None or not kernels.prefill_attention_ready(q, kc):
        pytest.skip("no prefill attention body on this CPU (AVX-512); the engine keeps SDPA")


def rand(*shape, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(BF)


class Cache:
    """A paged cache (Hkv, S, 64) with each sequence's keys at scattered slots."""

    def __init__(self, hkv: int, num_slots: int, seed: int = 0, d: int = 64) -> None:
        self.k = rand(hkv, num_slots, d, seed=seed, scale=2.0)
        self.v = rand(hkv, num_slots, d, seed=seed + 1)
        self.perm = torch.randperm(num_slots, generator=torch.Generator().manual_seed(seed + 2))
        self.used = 0

    def slots(self, n: int) -> torch.Tensor:
        s = self.perm[self.used:self.used + n]
        self.used += n
        return s


def reference(q, cache, q_start, q_len, slots, window):
    """out rows of one chunk in float64: softmax(q k^T / sqrt(D)) v over positions <= the row's."""
    hkv = cache.k.shape[0]
    g = q.shape[1] // hkv
    n_keys = slots.numel()
    a = n_keys - q_len
    d = q.shape[2]
    out = torch.empty(q_len, q.shape[1], d, dtype=torch.float64)
    k = cache.k[:, slots].double()  # (Hkv, L, 64)
    v = cache.v[:, slots].double()
    for i in range(q_len):
        pos = a + i
        lo = 0 if not window else max(0, pos - window + 1)
        for h in range(q.shape[1]):
            s = (k[h // g, lo:pos + 1] @ q[q_start + i, h].double()) / d ** 0.5
            out[i, h] = torch.softmax(s, 0) @ v[h // g, lo:pos + 1]
    return out


def run(q, cache, chunks, window=None):
    """chunks: (q_start, q_len, slots) -> out (N, H, 64) from one kernel call."""
    out = torch.full_like(q, float("nan"))
    lens = [s.numel() for _, _, s in chunks]
    kernels.prefill_attention(
        q, cache.k, cache.v, torch.tensor([c[0] for c in chunks]), torch.tensor([c[1] for c in chunks]),
        torch.cat([s for _, _, s in chunks]), torch.tensor([0] + lens).cumsum(0), window, out)
    return out


@pytest.mark.parametrize("heads", [(9, 3), (4, 4), (8, 1), (16, 1)])
@pytest.mark.parametrize("window", [None, 5, 40])
@pytest.mark.parametrize("d", [64, 128])
def test_matches_float64_softmax_attention(heads, window, d):
    h, hkv = heads
    cache = Cache(hkv, 1024, d=d)
    # chunks: a whole prompt, a later chunk of a longer context (its first keys cached earlier),
    # a one-token prompt, and one whose length is not a multiple of 16 or 32
    specs = [(70, 70), (33, 150), (1, 1), (45, 45), (1, 97)]  # (q_len, keys)
    chunks, start = [], 0
    for q_len, n_keys in specs:
        chunks.append((start, q_len, cache.slots(n_keys)))
        start += q_len
    q = rand(start, h, d, seed=5)
    out = run(q, cache, chunks, window)
    for q_start, q_len, slots in chunks:
        want = reference(q, cache, q_start, q_len, slots, window)
        got = out[q_start:q_start + q_len].double()
        # bf16 probabilities (2^-9 relative) and the bf16 output (2^-8)
        torch.testing.assert_close(got, want, atol=1.5e-2, rtol=1e-2)


def test_strided_query_rows_and_untouched_rows():
    cache = Cache(3, 256)
    qkv = rand(20, 15 * 64, seed=3)  # q|k|v of a fused projection: q rows are strided
    q = qkv[:, :9 * 64].view(20, 9, 64)
    out = torch.zeros(20, 9, 64, dtype=BF)
    slots = cache.slots(12)
    kernels.prefill_attention(q, cache.k, cache.v, torch.tensor([4]), torch.tensor([12]), slots,
                              torch.tensor([0, 12]), None, out)
    want = reference(q, cache, 4, 12, slots, None)
    torch.testing.assert_close(out[4:16].double(), want, atol=1.5e-2, rtol=1e-2)
    assert not out[:4].any() and not out[16:].any()  # rows of no chunk are left alone


@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("d", [64, 128])
def test_row_bits_do_not_depend_on_chunking_or_company(window, d):
    cache = Cache(3, 512, d=d)
    slots = cache.slots(130)
    q = rand(130, 9, d, seed=7)
    whole = run(q, cache, [(0, 130, slots)], window)
    # the same prompt in chunks of 37, 1, 60 and 32 rows (each chunk's keys: all up to its end)
    pieces, at = [], 0
    for n in (37, 1, 60, 32):
        got = run(q, cache, [(at, n, slots[:at + n])], window)
        pieces.append(got[at:at + n])
        at += n
    assert torch.equal(torch.cat(pieces), whole)
    # among other chunks, placed after them in the batch
    other = cache.slots(77)
    q2 = torch.cat([rand(77, 9, d, seed=8), q])
    mixed = run(q2, cache, [(0, 77, other), (77, 130, slots)], window)
    assert torch.equal(mixed[77:], whole)


def test_bad_chunks_raise():
    cache = Cache(3, 64)
    q, out = rand(8, 9, 64), torch.empty(8, 9, 64, dtype=BF)
    slots = cache.slots(8)
    ok = dict(q_start=torch.tensor([0]), q_len=torch.tensor([8]), slots=slots, offsets=torch.tensor([0, 8]))
    bad = [dict(ok, q_len=torch.tensor([9])),  # more queries than keys
           dict(ok, q_start=torch.tensor([1])),  # rows past N
           dict(ok, slots=slots + 64),  # slots outside the cache
           dict(ok, offsets=torch.tensor([0, 7]))]  # offsets not ending at the slots
    for kw in bad:
        with pytest.raises(ValueError, match="prefill_attention"):
            kernels.prefill_attention(q, cache.k, cache.v, window=None, out=out, **kw)
    kernels.prefill_attention(q, cache.k, cache.v, window=None, out=out, **ok)


@pytest.mark.parametrize("d", [64, 128])
def test_amx_body_agrees_with_the_dot_product_body(d):
    """On a CPU with AMX the tiles serve prefill (the packed products' body decides); forced to
    the VDPBF16PS body the same chunks give outputs within bf16 rounding, each row's own bits
    independent of its company on both bodies."""
    from shoal.kernels import qlinear

    if qlinear.body() != "amx":
        pytest.skip("no AMX on this CPU")
    lib = kernels.library()
    cache = Cache(3, 1024, d=d, seed=11)
    specs = [(100, 100), (40, 300), (1, 65), (17, 17)]  # a long context: several 4-block passes
    chunks, start = [], 0
    for q_len, n_keys in specs:
        chunks.append((start, q_len, cache.slots(n_keys)))
        start += q_len
    q = rand(start, 9, d, seed=12)
    assert lib.shoal_prefill_attention_isa() == 3
    tiles = run(q, cache, chunks, None)
    with qlinear.force_body("avx512-bf16"):
        assert lib.shoal_prefill_attention_isa() == 2
        dots = run(q, cache, chunks, None)
    assert lib.shoal_prefill_attention_isa() == 3
    torch.testing.assert_close(tiles.double(), dots.double(), atol=8e-3, rtol=8e-3)
    alone = run(q, cache, chunks[1:2], None)
    assert torch.equal(alone[100:140], tiles[100:140])
