"""Learning-curve rows and organization isolation."""

from __future__ import annotations

import pytest


def test_curves(store, orgs):
    curves = [store.create_curve(orgs[0], {"sizes": [i]}) for i in range(3)]
    other = store.create_curve(orgs[1], {"sizes": []})
    assert curves[0].id.startswith("lcurve-") and curves[0].status == "queued"
    assert store.get_curve(orgs[0], curves[0].id).request == {"sizes": [0]}
    assert store.get_curve(orgs[0], other.id) is None
    page, more = store.list_curves(orgs[0], limit=2)
    assert [c.id for c in page] == [curves[2].id, curves[1].id] and more
    assert [c.id for c in store.list_curves(orgs[0], after=page[-1].id)[0]] == [curves[0].id]
    done = store.update_curve(curves[0].id, status="succeeded", result={"points": []},
                              finished_at=5.0)
    assert (done.status, done.result, done.finished_at) == ("succeeded", {"points": []}, 5.0)
    assert store.get_curve(None, curves[0].id).status == "succeeded"
    with pytest.raises(KeyError):
        store.update_curve("lcurve-missing", status="failed")
