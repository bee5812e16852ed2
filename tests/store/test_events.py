"""Job events and checkpoints, paged newest first."""

from __future__ import annotations

import pytest


@pytest.fixture
def job(store, orgs):
    return store.create_job(orgs[0], "tiny", "file-t", seed=1, hyperparameters={})


def test_events_page_newest_first(store, job):
    events = [store.add_event(job.id, f"event {i}") for i in range(5)]
    metrics = store.add_event(job.id, "Step 1/1: training loss=0.5", type="metrics",
                              data={"step": 1, "train_loss": 0.5})
    assert events[0].id.startswith("ftevent-") and len(events[0].id) == 32
    first, more = store.list_events(job.id, limit=2)
    assert [e.id for e in first] == [metrics.id, events[4].id] and more
    rest, more = store.list_events(job.id, after=first[-1].id, limit=10)
    assert [e.message for e in rest] == ["event 3", "event 2", "event 1", "event 0"]
    assert not more
    assert first[0].data == {"step": 1, "train_loss": 0.5} and first[0].type == "metrics"
    assert [e.id for e in store.all_events(job.id)] == [e.id for e in events] + [metrics.id]
    assert store.list_events(job.id, after="ftevent-missing") == ([], False)
    with pytest.raises(ValueError, match="level"):
        store.add_event(job.id, "x", level="debug")


def test_events_of_other_jobs_are_apart(store, orgs, job):
    other = store.create_job(orgs[0], "tiny", "file-t", seed=1, hyperparameters={})
    mine = store.add_event(job.id, "mine")
    theirs = store.add_event(other.id, "theirs")
    assert [e.id for e in store.list_events(job.id)[0]] == [mine.id]
    assert store.list_events(job.id, after=theirs.id) == ([], False)


def test_checkpoints_page_highest_step_first(store, job):
    for step in (10, 30, 20):
        store.add_checkpoint(job.id, step, f"ft:x:ckpt-step-{step}", {"step": step}, f"/c/{step}")
    first, more = store.list_checkpoints(job.id, limit=2)
    assert [c.step for c in first] == [30, 20] and more
    assert first[0].id.startswith("ftckpt-") and first[0].metrics == {"step": 30}
    rest, more = store.list_checkpoints(job.id, after=first[-1].id)
    assert [c.step for c in rest] == [10] and not more
    assert (rest[0].model_name, rest[0].path) == ("ft:x:ckpt-step-10", "/c/10")
