"""Content-addressed blobs under `$SHOAL_HOME/files/`: uploaded files and result files.

A blob is written to a temporary file in the same directory while it is hashed, then renamed to
`<sha256[:2]>/<sha256>`; a failed or oversized upload leaves nothing behind. The client's file
name is metadata in the store, never part of a path.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import AsyncIterator, Iterable
from pathlib import Path


class TooLarge(ValueError):
    """The blob exceeds the size limit."""


class BlobStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"sha256: not a hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        return self.put_chunks([data], len(data) + 1)

    def put_chunks(self, chunks: Iterable[bytes], limit: int) -> tuple[str, int]:
        """Write chunks; (sha256, size). TooLarge (and nothing written) past `limit` bytes."""
        sink = _Sink(self, limit)
        try:
            for chunk in chunks:
                sink.write(chunk)
            return sink.commit()
        except BaseException:
            sink.discard()
            raise

    async def put_stream(self, chunks: AsyncIterator[bytes], limit: int) -> tuple[str, int]:
        """As put_chunks, from an async source (an upload)."""
        sink = _Sink(self, limit)
        try:
            async for chunk in chunks:
                sink.write(chunk)
            return sink.commit()
        except BaseException:
            sink.discard()
            raise

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def delete(self, sha256: str) -> None:
        try:
            self.path(sha256).unlink()
        except FileNotFoundError:
            pass


class _Sink:
    """One blob being written: a temporary file in the store's root, hashed as it grows."""

    def __init__(self, store: BlobStore, limit: int) -> None:
        store.root.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=".upload-", dir=store.root)
        self.f, self.store, self.limit = os.fdopen(fd, "wb"), store, limit
        self.h, self.size = hashlib.sha256(), 0

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise TooLarge(f"file: larger than the {self.limit} byte limit")
        self.h.update(chunk)
        self.f.write(chunk)

    def commit(self) -> tuple[str, int]:
        """Flush to disk and rename to the content's name; (sha256, size)."""
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        digest = self.h.hexdigest()
        final = self.store.path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.tmp, final)  # same content, same name: replacing is harmless
        return digest, self.size

    def discard(self) -> None:
        self.f.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)
