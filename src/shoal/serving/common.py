"""What completions and chat share: the served model names, sampling parameters from a request,
running several engine requests at once, and SSE framing.

`ServedModels` maps a request's `model` to the base model or one of the engine's adapters; an
unknown name is a 404 `model_not_found`. Not here: tenants, keys or billing.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from ..engine.async_engine import AsyncEngine
from ..engine.outputs import RequestOutput
from ..engine.sampling_params import SamplingParams
from .errors import ServingError, from_value_error, model_not_found

FINGERPRINT = "fp_shoal"


class ServedModels:
    """The base model (under its registry name) plus the engine's LoRA adapters."""

    def __init__(self, engine: AsyncEngine, base_name: str) -> None:
        self.engine, self.base_name = engine, base_name
        self.created = int(time.time())

    def resolve(self, name: str) -> str | None:
        """Adapter name for `name` (None = the base model); 404 if unknown."""
        if name == self.base_name:
            return None
        lora = self.engine.engine.lora
        if lora is not None and lora.has_adapter(name):
            return name
        raise model_not_found(name)

    def cards(self) -> list[dict]:
        ids = [self.base_name]
        lora = self.engine.engine.lora
        if lora is not None:
            ids += lora.list_adapters()
        return [self.card(i) for i in ids]

    def card(self, name: str) -> dict:
        self.resolve(name)
        owner = "system" if name == self.base_name else "user"
        return {"id": name, "object": "model", "created": self.created, "owned_by": owner}


def sampling_params(req, *, max_tokens: int | None, logprobs: int | None,
                    prompt_logprobs: int | None = None, best_of: int | None = None) -> SamplingParams:
    """SamplingParams from a completion/chat request; a bad value is a 400 naming its field."""
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    try:
        return SamplingParams(
            n=req.n or 1, best_of=best_of, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            logit_bias={int(k): float(v) for k, v in (req.logit_bias or {}).items()} or None,
            stop=stop, max_tokens=max_tokens, min_tokens=req.min_tokens or 0, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, seed=req.seed, ignore_eos=bool(req.ignore_eos),
        )
    except ValueError as e:
        raise from_value_error(e) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


async def final_output(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    last = None
    async for out in stream:
        last = out
    return last


async def run_all(engine: AsyncEngine, prompts: list, params: SamplingParams, adapter: str | None,
                  base_id: str) -> list[RequestOutput]:
    """Run every prompt as its own engine request, concurrently; final outputs in order."""
    try:
        return await asyncio.gather(*(
            final_output(engine.generate(p, params, f"{base_id}-{i}", adapter))
            for i, p in enumerate(prompts)))
    except ValueError as e:
        raise from_value_error(e, {"prompt": "prompt"}) from None


async def merged_streams(engine: AsyncEngine, prompts: list, params: SamplingParams,
                         adapter: str | None, base_id: str) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, RequestOutput) as each request makes progress; all are aborted if the
    consumer goes away."""
    q: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, p) -> None:
        try:
            async for out in engine.generate(p, params, f"{base_id}-{i}", adapter):
                await q.put((i, out))
        except BaseException as e:  # delivered to the consumer, which raises it
            await q.put(e)
        finally:
            await q.put(done)

    tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(prompts)]
    remaining = len(tasks)
    try:
        while remaining:
            item = await q.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                if isinstance(item, ValueError):
                    raise from_value_error(item)
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


def sse(obj: dict | str) -> str:
    """One server-sent event."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def sse_error(e: BaseException) -> str:
    if isinstance(e, ServingError):
        return sse(e.body())
    return sse({"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error",
                          "param": None, "code": None}})


def usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": 0}}
