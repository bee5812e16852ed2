"""Fine-tuned models: served names (`ft:base:org:suffix:ftjob-…`, and `…:ckpt-step-N` for
checkpoints) mapped to an adapter directory on top of a base model.

Names are global, since a request's `model` must resolve to exactly one adapter; each belongs to
one organization. Not here: loading adapters (lora/) or deleting their directories (the caller).
"""

from __future__ import annotations

import time

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from .base import StoreBase
from .schema import ModelRow

CKPT_INFIX = ":ckpt-step-"


class FineTunedModels(StoreBase):
    """The registry of fine-tuned models."""

    def add_model(self, name: str, org_id: str, base_model: str, path: str,
                  job_id: str | None = None, checkpoint_step: int | None = None) -> ModelRow:
        """Register a model; raises ValueError naming it when the name is taken."""
        row = ModelRow(name=name, org_id=org_id, base_model=base_model, job_id=job_id, path=path,
                       checkpoint_step=checkpoint_step, created_at=time.time())
        try:
            with self._write() as s:
                if s.get(ModelRow, name) is not None:
                    raise ValueError(f"model {name!r} already exists")
                s.add(row)
        except IntegrityError as e:  # inserted by another process meanwhile
            raise ValueError(f"model {name!r} already exists") from e
        return row

    def get_model(self, name: str) -> ModelRow | None:
        """The model with this served name, or None."""
        with self._read() as s:
            return s.get(ModelRow, name)

    def list_models(self, org_id: str | None = None) -> list[ModelRow]:
        """Models of one organization (all when None), checkpoints included, oldest first."""
        stmt = select(ModelRow).order_by(ModelRow.created_at, ModelRow.name)
        if org_id is not None:
            stmt = stmt.where(ModelRow.org_id == org_id)
        with self._read() as s:
            return list(s.scalars(stmt))

    def delete_model(self, org_id: str, name: str) -> ModelRow | None:
        """Delete a model of this organization and its checkpoint models (`name:ckpt-step-*`).

        Returns:
            The deleted row, or None when missing or another organization's.
        """
        with self._write() as s:
            row = s.get(ModelRow, name)
            if row is None or row.org_id != org_id:
                return None
            prefix = name + CKPT_INFIX
            like = s.scalars(select(ModelRow.name).where(
                ModelRow.org_id == org_id, ModelRow.name.startswith(prefix, autoescape=True)))
            names = [name, *(n for n in like if n.startswith(prefix))]  # SQLite LIKE ignores case
            s.execute(delete(ModelRow).where(ModelRow.name.in_(names)))
        return row
