"""The inference engine: continuous batching over a paged KV cache, OpenAI sampling, many LoRA
adapters in one batch. `LLM` for offline use, `AsyncEngine` for serving."""

from .llm import LLM
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
