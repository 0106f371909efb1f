"""Alembic from code: upgrade to head (``filedrop migrate``, the tests). The boot-time "is this
database at head?" check is ``server.db.revision``, which does not load Alembic.

One migration history serves both engines; ``target`` is a SQLite file (a Path) or a PostgreSQL
URL (``Settings.database``). Concurrent ``upgrade`` calls on PostgreSQL queue on an advisory lock
in ``migrations/env.py``: the second finds the schema at head and does nothing.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from server.db.urls import is_postgres, sync_url

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


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
