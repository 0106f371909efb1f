"""Direct access to a test's database, whichever engine it is (SQLite file or PostgreSQL): what
another process (the janitor, a crash, an operator) does to the rows behind the server's back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, create_engine

from server.config import Settings


@contextmanager
def connect(settings: Settings) -> Iterator[Connection]:
    """One transaction on the test's database (committed on exit), with SQLite's foreign keys
    on as the server has them."""
    engine = create_engine(settings.sync_db_url)
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "sqlite":
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")
            yield conn
    finally:
        engine.dispose()
