"""Checkpoint tensors <-> model parameters, by an explicit name table.

`expected_names(config)` lists every tensor a checkpoint of that shape must hold, in Hugging
Face's names. Loading checks the set exactly: a missing or unexpected tensor, or one of the wrong
shape, is a WeightError naming it. GPT-2 checkpoints store c_attn/c_proj/c_fc as Conv1D
(in, out); the model uses nn.Linear (out, in), so those are transposed on the way in and out.
Known non-weight buffers (rotary inv_freq, GPT-2's causal-mask `attn.bias`) are dropped by name.
"""

from __future__ import annotations

import re

import torch

from .config import ModelConfig
from .layers import rope_inv_freq
from .transformer import Transformer


class WeightError(ValueError):
    """A checkpoint does not match the model: names the tensor and the file when known."""


_CONV1D = re.compile(r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
_IGNORED = (
    re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),
    re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)$"),
)


def expected_names(config: ModelConfig) -> list[str]:
    """Every checkpoint tensor name for this config, in Hugging Face's naming."""
    names: list[str] = []
    if config.family == "llama":
        names.append("model.embed_tokens.weight")
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
            for proj in ("q_proj", "k_proj", "v_proj"):
                names.append(p + f"self_attn.{proj}.weight")
                if config.attention_bias:
                    names.append(p + f"self_attn.{proj}.bias")
            names.append(p + "self_attn.o_proj.weight")
            for proj in ("gate_proj", "up_proj", "down_proj"):
                names.append(p + f"mlp.{proj}.weight")
                if config.mlp_bias:
                    names.append(p + f"mlp.{proj}.bias")
        names.append("model.norm.weight")
    else:
        names += ["transformer.wte.weight", "transformer.wpe.weight"]
        for i in range(config.num_layers):
            p = f"transformer.h.{i}."
            for mod in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
                names += [p + mod + ".weight", p + mod + ".bias"]
        names += ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def normalize_name(name: str, config: ModelConfig) -> str | None:
    """A checkpoint name -> the canonical HF name, or None for a known non-weight buffer."""
    if config.family == "gpt2" and not name.startswith(("transformer.", "lm_head.")):
        name = "transformer." + name  # the original gpt2 checkpoints have no prefix
    if any(p.match(name) for p in _IGNORED):
        return None
    return name


def to_model_layout(name: str, t: torch.Tensor) -> torch.Tensor:
    """HF checkpoint layout -> our parameter layout (Conv1D weights transposed)."""
    return t.t().contiguous() if _CONV1D.match(name) else t


def to_hf_layout(name: str, t: torch.Tensor) -> torch.Tensor:
    """Our parameter layout -> HF checkpoint layout."""
    return t.t().contiguous() if _CONV1D.match(name) else t


def build_model(config: ModelConfig, tensors: dict[str, torch.Tensor], *,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                source: str = "checkpoint") -> Transformer:
    """Create the model and fill it from HF-named `tensors` (already in model layout).

    The model is built on the meta device, so no time goes into random init; every parameter
    comes from `tensors`, converted to `dtype` on `device`.
    """
    expected = set(expected_names(config))
    got = set(tensors)
    if config.tie_word_embeddings and "lm_head.weight" in got:
        got.discard("lm_head.weight")  # some tied checkpoints store the copy; the model shares it
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing:
        raise WeightError(f"{source}: missing tensor {missing[0]!r}"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise WeightError(f"{source}: unexpected tensor {unexpected[0]!r}"
                          + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    with torch.device("meta"):
        model = Transformer(config)
    params = dict(model.named_parameters())
    for name, t in tensors.items():
        want = tuple(params[name].shape)
        if tuple(t.shape) != want:
            raise WeightError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, "
                              f"the config needs {want}")
    state = {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    if config.family == "llama":
        model.model.rotary_emb.inv_freq = rope_inv_freq(config).to(device)
    return model.eval()


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights in HF names and layout (tied lm_head omitted), ready to save."""
    out = {}
    for name, p in model.named_parameters():  # named_parameters de-duplicates tied weights
        out[name] = to_hf_layout(name, p.detach())
    return out
