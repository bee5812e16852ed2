"""Usage buckets in OpenAI's shape, and cost summaries from the price table."""

from __future__ import annotations

import time

import pytest

DAY, HOUR = 86400, 3600
D0 = 1_700_006_400  # a UTC midnight (2023-11-15)


def record(store, org, key, model, t, prompt=10, completion=5, kind="chat", base=None):
    store.record_usage(org, key, model, base or model, kind, prompt, completion, created_at=t)


@pytest.fixture
def used(store, orgs):
    ours, theirs = orgs
    record(store, ours, "k1", "a", D0 + 100)  # before start_time
    record(store, ours, "k1", "a", D0 + 7200)
    record(store, ours, "k2", "b", D0 + 7300, prompt=20, completion=1)
    record(store, ours, "k1", "a", D0 + 7400, kind="completions")
    record(store, ours, "k1", "a", D0 + 7500, prompt=1000, kind="fine-tune")  # not completions
    record(store, ours, "k1", "a", D0 + 2 * DAY + 5, prompt=3)
    record(store, ours, "k1", "a", D0 + 3 * DAY)  # at end_time: excluded
    record(store, theirs, "k9", "a", D0 + 7200)
    return ours


def tokens(bucket):
    return [(r["model"], r["api_key_id"], r["input_tokens"], r["output_tokens"],
             r["num_model_requests"]) for r in bucket["results"]]


def test_buckets_aligned_with_empty_ones(store, used):
    buckets = store.usage_buckets(used, D0 + HOUR, D0 + 3 * DAY)
    assert [(b["start_time"], b["end_time"]) for b in buckets] == [
        (D0, D0 + DAY), (D0 + DAY, D0 + 2 * DAY), (D0 + 2 * DAY, D0 + 3 * DAY)]
    assert [tokens(b) for b in buckets] == [[(None, None, 40, 11, 3)], [], [(None, None, 3, 5, 1)]]
    result = buckets[0]["results"][0]
    assert result["object"] == "organization.usage.completions.result"
    assert buckets[0]["object"] == "bucket"
    assert {k: result[k] for k in ("input_cached_tokens", "input_audio_tokens",
                                   "output_audio_tokens", "project_id", "user_id", "batch")} == {
        "input_cached_tokens": 0, "input_audio_tokens": 0, "output_audio_tokens": 0,
        "project_id": None, "user_id": None, "batch": None}


def test_buckets_grouped(store, used):
    by_model = store.usage_buckets(used, D0 + HOUR, D0 + DAY, group_by=["model"])
    assert tokens(by_model[0]) == [("a", None, 20, 10, 2), ("b", None, 20, 1, 1)]
    by_both = store.usage_buckets(used, D0 + HOUR, D0 + DAY, group_by=["api_key_id", "model"])
    assert tokens(by_both[0]) == [("a", "k1", 20, 10, 2), ("b", "k2", 20, 1, 1)]
    by_project = store.usage_buckets(used, D0 + HOUR, D0 + DAY, group_by=["project_id"])
    assert tokens(by_project[0]) == [(None, None, 40, 11, 3)]


def test_buckets_filtered(store, used):
    only_b = store.usage_buckets(used, D0, D0 + DAY, models=["b"], group_by=["model"])
    assert tokens(only_b[0]) == [("b", None, 20, 1, 1)]
    only_k1 = store.usage_buckets(used, D0 + HOUR, D0 + DAY, api_key_ids=["k1"])
    assert tokens(only_k1[0]) == [(None, None, 20, 10, 2)]
    training = store.usage_buckets(used, D0 + HOUR, D0 + DAY, kinds=("fine-tune",))
    assert tokens(training[0]) == [(None, None, 1000, 5, 1)]


