"""Prometheus metrics for `GET /metrics`, in a registry of the app's own (so several apps in one
process, as in tests, do not collide).

Counters: requests by route and status, prompt and completion tokens by model. Histograms:
request latency by route, time to first token by kind. Gauges read from the engine at scrape
time: running and waiting sequences, KV-cache use, free KV blocks, resident adapters, draft
tokens checked and confirmed (speculative decoding; totals since start).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("shoal_requests", "HTTP requests", ["route", "status"], registry=r)
        self.latency = Histogram("shoal_request_duration_seconds", "Time from request to last byte",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("shoal_time_to_first_token_seconds", "Time to the first streamed token",
                              ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("shoal_prompt_tokens", "Prompt tokens billed", ["model"], registry=r)
        self.completion_tokens = Counter("shoal_completion_tokens", "Completion tokens billed",
                                         ["model"], registry=r)
        self.running = Gauge("shoal_running_sequences", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("shoal_waiting_sequences", "Sequences waiting to be scheduled", registry=r)
        self.kv_usage = Gauge("shoal_kv_cache_usage_ratio", "Fraction of KV blocks in use", registry=r)
        self.free_blocks = Gauge("shoal_kv_free_blocks", "Free KV-cache blocks", registry=r)
        self.adapters = Gauge("shoal_resident_adapters", "LoRA adapters registered in the engine",
                              registry=r)
        self.drafts = Gauge("shoal_draft_tokens", "Draft tokens checked (speculative decoding)", registry=r)
        self.accepted = Gauge("shoal_accepted_draft_tokens", "Draft tokens confirmed", registry=r)

    def count_tokens(self, model: str, prompt: int, completion: int) -> None:
        self.prompt_tokens.labels(model).inc(prompt)
        self.completion_tokens.labels(model).inc(completion)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self, engine_stats: dict) -> bytes:
        self.running.set(engine_stats.get("running", 0))
        self.waiting.set(engine_stats.get("waiting", 0))
        self.kv_usage.set(engine_stats.get("kv_usage", 0.0))
        self.free_blocks.set(engine_stats.get("free_blocks", 0))
        self.adapters.set(engine_stats.get("adapters", 0))
        self.drafts.set(engine_stats.get("draft_tokens", 0))
        self.accepted.set(engine_stats.get("accepted_draft_tokens", 0))
        return generate_latest(self.registry)
