"""Connecting and migrating: from empty, again (a no-op), concurrently, and matching schema.py."""

from __future__ import annotations

import threading

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from shoal.store import Store
from shoal.store.db import alembic_config, database_url, make_engine, migrate
from shoal.store.schema import Base

TABLES = {"organizations", "api_keys", "usage", "prices", "files", "fine_tuned_models", "jobs",
          "job_events", "checkpoints", "learning_curves", "alembic_version"}


def head() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def test_migrate_from_empty_twice_to_head(empty_url):
    engine = make_engine(empty_url)
    migrate(engine)
    migrate(engine)
    assert set(inspect(engine).get_table_names()) == TABLES
    with engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == head() == "0001"
        assert conn.execute(text("select count(*) from alembic_version")).scalar() == 1
    engine.dispose()


def test_migration_matches_models(empty_url):
    engine = make_engine(empty_url)
    migrate(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []


def test_concurrent_open_of_an_empty_database(empty_url):
    errors, stores = [], []

    def open_one():
        try:
            stores.append(Store.open(empty_url))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len({s.default_org().id for s in stores}) == 1
    for s in stores:
        s.close()


def test_sqlite_pragmas(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with engine.connect() as conn:
        pragma = lambda name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()  # noqa: E731
        assert pragma("journal_mode") == "wal"
        assert pragma("foreign_keys") == 1
        assert pragma("busy_timeout") == 10000
        assert pragma("synchronous") == 1  # NORMAL
    engine.dispose()


def test_database_url_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv("SHOAL_DATABASE_URL", raising=False)
    monkeypatch.setenv("SHOAL_HOME", str(tmp_path / "home"))
    assert database_url() == f"sqlite:///{tmp_path / 'home' / 'shoal.db'}"
    assert (tmp_path / "home").is_dir()
    monkeypatch.setenv("SHOAL_DATABASE_URL", "sqlite:///elsewhere.db")
    assert database_url() == "sqlite:///elsewhere.db"
    assert database_url("sqlite:///given.db") == "sqlite:///given.db"


def test_postgres_urls_use_psycopg():
    engine = make_engine("postgresql://u@127.0.0.1:1/db")
    assert engine.dialect.driver == "psycopg"
    assert engine.pool._pre_ping
    engine.dispose()
