"""Where Shoal keeps its data: `$SHOAL_HOME` (default `~/.cache/shoal`).

Layout: `models/registry.json` (user-added models), `models/<name>/` (converted or downloaded
checkpoints as safetensors + tokenizer files). Later issues add the database and blobs here.
"""

from __future__ import annotations

import os
from pathlib import Path


def shoal_home() -> Path:
    """The data directory, from SHOAL_HOME or ~/.cache/shoal (not created here)."""
    env = os.environ.get("SHOAL_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "shoal"


def models_dir() -> Path:
    return shoal_home() / "models"
