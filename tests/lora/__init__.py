"""Shared helpers for the LoRA tests: tiny HF/our model pairs and real PEFT adapters on disk."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from shoal.model.config import ModelConfig
from shoal.model.loader import to_model_tensors
from shoal.model.weights import build_model
from tests.helpers import hf_model, hf_tiny_config


def pair(family: str, seed: int = 0):
    """(hf_model, our_model) with identical random weights."""
    torch.manual_seed(seed)
    hf = hf_model(hf_tiny_config(family))
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    return hf, build_model(cfg, to_model_tensors(hf.state_dict(), cfg))


def ours_like(hf):
    """A copy of our model with `hf`'s weights (cloned: build_model may share storage)."""
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    return build_model(cfg, to_model_tensors({k: v.clone() for k, v in hf.state_dict().items()}, cfg))


def make_peft_adapter(hf, path, seed: int, b_std: float = 0.1, **lora_kwargs):
    """Save a real PEFT LoRA adapter of `hf` (left untouched) to `path`, lora_B randomized
    (PEFT initialises it to zero) with a fixed seed; returns the PEFT model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(**lora_kwargs))
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * b_std)
    peft_model.save_pretrained(str(path))
    return peft_model.eval()


def merged_hf(hf, path):
    """HF + PEFT adapter at `path`, merged into the weights (merge_and_unload)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(hf), str(path)).merge_and_unload().eval()


class PackedCausal:
    """Attention context for packed (N,) inputs: causal attention within each sequence."""

    def __init__(self, lens: list[int]) -> None:
        self.lens = lens

    def attend(self, layer_idx, q, k, v):  # (N, H, D), (N, Hkv, D)
        out, start = [], 0
        for n in self.lens:
            qs, ks, vs = (t[start:start + n].transpose(0, 1) for t in (q, k, v))  # (H, n, D)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
            out.append(o.transpose(0, 1))
            start += n
        return torch.cat(out)

    def advance(self, n) -> None:
        pass
