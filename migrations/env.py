"""Alembic environment: one history for SQLite and PostgreSQL, synchronous, batch mode for
SQLite's ALTERs, our naming convention.

SQLite: the file is put in WAL mode first. PostgreSQL: the migration transaction starts by
taking an advisory lock, so two ``filedrop migrate`` at once run one after the other (the
second finds the schema at head).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, func, select

from server.db import job_models as _job_models  # noqa: F401  (registers the job tables)
from server.db import signing_models as _signing_models  # noqa: F401  (registers signing_keys)
from server.db.models import Base

config = context.config
target_metadata = Base.metadata
MIGRATE_LOCK = 0x66640000  # advisory lock key of migrations (server.db.locks has the others)


def _url() -> str:
    return config.attributes.get("url") or config.get_main_option("sqlalchemy.url")


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(_url())
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            connection.exec_driver_sql("PRAGMA journal_mode=WAL")
            connection.commit()  # else Alembic joins the autobegun transaction and never commits
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=sqlite)
        with context.begin_transaction():
            if not sqlite:
                connection.execute(select(func.pg_advisory_xact_lock(MIGRATE_LOCK)))
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
