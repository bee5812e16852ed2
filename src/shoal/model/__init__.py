"""Transformer families, checkpoint loading (safetensors, GGUF, hub), tokenizer, registry."""

from .config import ModelConfig
from .generate import generate, stream_tokens
from .loader import LoadedModel, ModelLoadError, load
from .tokenizer import IncrementalDetokenizer, Tokenizer
from .transformer import Transformer

__all__ = ["ModelConfig", "Transformer", "Tokenizer", "IncrementalDetokenizer", "LoadedModel",
           "ModelLoadError", "load", "generate", "stream_tokens"]
