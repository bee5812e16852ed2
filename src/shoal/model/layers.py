"""Building blocks of the two families: norms, rotary embeddings, attention projections, MLPs.

Linear layers keep Hugging Face's module names (q_proj ... down_proj; c_attn, c_proj, c_fc) so
LoRA `target_modules` mean what they mean in PEFT. Attention itself (cache, masks, kernels) is
delegated to an attention context (`shoal.model.attention`), so the engine can swap in a paged
KV cache without touching these modules. Tensors carry any leading shape `(...)`: `(B, T)` for
the reference path, `(N,)` packed tokens for the engine.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from . import row_classes
from .config import ModelConfig
from .packed import PackedWeight
from .row_classes import INVARIANT_ROWS  # noqa: F401  (re-exported: the engine and tests use it)


TRITON_ON_CPU = False  # tests: take the Triton paths on CPU tensors (under Triton's interpreter)


@functools.cache
def _triton_elementwise():
    """`shoal.kernels.triton_elementwise`, or None without Triton (CPU installs)."""
    try:
        from ..kernels import triton_elementwise
    except ImportError:
        return None
    return triton_elementwise


def gpu_ops(module: nn.Module, x: torch.Tensor):
    """The fused Triton kernels for `module`'s elementwise steps on x, or None: on CUDA, when
    Triton is there and the module's `triton_ops` is on (the engine's `triton_kernels`). One
    kernel each for RMSNorm (with the residual add), RoPE on q and k, SiLU-and-multiply: a
    one-token decode layer ran ~30 kernels, ~12 with these."""
    if not (module.triton_ops and (x.is_cuda or TRITON_ON_CPU)):
        return None
    return _triton_elementwise()


def set_triton_ops(model: nn.Module, on: bool) -> None:
    """Turn `gpu_ops` on or off for every module of the model that has them."""
    for m in model.modules():
        if hasattr(type(m), "triton_ops"):
            m.triton_ops = on


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           k_chunk: int = 0, max_rows: int = 0, prefill_rows: int = 0) -> torch.Tensor:
    """F.linear, or with k_chunk > 0 a split-K product: the input dimension is cut into equal
    chunks of at most k_chunk, each product is taken separately and summed in fp32. With
    max_rows > 0 the rows go in blocks by class (`shoal.model.row_classes`: at most max_rows,
    or prefill_rows for an engine step's prefill rows).

    Why: on CPU, bf16 matmuls with K > 1024 change their reduction order with the number of rows
    (measured: torch 2.13, oneDNN, AVX512-BF16), so a row's result would depend on what else is
    in the batch. Chunks of K <= 1024 are row-invariant, and so is their fp32 sum.
    Semantics: y = sum_c x[:, c] @ weight[:, c].T (+ bias), c over the K chunks.
    A weight packed for oneDNN (`shoal.model.packed`) computes the same product with the
    chunks it was packed in (k_chunk is fixed at packing), summed as `PackedWeight` describes.
    """
    k = x.shape[-1]
    if max_rows > 0 and x.numel():  # row blocks by class, each its own product
        y = row_classes.blocked(x.reshape(-1, k), lambda xb: linear(xb, weight, bias, k_chunk),
                                max_rows, prefill_rows)
        if y is not None:
            return y.view(*x.shape[:-1], -1)
    if isinstance(weight, PackedWeight):
        return weight.linear(x, bias)
    if k_chunk <= 0 or k <= k_chunk:
        return F.linear(x, weight, bias)
    n = -(-k // k_chunk)
    step = -(-k // n)
    y = None
    for c in range(0, k, step):
        part = F.linear(x[..., c:c + step], weight[:, c:c + step]).float()
        y = part if y is None else y.add_(part)
    if bias is not None:
        y.add_(bias.float())
    return y.to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear with an optional split-K mode (`k_chunk`, set by the engine for batch
    invariance; 0 = plain) and row classes (`max_rows`, `prefill_rows`, likewise; 0 = none;
    `shoal.model.row_classes`)."""

    k_chunk: int = 0
    max_rows: int = 0
    prefill_rows: int = 0
    fusable: bool = True  # its weight may be a view into a fused product's (`shoal.model.fused`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.k_chunk, self.max_rows, self.prefill_rows)


# Rows for which `head_logits` takes the weight-major product (see its measurements).
LOGITS_MM_ROWS = (2, 64)


def head_logits(head: nn.Module, x: torch.Tensor, fp32: bool = True) -> torch.Tensor:
    """The output layer's logits: (..., K) -> (..., V) fp32 contiguous, i.e. `head(x).float()`
    (with fp32=False: `head(x)`, skipping a copy of a bf16 head's logits: 25 MB at 256 rows).

    For a plain fp32 CPU `Linear` (no bias, no split-K in effect) and 2..64 rows it computes
    `mm(weight, x.T).T`, made contiguous for the sampler's row reductions, instead of F.linear:
    the same dot products, with the (V, K) weight as the row-major left operand, which picks a
    faster GEMM path for this tall, thin product. Measured (torch 2.13, 2-core AVX2 EPYC,
    2 threads, V=49152, K=576, medians, F.linear -> mm + contiguous): M=2 19.4 -> 7.8 ms,
    M=8 19.0 -> 10.3, M=32 32.8 -> 26.7, M=64 54.4 -> 49.6; M=1 equal; M=128 equal and M>=192
    slower (the transpose copy outgrows the gain). fp32 only: in fp32 neither orientation gives
    a row the same bits at small M (up to 9 measured) as in a larger batch (both switch kernels),
    so fp32 batch invariance is no worse; in bf16 it was no faster (M=8 27.1 vs 29.1 ms) and
    F.linear is the product whose row-invariance the engine relies on.
    Anything else (bf16, QuantLinear with weight None, a LoRA wrapper, a bias, k_chunk in
    effect) calls the module.
    """
    w = getattr(head, "weight", None)
    m = x.numel() // x.shape[-1] if x.dim() > 1 else 1
    if (type(head) in (Linear, nn.Linear) and isinstance(w, torch.Tensor) and head.bias is None
            and w.dtype == x.dtype == torch.float32 and w.device.type == "cpu"
            and not 0 < getattr(head, "k_chunk", 0) < x.shape[-1]
            and LOGITS_MM_ROWS[0] <= m <= LOGITS_MM_ROWS[1]):
        y = torch.mm(w, x.reshape(m, -1).t())  # (V, M)
        return y.t().contiguous().view(*x.shape[:-1], w.shape[0])  # (..., V): the sampler reads rows
    y = head(x)
    return y.float() if fp32 else y


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in fp32 like the reference implementations."""

    triton_ops: bool = True  # `gpu_ops`

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype and kernels.usable(x, self.weight):
            return kernels.rms_norm(x, self.weight, self.eps)[0]  # the same steps, one call
        if x.dtype == self.weight.dtype and (tk := gpu_ops(self, x)) is not None and x.shape[-1] <= tk.MAX_HIDDEN:
            return tk.rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps)[0].view(x.shape)
        # normalize in fp32, round to the input dtype, then scale (HF's order, one fused op)
        y = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
        return self.weight * y.to(x.dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(residual + x), residual + x): the residual add and the norm in one kernel call
        on CPU (the sum rounded to x's dtype first, as `residual + x` is)."""
        if x.dtype == residual.dtype == self.weight.dtype and kernels.usable(x, residual, self.weight):
            return kernels.rms_norm(x, self.weight, self.eps, residual)
        if (x.dtype == residual.dtype == self.weight.dtype and (tk := gpu_ops(self, x)) is not None
                and x.shape[-1] <= tk.MAX_HIDDEN):
            k = x.shape[-1]
            y, h = tk.rms_norm(x.reshape(-1, k), self.weight, self.eps, residual.reshape(-1, k))
            return y.view(x.shape), h.view(x.shape)
        h = residual + x
        return self(h), h


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) for RoPE, with linear or Llama-3 scaling applied."""
    d = config.head_dim
    # on the CPU even where the model is built on the meta device (ops on meta tensors go through
    # torch's reference ops, whose first use imports torch._dynamo: ~150 MB of RSS with Triton)
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    s = config.rope_scaling
    if s is None:
        return inv
    if s["rope_type"] == "linear":
        return inv / float(s["factor"])
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(mid, blended, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions, in the HF (rotate-half) layout."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions (...,) -> freqs (..., D/2) -> cos, sin (..., D)
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., H, D), cos/sin (..., D) -> x rotated: x*cos + rotate_half(x)*sin."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def fused_ok(parts: tuple[nn.Module, ...]) -> bool:
    """May a fused product stand for these parts? Yes when each is a plain layer (`fusable`) or
    adds its LoRA delta on top of it (`add_lora_`); a part wrapped by anything else (a
    trainer's LoRA layer) sends the forward down the unfused path."""
    return all(getattr(p, "fusable", False) or hasattr(p, "add_lora_") for p in parts)


def add_lora_deltas(x: torch.Tensor, y: torch.Tensor, parts: tuple[nn.Module, ...]) -> None:
    """Add each LoRA-wrapped part's delta (`LoRALinear.add_lora_`) to its slice of a fused
    projection's output y (..., sum of the parts' out_features); plain parts add nothing."""
    lora, ys, start = [], [], 0
    for p in parts:
        if hasattr(p, "add_lora_"):
            lora.append(p)
            ys.append(y[..., start:start + p.out_features])
        start += p.out_features
    if not lora or not lora[0].mapping.active:
        return
    group = lora[0].lora_group
    if group is not None and group.layers == tuple(lora):
        group.add_(x, ys)  # one shrink product for all of them
        return
    for p, part_y in zip(lora, ys):
        p.add_lora_(x, part_y)


class LlamaAttention(nn.Module):
    """q/k/v/o projections + RoPE; the attention math is done by `ctx.attend`. With `fused_qkv`
    set (`shoal.model.fused`), q/k/v come from one product and RoPE runs once over q and k."""

    triton_ops: bool = True  # `gpu_ops`
    store_kv: bool = True  # with `gpu_ops`: RoPE and the cache writes in one kernel, where ctx can

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, d
        self.q_proj = Linear(h, config.num_heads * d, bias=config.attention_bias)
        self.k_proj = Linear(h, config.num_kv_heads * d, bias=config.attention_bias)
        self.v_proj = Linear(h, config.num_kv_heads * d, bias=config.attention_bias)
        self.o_proj = Linear(config.num_heads * d, h, bias=False)
        self.fused_qkv: nn.Module | None = None

    def fused_parts(self) -> list[tuple[nn.Module, ...]]:
        """The layers `fused_qkv` stands for (none when not fused)."""
        return [(self.q_proj, self.k_proj, self.v_proj)] if self.fused_qkv is not None else []

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx) -> torch.Tensor:
        lead = x.shape[:-1]
        if self.fused_qkv is not None and fused_ok((self.q_proj, self.k_proj, self.v_proj)):
            h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
            y = self.fused_qkv(x)  # (..., (H + 2 Hkv) * D): q | k | v
            add_lora_deltas(x, y, (self.q_proj, self.k_proj, self.v_proj))
            qk = y[..., :(h + hkv) * d].view(*lead, h + hkv, d)  # (..., H + Hkv, D), rows strided
            if y.is_contiguous() and cos.dtype == y.dtype and kernels.usable(y, cos, sin):
                rows = y.view(-1, y.shape[-1])[:, :(h + hkv) * d].view(-1, h + hkv, d)
                kernels.rope_(rows, cos, sin)  # in place in y (so in qk): apply_rope's bits
            elif (y.is_contiguous() and cos.dtype == y.dtype and (tk := gpu_ops(self, y)) is not None
                  and d <= tk.MAX_HEAD_DIM):
                rows = y.view(-1, h + 2 * hkv, d)  # (N, H + 2 Hkv, D): q | k | v heads
                cos, sin = cos.reshape(-1, d), sin.reshape(-1, d)
                store = getattr(ctx, "store_rotated", None) if self.store_kv else None  # (Triton attention)
                if store is None or not store(self.layer_idx, rows, cos, sin, h, tk):
                    tk.rope_(rows[:, :h + hkv], cos, sin)  # in place, one kernel
            else:
                qk = apply_rope(qk, cos, sin)
            v = y[..., (h + hkv) * d:].view(*lead, hkv, d)
            o = ctx.attend(self.layer_idx, qk[..., :h, :], qk[..., h:, :], v)  # (..., H, D)
            return self.o_proj(o.flatten(-2))
        q = self.q_proj(x).view(*lead, self.num_heads, self.head_dim)  # (..., H, D)
        k = self.k_proj(x).view(*lead, self.num_kv_heads, self.head_dim)  # (..., Hkv, D)
        v = self.v_proj(x).view(*lead, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = ctx.attend(self.layer_idx, q, k, v)  # (..., H, D)
        return self.o_proj(o.flatten(-2))


class GPT2Attention(nn.Module):
    """Fused c_attn -> q, k, v (no RoPE: positions are learned embeddings) and c_proj."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        h = config.hidden_size
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.c_attn = Linear(h, 3 * h)
        self.c_proj = Linear(h, h)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        lead = x.shape[:-1]
        q, k, v = self.c_attn(x).view(*lead, 3, self.num_heads, self.head_dim).unbind(-3)
        o = ctx.attend(self.layer_idx, q, k, v)  # (..., H, D)
        return self.c_proj(o.flatten(-2))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); with `fused_gate_up` set (`shoal.model.fused`), gate and up
    come from one product."""

    triton_ops: bool = True  # `gpu_ops`

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, i, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(h, i, bias=b)
        self.up_proj = Linear(h, i, bias=b)
        self.down_proj = Linear(i, h, bias=b)
        self.fused_gate_up: nn.Module | None = None

    def fused_parts(self) -> list[tuple[nn.Module, ...]]:
        """The layers `fused_gate_up` stands for (none when not fused)."""
        return [(self.gate_proj, self.up_proj)] if self.fused_gate_up is not None else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_gate_up is not None and fused_ok((self.gate_proj, self.up_proj)):
            y = self.fused_gate_up(x)  # (..., 2 I): gate | up
            add_lora_deltas(x, y, (self.gate_proj, self.up_proj))
            i = self.gate_proj.out_features
            if kernels.usable(y):
                return self.down_proj(kernels.silu_mul(y))  # (..., I), one call
            if y.is_contiguous() and (tk := gpu_ops(self, y)) is not None:
                return self.down_proj(tk.silu_mul(y.view(-1, 2 * i)).view(*y.shape[:-1], i))
            return self.down_proj(F.silu(y[..., :i]) * y[..., i:])
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GPT2MLP(nn.Module):
    """c_proj(gelu(c_fc(x))), GELU with the tanh approximation GPT-2 was trained with."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = Linear(config.hidden_size, config.intermediate_size)
        self.c_proj = Linear(config.intermediate_size, config.hidden_size)
        self.approximate = "none" if config.activation == "gelu" else "tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))
