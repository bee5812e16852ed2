"""A child process for the queue tests: opens its own Store and claims once, after a barrier."""

from __future__ import annotations

from shoal.store import Store


def claim_once(url: str, worker_id: str, barrier, results) -> None:
    """Put the id of the job this process claimed (or None) on `results`."""
    store = Store.open(url)
    barrier.wait()
    job = store.claim_job(worker_id, 60)
    results.put(None if job is None else job.id)
    store.close()
