"""An int8 KV cache through the kernels: the write's rounding bit for bit, and decode and prefill
attention over it against a float64 reference on the dequantized cache (q * scale), with a row's
bits independent of the other rows and of the chunking."""

from __future__ import annotations

import pytest
import torch

from shoal import kernels

BF = torch.bfloat16


@pytest.fixture(autouse=True)
def _ready():
    if kernels.library() is None or not kernels.library().shoal_prefill_attention_isa():
        pytest.skip("no int8 KV kernels on this CPU (AVX-512)")


def rand(*shape, seed=0, scale=1.0, dtype=BF):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


class Int8Cache:
    """(Hkv, S, D) int8 K and V with (Hkv, S) scales, filled by `kernels.cache_write`."""

    def __init__(self, hkv: int, num_slots: int, d: int = 64) -> None:
        self.d = d
        self.k = torch.zeros(hkv, num_slots, d, dtype=torch.int8)
        self.v = torch.zeros_like(self.k)
        self.ks = torch.zeros(hkv, num_slots)
        self.vs = torch.zeros(hkv, num_slots)
        self.perm = torch.randperm(num_slots, generator=torch.Generator().manual_seed(9))
        self.used = 0

    def add(self, n: int, seed: int) -> torch.Tensor:
        """n new tokens' random keys and values written at scattered slots -> those slots."""
        slots = self.perm[self.used:self.used + n]
        self.used += n
        hkv = self.k.shape[0]
        kernels.cache_write(rand(n, hkv, self.d, seed=seed, scale=2.0), rand(n, hkv, self.d, seed=seed + 1),
                            slots, self.k, self.v, self.ks, self.vs)
        return slots

    def dequant(self, slots):  # (Hkv, L, D) float64 keys and values as stored
        k = self.k[:, slots].double() * self.ks[:, slots, None].double()
        v = self.v[:, slots].double() * self.vs[:, slots, None].double()
        return k, v


