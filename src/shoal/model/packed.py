"""Linear weights pre-packed into oneDNN's blocked layout, for the engine on CPU.

`pack_linears(model)` replaces each float CPU linear's (out, in) weight by the same numbers
reordered once into the layout oneDNN's GEMM reads directly (`torch.ops.mkldnn.
_reorder_linear_weight`); `shoal.model.layers.linear` then calls `mkldnn._linear_pointwise` on
it. F.linear on a plain weight reorders (or reads strided) on every call, which is most of the
cost of a thin product. Measured on SmolLM2-135M shapes (torch 2.13, 2-core AVX-512 EPYC,
2 threads, weights hot in cache, F.linear -> packed, microseconds; in a whole decode step, where
every weight comes from memory, one stream ran 1.24-1.25x faster and 32 streams 1.13-1.19x with
the tied head packed, 1.09-1.18x and 1.02-1.25x with it plain, the engine's default):

    bf16  (3072, 576)   M=1  124 -> 52    M=32  400 -> 302   M=512  4663 -> 4468
    bf16  (576, 1536)   M=1   85 -> 48    M=32  210 -> 169
    bf16  (49152, 576)  M=1 3402 -> 2139  M=32 8094 -> 5486
    fp32  (3072, 576)   M=1  140 -> 69    M=32  800 -> 608   M=512 10583 -> 8418
    fp32  (49152, 576)  M=1 9499 -> 4486  M=32 23683 -> 9668

The numbers are the same weights: a packed bf16 product gives F.linear's bits at one row, and,
like F.linear, a row's result is the same for any number of rows (1..1024 measured) while
K <= 1024 and not beyond (K = 1536 and 2048 measured), so for batch invariance wider bf16 layers
are packed in split-K chunks (`k_chunk`; see `PackedWeight` for how they are summed).
fp32 packed products are row-invariant at K <= 576 and not at K = 1536, as fp32 F.linear
already was not (fp32 matches token for token, not bit for bit).

What changes for the rest of the model:
- Each packed layer's `weight` is a `PackedWeight`: a Parameter with the logical shape and
  dtype on the meta device (no memory), so LoRA wrappers and shape checks read it as before,
  and the packed pieces in `chunks`. It supports only this product: no views, no autograd.
  The engine packs; training never does.
- The parts of a fused projection (`shoal.model.fused`) held views of the fused weight; they
  get a PackedWeight without chunks (shape and dtype, no memory): the fused product computes
  them, and calling a part alone raises instead of computing with a stale copy.
- A head tied to the input embedding stays plain unless `pack_tied` (then it gets its own
  packed copy, V x hidden more memory: 57 MB for SmolLM2-135M in bf16, since the embedding
  keeps the plain matrix for its row lookups; see `pack_linears`).
"""

from __future__ import annotations

import torch
from torch import nn


_OPS: dict[str, object] = {}  # "reorder", "linear": the ops found (`packing_available`)


def _find_op(name: str):
    # torch registers these under `mkldnn` (2.x CPU builds) and, in some builds, `onednn`
    for ns in ("mkldnn", "onednn"):
        try:
            return getattr(getattr(torch.ops, ns), name)
        except (AttributeError, RuntimeError):
            continue
    return None


def packing_available() -> bool:
    """Do this torch build's oneDNN ops for packed linears exist?"""
    if not _OPS:
        if not torch.backends.mkldnn.is_available():
            return False
        reorder, linear = _find_op("_reorder_linear_weight"), _find_op("_linear_pointwise")
        if reorder is None or linear is None:
            return False
        _OPS.update(reorder=reorder, linear=linear)
    return True


