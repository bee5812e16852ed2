"""What every part of the store shares: the engine, one short session per call, and cursor pages.

Each public store method opens its own session and transaction and closes it before returning,
so one `Store` serves many threads, and rows come back detached with their columns loaded
(`expire_on_commit=False`). Writes that read first use `_write()`, which on SQLite takes the
write lock at BEGIN. Not here: the queries of each area (accounts.py, usage.py, jobs.py, ...).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Engine, Select, tuple_
from sqlalchemy.orm import Session, sessionmaker

from .db import writer

T = TypeVar("T")


class StoreBase:
    """The engine and the two kinds of session the store's methods run in."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._reader = sessionmaker(engine, expire_on_commit=False)
        self._writer = sessionmaker(writer(engine), expire_on_commit=False)

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._reader() as session, session.begin():
            yield session

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with self._writer() as session, session.begin():
            yield session

    def close(self) -> None:
        """Close the pooled connections (call in a child process before using a fork's copy)."""
        self.engine.dispose()


def after(cols: Sequence[Any], values: Sequence[Any], descending: bool) -> ColumnElement[bool]:
    """Rows that come after the cursor `values` when ordered by `cols` (all one direction)."""
    return tuple_(*cols) < tuple_(*values) if descending else tuple_(*cols) > tuple_(*values)


def page(session: Session, stmt: Select[tuple[T]], limit: int) -> tuple[list[T], bool]:
    """The first `limit` rows of an ordered `stmt` and whether more follow."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    rows = list(session.scalars(stmt.limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def fresh(session: Session, row_type: type[T], key: Any) -> T:
    """Row `key` re-read from the database, past any stale copy in the session."""
    return session.get(row_type, key, populate_existing=True)  # type: ignore[return-value]


def field_key(model: type, name: str) -> str:
    """The attribute of `model` that field `name` sets (`metadata` is `metadata_`); ValueError
    for a primary key or a name that is not a column."""
    key = "metadata_" if name == "metadata" else name
    attr = model.__mapper__.column_attrs.get(key)  # type: ignore[attr-defined]
    if attr is None or attr.columns[0].primary_key:
        raise ValueError(f"{model.__name__} has no settable field {name!r}")
    return key


def apply_fields(row: Any, fields: dict[str, Any]) -> None:
    """Set columns of `row` from `fields` (see `field_key`)."""
    for name, value in fields.items():
        setattr(row, field_key(type(row), name), value)
