"""Alembic from code: upgrade to head, and the boot-time "is this database at head?" check.

One migration history serves both engines; ``target`` is a SQLite file (a Path) or a PostgreSQL
URL (``Settings.database``). Concurrent ``upgrade`` calls on PostgreSQL queue on an advisory lock
in ``migrations/env.py``: the second finds the schema at head and does nothing.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine
from sqlalchemy.exc import OperationalError

from server.db.urls import is_postgres, shown, sync_url

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


class NotMigrated(RuntimeError):
    pass


def alembic_config(target: Path | str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Not through the ini's main options: a password may hold '%' (configparser interpolation).
    cfg.attributes["url"] = sync_url(target)
    return cfg


def upgrade(target: Path | str, revision: str = "head") -> None:
    """Create or upgrade the schema (synchronous; call from a thread inside a loop)."""
    if not is_postgres(target):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(target), revision)


def head_revisions(target: Path | str) -> set[str]:
    return set(ScriptDirectory.from_config(alembic_config(target)).get_heads())


def current_revisions(target: Path | str) -> set[str]:
    """The revisions the database is at (none for a missing SQLite file). NotMigrated, saying
    why, when a PostgreSQL server cannot be reached."""
    if not is_postgres(target) and not Path(target).exists():
        return set()
    engine = create_engine(sync_url(target))
    try:
        with engine.connect() as conn:
            return set(MigrationContext.configure(conn).get_current_heads())
    except OperationalError as e:
        reason = " ".join(str(e.orig or e).split())[:300]
        raise NotMigrated(f"cannot reach the database {shown(target)}: {reason}") from None
    finally:
        engine.dispose()


def check_at_head(target: Path | str) -> None:
    """Raise NotMigrated with an actionable message unless the schema is at head."""
    current, heads = current_revisions(target), head_revisions(target)
    if current != heads:
        raise NotMigrated(
            f"database {shown(target)} is at revision {sorted(current) or 'none'}, the code needs "
            f"{sorted(heads)}: run `filedrop migrate` (scripts/run does) before starting the server"
        )
