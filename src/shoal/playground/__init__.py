"""The web playground: static files (HTML, plain ES modules, CSS) that talk to the public API.

`STATIC_DIR` is what `api/routes/playground.py` serves. Nothing here imports the engine or the
API; the page holds no secrets and calls `/v1` with the key the user types in.
"""

from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent / "static"
