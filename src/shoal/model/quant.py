"""Quantized weights for inference: weight-only int8 (per-output-channel scales) and q4 (4-bit,
GGUF's Q4_1 groups; `shoal.kernels.q4linear`). (The engine's packed bf16 layers,
`PackedBF16Linear`, reuse `QuantLinear`: `shoal.model.bf16_linear`.)

`quantize_model` swaps every Linear (lm_head included) for a `QuantLinear` in place and, when the
embedding is tied to lm_head, the embedding for a `QuantEmbedding` reading the same int8 rows, so
the float matrices are freed (4x less weight memory from fp32). Activations stay in the model's
dtype; only the matmul sees bf16 inputs (CPU kernel).

Why: CPU decode reads every weight once per token, so it is memory-bound. Two CPU kernels:
- with AMX-BF16 or AVX512-BF16 (and the C++ kernels built), weights are packed at quantization
  (`shoal.kernels.qlinear`): each int8 block is widened exactly to bf16 in the kernel and multiplied
  in AMX tiles or by AVX512-BF16 dot products. Measured (`bench/cpu_products.py`: Xeon with AMX, 2
  threads, SmolLM2-135M's 121 products a decode step, 135 MB of int8 weights): 7.5 ms a step at 1
  row and 9.5 at 32, vs bf16 on the same tiles 9.6 and 11.9, bf16 `F.linear` 19.5 and 23.8,
  `_weight_int8pack_mm` 13.9 and 83.4; AMD EPYC with AVX512-BF16 (no AMX): 4.4-4.7 ms at 1 row and
  16.0 at 32 vs `_weight_int8pack_mm` 5.3-5.5 and 33.1. Any row count gives a row the same bits.
- otherwise `_weight_int8pack_mm` (row-major weights). Measured (torch 2.13, 2 shared AVX2
  cores, 1 thread, 60 distinct 1536x576 layers so weights come from DRAM): 1.5x faster than
  fp32 F.linear at 1-4 rows and 1.5x slower at 32 rows (2x at 128: the AVX2 kernel is
  compute-bound). Whole decode step of SmolLM2-135M, one stream: 52.6 -> 44.7 ms.
"""

from __future__ import annotations

import gc
import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import q4linear as q4
from ..kernels import qlinear as amx
from .layers import Linear

log = logging.getLogger(__name__)

MODES = ("int8", "q4")
"""Quantization modes `quantize_model` (and EngineConfig.quantization) accept."""

_HAS_OP = hasattr(torch.ops.aten, "_weight_int8pack_mm")
_OP_FAILED: set[str] = set()  # device types where the op raised once (then: dequantize)
_ALIGN = 64  # bytes; the AVX2/AVX512 kernels use aligned loads on the activation rows
_K_MULTIPLE = 16  # the vector kernels step K by 8 (AVX2) or 16 (AVX512) with no tail
_ROWS = 256  # rows per block when quantizing


def _ceil_bf16(x: torch.Tensor) -> torch.Tensor:
    """Positive fp32 values rounded up to the next bf16-representable value (fp32 result)."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0xFFFF) & -0x10000).view(torch.float32)


@torch.no_grad()
def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: weight (out, in) -> qweight (out, in) int8, qscale (out,) fp32.

    scale = amax(|row|) / 127, rounded up to a bf16 value (the CPU kernel takes bf16 scales, so
    it then uses the scale exactly); a zero row gets scale 1 and q = 0. q = round(w / scale)
    (half to even), so |w - q * scale| <= scale / 2 and |q| <= 127.
    """
    w = weight.detach()
    amax = torch.linalg.vector_norm(w, float("inf"), dim=1, dtype=torch.float32)  # (out,) max |w|
    scale = _ceil_bf16(torch.where(amax > 0, amax / 127, torch.ones_like(amax)))
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    for r in range(0, w.shape[0], _ROWS):  # row blocks: the fp32 temporaries stay in cache
        blk = torch.div(w[r:r + _ROWS].float(), scale[r:r + _ROWS, None])
        q[r:r + _ROWS] = blk.round_().clamp_(-127, 127)
    return q, scale


