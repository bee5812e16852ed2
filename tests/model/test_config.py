"""ModelConfig: reading HF configs (4.x and 5.x keys), parameter counts, refusals by field."""

from __future__ import annotations

import pytest

from shoal.model.config import ModelConfig
from tests.helpers import hf_model, hf_tiny_config


@pytest.mark.parametrize("family", ["llama", "llama3", "qwen2", "mistral", "gpt2"])
def test_num_params_matches_hf(family):
    hf = hf_model(hf_tiny_config(family))
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    assert cfg.num_params == sum(p.numel() for p in hf.parameters())


def test_reads_transformers5_rope_parameters():
    raw = hf_tiny_config("llama").to_dict()
    raw.pop("rope_theta", None)
    raw.pop("rope_scaling", None)
    raw["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192}
    cfg = ModelConfig.from_hf(raw)
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_scaling["factor"] == 32.0


def test_round_trip_through_hf_dict():
    for family in ("llama3", "qwen2", "gpt2", "mistral"):
        cfg = ModelConfig.from_hf(hf_tiny_config(family).to_dict())
        again = ModelConfig.from_hf(cfg.to_hf())
        assert again.to_dict() == cfg.to_dict()


def test_unknown_architecture_names_the_field():
    raw = hf_tiny_config("llama").to_dict()
    raw["model_type"] = "mamba"
    with pytest.raises(ValueError, match="model_type.*mamba"):
        ModelConfig.from_hf(raw)
    raw.pop("model_type")
    raw["architectures"] = ["MambaForCausalLM"]
    with pytest.raises(ValueError, match="MambaForCausalLM"):
        ModelConfig.from_hf(raw)


@pytest.mark.parametrize("field,value,match", [
    ("num_key_value_heads", 3, "num_kv_heads"),
    ("hidden_act", "relu", "hidden_act"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_scaling.rope_type"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "low_freq_factor"),
    ("vocab_size", None, "vocab_size"),
])
def test_bad_fields_are_named(field, value, match):
    raw = hf_tiny_config("llama").to_dict()
    raw[field] = value
    raw.pop("rope_parameters", None) if field == "rope_scaling" else None
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(raw)


def test_gpt2_unsupported_flag_is_named():
    raw = hf_tiny_config("gpt2").to_dict()
    raw["scale_attn_by_inverse_layer_idx"] = True
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        ModelConfig.from_hf(raw)
