"""Read, check and write LoRA adapters in PEFT's on-disk format.

A directory holds `adapter_config.json` and `adapter_model.safetensors` (or `.bin`) with keys
`base_model.model.<module>.lora_A[.default].weight` (r, in) and `...lora_B...` (out, r); GPT-2's
Conv1D targets use that same layout. Loaded weights are keyed by OUR module paths (equal to
HF's). Whatever Shoal cannot serve exactly (DoRA, LoRA biases, modules_to_save, embedding LoRA,
layer selection, other PEFT methods) is refused with a ValueError naming the field, never dropped.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
ALL_LINEAR = "all-linear"

# Config fields that change the forward in ways a plain stacked LoRA cannot reproduce.
_REFUSED = ("use_dora", "lora_bias", "modules_to_save", "layers_to_transform", "layers_pattern",
            "layer_replication", "target_parameters", "trainable_token_indices",
            "alora_invocation_tokens", "use_qalora", "use_bdlora", "arrow_config", "kasa_config",
            "velora_config", "monteclora_config", "megatron_config")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A|lora_B)"
                  r"(?:\.[^.]+)?\.weight$")

Shapes = dict[str, tuple[tuple[int, ...], tuple[int, ...]]]


class AdapterError(ValueError):
    """An adapter cannot be served; the message names the field, tensor or file."""


@dataclass(slots=True)
class AdapterConfig:
    """The parts of PEFT's LoraConfig that decide the forward."""

    r: int
    """Default rank."""
    lora_alpha: float
    """Default alpha; scaling = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora)."""
    target_modules: list[str] | str
    """Leaf names or full paths (list), or a regex matched against the full path (str)."""
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides, keyed by PEFT patterns (`(.*\\.)?(key)$`)."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    exclude_modules: list[str] | str | None = None
    base_model_name_or_path: str | None = None
    path: str | None = None
    shapes: Shapes | None = None
    """module -> (lora_A shape, lora_B shape), read from the weights file's header."""
    raw: dict[str, Any] = field(default_factory=dict)
    """The whole adapter_config.json, so that saving keeps unknown fields."""

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise AdapterError(f"r: must be a positive integer, got {self.r!r}")
        if not self.target_modules:
            raise AdapterError("target_modules: missing or empty")
        for k, v in self.rank_pattern.items():
            if not isinstance(v, int) or v <= 0:
                raise AdapterError(f"rank_pattern: {k!r} -> {v!r} is not a positive integer")

    def _pattern(self, table: dict, module: str, default):
        for key in table:  # PEFT's get_pattern_key: first key matching a suffix of the path
            if re.match(rf"(.*\.)?({key})$", module):
                return table[key]
        return default

    def rank_for(self, module: str) -> int:
        return self._pattern(self.rank_pattern, module, self.r)

    def alpha_for(self, module: str) -> float:
        return self._pattern(self.alpha_pattern, module, self.lora_alpha)

    def scaling_for(self, module: str) -> float:
        r = self.rank_for(module)
        return self.alpha_for(module) / (math.sqrt(r) if self.use_rslora else r)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def max_rank(self) -> int:
        return max([self.r, *self.rank_pattern.values(), *(a[0] for a, _ in (self.shapes or {}).values())])

    def targets(self, module: str) -> bool:
        """PEFT's check_target_module_exists for a module path."""
        ex = self.exclude_modules
        if ex and (re.fullmatch(ex, module) if isinstance(ex, str)
                   else module in ex or any(module.endswith("." + e) for e in ex)):
            return False
        tm = self.target_modules
        if isinstance(tm, str):
            return tm == ALL_LINEAR or re.fullmatch(tm, module) is not None
        return module in tm or any(module.endswith("." + t) for t in tm)


