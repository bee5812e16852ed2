"""How a step's adapter tokens are grouped for the multi-LoRA products (`LoRALinear`).

`GroupPlan` decides, once per step on the host, which tokens are served in place as long runs
(prefill chunks) and which go into one-slot tiles (decodes); `lora_delta` is the batched
shrink-expand product both paths use, row-invariant on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

TILE_CAP = 64  # most rows of one tile in the grouped product (a longer group is split)
LONG_RUN = 16  # a slot whose tokens are one contiguous run this long is served in place


@dataclass
class GroupPlan:
    """How a packed batch's adapter tokens are served: long runs in place, the rest in tiles.

    A slot whose tokens form one contiguous run of at least LONG_RUN rows (a prefill chunk, or
    many decodes of one adapter; the engine orders a step's tokens by slot) is a run: its rows
    of x are used in place. The other slots' tokens (decodes) go into tiles of `rows` rows,
    one slot per tile: tile t holds rows [t*rows, (t+1)*rows) of a zero-padded copy of their
    rows of x, and a slot with more than `rows` of them spans several tiles. Built once per
    step on the host.
    """

    runs: list[tuple[int, slice]]  # (slot, rows of x (N, in)) served in place
    tok: torch.Tensor  # (G,) rows of x in tiles, by slot then position
    dst: torch.Tensor  # (G,) their rows in the padded tile layout
    tile_slots: torch.Tensor  # (tiles,) slot of each tile
    slots: tuple[int, ...]  # distinct slots in the batch
    rows: int  # rows per tile
    all_slots: bool  # tile t is slot t for t < max_loras: the stacked buffers serve as they are
    span: slice | None  # tok is this range of x and fills the tiles with no padding: no copies

    @classmethod
    def build(cls, flat: Sequence[int], max_loras: int, cap: int, device) -> "GroupPlan":
        by_slot: dict[int, list[int]] = {}
        for i, s in enumerate(flat):
            if s >= 0:
                by_slot.setdefault(s, []).append(i)
        runs: list[tuple[int, slice]] = []
        rest: dict[int, list[int]] = {}
        for s, idx in sorted(by_slot.items()):
            if len(idx) >= LONG_RUN and idx[-1] - idx[0] + 1 == len(idx):
                runs.append((s, slice(idx[0], idx[-1] + 1)))
            else:
                rest[s] = idx
        rows = min(max((len(v) for v in rest.values()), default=1), cap)
        tok: list[int] = []
        dst: list[int] = []
        tiles: list[int] = []
        for s, idx in rest.items():
            for c in range(0, len(idx), rows):
                part = idx[c:c + rows]
                first = len(tiles) * rows
                tok.extend(part)
                dst.extend(range(first, first + len(part)))
                tiles.append(s)
        span = None
        if tok and len(tok) == len(tiles) * rows and tok == list(range(tok[0], tok[0] + len(tok))):
            span = slice(tok[0], tok[0] + len(tok))
        as_tensor = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
        return cls(runs, as_tensor(tok), as_tensor(dst), as_tensor(tiles), tuple(sorted(by_slot)), rows,
                   tiles == list(range(max_loras)), span)


# Fewest rows a group is given in the fp32 CPU products when batch invariance is on: below 4
# rows (and again at 1) bmm picks other kernels, and a row's bits would change with its tile's
# height (measured: torch 2.13, 2-core AVX-512 EPYC; rows >= 4 agreed bit for bit at every
# height tried, 4 to 512). Cost for 32 one-row decode tiles, 30 layers x 7 projections:
# 13.4 -> 19.6 ms per step (the bf16 products this replaced: 34 ms).
MIN_ROWS = 4


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
               out_dtype: torch.dtype, min_rows: int = 1) -> torch.Tensor:
    """The LoRA deltas of S groups of rows: (S, T, K) rows, a (S, R, K), b (S, R, N), scale (S,)
    -> (S, T, N) in out_dtype.

    Semantics: delta[s] = (scale[s] * (x[s] @ a[s].T)) @ b[s], rounded once to out_dtype.
    On CPU the products run in fp32 whatever the input dtype (the engine keeps its slots in
    fp32): bf16 bmm of these thin shapes (R = 8 columns, one row per tile when decoding) ran
    2.5x slower than fp32 (32 adapters, one decode row each, 30 layers: 34 vs 13.4 ms; torch
    2.13, 2-core AVX-512 EPYC). Groups shorter than `min_rows` are padded (copies of their last
    row), so that with min_rows = MIN_ROWS a row's bits do not depend on how many rows and
    groups share the call (batch invariance).
    """
    ct = torch.float32 if x.device.type == "cpu" else x.dtype
    s, t, k = x.shape
    if t < min_rows:
        xp = x.new_empty((s, min_rows, k), dtype=ct)  # (S, min_rows, K), cast and padded in one copy
        xp[:, t:].copy_(x[:, -1:].expand(s, min_rows - t, k))
        xp[:, :t].copy_(x)
        x = xp
    # 1) shrink (S, T', K) @ (S, K, R) -> (S, T', R), scaled per group
    xa = torch.bmm(x.to(ct), a.to(ct).transpose(1, 2))
    xa.mul_(scale.to(ct).view(s, 1, 1))
    # 2) expand (S, T', R) @ (S, R, N) -> (S, T', N); padding rows dropped
    return torch.bmm(xa, b.to(ct))[:, :t].to(out_dtype)
