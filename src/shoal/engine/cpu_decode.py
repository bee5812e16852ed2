"""A flat forward for decode steps on CPU: the Llama blocks' work without the module machinery.

At one decode row a step's Python costs as much as its arithmetic outside the weight reads
(measured: a 30-layer model with hidden size 64, so almost no arithmetic, took 12.4 ms a decode
step; SmolLM2-135M takes ~27 ms, 16.6 of them reading weights). `CPUDecodeForward` runs the
same operations as `LlamaBlock.forward` through the fused CPU kernels, in the same order and with
the same roundings, but from per-layer tuples made once: no `nn.Module.__call__`, attribute
lookups, LoRA checks or per-call layout tests, and each block's last residual add is fused into
the next block's norm (the kernel rounds the sum as `h + m` does). It serves steps whose rows
are all decodes, for the Llama family with fused q/k/v and gate/up; any other step takes the
model's own forward. The bits are the module path's (tested).

When every product runs on our packed kernels (any body: a bf16 model, `PackedBF16Linear`, or
`quantization="int8"` or `"q4"`; a q|k|v bias, Qwen2's, included), all blocks run in one C++ call
(`csrc/llama_decode.cpp`: the same kernels in the same order, so the same bits) and no Python runs
between the layers; only that path serves steps with adapter rows (each product's LoRA deltas added
in C++ by the LoRA layers' own kernel, `kernels.BGMVLayers` tables made once).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .. import kernels
from ..kernels import qlinear
from ..lora.layers import LoRALinear
from ..model.layers import Linear, linear
from ..model.quant import QuantLinear
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
        native = _native_layers(model)  # (weight kind, per-layer parts) for the one-call path, or None
        self.kind, self.native = native if native is not None else (None, None)
        self._eps = float(bb.layers[0].input_layernorm.eps)
        self._final_eps, self._final_w = float(bb.norm.eps), bb.norm.weight
        self._table: tuple | None = None  # (cache pointers, pointer table) for `native`
        self._scratch = torch.empty(0, dtype=torch.bfloat16)
        self.mapping = next((m.mapping for m in model.modules() if isinstance(m, LoRALinear)), None)
        self._lora: tuple | None = None  # (per-layer LoRA table, plans kept alive), made on first use
        self._lora_key: tuple = ()  # the slot buffers' addresses it was made for

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
        adapters = self.mapping is not None and self.mapping.active
        if self.native is not None and self._native_fits(h, ctx) and (not adapters or self._lora_ready()):
            return self._native_call(h, cos, sin, ctx, adapters)
        if adapters:  # adapter rows need the LoRA layers: the modules
            return self.model(input_ids, positions, ctx)
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

    # ---- all blocks in one C++ call (packed products)-----------------------------------------

    def _native_fits(self, h: torch.Tensor, ctx) -> bool:
        r = ctx.decode_rows
        return (h.dtype == torch.bfloat16 and r is not None and not ctx.seqs and not ctx.decode
                and ctx.cache.k.dtype in (torch.bfloat16, torch.float32, torch.int8) and qlinear.usable(h))

    def _pointer_table(self, cache) -> torch.Tensor:
        key = (cache.k.data_ptr(), cache.v.data_ptr())
        if self._table is None or self._table[0] != key:
            scales = lambda li: [t[li].data_ptr() if t is not None else 0 for t in (cache.ks, cache.vs)]  # noqa: E731
            rows = [[*ptrs[:10], cache.k[li].data_ptr(), cache.v[li].data_ptr(), ptrs[10], *scales(li)]
                    for ptrs, li, _ in self.native]
            self._table = (key, torch.tensor(rows, dtype=torch.int64))  # (layers, 15)
        return self._table[1]

    def _lora_ready(self) -> bool:
        """The LoRA table, built on first use and again if the slot buffers moved (it holds
        their addresses); False when some group's slots are not in a kernel dtype."""
        layers = list(self.mapping.layers.values())
        key = tuple(t.data_ptr() for p in (layers[0], layers[-1])
                    for t in (p.lora_a_stacked, p.lora_b_stacked))
        if self._lora is None or self._lora_key != key:
            self._lora, self._lora_key = _lora_table(self.model) or (), key
        return bool(self._lora)

    def _native_call(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx,
                     adapters: bool = False) -> torch.Tensor:
        """h (N, hidden) embeddings, cos/sin (N, D) -> (N, hidden) after the final norm, through
        `shoal_llama_decode` (with the step's adapter slots when `adapters`)."""
        n, hid = h.shape
        c = self.model.config
        nh, hkv, d, inter = self.h, self.hkv, self.d, c.intermediate_size
        h = h.contiguous()
        cos, sin = cos.to(h.dtype).reshape(n, d).contiguous(), sin.to(h.dtype).reshape(n, d).contiguous()
        need = n * (3 * hid + (nh + 2 * hkv) * d + nh * d + 3 * inter)
        if self._scratch.numel() < need:
            self._scratch = torch.empty(need, dtype=torch.bfloat16)
        out = torch.empty_like(h)
        cache, r = ctx.cache, ctx.decode_rows
        slot_mapping = ctx.slot_mapping.contiguous()
        kernels.ops._check(slot_mapping.numel() == n and r.rows.dtype == torch.int64, "decode rows")
        lora_table, slots_t, dtw = 0, 0, 0
        if adapters:
            table, _, dtw = self._lora
            slot_t = self.mapping.slot_tensor()  # (N,) each row's adapter slot, -1 = base
            kernels.ops._check(slot_t.numel() == n and slot_t.dtype == torch.int64
                               and int(slot_t.max()) < self.mapping.max_loras, "LoRA slots")
            lora_table, slots_t = table.data_ptr(), slot_t.data_ptr()
        dims = torch.tensor([hid, nh, hkv, d, inter, cache.k.shape[2], int(ctx.window or 0),
                             kernels.ops._DTC[cache.k.dtype], self.kind, dtw], dtype=torch.int64)
        rc = kernels.library().shoal_llama_decode(
            n, len(self.native), self._pointer_table(cache).data_ptr(), dims.data_ptr(), self._eps,
            self._final_eps, d ** -0.5, h.data_ptr(), cos.data_ptr(), sin.data_ptr(),
            slot_mapping.data_ptr(), r.rows.data_ptr(), r.rows.numel(), r.slots.data_ptr(),
            r.offsets.data_ptr(), self._final_w.data_ptr(), out.data_ptr(), self._scratch.data_ptr(),
            lora_table, slots_t)
        kernels.ops._check(rc == 0, f"llama_decode: a kernel refused its input ({rc})")
        return out


