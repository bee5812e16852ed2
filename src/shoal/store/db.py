"""Which database, how to connect to it, and bringing its schema up to date.

SQLite (the default, `$SHOAL_HOME/shoal.db`) runs in WAL mode so readers never wait for the writer;
SQLAlchemy, not the sqlite3 module, emits BEGIN, so DDL is transactional and a connection can ask
for `BEGIN IMMEDIATE` (execution option `sqlite_begin`) to take the write lock before it reads.
Postgres URLs (`postgresql://…`) go through psycopg 3. Not here: queries (store.py and its parts).
"""

from __future__ import annotations

import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url

from ..paths import shoal_home

HERE = Path(__file__).resolve().parent
MIGRATION_LOCK = 0x5E0A1  # pg_advisory_xact_lock key: one migrating process at a time
SQLITE_PRAGMAS = ("busy_timeout=10000", "journal_mode=WAL", "foreign_keys=ON", "synchronous=NORMAL")


def database_url(url: str | None = None) -> str:
    """The database to use: `url`, else $SHOAL_DATABASE_URL, else `sqlite:///$SHOAL_HOME/shoal.db`.

    Creates $SHOAL_HOME when it falls back to the default file.
    """
    url = url or os.environ.get("SHOAL_DATABASE_URL")
    if url:
        return url
    home = shoal_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'shoal.db'}"


def make_engine(url: str | None = None) -> Engine:
    """An engine for `url` (see `database_url`), set up for many threads and processes.

    Args:
        url: a SQLAlchemy URL; `postgresql://` and `postgres://` mean psycopg 3. Query parameters
            go to the driver (e.g. `?options=-csearch_path%3Dmyschema` on Postgres).
    """
    parsed = make_url(database_url(url))
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise ValueError("url: an in-memory SQLite database cannot be shared; use a file")
        engine = create_engine(parsed)
        _sqlite_events(engine)
        return engine
    return create_engine(parsed, pool_pre_ping=True)


def _sqlite_events(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see _begin)
        cursor = dbapi_conn.cursor()
        for pragma in SQLITE_PRAGMAS:
            _pragma(cursor, pragma)
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


def _pragma(cursor, pragma: str, wait_s: float = 10.0) -> None:
    """Run a PRAGMA, retrying while the file is locked: switching a new database to WAL needs an
    exclusive lock and fails at once (no busy handler) when another process opens it too."""
    import sqlite3
    import time

    deadline = time.monotonic() + wait_s
    while True:
        try:
            cursor.execute(f"PRAGMA {pragma}")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def writer(engine: Engine) -> Engine:
    """`engine` for read-modify-write transactions: on SQLite they take the write lock up front
    (`BEGIN IMMEDIATE`), so two writers queue on busy_timeout instead of failing to upgrade."""
    return engine.execution_options(sqlite_begin="IMMEDIATE")


def alembic_config() -> Config:
    """The Alembic config of the packaged migrations, independent of the working directory."""
    cfg = Config(str(HERE / "alembic.ini"))
    cfg.set_main_option("script_location", str(HERE / "migrations"))
    return cfg


def migrate(engine: Engine) -> None:
    """Upgrade the database to the newest migration; a no-op when it is there already.

    Safe when several processes start at once: they take turns under one lock (an advisory lock
    on Postgres, the write lock on SQLite) and the later ones find nothing to do.
    """
    cfg = alembic_config()
    with writer(engine).begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
