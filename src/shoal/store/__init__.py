"""Shoal's database: SQLAlchemy models, Alembic migrations, and the `Store` the API and workers
share (SQLite by default, Postgres by `SHOAL_DATABASE_URL`)."""

from .schema import (TERMINAL, ApiKey, Checkpoint, Curve, Event, FileRow, Job, ModelRow,
                     Organization, Price, Usage)
from .store import Store

__all__ = ["TERMINAL", "ApiKey", "Checkpoint", "Curve", "Event", "FileRow", "Job", "ModelRow",
           "Organization", "Price", "Store", "Usage"]