def _amx_kind(m: nn.Module, bias_ok: bool = False) -> int | None:
    """0 for a packed int8 product, 1 for a bf16 one (`PackedBF16Linear`), 2 for q4, without a bias
    (or, when `bias_ok`, a contiguous bf16 one); else None. A LoRA wrapper counts by its base (its
    deltas come from `_lora_table`)."""
    if isinstance(m, QuantLinear):
        packed = m.packed
    else:
        packed = isinstance(m, LoRALinear) and getattr(m, "qpacked", False)
    if not packed or not m.qweight.is_contiguous():
        return None
    if m.bias is not None and not (bias_ok and m.bias.dtype == torch.bfloat16 and m.bias.is_contiguous()):
        return None
    if m.qscale is None:
        return {torch.bfloat16: 1, torch.uint8: 2}.get(m.qweight.dtype)
    return 0 if m.qscale.dtype == torch.bfloat16 and m.qscale.is_contiguous() else None


def _native_layers(model: Transformer) -> list | None:
    """(weight kind, per layer (its 11 weight pointers, its index, the tensors)) when every block's
    products are packed (`kernels.qlinear`, `kernels.q4linear`), all int8 (kind 0), bf16 (kind 1) or
    q4 (kind 2), without biases but a bf16 one on q|k|v (Qwen2's), the norms share one eps and their
    weights are bf16; else None."""
    if not qlinear.packed_ready():
        return None
    bb = model.backbone
    out, eps, kinds = [], set(), set()
    for blk in bb.layers:
        at, mlp = blk.self_attn, blk.mlp
        prods = (at.fused_qkv, at.o_proj, mlp.fused_gate_up, mlp.down_proj)
        norms = (blk.input_layernorm, blk.post_attention_layernorm)
        kinds |= {_amx_kind(p, bias_ok=i == 0) for i, p in enumerate(prods)}  # Qwen2: a q|k|v bias
        if None in kinds or len(kinds) > 1:
            return None
        if not all(nm.weight.dtype == torch.bfloat16 and nm.weight.is_contiguous() for nm in norms):
            return None
        eps |= {float(nm.eps) for nm in norms}
        qkv, o, gu, dn = prods
        ln1, ln2 = norms
        sp = [p.qscale.data_ptr() if p.qscale is not None else 0 for p in prods]
        qkv_b = qkv.bias.data_ptr() if qkv.bias is not None else 0
        out.append(([ln1.weight.data_ptr(), qkv.qweight.data_ptr(), sp[0], o.qweight.data_ptr(), sp[1],
                     ln2.weight.data_ptr(), gu.qweight.data_ptr(), sp[2], dn.qweight.data_ptr(), sp[3], qkv_b],
                    at.layer_idx,
                    # the tensors themselves: the addresses stay valid while this forward lives
                    (ln1.weight, ln2.weight, qkv.bias, *(t for p in prods for t in (p.qweight, p.qscale)))))
    if len(eps) != 1 or bb.norm.weight.dtype != torch.bfloat16:
        return None
    return kinds.pop(), out


