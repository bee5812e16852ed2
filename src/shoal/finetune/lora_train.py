"""Trainable LoRA on our model's linear layers: frozen base weight, fp32 A and B.

`apply_trainable_lora` swaps the targeted linear layers for `TrainableLoRALinear`s in place (the
base Parameters are reused, so state_dict names and weight tying do not change) and freezes every
base parameter; `TrainableLoRA.unwrap()` puts the original modules and `requires_grad` flags back.
All randomness (A's init, dropout masks) comes from explicit generators seeded by the caller, never
from the global RNG. No optimizer, data or file handling here (`trainer.py`, `peft_format.py`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
from torch import nn

from ..lora.layers import default_targets
from ..lora.peft_format import ALL_LINEAR, LoRAAdapter
from ..model.layers import Linear, linear


class TrainableLoRALinear(Linear):
    """A frozen linear layer plus a trainable low-rank update, as PEFT's `lora.Linear`.

    `lora_A` (r, in) starts kaiming-uniform(a=sqrt(5)) like PEFT, `lora_B` (out, r) starts at
    zero, so the wrapped model first computes exactly the base model. A and B are fp32 whatever
    the base dtype: the LoRA path casts x to fp32 and the sum is cast back to the base output dtype
    (PEFT's `autocast_adapter_dtype`), so bf16 bases keep full-precision adapter updates.

    Semantics:
        y = x @ W.T + b + scaling * (dropout(x) @ A.T) @ B.T      # scaling = lora_alpha / r
    """

    fusable = False  # a fused q/k/v product would skip this update (`shoal.model.fused`)

    def __init__(self, base: nn.Linear, r: int, lora_alpha: float, dropout: float,
                 init: torch.Generator, dropout_gen: torch.Generator | None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.k_chunk = getattr(base, "k_chunk", 0)
        self.r, self.scaling, self.dropout = r, lora_alpha / r, dropout
        dev = base.weight.device
        a = torch.empty(r, self.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=init)  # on the CPU: device-independent
        self.lora_A = nn.Parameter(a.to(dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=torch.float32, device=dev))
        self.dropout_gen = dropout_gen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == torch.float32 and not (self.dropout > 0 and self.training):
            return _MergedLoRA.apply(x, self.weight, self.bias, self.lora_A, self.lora_B,
                                     self.scaling, self.k_chunk)
        # bf16/fp16 base or dropout: base product in the base dtype, LoRA path in fp32
        y = linear(x, self.weight, self.bias, self.k_chunk)  # (..., out)
        xl = x.float()  # (..., in)
        if self.dropout > 0 and self.training:
            keep = torch.empty_like(xl).bernoulli_(1 - self.dropout, generator=self.dropout_gen)
            xl = xl * keep / (1 - self.dropout)
        delta = (xl @ self.lora_A.t()) @ self.lora_B.t()  # (..., r) -> (..., out)
        return (y.float() + delta * self.scaling).to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, dropout={self.dropout:g}")


class _MergedLoRA(torch.autograd.Function):
    """fp32 LoRA without dropout, as one product with the merged weight W + scaling * B @ A.

    Why: with r = 8 the skinny products (x @ A.T, xa @ B.T and their backward) run at a few
    GFLOP/s on the CPU and each reads a whole activation; merging (out*in*r FLOPs, recomputed in
    the backward rather than stored) removes two of the six and the extra adds. Base weight and
    bias get no gradient (they are frozen).

    Semantics: y = x @ (W + s * B @ A).T + b;  dA = s * (g @ B).T @ x;  dB = s * g.T @ (x @ A.T)
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling, k_chunk):
        ctx.save_for_backward(x, weight, a, b)
        ctx.scaling, ctx.k_chunk = scaling, k_chunk
        return linear(x, torch.addmm(weight, b, a, alpha=scaling), bias, k_chunk)  # (..., out)

    @staticmethod
    def backward(ctx, g):
        x, weight, a, b = ctx.saved_tensors
        s = ctx.scaling
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])  # (N, out), (N, in)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = (g2 @ torch.addmm(weight, b, a, alpha=s)).view(x.shape)  # (N, in)
        gb = g2 @ b  # (N, r)
        grad_a = (gb.t() @ x2).mul_(s)  # (r, in)
        grad_b = ((x2 @ a.t()).t() @ g2).t().mul(s)  # (out, r); (r, N) @ (N, out) is the fast order
        return gx, None, None, grad_a, grad_b, None, None


