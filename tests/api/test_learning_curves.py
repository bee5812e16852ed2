"""Learning curves through the API: nested subsets as ordinary jobs, evaluated and fitted; the
same seed gives the same points; bad input is a 400 naming the field; cancel stops the points."""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET

import httpx
import pytest

from tests.api.test_fine_tuning import LABELS, WORDS, client, ft  # noqa: F401  (fixture)

PREFIX = "/v1/fine_tuning/learning_curves"


def task_jsonl(n: int) -> bytes:
    """A label that depends on the word only, so held-out numbers generalize."""
    rows = [{"prompt": f"Review: {WORDS[i % len(WORDS)]} {i}\nLabel:",
             "completion": LABELS[WORDS[i % len(WORDS)]]} for i in range(n)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _post(ft, path, body, org="acme"):
    return httpx.post(ft["url"] + path, json=body, timeout=60,
                      headers={"authorization": f"Bearer {ft['keys'][org]}"})


def _get(ft, path, org="acme"):
    return httpx.get(ft["url"] + path, timeout=60,
                     headers={"authorization": f"Bearer {ft['keys'][org]}"})


def _wait(ft, curve_id, timeout=180):
    t0 = time.time()
    while time.time() - t0 < timeout:
        c = _get(ft, f"{PREFIX}/{curve_id}").json()
        if c["status"] != "running":
            return c
        time.sleep(0.2)
    raise AssertionError(f"curve {curve_id} still running")


@pytest.fixture(scope="module")
def train_file(ft):
    return client(ft).files.create(file=("task.jsonl", task_jsonl(40)), purpose="fine-tune").id


def test_curve_runs_nested_points_and_fits(ft, train_file):
    c = client(ft)
    body = {"model": "tiny", "training_file": train_file, "sizes": [10, 20], "seed": 11,
            "hyperparameters": {"n_epochs": 3, "learning_rate_multiplier": 10},
            "target_error": 0.05}
    r = _post(ft, PREFIX, body)
    assert r.status_code == 200, r.text
    first = _wait(ft, r.json()["id"])
    assert first["status"] == "succeeded", first
    pts = first["points"]
    assert [p["n_examples"] for p in pts] == [10, 20]
    assert all(0 <= p["error"] <= 1 and p["valid_loss"] is not None for p in pts)
    assert first["fit"] is not None and first["prediction"]["target_error"] == 0.05
    # each point is an ordinary job of the org, on nested subsets with the curve's seed
    jobs = [c.fine_tuning.jobs.retrieve(j) for j in first["jobs"]]
    assert all(j.status == "succeeded" and j.seed == 11 for j in jobs)
    listed = {j.id for j in c.fine_tuning.jobs.list(limit=100).data}
    assert set(first["jobs"]) <= listed
    small, big = (set(c.files.content(j.training_file).text.splitlines()) for j in jobs)
    assert len(small) == 10 and len(big) == 20 and small < big
    holdout = set(c.files.content(jobs[0].validation_file).text.splitlines())
    assert len(holdout) == 10 and not holdout & big
    svg = _get(ft, f"{PREFIX}/{first['id']}/plot")
    assert svg.headers["content-type"].startswith("image/svg+xml")
    ET.fromstring(svg.text)
    # the same seed gives the same points
    again = _wait(ft, _post(ft, PREFIX, body).json()["id"])
    assert [p["error"] for p in again["points"]] == [p["error"] for p in pts]
    assert [p["valid_loss"] for p in again["points"]] == [p["valid_loss"] for p in pts]
    # another org cannot see it
    assert _get(ft, f"{PREFIX}/{first['id']}", org="beta").status_code == 404


@pytest.mark.parametrize("extra,param", [
    ({"sizes": [20, 10]}, "sizes"),
    ({"sizes": [5, 20]}, "sizes"),
    ({"sizes": [10, 200]}, "sizes"),
    ({"metric": "accuracy"}, "metric"),
    ({"target_error": 1.5}, "target_error"),
    ({"target_error": 0}, "target_error"),
    ({"training_file": "file-nope"}, "training_file"),
])
def test_bad_curve_requests(ft, train_file, extra, param):
    r = _post(ft, PREFIX, {"model": "tiny", "training_file": train_file, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_small_validation_set_is_refused(ft, train_file):
    v = client(ft).files.create(file=("v.jsonl", task_jsonl(5)), purpose="fine-tune").id
    r = _post(ft, PREFIX, {"model": "tiny", "training_file": train_file, "validation_file": v})
    assert r.status_code == 400 and r.json()["error"]["param"] == "validation_file"


def test_cancel_stops_the_point_jobs(ft, train_file):
    c = client(ft)
    r = _post(ft, PREFIX, {"model": "tiny", "training_file": train_file, "sizes": [10, 20, 30],
                           "hyperparameters": {"n_epochs": 25}})
    curve = r.json()
    time.sleep(0.5)
    cancelled = _post(ft, f"{PREFIX}/{curve['id']}/cancel", {}).json()
    assert cancelled["status"] == "cancelled"
    t0 = time.time()
    while time.time() - t0 < 60:
        statuses = [c.fine_tuning.jobs.retrieve(j).status for j in curve["jobs"]]
        if all(s == "cancelled" for s in statuses):
            break
        time.sleep(0.1)
    assert statuses == ["cancelled"] * 3


ITEMS = [f"item {k}" for k in range(40)]
ITEM_LABEL = {w: (" <POS>" if (k * 7) % 5 < 2 else " <NEG>") for k, w in enumerate(ITEMS)}


def noisy_task(n: int, noise: float, seed: int) -> bytes:
    """Items drawn at random, each with a fixed label; a fraction `noise` of labels flipped.
    Held-out error tracks the share of items not yet seen, so it falls as n doubles."""
    import random

    rng = random.Random(seed)
    flip = {" <POS>": " <NEG>", " <NEG>": " <POS>"}
    rows = []
    for _ in range(n):
        w = rng.choice(ITEMS)
        label = ITEM_LABEL[w] if rng.random() >= noise else flip[ITEM_LABEL[w]]
        rows.append({"prompt": f"Review: {w}\nLabel:", "completion": label})
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_error_falls_with_data_and_rises_with_noise(ft):
    """On the synthetic task, error falls as n doubles; label noise keeps it higher; the fit on
    the first three points predicts the fourth within 0.15 (errors move in steps of 1/40)."""
    c = client(ft)
    holdout = "".join(json.dumps({"prompt": f"Review: {w}\nLabel:", "completion": ITEM_LABEL[w]})
                      + "\n" for w in ITEMS).encode()
    v = c.files.create(file=("holdout.jsonl", holdout), purpose="fine-tune").id
    errors = {}
    for noise in (0.0, 0.45):
        t = c.files.create(file=("t.jsonl", noisy_task(96, noise, seed=3)), purpose="fine-tune").id
        r = _post(ft, PREFIX, {"model": "tiny", "training_file": t, "validation_file": v,
                               "sizes": [12, 24, 48, 96], "seed": 2, "target_error": 0.05,
                               "hyperparameters": {"learning_rate_multiplier": 10}})
        curve = _wait(ft, r.json()["id"], timeout=300)
        assert curve["status"] == "succeeded", curve
        errors[noise] = [p["error"] for p in curve["points"]]
    clean, noisy = errors[0.0], errors[0.45]
    print("clean", clean, "noisy", noisy)
    assert clean[-1] < clean[0]
    assert sum(noisy) > sum(clean)
    from shoal.curves.fit import fit_points

    fit = fit_points([(12, clean[0]), (24, clean[1]), (48, clean[2])])
    assert abs(fit.predict(96) - clean[3]) <= 0.15
