"""POST /v1/chat/completions: messages through the model's chat template -> `chat.completion`.

Text parts of a message are joined; other part types are refused by name. `logprobs` returns
`{"content": [{token, logprob, bytes, top_logprobs}]}`. Streaming sends the role delta first,
content deltas, a finish chunk per choice, an optional usage chunk and `[DONE]`. `prediction`
(Predicted Outputs) is tokenized and drafted from (`engine.speculative`); usage then reports
the accepted and rejected prediction tokens. `response_format` {"type": "json_object"} is JSON
mode and {"type": "json_schema"} Structured Outputs (`engine.json_guide`); function calling is
refused with a 400 (`response_format`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from ..engine.async_engine import AsyncEngine
from .common import (FINGERPRINT, merged_streams, new_id, run_all, sampling_params, sse, sse_error,
                     structured_output, usage)
from .errors import ServingError


def text_of(content, param: str) -> str:
    """A message's (or a prediction's) content: a string, or its text parts joined."""
    if not isinstance(content, list):
        return content or ""
    texts = []
    for part in content:
        if part.get("type") != "text":
            raise ServingError(400, f"{param}: part type {part.get('type')!r} is not supported (text only)",
                               param=param)
        texts.append(part.get("text", ""))
    return "".join(texts)


def response_format(req) -> tuple[bool, dict | None]:
    """(JSON mode?, JSON schema) the request asks for (`common.structured_output`); a 400 naming
    the field for function calling, which this server does not do (no tool-call parsing), never
    plain text as if it had worked. Its no-op forms pass: empty `tools` / `functions`, or tools
    with `tool_choice` (`function_call`) "none", where the model calls none anyway."""
    structured = structured_output(req.response_format, [text_of(m.content, "messages") for m in req.messages],
                                   "messages")
    for field, choice_field in (("tools", "tool_choice"), ("functions", "function_call")):
        if getattr(req, field) and getattr(req, choice_field) != "none":
            raise ServingError(400, f"{field}: function calling is not supported by this server; send "
                                    f"no {field} (or {choice_field}: \"none\")", param=field,
                               code="unsupported_parameter")
    for choice_field in ("tool_choice", "function_call"):
        choice = getattr(req, choice_field)
        if choice is not None and choice not in ("none", "auto"):
            raise ServingError(400, f"{choice_field}: {choice!r} asks for a call, and function calling is "
                                    "not supported by this server", param=choice_field,
                               code="unsupported_parameter")
    return structured


def message_dicts(messages) -> list[dict]:
    """Request messages -> {"role", "content"} dicts with string content."""
    return [{"role": "system" if m.role == "developer" else m.role,
             "content": text_of(m.content, f"messages[{i}].content")} for i, m in enumerate(messages)]


class ChatService:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.tok = engine.tokenizer

    def prompt_ids(self, req) -> list[int]:
        try:
            return self.tok.encode_chat(message_dicts(req.messages),
                                        add_generation_prompt=req.add_generation_prompt is not False)
        except ServingError:
            raise
        except Exception as e:  # a template that rejects the conversation (e.g. role order)
            raise ServingError(400, f"messages: the chat template rejected them ({e})",
                               param="messages") from None

    def _token(self, tid: int, lp: float) -> dict:
        # bytes: the token's own (part of a character for some tokens: clients join them by these)
        return {"token": self.tok.decode([tid]), "logprob": lp, "bytes": list(self.tok.token_bytes(tid))}

    def _logprobs(self, entries) -> dict:
        content = []
        for tid, lp, top in entries:
            d = self._token(tid, lp)
            d["top_logprobs"] = [self._token(t, v) for t, v in (top or {}).items()]
            content.append(d)
        return {"content": content, "refusal": None}

    def _params(self, req):
        json_mode, json_schema = response_format(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise ServingError(400, "top_logprobs: requires logprobs to be true", param="top_logprobs")
        lp = (req.top_logprobs or 0) if req.logprobs else None
        prediction = None
        if req.prediction is not None:
            prediction = self.tok.encode(text_of(req.prediction.content, "prediction.content"),
                                         add_special_tokens=False)
        return sampling_params(req, max_tokens=req.max_completion_tokens or req.max_tokens, logprobs=lp,
                               prediction=prediction, json_mode=json_mode, json_schema=json_schema)

    @staticmethod
    def _predicted(params, outputs) -> tuple[int, int] | None:
        """(accepted, rejected) prediction tokens over the choices; None without a prediction."""
        if params.prediction is None:
            return None
        n = len(params.prediction)  # (a prediction written out twice confirms more than it holds)
        return (sum(c.accepted_prediction_tokens for c in outputs),
                sum(max(0, n - c.accepted_prediction_tokens) for c in outputs))

    async def create(self, req, adapter: str | None, bill) -> dict | AsyncIterator[str]:
        """The response (dict) or its SSE events; `bill` is charged before the last byte."""
        params = self._params(req)
        ids = self.prompt_ids(req)
        cid = new_id("chatcmpl")
        if req.stream:
            return self._stream(req, ids, params, adapter, cid, bill)
        (out,) = await run_all(self.engine, [ids], params, adapter, cid, bill)
        choices = [{
            "index": c.index,
            "message": {"role": "assistant", "content": c.text, "refusal": None, "annotations": []},
            "logprobs": self._logprobs(c.logprobs or []) if req.logprobs else None,
            "finish_reason": c.finish_reason,
        } for c in out.outputs]
        ctoks = sum(c.num_tokens for c in out.outputs)
        await bill.charge(len(ids), ctoks)
        return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": req.model,
                "system_fingerprint": FINGERPRINT, "choices": choices,
                "usage": usage(len(ids), ctoks, out.num_cached_tokens, self._predicted(params, out.outputs))}

    async def _stream(self, req, ids, params, adapter, cid, bill) -> AsyncIterator[str]:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        base = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": req.model, "system_fingerprint": FINGERPRINT}
        if include_usage:
            base["usage"] = None

        def chunk(index: int, delta: dict, finish=None, logprobs=None) -> str:
            return sse({**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                             "finish_reason": finish}]})

        started: set[int] = set()
        finished: set[int] = set()
        ctoks: dict[int, int] = {}
        last: dict[int, object] = {}  # each choice's latest output (its prediction count)
        held: dict[int, list] = {}  # logprobs of tokens whose text is not out yet
        try:
            async for _, out in merged_streams(self.engine, [ids], params, adapter, cid):
                for c in out.outputs:
                    if c.index not in started:
                        started.add(c.index)
                        yield chunk(c.index, {"role": "assistant", "content": ""})
                    ctoks[c.index] = c.num_tokens
                    last[c.index] = c
                    if req.logprobs and c.logprobs_delta and c.index not in finished:
                        held.setdefault(c.index, []).extend(c.logprobs_delta)
                    if c.text_delta:  # with the logprobs of every token since the last chunk
                        bill.mark_first_token()
                        lp = self._logprobs(held.pop(c.index, [])) if req.logprobs else None
                        yield chunk(c.index, {"content": c.text_delta}, logprobs=lp)
                    if c.finished and c.index not in finished:
                        finished.add(c.index)
                        rest = held.pop(c.index, None)  # tokens that added no text (e.g. a stop token)
                        yield chunk(c.index, {}, c.finish_reason, self._logprobs(rest) if rest else None)
            await bill.charge(len(ids), sum(ctoks.values()))
            if include_usage:
                yield sse({**base, "choices": [], "usage": usage(len(ids), sum(ctoks.values()), 0,
                                                                 self._predicted(params, list(last.values())))})
            yield sse("[DONE]")
        except Exception as e:
            yield sse_error(e)
        finally:  # cut short (client gone) or failed: bill what was generated
            bill.charge_nowait(len(ids), sum(ctoks.values()))
