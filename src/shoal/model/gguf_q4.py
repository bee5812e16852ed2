"""A GGUF file's 4-bit layers as q4 groups (`quantization="q4"`), read from its blocks instead of
re-quantized from the converted weights.

q4 stores groups of 32 inputs as w = d q + m (q in 0..15, d and m fp16: `kernels.q4linear`).
GGUF's 4-bit types map onto that:
- Q4_1 (d, m, 32 codes) exactly;
- Q4_0 (d, 32 codes, w = d (q - 8)) exactly, with m = -8 d;
- Q4_K (super-blocks of 256: fp16 d and dmin, 6-bit scale and min per 32, w = d sc q - dmin mn)
  with d sc and dmin mn rounded once to fp16 (relative 2^-11; the codes are kept).
Re-quantizing Q4_0 or Q4_K values into Q4_1 groups would put them on another grid and add its own
rounding. Other types (Q5, Q6_K, Q8_0, F16, ...) are not 4-bit: those layers are quantized as usual.

`gguf_q4_codes(path)` -> {module path: (q (N, K) uint8, d, m (N, K / 32) fp16)} for the Llama and
Qwen2 layouts (q/k rows un-permuted as `gguf.read_tensors` does). `convert_gguf` saves them beside
the converted weights (`save_codes`; reading a GGUF's metadata again would cost ~2 s a start) and
`codes_for(source)` loads them for the engine.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .gguf import _unpermute, hf_name, open_gguf, read_config


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., 16) bytes -> (..., 32) codes: ggml's order, element i low nibble of byte i, element
    16 + i its high nibble."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def _f16(b: np.ndarray) -> np.ndarray:
    """(..., 2) bytes -> (...) float16."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0]


def _q4_0(raw: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    blk = raw.reshape(rows, -1, 18)  # d, 16 bytes of codes
    d = _f16(blk[..., 0:2])
    return _nibbles(blk[..., 2:]).reshape(rows, -1), d, (d.astype(np.float32) * -8).astype(np.float16)


def _q4_1(raw: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    blk = raw.reshape(rows, -1, 20)  # d, m, 16 bytes of codes
    return _nibbles(blk[..., 4:]).reshape(rows, -1), _f16(blk[..., 0:2]), _f16(blk[..., 2:4])


def _q4_k(raw: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    blk = raw.reshape(rows, -1, 144)  # d, dmin, 12 bytes of 6-bit scales and mins, 128 of codes
    d = _f16(blk[..., 0:2]).astype(np.float32)[..., None]  # (rows, nsb, 1)
    dmin = _f16(blk[..., 2:4]).astype(np.float32)[..., None]
    s = blk[..., 4:16].astype(np.uint8)  # (rows, nsb, 12)
    # sub-block j < 4: scale s[j] & 63, min s[j + 4] & 63; j >= 4: the low nibbles of s[j + 4]
    # and the top two bits of s[j - 4] (scale), the high nibbles of s[j + 4] and the top bits of s[j] (min)
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    qs = blk[..., 16:].reshape(rows, -1, 4, 32)  # 4 x 32 bytes: low nibbles sub-block 2i, high 2i + 1
    q = np.stack([qs & 15, qs >> 4], axis=3).reshape(rows, -1)  # (rows, K)
    gd = (d * sc.astype(np.float32)).astype(np.float16).reshape(rows, -1)
    gm = (-(dmin * mn.astype(np.float32))).astype(np.float16).reshape(rows, -1)
    return q, gd, gm


DECODERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k}


def decode(t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """One GGUF ReaderTensor of a 4-bit type -> (q, d, m) of its (rows, cols) matrix; None for
    other types."""
    fn = DECODERS.get(t.tensor_type.name)
    if fn is None:
        return None
    cols, rows = (int(x) for x in t.shape.tolist()[:2])
    q, d, m = fn(np.asarray(t.data, dtype=np.uint8).reshape(-1), rows)
    if q.shape != (rows, cols):
        return None
    return (torch.from_numpy(q.astype(np.uint8)), torch.from_numpy(np.ascontiguousarray(d)),
            torch.from_numpy(np.ascontiguousarray(m)))


def gguf_q4_codes(path: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{module path: (q, d, m)} of the file's 4-bit linear weights (Llama and Qwen2 layouts)."""
    reader = open_gguf(path)
    config = read_config(reader, path)
    arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}.get(config["model_type"])
    if arch is None:
        return {}
    heads = config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads", heads)
    out = {}
    for t in reader.tensors:
        name = hf_name(t.name, arch)
        if name is None or not name.endswith(".weight") or len(t.shape) != 2:
            continue
        codes = decode(t)
        if codes is None:
            continue
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):  # rows as read_tensors
            n = heads if "q_proj" in name else kv_heads
            codes = tuple(torch.from_numpy(np.ascontiguousarray(_unpermute(c.numpy(), n))) for c in codes)
        out[name[:-len(".weight")]] = codes
    return out


# beside a converted GGUF's weights (`convert.convert_gguf`); safetensors inside, but not named
# *.safetensors: the loader reads every such file as model weights
CODES_FILE = "shoal_q4_codes.st"


def save_codes(codes: dict, path: str) -> None:
    """Write codes as safetensors: per layer `<path>.q` (N, K / 2) two codes a byte (even input
    low), `<path>.d` and `<path>.m` fp16."""
    from safetensors.torch import save_file

    out = {}
    for name, (q, d, m) in codes.items():
        out[f"{name}.q"] = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
        out[f"{name}.d"], out[f"{name}.m"] = d.contiguous(), m.contiguous()
    save_file(out, path, metadata={"format": "shoal-q4"})


class SavedCodes:
    """The codes of a `CODES_FILE`, read a layer at a time when asked (`get`), so loading them
    costs no more memory than the layer being packed."""

    def __init__(self, path: str) -> None:
        from safetensors import safe_open

        self._file = safe_open(path, framework="pt")
        self._names = sorted(k[:-2] for k in self._file.keys() if k.endswith(".q"))

    def keys(self) -> list[str]:
        return list(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __getitem__(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if name not in self._names:
            raise KeyError(name)
        packed = self._file.get_tensor(f"{name}.q")  # (N, K / 2): even input low, odd high
        q = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
        return q, self._file.get_tensor(f"{name}.d"), self._file.get_tensor(f"{name}.m")

    def get(self, name: str, default=None):
        return self[name] if name in self._names else default


def codes_for(source: str) -> SavedCodes | dict:
    """The 4-bit codes saved beside the converted model directory `source` when it was converted
    from a GGUF file (`CODES_FILE`), read a layer at a time; {} when there are none (a HF
    directory, a file without 4-bit layers, or a cache converted before codes were kept)."""
    path = os.path.join(source, CODES_FILE)
    return SavedCodes(path) if os.path.isfile(path) else {}