def _lora_table(model: Transformer) -> tuple | None:
    """(table (layers, 4 groups x 4) int64, plans, slot dtype code) for the one-call path's LoRA
    deltas: per layer and product (q/k/v, o, gate/up, down), [LoRA layers n, A slot stride, the
    `kernels.BGMVLayers` pointer table, column offsets of each layer in the product's output]
    (n = 0: no LoRA there). None when the slots are not fp32, bf16 or int8."""
    from ..kernels.ops import _DTW

    rows, keep, dts = [], [], set()
    c = model.config
    nh, hkv, d = c.num_heads, c.num_kv_heads, c.head_dim
    for blk in model.backbone.layers:
        at, mlp = blk.self_attn, blk.mlp
        groups = (((at.q_proj, 0), (at.k_proj, nh * d), (at.v_proj, (nh + hkv) * d)), ((at.o_proj, 0),),
                  ((mlp.gate_proj, 0), (mlp.up_proj, mlp.gate_proj.out_features)), ((mlp.down_proj, 0),))
        row = []
        for group in groups:
            lora = [(p, off) for p, off in group if isinstance(p, LoRALinear)]
            if not lora:
                row += [0, 0, 0, 0]
                continue
            layers = [p for p, _ in lora]
            q8 = layers[0].quantized  # int8 slots: with their rows' scales
            as_ = [p.lora_a_stacked for p in layers]  # (a group's: views of its one buffer)
            asc = [p.lora_a_qscale for p in layers] if q8 else None
            dts |= {a.dtype for a in as_}
            if len({a.stride(0) for a in as_}) > 1 or any(a.dtype not in _DTW for a in as_):
                return None
            plan = kernels.BGMVLayers(as_, [p.lora_b_stacked for p in layers], [p.scale_f32 for p in layers],
                                      [p.rank_t for p in layers], asc,
                                      [p.lora_b_qscale for p in layers] if q8 else None)
            offs = torch.tensor([off for _, off in lora], dtype=torch.int64)
            keep += [plan, offs]
            row += [len(layers), plan.sa, plan.table.data_ptr(), offs.data_ptr()]
        rows.append(row)
    if len(dts) > 1:
        return None
    return torch.tensor(rows, dtype=torch.int64), keep, _DTW[dts.pop()] if dts else 0