@dataclass(slots=True)
class LoRAAdapter:
    """One loaded adapter: A (r, in) and B (out, r) per module path of our model."""

    name: str
    path: str | None
    r: int
    lora_alpha: float
    scaling: float
    target_modules: list[str] | str
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    config: AdapterConfig
    scalings: dict[str, float] = field(default_factory=dict)
    """Per-module scaling (differs from `scaling` only under rank_pattern/alpha_pattern)."""

    def scaling_for(self, module: str) -> float:
        return self.scalings.get(module, self.scaling)

    @classmethod
    def from_weights(cls, name: str, weights: dict[str, tuple[torch.Tensor, torch.Tensor]],
                     lora_alpha: float, *, use_rslora: bool = False,
                     target_modules: list[str] | str | None = None,
                     base_model_name_or_path: str | None = None) -> "LoRAAdapter":
        """An adapter from in-memory weights (e.g. a trainer's).

        Args:
            weights: module path -> (A (r, in), B (out, r)).
            lora_alpha: scaling = lora_alpha / r per module (r from A's shape).
            target_modules: for the saved config; default the exact paths of `weights`, so
                PEFT creates no LoRA layer the file lacks.
        Modules whose rank differs from the most common one go into rank_pattern under their
        escaped full path.
        """
        if not weights:
            raise AdapterError("weights: empty")
        ranks = {m: a.shape[0] for m, (a, _) in weights.items()}
        r = Counter(ranks.values()).most_common(1)[0][0]
        cfg = AdapterConfig(r=r, lora_alpha=lora_alpha, use_rslora=use_rslora,
                            target_modules=target_modules or sorted(weights),
                            rank_pattern={re.escape(m): k for m, k in ranks.items() if k != r},
                            base_model_name_or_path=base_model_name_or_path)
        return cls(name, None, r, lora_alpha, cfg.scaling, cfg.target_modules, dict(weights), cfg,
                   {m: cfg.scaling_for(m) for m in weights})


def _weights_file(path: str) -> str:
    for fname in (SAFETENSORS_NAME, BIN_NAME):
        f = os.path.join(path, fname)
        if os.path.isfile(f):
            return f
    raise AdapterError(f"{SAFETENSORS_NAME}: not found in {path} (nor {BIN_NAME})")


def _parse_config(raw: dict[str, Any], path: str) -> AdapterConfig:
    where = os.path.join(path, CONFIG_NAME)
    if raw.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"peft_type: {raw['peft_type']!r} is not supported, only LORA ({where})")
    for name in _REFUSED:
        if raw.get(name):
            raise AdapterError(f"{name}: {raw[name]!r} is not supported ({where})")
    if raw.get("bias", "none") != "none":
        raise AdapterError(f"bias: {raw['bias']!r} is not supported, only 'none' ({where})")
    tm = raw.get("target_modules")
    if isinstance(tm, str) and tm.lower() == ALL_LINEAR:
        tm = ALL_LINEAR
    elif tm is not None and not isinstance(tm, str):
        tm = sorted(tm)
    try:
        return AdapterConfig(
            r=raw.get("r", 8), lora_alpha=float(raw.get("lora_alpha", 8)), target_modules=tm,
            use_rslora=bool(raw.get("use_rslora", False)),
            rank_pattern=dict(raw.get("rank_pattern") or {}),
            alpha_pattern={k: float(v) for k, v in (raw.get("alpha_pattern") or {}).items()},
            exclude_modules=raw.get("exclude_modules"),
            base_model_name_or_path=raw.get("base_model_name_or_path"), path=path, raw=raw)
    except AdapterError as e:
        raise AdapterError(f"{e} ({where})") from None


def _module_of(key: str, fname: str) -> tuple[str, str]:
    """A PEFT tensor name -> (our module path, 'lora_A' | 'lora_B'); refuses everything else."""
    m = _KEY.match(key)
    if m:
        return m["module"], m["kind"]
    if "lora_embedding_" in key:
        mod = key.removeprefix(PREFIX).split(".lora_embedding_")[0]
        raise AdapterError(f"target_modules: {mod!r} is an embedding; LoRA on embeddings is not "
                           f"supported ({fname})")
    if "lora_magnitude_vector" in key:
        raise AdapterError(f"use_dora: tensor {key!r} is a DoRA magnitude; DoRA is not "
                           f"supported ({fname})")
    if ".lora_B" in key and key.endswith(".bias"):
        raise AdapterError(f"lora_bias: tensor {key!r} is a LoRA bias; not supported ({fname})")
    if "modules_to_save" in key:
        raise AdapterError(f"modules_to_save: tensor {key!r} is a full-module weight; not "
                           f"supported ({fname})")
    raise AdapterError(f"{fname}: tensor {key!r} is not a LoRA weight Shoal can serve")


