"""A job's log (events) and its saved checkpoints, both paged newest first like OpenAI's lists.

Events are ordered by `seq` (insertion order across processes), checkpoints by step. `after` is
the id of the last item of the previous page; an unknown id gives an empty page. Not here: the
adapters a checkpoint names (fine_tuned.py) or their files.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select

from .base import StoreBase, after as after_cursor, page
from .ids import new_id
from .schema import Checkpoint, Event

LEVELS = ("info", "warn", "error")
TYPES = ("message", "metrics")


class Events(StoreBase):
    """Job events and checkpoints."""

    def add_event(self, job_id: str, message: str, level: str = "info", type: str = "message",
                  data: dict[str, Any] | None = None) -> Event:
        """Append an event (`ftevent-…`) to a job's log."""
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        if type not in TYPES:
            raise ValueError(f"type must be one of {TYPES}, got {type!r}")
        event = Event(id=new_id("ftevent-"), job_id=job_id, created_at=time.time(), level=level,
                      message=message, type=type, data=data)
        with self._write() as s:
            s.add(event)
        return event

    def list_events(self, job_id: str, after: str | None = None,
                    limit: int = 20) -> tuple[list[Event], bool]:
        """One page of a job's events, newest first, and whether more follow."""
        stmt = select(Event).where(Event.job_id == job_id).order_by(Event.seq.desc())
        with self._read() as s:
            if after is not None:
                cursor = s.scalar(select(Event).where(Event.id == after, Event.job_id == job_id))
                if cursor is None:
                    return [], False
                stmt = stmt.where(Event.seq < cursor.seq)
            return page(s, stmt, limit)

    def all_events(self, job_id: str) -> list[Event]:
        """Every event of a job, oldest first."""
        with self._read() as s:
            return list(s.scalars(select(Event).where(Event.job_id == job_id)
                                  .order_by(Event.seq)))

    def add_checkpoint(self, job_id: str, step: int, model_name: str, metrics: dict[str, Any],
                       path: str) -> Checkpoint:
        """Record a checkpoint (`ftckpt-…`) of a job, served as `model_name`."""
        ckpt = Checkpoint(id=new_id("ftckpt-"), job_id=job_id, step=step, created_at=time.time(),
                          model_name=model_name, metrics=metrics, path=path)
        with self._write() as s:
            s.add(ckpt)
        return ckpt

    def list_checkpoints(self, job_id: str, after: str | None = None,
                         limit: int = 10) -> tuple[list[Checkpoint], bool]:
        """One page of a job's checkpoints, highest step first, and whether more follow."""
        cols = (Checkpoint.step, Checkpoint.created_at, Checkpoint.id)
        stmt = (select(Checkpoint).where(Checkpoint.job_id == job_id)
                .order_by(*(c.desc() for c in cols)))
        with self._read() as s:
            if after is not None:
                cursor = s.get(Checkpoint, after)
                if cursor is None or cursor.job_id != job_id:
                    return [], False
                values = (cursor.step, cursor.created_at, cursor.id)
                stmt = stmt.where(after_cursor(cols, values, True))
            return page(s, stmt, limit)
