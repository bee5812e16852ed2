"""Multi-LoRA serving: PEFT adapter files, stacked LoRA layers, and the slot/CPU/disk tiers.

The model stays a plain base model; `LoRAManager` wraps its linear layers in place and picks,
per token, which resident adapter (or none) applies. Training adapters lives elsewhere.
"""

from .adapter_cache import LoRAManager
from .layers import LoRALinear, LoRAMapping, apply_lora
from .peft_format import (AdapterConfig, AdapterError, LoRAAdapter, load_adapter, read_adapter_config,
                          save_adapter, validate_adapter)

__all__ = ["AdapterConfig", "AdapterError", "LoRAAdapter", "LoRALinear", "LoRAManager", "LoRAMapping",
           "apply_lora", "load_adapter", "read_adapter_config", "save_adapter", "validate_adapter"]
