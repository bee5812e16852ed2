"""Alembic environment: runs the migrations on the connection `db.migrate` passes in
(`config.attributes["connection"]`), or, from the alembic CLI, on `database_url()`."""

from __future__ import annotations

from alembic import context

from shoal.store.db import make_engine
from shoal.store.schema import Base


def run(connection) -> None:
    context.configure(connection=connection, target_metadata=Base.metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    engine = make_engine()
    with engine.connect() as conn:
        run(conn)
    engine.dispose()
