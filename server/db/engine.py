"""SQLite engines, configured on purpose.

* WAL, ``busy_timeout``, foreign keys on every connection.
* Two engines over one file: ``read()`` sessions for queries (many connections, WAL lets them
  run beside a writer) and ``write()`` sessions through a single-connection engine whose
  transactions start with ``BEGIN IMMEDIATE``. Writers queue in the pool instead of failing
  with SQLITE_BUSY, and a read-then-update inside ``write()`` can never be upgraded into a
  deadlock. Keep write transactions short: never await network or disk inside one.
* ``write_sync()``: the same kind of write transaction on a synchronous single connection, for
  work that runs a whole transaction in one thread hop (the upload service's group commit: one
  hop per group instead of one per statement, each of which costs a trip through the event loop
  and the driver's thread). SQLite serialises it with ``write()`` as it would two processes.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import AsyncAdaptedQueuePool


def utcnow() -> datetime:
    """Naive UTC, as stored in the database."""
    return datetime.now(UTC).replace(tzinfo=None)


def _configure(engine: AsyncEngine | Engine, begin: str) -> None:
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event emit BEGIN itself (the pysqlite driver's own
        # implicit BEGIN is DEFERRED and skipped for reads).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=10000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql(begin)


class Database:
    def __init__(self, db_path: Path) -> None:
        url = f"sqlite+aiosqlite:///{db_path}"
        self.path = db_path
        self.writer = create_async_engine(url, poolclass=AsyncAdaptedQueuePool, pool_size=1, max_overflow=0,
                                          pool_timeout=60)
        self.reader = create_async_engine(url, poolclass=AsyncAdaptedQueuePool, pool_size=4, max_overflow=4)
        _configure(self.writer, "BEGIN IMMEDIATE")
        _configure(self.reader, "BEGIN")
        self.sync_writer = create_engine(f"sqlite:///{db_path}", pool_size=1, max_overflow=0, pool_timeout=60,
                                         connect_args={"check_same_thread": False})  # one thread at a time: the pool
        _configure(self.sync_writer, "BEGIN IMMEDIATE")
        self._write_sessions = async_sessionmaker(self.writer, expire_on_commit=False)
        self._read_sessions = async_sessionmaker(self.reader, expire_on_commit=False)

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """One write transaction (BEGIN IMMEDIATE): committed on exit, rolled back on error.

        The writer is held from the start of the block, not from its first statement (a session
        connects lazily): what a block reads before its first statement (``utcnow()`` of a sync
        point or a chunk record) is then ordered against every other write."""
        async with self._write_sessions() as session, session.begin():
            await session.connection()
            yield session

    @contextmanager
    def write_sync(self) -> Iterator[Connection]:
        """One write transaction (BEGIN IMMEDIATE) on a synchronous connection: committed on exit,
        rolled back on error. Blocking: call it in a thread."""
        with self.sync_writer.begin() as conn:
            yield conn

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A read-only session; its snapshot ends when the block exits."""
        async with self._read_sessions() as session:
            try:
                yield session
            finally:
                await session.rollback()

    def sync_commits(self) -> None:
        """Make every transaction committed so far power-loss durable (blocking: call it in
        a thread). Connections run ``synchronous=NORMAL``: a commit survives a process crash
        at once, a power loss only once the WAL is next synced (a checkpoint, the uploads'
        syncfs). An answer that promises a durable record calls this first: one fsync."""
        try:
            fd = os.open(f"{self.path}-wal", os.O_RDONLY)
        except FileNotFoundError:
            return  # no WAL: every commit is in the main file, synced by the checkpoint
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    async def dispose(self) -> None:
        await self.writer.dispose()
        await self.reader.dispose()
        self.sync_writer.dispose()
