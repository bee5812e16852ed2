"""Learning-curve requests: one row per request; its points are jobs carrying its `curve_id`.

Not here: planning or running the points (curves/ and the worker), which read and update these
rows through `update_curve` and `Store.list_jobs(curve_id=...)`.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select

from .base import StoreBase, after as after_cursor, apply_fields, page
from .ids import new_id
from .schema import Curve


class Curves(StoreBase):
    """Learning-curve rows."""

    def create_curve(self, org_id: str, request: dict[str, Any], status: str = "queued") -> Curve:
        """Record a learning-curve request (`lcurve-…`)."""
        curve = Curve(id=new_id("lcurve-"), org_id=org_id, status=status, request=request,
                      created_at=time.time(), cancel_requested=False)
        with self._write() as s:
            s.add(curve)
        return curve

    def get_curve(self, org_id: str | None, curve_id: str) -> Curve | None:
        """The curve, or None when missing or another organization's (org_id None: any)."""
        with self._read() as s:
            curve = s.get(Curve, curve_id)
        return curve if curve is not None and org_id in (None, curve.org_id) else None

    def list_curves(self, org_id: str | None, after: str | None = None,
                    limit: int = 20) -> tuple[list[Curve], bool]:
        """One page of curves, newest first, and whether more follow (org_id None: all)."""
        cols = (Curve.created_at, Curve.id)
        stmt = select(Curve).order_by(*(c.desc() for c in cols))
        if org_id is not None:
            stmt = stmt.where(Curve.org_id == org_id)
        with self._read() as s:
            if after is not None:
                cursor = s.get(Curve, after)
                if cursor is None or org_id not in (None, cursor.org_id):
                    return [], False
                stmt = stmt.where(after_cursor(cols, (cursor.created_at, cursor.id), True))
            return page(s, stmt, limit)

    def update_curve(self, curve_id: str, **fields: Any) -> Curve:
        """Set columns of a curve and return it; KeyError when it does not exist."""
        with self._write() as s:
            curve = s.get(Curve, curve_id)
            if curve is None:
                raise KeyError(curve_id)
            apply_fields(curve, fields)
        return curve
