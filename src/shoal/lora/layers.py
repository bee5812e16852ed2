"""Multi-LoRA linear layers: one base weight, `max_loras` stacked adapter slots, one batch.

`apply_lora` swaps the model's nn.Linear modules for `LoRALinear`s in place (same Parameters, so
state_dict names and tied weights do not change) and returns the `LoRAMapping` they all read:
the per-token (or per-row) slot index of the next forward, with -1 meaning the base model.
Packed engine batches are served by `GroupPlan` (`grouping.py`). No file formats, adapter
registry or eviction policy here (`peft_format.py`, `adapter_cache.py`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .. import kernels
from ..model.layers import linear
from .grouping import TILE_CAP, GroupPlan, LoRAGroup, add_grouped_, add_indexed_, slot_major_

# A step's plan: for each slot in the batch, the tokens of x (flattened to (N, in)) it owns,
# as a contiguous slice when the slot's tokens are adjacent, else as an index tensor.
Plan = list[tuple[int, "slice | torch.Tensor"]]

class LoRAMapping:
    """Which adapter slot each token uses in the next forward; shared by every LoRALinear.

    `set(slots)` takes (N,) slot indices for packed inputs x (N, in), (B,) per-row indices for
    x (B, T, in), or (B, T) per-token indices; -1 is the base model. The token plan (slices or
    index tensors per slot) is computed once per step and cached by x's leading shape.
    """

    def __init__(self, max_loras: int, max_rank: int, device: torch.device | str = "cpu") -> None:
        self.max_loras, self.max_rank = max_loras, max_rank
        self.device = torch.device(device)
        self.layers: dict[str, LoRALinear] = {}
        self.slots: tuple[int, ...] = ()  # flattened indices as set
        self.shape: tuple[int, ...] = (0,)
        self._runs: list[tuple[int, int, int]] = []  # (slot, start, end), slot >= 0 only
        self._plans: dict[tuple[int, ...], Plan] = {}
        self.grouped = False  # packed inputs: one tiled product for all slots (see LoRALinear)
        self.tile_cap = TILE_CAP
        self.min_rows = 1  # rows a grouped product is padded to (MIN_ROWS: batch invariance)
        self._groups: GroupPlan | None = None
        # (N,) slot per token as a tensor, set only while a fixed-shape forward runs (the CUDA
        # graph decode path): every LoRA layer then takes `add_indexed_`, for any slots
        self.graph_index: torch.Tensor | None = None

    def set(self, slots: Sequence[int] | torch.Tensor) -> None:
        """Set the slot indices for the next forward (-1 = base); host-side (a CUDA tensor is
        read back once), since the plan is built on the CPU once per step."""
        if isinstance(slots, torch.Tensor):
            shape, flat = tuple(slots.shape), [int(s) for s in slots.reshape(-1).tolist()]
        else:
            flat = [int(s) for s in slots]
            shape = (len(flat),)
        bad = [s for s in flat if not -1 <= s < self.max_loras]
        if bad:
            raise ValueError(f"slots: index {bad[0]} out of range [-1, {self.max_loras})")
        runs: list[tuple[int, int, int]] = []
        start = 0
        for i in range(1, len(flat) + 1):  # run-length encode, dropping base runs
            if i == len(flat) or flat[i] != flat[start]:
                if flat[start] >= 0:
                    runs.append((flat[start], start, i))
                start = i
        self.slots, self.shape, self._runs, self._plans = tuple(flat), shape, runs, {}
        self._groups = None
        self._slot_tensor: torch.Tensor | None = None

    def slot_tensor(self) -> torch.Tensor:
        """The step's per-token slots (N,) int64 on the CPU, made once per step."""
        if self._slot_tensor is None:
            self._slot_tensor = torch.tensor(self.slots, dtype=torch.int64)
        return self._slot_tensor

    def groups(self) -> GroupPlan:
        """The step's tiles for the grouped product (packed (N,) input with some adapter token)."""
        if self._groups is None:
            self._groups = GroupPlan.build(self.slots, self.max_loras, self.tile_cap, self.device)
        return self._groups

    def clear(self) -> None:
        """Every token uses the base model."""
        self.set([])

    @property
    def active(self) -> bool:
        """True when some token uses (or, with `graph_index`, may use) an adapter."""
        return bool(self._runs) or self.graph_index is not None

    def plan(self, lead: tuple[int, ...]) -> Plan:
        """(slot, tokens) pairs for x with leading shape `lead`, tokens indexing x.reshape(-1, in)."""
        if not self._runs:
            return []
        plan = self._plans.get(lead)
        if plan is not None:
            return plan
        if lead == self.shape:
            unit = 1  # per token
        elif len(self.shape) == 1 and len(lead) == 2 and lead[0] == self.shape[0]:
            unit = lead[1]  # per row: row r owns tokens [r*T, (r+1)*T)
        else:
            raise ValueError(f"LoRA mapping of shape {self.shape} does not fit input of shape "
                             f"{lead}; call set() with (N,), (B,) or (B, T) slot indices")
        slots_in_batch = {s for s, _, _ in self._runs}
        if len(slots_in_batch) == len(self._runs):  # each slot's tokens are adjacent (sorted)
            plan = [(s, slice(a * unit, b * unit)) for s, a, b in self._runs]
        else:
            plan = []
            for s in sorted(slots_in_batch):
                idx = torch.cat([torch.arange(a * unit, b * unit) for s2, a, b in self._runs if s2 == s])
                plan.append((s, idx.to(self.device)))
        self._plans[lead] = plan
        return plan


