"""How a step's adapter tokens are grouped for the multi-LoRA products (`LoRALinear`).

`GroupPlan` decides, once per step on the host, which tokens are served in place as long runs
(prefill chunks) and which go into one-slot tiles (decodes); `lora_deltas` is the batched
shrink-expand product both paths use, row-invariant on CPU; `add_grouped_` applies a step's
deltas to one layer or to a `LoRAGroup` (the parts of a fused projection, one shrink for all).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import kernels

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


def lora_deltas(x: torch.Tensor, a: torch.Tensor, bs: list[torch.Tensor | None], scales: list[torch.Tensor],
                out_dtype: torch.dtype, min_rows: int = 1) -> list[torch.Tensor | None]:
    """The LoRA deltas of n layers fed the same rows, S groups of rows each: x (S, T, K);
    a (S, n*R, K) their A slots stacked (layer i owns rows i*R..(i+1)*R-1); bs[i] (S, R, N_i)
    or None (layer i skipped); scales[i] (S,) -> [(S, T, N_i) in out_dtype, or None].

    Semantics: delta_i[s] = (scales[i][s] * (x[s] @ a[s, iR:(i+1)R].T)) @ bs[i][s], rounded once
    to out_dtype. One shrink product serves all n layers (the parts of a fused q/k/v or gate/up
    projection read x once), then one expand per layer.
    On CPU the products run in fp32 whatever the input dtype (the engine keeps its slots in
    fp32): bf16 bmm of these thin shapes (R = 8 columns, one row per tile when decoding) ran
    2.5x slower than fp32 (32 adapters, one decode row each, 30 layers: 34 vs 13.4 ms; torch
    2.13, 2-core AVX-512 EPYC). Groups shorter than `min_rows` are padded (copies of their last
    row), so that with min_rows = MIN_ROWS a row's bits do not depend on how many rows and
    groups share the call (batch invariance).
    """
    ct = torch.float32 if x.device.type == "cpu" else x.dtype
    s, t, k = x.shape
    if x.dtype == out_dtype and kernels.usable(x, a):  # CPU: each row alone, in C++
        return _lora_deltas_kernel(x, a, bs, scales)
    if t < min_rows:
        xp = x.new_empty((s, min_rows, k), dtype=ct)  # (S, min_rows, K), cast and padded in one copy
        xp[:, t:].copy_(x[:, -1:].expand(s, min_rows - t, k))
        xp[:, :t].copy_(x)
        x = xp
    # 1) shrink (S, T', K) @ (S, K, n*R) -> (S, T', n*R)
    xa = torch.bmm(x.to(ct), a.to(ct).transpose(1, 2))
    r = a.shape[1] // len(bs)
    out: list[torch.Tensor | None] = []
    for i, (b, scale) in enumerate(zip(bs, scales)):
        if b is None:
            out.append(None)
            continue
        # 2) scale, then expand (S, T', R) @ (S, R, N_i) -> (S, T', N_i); padding rows dropped
        xi = xa[:, :, i * r:(i + 1) * r] * scale.to(ct).view(s, 1, 1)
        out.append(torch.bmm(xi, b.to(ct))[:, :t].to(out_dtype))
    return out


def _lora_deltas_kernel(x: torch.Tensor, a: torch.Tensor, bs: list[torch.Tensor | None],
                        scales: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """`lora_deltas` through `kernels.lora_bgmv` (group s = slot s; rows need no padding)."""
    s, t, k = x.shape
    r = a.shape[1] // len(bs)
    wt = a.dtype if a.dtype in (torch.float32, torch.bfloat16) else torch.float32  # slots' dtype
    a = a.to(wt)
    if a.stride(2) != 1 or a.stride(1) != k:
        a = a.contiguous()
    live = [i for i, b in enumerate(bs) if b is not None]
    outs = [x.new_empty((s * t, bs[i].shape[2])) for i in live]
    kernels.lora_bgmv(x.reshape(s * t, k), torch.arange(s).repeat_interleave(t),
                      [a[:, i * r:(i + 1) * r] for i in live], [bs[i].to(wt).contiguous() for i in live],
                      [scales[i].expand(s) for i in live], [torch.full((s,), r) for i in live], outs,
                      accumulate=False)
    done = dict(zip(live, outs))
    return [done[i].view(s, t, -1) if i in done else None for i in range(len(bs))]


def add_grouped_(x2: torch.Tensor, ys: list[torch.Tensor], layers: list, a: torch.Tensor,
                 g: GroupPlan) -> None:
    """ys[i] += layers[i]'s LoRA delta for every adapter token of a packed step (in place).

    x2 (N, in) the layers' common input; ys[i] (N, out_i), possibly column slices of one fused
    output; layers: LoRALinear (`shoal.lora.layers`) sharing one mapping; a: their A slots
    stacked (max_loras, n*R, in) (`LoRAGroup`; one layer: its own `lora_a_stacked`).
    Long runs (prefill chunks) are served in place, the rest (decodes) in tiles of one slot each,
    gathered only when the step is not slot-ordered (BGMV/SGMV-style). Work is G tokens x rank
    (not N x every slot), weights of slots outside the batch are not read, and a row's
    arithmetic does not depend on the other rows: each tile or run is its own product, padded
    to `min_rows` (batch invariance).
    """
    live = [any(layer.ranks[s] for s in g.slots) for layer in layers]
    if not any(live):
        return  # no adapter in the batch targets these layers
    min_rows, dtype, k = layers[0].mapping.min_rows, ys[0].dtype, x2.shape[1]
    a0 = layers[0].lora_a_stacked
    q8 = a0.dtype == torch.int8  # int8 slots (`LoRALinear`): the kernel's only
    if (q8 or a0.dtype in (torch.float32, torch.bfloat16)) and a0.is_cpu and kernels.usable(x2, *ys):
        # CPU: every adapter token in one kernel call, its slot's weights read in place (no
        # tiles, padding or gathers); each row computed alone (batch invariant by construction)
        on = tuple(i for i, live_i in enumerate(live) if live_i)
        key = (on, *(t.data_ptr() for i in on for t in (layers[i].lora_a_stacked, layers[i].lora_b_stacked)))
        plan = layers[0].bgmv.get(key)
        if plan is None:  # made once per layer group (the slot buffers are written in place)
            asc = [layers[i].lora_a_qscale for i in on] if q8 else None
            plan = layers[0].bgmv[key] = kernels.BGMVLayers(
                [layers[i].lora_a_stacked for i in on], [layers[i].lora_b_stacked for i in on],
                [layers[i].scale_f32 for i in on], [layers[i].rank_t for i in on], asc,
                [layers[i].lora_b_qscale for i in on] if q8 else None)
        plan(x2, layers[0].mapping.slot_tensor(), [ys[i] for i in on], accumulate=True)
        return
    if q8:
        raise RuntimeError("int8 LoRA slots are read by the CPU kernels only (lora_dtype int8)")
    if a is None:  # slot-major slots (`slot_major_`): no stacked A, each layer from its own views
        for layer, y in zip(layers, ys):
            add_grouped_(x2, [y], [layer], layer.lora_a_stacked, g)
        return
    # 1) runs: each run's rows of x in place, its slot's weights as views
    for s, rows in g.runs:
        bs = [layer.lora_b_stacked[s:s + 1] if layer.ranks[s] else None for layer in layers]
        if not any(b is not None for b in bs):
            continue
        deltas = lora_deltas(x2[rows].unsqueeze(0), a[s:s + 1], bs,
                             [layer.scaling[s:s + 1] for layer in layers], dtype, min_rows)
        for y, d in zip(ys, deltas):
            if d is not None:
                y[rows].add_(d[0])  # (n, out_i)
    tiles, rows = g.tile_slots.numel(), g.rows
    if not tiles:
        return
    # 2) tiles (tiles*rows, in): a view of x when the step is slot-ordered, else gathered
    if g.span is not None:
        xp = x2[g.span]
    else:
        xp = x2.new_zeros(tiles * rows, k)
        xp.index_copy_(0, g.dst, x2.index_select(0, g.tok))
    # 3) each tile's A, B and scaling: the stacked buffers themselves when tile t is slot t
    pick = (lambda t: t) if g.all_slots else (lambda t: t.index_select(0, g.tile_slots))  # noqa: E731
    bs = [pick(layer.lora_b_stacked) if on else None for layer, on in zip(layers, live)]
    deltas = lora_deltas(xp.view(tiles, rows, k), pick(a), bs, [pick(layer.scaling) for layer in layers],
                         dtype, min_rows)
    # 4) each token's delta onto its row of y (rows are distinct: deterministic)
    for y, d in zip(ys, deltas):
        if d is None:
            continue
        d = d.reshape(tiles * rows, y.shape[1])
        if g.span is not None:
            y[g.span].add_(d)
        else:
            y.index_add_(0, g.tok, d.index_select(0, g.dst))


def add_indexed_(x2: torch.Tensor, ys: list[torch.Tensor], layers: list, a: torch.Tensor,
                 idx: torch.Tensor) -> None:
    """ys[i] += layers[i]'s LoRA delta, each token's slot read from idx (N,) (-1 = base), with
    shapes fixed by N alone and no host-side plan: the form a captured CUDA graph can hold
    (`shoal.engine.decode_graphs`), where the step's slots are a tensor refreshed per replay.

    x2 (N, in); ys[i] (N, out_i); a: the layers' A slots stacked (max_loras, n*R, in). Each
    token gathers its slot's A and B (BGMV-style, as tensors: N x R x (in + out) values per
    layer), so it costs more than `add_grouped_` and is used only where shapes must not change.
    Semantics: ys[i][t] += scaling_i[s] * (x2[t] @ A_i[s].T) @ B_i[s] for s = idx[t] >= 0.
    """
    if a.dtype == torch.int8:
        raise RuntimeError("int8 LoRA slots are read by the CPU kernels only (lora_dtype int8)")
    on = idx >= 0  # (N,)
    s = idx.clamp(min=0)
    ct = a.dtype
    # 1) shrink (N, 1, in) @ (N, in, n*R) -> (N, 1, n*R), one product for all n layers
    xa = torch.bmm(x2.to(ct)[:, None, :], a.index_select(0, s).transpose(1, 2))
    r = a.shape[1] // len(layers)
    for i, (layer, y) in enumerate(zip(layers, ys)):
        # 2) scale (0 for base tokens), expand (N, 1, R) @ (N, R, out_i), add in place
        scale = torch.where(on, layer.scaling.index_select(0, s), 0.0).to(ct)  # (N,)
        xi = xa[:, :, i * r:(i + 1) * r] * scale.view(-1, 1, 1)
        y.add_(torch.bmm(xi, layer.lora_b_stacked.index_select(0, s))[:, 0].to(y.dtype))


def slot_major_(layers: list) -> torch.Tensor:
    """Lay the A and B slots of `layers` (fed one input, in this order) out slot by slot: one
    (max_loras, total) buffer whose row s is slot s's [A_1 B_1 A_2 B_2 ...], the order in which
    the CPU kernel reads a token's weights (`kernels.lora_bgmv`: per layer the shrink, then the
    expand), so each token's slot is one run of memory instead of 2 x len(layers) runs in as many
    buffers. Each layer's `lora_a_stacked` and `lora_b_stacked` become views of it (set_lora
    writes through); the values and the kernel's arithmetic are unchanged. Returns the buffer.
    Measured (AMD EPYC Zen 4, 2 threads; 30 layers x 4 groups, rank 8, 32 tokens each on its own
    slot, 64 MB read between steps, both layouts in one process, 40 steps each, three runs):
    median 8.68-8.82 -> 7.84-8.09 ms; [A_1 A_2 .. | B_1 B_2 ..] instead: 8.70-9.14 -> 8.38-8.94.
    """
    first = layers[0].lora_a_stacked
    n, r = first.shape[:2]
    total = sum(r * (layer.in_features + layer.out_features) for layer in layers)
    buf = first.new_zeros(n, total)
    off = 0
    for layer in layers:
        for name, width in (("lora_a_stacked", layer.in_features), ("lora_b_stacked", layer.out_features)):
            view = buf.as_strided((n, r, width), (total, width, 1), off)  # (max_loras, max_rank, width)
            view.copy_(getattr(layer, name))
            setattr(layer, name, view)
            off += r * width
    return buf


class LoRAGroup:
    """LoRA layers fed the same input (the parts of a fused q/k/v or gate/up projection,
    `shoal.model.fused`): their A slots live in one (max_loras, n * max_rank, in) buffer, each
    layer's `lora_a_stacked` a view of its rows, so one shrink product serves them all
    (`add_grouped_`). Made by `shoal.lora.layers.apply_lora`. Measured for 32 one-row decode
    tiles over 30 layers: 26.8 -> 23.0 ms; a 4 x 128-token prefill: 50.6 -> 43.9 ms (LoRA only).
    `slot_major` (where the CPU kernel reads the slots): all their A and B slots in one buffer
    slot by slot instead (`slot_major_`, `self.slots`), `self.a` None: the kernel takes each
    layer's views in one call, the PyTorch paths serve the parts one by one.
    """

    def __init__(self, layers: list, slot_major: bool = False) -> None:
        first = layers[0].lora_a_stacked
        n, r, k = first.shape
        self.layers = tuple(layers)
        for layer in layers:
            layer.lora_group = self
        if slot_major:  # the CPU kernel's layout (`slot_major_`): no stacked A; a kernel call serves all
            self.a = self.a_qscale = None
            self.slots = slot_major_(layers)
            return
        self.a = first.new_zeros(n, len(layers) * r, k)
        q8 = first.dtype == torch.int8  # and A's row scales likewise (`LoRALinear`)
        self.a_qscale = layers[0].lora_a_qscale.new_zeros(n, len(layers) * r) if q8 else None
        for i, layer in enumerate(layers):
            self.a[:, i * r:(i + 1) * r].copy_(layer.lora_a_stacked)
            layer.lora_a_stacked = self.a[:, i * r:(i + 1) * r]  # set_lora writes through the view
            if q8:
                self.a_qscale[:, i * r:(i + 1) * r].copy_(layer.lora_a_qscale)
                layer.lora_a_qscale = self.a_qscale[:, i * r:(i + 1) * r]

    def add_(self, x: torch.Tensor, ys: list[torch.Tensor]) -> None:
        """ys[i] (..., out_i) += layers[i]'s delta; x (..., in) their common input."""
        mapping = self.layers[0].mapping
        lead = tuple(x.shape[:-1])
        if mapping.graph_index is not None and self.a is not None:
            add_indexed_(x, ys, list(self.layers), self.a, mapping.graph_index)
        elif mapping.grouped and lead == mapping.shape and len(lead) == 1:
            add_grouped_(x, ys, list(self.layers), self.a, mapping.groups())
        else:  # unpacked inputs: layer by layer (the A views hold the same weights)
            for layer, y in zip(self.layers, ys):
                layer.add_lora_(x, y)
