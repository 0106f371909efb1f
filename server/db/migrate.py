"""Alembic from code: upgrade to head, and the boot-time "is this database at head?" check."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


class NotMigrated(RuntimeError):
    pass


def alembic_config(db_path: Path) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", f"sqlite:///{db_path}")
    return cfg


def upgrade(db_path: Path, revision: str = "head") -> None:
    """Create or upgrade the schema (synchronous; call from a thread inside a loop)."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(db_path), revision)


def head_revisions(db_path: Path) -> set[str]:
    return set(ScriptDirectory.from_config(alembic_config(db_path)).get_heads())


def current_revisions(db_path: Path) -> set[str]:
    if not db_path.exists():
        return set()
    engine = create_engine(f"sqlite:///{db_path}")
    try:
        with engine.connect() as conn:
            return set(MigrationContext.configure(conn).get_current_heads())
    finally:
        engine.dispose()


def check_at_head(db_path: Path) -> None:
    """Raise NotMigrated with an actionable message unless the schema is at head."""
    current, heads = current_revisions(db_path), head_revisions(db_path)
    if current != heads:
        raise NotMigrated(
            f"database {db_path} is at revision {sorted(current) or 'none'}, the code needs "
            f"{sorted(heads)}: run `filedrop migrate` (scripts/run does) before starting the server"
        )
