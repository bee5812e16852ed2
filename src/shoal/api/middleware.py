"""One pure-ASGI middleware (no per-request task or body buffering, so streams stay cheap):
`x-request-id` on every response, the caller's rate-limit headers, request metrics, and for a
non-streamed completion a `server-timing` header splitting the time to its response into the
engine's part and the API layer's (`engine;dur=ms, api;dur=ms`)."""

from __future__ import annotations

import time
import uuid

from .deps import RATE_HEADERS
from .metrics import Metrics


class RequestMiddleware:
    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = None
        for k, v in scope.get("headers", ()):
            if k == b"x-request-id":
                rid = v.decode("latin-1")[:200]
        rid = rid or f"req_{uuid.uuid4().hex}"
        scope["shoal.request_id"] = rid
        t0 = time.perf_counter()
        status = 500

        async def send_wrapped(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", rid.encode("latin-1")))
                for k, v in (scope.get(RATE_HEADERS) or {}).items():
                    headers.append((k.encode(), v.encode()))
                bill = scope.get("shoal.bill")
                if bill is not None and bill.engine_s is not None:
                    total = time.perf_counter() - t0
                    timing = f"engine;dur={bill.engine_s * 1e3:.2f}, api;dur={(total - bill.engine_s) * 1e3:.2f}"
                    headers.append((b"server-timing", timing.encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                route = scope.get("route")
                self.metrics.observe_request(getattr(route, "path", "other"), status,
                                             time.perf_counter() - t0)
            await send(message)

        await self.app(scope, receive, send_wrapped)
