"""Content-addressed blobs: atomic writes, the size limit leaves nothing behind."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from shoal.blobs import BlobStore, TooLarge


def test_put_read_delete(tmp_path):
    store = BlobStore(tmp_path / "files")
    sha, size = store.put_bytes(b"hello\n")
    assert (sha, size) == (hashlib.sha256(b"hello\n").hexdigest(), 6)
    assert store.read(sha) == b"hello\n"
    assert store.put_chunks([b"hel", b"lo\n"], limit=100) == (sha, 6)  # same content, same blob
    store.delete(sha)
    assert not store.path(sha).exists()


def test_too_large_leaves_nothing(tmp_path):
    store = BlobStore(tmp_path / "files")

    async def chunks():
        for _ in range(10):
            yield b"x" * 100

    with pytest.raises(TooLarge):
        asyncio.run(store.put_stream(chunks(), limit=250))
    assert [p for p in (tmp_path / "files").rglob("*") if p.is_file()] == []
    with pytest.raises(ValueError, match="sha256"):
        store.path("../../etc/passwd")
