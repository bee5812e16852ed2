"""One compact decoder-only transformer for the Llama and GPT-2 families.

Module paths equal Hugging Face's (`model.layers.N.self_attn.q_proj`,
`transformer.h.N.attn.c_attn`, `lm_head`), so checkpoint names and PEFT adapter keys map
one-to-one. `forward(input_ids, positions, ctx)` returns hidden states; `compute_logits` applies
the head, so callers can take logits only where they sample. No sampling, caching policy or
batching lives here.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import CausalAttention
from .config import ModelConfig
from .layers import (GPT2MLP, GPT2Attention, Linear, LlamaAttention, RMSNorm, RotaryEmbedding, SwiGLU,
                     head_logits)


class LlamaBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, h, cos, sin, ctx, pending=None):
        """(h, m): the residual stream h, and m this layer's MLP output, not yet added: the next
        layer's input norm adds it in its own kernel (h + m rounded to the dtype, then the norm,
        as one `add_forward`), one elementwise kernel a layer fewer. `pending`: the last
        layer's m (None: h is complete)."""
        if pending is None:
            x = self.input_layernorm(h)
        else:
            x, h = self.input_layernorm.add_forward(pending, h)  # h = h + pending; x = norm(h)
        a = self.self_attn(x, cos, sin, ctx)
        x, h = self.post_attention_layernorm.add_forward(a, h)  # h = h + a; x = norm(h)
        return h, self.mlp(x)


def _embedding(num: int, dim: int) -> nn.Embedding:
    """An embedding whose weight is left uninitialised: the model is built on the meta device
    and every weight is then loaded (`weights.build_model`). nn.Embedding's own init (normal_)
    on the meta device went through torch's reference ops, which import torch._dynamo and Triton
    where it is installed: ~150 MB of RSS a process for nothing."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


class LlamaBackbone(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = _embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaBlock(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids, positions, ctx):
        h = self.embed_tokens(input_ids)  # (..., hidden)
        cos, sin = self.rotary_emb(positions, h.dtype)  # (..., head_dim)
        m = None
        for layer in self.layers:
            h, m = layer(h, cos, sin, ctx, m)
        return self.norm.add_forward(m, h)[0] if m is not None else self.norm(h)

    @property
    def input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens


class GPT2Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = GPT2MLP(config)

    def forward(self, h, ctx):
        h = h + self.attn(self.ln_1(h), ctx)
        return h + self.mlp(self.ln_2(h))


class GPT2Backbone(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.wte = _embedding(config.vocab_size, config.hidden_size)
        self.wpe = _embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)

    def forward(self, input_ids, positions, ctx):
        h = self.wte(input_ids) + self.wpe(positions)  # (..., hidden)
        for block in self.h:
            h = block(h, ctx)
        return self.ln_f(h)

    @property
    def input_embeddings(self) -> nn.Embedding:
        return self.wte


class Transformer(nn.Module):
    """A causal LM. `model` (llama family) or `transformer` (gpt2 family) holds the backbone."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        if config.family == "llama":
            self.model = LlamaBackbone(config)
        else:
            self.transformer = GPT2Backbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    @property
    def backbone(self) -> nn.Module:
        return self.model if self.config.family == "llama" else self.transformer

    def tie_weights(self) -> None:
        """Share the embedding matrix with lm_head when the config says so."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.backbone.input_embeddings.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                ctx=None) -> torch.Tensor:
        """Hidden states after the final norm.

        Args:
            input_ids: token ids, (B, T) for the reference path or (N,) packed.
            positions: absolute positions, same shape; default 0..T-1 per row.
            ctx: attention context (`attend`, `advance`); default full causal attention.
        """
        if positions is None:
            positions = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
        if ctx is None:
            ctx = CausalAttention(self.config.sliding_window)
        h = self.backbone(input_ids, positions, ctx)
        ctx.advance(input_ids.shape[-1])
        return h

    def compute_logits(self, hidden: torch.Tensor, fp32: bool = True) -> torch.Tensor:
        """(..., hidden) -> (..., vocab) in fp32, or with fp32=False in the head's dtype (the
        engine's sampler reads bf16 logits as they are; see `head_logits` for the product)."""
        return head_logits(self.lm_head, hidden, fp32)

    def logits(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, ctx=None) -> torch.Tensor:
        """forward + compute_logits over every position."""
        return self.compute_logits(self.forward(input_ids, positions, ctx))