def dequantize_int8(qweight: torch.Tensor, qscale: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """qweight (out, in) int8, qscale (out,) -> (out, in) float: q * scale, rounded once to dtype."""
    return (qweight.float() * qscale.float()[:, None]).to(dtype)


def kernel_dtype(device: torch.device | str, dtype: torch.dtype) -> torch.dtype:
    """Activation dtype of the int8 kernel: bf16 on CPU (its fp32/fp16 paths are scalar and
    slow), the model's dtype elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cpu" else dtype


def _fallback(x2: torch.Tensor, qweight: torch.Tensor, qscale: torch.Tensor) -> torch.Tensor:
    # x2 (M, in) -> (M, out): dequantize the whole matrix for this call (slow; rare shapes only)
    return F.linear(x2, dequantize_int8(qweight, qscale, x2.dtype))


def quant_linear(x: torch.Tensor, qweight: torch.Tensor, qscale: torch.Tensor,
                 bias: torch.Tensor | None = None, packed: bool = False) -> torch.Tensor:
    """y = x @ (qweight * qscale[:, None]).T + bias, in x's dtype.

    Args:
        x: (..., in) activations, any float dtype.
        qweight: (out, in) int8, row-major, or in the packed order when `packed` (`kernels.qlinear`:
            then our packed kernel computes it, or, with the kernels switched off, the row-major
            path on an unpacked copy). packed bf16 weights (`PackedBF16Linear`) with qscale None.
            uint8 (out, in * 5 / 8): q4 weights packed by `kernels.q4linear.q4pack`, qscale None
            (their product quantizes x's rows to int8 per 32 inputs: see that module).
        qscale: (out,) per-output-channel scales (any float dtype; bf16 on CPU avoids a cast);
            None for bf16 weights (no scaling).
        bias: (out,) or None: added in x's dtype after the product, except on the packed kernel with
            a bf16 bias, which adds it to the fp32 sum before the one rounding (as F.linear).
    Returns:
        (..., out) in x.dtype. On CPU the product runs on bf16 inputs with fp32 accumulation and a
        bf16 result (fp32 for fp32 inputs on the packed kernel), each output from its own
        accumulator (a row's result does not depend on the other rows in the call).
    """
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)  # (M, in)
    if qweight.dtype == torch.uint8:  # q4: packed 4-bit groups (`kernels.q4linear`), no qscale
        return q4.q4_linear(x2, qweight, bias).view(*lead, qweight.shape[0])
    if packed:
        if amx.usable(x2):
            # the bias joins the kernel's fp32 sum when it is bf16 (one rounding, as F.linear);
            # an fp32 model's bias is added afterwards in fp32, as the row-major path does
            kb = bias if bias is not None and bias.dtype == torch.bfloat16 else None
            # an fp32 model's outputs stay fp32 (the kernel's sum unrounded: no bf16 ties in logits)
            odt = torch.float32 if x.dtype == torch.float32 else torch.bfloat16
            if qscale is None:
                y = amx.blinear(x2, qweight, kb, odt)
            else:
                s = qscale if qscale.dtype == torch.bfloat16 else qscale.bfloat16()
                y = amx.qlinear(x2, qweight, s, kb, odt)
            y = y.to(x.dtype)
            if bias is not None and kb is None:
                y.add_(bias)
            return y.view(*lead, qweight.shape[0])
        qweight = amx.qunpack(qweight)  # kernels off (an A/B): slow, but the same product
    if qscale is None:  # bf16 weights, kernels off: the plain product
        return F.linear(x2, qweight.to(x.dtype), bias).view(*lead, qweight.shape[0])
    dev = x.device.type
    if _HAS_OP and dev not in _OP_FAILED and (dev != "cpu" or k % _K_MULTIPLE == 0):
        cdt = torch.bfloat16 if dev == "cpu" else x.dtype  # kernel_dtype, inlined (hot path)
        xc = x2.to(cdt)  # a cast allocates a fresh, aligned, contiguous buffer
        if xc.stride(-1) != 1 or (dev == "cpu" and xc.data_ptr() % _ALIGN):
            xc = xc.clone(memory_format=torch.contiguous_format)  # views: the kernel needs aligned rows
        s = qscale if qscale.dtype == cdt else qscale.to(cdt)
        try:
            y = torch.ops.aten._weight_int8pack_mm(xc, qweight, s)  # (M, out) in cdt
        except (RuntimeError, NotImplementedError):
            if dev == "cpu":
                raise
            _OP_FAILED.add(dev)  # e.g. a CUDA build without the kernel: dequantize from now on
            y = _fallback(x2, qweight, qscale)
        y = y.to(x.dtype)
    else:
        y = _fallback(x2, qweight, qscale)
    if bias is not None:
        y.add_(bias)  # y is a fresh tensor here
    return y.view(*lead, qweight.shape[0])


class QuantLinear(Linear):
    """A Linear whose weight is int8 with per-output-channel scales (`weight` is None), or q4
    (`qweight` uint8 packed 4-bit groups, `qscale` None, `packed` True).

    Buffers (non-persistent): `qweight` (out, in) int8 (in the packed order when `packed`; see
    `plain_weight`), `qscale` (out,) in the kernel dtype (bf16 on CPU). `bias` stays a float
    Parameter. forward(x (..., in)) -> (..., out) in x's
    dtype via `quant_linear`; `k_chunk` (split-K for batch invariance) is ignored: the int8
    kernel is row-invariant as it is. Still an nn.Linear, so LoRA target discovery finds it.
    """

    def __init__(self, in_features: int, out_features: int, qweight: torch.Tensor,
                 qscale: torch.Tensor, bias: nn.Parameter | None = None, packed: bool = False) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.packed = packed
        self.register_parameter("weight", None)
        self.register_parameter("bias", bias)
        self.register_buffer("qweight", qweight, persistent=False)
        self.register_buffer("qscale", qscale, persistent=False)

    @classmethod
    def from_linear(cls, layer: nn.Linear, mode: str = "int8", codes: tuple | None = None) -> "QuantLinear":
        """Quantize `layer`'s weight (its bias Parameter is reused as is): int8, packed for our
        kernel when this CPU runs it and the shape fits; q4 (packed) on CPU where the shape fits
        (out % 16, in % 32), else int8. `codes`: the q4 groups (q, d, m) to keep for this weight
        (a GGUF file's own, `model.gguf_q4`), used when they stand for it (within 1% in norm)."""
        w = layer.weight
        if mode == "q4" and w.is_cpu and q4.fits(*w.shape):
            if codes is None or not _codes_match(codes, w):
                codes = q4.quantize_q4(w)
            return cls(layer.in_features, layer.out_features, q4.q4pack(*codes), None, layer.bias, True)
        q, s = quantize_int8(layer.weight)
        s = s.to(kernel_dtype(layer.weight.device, layer.weight.dtype))
        packed = q.is_cpu and amx.packable(*q.shape)
        if packed:
            q = amx.qpack(q)
        return cls(layer.in_features, layer.out_features, q, s, layer.bias, packed)

    def plain_weight(self) -> torch.Tensor:
        """(out, in) row-major int8 (bf16 for an `PackedBF16Linear`, the dequantized fp32 weight for
        q4; a copy when packed)."""
        if self.qweight.dtype == torch.uint8:
            return q4.dequantize_packed(self.qweight)
        return amx.qunpack(self.qweight) if self.packed else self.qweight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.qweight, self.qscale, self.bias, self.packed)

    def extra_repr(self) -> str:
        kind = "q4" if self.qweight.dtype == torch.uint8 else "int8"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {kind}")


class QuantEmbedding(nn.Module):
    """Token embedding read from int8 rows: forward(ids (...,)) -> (..., dim) in `dtype`,
    out = qweight[ids] * qscale[ids] (computed in fp32, rounded once to dtype).

    Made for tied embeddings: `qweight`/`qscale` are the lm_head QuantLinear's own buffers (packed
    order when `packed`).
    """

    def __init__(self, qweight: torch.Tensor, qscale: torch.Tensor, dtype: torch.dtype,
                 packed: bool = False) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.dtype, self.packed = dtype, packed
        self.register_buffer("qweight", qweight, persistent=False)
        self.register_buffer("qscale", qscale, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # (..., dim) int8 (bf16 for an PackedBF16Linear head's rows)
        rows = amx.qrows(self.qweight, ids) if self.packed else F.embedding(ids, self.qweight)
        if self.qscale is None:  # bf16 rows (an PackedBF16Linear head's)
            return rows.to(self.dtype)
        return (rows.float() * self.qscale[ids].float().unsqueeze(-1)).to(self.dtype)

    def extra_repr(self) -> str:
        kind = "int8" if self.qscale is not None else "bf16 packed order"
        return f"{self.num_embeddings}, {self.embedding_dim}, {kind}"


def _codes_match(codes: tuple, w: torch.Tensor) -> bool:
    """Do the q4 groups (q, d, m) stand for w (the same shape; within 1% in norm on every 16th row:
    the roundings of a conversion, not another file's weights)?"""
    q, d, m = codes
    if q.shape != w.shape or d.shape != (w.shape[0], w.shape[1] // q4.GROUP) or d.shape != m.shape:
        return False
    rows = slice(None, None, 16)  # a sample: no full-size fp32 temporaries while the model loads
    wf = w.detach()[rows].float()
    return bool((q4.dequantize_q4(q[rows], d[rows], m[rows]) - wf).norm() <= 0.01 * wf.norm())


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, module)


def quantized_mode(model: nn.Module) -> str | None:
    """"q4" or "int8" when `quantize_model` has quantized `model` (any 4-bit layer: q4), else None."""
    kinds = {m.qweight.dtype for m in model.modules() if isinstance(m, QuantLinear)}
    return None if not kinds else "q4" if torch.uint8 in kinds else "int8"


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str = "int8", codes: dict | None = None) -> int:
    """Replace every nn.Linear of `model` (lm_head included) in place by a QuantLinear; returns
    how many were replaced. mode "int8": every one int8; "q4": 4-bit where the shape fits, except
    the output layer (`lm_head`, tied to the embedding or not), which stays int8 (GGUF files keep
    it wider than the 4-bit layers too). `codes` ({module path: (q, d, m)}, q4 only): groups to keep
    as they are, a GGUF file's 4-bit blocks (`model.gguf_q4.codes_for`), instead of re-quantizing.

    An nn.Embedding sharing its weight with a replaced Linear (tied embeddings) becomes a
    QuantEmbedding on that layer's int8 buffers, so the float matrix is freed; an untied
    embedding is kept as is (a gather reads only the rows it needs, so int8 would save memory
    but no time). Layers are quantized one at a time, so peak memory stays near the float
    model; the other float tensors are copied so a memory-mapped checkpoint is released.

    A model quantized before in the same mode is left untouched (returns 0): engines built on it
    earlier hold its tensors' addresses (the one-call decode), and copying them again freed what
    those engines read (measured: an engine's greedy tokens turned to id 0 after a second engine
    was built on its model). Another mode raises ValueError.
    """
    if mode not in MODES:
        raise ValueError(f"quantization: must be one of {', '.join(MODES)}, got {mode!r}")
    have = quantized_mode(model)
    if have is not None:  # a model shared by engines: quantized once, left as it is after
        if have != mode:
            raise ValueError(f"quantization: the model is already quantized ({have}); load it again "
                             f"for {mode}")
        return 0
    if mode == "q4" and not amx.packed_ready():
        log.warning("shoal: q4 without Shoal's CPU kernels (x86 with AVX2 and a C++ compiler) dequantizes "
                    "each layer's weight at every call: slow; int8 or bf16 run faster here")
    linears = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and getattr(m, "weight", None) is not None]
    embeddings = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    tied: dict[int, list[tuple[str, nn.Embedding]]] = {}
    for n, e in embeddings:
        tied.setdefault(id(e.weight), []).append((n, e))
    # One intra-op thread: the blocks are small, and OpenMP spin-waiting beside other busy
    # processes made this take 32 s instead of 1 s on SmolLM2-135M (measured, 2 shared cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for path, layer in linears:
            head = id(layer.weight) in tied or path.rpartition(".")[2] == "lm_head"
            q = QuantLinear.from_linear(layer, "int8" if head else mode, (codes or {}).get(path))
            for epath, emb in tied.pop(id(layer.weight), []):
                _set_module(model, epath, QuantEmbedding(q.qweight, q.qscale, emb.weight.dtype,
                                                                   q.packed))
            _set_module(model, path, q)
            layer.weight = None  # drop this module's reference now (someone may hold the module)
    finally:
        torch.set_num_threads(threads)
    n = len(linears)
    del linears, embeddings, tied
    # The kept float tensors (norms, biases, an untied embedding) may be views into the loader's
    # memory-mapped checkpoint, which they would keep mapped (measured: +520 MB RSS on
    # SmolLM2-135M once quantizing has read every page). Own copies let the mapping go.
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            t.data = t.data.clone()
    gc.collect()
    return n
