"""File rows: pagination like OpenAI's, organization isolation, blob reference counts."""

from __future__ import annotations

import pytest


def add(store, org, n, purpose="fine-tune", sha="0" * 64):
    return [store.add_file(org, f"f{i}.jsonl", purpose, 100 + i, sha) for i in range(n)]


def ids(rows):
    return [r.id for r in rows]


def test_pages_newest_first_and_oldest_first(store, orgs):
    files = add(store, orgs[0], 5)
    add(store, orgs[1], 2)
    newest = ids(reversed(files))
    first, more = store.list_files(orgs[0], limit=2)
    assert ids(first) == newest[:2] and more
    second, more = store.list_files(orgs[0], limit=2, after=first[-1].id)
    assert ids(second) == newest[2:4] and more
    third, more = store.list_files(orgs[0], limit=2, after=second[-1].id)
    assert ids(third) == newest[4:] and not more
    assert ids(store.list_files(orgs[0])[0]) == newest
    asc, more = store.list_files(orgs[0], order="asc", limit=3, after=files[0].id)
    assert ids(asc) == ids(files[1:4]) and more
    assert store.list_files(orgs[0], after="file-missing") == ([], False)
    with pytest.raises(ValueError, match="order"):
        store.list_files(orgs[0], order="up")


def test_same_created_at_pages_by_id(store, orgs):
    files = add(store, orgs[0], 4)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE files SET created_at = 1.0")
    seen, after = [], None
    while True:
        rows, more = store.list_files(orgs[0], limit=1, after=after)
        seen += ids(rows)
        if not more:
            break
        after = rows[-1].id
    assert seen == sorted(ids(files), reverse=True)


def test_purpose_filter_and_fields(store, orgs):
    add(store, orgs[0], 2)
    results = store.add_file(orgs[0], "r.csv", "fine-tune-results", 7, "1" * 64,
                             file_id="file-chosen")
    rows, _ = store.list_files(orgs[0], purpose="fine-tune-results")
    assert ids(rows) == ["file-chosen"]
    assert (results.bytes, results.filename, results.status) == (7, "r.csv", "processed")
    assert len(store.list_files(orgs[0], purpose="fine-tune")[0]) == 2


def test_other_org_sees_nothing(store, orgs):
    f = add(store, orgs[0], 1)[0]
    assert store.get_file(orgs[0], f.id).id == f.id
    assert store.get_file(None, f.id).id == f.id
    assert store.get_file(orgs[1], f.id) is None
    assert not store.delete_file(orgs[1], f.id)
    assert store.list_files(orgs[1], after=f.id) == ([], False)


def test_status_delete_and_blob_references(store, orgs):
    a, b = add(store, orgs[0], 2, sha="a" * 64)
    c = add(store, orgs[1], 1, sha="a" * 64)[0]
    assert store.file_in_use("a" * 64) == 3
    store.set_file_status(a.id, "error", "line 3: not JSON")
    row = store.get_file(orgs[0], a.id)
    assert (row.status, row.status_details) == ("error", "line 3: not JSON")
    with pytest.raises(ValueError, match="status"):
        store.set_file_status(a.id, "gone")
    assert store.delete_file(orgs[0], a.id) and not store.delete_file(orgs[0], a.id)
    assert store.delete_file(orgs[0], b.id) and store.delete_file(orgs[1], c.id)
    assert store.file_in_use("a" * 64) == 0
    assert store.get_file(orgs[0], a.id) is None
