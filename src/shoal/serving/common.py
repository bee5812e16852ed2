"""What completions and chat share: the served model names, sampling parameters from a request,
running several engine requests at once, and SSE framing.

Which models a caller may use is `models.py`; billing is the API's `Bill`, which the services
call with the token counts before the last byte (or, cut short, with what was generated).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator

from ..engine.async_engine import AsyncEngine
from ..engine.json_schema import SchemaError, compiled
from ..engine.outputs import RequestOutput
from ..engine.sampler import SCHEME
from ..engine.sampling_params import SamplingParams
from .errors import ServingError, from_value_error

# OpenAI's `system_fingerprint`: with `seed`, tells a client when the backend changed in a way
# that can change the tokens; ours names the sampler's scheme (`engine.sampler.SCHEME`)
FINGERPRINT = f"fp_shoal_{SCHEME}"


def sampling_params(req, *, max_tokens: int | None, logprobs: int | None,
                    prompt_logprobs: int | None = None, best_of: int | None = None,
                    prediction: list[int] | None = None, json_mode: bool = False,
                    json_schema: dict | None = None) -> SamplingParams:
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
            prediction=prediction, json_mode=json_mode, json_schema=json_schema,
        )
    except ValueError as e:
        raise from_value_error(e) from None


def structured_output(fmt: dict | None, texts: list[str], texts_param: str) -> tuple[bool, dict | None]:
    """(JSON mode?, JSON schema or None) from `response_format`: {"type": "json_object"} is JSON
    mode (one JSON object, `engine.json_guide`), {"type": "json_schema", "json_schema": {"name",
    "schema", ...}} one instance of the schema (the subset `engine.json_schema` enforces: a
    keyword beyond it is a 400 naming it and where, never an answer that may not match). As
    OpenAI, JSON mode needs the word "json" in `texts` (the messages or prompts, named
    `texts_param`: the model must be asked for JSON, or it may not stop); token-id prompts are not
    checked. Another type is a 400 on `response_format.type`."""
    if fmt is None:
        return False, None
    kind = fmt.get("type")
    if kind not in ("text", "json_object", "json_schema"):
        raise ServingError(400, f"response_format.type: {kind!r} is not one of 'text', 'json_object', "
                                "'json_schema'", param="response_format.type", code="invalid_value")
    if kind == "text":
        return False, None
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        name = spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise ServingError(400, "response_format.json_schema.name: required, 1-64 of a-z, A-Z, 0-9, _ "
                                    "and -", param="response_format.json_schema.name", code="invalid_value")
        schema = spec.get("schema", {"type": "object"})
        try:
            compiled(schema)
        except SchemaError as e:
            raise ServingError(400, f"response_format.json_schema.{e}", param="response_format.json_schema.schema",
                               code="invalid_value") from None
        return False, schema
    if texts and not any("json" in t.lower() for t in texts):
        raise ServingError(400, f"{texts_param}: must contain the word 'json' in some form, to use "
                                "'response_format' of type 'json_object'", param=texts_param,
                           code="invalid_value")
    return True, None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def tokens_of(outs) -> tuple[int, int]:
    """(prompt tokens, completion tokens) of RequestOutputs (None entries skipped)."""
    outs = [o for o in outs if o is not None]
    return (sum(len(o.prompt_token_ids) for o in outs),
            sum(c.num_tokens for o in outs for c in o.outputs))


async def run_all(engine: AsyncEngine, prompts: list, params: SamplingParams, adapter: str | None,
                  base_id: str, bill=None) -> list[RequestOutput]:
    """Run every prompt as its own engine request, concurrently; final outputs in order.
    The engine builds no output until a request finishes (`final_only`); cancelled midway, this
    bills what was generated so far (the engine's counts of the requests cut short)."""
    latest: list[RequestOutput | None] = [None] * len(prompts)
    cut: list[tuple[int, int]] = []  # (prompt, generated) of requests cancelled before finishing

    async def run(i: int, p) -> RequestOutput:
        async for out in engine.generate(p, params, f"{base_id}-{i}", adapter, final_only=True,
                                         on_cancel=lambda pt, ct: cut.append((pt, ct))):
            latest[i] = out
        return latest[i]

    t0 = time.perf_counter()
    try:
        outs = await asyncio.gather(*(run(i, p) for i, p in enumerate(prompts)))
        if bill is not None:
            bill.engine_s = time.perf_counter() - t0  # reported in the Server-Timing header
        return outs
    except ValueError as e:
        raise from_value_error(e, {"prompt": "prompt"}) from None
    except asyncio.CancelledError:
        if bill is not None:
            done_p, done_c = tokens_of(latest)
            bill.charge_nowait(done_p + sum(p for p, _ in cut), done_c + sum(c for _, c in cut))
        raise


async def merged_streams(engine: AsyncEngine, prompts: list, params: SamplingParams,
                         adapter: str | None, base_id: str) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, RequestOutput) as each request makes progress; all are aborted if the
    consumer goes away."""
    if len(prompts) == 1:  # (most requests: no task and queue between the stream and its reader)
        try:
            async with contextlib.aclosing(engine.generate(prompts[0], params, f"{base_id}-0", adapter)) as outs:
                async for out in outs:
                    yield 0, out
        except ValueError as e:
            raise from_value_error(e) from e
        return
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


def usage(prompt_tokens: int, completion_tokens: int, cached: int = 0,
          prediction: tuple[int, int] | None = None) -> dict:
    """OpenAI's usage object; `prediction`: (accepted, rejected) prediction tokens, for a request
    with Predicted Outputs (as OpenAI's, the rejected ones are not in `completion_tokens`' text;
    unlike OpenAI's, they are not billed: completion_tokens counts the tokens generated)."""
    details = {"reasoning_tokens": 0}
    if prediction is not None:
        details["accepted_prediction_tokens"], details["rejected_prediction_tokens"] = prediction
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": details}