def resolve_targets(model: nn.Module, target_modules: Iterable[str] | str | None) -> list[str]:
    """Module paths to wrap, in model order.

    Args:
        target_modules: None or "all-linear" = every linear layer but lm_head (`default_targets`);
            a list of leaf names (`q_proj`) or full paths, matched as PEFT does; any other str is
            a regex matched against the full path (PEFT's string form).
    """
    linear_paths = default_targets(model)
    if target_modules is None or target_modules == ALL_LINEAR:
        return linear_paths
    if isinstance(target_modules, str):
        paths = [p for p in linear_paths if re.fullmatch(target_modules, p)]
        if not paths:
            raise ValueError(f"target_modules: pattern {target_modules!r} matches no linear layer")
        return paths
    wanted = set(target_modules)
    if not wanted:
        raise ValueError("target_modules: empty")
    paths = [p for p in linear_paths if p in wanted or p.rsplit(".", 1)[-1] in wanted]
    found = set(paths) | {p.rsplit(".", 1)[-1] for p in paths}
    missing = sorted(wanted - found)
    if missing:
        raise ValueError(f"target_modules: {missing[0]!r} is not a linear layer of the model "
                         f"(lm_head and embeddings cannot be targeted)")
    return paths


class TrainableLoRA:
    """The LoRA layers applied to one model: parameters, adapter export, state and unwrap."""

    def __init__(self, model: nn.Module, layers: dict[str, TrainableLoRALinear],
                 originals: dict[str, nn.Module], frozen: dict[str, bool], lora_alpha: float,
                 target_modules: list[str] | str | None, dropout_gen: torch.Generator | None) -> None:
        self.model, self.layers, self.lora_alpha = model, layers, lora_alpha
        self.target_modules = target_modules
        self.dropout_gen = dropout_gen
        self._originals, self._requires_grad = originals, frozen

    def parameters(self) -> list[nn.Parameter]:
        """[A, B] per layer, in model order (the order the optimizer state is keyed by)."""
        return [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)]

    def train(self, mode: bool = True) -> None:
        """Dropout on (training) or off (evaluation)."""
        for layer in self.layers.values():
            layer.training = mode

    def adapter_weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """module path -> (A (r, in), B (out, r)), detached fp32 copies on the CPU."""
        return {p: (m.lora_A.detach().cpu().clone(), m.lora_B.detach().cpu().clone())
                for p, m in self.layers.items()}

    def to_adapter(self, name: str = "adapter", base_model_name_or_path: str | None = None) -> LoRAAdapter:
        """A LoRAAdapter of the current weights, ready for `save_adapter`."""
        tm = self.target_modules if isinstance(self.target_modules, list) else None
        return LoRAAdapter.from_weights(name, self.adapter_weights(), self.lora_alpha,
                                        target_modules=tm,
                                        base_model_name_or_path=base_model_name_or_path)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """`{path}.lora_A` / `{path}.lora_B` -> CPU tensors (exact copies)."""
        out = {}
        for p, m in self.layers.items():
            out[f"{p}.lora_A"], out[f"{p}.lora_B"] = m.lora_A.detach().cpu().clone(), m.lora_B.detach().cpu().clone()
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy weights saved by `state_dict` back; the key set must match exactly."""
        want = {f"{p}.lora_{k}" for p in self.layers for k in "AB"}
        if set(state) != want:
            extra = sorted(set(state) ^ want)
            raise ValueError(f"lora state: key {extra[0]!r} does not match the LoRA layers")
        for p, m in self.layers.items():
            m.lora_A.copy_(state[f"{p}.lora_A"])
            m.lora_B.copy_(state[f"{p}.lora_B"])

    def unwrap(self) -> None:
        """Put the original linear modules and requires_grad flags back (idempotent)."""
        for path, orig in self._originals.items():
            parent_path, _, child = path.rpartition(".")
            parent = self.model.get_submodule(parent_path) if parent_path else self.model
            setattr(parent, child, orig)
        for name, p in self.model.named_parameters():
            if name in self._requires_grad:
                p.requires_grad_(self._requires_grad[name])
        self._originals = {}


def apply_trainable_lora(model: nn.Module, *, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                         target_modules: Iterable[str] | str | None = None,
                         seed: int = 0) -> TrainableLoRA:
    """Wrap the targeted linear layers of `model` in place and freeze every base parameter.

    Args:
        model: our Transformer (or any module whose linear layers are nn.Linear).
        r, lora_alpha, lora_dropout: PEFT's meanings; scaling = lora_alpha / r.
        target_modules: see `resolve_targets`.
        seed: seeds the A init (layers in model order) and the dropout masks.
    Returns:
        The TrainableLoRA handle; call `unwrap()` to restore the model.
    """
    if r <= 0:
        raise ValueError(f"r: must be positive, got {r}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout: must be in [0, 1), got {lora_dropout}")
    if any(isinstance(m, TrainableLoRALinear) for m in model.modules()):
        raise ValueError("model: trainable LoRA layers are already applied")
    tm = target_modules if target_modules is None or isinstance(target_modules, str) else list(target_modules)
    paths = resolve_targets(model, tm)
    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    init = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    dropout_gen = None
    if lora_dropout > 0:
        dropout_gen = torch.Generator(device=dev).manual_seed(seed + 1)
    layers, originals = {}, {}
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        orig = getattr(parent, child)
        layer = TrainableLoRALinear(orig, r, lora_alpha, lora_dropout, init, dropout_gen)
        setattr(parent, child, layer)
        layers[path], originals[path] = layer, orig
    return TrainableLoRA(model, layers, originals, frozen, lora_alpha, tm, dropout_gen)