class PackedWeight(nn.Parameter):
    """A linear's (out, in) weight held as oneDNN-packed pieces: the Parameter itself is a
    meta tensor (shape and dtype, no memory); `chunks` holds (start, stop, packed) column
    ranges, one unless split-K is in effect. `dense()` gives the plain matrix back, bit for bit.

    Semantics of `linear(x, bias)`: one chunk: x @ W.T + bias in x's dtype; several:
        y = x[:, c0] @ W[:, c0].T + bias                 # rounded to x's dtype
        for c in the other chunks: y = x[:, c] @ W[:, c].T + y   # fp32 sum, rounded again
    (oneDNN's fused "add" post-op: each product accumulates in fp32 and adds the running sum
    before it is rounded). Each step's product has a fixed K, so a row's bits do not depend on
    the number of rows; against `shoal.model.layers.linear`'s split-K (chunks rounded, summed
    in fp32) it rounds as often and saves the casts: the down projection of SmolLM2-135M at one
    row 87 -> 67 us (torch 2.13, AVX-512, 2 threads).
    """

    chunks: tuple[tuple[int, int, torch.Tensor], ...]

    @staticmethod
    def of(weight: torch.Tensor, k_chunk: int = 0) -> "PackedWeight":
        """Pack a plain (out, in) CPU weight, in K chunks of at most k_chunk (0 = whole)."""
        if not packing_available():
            raise RuntimeError("packed weights need torch's oneDNN (mkldnn) linear ops")
        w = weight.detach()
        k = w.shape[1]
        step = k
        if 0 < k_chunk < k:  # the same cut as `shoal.model.layers.linear`
            n = -(-k // k_chunk)
            step = -(-k // n)
        out = PackedWeight(torch.empty(w.shape, dtype=w.dtype, device="meta"), requires_grad=False)
        out.chunks = tuple((c, min(c + step, k),
                            _OPS["reorder"](w[:, c:c + step].contiguous()))
                           for c in range(0, k, step))
        return out

    @staticmethod
    def part_of_fused(weight: torch.Tensor) -> "PackedWeight":
        """The weight of a fused projection's part: its shape and dtype, no chunks (the fused
        layer computes it); using it alone raises."""
        out = PackedWeight(torch.empty(weight.shape, dtype=weight.dtype, device="meta"), requires_grad=False)
        out.chunks = ()
        return out

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x (..., in) -> (..., out) in x's dtype (see the class docstring)."""
        if not self.chunks:
            raise RuntimeError("this layer is part of a fused, packed projection "
                               "(shoal.model.fused): call the fused layer")
        if len(self.chunks) == 1:
            return _OPS["linear"](x, self.chunks[0][2], bias, "none", [], "")
        (a, b, w), *rest = self.chunks  # split-K: the products summed chunk by chunk
        y = _OPS["linear"](x[..., a:b], w, bias, "none", [], "")
        for a, b, w in rest:
            y = _OPS["linear"].binary(x[..., a:b], y, w, None, "add")
        return y

    def dense(self) -> torch.Tensor:
        """The plain (out, in) weight."""
        return torch.cat([w.to_dense() for _, _, w in self.chunks], dim=1)

    def __deepcopy__(self, memo):
        if id(self) not in memo:
            twin = PackedWeight(torch.empty(self.shape, dtype=self.dtype, device="meta"), requires_grad=False)
            twin.chunks = tuple((a, b, w.clone()) for a, b, w in self.chunks)
            memo[id(self)] = twin
        return memo[id(self)]


def bf16_packing_ok() -> bool:
    """Does oneDNN have bf16 kernels on this CPU (torch's own check: AVX-512 BW/VL/DQ on x86) with
    native bf16 dot products (AVX512-BF16 or AMX)? Without the first a packed bf16 product would
    run oneDNN's slow reference code, while F.linear falls back to PyTorch's own kernels. Without
    the second (Skylake-SP, Cascade Lake) oneDNN emulates bf16 and its products are not
    row-invariant (measured on a Cascade Lake: 64 rows in pieces of 32 gave other bits than one
    row at a time, at K = 576). bf16 weights stay plain there (the engine runs them on Shoal's
    packed products, `kernels.qlinear`, where the kernels are on)."""
    op = _find_op("_is_mkldnn_bf16_supported")
    try:
        supported = bool(op()) if op is not None else False
    except RuntimeError:
        return False
    return supported and native_bf16_cpu()


def native_bf16_cpu() -> bool:
    """The CPU has native bf16 dot products (AVX512-BF16 or AMX-BF16, in /proc/cpuinfo's flags)."""
    from ..kernels.build import cpu_flags

    flags = cpu_flags().split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _packable(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    if not (isinstance(m, nn.Linear) and isinstance(w, torch.Tensor) and w.device.type == "cpu"
            and not isinstance(w, PackedWeight)):
        return False
    return w.dtype == torch.float32 or (w.dtype == torch.bfloat16 and bf16_packing_ok())


@torch.no_grad()
def pack_linears(model: nn.Module, k_chunk: int = 0, pack_tied: bool = False) -> int:
    """Pack every float CPU nn.Linear of `model` in place (see the module docstring), wider
    ones than k_chunk > 0 in split-K chunks; returns how many were packed (0 when oneDNN's ops
    are missing, on CUDA, for int8 layers, for bf16 ones on a CPU without oneDNN's bf16 kernels
    (`bf16_packing_ok`), or when done before). Call after `fuse_projections` and before LoRA
    wraps the layers.

    A layer sharing its weight with an embedding (a tied output layer) is packed only with
    pack_tied: its packed copy cannot serve the embedding's row lookups, so it costs V x hidden
    more memory. SmolLM2-135M bf16, 2 threads: the packed head made a one-row decode step
    about 6% faster (27.6 vs 29.3 ms, alternated), a 32-row step 1-2%, and raised the peak RSS of
    32 streams x 1k tokens by 40-50 MB, past 1.5 GB; so the engine leaves bf16 tied heads plain.
    A batch-invariant fp32 engine packs them: a plain fp32 GEMM gives a row other bits at other
    row counts, the packed product does not (and ran faster: SmolLM2-135M fp32, 32 streams
    372.9-381.2 -> 435.3-446.9 tok/s, +105 MB peak RSS).
    """
    if not packing_available():
        return 0
    from .fused import fused_part_ids  # fused imports layers, which imports this module

    parts = fused_part_ids(model)
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    n = 0
    for m in list(model.modules()):
        if id(m) in parts:
            if _packable(m):  # a view of the fused weight: keep only its shape and dtype
                m.weight = PackedWeight.part_of_fused(m.weight)
            continue
        if _packable(m) and (pack_tied or id(m.weight) not in tied):
            m.weight = PackedWeight.of(m.weight, k_chunk)  # with pack_tied, the embedding keeps the old one
            n += 1
    return n
