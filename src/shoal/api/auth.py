"""Who is calling: `Authorization: Bearer <key>` -> a Principal (org, key, admin).

Keys live hashed in the store. Open mode (no keys exist and the server binds loopback) maps any
key, or none, to the `default` org, so `api_key="EMPTY"` works on a laptop. Creating the first
key turns open mode off within `KEYS_TTL_S`. Lookups are cached for `CACHE_TTL_S` so a request
costs no database read on the hot path; a revoked key stops working within that time.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass

from ..serving.errors import ServingError

CACHE_TTL_S = 10.0
KEYS_TTL_S = 2.0


@dataclass(frozen=True, slots=True)
class Principal:
    org_id: str
    org_name: str
    key_id: str | None
    is_admin: bool


def missing_key() -> ServingError:
    return ServingError(401, "You didn't provide an API key. You need to provide your API key in an "
                             "Authorization header using Bearer auth (i.e. Authorization: Bearer "
                             "YOUR_KEY).", code="missing_api_key")


def invalid_key(key: str) -> ServingError:
    shown = f"{key[:8]}***{key[-4:]}" if len(key) > 12 else "***"
    return ServingError(401, f"Incorrect API key provided: {shown}.", code="invalid_api_key")


class Authenticator:
    """Bearer keys -> Principal, with a small TTL cache in front of the store."""

    def __init__(self, store, *, loopback: bool) -> None:
        self.store, self.loopback = store, loopback
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._keys_checked, self._has_keys = 0.0, True
        self._default: Principal | None = None

    def open_mode(self) -> bool:
        """True when no keys exist and we bind loopback (re-checked every KEYS_TTL_S)."""
        if not self.loopback:
            return False
        now = time.monotonic()
        if now - self._keys_checked > KEYS_TTL_S:
            self._has_keys, self._keys_checked = self.store.has_keys(), now
        return not self._has_keys

    def default_principal(self) -> Principal:
        if self._default is None:
            org = self.store.default_org()
            self._default = Principal(org.id, org.name, None, True)
        return self._default

    def lookup(self, key: str) -> Principal | None:
        digest = hashlib.sha256(key.encode()).hexdigest()
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and now - hit[0] < CACHE_TTL_S:
            return hit[1]
        row = self.store.lookup_key(key)
        principal = None
        if row is not None:
            org = self.store.get_org(row.org_id)
            principal = Principal(row.org_id, org.name if org else row.org_id, row.id, row.is_admin)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (now, principal)
        return principal

    def authenticate(self, header: str | None) -> Principal:
        """The caller of a request with this Authorization header; 401 when not allowed."""
        key = None
        if header:
            scheme, _, value = header.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                key = value.strip()
        if self.open_mode():
            return self.default_principal()
        if key is None:
            raise missing_key()
        principal = self.lookup(key)
        if principal is None:
            raise invalid_key(key)
        return principal

    async def authenticate_async(self, header: str | None) -> Principal:
        """As `authenticate`, off the event loop when the cache misses."""
        if header and not self.open_mode():
            digest = hashlib.sha256(header.partition(" ")[2].strip().encode()).hexdigest()
            hit = self._cache.get(digest)
            if hit is None or time.monotonic() - hit[0] >= CACHE_TTL_S:
                return await asyncio.to_thread(self.authenticate, header)
        return self.authenticate(header)
