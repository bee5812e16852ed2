"""Jobs: creation, lists, updates, and cancel / pause / resume in each status."""

from __future__ import annotations

import pytest

HP = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}


def new(store, org, **kw):
    kw.setdefault("status", "queued")
    return store.create_job(org, "tiny", "file-t", seed=7, hyperparameters=HP, **kw)


def test_create_and_get(store, orgs):
    job = store.create_job(orgs[0], "tiny", "file-t", seed=7, hyperparameters=HP,
                           metadata={"team": "a"}, suffix="s", extra={"lora_r": 8})
    assert job.id.startswith("ftjob-") and len(job.id) == 30
    got = store.get_job(orgs[0], job.id)
    assert (got.status, got.kind, got.seed, got.hyperparameters) == ("validating_files",
                                                                     "fine_tune", 7, HP)
    assert (got.metadata_, got.extra, got.result_files) == ({"team": "a"}, {"lora_r": 8}, [])
    assert (got.attempts, got.cancel_requested, got.pause_requested) == (0, False, False)
    assert store.get_job(None, job.id).id == job.id
    assert store.get_job(orgs[1], job.id) is None
    assert store.get_job(orgs[0], "ftjob-missing") is None


def test_list_newest_first_with_filters(store, orgs):
    jobs = [new(store, orgs[0], metadata={"k": str(i % 2)}) for i in range(5)]
    new(store, orgs[1])
    point = new(store, orgs[0], curve_id="lcurve-1")
    newest = [j.id for j in reversed(jobs)]
    page, more = store.list_jobs(orgs[0], limit=2)
    assert [j.id for j in page] == [point.id, newest[0]] and more
    page, more = store.list_jobs(orgs[0], after=page[-1].id, limit=10)
    assert [j.id for j in page] == newest[1:] and not more
    odd, _ = store.list_jobs(orgs[0], metadata={"k": "1"})
    assert [j.id for j in odd] == [jobs[3].id, jobs[1].id]
    assert store.list_jobs(orgs[0], metadata={"k": "1", "x": "y"}) == ([], False)
    assert [j.id for j in store.list_jobs(orgs[0], curve_id="lcurve-1")[0]] == [point.id]
    assert len(store.list_jobs(None)[0]) == 7
    assert store.list_jobs(orgs[1], after=jobs[0].id) == ([], False)


def test_update_and_transition(store, orgs):
    job = store.create_job(orgs[0], "tiny", "file-t", seed=1, hyperparameters=HP)
    updated = store.update_job(job.id, resolved={"n_epochs": 3}, metadata={"a": "b"})
    assert updated.resolved == {"n_epochs": 3} and updated.metadata_ == {"a": "b"}
    assert store.get_job(None, job.id).resolved == {"n_epochs": 3}
    with pytest.raises(ValueError, match="nonsense"):
        store.update_job(job.id, nonsense=1)
    with pytest.raises(ValueError, match="id"):
        store.update_job(job.id, id="ftjob-other")
    with pytest.raises(KeyError):
        store.update_job("ftjob-missing", status="queued")
    assert store.transition_job(job.id, ("validating_files",), status="queued").status == "queued"
    assert store.transition_job(job.id, ("validating_files",), status="failed") is None
    assert store.get_job(None, job.id).status == "queued"


@pytest.mark.parametrize("status", ["validating_files", "queued", "paused"])
def test_cancel_idle_job_ends_it_now(store, orgs, status):
    job = new(store, orgs[0], status=status)
    assert store.request_cancel(orgs[1], job.id) is None
    done = store.request_cancel(orgs[0], job.id)
    assert done.status == "cancelled" and done.finished_at is not None
    assert not done.cancel_requested


def test_cancel_running_job_flags_it(store, orgs):
    job = new(store, orgs[0])
    store.claim_job("w1", 60)
    flagged = store.request_cancel(orgs[0], job.id)
    assert (flagged.status, flagged.cancel_requested, flagged.finished_at) == ("running", True,
                                                                              None)
    assert store.heartbeat(job.id, "w1", 60).cancel_requested


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled"])
def test_finished_jobs_stay_as_they_are(store, orgs, status):
    job = new(store, orgs[0], status=status)
    for op in (store.request_cancel, store.request_pause, store.resume_job):
        after = op(orgs[0], job.id)
        assert (after.status, after.cancel_requested, after.pause_requested) == (status, False,
                                                                                 False)


def test_pause_and_resume(store, orgs):
    queued = new(store, orgs[0])
    assert store.request_pause(orgs[1], queued.id) is None
    assert store.request_pause(orgs[0], queued.id).status == "paused"
    assert store.claim_job("w1", 60) is None
    assert store.resume_job(orgs[0], queued.id).status == "queued"
    assert store.claim_job("w1", 60).id == queued.id
    flagged = store.request_pause(orgs[0], queued.id)
    assert (flagged.status, flagged.pause_requested) == ("running", True)
    assert store.resume_job(orgs[0], queued.id).pause_requested is False
    store.request_pause(orgs[0], queued.id)
    assert store.release_job(queued.id, "w1", status="paused", pause_requested=False)
    resumed = store.resume_job(orgs[0], queued.id)
    assert (resumed.status, resumed.lease_owner) == ("queued", None)
    assert store.claim_job("w2", 60).attempts == 2
