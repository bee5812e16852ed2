"""LLM: the offline, synchronous face of the engine.

`LLM(...).generate(prompts, params)` queues every prompt and steps the engine until all finish,
returning RequestOutputs in prompt order. For serving use `AsyncEngine`.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..config import EngineConfig
from ..model.loader import LoadedModel
from .llm_engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams


class LLM:
    def __init__(self, config: EngineConfig | None = None, loaded: LoadedModel | None = None,
                 **kwargs) -> None:
        """Args:
            config: engine settings (or pass EngineConfig fields as keyword arguments).
            loaded: an already loaded model (tests, benchmarks); default loads config.model.
        """
        self.engine = LLMEngine(config or EngineConfig(**kwargs), loaded)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def add_adapter(self, name: str, path: str) -> None:
        if self.engine.lora is None:
            raise ValueError("enable_lora: adapters need EngineConfig(enable_lora=True)")
        self.engine.lora.add_adapter(name, path)

    def generate(self, prompts: str | list[int] | Sequence[str | list[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 adapter: str | None | Sequence[str | None] = None) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); params and adapter may be per prompt."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        n = len(prompts)
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * n
        adapters = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * n
        if len(params) != n or len(adapters) != n:
            raise ValueError("sampling_params/adapter: give one, or one per prompt")
        ids = [self.engine.add_request(None, p, sp, a, final_only=True)  # (no stream read here)
               for p, sp, a in zip(prompts, params, adapters)]
        order = {rid: i for i, rid in enumerate(ids)}
        results: list[RequestOutput | None] = [None] * n
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    results[order[out.request_id]] = out
        return results  # type: ignore[return-value]
