"""What routes share: the app's services, and the caller of a request (authenticated and
rate-limited) as FastAPI dependencies."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from .auth import Authenticator, Principal
from .metering import Meter
from .metrics import Metrics
from .ratelimit import RateLimiter

RATE_HEADERS = "shoal.ratelimit"  # scope key: headers the middleware adds to the response


@dataclass
class Services:
    """Everything a route may need, in `app.state.shoal`."""

    engine: Any
    models: Any  # serving.models.ServedModels
    store: Any
    settings: Any  # settings.ServerSettings
    auth: Authenticator
    limiter: RateLimiter
    metrics: Metrics
    meter: Meter
    completions: Any = None  # serving.completions.CompletionService
    chat: Any = None  # serving.chat.ChatService
    tokenizer: Any = None  # serving.tokenize.TokenizeService
    extra: dict = field(default_factory=dict)  # services added by later routers (files, jobs)


def services(request: Request) -> Services:
    return request.app.state.shoal


async def _caller(request: Request, uses_tokens: bool) -> Principal:
    s: Services = request.app.state.shoal
    p = await s.auth.authenticate_async(request.headers.get("authorization"))
    request.scope[RATE_HEADERS] = s.limiter.acquire(p.key_id or p.org_id, uses_tokens=uses_tokens)
    return p


async def caller(request: Request) -> Principal:
    """The authenticated, request-limited caller."""
    return await _caller(request, uses_tokens=False)


async def billed_caller(request: Request) -> Principal:
    """As `caller`, also refused while the key's token bucket is empty."""
    return await _caller(request, uses_tokens=True)


async def admin_caller(request: Request) -> Principal:
    from ..serving.errors import ServingError

    p = await caller(request)
    if not p.is_admin:
        raise ServingError(403, "This endpoint needs an admin key (shoal keys create --admin)",
                           type="permission_error")
    return p