def reference(q, k, v, positions, window=None):
    """q (T, H, D) at `positions` over keys/values (Hkv, L, D) -> (T, H, D) float64."""
    g = q.shape[1] // k.shape[0]
    out = torch.empty(q.shape, dtype=torch.float64)
    for i, pos in enumerate(positions):
        lo = 0 if not window else max(0, pos - window + 1)
        for h in range(q.shape[1]):
            s = k[h // g, lo:pos + 1] @ q[i, h].double() / q.shape[2] ** 0.5
            out[i, h] = torch.softmax(s, 0) @ v[h // g, lo:pos + 1]
    return out


@pytest.mark.parametrize("d", [64, 128, 24])
@pytest.mark.parametrize("dtype", [torch.float32, BF])
def test_cache_write_rounds_each_row_to_int8_with_its_scale(dtype, d):
    hkv, n = 3, 9
    k, v = rand(n, hkv, d, seed=1, scale=3.0, dtype=dtype), rand(n, hkv, d, seed=2, dtype=dtype)
    k[4, 1] = 0  # an all-zero row: q = 0, scale 0
    kc, vc = torch.zeros(hkv, 32, d, dtype=torch.int8), torch.zeros(hkv, 32, d, dtype=torch.int8)
    ks, vs = torch.full((hkv, 32), -1.0), torch.full((hkv, 32), -1.0)
    slots = torch.tensor([3, 7, 0, 31, 12, 13, 14, 5, 6])
    kernels.cache_write(k, v, slots, kc, vc, ks, vs)
    for x, c, sc in ((k, kc, ks), (v, vc, vs)):
        xf = x.float().transpose(0, 1)  # (Hkv, n, D)
        amax = xf.abs().amax(-1)  # (Hkv, n)
        # (a true division: `127.0 / amax` would be reciprocal-then-multiply in PyTorch)
        inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
        want = torch.round(xf * inv[..., None]).clamp(-127, 127).to(torch.int8)
        assert torch.equal(c[:, slots], want)
        assert torch.equal(sc[:, slots], amax / 127.0)
        assert (c[:, slots].double() * sc[:, slots, None] - xf).abs().max() <= amax.max() / 254 * 1.001
    assert not kc[1, slots[4]].any() and ks[1, slots[4]] == 0
    untouched = torch.ones(32, dtype=torch.bool)
    untouched[slots] = False
    assert (ks[:, untouched] == -1).all() and not kc[:, untouched].any()
    with pytest.raises(ValueError, match="scales"):
        kernels.cache_write(k, v, slots, kc, vc)  # an int8 cache without its scales


@pytest.mark.parametrize("heads", [(9, 3), (8, 1), (4, 4), (10, 2)])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("d", [64, 128])
def test_decode_attention_over_int8_cache(heads, window, d):
    h, hkv = heads
    cache = Int8Cache(hkv, 1024, d)
    lens = [40, 1, 17, 33, 300, 5]  # (300: past one 256-key block of int32 sums)
    ctx = [cache.add(n, seed=10 + i) for i, n in enumerate(lens)]
    q = rand(len(lens), h, d, seed=4)
    offsets = torch.tensor([0] + lens).cumsum(0)
    out = torch.zeros_like(q)
    kernels.decode_attention(q, cache.k, cache.v, torch.arange(len(lens)), torch.cat(ctx), offsets, window, out,
                             ks=cache.ks, vs=cache.vs)
    for i, slots in enumerate(ctx):
        k, v = cache.dequant(slots)
        want = reference(q[i:i + 1], k, v, [slots.numel() - 1], window)
        torch.testing.assert_close(out[i:i + 1].double(), want, atol=1e-2, rtol=1e-2)
    alone = torch.zeros_like(q)  # a row's bits alone = among the others
    kernels.decode_attention(q, cache.k, cache.v, torch.tensor([4]), ctx[4], torch.tensor([0, 300]), window, alone,
                             ks=cache.ks, vs=cache.vs)
    assert torch.equal(alone[4], out[4])


def test_decode_attention_int8_refuses_other_shapes():
    cache = Int8Cache(1, 64)
    slots = cache.add(4, seed=1)
    q, out = rand(1, 9, 64), torch.zeros(1, 9, 64, dtype=BF)  # 9 query heads on one kv head
    with pytest.raises(ValueError, match="decode_attention"):
        kernels.decode_attention(q, cache.k, cache.v, torch.tensor([0]), slots, torch.tensor([0, 4]), None, out,
                                 ks=cache.ks, vs=cache.vs)


@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("d", [64, 128])
def test_prefill_attention_over_int8_cache(window, d):
    cache = Int8Cache(3, 1024, d)
    a = cache.add(150, seed=20)  # a 150-token prompt whose last 60 are this step's chunk
    b = cache.add(37, seed=22)  # a whole 37-token prompt
    q = rand(97, 9, d, seed=5)
    out = torch.full_like(q, float("nan"))
    args = (torch.tensor([0, 60]), torch.tensor([60, 37]), torch.cat([a, b]), torch.tensor([0, 150, 187]))
    kernels.prefill_attention(q, cache.k, cache.v, *args, window, out, cache.ks, cache.vs)
    for rows, slots, first in ((slice(0, 60), a, 90), (slice(60, 97), b, 0)):
        k, v = cache.dequant(slots)
        want = reference(q[rows], k, v, range(first, slots.numel()), window)
        torch.testing.assert_close(out[rows].double(), want, atol=2e-2, rtol=2e-2)
    pieces, at = [], 0  # the 37-token prompt in chunks: the same bits
    for n in (5, 1, 31):
        o = torch.zeros(n, 9, d, dtype=BF)
        kernels.prefill_attention(q[60 + at:60 + at + n], cache.k, cache.v, torch.tensor([0]), torch.tensor([n]),
                                  b[:at + n], torch.tensor([0, at + n]), window, o, cache.ks, cache.vs)
        pieces.append(o)
        at += n
    assert torch.equal(torch.cat(pieces), out[60:97])
