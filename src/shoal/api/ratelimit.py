"""Per-key rate limits: requests/min and tokens/min as token buckets, with OpenAI's headers.

Each key has two buckets that refill continuously to their per-minute limit. A request takes one
from the request bucket up front; tokens are debited after the request from what it actually
used (prompt + completion), so the token bucket may go negative and then blocks the key until it
refills. Refused requests get 429 with `retry-after` and the `x-ratelimit-*` headers, which every
limited response also carries:

    x-ratelimit-limit-requests / -tokens       the per-minute limits
    x-ratelimit-remaining-requests / -tokens   what is left now
    x-ratelimit-reset-requests / -tokens       time until the bucket is full again ("1.5s", "6m0s")
"""

from __future__ import annotations

import math
import threading
import time

from ..serving.errors import ServingError


def _duration(seconds: float) -> str:
    """OpenAI's reset format: `850ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{max(int(seconds * 1000), 0)}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s}s"


class Bucket:
    """`capacity` units refilling at capacity/60 per second; `level` may go below zero."""

    __slots__ = ("capacity", "level", "stamp")

    def __init__(self, capacity: int, now: float) -> None:
        self.capacity, self.level, self.stamp = float(capacity), float(capacity), now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.capacity / 60.0)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` units are available."""
        return max(0.0, (amount - self.level) * 60.0 / self.capacity)

    def reset_in(self) -> float:
        return max(0.0, (self.capacity - self.level) * 60.0 / self.capacity)


class RateLimiter:
    """Request and token buckets per key; thread-safe. A limit of 0 disables that bucket."""

    def __init__(self, rpm: int = 0, tpm: int = 0, clock=time.monotonic) -> None:
        self.rpm, self.tpm, self.clock = rpm, tpm, clock
        self._req: dict[str, Bucket] = {}
        self._tok: dict[str, Bucket] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.tpm)

    def _buckets(self, key: str, now: float) -> tuple[Bucket | None, Bucket | None]:
        req = tok = None
        if self.rpm:
            req = self._req.get(key) or self._req.setdefault(key, Bucket(self.rpm, now))
            req.refill(now)
        if self.tpm:
            tok = self._tok.get(key) or self._tok.setdefault(key, Bucket(self.tpm, now))
            tok.refill(now)
        return req, tok

    def _headers(self, req: Bucket | None, tok: Bucket | None) -> dict[str, str]:
        h = {}
        if req is not None:
            h.update({"x-ratelimit-limit-requests": str(self.rpm),
                      "x-ratelimit-remaining-requests": str(max(int(req.level), 0)),
                      "x-ratelimit-reset-requests": _duration(req.reset_in())})
        if tok is not None:
            h.update({"x-ratelimit-limit-tokens": str(self.tpm),
                      "x-ratelimit-remaining-tokens": str(max(int(tok.level), 0)),
                      "x-ratelimit-reset-tokens": _duration(tok.reset_in())})
        return h

    def acquire(self, key: str, *, uses_tokens: bool) -> dict[str, str]:
        """Take one request (and check the token bucket); headers to send, or 429."""
        if not self.enabled:
            return {}
        with self._lock:
            now = self.clock()
            req, tok = self._buckets(key, now)
            if req is not None and req.level < 1:
                wait = req.wait_for(1)
                raise self._refused("requests", self.rpm, wait, self._headers(req, tok))
            if uses_tokens and tok is not None and tok.level < 1:
                wait = tok.wait_for(1)
                raise self._refused("tokens", self.tpm, wait, self._headers(req, tok))
            if req is not None:
                req.level -= 1
            return self._headers(req, tok)

    def debit_tokens(self, key: str, tokens: int) -> None:
        """Charge what a finished (or aborted) request used."""
        if not self.tpm or tokens <= 0:
            return
        with self._lock:
            _, tok = self._buckets(key, self.clock())
            tok.level -= tokens

    @staticmethod
    def _refused(kind: str, limit: int, wait: float, headers: dict[str, str]) -> ServingError:
        headers = {**headers, "retry-after": str(max(1, math.ceil(wait)))}
        return ServingError(429, f"Rate limit reached for {kind} per min (RPM/TPM): limit {limit}. "
                                 f"Please try again in {_duration(wait)}.",
                            type=kind, code="rate_limit_exceeded", headers=headers)
