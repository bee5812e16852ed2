"""Row classes of the engine's bf16 CPU products (`shoal.model.row_classes`): decode rows in
blocks of at most 32 rows, prefill rows in padded AMX-sized blocks, each row with fixed bits."""

from __future__ import annotations

import pytest
import torch

from shoal.model.layers import linear
from shoal.model.packed import PackedWeight, bf16_packing_ok
from shoal.model.row_classes import (AMX_MIN_ROWS, INVARIANT_ROWS, PREFILL_ROWS, amx_class_consistent, blocked,
                                     step_rows)


def recorder():
    sizes: list[int] = []

    def product(x):
        sizes.append(x.shape[0])
        return x * 2

    return sizes, product


def test_blocks_follow_the_step_rows():
    x = torch.arange(300 * 4, dtype=torch.float32).view(300, 4)
    sizes, product = recorder()
    assert blocked(x[:20], product, INVARIANT_ROWS, PREFILL_ROWS) is None  # outside a step: one product
    assert torch.equal(blocked(x[:70], product, INVARIANT_ROWS, PREFILL_ROWS), x[:70] * 2)
    assert sizes == [32, 32, 6]
    sizes.clear()
    with step_rows(300, 40):  # 40 decode rows, 260 prefill rows
        assert torch.equal(blocked(x, product, INVARIANT_ROWS, PREFILL_ROWS), x * 2)
        assert sizes == [32, 8, 256, AMX_MIN_ROWS]  # the last 4 prefill rows padded to 33
        sizes.clear()
        assert torch.equal(blocked(x, product, INVARIANT_ROWS, 0), x * 2)  # layer without the class
        assert sizes == [32] * 9 + [12]
    sizes.clear()
    with step_rows(12, 10):  # 2 prompt rows still take the prefill class
        assert torch.equal(blocked(x[:12], product, INVARIANT_ROWS, PREFILL_ROWS), x[:12] * 2)
    assert sizes == [10, AMX_MIN_ROWS]


@pytest.mark.skipif(not bf16_packing_ok(), reason="no native bf16 in oneDNN here: bf16 layers stay plain")
def test_each_class_gives_a_row_fixed_bits():
    """A SmolLM2-135M gate/up shape, packed bf16: a decode row has its one-row bits in any step;
    a prefill row has the same bits however many prefill rows share its block and wherever it
    sits (on CPUs where the shape passes the start-up check; on others the engine falls back to
    32-row blocks for prefill too)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3072, 576, generator=g).to(torch.bfloat16)
    p = PackedWeight.of(w, 1024)
    x = torch.randn(300, 576, generator=g).to(torch.bfloat16)
    consistent = amx_class_consistent(lambda xb: linear(xb, p), 576, ("test", 3072, 576))
    rows = PREFILL_ROWS if consistent else 0
    one = linear(x[:1], p)
    for n, n_decode in ((1, 1), (40, 40), (100, 3), (300, 35)):
        with step_rows(n, n_decode):
            y = linear(x[:n], p, max_rows=INVARIANT_ROWS, prefill_rows=rows)
        if n_decode:
            assert torch.equal(y[0], one[0]), (n, n_decode)
    # prefill row 0 of a prompt, alone in its chunk or after 99 others in a bigger step
    target = x[5:6]
    with step_rows(1, 0):
        alone = linear(target, p, max_rows=INVARIANT_ROWS, prefill_rows=rows)
    batch = torch.cat([x[100:199], target, x[200:250]])
    with step_rows(150, 20):
        mixed = linear(batch, p, max_rows=INVARIANT_ROWS, prefill_rows=rows)
    assert torch.equal(mixed[99], alone[0])
