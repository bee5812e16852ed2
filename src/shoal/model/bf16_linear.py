"""The engine's bf16 linears on our packed kernel (`shoal.kernels.qlinear.blinear`: AMX tiles,
or AVX512-BF16 dot products on CPUs without AMX).

`pack_bf16(model)` swaps each bf16 CPU nn.Linear whose shape fits for a `PackedBF16Linear`:
the same numbers, packed once in the kernel's order (a `QuantLinear` with bf16 `qweight` and no
scales, so fusion, LoRA wrapping and the one-call decode path treat it like a packed int8
layer). Products then take any row count with the same bits per row.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import qlinear as amx
from .layers import LlamaAttention, SwiGLU
from .quant import QuantEmbedding, QuantLinear, _set_module


class PackedBF16Linear(QuantLinear):
    """A bf16 Linear whose weight is packed for our kernel (`kernels.qlinear.blinear`): `qweight`
    (out, in) bf16 in the packed order, `qscale` None, `weight` None; the same numbers, so the
    products are F.linear's up to the fp32 sum's order (a bf16 bias joins the fp32 sum before the
    one rounding, as in F.linear). Any
    row count gives a row the same bits, so the engine's row classes and split-K (for oneDNN's
    kernels) do not apply. Measured (`bench/cpu_products.py`, 2 threads, the 121 products of a
    SmolLM2-135M decode step): Xeon with AMX 9.6 ms at 1 row and 11.9 at 32, vs F.linear 19.5
    and 23.8; AMD EPYC with AVX512-BF16 5.1 and 14.8, vs F.linear 15.3 and 24.4."""

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> "PackedBF16Linear":
        return cls(layer.in_features, layer.out_features, amx.qpack(layer.weight.detach()), None,
                   layer.bias, True)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bf16 packed order")


def bf16_packable(layer: nn.Module) -> bool:
    w = getattr(layer, "weight", None)
    return (isinstance(layer, nn.Linear) and isinstance(w, torch.Tensor) and not w.is_meta
            and w.device.type == "cpu" and w.dtype == torch.bfloat16 and amx.packable(*w.shape))


@torch.no_grad()
def pack_bf16(model: nn.Module) -> int:
    """Replace every bf16 CPU nn.Linear whose shape fits by a `PackedBF16Linear` in place
    (an embedding tied to one reads its packed rows: `QuantEmbedding`, no second copy); returns
    how many: 0 where the CPU has neither AMX-BF16 nor AVX512-BF16 or the kernels are off. Call before
    `fuse_projections` (packed parts concatenate into a packed fused weight)."""
    skip = set()  # parts of a projection fused later: all packed or none
    for m in model.modules():
        group = ((m.q_proj, m.k_proj, m.v_proj) if isinstance(m, LlamaAttention)
                 else (m.gate_proj, m.up_proj) if isinstance(m, SwiGLU) else ())
        if group and not all(bf16_packable(p) for p in group):
            skip |= {id(p) for p in group}
    linears = [(n, m) for n, m in model.named_modules() if bf16_packable(m) and id(m) not in skip]
    tied: dict[int, list[str]] = {}
    for n, e in model.named_modules():
        if isinstance(e, nn.Embedding):
            tied.setdefault(id(e.weight), []).append(n)
    for path, layer in linears:
        a = PackedBF16Linear.from_linear(layer)
        for epath in tied.pop(id(layer.weight), []):
            _set_module(model, epath, QuantEmbedding(a.qweight, None, torch.bfloat16, True))
        _set_module(model, path, a)
        layer.weight = None
    return len(linears)
