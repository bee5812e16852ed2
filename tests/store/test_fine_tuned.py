"""The fine-tuned model registry: unique names, organizations, checkpoint models deleted along."""

from __future__ import annotations

import pytest

NAME = "ft:tiny:acme:my_run:ftjob-abc"


def test_add_get_list(store, orgs):
    row = store.add_model(NAME, orgs[0], "tiny", "/adapters/abc", job_id="ftjob-abc")
    assert (row.name, row.base_model, row.path, row.checkpoint_step) == (NAME, "tiny",
                                                                         "/adapters/abc", None)
    assert store.get_model(NAME).org_id == orgs[0]
    assert store.get_model("ft:none") is None
    store.add_model("ft:tiny:other::x", orgs[1], "tiny", "/adapters/x")
    assert [m.name for m in store.list_models(orgs[0])] == [NAME]
    assert len(store.list_models()) == 2
    with pytest.raises(ValueError, match="ftjob-abc"):
        store.add_model(NAME, orgs[1], "tiny", "/elsewhere")


def test_delete_takes_checkpoints_along(store, orgs):
    store.add_model(NAME, orgs[0], "tiny", "/a")
    store.add_model(NAME + ":ckpt-step-10", orgs[0], "tiny", "/a/10", checkpoint_step=10)
    store.add_model(NAME + ":ckpt-step-20", orgs[0], "tiny", "/a/20", checkpoint_step=20)
    store.add_model(NAME + "d", orgs[0], "tiny", "/b")
    survivor = "ft:tiny:acme:myXrun:ftjob-abc:ckpt-step-1"  # LIKE's '_' would match the X
    store.add_model(survivor, orgs[0], "tiny", "/c")
    upper = NAME.upper() + ":ckpt-step-1"  # SQLite's LIKE would match it
    store.add_model(upper, orgs[0], "tiny", "/d")
    assert store.delete_model(orgs[1], NAME) is None
    deleted = store.delete_model(orgs[0], NAME)
    assert deleted.name == NAME and deleted.path == "/a"
    assert sorted(m.name for m in store.list_models()) == sorted([NAME + "d", survivor, upper])
    assert store.delete_model(orgs[0], NAME) is None
