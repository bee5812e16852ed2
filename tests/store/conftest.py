"""Databases on each backend: a fresh SQLite file per test, and on the Postgres test database
(SHOAL_TEST_PG_URL, default postgresql://postgres@127.0.0.1:5432/test) schemas with random names,
dropped afterwards. `store` shares one migrated Postgres schema per test run and empties its
tables after each test; `empty_url` gives a new empty schema each time (for migration tests).

An unreachable Postgres fails the tests rather than skipping them."""

from __future__ import annotations

import os
import secrets

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from shoal.store import Store
from shoal.store.db import make_engine, migrate
from shoal.store.schema import Base

PG_URL = os.environ.get("SHOAL_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


class PgSchemas:
    """Creates and drops schemas of the Postgres test database."""

    def __init__(self) -> None:
        self.admin = create_engine(make_url(PG_URL).set(drivername="postgresql+psycopg"))
        self.names: list[str] = []

    def new(self) -> str:
        """A URL whose search_path is a new empty schema."""
        name = f"shoal_test_{secrets.token_hex(6)}"
        try:
            with self.admin.begin() as conn:
                conn.exec_driver_sql(f'CREATE SCHEMA "{name}"')
        except OperationalError as e:
            pytest.fail(f"Postgres at {PG_URL} is unreachable (set SHOAL_TEST_PG_URL): {e}")
        self.names.append(name)
        options = f"-csearch_path={name} -csynchronous_commit=off"
        return make_url(PG_URL).update_query_dict({"options": options}).render_as_string(False)

    def drop_all(self) -> None:
        if self.names:
            with self.admin.begin() as conn:
                for name in self.names:
                    conn.exec_driver_sql(f'DROP SCHEMA "{name}" CASCADE')
        self.admin.dispose()


@pytest.fixture(scope="session")
def pg():
    schemas = PgSchemas()
    yield schemas
    schemas.drop_all()


@pytest.fixture(scope="session")
def pg_url(pg):
    """A Postgres schema migrated once for the whole run."""
    url = pg.new()
    engine = make_engine(url)
    migrate(engine)
    engine.dispose()
    return url


@pytest.fixture(params=["sqlite", "postgres"])
def empty_url(request, tmp_path):
    """The URL of an empty database on one backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    return request.getfixturevalue("pg").new()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    """The URL of a migrated database with no rows on one backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shoal.db'}"
        return
    url = request.getfixturevalue("pg_url")
    yield url
    engine = make_engine(url)
    with engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())
    engine.dispose()


@pytest.fixture
def store(db_url):
    st = Store.open(db_url)
    yield st
    st.close()


@pytest.fixture
def orgs(store):
    """Two organizations' ids: (ours, theirs)."""
    return store.get_or_create_org("acme").id, store.get_or_create_org("other").id
