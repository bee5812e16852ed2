"""The FastAPI app: routes parse the body, call serving/, and return JSON or SSE.

`create_app(engine, model_name)` serves one base model and its adapters. Every response carries
`x-request-id`; streams send `: ping` comment lines while the engine is busy elsewhere, and a
client that goes away cancels its handler, which aborts its engine requests (KV freed).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..engine.async_engine import AsyncEngine
from ..serving.chat import ChatService
from ..serving.common import ServedModels
from ..serving.completions import CompletionService
from ..serving.tokenize import TokenizeService
from . import errors
from .protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

KEEPALIVE_S = 15.0


async def with_keepalive(stream: AsyncIterator[str], every: float = KEEPALIVE_S) -> AsyncIterator[str]:
    """Pass events through; emit an SSE comment when none came for `every` seconds."""
    it = stream.__aiter__()
    nxt = asyncio.ensure_future(it.__anext__())
    try:
        while True:
            done, _ = await asyncio.wait({nxt}, timeout=every)
            if not done:
                yield ": ping\n\n"
                continue
            try:
                item = nxt.result()
            except StopAsyncIteration:
                return
            yield item
            nxt = asyncio.ensure_future(it.__anext__())
    finally:
        # the client went away (or the stream ended): stop the producer, which aborts its
        # engine requests
        nxt.cancel()
        try:
            await nxt
        except BaseException:
            pass
        if hasattr(stream, "aclose"):
            await stream.aclose()


def _respond(result):
    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(with_keepalive(result), media_type="text/event-stream",
                             headers={"cache-control": "no-cache"})


def create_app(engine: AsyncEngine, model_name: str) -> FastAPI:
    app = FastAPI(title="Shoal", version="0.1.0",
                  description="OpenAI-compatible API for self-hosted GPT-style models.")
    errors.install(app)
    models = ServedModels(engine, model_name)
    app.state.engine, app.state.models = engine, models
    completions, chat = CompletionService(engine, models), ChatService(engine, models)
    tokenizer = TokenizeService(engine, models)

    @app.middleware("http")
    async def request_id(request: Request, call_next):
        rid = request.headers.get("x-request-id") or f"req_{uuid.uuid4().hex}"
        response = await call_next(request)
        response.headers["x-request-id"] = rid
        return response

    @app.get("/health")
    async def health():
        """Liveness and engine load."""
        return {"status": "ok", **(await engine.stats())}

    @app.get("/v1/models")
    async def list_models():
        """List the base model and its fine-tuned adapters."""
        return {"object": "list", "data": models.cards()}

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str):
        """Retrieve one model (ids may contain `/` or `:`)."""
        return models.card(model)

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest):
        """Create a text completion (OpenAI's legacy completions API)."""
        return _respond(await completions.create(body))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest):
        """Create a chat completion."""
        return _respond(await chat.create(body))

    @app.post("/v1/tokenize")
    async def tokenize(body: TokenizeRequest):
        """Token ids, token strings and count of a prompt or a chat (our extension)."""
        return tokenizer.tokenize(body)

    @app.post("/v1/detokenize")
    async def detokenize(body: DetokenizeRequest):
        """Text of token ids (our extension)."""
        return tokenizer.detokenize(body)

    return app
