"""How a step's adapter tokens are grouped for the multi-LoRA products (`LoRALinear`).

`GroupPlan` decides, once per step on the host, which tokens are served in place as long runs
(prefill chunks) and which go into one-slot tiles (decodes); `bmm_split_k` is the batched
product both paths use, with the split-K that keeps wide bf16 products row-invariant on CPU.
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


def bmm_split_k(x: torch.Tensor, w_t: torch.Tensor, k_chunk: int = 0) -> torch.Tensor:
    """torch.bmm(x (S, T, K), w_t (S, K, R)) -> (S, T, R); with k_chunk > 0 and K > k_chunk, the
    K axis is cut into equal chunks summed in fp32 (the split-K of `shoal.model.layers.linear`,
    for batch invariance of wide bf16 products on CPU)."""
    k = x.shape[-1]
    if k_chunk <= 0 or k <= k_chunk:
        return torch.bmm(x, w_t)
    step = -(-k // -(-k // k_chunk))
    y = None
    for c in range(0, k, step):
        part = torch.bmm(x[..., c:c + step], w_t[:, c:c + step]).float()
        y = part if y is None else y.add_(part)
    return y.to(x.dtype)
