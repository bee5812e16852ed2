"""POST /v1/completions: prompts (text, token ids, or lists of either) -> `text_completion`.

Choice `index` runs over prompts and samples (prompt_i * n + j); `echo` prepends the prompt (and
its logprobs, the first of which is null); `logprobs` gives tokens, token_logprobs, top_logprobs
and text_offset. Streaming sends one chunk per text delta, a finish chunk per choice, an
optional usage chunk and `[DONE]`. `best_of` > `n` cannot stream (as upstream). `response_format`
{"type": "json_object"} or {"type": "json_schema"} (an extension here, as vLLM's; OpenAI's chat
field) is JSON mode or Structured Outputs.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import AsyncIterator

from ..engine.async_engine import AsyncEngine
from ..engine.outputs import CompletionOutput, RequestOutput
from .common import (FINGERPRINT, merged_streams, new_id, run_all, sampling_params, sse, sse_error,
                     structured_output, usage)
from .errors import ServingError


def _prompts(prompt) -> list:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise ServingError(400, "prompt: must not be empty", param="prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    return [p if isinstance(p, str) else list(p) for p in prompt]


class CompletionService:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.tok = engine.tokenizer

    def _params(self, req):
        n = req.n or 1
        best_of = req.best_of if req.best_of is not None else n
        if best_of < n:
            raise ServingError(400, f"best_of: must be >= n ({n}), got {best_of}", param="best_of")
        if req.stream and best_of > n:
            raise ServingError(400, "best_of: cannot be used with stream", param="best_of")
        lp = req.logprobs
        texts = [p for p in _prompts(req.prompt) if isinstance(p, str)]
        json_mode, json_schema = structured_output(req.response_format, texts, "prompt")
        return sampling_params(req, max_tokens=req.max_tokens, logprobs=lp, best_of=best_of,
                               prompt_logprobs=lp if (req.echo and lp is not None) else None,
                               json_mode=json_mode, json_schema=json_schema)

    def _token_str(self, tid: int) -> str:
        """The token's text, or for a token that is part of a UTF-8 character its bytes as
        "bytes:\\xe2\\x9c" (as OpenAI's legacy completions write them)."""
        b = self.tok.token_bytes(tid)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{x:02x}" for x in b)

    def _logprobs(self, entries, start_offset: int) -> dict:
        """OpenAI's completion logprobs from (token, logprob, top) entries (None = no logprob).
        text_offset: where each token starts in the text, in characters (every token holding a
        part of a character split across tokens starts at that character)."""
        tokens, lps, tops, offsets = [], [], [], []
        off = start_offset
        chars = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for e in entries:
            if e is None:
                continue
            tid, lp, top = e
            tokens.append(self._token_str(tid))
            lps.append(lp)
            tops.append({self._token_str(t): v for t, v in top.items()} if top is not None else None)
            offsets.append(off)
            off += len(chars.decode(self.tok.token_bytes(tid)))
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def _echo_logprobs(self, out: RequestOutput, c: CompletionOutput) -> dict:
        prompt = list(out.prompt_logprobs or [])
        first = out.prompt_token_ids[0]
        entries = [(first, None, None)] + prompt[1:] + list(c.logprobs or [])
        d = self._logprobs(entries, 0)
        return d

    def _choice(self, i: int, n: int, out: RequestOutput, c: CompletionOutput, prompt_text: str,
                req) -> dict:
        text = (prompt_text if req.echo else "") + c.text
        logprobs = None
        if req.logprobs is not None:
            logprobs = (self._echo_logprobs(out, c) if req.echo
                        else self._logprobs(c.logprobs or [], 0))
        return {"text": text, "index": i * n + c.index, "logprobs": logprobs,
                "finish_reason": c.finish_reason}

    async def create(self, req, adapter: str | None, bill) -> dict | AsyncIterator[str]:
        """The response (dict) or its SSE events; `bill` is charged before the last byte."""
        prompts = _prompts(req.prompt)
        params = self._params(req)
        if req.suffix:
            raise ServingError(400, "suffix: not supported by this model", param="suffix")
        cid = new_id("cmpl")
        if req.stream:
            return self._stream(req, prompts, params, adapter, cid, bill)
        outs = await run_all(self.engine, prompts, params, adapter, cid, bill)
        n = params.n
        choices, ptoks, ctoks = [], 0, 0
        for i, (p, out) in enumerate(zip(prompts, outs)):
            ptext = p if isinstance(p, str) else self.tok.decode(p)
            ptoks += len(out.prompt_token_ids)
            ctoks += out.unreturned_tokens  # (best_of's other samples: generated, so counted)
            for c in out.outputs:
                ctoks += c.num_tokens
                choices.append(self._choice(i, n, out, c, ptext, req))
        await bill.charge(ptoks, ctoks)
        return {"id": cid, "object": "text_completion", "created": int(time.time()),
                "model": req.model, "system_fingerprint": FINGERPRINT, "choices": choices,
                "usage": usage(ptoks, ctoks, sum(o.num_cached_tokens for o in outs))}

    async def _stream(self, req, prompts, params, adapter, cid, bill) -> AsyncIterator[str]:
        created, n = int(time.time()), params.n
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        base = {"id": cid, "object": "text_completion", "created": created, "model": req.model,
                "system_fingerprint": FINGERPRINT}
        if include_usage:
            base["usage"] = None
        ptoks: dict[int, int] = {}
        ctoks: dict[tuple[int, int], int] = {}
        started: set[tuple[int, int]] = set()
        finished: set[tuple[int, int]] = set()
        held: dict[tuple[int, int], list] = {}  # logprobs of tokens whose text is not out yet
        try:
            async for i, out in merged_streams(self.engine, prompts, params, adapter, cid):
                ptoks[i] = len(out.prompt_token_ids)
                for c in out.outputs:
                    key = (i, c.index)
                    text = c.text_delta
                    if req.echo and key not in started:
                        p = prompts[i]
                        text = (p if isinstance(p, str) else self.tok.decode(p)) + text
                    started.add(key)
                    ctoks[key] = c.num_tokens
                    if key in finished:
                        continue
                    if req.logprobs is not None and c.logprobs_delta:
                        held.setdefault(key, []).extend(c.logprobs_delta)
                    if not text and not c.finished:  # (a token holding part of a character)
                        continue
                    if c.finished:
                        finished.add(key)
                    bill.mark_first_token()
                    lp = None
                    if req.logprobs is not None:  # every token since the last chunk
                        lp = self._logprobs(held.pop(key, []), 0)
                    yield sse({**base, "choices": [{"text": text, "index": i * n + c.index,
                                                    "logprobs": lp,
                                                    "finish_reason": c.finish_reason}]})
            await bill.charge(sum(ptoks.values()), sum(ctoks.values()))
            if include_usage:
                yield sse({**base, "choices": [], "usage": usage(sum(ptoks.values()),
                                                                 sum(ctoks.values()))})
            yield sse("[DONE]")
        except Exception as e:  # mid-stream: an error event, as the official client expects
            yield sse_error(e)
        finally:  # cut short (client gone) or failed: bill what was generated
            bill.charge_nowait(sum(ptoks.values()), sum(ctoks.values()))
