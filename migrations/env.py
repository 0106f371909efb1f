"""Alembic environment: synchronous SQLite, batch mode for ALTERs, our naming convention."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from server.db import job_models as _job_models  # noqa: F401  (registers the job tables)
from server.db import signing_models as _signing_models  # noqa: F401  (registers signing_keys)
from server.db.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as connection:
        connection.exec_driver_sql("PRAGMA journal_mode=WAL")
        connection.commit()  # else Alembic joins the autobegun transaction and never commits
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
