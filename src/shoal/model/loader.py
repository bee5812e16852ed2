"""Load a model from (a) a Hugging Face model directory, (b) a GGUF file, (c) a hub id.

Every path ends in `build_model`, which checks the tensor names against the config exactly.
Errors are `ModelLoadError`s naming the file or field: a missing path, a corrupt safetensors
file, a truncated GGUF, an unknown architecture. Hub downloads happen only when asked for and the
machine is online; tests never reach them. Not here: the model registry or the GGUF->cache
conversion (`registry.py`, `convert.py`).
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .gguf import GGUFError, load_gguf
from .tokenizer import Tokenizer, TokenizerError
from .transformer import Transformer
from .weights import WeightError, build_model, normalize_name, to_model_layout


class ModelLoadError(ValueError):
    """The model cannot be loaded; the message names the file, tensor or field."""


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer | None
    config: ModelConfig
    source: str


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """`auto` -> bf16 on CUDA, fp32 on CPU; names like `bf16` -> torch dtypes."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype: unknown {dtype!r}; use auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


def read_config(path: str) -> ModelConfig:
    """ModelConfig from `path/config.json`."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ModelLoadError(f"{path}: no config.json (not a Hugging Face model directory)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{cfg_path}: not valid JSON ({e})") from None
    try:
        return ModelConfig.from_hf(raw)
    except ValueError as e:
        raise ModelLoadError(f"{cfg_path}: {e}") from None


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """All tensors of one .safetensors file; a corrupt file is an error naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"{path}: corrupt or unreadable safetensors file ({e})") from None


def read_dir_tensors(path: str) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of a model directory (*.safetensors, else pytorch_model*.bin)."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    tensors: dict[str, torch.Tensor] = {}
    if files:
        for f in files:
            for name, t in read_safetensors(f).items():
                if name in tensors:
                    raise ModelLoadError(f"{f}: tensor {name!r} also appears in another shard")
                tensors[name] = t
        return tensors
    bins = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if not bins:
        raise ModelLoadError(f"{path}: no *.safetensors or pytorch_model*.bin weights")
    for f in bins:
        try:
            tensors.update(torch.load(f, map_location="cpu", weights_only=True))
        except Exception as e:
            raise ModelLoadError(f"{f}: unreadable weights file ({type(e).__name__}: {e})") from None
    return tensors


def to_model_tensors(raw: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF checkpoint names/layout -> our canonical names/layout, dropping known buffers."""
    out = {}
    for name, t in raw.items():
        canon = normalize_name(name, config)
        if canon is not None:
            out[canon] = to_model_layout(canon, t)
    return out


def _assemble(config: ModelConfig, raw: dict[str, torch.Tensor], source: str, dtype, device: str,
              tokenizer_loader) -> LoadedModel:
    """Checked model from HF-named tensors, plus the tokenizer when a loader is given."""
    try:
        model = build_model(config, to_model_tensors(raw, config),
                            dtype=resolve_dtype(dtype, device), device=device, source=source)
        tok = tokenizer_loader(source) if tokenizer_loader is not None else None
    except (WeightError, TokenizerError) as e:
        raise ModelLoadError(str(e)) from None
    return LoadedModel(model, tok, config, source)


def load_dir(path: str, *, dtype: str | torch.dtype = "auto", device: str = "cpu",
             with_tokenizer: bool = True) -> LoadedModel:
    """Load a Hugging Face model directory."""
    if not os.path.isdir(path):
        raise ModelLoadError(f"{path}: no such model directory")
    config = read_config(path)
    return _assemble(config, read_dir_tensors(path), path, dtype, device,
                     Tokenizer.from_dir if with_tokenizer else None)


def load_gguf_file(path: str, *, dtype: str | torch.dtype = "auto", device: str = "cpu",
                   with_tokenizer: bool = True) -> LoadedModel:
    """Load a GGUF file, dequantized to `dtype`."""
    try:
        raw_config, raw = load_gguf(path)
        config = ModelConfig.from_hf(raw_config)
    except (GGUFError, ValueError) as e:
        raise ModelLoadError(str(e) if str(e).startswith(path) else f"{path}: {e}") from None
    return _assemble(config, raw, path, dtype, device,
                     Tokenizer.from_gguf if with_tokenizer else None)


HUB_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                "generation_config.json"]


def download_hub(repo_id: str, target: str | None = None) -> str:
    """Fetch a hub model's config, safetensors and tokenizer files; returns the local dir.
    Needs the network: raises ModelLoadError (not a hang) when offline."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_dir=target)
    except Exception as e:
        raise ModelLoadError(f"{repo_id}: cannot download from the Hugging Face hub "
                             f"({type(e).__name__}: {e})") from None


def load(source: str, *, dtype: str | torch.dtype = "auto", device: str = "cpu",
         with_tokenizer: bool = True, allow_download: bool = False) -> LoadedModel:
    """Load from a directory, a .gguf file or (with allow_download) a hub id like `org/name`."""
    if os.path.isdir(source):
        return load_dir(source, dtype=dtype, device=device, with_tokenizer=with_tokenizer)
    if source.endswith(".gguf") or os.path.isfile(source):
        return load_gguf_file(source, dtype=dtype, device=device, with_tokenizer=with_tokenizer)
    if allow_download and source.count("/") == 1 and not source.startswith((".", "/")):
        return load_dir(download_hub(source), dtype=dtype, device=device, with_tokenizer=with_tokenizer)
    raise ModelLoadError(f"{source}: no such model directory or GGUF file")
