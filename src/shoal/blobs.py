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

    def _start(self):
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=self.root)
        return os.fdopen(fd, "wb"), tmp

    def _finish(self, tmp: str, digest: str) -> Path:
        final = self.path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)  # same content, same name: replacing is harmless
        return final

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        return self.put_chunks([data], len(data) + 1)

    def put_chunks(self, chunks: Iterable[bytes], limit: int) -> tuple[str, int]:
        """Write chunks; (sha256, size). TooLarge (and nothing written) past `limit` bytes."""
        f, tmp = self._start()
        h, size = hashlib.sha256(), 0
        try:
            with f:
                for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise TooLarge(f"file: larger than the {limit} byte limit")
                    h.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            digest = h.hexdigest()
            self._finish(tmp, digest)
            return digest, size
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    async def put_stream(self, chunks: AsyncIterator[bytes], limit: int) -> tuple[str, int]:
        """As put_chunks, from an async source (an upload)."""
        f, tmp = self._start()
        h, size = hashlib.sha256(), 0
        try:
            with f:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise TooLarge(f"file: larger than the {limit} byte limit")
                    h.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            digest = h.hexdigest()
            self._finish(tmp, digest)
            return digest, size
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def delete(self, sha256: str) -> None:
        try:
            self.path(sha256).unlink()
        except FileNotFoundError:
            pass
