"""GGUF files -> a Hugging Face config dict and HF-named tensors, dequantized.

Reads llama.cpp's metadata for the `llama`, `qwen2` and `gpt2` architectures and maps every
tensor name through an explicit table (`blk.N.attn_q.weight` -> `model.layers.N.self_attn.
q_proj.weight`). llama.cpp stores Llama q/k rows interleaved for its RoPE kernel; they are
un-permuted back to HF's rotate-half layout. Quantized blocks (Q4_0, Q4_1, Q8_0, K-quants, ...)
are dequantized with the `gguf` package. The tokenizer is rebuilt by transformers from the same
file (see `tokenizer.py`). Not here: writing GGUF.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import numpy as np
import torch

from .layers import rope_inv_freq


class GGUFError(ValueError):
    """A GGUF file that cannot be read or mapped; the message names the file and the key."""


# GGUF architecture -> HF model_type
ARCHS = {"llama": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}

_LLAMA_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LLAMA_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_GPT2_BLOCK = {
    "attn_norm.weight": "ln_1.weight", "attn_norm.bias": "ln_1.bias",
    "attn_qkv.weight": "attn.c_attn.weight", "attn_qkv.bias": "attn.c_attn.bias",
    "attn_output.weight": "attn.c_proj.weight", "attn_output.bias": "attn.c_proj.bias",
    "ffn_norm.weight": "ln_2.weight", "ffn_norm.bias": "ln_2.bias",
    "ffn_up.weight": "mlp.c_fc.weight", "ffn_up.bias": "mlp.c_fc.bias",
    "ffn_down.weight": "mlp.c_proj.weight", "ffn_down.bias": "mlp.c_proj.bias",
}
_GPT2_TOP = {"token_embd.weight": "transformer.wte.weight", "position_embd.weight": "transformer.wpe.weight",
             "output_norm.weight": "transformer.ln_f.weight", "output_norm.bias": "transformer.ln_f.bias",
             "output.weight": "lm_head.weight"}
_BLK = re.compile(r"blk\.(\d+)\.(.+)$")


def open_gguf(path: str):
    """A `gguf.GGUFReader` for `path`, or GGUFError naming the file (missing, truncated, not GGUF)."""
    from gguf import GGUFReader

    if not os.path.isfile(path):
        raise GGUFError(f"{path}: no such GGUF file")
    try:
        return GGUFReader(path)
    except Exception as e:  # truncated or corrupt files fail inside numpy/memmap with odd errors
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _field(reader, key: str, default: Any = None, *, path: str = "") -> Any:
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise GGUFError(f"{path}: GGUF metadata key {key!r} is missing")
        return default
    return f.contents()


def read_config(reader, path: str) -> dict[str, Any]:
    """The HF config.json dict that the GGUF metadata describes."""
    arch = _field(reader, "general.architecture", path=path)
    if arch not in ARCHS:
        raise GGUFError(f"{path}: general.architecture {arch!r} is not supported; "
                        f"Shoal reads {sorted(ARCHS)}")
    k = lambda name, default=None: _field(reader, f"{arch}.{name}", default, path=path)  # noqa: E731
    names = {t.name for t in reader.tensors}
    n_vocab = k("vocab_size", 0) or len(_field(reader, "tokenizer.ggml.tokens", path=path))
    tok = lambda key: _field(reader, f"tokenizer.ggml.{key}", -1, path=path)  # noqa: E731
    ids = {"bos_token_id": tok("bos_token_id"), "eos_token_id": tok("eos_token_id"),
           "pad_token_id": tok("padding_token_id")}
    ids = {key: (int(v) if v != -1 else None) for key, v in ids.items()}
    tied = "output.weight" not in names
    if arch == "gpt2":
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": int(n_vocab),
                "n_embd": int(k("embedding_length")), "n_layer": int(k("block_count")),
                "n_head": int(k("attention.head_count")), "n_inner": int(k("feed_forward_length")),
                "n_positions": int(k("context_length")),
                "layer_norm_epsilon": float(k("attention.layer_norm_epsilon")),
                "activation_function": "gelu_new", "tie_word_embeddings": tied, **ids}
    heads = int(k("attention.head_count"))
    hidden = int(k("embedding_length"))
    head_dim = int(k("attention.key_length", 0) or k("rope.dimension_count", 0) or hidden // heads)
    cfg = {
        "model_type": ARCHS[arch],
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "vocab_size": int(n_vocab), "hidden_size": hidden, "num_hidden_layers": int(k("block_count")),
        "num_attention_heads": heads, "num_key_value_heads": int(k("attention.head_count_kv", heads)),
        "intermediate_size": int(k("feed_forward_length")), "head_dim": head_dim,
        "max_position_embeddings": int(k("context_length")),
        "rms_norm_eps": float(k("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(k("rope.freq_base", 10000.0)), "hidden_act": "silu",
        "tie_word_embeddings": tied, **ids,
    }
    if arch == "qwen2":
        cfg["use_sliding_window"] = False
    else:
        cfg["attention_bias"] = "blk.0.attn_q.bias" in names
    scaling_type = k("rope.scaling.type", "none")
    if scaling_type == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(k("rope.scaling.factor"))}
    elif scaling_type not in ("none", ""):
        raise GGUFError(f"{path}: {arch}.rope.scaling.type {scaling_type!r} is not supported")
    if "rope_freqs.weight" in names:
        cfg["rope_scaling"] = _llama3_scaling_from_freqs(reader, cfg, path)
    return cfg


def _llama3_scaling_from_freqs(reader, cfg: dict[str, Any], path: str) -> dict[str, Any]:
    """llama.cpp stores Llama-3 rope scaling as per-frequency factors; find the HF parameters
    that reproduce them (the published Llama 3.1 / 3.2 settings)."""
    from .config import ModelConfig

    t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    factors = torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(-1))
    for factor in (8.0, 32.0, 16.0, 4.0, 2.0):
        s = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 8192}
        mc = ModelConfig.from_hf({**cfg, "rope_scaling": s})
        base = ModelConfig.from_hf({**cfg, "rope_scaling": None})
        ratio = rope_inv_freq(base) / rope_inv_freq(mc)
        if ratio.shape == factors.shape and torch.allclose(ratio, factors, rtol=1e-3):
            return s
    raise GGUFError(f"{path}: rope_freqs.weight does not match any known Llama-3 rope scaling")


def hf_name(gguf_name: str, arch: str) -> str | None:
    """GGUF tensor name -> HF name (None for tensors that carry no weight, e.g. rope_freqs)."""
    if gguf_name == "rope_freqs.weight":
        return None
    top, block, prefix = ((_GPT2_TOP, _GPT2_BLOCK, "transformer.h") if arch == "gpt2"
                          else (_LLAMA_TOP, _LLAMA_BLOCK, "model.layers"))
    if gguf_name in top:
        return top[gguf_name]
    m = _BLK.match(gguf_name)
    if m and m.group(2) in block:
        return f"{prefix}.{m.group(1)}.{block[m.group(2)]}"
    raise GGUFError(f"unexpected tensor {gguf_name!r} for architecture {arch!r}")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row interleave: rows (H, D/2, 2) -> (H, 2, D/2)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(t) -> np.ndarray:
    """One ReaderTensor -> a float32 numpy array in row-major (rows, cols) order."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize as gguf_dequantize

    if t.tensor_type == Q.F32:
        arr = np.asarray(t.data, dtype=np.float32)
    elif t.tensor_type == Q.F16:
        arr = np.asarray(t.data).astype(np.float32)
    else:
        arr = gguf_dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
    shape = tuple(int(x) for x in reversed(t.shape.tolist()))
    if math.prod(shape) != arr.size:
        raise GGUFError(f"tensor {t.name!r}: {arr.size} values for shape {shape}")
    return arr.reshape(shape)


