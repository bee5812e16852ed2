"""Keys, orgs, rate limits, usage and metrics, as the official client sees them."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
import torch

from shoal.api import auth as auth_mod
from shoal.api.app import create_app
from shoal.lora.peft_format import LoRAAdapter, save_adapter
from shoal.settings import ServerSettings
from shoal.store import Store


def _client(server, org: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=server[3][org], max_retries=0)


def _asgi_client(app, key: str = "anything") -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    return openai.AsyncOpenAI(base_url="http://t/v1", api_key=key, max_retries=0, http_client=http)


def _adapter(engine, path, seed: int) -> str:
    """A random rank-4 adapter on q_proj/v_proj of the engine's model, saved in PEFT format."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, mod in engine.engine.model.named_modules():
        if name.rsplit(".", 1)[-1] in ("q_proj", "v_proj"):
            weights[name] = (torch.randn(4, mod.in_features, generator=g) * 0.3,
                             torch.randn(mod.out_features, 4, generator=g) * 0.3)
    save_adapter(str(path), LoRAAdapter.from_weights("x", weights, lora_alpha=8))
    return str(path)


def test_missing_and_wrong_key_are_401(server):
    bad = openai.OpenAI(base_url=server[0] + "/v1", api_key="sk-shoal-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.code == "invalid_api_key"
    r = httpx.get(f"{server[0]}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    assert httpx.get(f"{server[0]}/health").status_code == 200  # no key needed


def test_fine_tuned_model_belongs_to_its_org(server, tmp_path):
    url, engine, store, keys = server
    name = "ft:tiny:beta:owned:ftjob-test1"
    beta_org = store.lookup_key(keys["beta"]).org_id
    store.add_model(name, beta_org, "tiny", _adapter(engine, tmp_path / "ad", seed=3))
    acme, beta = _client(server, "acme"), _client(server, "beta")
    assert name in [m.id for m in beta.models.list().data]
    assert name not in [m.id for m in acme.models.list().data]
    body = dict(prompt="Hello", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    tuned = beta.completions.create(model=name, **body).choices[0].text
    base = beta.completions.create(model="tiny", **body).choices[0].text
    assert tuned != base  # served through the adapter, with no restart or deployment step
    for call in (lambda: acme.completions.create(model=name, **body),
                 lambda: acme.models.retrieve(name), lambda: acme.models.delete(name)):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.code == "model_not_found"
    with pytest.raises(openai.PermissionDeniedError):
        beta.models.delete("tiny")
    assert beta.models.delete(name).deleted is True
    with pytest.raises(openai.NotFoundError):
        beta.completions.create(model=name, **body)
    assert not engine.engine.lora.has_adapter(name)


def test_rate_limit_is_429_with_headers(server, tmp_path):
    store = Store.open(f"sqlite:///{tmp_path}/rl.db")
    key, _ = store.create_key("rl")
    app = create_app(server[1], "tiny", store,
                     ServerSettings.from_env(home=tmp_path, rate_limit_rpm=2, rate_limit_tpm=10_000))

    async def main():
        client = _asgi_client(app, key)
        try:
            first = await client.completions.with_raw_response.create(
                model="tiny", prompt="hi", max_tokens=2)
            await client.models.list()
            with pytest.raises(openai.RateLimitError) as e:
                await client.models.list()
            return first, e.value
        finally:
            await client.close()

    first, err = asyncio.run(main())
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-limit-tokens"] == "10000"
    h = err.response.headers
    assert err.code == "rate_limit_exceeded" and err.status_code == 429
    assert h["x-ratelimit-remaining-requests"] == "0" and int(h["retry-after"]) >= 1
    assert h["x-ratelimit-reset-requests"].endswith("s")


def test_open_mode_until_the_first_key(server, tmp_path, monkeypatch):
    monkeypatch.setattr(auth_mod, "KEYS_TTL_S", 0.0)
    store = Store.open(f"sqlite:///{tmp_path}/open.db")
    app = create_app(server[1], "tiny", store, ServerSettings.from_env(home=tmp_path))

    async def main():
        client = _asgi_client(app, "EMPTY")
        try:
            models = await client.models.list()
            store.create_key("first")
            time.sleep(0.01)
            with pytest.raises(openai.AuthenticationError):
                await client.models.list()
            return models
        finally:
            await client.close()

    assert [m.id for m in asyncio.run(main()).data] == ["tiny"]


def test_usage_buckets_and_metrics(server, auth):
    url, _, store, keys = server
    client = _client(server, "acme")
    client.completions.create(model="tiny", prompt="count me", max_tokens=3,
                              extra_body={"ignore_eos": True})
    start = int(time.time()) - 3600
    r = httpx.get(f"{url}/v1/organization/usage/completions",
                  params={"start_time": start, "bucket_width": "1h", "group_by": "model"}, headers=auth)
    assert r.status_code == 200, r.text
    page = r.json()
    assert page["object"] == "page" and page["data"][0]["object"] == "bucket"
    results = [x for b in page["data"] for x in b["results"]]
    tiny = [x for x in results if x["model"] == "tiny"]
    assert tiny and sum(x["output_tokens"] for x in tiny) >= 3
    beta = {"authorization": f"Bearer {keys['beta']}"}  # not an admin key
    denied = httpx.get(f"{url}/v1/organization/usage/completions", params={"start_time": start},
                       headers=beta)
    assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"
    assert httpx.get(f"{url}/v1/usage", headers=beta).status_code == 200
    summary = httpx.get(f"{url}/v1/usage", headers=auth).json()
    assert any(row["model"] == "tiny" for row in summary["data"])
    bad = httpx.get(f"{url}/v1/organization/usage/completions",
                    params={"start_time": start, "bucket_width": "2h"}, headers=auth)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "bucket_width"
    m = httpx.get(f"{url}/metrics").text
    assert 'shoal_requests_total{route="/v1/completions",status="200"}' in m
    assert 'shoal_completion_tokens_total{model="tiny"}' in m
    assert "shoal_kv_cache_usage_ratio" in m and "shoal_running_sequences" in m


def test_server_timing_splits_engine_and_api_time(server, auth):
    r = httpx.post(f"{server[0]}/v1/completions", headers=auth,
                   json={"model": "tiny", "prompt": "timing", "max_tokens": 2})
    parts = dict(p.strip().split(";dur=") for p in r.headers["server-timing"].split(","))
    assert float(parts["engine"]) > 0 and float(parts["api"]) >= 0
