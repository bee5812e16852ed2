"""Fine-tuning jobs: creation, lists, updates, and the user's cancel / pause / resume.

Status moves are conditional UPDATEs (`... WHERE status IN (...)`), so a user's cancel and a
worker's claim of the same job cannot both win. A running job is only flagged
(`cancel_requested`, `pause_requested`); its worker sees the flag on its next heartbeat and ends
the job itself. Not here: workers' leases (queue.py) or the job's log (events.py).
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select, update

from .base import StoreBase, after as after_cursor, apply_fields, fresh, page
from .ids import new_id
from .schema import Job

IDLE = ("validating_files", "queued", "paused")
"""Statuses of a job no worker is running: cancel ends these at once."""


class Jobs(StoreBase):
    """Job rows and the user-facing status changes."""

    def create_job(self, org_id: str, model: str, training_file: str, *,
                   validation_file: str | None = None, suffix: str | None = None, seed: int,
                   metadata: dict[str, str] | None = None, hyperparameters: dict[str, Any],
                   extra: dict[str, Any] | None = None, status: str = "validating_files",
                   curve_id: str | None = None, kind: str = "fine_tune") -> Job:
        """Create a job (`ftjob-…`); `hyperparameters` as requested, "auto" included."""
        job = Job(id=new_id("ftjob-"), org_id=org_id, kind=kind, model=model,
                  training_file=training_file, validation_file=validation_file, suffix=suffix,
                  seed=seed, metadata_=metadata, hyperparameters=hyperparameters, status=status,
                  result_files=[], created_at=time.time(), cancel_requested=False,
                  pause_requested=False, attempts=0, curve_id=curve_id, extra=extra)
        with self._write() as s:
            s.add(job)
        return job

    def get_job(self, org_id: str | None, job_id: str) -> Job | None:
        """The job, or None when missing or another organization's (org_id None: any)."""
        with self._read() as s:
            job = s.get(Job, job_id)
        return job if job is not None and org_id in (None, job.org_id) else None

    def list_jobs(self, org_id: str | None, after: str | None = None, limit: int = 20,
                  metadata: dict[str, str] | None = None,
                  curve_id: str | None = None) -> tuple[list[Job], bool]:
        """One page of jobs, newest first, and whether more follow.

        Args:
            org_id: whose jobs (None: every organization's).
            after: id of the last job of the previous page; an unknown id gives an empty page.
            metadata: keep jobs whose metadata has all these key/value pairs.
            curve_id: keep the points of this learning curve (None: no filter).
        """
        cols = (Job.created_at, Job.id)
        stmt = select(Job).order_by(*(c.desc() for c in cols))
        if org_id is not None:
            stmt = stmt.where(Job.org_id == org_id)
        for key, value in (metadata or {}).items():
            stmt = stmt.where(Job.metadata_[key].as_string() == value)
        if curve_id is not None:
            stmt = stmt.where(Job.curve_id == curve_id)
        with self._read() as s:
            if after is not None:
                cursor = s.get(Job, after)
                if cursor is None or org_id not in (None, cursor.org_id):
                    return [], False
                stmt = stmt.where(after_cursor(cols, (cursor.created_at, cursor.id), True))
            return page(s, stmt, limit)

    def update_job(self, job_id: str, **fields: Any) -> Job:
        """Set columns of a job (`metadata=` or `metadata_=` for metadata) and return it.

        Raises:
            KeyError: no such job. ValueError: a field that is not a column.
        """
        with self._write() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise KeyError(job_id)
            apply_fields(job, fields)
        return job

    def transition_job(self, job_id: str, from_status: tuple[str, ...],
                       **fields: Any) -> Job | None:
        """Set columns only if the job's status is in `from_status` (e.g. validating_files ->
        queued, unless the user cancelled meanwhile); None when it was not."""
        with self._write() as s:
            job = s.get(Job, job_id)
            if job is None or job.status not in from_status:
                return None
            apply_fields(job, fields)
        return job

    def request_cancel(self, org_id: str | None, job_id: str) -> Job | None:
        """Cancel a job: an idle one (validating, queued, paused) becomes `cancelled` now; a
        running one gets `cancel_requested`; a finished one is left as it is.

        Returns:
            The job afterwards, or None when missing or another organization's.
        """
        now = time.time()
        return self._flag(org_id, job_id, [
            (IDLE, {"status": "cancelled", "finished_at": now, "pause_requested": False}),
            (("running",), {"cancel_requested": True}),
        ])

    def request_pause(self, org_id: str | None, job_id: str) -> Job | None:
        """Pause a job: a queued one becomes `paused` now; a running one gets `pause_requested`
        (its worker saves and releases it as `paused`). Others are left as they are."""
        return self._flag(org_id, job_id, [
            (("queued",), {"status": "paused"}),
            (("running",), {"pause_requested": True}),
        ])

    def resume_job(self, org_id: str | None, job_id: str) -> Job | None:
        """Resume a job: a paused one goes back to `queued`; a running one loses a pending
        `pause_requested`. Others are left as they are."""
        return self._flag(org_id, job_id, [
            (("paused",), {"status": "queued", "pause_requested": False}),
            (("running",), {"pause_requested": False}),
        ])

    def _flag(self, org_id: str | None, job_id: str,
              moves: list[tuple[tuple[str, ...], dict[str, Any]]]) -> Job | None:
        """Apply the first of `moves` (from statuses, new values) whose statuses match, as a
        conditional UPDATE, and return the fresh row."""
        with self._write() as s:
            job = s.get(Job, job_id)
            if job is None or org_id not in (None, job.org_id):
                return None
            for statuses, values in moves:
                done = s.execute(update(Job).where(Job.id == job_id, Job.status.in_(statuses))
                                 .values(**values).execution_options(synchronize_session=False))
                if done.rowcount == 1:
                    break
            return fresh(s, Job, job_id)