class LoRALinear(nn.Linear):
    """nn.Linear plus `max_loras` stacked LoRA slots, chosen per token by a shared LoRAMapping.

    Reuses the wrapped layer's `weight` and `bias` Parameters. Buffers (non-persistent):
    `lora_a_stacked` (max_loras, max_rank, in), `lora_b_stacked` (max_loras, max_rank, out) (B
    transposed: the expand product reads it contiguously),
    `scaling` (max_loras,). A slot of rank r < max_rank is zero-padded; only its r columns are
    used in the forward, and a slot this layer has no weights for (rank 0) is skipped.
    dtype int8 (CPU, for the C++ kernel: half a bf16 slot's bytes): each row of A and of B
    (transposed) is stored as round(row * 127 / max|row|) with its scale max|row| / 127 in
    `lora_a_qscale`, `lora_b_qscale` (max_loras, max_rank) fp32; the weights used are the
    dequantized rows.

    Semantics:
        y = x @ W.T + b                                   # x (N, in), slots (N,)
        for n in range(N):
            s = slots[n]
            if s >= 0:
                y[n] += scaling[s] * (x[n] @ lora_a_stacked[s].T) @ lora_b_stacked[s]
    """

    def __init__(self, base: nn.Linear, mapping: LoRAMapping, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # None when the base is int8 (shoal.model.quant.QuantLinear)
        self.bias = base.bias
        if self.weight is None:
            self.register_buffer("qweight", base.qweight, persistent=False)  # (out, in) int8
            self.register_buffer("qscale", base.qscale, persistent=False)  # (out,)
            self.qpacked = base.packed  # qweight in the packed order (shoal.kernels.qlinear)
        self.k_chunk = getattr(base, "k_chunk", 0)  # split-K mode of the base layer
        self.mapping = mapping
        ref = self.weight if self.weight is not None else (base.qscale if base.qscale is not None else base.qweight)
        dtype = dtype or (ref.dtype if ref.is_floating_point() else torch.get_default_dtype())
        device = device if device is not None else ref.device
        n, r = mapping.max_loras, mapping.max_rank
        kw = dict(dtype=dtype, device=device)
        self.register_buffer("lora_a_stacked", torch.zeros(n, r, self.in_features, **kw), persistent=False)
        self.register_buffer("lora_b_stacked", torch.zeros(n, r, self.out_features, **kw), persistent=False)
        self.quantized = dtype == torch.int8
        if self.quantized:
            self.register_buffer("lora_a_qscale", torch.zeros(n, r, device=device), persistent=False)
            self.register_buffer("lora_b_qscale", torch.zeros(n, r, device=device), persistent=False)
            kw["dtype"] = torch.float32
        self.register_buffer("scaling", torch.zeros(n, **kw), persistent=False)
        self.ranks = [0] * n  # rank held by each slot (0 = empty)
        self.rank_t = torch.zeros(n, dtype=torch.int64)  # the same, for the CPU kernel
        self.scale_f32 = torch.zeros(n)  # `scaling` in fp32, for the CPU kernel
        self.bgmv: dict = {}  # `kernels.BGMVLayers` of this layer's group, by (layers used, buffers)
        self.lora_group: LoRAGroup | None = None  # set when A shares a buffer with siblings
        self._scale = [0.0] * n  # python copy of `scaling` for the hot path

    @torch.no_grad()
    def set_lora(self, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                 quantized: tuple | None = None) -> None:
        """Load A (r, in) and B (out, r) into `slot`, zero-padding r up to max_rank. int8 slots:
        `quantized` may give `quantize_rows` of A and of B.T, made beforehand (`quantize_many`)."""
        r = lora_a.shape[0]
        if lora_a.shape != (r, self.in_features) or lora_b.shape != (self.out_features, r):
            raise ValueError(f"lora_a/lora_b: shapes {tuple(lora_a.shape)}, {tuple(lora_b.shape)} do not "
                             f"fit ({r}, {self.in_features}), ({self.out_features}, {r})")
        if r > self.lora_a_stacked.shape[1]:
            raise ValueError(f"r: adapter rank {r} exceeds max_lora_rank {self.lora_a_stacked.shape[1]}")
        self.lora_a_stacked[slot].zero_()
        self.lora_b_stacked[slot].zero_()
        if self.quantized:
            self.lora_a_qscale[slot].zero_()
            self.lora_b_qscale[slot].zero_()
            rows = quantized or (quantize_rows(lora_a), quantize_rows(lora_b.t()))
            for (q, qs), buf, sbuf in zip(rows, (self.lora_a_stacked, self.lora_b_stacked),
                                          (self.lora_a_qscale, self.lora_b_qscale)):
                buf[slot, :r], sbuf[slot, :r] = q, qs
        else:
            self.lora_a_stacked[slot, :r].copy_(lora_a)
            self.lora_b_stacked[slot, :r].copy_(lora_b.t())
        self.scaling[slot] = scaling
        self.ranks[slot], self._scale[slot] = r, float(scaling)
        self.rank_t[slot] = r
        self.scale_f32[slot] = float(scaling)

    @torch.no_grad()
    def reset_lora(self, slot: int) -> None:
        """Empty `slot`: tokens mapped to it get the base output from this layer."""
        self.lora_a_stacked[slot].zero_()
        self.lora_b_stacked[slot].zero_()
        if self.quantized:
            self.lora_a_qscale[slot].zero_()
            self.lora_b_qscale[slot].zero_()
        self.scaling[slot] = 0.0
        self.ranks[slot], self._scale[slot] = 0, 0.0
        self.rank_t[slot] = 0
        self.scale_f32[slot] = 0.0

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output (..., out): float weights, or int8 ones (QuantLinear)."""
        if self.weight is None:
            from ..model.quant import quant_linear

            return quant_linear(x, self.qweight, self.qscale, self.bias, self.qpacked)
        return linear(x, self.weight, self.bias, self.k_chunk, getattr(self, "max_rows", 0),
                      getattr(self, "prefill_rows", 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._base(x)  # (..., out)
        self.add_lora_(x, y)
        return y

    def add_lora_(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """y (..., out) += each token's LoRA delta, in place; y may be a column slice of a fused
        projection's output (`shoal.model.fused`)."""
        lead = tuple(x.shape[:-1])
        if self.mapping.graph_index is not None:
            add_indexed_(x, [y], [self], self.lora_a_stacked, self.mapping.graph_index)
            return
        if self.mapping.grouped and lead == self.mapping.shape and len(lead) == 1:
            if self.mapping.active:
                add_grouped_(x, [y], [self], self.lora_a_stacked, self.mapping.groups())
            return
        plan = self.mapping.plan(lead)
        if not plan:
            return  # no token uses an adapter
        x2, y2 = x.reshape(-1, self.in_features), y.view(-1, self.out_features)  # (N, in), (N, out)
        for s, tokens in plan:
            r = self.ranks[s]
            if r == 0:
                continue
            a, b = self.slot_weights(s, x2.dtype)  # (r, in), (r, out)
            if isinstance(tokens, slice):
                # 1) sorted: contiguous rows, updated in place
                xa = x2[tokens] @ a.t()  # (n, r)
                y2[tokens].addmm_(xa, b, alpha=self._scale[s])
            else:
                # 2) interleaved: gather rows, scatter-add the delta
                xa = x2.index_select(0, tokens) @ a.t()  # (n, r)
                y2.index_add_(0, tokens, xa @ b, alpha=self._scale[s])

    def slot_weights(self, s: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot s's A (r, in) and B transposed (r, out) in `dtype` (int8 slots dequantized)."""
        r = self.ranks[s]
        a, b = self.lora_a_stacked[s, :r], self.lora_b_stacked[s, :r]
        if self.quantized:
            a = a.float() * self.lora_a_qscale[s, :r, None]
            b = b.float() * self.lora_b_qscale[s, :r, None]
        return a.to(dtype), b.to(dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"max_loras={self.mapping.max_loras}, max_rank={self.mapping.max_rank}")


@torch.no_grad()
def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (r, n) -> (int8 (r, n), fp32 scales (r,)): each row as round(row * 127 / max|row|),
    scale max|row| / 127 (a zero row: zeros, scale 0)."""
    w = w.float()
    amax = w.abs().amax(dim=1)
    scale = amax / 127
    q = torch.round(w * torch.where(amax > 0, 127 / amax, 0.0)[:, None]).clamp_(-127, 127)
    return q.to(torch.int8), scale


@torch.no_grad()
def quantize_many(ws: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`quantize_rows` of each of ws, in one call per row width (an adapter's 420 matrices in 5
    calls: loading an int8 slot took 35 ms with one call per matrix, 9 ms for bf16 slots)."""
    out: list = [None] * len(ws)
    by_width: dict[int, list[int]] = {}
    for i, w in enumerate(ws):
        by_width.setdefault(w.shape[1], []).append(i)
    for idx in by_width.values():
        q, scale = quantize_rows(torch.cat([ws[i] for i in idx]))
        start = 0
        for i in idx:
            n = ws[i].shape[0]
            out[i] = (q[start:start + n], scale[start:start + n])
            start += n
    return out


def default_targets(model: nn.Module) -> list[str]:
    """Paths of every nn.Linear except lm_head (the output layer PEFT's all-linear skips too) and
    the engine's fused projections (their parts are the targets)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n != "lm_head" and not getattr(m, "fused", False)]


def apply_lora(model: nn.Module, max_loras: int, max_rank: int,
               target_modules: Iterable[str] | None = None, *, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> LoRAMapping:
    """Replace the targeted nn.Linear modules of `model` in place by LoRALinear.

    Args:
        model: the model; its Parameters are kept, so state_dict and weight tying are unchanged.
        max_loras: adapter slots per batch.
        max_rank: largest adapter rank a slot holds.
        target_modules: leaf names (`q_proj`) or full paths; None = all linear layers but lm_head.
        dtype, device: of the stacked LoRA buffers; default each base layer's weight. int8: rows
            quantized with fp32 scales (`LoRALinear`), read by the CPU kernel only.
    Returns:
        The LoRAMapping all wrapped layers read; `mapping.layers` maps path -> LoRALinear.
    """
    if max_loras <= 0 or max_rank <= 0:
        raise ValueError(f"max_loras/max_rank: must be positive, got {max_loras}, {max_rank}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("model: LoRA layers are already applied")
    linear = default_targets(model)
    if target_modules is None:
        paths = linear
    else:
        wanted = set(target_modules)
        paths = [p for p in linear if p in wanted or p.rsplit(".", 1)[-1] in wanted]
        found = set(paths) | {p.rsplit(".", 1)[-1] for p in paths}
        missing = sorted(wanted - found)
        if missing:
            raise ValueError(f"target_modules: {missing[0]!r} is not a linear layer of the model")
    if device is None:
        device = next(model.parameters()).device
    mapping = LoRAMapping(max_loras, max_rank, device)
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        layer = LoRALinear(getattr(parent, child), mapping, dtype=dtype, device=device)
        setattr(parent, child, layer)
        mapping.layers[path] = layer
    # parts of a fused projection (`shoal.model.fused`) that all got LoRA share one A buffer;
    # where the CPU kernel reads the slots, every group's (and lone layer's) slots slot-major
    first = next(iter(mapping.layers.values()), None)
    slot_major = (first is not None and first.lora_a_stacked.device.type == "cpu"
                  and first.lora_a_stacked.dtype in (torch.float32, torch.bfloat16) and kernels.enabled())
    grouped = set()
    for m in model.modules():
        for parts in getattr(m, "fused_parts", lambda: [])():
            wrapped = [p for p in parts if isinstance(p, LoRALinear) and p.mapping is mapping]
            if len(wrapped) > 1:
                LoRAGroup(wrapped, slot_major)
                grouped.update(map(id, wrapped))
    if slot_major:
        for layer in mapping.layers.values():
            if id(layer) not in grouped:
                slot_major_([layer])
    return mapping
