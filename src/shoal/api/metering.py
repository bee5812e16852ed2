"""Billing one request: usage rows, token counters and the token rate limit, in one place.

A `Bill` is opened per completion/chat request. `await bill.charge(p, c)` writes the usage row
(off the event loop) before the response's last byte is sent; `bill.charge_nowait(p, c)` is the
path for a request cut short (client gone, task cancelled): it records what was generated
without awaiting. Either runs once per bill.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from .auth import Principal

log = logging.getLogger("shoal.api")


class Meter:
    """App-wide: the store, the rate limiter and the metrics that every bill updates."""

    def __init__(self, store, limiter, metrics) -> None:
        self.store, self.limiter, self.metrics = store, limiter, metrics

    def open(self, principal: Principal, model: str, base_model: str, kind: str,
             request_id: str | None) -> "Bill":
        return Bill(self, principal, model, base_model, kind, request_id)


class Bill:
    def __init__(self, meter: Meter, principal: Principal, model: str, base_model: str, kind: str,
                 request_id: str | None) -> None:
        self.meter, self.principal = meter, principal
        self.model, self.base_model, self.kind, self.request_id = model, base_model, kind, request_id
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.engine_s: float | None = None  # time inside the engine (non-streamed requests)
        self._charged = False
        self._lock = threading.Lock()

    def mark_first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
            self.meter.metrics.ttft.labels(self.kind).observe(self.first_token_at - self.started)

    def _claim(self, prompt_tokens: int, completion_tokens: int) -> bool:
        with self._lock:
            if self._charged:
                return False
            self._charged = True
        p = self.principal
        self.meter.limiter.debit_tokens(p.key_id or p.org_id, prompt_tokens + completion_tokens)
        # labelled by base model: fine-tuned names carry org names, and /metrics needs no key
        self.meter.metrics.count_tokens(self.base_model, prompt_tokens, completion_tokens)
        return True

    def _write(self, prompt_tokens: int, completion_tokens: int) -> None:
        p = self.principal
        self.meter.store.record_usage(p.org_id, p.key_id, self.model, self.base_model, self.kind,
                                      prompt_tokens, completion_tokens, request_id=self.request_id)

    async def charge(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Record usage; returns once the row is committed."""
        if self._claim(prompt_tokens, completion_tokens):
            await asyncio.to_thread(self._write, prompt_tokens, completion_tokens)

    def charge_nowait(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Record usage from a request cut short, in the background."""
        if not self._claim(prompt_tokens, completion_tokens):
            return

        def write() -> None:
            try:
                self._write(prompt_tokens, completion_tokens)
            except Exception:  # never lose the server over a usage row; say so loudly
                log.exception("usage row for %s was not recorded", self.request_id)

        threading.Thread(target=write, name="shoal-usage", daemon=True).start()
