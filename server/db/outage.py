"""A PostgreSQL server that cannot be connected to (stopped, restarting, unreachable) is an
outage, not a fault of ours: every PostgreSQL engine (the pool, the recorder's psycopg one, the
advisory locks' connection) raises ``DatabaseUnreachable`` for it, which ``connection_lost``
names in one line (503 for a request, one WARNING line in a background loop)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.ext.asyncio import AsyncEngine


class DatabaseUnreachable(Exception):
    """A new PostgreSQL connection could not be made: refused, timed out, a host name that does
    not resolve, or a server starting up or shutting down (SQLSTATE class 08, 57P01-57P03).
    Raised instead of the driver's error (its ``__cause__``), which is a bare ``OSError`` for
    asyncpg's refused connection and otherwise looks like any statement's error: an outage, not
    a fault of ours, and the next attempt connects again."""


# What a server answers a new session with while it cannot take one: an operator's or a crash's
# shutdown under way, or not accepting connections yet (starting, stopping).
_UNAVAILABLE_STATES = ("57P01", "57P02", "57P03")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def unreachable_on_connect(engine: AsyncEngine | Engine) -> None:
    """Make a PostgreSQL engine raise ``DatabaseUnreachable`` for a connection it cannot make for
    a reason of the network or of the server's state (an error of ours, a wrong password or a
    missing database, stays what the driver raised)."""
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine

    @event.listens_for(sync_engine, "do_connect")
    def _connect(dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        try:
            return dialect.connect(*cargs, **cparams)
        except Exception as e:
            state = getattr(e, "sqlstate", None)
            if (isinstance(e, OSError)  # asyncpg: refused, reset, timed out, a name that does not resolve
                    or (state is None and isinstance(e, dialect.loaded_dbapi.OperationalError))  # libpq's own
                    or (state is not None and (state.startswith("08") or state in _UNAVAILABLE_STATES))):
                raise DatabaseUnreachable(_first_line(e)) from e
            raise
