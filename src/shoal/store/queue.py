"""The job queue: workers claim jobs under a lease, renew it by heartbeat, and release the job.

A claim picks the oldest `queued` job, or a `running` one whose lease has lapsed (its worker
died), and takes it with a conditional UPDATE whose WHERE repeats the test; only one of several
racing workers, threads or processes, on SQLite or Postgres, sees rowcount 1. A worker that lost
its lease learns it from `heartbeat` (None) and must stop. Not here: running the job (finetune/).
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import and_, func, or_, select, update

from .base import StoreBase, field_key, fresh
from .schema import Job

CANDIDATES = 5
ROUNDS = 3


class Queue(StoreBase):
    """Leases on jobs for workers."""

    def claim_job(self, worker_id: str, lease_s: float,
                  kinds: tuple[str, ...] = ("fine_tune",)) -> Job | None:
        """Take the oldest claimable job of these kinds for `worker_id`, or None.

        The job becomes `running` with lease_owner, lease_expires_at = now + lease_s,
        heartbeat_at, started_at (if unset), and attempts + 1.
        """
        now = time.time()
        claimable = and_(Job.kind.in_(kinds), or_(
            Job.status == "queued", and_(Job.status == "running", Job.lease_expires_at < now)))
        with self._write() as s:
            for _ in range(ROUNDS):
                ids = list(s.scalars(select(Job.id).where(claimable)
                                     .order_by(Job.created_at, Job.id).limit(CANDIDATES)))
                if not ids:
                    return None
                for job_id in ids:
                    done = s.execute(
                        update(Job).where(Job.id == job_id, claimable)
                        .values(status="running", lease_owner=worker_id,
                                lease_expires_at=now + lease_s, heartbeat_at=now,
                                attempts=Job.attempts + 1,
                                started_at=func.coalesce(Job.started_at, now))
                        .execution_options(synchronize_session=False))
                    if done.rowcount == 1:
                        return fresh(s, Job, job_id)
        return None

    def heartbeat(self, job_id: str, worker_id: str, lease_s: float) -> Job | None:
        """Extend the lease to now + lease_s if `worker_id` still holds it.

        Returns:
            The fresh job (check cancel_requested / pause_requested), or None: the lease is
            lost and the worker must stop without writing results.
        """
        now = time.time()
        with self._write() as s:
            done = s.execute(update(Job).where(Job.id == job_id, Job.lease_owner == worker_id,
                                               Job.status == "running")
                             .values(lease_expires_at=now + lease_s, heartbeat_at=now)
                             .execution_options(synchronize_session=False))
            return fresh(s, Job, job_id) if done.rowcount == 1 else None

    def release_job(self, job_id: str, worker_id: str, **fields: Any) -> bool:
        """Write the job's final columns (status, finished_at, error, ...) and drop the lease,
        only if `worker_id` still holds it; False when it does not (nothing is written)."""
        values = {getattr(Job, field_key(Job, k)): v for k, v in fields.items()}
        values.update({Job.lease_owner: None, Job.lease_expires_at: None})
        with self._write() as s:
            done = s.execute(update(Job).where(Job.id == job_id, Job.lease_owner == worker_id)
                             .values(values).execution_options(synchronize_session=False))
            return done.rowcount == 1

