"""ModelConfig: the shape of one decoder-only transformer, read from a Hugging Face config.

Covers two families: `llama` (Llama 2/3, SmolLM2, Mistral, Qwen2: RMSNorm, RoPE, GQA, SwiGLU)
and `gpt2` (LayerNorm, learned positions, GELU, fused c_attn). It reads both the transformers
4.x keys (`rope_theta`, `rope_scaling`) and the 5.x ones (`rope_parameters`), and refuses any
field it cannot honour with a ValueError naming the field, rather than computing something else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# HF `model_type` -> our family. Anything else is refused by name.
MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "gpt2": "gpt2"}
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "GPT2LMHeadModel": "gpt2",
}
ROPE_TYPES = ("default", "linear", "llama3")
GPT2_ACTIVATIONS = ("gelu_new", "gelu", "gelu_pytorch_tanh", "gelu_fast")


@dataclass(slots=True)
class ModelConfig:
    """Hyperparameters of one decoder-only transformer."""

    model_type: str
    """Hugging Face model type: llama, mistral, qwen2 or gpt2."""
    vocab_size: int
    """Rows of the embedding matrix."""
    hidden_size: int
    """Width of the residual stream."""
    num_layers: int
    """Number of transformer blocks."""
    num_heads: int
    """Query heads per attention layer."""
    num_kv_heads: int
    """Key/value heads (grouped-query attention when < num_heads)."""
    intermediate_size: int
    """Width of the MLP's hidden layer."""
    max_position_embeddings: int = 2048
    """Longest context the checkpoint was trained for."""
    head_dim: int = 0
    """Width of one head; 0 means hidden_size // num_heads."""
    norm_eps: float = 1e-5
    """Epsilon of RMSNorm / LayerNorm."""
    rope_theta: float = 10000.0
    """RoPE base frequency (llama family)."""
    rope_scaling: dict[str, Any] | None = None
    """RoPE scaling: None, {"rope_type": "linear", "factor"} or Llama-3's {"rope_type": "llama3", ...}."""
    attention_bias: bool = False
    """Bias on q/k/v projections (Qwen2 sets it; o_proj never has one in this family)."""
    mlp_bias: bool = False
    """Bias on the MLP projections (llama family)."""
    tie_word_embeddings: bool = False
    """lm_head shares the token embedding matrix."""
    sliding_window: int | None = None
    """Attend only to the last `sliding_window` positions (Mistral); None = full causal."""
    activation: str = "silu"
    """MLP activation: silu (SwiGLU) for llama, gelu_new for gpt2."""
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Other keys of the source config, kept so that a saved config round-trips."""

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(
                f"model_type: unsupported architecture {self.model_type!r}; "
                f"Shoal supports {sorted(MODEL_TYPES)}"
            )
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size", "max_position_embeddings"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads: {self.num_kv_heads} does not divide num_heads {self.num_heads}"
            )
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"num_heads: {self.num_heads} does not divide hidden_size {self.hidden_size}"
                )
            self.head_dim = self.hidden_size // self.num_heads
        if self.family == "llama":
            if self.activation != "silu":
                raise ValueError(f"hidden_act: only silu is supported for llama, got {self.activation!r}")
            if self.head_dim % 2:
                raise ValueError(f"head_dim: RoPE needs an even head_dim, got {self.head_dim}")
            self.rope_scaling = _check_rope_scaling(self.rope_scaling)
        elif self.activation not in GPT2_ACTIVATIONS:
            raise ValueError(f"activation_function: unsupported {self.activation!r}")

    @property
    def family(self) -> str:
        """`llama` or `gpt2`: which block layout the model uses."""
        return MODEL_TYPES[self.model_type]

    @property
    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once), computed without building the model."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        if self.family == "llama":
            attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.attention_bias else 0)
            mlp = 3 * h * i + ((2 * i + h) if self.mlp_bias else 0)
            block = attn + mlp + 2 * h
            emb = self.vocab_size * h
            return emb + self.num_layers * block + h + (0 if self.tie_word_embeddings else emb)
        attn = h * 3 * h + 3 * h + h * h + h
        mlp = h * i + i + i * h + h
        block = attn + mlp + 4 * h
        emb = self.vocab_size * h + self.max_position_embeddings * h
        lm = 0 if self.tie_word_embeddings else self.vocab_size * h
        return emb + self.num_layers * block + 2 * h + lm

    @property
    def size_label(self) -> str:
        """Human size, e.g. `135M`, `1.2B`."""
        n = self.num_params
        if n >= 1e9:
            return f"{n / 1e9:.1f}B"
        if n >= 1e6:
            return f"{round(n / 1e6)}M"
        return f"{round(n / 1e3)}K"

    # ---- Hugging Face config.json <-> ModelConfig -------------------------------------------

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Build from the dict of a Hugging Face `config.json`; ValueError names a bad field."""
        model_type = cfg.get("model_type")
        if model_type is None:
            archs = cfg.get("architectures") or []
            model_type = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
            if model_type is None:
                raise ValueError(
                    f"model_type: config has no model_type and architectures {archs!r} "
                    f"are not supported; Shoal supports {sorted(ARCHITECTURES)}"
                )
        if model_type not in MODEL_TYPES:
            raise ValueError(
                f"model_type: unsupported architecture {model_type!r}; "
                f"Shoal supports {sorted(MODEL_TYPES)}"
            )
        if MODEL_TYPES[model_type] == "gpt2":
            return cls._from_gpt2(cfg)
        return cls._from_llama(model_type, cfg)

    @classmethod
    def _from_llama(cls, model_type: str, cfg: dict[str, Any]) -> "ModelConfig":
        rope = dict(cfg.get("rope_parameters") or {})
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
        if model_type == "qwen2":
            bias = True
            window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
        else:
            bias = bool(cfg.get("attention_bias", False))
            window = cfg.get("sliding_window")
        heads = _req(cfg, "num_attention_heads")
        known = {
            "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "intermediate_size", "max_position_embeddings", "head_dim",
            "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "attention_bias",
            "mlp_bias", "tie_word_embeddings", "sliding_window", "use_sliding_window",
            "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id", "architectures",
        }
        return cls(
            model_type=model_type,
            vocab_size=_req(cfg, "vocab_size"),
            hidden_size=_req(cfg, "hidden_size"),
            num_layers=_req(cfg, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            intermediate_size=_req(cfg, "intermediate_size"),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            head_dim=cfg.get("head_dim") or 0,
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling or None,
            attention_bias=bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            sliding_window=window,
            activation=cfg.get("hidden_act", "silu"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
            extra={k: v for k, v in cfg.items() if k not in known},
        )

    @classmethod
    def _from_gpt2(cls, cfg: dict[str, Any]) -> "ModelConfig":
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if cfg.get(flag):
                raise ValueError(f"{flag}: not supported by Shoal's GPT-2 (set to false)")
        if cfg.get("scale_attn_weights") is False:
            raise ValueError("scale_attn_weights: false is not supported by Shoal's GPT-2")
        hidden = _req(cfg, "n_embd")
        heads = _req(cfg, "n_head")
        known = {
            "model_type", "vocab_size", "n_embd", "n_layer", "n_head", "n_inner", "n_positions",
            "layer_norm_epsilon", "activation_function", "tie_word_embeddings", "bos_token_id",
            "eos_token_id", "pad_token_id", "scale_attn_weights", "architectures",
            "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
        }
        return cls(
            model_type="gpt2",
            vocab_size=_req(cfg, "vocab_size"),
            hidden_size=hidden,
            num_layers=_req(cfg, "n_layer"),
            num_heads=heads,
            num_kv_heads=heads,
            intermediate_size=cfg.get("n_inner") or 4 * hidden,
            max_position_embeddings=_req(cfg, "n_positions"),
            norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            activation=cfg.get("activation_function", "gelu_new"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
            extra={k: v for k, v in cfg.items() if k not in known},
        )

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face `config.json` dict (transformers 4.x keys, which 5.x also reads)."""
        out: dict[str, Any] = dict(self.extra)
        ids = {"bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
               "pad_token_id": self.pad_token_id}
        if self.family == "gpt2":
            out.update(
                model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=self.vocab_size,
                n_embd=self.hidden_size, n_layer=self.num_layers, n_head=self.num_heads,
                n_inner=self.intermediate_size, n_positions=self.max_position_embeddings,
                layer_norm_epsilon=self.norm_eps, activation_function=self.activation,
                tie_word_embeddings=self.tie_word_embeddings, **ids,
            )
            return out
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM"}[self.model_type]
        out.update(
            model_type=self.model_type, architectures=[arch], vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size, head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.norm_eps,
            rope_theta=self.rope_theta, rope_scaling=self.rope_scaling, hidden_act=self.activation,
            tie_word_embeddings=self.tie_word_embeddings, **ids,
        )
        if self.model_type == "qwen2":
            out.update(use_sliding_window=self.sliding_window is not None,
                       sliding_window=self.sliding_window)
        else:
            out.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias,
                       sliding_window=self.sliding_window)
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _req(cfg: dict[str, Any], key: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ValueError(f"{key}: missing from the model config")
    return cfg[key]


def _check_rope_scaling(s: dict[str, Any] | None) -> dict[str, Any] | None:
    if not s:
        return None
    s = dict(s)
    kind = s.pop("type", None) or s.get("rope_type", "default")
    s["rope_type"] = kind
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling.rope_type: unsupported {kind!r}; supported {ROPE_TYPES}")
    if kind == "default":
        return None
    if "factor" not in s:
        raise ValueError("rope_scaling.factor: missing")
    if kind == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in s:
                raise ValueError(f"rope_scaling.{key}: missing for llama3 rope scaling")
    return s
