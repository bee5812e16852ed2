"""Row classes: how the engine cuts a step's bf16 CPU products so each row keeps its bits.

(For oneDNN's products. On a CPU with AMX the engine's bf16 layers run on our tile kernel
instead, `shoal.model.quant.PackedBF16Linear`, whose rows keep their bits at any count: no classes.)

oneDNN picks its bf16 kernel by the row count. On a CPU with AMX (measured: Xeon with AMX-BF16,
torch 2.13, 2 threads) products of 33+ rows take AMX tiles, whose sums round differently from
the AVX-512 kernel that 1..32 rows take; within each class a row's bits did not depend on the
row count or its position (every SmolLM2-135M shape; for AMX, 33..300 rows, and not for the
output layer at 384+ rows). So with batch invariance on, a step's rows go in two classes:

- decode rows (one token of a sequence) in products of at most `INVARIANT_ROWS` (32) rows: the
  one-row kernel, the same bits as the row alone;
- prefill rows (prompt chunks) in products of `AMX_MIN_ROWS`..`PREFILL_ROWS` rows (shorter blocks
  padded with zero rows): the AMX kernel, the same bits however the prompt was chunked. Only for
  layers whose shape passed `amx_class_consistent` when the engine started (else 32 rows too).

Outside an engine step (`step_rows` not active) every product takes at most 32 rows. On CPUs
without AMX both classes give the same bits, and the blocks only add calls.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

INVARIANT_ROWS = 32  # most rows of a one-row-kernel product
AMX_MIN_ROWS = 33  # fewest rows of a prefill-class product (shorter blocks are padded)
PREFILL_ROWS = 256  # most rows of a prefill-class product

_step: list[tuple[int, int]] = []  # (rows, decode rows) of the engine step being computed


@contextlib.contextmanager
def step_rows(n_rows: int, n_decode: int):
    """Within the block, products over `n_rows` rows treat rows [0, n_decode) as decode rows and
    the rest as prefill rows (the engine orders its flat batch that way)."""
    _step.append((n_rows, n_decode))
    try:
        yield
    finally:
        _step.pop()


def blocked(x: torch.Tensor, product: Callable[[torch.Tensor], torch.Tensor], max_rows: int,
            prefill_rows: int) -> torch.Tensor | None:
    """x (N, K) -> product over row blocks (see the module docstring), or None when one
    product over all rows is already in the right class."""
    n = x.shape[0]
    n_decode = _step[-1][1] if _step and _step[-1][0] == n else None
    if n_decode is None or prefill_rows <= 0 or n_decode == n:
        if n <= max_rows:
            return None
        return torch.cat([product(x[i:i + max_rows]) for i in range(0, n, max_rows)])
    if n_decode == 0 and AMX_MIN_ROWS <= n <= prefill_rows:
        return None  # one prefill-class product already
    parts = [product(x[i:min(i + max_rows, n_decode)]) for i in range(0, n_decode, max_rows)]
    for i in range(n_decode, n, prefill_rows):
        blk = x[i:i + prefill_rows]
        m = blk.shape[0]
        if m < AMX_MIN_ROWS:  # padded with zero rows (a row's result does not read the others)
            blk = torch.cat([blk, blk.new_zeros(AMX_MIN_ROWS - m, blk.shape[1])])
        parts.append(product(blk)[:m])
    return torch.cat(parts) if len(parts) > 1 else parts[0]


_consistent: dict[tuple, bool] = {}

# Row counts the start-up check runs: every count near the kernels' switch points (33..64),
# then every 8th and each power of two and its neighbours up to PREFILL_ROWS.
CHECK_ROWS = sorted(set(range(AMX_MIN_ROWS, 65)) | set(range(72, PREFILL_ROWS + 1, 8))
                    | {r for p in (128, 256) for r in (p - 1, p, p + 1) if AMX_MIN_ROWS <= r <= PREFILL_ROWS})


def _disk_cache() -> Path:
    from ..kernels.build import cache_dir, cpu_flags  # beside the compiled kernels, per CPU

    tag = hashlib.sha256(f"{torch.__version__} {cpu_flags()}".encode()).hexdigest()[:16]
    return cache_dir() / f"row_classes-{tag}.json"


def amx_class_consistent(product: Callable[[torch.Tensor], torch.Tensor], in_features: int,
                         key: tuple) -> bool:
    """Does `product` give every row the same bits in any product of AMX_MIN_ROWS..PREFILL_ROWS
    rows (the counts in CHECK_ROWS), at any position? Checked once per `key` (a layer shape) and
    CPU, remembered on disk beside the kernels (a check costs 0.4-1 s of products on 2 cores)."""
    if key in _consistent:
        return _consistent[key]
    name = repr(key)
    try:
        stored = json.loads(_disk_cache().read_text())
    except (OSError, ValueError):
        stored = {}
    if name not in stored:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(PREFILL_ROWS, in_features, generator=g).to(torch.bfloat16)
        ref = product(x)
        ok = all(torch.equal(product(x[:m]), ref[:m]) for m in CHECK_ROWS)
        shifted = torch.cat([x[7:PREFILL_ROWS // 2], x[:7]])  # rows 0..6 last in a 128-row product
        stored[name] = ok and torch.equal(product(shifted)[-7:], ref[:7])
        with contextlib.suppress(OSError):  # a read-only cache only costs the check next time
            path = _disk_cache()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(stored))
            os.replace(tmp, path)
    _consistent[key] = bool(stored[name])
    return _consistent[key]
