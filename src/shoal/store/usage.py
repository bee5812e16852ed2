"""Token usage and prices: recording, OpenAI Usage API buckets, and cost summaries.

Buckets are aggregated in SQL, grouped on a computed bucket index (floor((t - origin) / width))
so SQLite and Postgres give the same answer. Costs use the price of the served name, else of its
base model; `fine-tune` rows count their tokens as training tokens. Not here: the HTTP shape of
the Usage API's page and cursor (the API layer).
"""

from __future__ import annotations

import math
import time
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, Integer, cast, func, select

from .base import StoreBase
from .schema import Price, Usage

WIDTHS = {"1m": (60, 60, 1440), "1h": (3600, 24, 168), "1d": (86400, 7, 31)}
"""bucket_width -> (seconds, default limit, max limit), as OpenAI's Usage API."""
GROUPABLE = ("api_key_id", "model")
"""group_by keys we fill; the rest of OpenAI's (project_id, user_id, batch, ...) stay null."""
OPENAI_GROUPS = {"project_id", "user_id", "api_key_id", "model", "batch", "service_tier"}
COMPLETION_KINDS = ("completions", "chat")
DAY = 86400


class Usages(StoreBase):
    """Usage rows and the price table."""

    def record_usage(self, org_id: str, api_key_id: str | None, model: str, base_model: str,
                     kind: str, prompt_tokens: int, completion_tokens: int,
                     request_id: str | None = None, created_at: float | None = None,
                     num_requests: int = 1) -> None:
        """Add one usage row (for `fine-tune`, pass the trained tokens as `prompt_tokens`)."""
        if prompt_tokens < 0 or completion_tokens < 0 or num_requests < 0:
            raise ValueError("prompt_tokens, completion_tokens and num_requests must be >= 0")
        row = Usage(org_id=org_id, api_key_id=api_key_id, model=model, base_model=base_model,
                    kind=kind, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    num_requests=num_requests, request_id=request_id,
                    created_at=time.time() if created_at is None else created_at)
        with self._write() as s:
            s.add(row)

    def usage_buckets(self, org_id: str | None, start_time: int, end_time: int | None = None,
                      bucket_width: str = "1d", group_by: list[str] | None = None,
                      models: list[str] | None = None, api_key_ids: list[str] | None = None,
                      limit: int | None = None,
                      kinds: tuple[str, ...] = COMPLETION_KINDS) -> list[dict[str, Any]]:
        """Usage in time buckets, as the `data` of OpenAI's `/organization/usage/completions`.

        Buckets are aligned to UTC multiples of the width; the first holds `start_time`. They run
        until `end_time` (exclusive; default now) or `limit` buckets, and empty ones have
        `results: []`. Rows count when `start_time <= created_at < end_time`.

        Args:
            org_id: whose usage (None: every organization's).
            bucket_width: 1m, 1h or 1d.
            group_by: any of OpenAI's keys; `model` and `api_key_id` split the results, the
                others are accepted and stay null.
            models, api_key_ids: keep only these.
            limit: most buckets (default 7 for 1d, 24 for 1h, 60 for 1m).
            kinds: usage kinds counted (chat and completions by default).
        """
        if bucket_width not in WIDTHS:
            raise ValueError(f"bucket_width must be one of {sorted(WIDTHS)}, got {bucket_width!r}")
        width, default_limit, max_limit = WIDTHS[bucket_width]
        limit = default_limit if limit is None else limit
        if not 1 <= limit <= max_limit:
            raise ValueError(f"limit must be 1..{max_limit} for bucket_width {bucket_width}")
        unknown = set(group_by or ()) - OPENAI_GROUPS
        if unknown:
            raise ValueError(f"group_by: unknown keys {sorted(unknown)}")
        keys = [k for k in GROUPABLE if k in (group_by or ())]
        origin = int(start_time) // width * width
        end = time.time() if end_time is None else end_time
        n = min(limit, max(0, math.ceil((end - origin) / width)))
        wheres = [Usage.created_at >= start_time, Usage.created_at < min(end, origin + n * width),
                  Usage.kind.in_(kinds)]
        if models is not None:
            wheres.append(Usage.model.in_(models))
        if api_key_ids is not None:
            wheres.append(Usage.api_key_id.in_(api_key_ids))
        rows = self._grouped(org_id, wheres, origin, width, keys) if n else []
        buckets = [{"object": "bucket", "start_time": origin + i * width,
                    "end_time": origin + (i + 1) * width, "results": []} for i in range(n)]
        for row in rows:
            buckets[row.bucket]["results"].append({
                "object": "organization.usage.completions.result",
                "input_tokens": int(row.prompt_tokens), "output_tokens": int(row.completion_tokens),
                "input_cached_tokens": 0, "input_audio_tokens": 0, "output_audio_tokens": 0,
                "num_model_requests": int(row.num_requests),
                "project_id": None, "user_id": None,
                "api_key_id": row.api_key_id if "api_key_id" in keys else None,
                "model": row.model if "model" in keys else None,
                "batch": None, "service_tier": None,
            })
        return buckets

    def usage_summary(self, org_id: str | None, start_time: float | None = None,
                      end_time: float | None = None) -> list[dict[str, Any]]:
        """Totals per (model, kind) with their cost: dicts of model, kind, prompt_tokens,
        completion_tokens, total_tokens, num_requests and cost_usd, sorted by model and kind."""
        totals: dict[tuple[str, str], dict[str, Any]] = {}
        for row in self._priced(org_id, start_time, end_time, day=False):
            t = totals.setdefault((row["model"], row["kind"]), {
                "model": row["model"], "kind": row["kind"], "prompt_tokens": 0,
                "completion_tokens": 0, "total_tokens": 0, "num_requests": 0, "cost_usd": 0.0})
            _add(t, row)
        return [totals[k] for k in sorted(totals)]

    def usage_by_day(self, org_id: str | None, start_time: float | None = None,
                     end_time: float | None = None) -> list[dict[str, Any]]:
        """Totals per UTC day and model, all kinds together: dicts of day (`YYYY-MM-DD`), model,
        prompt_tokens, completion_tokens, total_tokens, num_requests and cost_usd."""
        totals: dict[tuple[int, str], dict[str, Any]] = {}
        for row in self._priced(org_id, start_time, end_time, day=True):
            day = datetime.fromtimestamp(row["day"] * DAY, timezone.utc).strftime("%Y-%m-%d")
            t = totals.setdefault((row["day"], row["model"]), {
                "day": day, "model": row["model"], "prompt_tokens": 0, "completion_tokens": 0,
                "total_tokens": 0, "num_requests": 0, "cost_usd": 0.0})
            _add(t, row)
        return [totals[k] for k in sorted(totals)]

    def set_price(self, model: str, prompt_per_1m: float, completion_per_1m: float,
                  training_per_1m: float = 0.0) -> Price:
        """Set the USD prices per million tokens of a served model name (a base or `ft:` model)."""
        if min(prompt_per_1m, completion_per_1m, training_per_1m) < 0:
            raise ValueError("prices must be >= 0")
        with self._write() as s:
            price = s.get(Price, model) or Price(model=model)
            price.prompt_per_1m = prompt_per_1m
            price.completion_per_1m = completion_per_1m
            price.training_per_1m = training_per_1m
            s.add(price)
        return price

    def get_price(self, model: str) -> Price | None:
        """The price row of exactly this name (no base-model fallback), or None."""
        with self._read() as s:
            return s.get(Price, model)

    def list_prices(self) -> list[Price]:
        """All price rows by model name."""
        with self._read() as s:
            return list(s.scalars(select(Price).order_by(Price.model)))

    def _grouped(self, org_id: str | None, wheres: list[ColumnElement[bool]], origin: int,
                 width: int, keys: list[str]) -> list[Any]:
        """Token sums per (bucket index, *keys) for rows matching `wheres`."""
        if org_id is not None:
            wheres = [*wheres, Usage.org_id == org_id]
        with self._read() as s:
            bucket = _floor_div(Usage.created_at - origin, width, s.get_bind().dialect.name)
            inner = select(bucket.label("bucket"), Usage.api_key_id, Usage.model,
                           Usage.base_model, Usage.kind, Usage.prompt_tokens,
                           Usage.completion_tokens, Usage.num_requests).where(*wheres).subquery()
            groups = [inner.c.bucket, *(inner.c[k] for k in keys)]
            stmt = (select(*groups, func.sum(inner.c.prompt_tokens).label("prompt_tokens"),
                           func.sum(inner.c.completion_tokens).label("completion_tokens"),
                           func.sum(inner.c.num_requests).label("num_requests"))
                    .group_by(*groups).order_by(*groups))
            return list(s.execute(stmt))

    def _priced(self, org_id: str | None, start_time: float | None, end_time: float | None,
                day: bool) -> list[dict[str, Any]]:
        """Sums per (model, base_model, kind[, day index]) with cost_usd filled in."""
        wheres = []
        if org_id is not None:
            wheres.append(Usage.org_id == org_id)
        if start_time is not None:
            wheres.append(Usage.created_at >= start_time)
        if end_time is not None:
            wheres.append(Usage.created_at < end_time)
        with self._read() as s:
            dialect = s.get_bind().dialect.name
            inner = select(_floor_div(Usage.created_at, DAY, dialect).label("day"), Usage.model,
                           Usage.base_model, Usage.kind, Usage.prompt_tokens,
                           Usage.completion_tokens, Usage.num_requests).where(*wheres).subquery()
            groups = [inner.c.model, inner.c.base_model, inner.c.kind]
            if day:
                groups.append(inner.c.day)
            stmt = select(*groups, func.sum(inner.c.prompt_tokens).label("prompt_tokens"),
                          func.sum(inner.c.completion_tokens).label("completion_tokens"),
                          func.sum(inner.c.num_requests).label("num_requests")).group_by(*groups)
            rows = [dict(r._mapping) for r in s.execute(stmt)]
            prices = {p.model: p for p in s.scalars(select(Price))}
        for row in rows:
            for k in ("prompt_tokens", "completion_tokens", "num_requests"):
                row[k] = int(row[k])
            price = prices.get(row["model"]) or prices.get(row["base_model"])
            row["cost_usd"] = _cost(price, row["kind"], row["prompt_tokens"],
                                    row["completion_tokens"])
        return rows


def _floor_div(x: ColumnElement[Any], width: int, dialect: str) -> ColumnElement[int]:
    """floor(x / width) for x >= 0: Postgres rounds when casting to an integer, SQLite truncates."""
    if dialect == "postgresql":
        return cast(func.floor(x / width), BigInteger)
    return cast(x / width, Integer)


def _cost(price: Price | None, kind: str, prompt_tokens: int, completion_tokens: int) -> float:
    """USD for these tokens at `price` (0.0 without one)."""
    if price is None:
        return 0.0
    if kind == "fine-tune":
        return (prompt_tokens + completion_tokens) * price.training_per_1m / 1e6
    return (prompt_tokens * price.prompt_per_1m + completion_tokens * price.completion_per_1m) / 1e6


def _add(total: dict[str, Any], row: dict[str, Any]) -> None:
    total["prompt_tokens"] += row["prompt_tokens"]
    total["completion_tokens"] += row["completion_tokens"]
    total["total_tokens"] += row["prompt_tokens"] + row["completion_tokens"]
    total["num_requests"] += row["num_requests"]
    total["cost_usd"] += row["cost_usd"]
