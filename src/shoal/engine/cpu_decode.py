"""A flat forward for decode steps on CPU: the Llama blocks' work without the module machinery.

At one decode row a step's Python costs as much as its arithmetic outside the weight reads
(measured: a 30-layer model with hidden size 64, so almost no arithmetic, took 12.4 ms a decode
step; SmolLM2-135M takes ~27 ms, 16.6 of them reading weights). `CPUDecodeForward` runs the
same operations as `LlamaBlock.forward` through the fused CPU kernels, in the same order and with
the same roundings, but from per-layer tuples made once: no `nn.Module.__call__`, attribute
lookups, LoRA checks or per-call layout tests, and each block's last residual add is fused into
the next block's norm (the kernel rounds the sum as `h + m` does). It serves steps whose rows
are all decodes with no adapter rows, for the Llama family with fused q/k/v and gate/up; any
other step takes the model's own forward. The bits are the module path's (tested).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .. import kernels
from ..lora.layers import LoRALinear
from ..model.layers import Linear, linear
from ..model.transformer import LlamaBackbone, Transformer


def _product(m: nn.Module):
    """The layer's base product as a plain callable x -> y."""
    if isinstance(m, LoRALinear):
        return m._base  # (only used when no token of the step has an adapter)
    if type(m) is Linear:
        return functools.partial(linear, weight=m.weight, bias=m.bias, k_chunk=m.k_chunk,
                                 max_rows=m.max_rows, prefill_rows=m.prefill_rows)
    return m.forward  # e.g. int8 QuantLinear


class CPUDecodeForward:
    """`Transformer.forward` for all-decode, adapter-free CPU steps (see the module docstring)."""

    def __init__(self, model: Transformer) -> None:
        bb = model.backbone
        self.model = model
        self.backbone = bb
        self.layers = []
        for blk in bb.layers:
            at, mlp = blk.self_attn, blk.mlp
            self.layers.append((blk.input_layernorm.weight, blk.input_layernorm.eps, _product(at.fused_qkv),
                                _product(at.o_proj), blk.post_attention_layernorm.weight,
                                blk.post_attention_layernorm.eps, _product(mlp.fused_gate_up),
                                _product(mlp.down_proj), at.layer_idx))
        c = model.config
        self.h, self.hkv, self.d = c.num_heads, c.num_kv_heads, c.head_dim

    @staticmethod
    def supports(model: Transformer) -> bool:
        """Llama family, fused projections on every block, plain norms."""
        bb = getattr(model, "model", None)
        return (isinstance(bb, LlamaBackbone) and model.config.family == "llama"
                and all(b.self_attn.fused_qkv is not None and b.mlp.fused_gate_up is not None for b in bb.layers))

    def usable(self, input_ids: torch.Tensor) -> bool:
        w = self.layers[0][0]
        return input_ids.dim() == 1 and kernels.usable(w) and w.dtype in (torch.float32, torch.bfloat16)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor:
        """input_ids, positions (N,) -> hidden states (N, hidden) after the final norm."""
        bb = self.backbone
        h = bb.embed_tokens(input_ids)  # (N, hidden)
        cos, sin = bb.rotary_emb(positions, h.dtype)  # (N, D)
        nh, hkv, d = self.h, self.hkv, self.d
        n = h.shape[0]
        m = None  # the previous block's MLP output, added to h by the next norm
        for ln1, eps1, qkv, o_proj, ln2, eps2, gate_up, down, li in self.layers:
            # 1) (h += m;) x = norm(h)
            if m is None:
                x = kernels.rms_norm(h, ln1, eps1)[0]
            else:
                x, h = kernels.rms_norm(m, ln1, eps1, h)
            # 2) q | k | v, RoPE on q and k in place, attention over the paged cache
            y = qkv(x)  # (N, (H + 2 Hkv) * D)
            qk = y[:, :(nh + hkv) * d].view(n, nh + hkv, d)
            kernels.rope_(qk, cos, sin)
            v = y[:, (nh + hkv) * d:].view(n, hkv, d)
            a = o_proj(ctx.attend(li, qk[:, :nh], qk[:, nh:], v).view(n, nh * d))
            # 3) h += a; x = norm(h); the MLP
            x, h = kernels.rms_norm(a, ln2, eps2, h)
            m = down(kernels.silu_mul(gate_up(x)))
        return kernels.rms_norm(m, bb.norm.weight, bb.norm.eps, h)[0]  # norm(h + m)
