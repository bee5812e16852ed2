"""Where each adapter lives: batch slots <- CPU LRU (loaded tensors) <- disk (registered paths).

`LoRAManager` wraps the model's linear layers once, registers adapter directories (checking the
config, rank, target modules and tensor shapes up front, without reading tensor data), makes the
adapters of the next batch resident in slots (`prepare`) and sets the per-token slot mapping
(`set_mapping`). It does not schedule: the engine decides which requests share a batch.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .layers import LoRAMapping, apply_lora, quantize_many
from .peft_format import (AdapterConfig, AdapterError, LoRAAdapter, load_adapter, read_adapter_config,
                          validate_adapter)


class LoRAManager:
    """Multi-LoRA serving state for one model.

    Threading: `add_adapter`, `remove_adapter`, `prefetch` and the queries may run on any
    thread; they never touch the device buffers, and disk reads happen outside the lock.
    `prepare` and `set_mapping` write the slots and the mapping the next forward reads, so the
    thread that runs forwards calls them between forwards.
    """

    def __init__(self, model: nn.Module, max_loras: int, max_lora_rank: int, max_cpu_loras: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 target_modules: Iterable[str] | None = None) -> None:
        """
        Args:
            model: the base model; its linear layers (all but lm_head, or `target_modules`) are
                replaced in place by LoRALinear.
            max_loras: adapter slots in one batch.
            max_lora_rank: largest adapter rank accepted.
            max_cpu_loras: loaded adapters kept in CPU memory (LRU), >= max_loras.
            device, dtype: of the stacked slot buffers; default the model's.
            target_modules: restrict the wrapped layers (leaf names or paths).
        """
        for name, v in (("max_loras", max_loras), ("max_lora_rank", max_lora_rank),
                        ("max_cpu_loras", max_cpu_loras)):
            if v <= 0:
                raise ValueError(f"{name}: must be positive, got {v}")
        if max_cpu_loras < max_loras:
            raise ValueError(f"max_cpu_loras: must be >= max_loras ({max_loras}), got {max_cpu_loras}")
        self.model = model
        self.max_loras, self.max_lora_rank, self.max_cpu_loras = max_loras, max_lora_rank, max_cpu_loras
        self.mapping: LoRAMapping = apply_lora(model, max_loras, max_lora_rank, target_modules,
                                               dtype=dtype, device=device)
        self._lock = threading.Lock()
        self._registry: dict[str, AdapterConfig] = {}
        self._cpu: OrderedDict[str, LoRAAdapter] = OrderedDict()  # least recently used first
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self._slots: list[str | None] = [None] * max_loras
        self.disk_loads = 0  # adapters read from disk so far

    @classmethod
    def from_config(cls, model: nn.Module, config) -> "LoRAManager":
        """From an EngineConfig's max_loras, max_lora_rank, max_cpu_loras."""
        return cls(model, config.max_loras, config.max_lora_rank, config.max_cpu_loras)

    # registry ------------------------------------------------------------------------------

    def add_adapter(self, name: str, path: str) -> AdapterConfig:
        """Register the PEFT adapter at `path` as `name`, after checking that it fits the model.

        Raises AdapterError (a ValueError) naming the problem; nothing is registered then.
        """
        if not isinstance(name, str) or not name:
            raise AdapterError(f"name: must be a non-empty string, got {name!r}")
        cfg = read_adapter_config(path)  # config + safetensors header, no tensor data
        validate_adapter(cfg, self.model, self.max_lora_rank)
        self._check_wrapped(cfg.shapes or {})
        with self._lock:
            if name in self._registry:
                raise AdapterError(f"name: adapter {name!r} is already registered")
            self._registry[name] = cfg
        return cfg

    def remove_adapter(self, name: str) -> None:
        """Forget `name` and free its slot (the slot's buffers are overwritten when reused)."""
        with self._lock:
            if self._registry.pop(name, None) is None:
                raise AdapterError(f"{name!r}: no such adapter")
            self._cpu.pop(name, None)
            slot = self._slot_of.pop(name, None)
            if slot is not None:
                self._slots[slot] = None

    def has_adapter(self, name: str) -> bool:
        return name in self._registry

    def list_adapters(self) -> list[str]:
        """Registered names, in registration order."""
        with self._lock:
            return list(self._registry)

    def slot_of(self, name: str) -> int | None:
        """The slot `name` occupies now, or None."""
        return self._slot_of.get(name)

    # tiers ---------------------------------------------------------------------------------

    def prefetch(self, name: str) -> LoRAAdapter:
        """Make `name` resident in the CPU tier (reading it from disk if needed)."""
        return self._to_cpu([name])[name]

    def prepare(self, names: Iterable[str]) -> dict[str, int]:
        """Make every named adapter resident in a slot; returns name -> slot.

        Slots of adapters not in `names` are reused least recently used first. Adapters come
        from the CPU tier, else from disk (read without holding the lock, then set_lora).
        """
        names = set(names)
        if len(names) > self.max_loras:
            raise AdapterError(f"names: {len(names)} adapters in one batch exceed max_loras "
                               f"{self.max_loras}")
        with self._lock:
            for n in names:
                if n not in self._registry:
                    raise AdapterError(f"{n!r}: no such adapter")
            for n in names & self._slot_of.keys():
                self._slot_of.move_to_end(n)
            missing = sorted(names - self._slot_of.keys())
        if missing:
            adapters = self._to_cpu(missing)
            with self._lock:
                for n in missing:
                    if self._registry.get(n) is not adapters[n].config:
                        raise AdapterError(f"{n!r}: removed or replaced while loading")
                    self._load_slot(self._free_slot(names), adapters[n])
        with self._lock:
            gone = names - self._slot_of.keys()
            if gone:
                raise AdapterError(f"{sorted(gone)[0]!r}: removed while preparing")
            return {n: self._slot_of[n] for n in names}

    def set_mapping(self, adapters: Sequence[str | int | None] | torch.Tensor) -> None:
        """Set the slot of every token (or row) for the next forward.

        Args:
            adapters: per token (packed (N,) input) or per row ((B, T) input): an adapter name
                resident after `prepare`, None for the base model, or slot indices (-1 = base)
                as ints or a tensor.
        """
        if isinstance(adapters, torch.Tensor):
            self.mapping.set(adapters)
            return
        slots = []
        for a in adapters:
            if a is None:
                slots.append(-1)
            elif isinstance(a, int):
                slots.append(a)
            elif (s := self._slot_of.get(a)) is not None:
                slots.append(s)
            else:
                raise AdapterError(f"{a!r}: not resident in a slot; call prepare() first")
        self.mapping.set(slots)

    def clear_mapping(self) -> None:
        """The next forward is the plain base model."""
        self.mapping.clear()

    # internals -----------------------------------------------------------------------------

    def _check_wrapped(self, shapes) -> None:
        for module in shapes:
            if module not in self.mapping.layers:
                raise AdapterError(f"target_modules: {module!r} has no LoRA layer (not among the "
                                   f"LoRAManager's target_modules)")

    def _to_cpu(self, names: list[str]) -> dict[str, LoRAAdapter]:
        """name -> loaded adapter, reading from disk (outside the lock) what the CPU tier lacks."""
        out: dict[str, LoRAAdapter] = {}
        todo: dict[str, AdapterConfig] = {}
        with self._lock:
            for n in names:
                if n in self._cpu:
                    self._cpu.move_to_end(n)
                    out[n] = self._cpu[n]
                elif n in self._registry:
                    todo[n] = self._registry[n]
                else:
                    raise AdapterError(f"{n!r}: no such adapter")
        for n, cfg in todo.items():
            adapter = load_adapter(cfg.path, n)
            validate_adapter(adapter, self.model, self.max_lora_rank)  # the files may have changed
            self._check_wrapped(adapter.weights)
            adapter.config = cfg  # identity marks which registration it belongs to
            out[n] = adapter
            with self._lock:
                self.disk_loads += 1
                if self._registry.get(n) is cfg:
                    self._cpu[n] = adapter
                    while len(self._cpu) > self.max_cpu_loras:
                        self._cpu.popitem(last=False)
        return out

    def _free_slot(self, keep: set[str]) -> int:
        """An empty slot, else the least recently used one whose adapter is not in `keep`."""
        if None in self._slots:
            return self._slots.index(None)
        victim = next(n for n in self._slot_of if n not in keep)
        slot = self._slot_of.pop(victim)
        self._slots[slot] = None
        return slot

    def _load_slot(self, slot: int, adapter: LoRAAdapter) -> None:
        quantized = {}
        paths = [p for p, layer in self.mapping.layers.items() if p in adapter.weights and layer.quantized]
        if paths:  # int8 slots: every matrix's rows quantized in a few calls
            ws = [w for p in paths for w in (adapter.weights[p][0], adapter.weights[p][1].t())]
            rows = quantize_many(ws)
            quantized = {p: (rows[2 * i], rows[2 * i + 1]) for i, p in enumerate(paths)}
        for path, layer in self.mapping.layers.items():
            if path in adapter.weights:
                a, b = adapter.weights[path]
                layer.set_lora(slot, a, b, adapter.scaling_for(path), quantized.get(path))
            elif layer.ranks[slot]:
                layer.reset_lora(slot)
        self._slots[slot] = adapter.name
        self._slot_of[adapter.name] = slot
