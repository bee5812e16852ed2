"""Models, completions, chat and tokenize: the OpenAI inference surface."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..auth import Principal
from ..deps import billed_caller, caller, services
from ..protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

KEEPALIVE_S = 15.0
router = APIRouter()


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
        # engine requests and bills what they generated
        nxt.cancel()
        try:
            await nxt
        except BaseException:
            pass
        if hasattr(stream, "aclose"):
            await stream.aclose()


def respond(result):
    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(with_keepalive(result), media_type="text/event-stream",
                             headers={"cache-control": "no-cache"})


@router.get("/v1/models")
async def list_models(request: Request, who: Principal = Depends(caller)):
    """List the base model, shared adapters and your organization's fine-tuned models."""
    return {"object": "list", "data": services(request).models.cards(who.org_id)}


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, request: Request, who: Principal = Depends(caller)):
    """Retrieve one model (ids may contain `/` or `:`)."""
    return await services(request).models.card(model, who.org_id)


@router.delete("/v1/models/{model:path}")
async def delete_model(model: str, request: Request, who: Principal = Depends(caller)):
    """Delete one of your organization's fine-tuned models (and its checkpoint models)."""
    s = services(request)
    return await s.models.delete(model, who.org_id, home=str(s.settings.home))


async def _generate(request: Request, who: Principal, body, kind: str):
    """Resolve the model, open the request's bill, run the service: the body of both routes."""
    s = services(request)
    target = await s.models.resolve(body.model, who.org_id)
    bill = s.meter.open(who, body.model, target.base_model, kind,
                        request.scope.get("shoal.request_id"))
    request.scope["shoal.bill"] = bill  # the middleware's server-timing header reads it
    service = s.completions if kind == "completions" else s.chat
    return respond(await service.create(body, target.adapter, bill))


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request,
                            who: Principal = Depends(billed_caller)):
    """Create a text completion (OpenAI's legacy completions API)."""
    return await _generate(request, who, body, "completions")


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request,
                                 who: Principal = Depends(billed_caller)):
    """Create a chat completion."""
    return await _generate(request, who, body, "chat")


@router.post("/v1/tokenize")
async def tokenize(body: TokenizeRequest, request: Request, who: Principal = Depends(caller)):
    """Token ids, token strings and count of a prompt or a chat (our extension)."""
    s = services(request)
    await s.models.resolve(body.model, who.org_id)
    return s.tokenizer.tokenize(body)


@router.post("/v1/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request, who: Principal = Depends(caller)):
    """Text of token ids (our extension)."""
    s = services(request)
    await s.models.resolve(body.model, who.org_id)
    return s.tokenizer.detokenize(body)
