"""Is this database at the schema the code needs? Answered without Alembic.

The server and its workers run for days; Alembic (with Mako and Pygments, which it loads) took
10.5 MB of every such process's memory for this one check at start. So only ``filedrop
migrate`` (``server.db.migrate``) loads Alembic; the check reads Alembic's version table itself
and compares it with ``SCHEMA_HEADS``, the head of ``migrations/versions``, written here and kept
equal to what Alembic computes from the migration files by a test
(``tests/test_app_boot.py``): a new migration fails that test until it is named here.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import OperationalError

from server.db.urls import is_postgres, shown, sync_url

SCHEMA_HEADS = frozenset({"0005"})
VERSION_TABLE = "alembic_version"  # Alembic's default; migrations/env.py keeps it


class NotMigrated(RuntimeError):
    pass


def current_revisions(target: Path | str) -> set[str]:
    """The revisions the database is at (none for a missing SQLite file or a database never
    migrated). NotMigrated, saying why, when a PostgreSQL server cannot be reached."""
    if not is_postgres(target) and not Path(target).exists():
        return set()
    engine = create_engine(sync_url(target))
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table(VERSION_TABLE):
                return set()
            return {row[0] for row in conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}"))}
    except OperationalError as e:
        reason = " ".join(str(e.orig or e).split())[:300]
        raise NotMigrated(f"cannot reach the database {shown(target)}: {reason}") from None
    finally:
        engine.dispose()


def check_at_head(target: Path | str) -> None:
    """Raise NotMigrated with an actionable message unless the schema is at head."""
    current = current_revisions(target)
    if current != SCHEMA_HEADS:
        raise NotMigrated(
            f"database {shown(target)} is at revision {sorted(current) or 'none'}, the code needs "
            f"{sorted(SCHEMA_HEADS)}: run `filedrop migrate` (scripts/run does) before starting the server"
        )
