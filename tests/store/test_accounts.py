"""Organizations and API keys: keys are stored hashed, looked up, revoked."""

from __future__ import annotations

import time

from sqlalchemy import text

from shoal.store.ids import hash_key


def test_org_get_or_create_is_idempotent(store):
    org = store.get_or_create_org("acme")
    assert org.id.startswith("org-") and len(org.id) == 28
    assert store.get_or_create_org("acme").id == org.id
    assert store.get_org(org.id).name == "acme"
    assert store.get_org("org-missing") is None
    assert store.default_org().name == "default"
    assert store.default_org().id == store.default_org().id


def test_keys_are_stored_hashed(store):
    assert not store.has_keys()
    plaintext, key = store.create_key("acme", name="ci", admin=True)
    assert plaintext.startswith("sk-shoal-") and len(plaintext) == 49
    assert key.id.startswith("key_") and len(key.id) == 20
    assert key.prefix == plaintext[:12] and key.key_hash == hash_key(plaintext)
    with store.engine.connect() as conn:
        for row in conn.execute(text("select * from api_keys")):
            assert all(plaintext not in str(v) for v in row)
    found = store.lookup_key(plaintext)
    assert found.id == key.id and found.is_admin and found.name == "ci"
    assert found.org_id == store.get_or_create_org("acme").id
    assert store.lookup_key(plaintext + "x") is None
    assert store.has_keys()


def test_revoked_key_is_rejected(store):
    plaintext, key = store.create_key("acme")
    assert store.revoke_key(key.id)
    assert not store.revoke_key(key.id)
    assert not store.revoke_key("key_missing")
    assert store.lookup_key(plaintext) is None
    assert not store.has_keys()
    assert store.list_keys()[0].revoked_at is not None


def test_last_used_is_touched_at_most_once_a_minute(store):
    plaintext, key = store.create_key("acme")
    assert key.last_used_at is None
    first = store.lookup_key(plaintext).last_used_at
    assert first is not None
    store.lookup_key(plaintext)
    assert store.list_keys()[0].last_used_at == first
    with store.engine.begin() as conn:
        conn.execute(text("update api_keys set last_used_at = :t"), {"t": time.time() - 61})
    assert store.lookup_key(plaintext).last_used_at > first


def test_list_keys_by_org(store):
    _, a = store.create_key("acme")
    _, b = store.create_key("other")
    assert [k.id for k in store.list_keys()] == [a.id, b.id]
    assert [k.id for k in store.list_keys(b.org_id)] == [b.id]