def _pairs(items: dict[str, Any], fname: str) -> dict[str, dict[str, Any]]:
    """{PEFT key: value} -> {module: {'lora_A': value, 'lora_B': value}}, both present."""
    out: dict[str, dict[str, Any]] = {}
    # keys that name the refused feature first, then whatever else is in the file
    for key in sorted(items, key=lambda k: ("lora_embedding_" not in k, "lora_magnitude" not in k)):
        module, kind = _module_of(key, fname)
        out.setdefault(module, {})[kind] = items[key]
    for module, pair in out.items():
        for kind in ("lora_A", "lora_B"):
            if kind not in pair:
                raise AdapterError(f"{PREFIX}{module}.{kind}.weight: missing from {fname}")
    if not out:
        raise AdapterError(f"{fname}: holds no LoRA weights")
    return out


def _check_pair(module: str, a: tuple[int, ...], b: tuple[int, ...], cfg: AdapterConfig,
                fname: str) -> None:
    r = cfg.rank_for(module)
    if len(a) != 2 or a[0] != r:
        raise AdapterError(f"{PREFIX}{module}.lora_A.weight: shape {tuple(a)}, expected ({r}, in) "
                           f"for r={r} ({fname})")
    if len(b) != 2 or b[1] != r:
        raise AdapterError(f"{PREFIX}{module}.lora_B.weight: shape {tuple(b)}, expected (out, {r}) "
                           f"for r={r} ({fname})")


def _read_shapes(fname: str) -> dict[str, tuple[int, ...]]:
    if fname.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(fname, framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:
            raise AdapterError(f"{fname}: corrupt or unreadable safetensors file ({e})") from None
    return {k: tuple(t.shape) for k, t in _read_tensors(fname).items()}


def _read_tensors(fname: str) -> dict[str, torch.Tensor]:
    try:
        if fname.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(fname)
        return torch.load(fname, map_location="cpu", weights_only=True)
    except Exception as e:
        raise AdapterError(f"{fname}: corrupt or unreadable weights file "
                           f"({type(e).__name__}: {e})") from None


def read_adapter_config(path: str, *, with_shapes: bool = True) -> AdapterConfig:
    """Parse and check `path/adapter_config.json`; with_shapes also reads the weight names and
    shapes (the safetensors header only, no tensor data). Fast enough for registration."""
    if not os.path.isdir(path):
        raise AdapterError(f"{path}: no such adapter directory")
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise AdapterError(f"{CONFIG_NAME}: not found in {path}")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"{cfg_path}: not valid JSON ({e})") from None
    cfg = _parse_config(raw, path)
    fname = _weights_file(path)
    if with_shapes:
        cfg.shapes = {}
        for module, pair in _pairs(_read_shapes(fname), fname).items():
            _check_pair(module, pair["lora_A"], pair["lora_B"], cfg, fname)
            cfg.shapes[module] = (pair["lora_A"], pair["lora_B"])
    return cfg


def load_adapter(path: str, name: str | None = None) -> LoRAAdapter:
    """Load a PEFT LoRA adapter directory into a LoRAAdapter (tensors on the CPU, file dtype)."""
    cfg = read_adapter_config(path, with_shapes=False)
    fname = _weights_file(path)
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, pair in _pairs(_read_tensors(fname), fname).items():
        a, b = pair["lora_A"], pair["lora_B"]
        _check_pair(module, tuple(a.shape), tuple(b.shape), cfg, fname)
        weights[module] = (a.contiguous(), b.contiguous())
    cfg.shapes = {m: (tuple(a.shape), tuple(b.shape)) for m, (a, b) in weights.items()}
    return LoRAAdapter(name or os.path.basename(os.path.normpath(path)), path, cfg.r, cfg.lora_alpha,
                       cfg.scaling, cfg.target_modules, weights, cfg,
                       {m: cfg.scaling_for(m) for m in weights})