def test_bucket_widths_and_limits(store, used):
    hours = store.usage_buckets(used, D0 + HOUR + 1800, D0 + 4 * HOUR, bucket_width="1h")
    assert [b["start_time"] for b in hours] == [D0 + HOUR, D0 + 2 * HOUR, D0 + 3 * HOUR]
    assert [tokens(b) for b in hours] == [[], [(None, None, 40, 11, 3)], []]
    assert len(store.usage_buckets(used, D0, D0 + 30 * DAY)) == 7
    assert len(store.usage_buckets(used, D0, D0 + 30 * DAY, limit=2)) == 2
    assert len(store.usage_buckets(used, D0, bucket_width="1m", end_time=D0 + 3600)) == 60
    with pytest.raises(ValueError, match="bucket_width"):
        store.usage_buckets(used, D0, bucket_width="1w")
    with pytest.raises(ValueError, match="limit"):
        store.usage_buckets(used, D0, limit=32)
    with pytest.raises(ValueError, match="group_by"):
        store.usage_buckets(used, D0, group_by=["colour"])


def test_buckets_run_to_now_by_default(store, orgs):
    now = time.time()
    record(store, orgs[0], None, "a", now - 1)
    buckets = store.usage_buckets(orgs[0], int(now) - 2 * DAY)
    assert len(buckets) == 3 and buckets[-1]["start_time"] <= now < buckets[-1]["end_time"]
    assert tokens(buckets[-1]) == [(None, None, 10, 5, 1)]


def test_summary_costs_fall_back_to_base_price(store, orgs):
    ours = orgs[0]
    store.set_price("base", 1.0, 2.0, training_per_1m=3.0)
    store.set_price("ft:base:acme::own", 10.0, 10.0)
    ft = "ft:base:acme::ftjob-1"
    record(store, ours, None, ft, D0, prompt=1000, completion=500, base="base")
    record(store, ours, None, ft, D0 + DAY, prompt=1000, completion=500, base="base")
    record(store, ours, None, "ft:base:acme::own", D0, prompt=100, completion=0, base="base")
    record(store, ours, None, "base", D0, prompt=10_000, completion=0, kind="fine-tune")
    record(store, ours, None, "unpriced", D0, prompt=99, completion=1)
    record(store, orgs[1], None, "base", D0, prompt=1, completion=1)
    summary = {(r["model"], r["kind"]): r for r in store.usage_summary(ours)}
    assert set(summary) == {(ft, "chat"), ("ft:base:acme::own", "chat"), ("base", "fine-tune"),
                            ("unpriced", "chat")}
    assert summary[ft, "chat"]["cost_usd"] == pytest.approx(0.004)
    assert summary[ft, "chat"]["num_requests"] == 2
    assert summary[ft, "chat"]["total_tokens"] == 3000
    assert summary["ft:base:acme::own", "chat"]["cost_usd"] == pytest.approx(0.001)
    assert summary["base", "fine-tune"]["cost_usd"] == pytest.approx(0.03)
    assert summary["unpriced", "chat"]["cost_usd"] == 0.0
    first_day = store.usage_summary(ours, start_time=D0, end_time=D0 + DAY)
    assert sum(r["cost_usd"] for r in first_day) == pytest.approx(0.002 + 0.001 + 0.03)
    days = store.usage_by_day(ours)
    assert [(d["day"], d["model"]) for d in days] == [
        ("2023-11-15", "base"), ("2023-11-15", ft), ("2023-11-15", "ft:base:acme::own"),
        ("2023-11-15", "unpriced"), ("2023-11-16", ft)]
    assert days[1]["cost_usd"] == pytest.approx(0.002) and days[1]["total_tokens"] == 1500


def test_prices(store):
    assert store.get_price("m") is None
    store.set_price("m", 1.5, 2.5)
    store.set_price("m", 1.0, 2.0, 4.0)
    price = store.get_price("m")
    assert (price.prompt_per_1m, price.completion_per_1m, price.training_per_1m) == (1.0, 2.0, 4.0)
    assert [p.model for p in store.list_prices()] == ["m"]
