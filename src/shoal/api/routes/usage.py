"""Usage and operations: OpenAI's completions usage API, a cost summary, health and metrics."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ...serving.errors import ServingError
from ..auth import Principal
from ..deps import admin_caller, caller, services
from prometheus_client import CONTENT_TYPE_LATEST

router = APIRouter()
WIDTHS = ("1m", "1h", "1d")
GROUPS = ("model", "api_key_id")


def _list(request: Request, name: str) -> list[str] | None:
    """A repeated query parameter, as `name=a&name=b` or `name[]=a`."""
    q = request.query_params
    vals = q.getlist(name) + q.getlist(f"{name}[]")
    out = [p for v in vals for p in v.split(",") if p]
    return out or None


def _int(request: Request, name: str, default: int | None = None, lo: int | None = None,
         hi: int | None = None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise ServingError(400, f"{name}: expected an integer, got {raw!r}", param=name) from None
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ServingError(400, f"{name}: must be in [{lo}, {hi}], got {v}", param=name)
    return v


@router.get("/v1/organization/usage/completions")
async def usage_completions(request: Request, who: Principal = Depends(admin_caller)):
    """Token usage of your organization in time buckets (OpenAI's Usage API shape; an admin
    key, as upstream)."""
    s = services(request)
    start = _int(request, "start_time")
    if start is None:
        raise ServingError(400, "start_time: required (unix seconds)", param="start_time")
    end = _int(request, "end_time")
    width = request.query_params.get("bucket_width", "1d")
    if width not in WIDTHS:
        raise ServingError(400, f"bucket_width: must be one of {', '.join(WIDTHS)}", param="bucket_width")
    group_by = _list(request, "group_by")
    bad = [g for g in group_by or [] if g not in GROUPS]
    if bad:
        raise ServingError(400, f"group_by: {bad[0]!r} is not supported (model, api_key_id)",
                           param="group_by")
    limit = _int(request, "limit", None, 1, {"1d": 31, "1h": 168, "1m": 1440}[width])
    buckets = await asyncio.to_thread(
        s.store.usage_buckets, who.org_id, start, end, width, group_by,
        _list(request, "models"), _list(request, "api_key_ids"), limit)
    return {"object": "page", "data": buckets, "has_more": False, "next_page": None}


@router.get("/v1/usage")
async def usage_summary(request: Request, who: Principal = Depends(caller)):
    """Tokens and cost by model and kind (our extension), optionally since/until unix times;
    `by=day` gives one row per day and model instead."""
    s = services(request)
    start, end = _int(request, "start_time"), _int(request, "end_time")
    if request.query_params.get("by") == "day":
        rows = await asyncio.to_thread(s.store.usage_by_day, who.org_id, start, end)
    else:
        rows = await asyncio.to_thread(s.store.usage_summary, who.org_id, start, end)
    total = round(sum(r.get("cost_usd", 0.0) for r in rows), 6)
    return {"object": "usage.summary", "organization_id": who.org_id, "data": rows,
            "total_cost_usd": total}


@router.get("/health")
async def health(request: Request):
    """Liveness and engine load."""
    return {"status": "ok", "time": int(time.time()), **(await services(request).engine.stats())}


@router.get("/metrics")
async def metrics(request: Request):
    """Prometheus metrics (requests, tokens, latency, sequences, KV use, adapters)."""
    s = services(request)
    return Response(s.metrics.render(await s.engine.stats()), media_type=CONTENT_TYPE_LATEST)