def validate_adapter(adapter_or_config: LoRAAdapter | AdapterConfig, model: nn.Module,
                     max_lora_rank: int) -> None:
    """Raise AdapterError unless the adapter fits `model` and `max_lora_rank`.

    Args:
        adapter_or_config: a loaded adapter, or a config (its `shapes` are checked when read).
        model: the base model (plain or with LoRA layers applied).
        max_lora_rank: the largest rank a slot holds.
    """
    if isinstance(adapter_or_config, LoRAAdapter):
        cfg = adapter_or_config.config
        shapes = {m: (tuple(a.shape), tuple(b.shape))
                  for m, (a, b) in adapter_or_config.weights.items()}
    else:
        cfg, shapes = adapter_or_config, adapter_or_config.shapes or {}
    rank = max([cfg.max_rank, *(a[0] for a, _ in shapes.values())])
    if rank > max_lora_rank:
        raise AdapterError(f"r: adapter rank {rank} exceeds max_lora_rank {max_lora_rank}")
    modules = dict(model.named_modules())

    def refuse_if_unsupported(name: str) -> None:
        if isinstance(modules.get(name), nn.Embedding):
            raise AdapterError(f"target_modules: {name!r} is an embedding; LoRA on embeddings "
                               f"is not supported")
        if name == "lm_head":
            raise AdapterError("target_modules: 'lm_head' is not supported (LoRA on the output layer)")

    tm = cfg.target_modules
    if isinstance(tm, str):
        if tm != ALL_LINEAR and not any(re.fullmatch(tm, n) for n in modules if n):
            raise AdapterError(f"target_modules: pattern {tm!r} matches no module of the model")
    else:
        for t in tm:
            if not any(n == t or n.endswith("." + t) for n in modules if n):
                raise AdapterError(f"target_modules: {t!r} is not a module of the model")
    for n in modules:
        if n and tm != ALL_LINEAR and cfg.targets(n):
            refuse_if_unsupported(n)
    for module, (a, b) in shapes.items():
        refuse_if_unsupported(module)
        layer = modules.get(module)
        if not isinstance(layer, nn.Linear):
            raise AdapterError(f"target_modules: {module!r} is not a linear layer of the model "
                               f"(adapter for another architecture?)")
        if a[1] != layer.in_features:
            raise AdapterError(f"{PREFIX}{module}.lora_A.weight: shape {a}, the model needs "
                               f"({a[0]}, {layer.in_features})")
        if b[0] != layer.out_features:
            raise AdapterError(f"{PREFIX}{module}.lora_B.weight: shape {b}, the model needs "
                               f"({layer.out_features}, {b[1]})")


_CONV1D = re.compile(r"(^|\.)h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)$")


def save_adapter(path: str, adapter: LoRAAdapter) -> None:
    """Write `adapter` as a PEFT adapter directory, atomically: files go to a temporary sibling
    directory that is then renamed over `path` (an existing adapter there is replaced)."""
    from safetensors.torch import save_file

    cfg = adapter.config
    out = dict(cfg.raw)
    for name in _REFUSED:
        out.pop(name, None)
    out.update(
        peft_type="LORA", r=adapter.r, lora_alpha=adapter.lora_alpha, use_rslora=cfg.use_rslora,
        target_modules=adapter.target_modules, rank_pattern=cfg.rank_pattern,
        alpha_pattern=cfg.alpha_pattern, exclude_modules=cfg.exclude_modules, bias="none",
        use_dora=False, modules_to_save=None, inference_mode=True,
        base_model_name_or_path=cfg.base_model_name_or_path,
        fan_in_fan_out=out.get("fan_in_fan_out", all(_CONV1D.search(m) for m in adapter.weights)),
    )
    out.setdefault("task_type", "CAUSAL_LM")
    tensors = {}
    for module, (a, b) in adapter.weights.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a.detach().to("cpu").contiguous().clone()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b.detach().to("cpu").contiguous().clone()
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise AdapterError(f"{path}: exists and is not a directory")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2, sort_keys=True)
        save_file(tensors, os.path.join(tmp, SAFETENSORS_NAME), metadata={"format": "pt"})
        if os.path.isdir(path):
            old = tmp + ".old"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
