"""Leases: one claimant per job across threads and processes, lost leases re-claimed."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import pytest

from shoal.store import Store
from tests.store.claimer import claim_once

HP = {"n_epochs": "auto"}


def new(store, org, **kw):
    kw.setdefault("status", "queued")
    return store.create_job(org, "tiny", "file-t", seed=1, hyperparameters=HP, **kw)


def test_claim_oldest_of_kind(store, orgs):
    assert store.claim_job("w", 60) is None
    first, second = new(store, orgs[0]), new(store, orgs[1])
    new(store, orgs[0], status="validating_files")
    other_kind = new(store, orgs[0], kind="curve")
    job = store.claim_job("w", 60)
    assert job.id == first.id
    assert (job.status, job.lease_owner, job.attempts) == ("running", "w", 1)
    assert job.lease_expires_at == pytest.approx(time.time() + 60, abs=5)
    assert job.started_at is not None and job.heartbeat_at is not None
    assert store.claim_job("w", 60).id == second.id
    assert store.claim_job("w", 60) is None
    assert store.claim_job("w", 60, kinds=("curve", "fine_tune")).id == other_kind.id


def test_threads_race_for_one_job(store, orgs):
    for _ in range(3):
        job = new(store, orgs[0])
        barrier = threading.Barrier(8)
        won = []

        def worker(i):
            barrier.wait()
            got = store.claim_job(f"w{i}", 60)
            if got is not None:
                won.append((i, got.id))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and won[0][1] == job.id
        assert store.get_job(None, job.id).lease_owner == f"w{won[0][0]}"


def test_processes_race_for_one_job(tmp_path):
    """On SQLite, where processes share only the file and its locks (Postgres serves each
    connection alike, so the thread race covers it)."""
    url = f"sqlite:///{tmp_path / 'race.db'}"
    store = Store.open(url)
    job = new(store, store.default_org().id)
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=claim_once, args=(url, f"p{i}", barrier, results))
             for i in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert sorted(got, key=str) == sorted([job.id, None], key=str)
    assert store.get_job(None, job.id).lease_owner in ("p0", "p1")
    store.close()


def test_lost_lease_is_reclaimed(store, orgs):
    job = new(store, orgs[0])
    first = store.claim_job("old", -1.0)  # its lease lapsed at once
    assert first.attempts == 1
    assert store.heartbeat(job.id, "old", 60) is not None  # the owner may still extend it
    store.update_job(job.id, lease_expires_at=time.time() - 1)
    second = store.claim_job("new", 60)
    assert (second.id, second.lease_owner, second.attempts) == (job.id, "new", 2)
    assert second.started_at == first.started_at
    assert store.heartbeat(job.id, "old", 60) is None
    assert not store.release_job(job.id, "old", status="failed")
    assert store.get_job(None, job.id).status == "running"
    assert store.heartbeat(job.id, "new", 60).lease_owner == "new"


def test_release_writes_final_fields_and_drops_lease(store, orgs):
    job = new(store, orgs[0])
    store.claim_job("w", 60)
    assert store.release_job(job.id, "w", status="succeeded", finished_at=123.0,
                             fine_tuned_model="ft:x", result_files=["file-r"], trained_tokens=9)
    done = store.get_job(None, job.id)
    assert (done.status, done.finished_at, done.fine_tuned_model) == ("succeeded", 123.0, "ft:x")
    assert (done.result_files, done.trained_tokens) == (["file-r"], 9)
    assert (done.lease_owner, done.lease_expires_at) == (None, None)
    assert store.heartbeat(job.id, "w", 60) is None
    assert not store.release_job(job.id, "w", status="failed")
    with pytest.raises(ValueError, match="colour"):
        store.release_job(job.id, "w", colour="red")
