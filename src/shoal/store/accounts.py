"""Organizations and API keys.

A key's plaintext is returned once, by `create_key`; the table keeps its sha256 (for lookup) and
its first 12 characters (for display). Lookups touch `last_used_at` at most once a minute per key,
so authenticating every request costs a read, not a write. Not here: HTTP auth (the API layer).
"""

from __future__ import annotations

import time

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError

from .base import StoreBase
from .ids import hash_key, new_id, new_key
from .schema import ApiKey, Organization

DEFAULT_ORG = "default"
TOUCH_EVERY_S = 60.0


class Accounts(StoreBase):
    """Organizations and their API keys."""

    def get_or_create_org(self, name: str) -> Organization:
        """The organization called `name`, created if missing (safe under concurrent callers)."""
        if not name:
            raise ValueError("name: an organization needs a name")
        org = self._org_named(name)
        if org is not None:
            return org
        try:
            with self._write() as s:
                org = s.scalar(select(Organization).where(Organization.name == name))
                if org is None:
                    org = Organization(id=new_id("org-"), name=name, created_at=time.time())
                    s.add(org)
            return org
        except IntegrityError:  # another process inserted it between our read and write
            org = self._org_named(name)
            assert org is not None
            return org

    def _org_named(self, name: str) -> Organization | None:
        with self._read() as s:
            return s.scalar(select(Organization).where(Organization.name == name))

    def get_org(self, org_id: str) -> Organization | None:
        """The organization with this id, or None."""
        with self._read() as s:
            return s.get(Organization, org_id)

    def default_org(self) -> Organization:
        """The organization named `default` (used when auth is off), created on first use."""
        return self.get_or_create_org(DEFAULT_ORG)

    def create_key(self, org_name: str, name: str | None = None,
                   admin: bool = False) -> tuple[str, ApiKey]:
        """Make a key for `org_name` (created if missing).

        Returns:
            (plaintext, row): the plaintext is shown to the user now and never stored.
        """
        org = self.get_or_create_org(org_name)
        plaintext = new_key()
        key = ApiKey(id=new_id("key_", 16), org_id=org.id, name=name, prefix=plaintext[:12],
                     key_hash=hash_key(plaintext), is_admin=admin, created_at=time.time())
        with self._write() as s:
            s.add(key)
        return plaintext, key

    def lookup_key(self, plaintext: str) -> ApiKey | None:
        """The live key with this plaintext, or None when unknown or revoked."""
        with self._read() as s:
            key = s.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(plaintext),
                                                ApiKey.revoked_at.is_(None)))
        if key is None:
            return None
        now = time.time()
        if key.last_used_at is None or now - key.last_used_at >= TOUCH_EVERY_S:
            stale = or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at <= now - TOUCH_EVERY_S)
            with self._write() as s:
                s.execute(update(ApiKey).where(ApiKey.id == key.id, stale)
                          .values(last_used_at=now))
            key.last_used_at = now
        return key

    def list_keys(self, org_id: str | None = None) -> list[ApiKey]:
        """Keys of one organization (all when None), revoked ones included, oldest first."""
        stmt = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
        if org_id is not None:
            stmt = stmt.where(ApiKey.org_id == org_id)
        with self._read() as s:
            return list(s.scalars(stmt))

    def revoke_key(self, key_id: str) -> bool:
        """Revoke a key; False when it does not exist or was revoked already."""
        with self._write() as s:
            done = s.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
                             .values(revoked_at=time.time()))
            return done.rowcount == 1

    def has_keys(self) -> bool:
        """Whether any key that is not revoked exists (auth is on once one does)."""
        with self._read() as s:
            live = select(ApiKey.id).where(ApiKey.revoked_at.is_(None)).limit(1)
            return s.scalar(live) is not None
