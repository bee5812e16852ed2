"""Which models a caller may use: the base model, adapters loaded at start (`--lora`, visible to
every org), and the fine-tuned models of the caller's org from the store.

A fine-tuned model is registered in the store by the worker (another process) the moment its job
succeeds; the first request naming it adds its adapter to the engine here, which only records the
path (weights load on first use, between steps). So a new model needs no restart or deployment.
Another org's model is a 404, exactly as an unknown one.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from dataclasses import dataclass

from .errors import ServingError, model_not_found

STORE_TTL_S = 2.0


@dataclass(frozen=True, slots=True)
class Target:
    """A resolved `model`: the name the caller used, the engine adapter (None = base model),
    and the base model it bills as."""

    name: str
    adapter: str | None
    base_model: str


class ServedModels:
    def __init__(self, engine, base_name: str, store=None) -> None:
        self.engine, self.base_name, self.store = engine, base_name, store
        self.created = int(time.time())
        self.system_adapters: set[str] = set()  # from --lora: every org may use them
        self._rows: dict[str, tuple[float, object]] = {}  # name -> (read at, store row or None)

    @property
    def _lora(self):
        return self.engine.engine.lora

    def _row(self, name: str):
        """The store's row for a fine-tuned model (cached briefly), or None."""
        if self.store is None or not name.startswith("ft:"):
            return None
        now = time.monotonic()
        hit = self._rows.get(name)
        if hit is not None and now - hit[0] < STORE_TTL_S:
            return hit[1]
        row = self.store.get_model(name)
        self._rows[name] = (now, row)
        return row

    def forget(self, name: str) -> None:
        self._rows.pop(name, None)

    async def resolve(self, name: str, org_id: str | None) -> Target:
        """The target for `model` = name as seen by `org_id`; 404 if unknown or not theirs."""
        if name == self.base_name:
            return Target(name, None, self.base_name)
        if name in self.system_adapters:
            return Target(name, name, self.base_name)
        row = self._row(name)
        if row is None or row.org_id != org_id or row.base_model != self.base_name:
            raise model_not_found(name)
        if self._lora is None:
            raise ServingError(400, f"model: {name} is a fine-tuned model but this server runs "
                                    "without LoRA (enable_lora)", param="model")
        if not self._lora.has_adapter(name):
            if not os.path.isdir(row.path):
                raise ServingError(500, f"model: the adapter files of {name} are missing",
                                   type="server_error", param="model")
            try:
                await self.engine.add_adapter(name, row.path)
            except ValueError as e:  # e.g. a rank above the engine's max_lora_rank
                raise ServingError(400, f"model: {name} cannot be served by this server: {e}",
                                   param="model", code="model_not_servable") from None
        return Target(name, name, self.base_name)

    def _card(self, name: str, owner: str, created: int | None = None) -> dict:
        return {"id": name, "object": "model", "created": created or self.created, "owned_by": owner}

    def cards(self, org_id: str | None) -> list[dict]:
        out = [self._card(self.base_name, "system")]
        out += [self._card(n, "system") for n in sorted(self.system_adapters)]
        if self.store is not None and org_id is not None:
            for row in self.store.list_models(org_id):
                if row.base_model == self.base_name:
                    out.append(self._card(row.name, row.org_id, int(row.created_at)))
        return out

    async def card(self, name: str, org_id: str | None) -> dict:
        await self.resolve(name, org_id)
        if name == self.base_name or name in self.system_adapters:
            return self._card(name, "system")
        row = self._row(name)
        return self._card(name, row.org_id, int(row.created_at))

    async def delete(self, name: str, org_id: str | None, home: str | None = None) -> dict:
        """Delete a fine-tuned model of `org_id` (and its checkpoint models): store rows, engine
        adapters, and their files under `home` (a job's whole directory for a job's model)."""
        if name == self.base_name or name in self.system_adapters:
            raise ServingError(403, f"model: {name} is not a fine-tuned model of your organization "
                                    "and cannot be deleted", type="permission_error", param="model")
        row = self._row(name)
        if row is None or row.org_id != org_id:
            raise model_not_found(name)
        ckpts = [r for r in await asyncio.to_thread(self.store.list_models, org_id)
                 if r.name.startswith(name + ":ckpt-step-")]
        deleted = await asyncio.to_thread(self.store.delete_model, org_id, name)
        if deleted is None:
            raise model_not_found(name)
        for n in [name] + [k for k in list(self._rows) if k.startswith(name + ":ckpt-step-")]:
            self.forget(n)
        if self._lora is not None:
            for n in self._lora.list_adapters():
                if n == name or n.startswith(name + ":ckpt-step-"):
                    await self.engine.remove_adapter(n)
        if home:
            dirs = {r.path for r in [row, *ckpts]}
            if row.job_id:
                dirs.add(os.path.join(home, "jobs", row.job_id))
            root = os.path.abspath(home) + os.sep
            for d in dirs:
                if os.path.abspath(d).startswith(root):
                    shutil.rmtree(d, ignore_errors=True)
        return {"id": name, "object": "model", "deleted": True}
