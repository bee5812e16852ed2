"""Server settings: flags and `SHOAL_*` environment variables, read once at start.

`ServerSettings.from_env()` reads the environment; the CLI overrides fields from its flags.
Engine limits live in `EngineConfig`; these are the HTTP server's own: where data lives, who may
call, how fast, and how big an upload may be.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

from .paths import shoal_home

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {raw!r}") from None


@dataclass(slots=True)
class ServerSettings:
    """How `shoal serve` runs (besides the engine)."""

    home: Path
    """Data directory ($SHOAL_HOME): models, the SQLite database, files, adapters."""
    database_url: str | None = None
    """SQLAlchemy URL ($SHOAL_DATABASE_URL); None = SQLite at $SHOAL_HOME/shoal.db."""
    host: str = "127.0.0.1"
    port: int = 8000
    rate_limit_rpm: int = 0
    """Requests per minute per API key ($SHOAL_RATE_LIMIT_RPM); 0 = unlimited."""
    rate_limit_tpm: int = 0
    """Prompt + completion tokens per minute per API key ($SHOAL_RATE_LIMIT_TPM); 0 = unlimited."""
    max_upload_bytes: int = 512 * 2**20
    """Largest file accepted by POST /v1/files ($SHOAL_MAX_UPLOAD_MB, default 512 MiB)."""
    workers: int = 1
    """Fine-tuning worker processes started by `shoal serve` ($SHOAL_WORKERS; 0 = none)."""

    @classmethod
    def from_env(cls, **overrides) -> "ServerSettings":
        s = cls(
            home=shoal_home(),
            database_url=os.environ.get("SHOAL_DATABASE_URL") or None,
            host=os.environ.get("SHOAL_HOST", "127.0.0.1"),
            port=_env_int("SHOAL_PORT", 8000),
            rate_limit_rpm=_env_int("SHOAL_RATE_LIMIT_RPM", 0),
            rate_limit_tpm=_env_int("SHOAL_RATE_LIMIT_TPM", 0),
            max_upload_bytes=_env_int("SHOAL_MAX_UPLOAD_MB", 512) * 2**20,
            workers=_env_int("SHOAL_WORKERS", 1),
        )
        names = {f.name for f in fields(cls)}
        for k, v in overrides.items():
            if k not in names:
                raise ValueError(f"{k}: not a server setting")
            if v is not None:
                setattr(s, k, v)
        s.check()
        return s

    def check(self) -> None:
        for name in ("rate_limit_rpm", "rate_limit_tpm", "workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.max_upload_bytes <= 0:
            raise ValueError("max_upload_bytes: must be positive")

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK

    @property
    def files_dir(self) -> Path:
        """Uploaded file blobs, by content hash."""
        return self.home / "files"
