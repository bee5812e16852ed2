"""Convert a GGUF file once into a Hugging Face model directory in the model cache.

The result (config.json, model.safetensors in fp32, tokenizer files with the chat template, and the
file's 4-bit layers as stored, `gguf_q4`) loads in well under 2 s, against ~15 s for parsing and
dequantizing the GGUF. It is written to a temporary directory and renamed into place, under a file
lock, so a crash or a second process never leaves a half-written model. Not here: deciding where the cache is (registry.py).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from safetensors.torch import save_file

from .gguf_q4 import CODES_FILE, gguf_q4_codes, save_codes
from .loader import load_gguf_file
from .weights import hf_state_dict

MARKER = "shoal_conversion.json"
log = logging.getLogger(__name__)


@contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock held for the block (blocks until free)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_converted(out_dir: Path) -> bool:
    return (out_dir / MARKER).is_file()


def save_hf_dir(loaded, out_dir: Path, extra_meta: dict | None = None) -> None:
    """Write a loaded model as a HF directory at `out_dir` (which must not exist)."""
    out_dir.mkdir(parents=True)
    with open(out_dir / "config.json", "w", encoding="utf-8") as f:
        json.dump(loaded.config.to_hf(), f, indent=2)
    state = {k: v.contiguous() for k, v in hf_state_dict(loaded.model).items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    if loaded.tokenizer is not None:
        loaded.tokenizer.save(str(out_dir))
    with open(out_dir / MARKER, "w", encoding="utf-8") as f:
        json.dump({"created": int(time.time()), **(extra_meta or {})}, f, indent=2)


def convert_gguf(gguf_path: str, out_dir: str | Path) -> Path:
    """Convert `gguf_path` into `out_dir` unless already done; returns out_dir."""
    out_dir = Path(out_dir)
    if is_converted(out_dir):
        return out_dir
    with file_lock(out_dir.parent / f".{out_dir.name}.lock"):
        if is_converted(out_dir):  # another process finished while we waited
            return out_dir
        loaded = load_gguf_file(gguf_path, dtype="float32")
        tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            stat = os.stat(gguf_path)
            save_hf_dir(loaded, tmp, {"source": os.path.abspath(gguf_path), "source_bytes": stat.st_size})
            try:  # 4-bit layers as stored, for `quantization="q4"`: an extra, never a reason to fail
                codes = gguf_q4_codes(gguf_path)
            except (ValueError, OSError) as e:
                log.warning("shoal: %s: 4-bit layers not kept for q4 (%s)", gguf_path, e)
                codes = {}
            if codes:
                save_codes(codes, str(tmp / CODES_FILE))
            if out_dir.exists():  # a stale, unmarked directory from an interrupted older layout
                shutil.rmtree(out_dir)
            os.rename(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