def read_tensors(reader, config: dict[str, Any], path: str) -> dict[str, torch.Tensor]:
    """All weights as HF-named fp32 tensors in HF (nn.Linear / Conv1D) layout."""
    arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}[config["model_type"]]
    heads = config.get("num_attention_heads", config.get("n_head"))
    kv_heads = config.get("num_key_value_heads", heads)
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        try:
            name = hf_name(t.name, arch)
        except GGUFError as e:
            raise GGUFError(f"{path}: {e}") from None
        if name is None:
            continue
        try:
            arr = dequantize(t)
        except GGUFError as e:
            raise GGUFError(f"{path}: {e}") from None
        except Exception as e:
            raise GGUFError(f"{path}: cannot dequantize tensor {t.name!r} "
                            f"({t.tensor_type.name}): {e}") from None
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            arr = _unpermute(arr, heads)
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            arr = _unpermute(arr, kv_heads)
        elif arch == "gpt2" and re.search(r"\.(c_attn|c_proj|c_fc)\.weight$", name):
            arr = arr.T  # llama.cpp stores GPT-2's Conv1D weights as (out, in); HF keeps (in, out)
        out[name] = torch.from_numpy(np.array(arr, dtype=np.float32, order="C", copy=True))
    return out


def load_gguf(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(HF config dict, HF-named fp32 tensors) from a GGUF file."""
    reader = open_gguf(path)
    config = read_config(reader, path)
    return config, read_tensors(reader, config, path)
