"""Database URLs: which engine a target is, and the driver each side uses.

A target is a SQLite file (a ``Path``) or a PostgreSQL URL (``FILEDROP_DATABASE_URL``):
``postgresql+asyncpg://`` for everything asynchronous (the server, workers, admin commands),
``postgresql+psycopg://`` for the few synchronous paths (Alembic, the upload ledger's group
commit in its thread, admin tools and tests). ``postgresql://`` and ``postgres://`` are accepted
and mean the same database.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+asyncpg", "postgresql+psycopg")


def postgres_url(text: str) -> URL:
    """The SQLAlchemy URL of a PostgreSQL database; ValueError (without the password) if ``text``
    is not one."""
    try:
        url = make_url(text)
    except ArgumentError:
        raise ValueError("not a database URL (use postgresql+asyncpg://USER:PASSWORD@HOST:PORT/DB)") from None
    if url.drivername not in POSTGRES_SCHEMES:
        raise ValueError(f"{url.drivername}:// is not PostgreSQL (use postgresql+asyncpg://USER:PASSWORD@HOST:PORT/DB; "
                         "leave it unset for SQLite)")
    if not url.database:
        raise ValueError(f"{url.render_as_string(hide_password=True)} names no database")
    return url


def is_postgres(target: Path | str) -> bool:
    return isinstance(target, str) and not target.startswith("sqlite")


def async_url(target: Path | str) -> URL:
    if is_postgres(target):
        return postgres_url(str(target)).set(drivername="postgresql+asyncpg")
    return make_url(f"sqlite+aiosqlite:///{target}")


def sync_url(target: Path | str) -> str:
    if is_postgres(target):
        return postgres_url(str(target)).set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return f"sqlite:///{target}"


def libpq_url(target: str) -> str:
    """The plain ``postgresql://`` form (asyncpg's own connections: LISTEN)."""
    return postgres_url(target).set(drivername="postgresql").render_as_string(hide_password=False)


def shown(target: Path | str) -> str:
    """How messages name the database: the file, or the URL without its password."""
    if is_postgres(target):
        return postgres_url(str(target)).render_as_string(hide_password=True)
    return str(target)
