"""The database: SQLite (one file, the default) or PostgreSQL (``FILEDROP_DATABASE_URL``), both
configured on purpose behind one ``Database``.

SQLite:

* WAL, ``busy_timeout``, foreign keys on every connection.
* Two engines over one file: ``read()`` sessions for queries (many connections, WAL lets them
  run beside a writer) and ``write()`` sessions through a single-connection engine whose
  transactions start with ``BEGIN IMMEDIATE``. Writers queue in the pool instead of failing
  with SQLITE_BUSY, and a read-then-update inside ``write()`` can never be upgraded into a
  deadlock. Keep write transactions short: never await network or disk inside one.
* ``query(fn)``: a read transaction run by ``fn`` (SQLAlchemy Core on a synchronous connection)
  in one thread hop, for hot reads (a job's status). A ``read()`` session costs 1.2-1.5 ms of CPU
  for a one-row select (the session, the pool, and a trip through the event loop and the
  driver's thread for BEGIN, the statement, its rows and the rollback each); ``query`` 0.15-0.2.
* ``write_sync()``: the same kind of write transaction on a synchronous single connection, for
  work that runs a whole transaction in one thread hop (the upload service's group commit: one
  hop per group instead of one per statement, each of which costs a trip through the event loop
  and the driver's thread). SQLite serialises it with ``write()`` as it would two processes.

PostgreSQL (several app processes and workers, on one host or several):

* One asyncpg pool (``FILEDROP_DATABASE_POOL`` connections) serves ``read()`` and ``write()``;
  transactions are READ COMMITTED. A session idle inside a transaction for
  ``IDLE_IN_TRANSACTION`` s is ended by the server (``idle_in_transaction_session_timeout``), and
  with it the locks it held: a process frozen mid-transaction (SIGSTOP, swapped out, a host
  that hangs) holding a job's row lock would otherwise stop every other worker and the one
  that should hand its rows back. Every "exactly once" decision is a conditional ``UPDATE``
  (row count checked), a ``SELECT ... FOR UPDATE`` taken in a fixed order (the job row before
  its rows, a batch before its files, files by id), ``FOR UPDATE SKIP LOCKED`` for claims, or an
  advisory lock (``locks``).
* ``query(fn)`` runs ``fn`` on a pooled asyncpg connection (``run_sync``).
* ``write_sync()`` runs on one psycopg connection (the group commit's thread). A commit returns
  once PostgreSQL has flushed its WAL: ``sync_commits()`` has nothing left to do.
* ``notify()`` / ``listen()``: LISTEN/NOTIFY (workers wake when a job is queued).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, func, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import AsyncAdaptedQueuePool

from server.db.completion import run_to_completion
from server.db.locks import KINDS, AdvisoryLocks, FileLocks, Locks
from server.db.outage import DatabaseUnreachable, unreachable_on_connect
from server.db.urls import async_url, is_postgres, libpq_url, sync_url

log = logging.getLogger("filedrop.db")
T = TypeVar("T")
POOL_TIMEOUT = 30.0  # s a request waits for a free PostgreSQL connection (FILEDROP_DATABASE_POOL)
# s a PostgreSQL session may sit idle inside a transaction. Ours never await anything but the
# database inside one; well under the workers' LOST_AFTER (20 s), so the rows of a worker frozen
# mid-transaction go back to the queue on time.
IDLE_IN_TRANSACTION = 10.0


def connection_lost(e: BaseException) -> str | None:
    """Why the database ended the connection under us (PostgreSQL restarted, a session ended by
    an operator or by ``IDLE_IN_TRANSACTION``) or would not give a new one (down, starting,
    shutting down), in one line; None if ``e`` is something else. Not a fault of ours: the pool
    makes a new connection."""
    if isinstance(e, DBAPIError) and e.connection_invalidated:
        return (str(e.orig or e).strip().splitlines() or ["connection closed"])[0][:200]
    seen: BaseException | None = e
    for _ in range(8):  # the error itself, or what it was raised from
        if seen is None:
            break
        if isinstance(seen, DatabaseUnreachable):
            return f"cannot connect: {seen}"
        seen = seen.__cause__ or seen.__context__
    return None


BUSY_TIMEOUT = 10.0  # s a SQLite connection waits for another's write lock before "database is locked"


def database_locked(e: BaseException) -> bool:
    """SQLite's "database is locked" (SQLITE_BUSY once ``busy_timeout`` ran out: another process
    held the write lock, e.g. one frozen in a transaction), as SQLAlchemy wraps it. Not a fault
    of the process that waited."""
    orig = getattr(e, "orig", None)
    # Exactly SQLITE_BUSY's text: "database table is locked" (SQLITE_LOCKED, a conflict inside
    # one connection) is a fault of ours and keeps its traceback.
    return isinstance(orig, sqlite3.OperationalError) and str(orig) == "database is locked"


def log_failure(logger: logging.Logger, what: str, e: BaseException, *args: object) -> None:
    """Log that ``what`` (a %-format of ``args``) failed with ``e``: one WARNING line when the
    database connection was lost or SQLite stayed locked by another process, else the traceback
    (a fault of ours)."""
    reason = connection_lost(e)
    if reason is not None:
        logger.warning(what + ": the database connection was lost (%s)", *args, reason)
    elif database_locked(e):
        logger.warning(what + ": the SQLite database stayed locked by another process for %g s", *args, BUSY_TIMEOUT)
    else:
        logger.error(what, *args, exc_info=e)


async def _rollback_quietly(session: AsyncSession) -> None:
    with contextlib.suppress(Exception):
        await session.rollback()


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
        cur.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql(begin)


class Database:
    """``target``: the SQLite file (a Path) or a PostgreSQL URL (``Settings.database``).
    ``pool_size``: PostgreSQL connections at most (``FILEDROP_DATABASE_POOL``)."""

    def __init__(self, target: Path | str, pool_size: int = 10) -> None:
        self.target = target
        self.shared = is_postgres(target)  # other processes, maybe on other hosts, use it too
        self.dialect = "postgresql" if self.shared else "sqlite"
        self.path: Path | None = None
        self.locks: Locks
        if self.shared:
            url = async_url(target)
            idle_ms = str(int(IDLE_IN_TRANSACTION * 1000))
            engine = create_async_engine(url, pool_size=pool_size, max_overflow=0, pool_timeout=POOL_TIMEOUT,
                                         pool_pre_ping=True,
                                         connect_args={"server_settings": {"idle_in_transaction_session_timeout": idle_ms}})
            self.writer = self.reader = engine
            self.sync_writer = create_engine(sync_url(target), pool_size=1, max_overflow=0, pool_timeout=60,
                                             pool_pre_ping=True,  # one thread at a time: the recorder's
                                             connect_args={"options": f"-c idle_in_transaction_session_timeout={idle_ms}"})
            unreachable_on_connect(self.writer)
            unreachable_on_connect(self.sync_writer)
            self.locks = AdvisoryLocks(url)
        else:
            db_path = Path(target)
            url = async_url(db_path)
            self.path = db_path
            self.writer = create_async_engine(url, poolclass=AsyncAdaptedQueuePool, pool_size=1, max_overflow=0,
                                              pool_timeout=60)
            self.reader = create_async_engine(url, poolclass=AsyncAdaptedQueuePool, pool_size=4, max_overflow=4)
            _configure(self.writer, "BEGIN IMMEDIATE")
            _configure(self.reader, "BEGIN")
            self.sync_writer = create_engine(sync_url(db_path), pool_size=1, max_overflow=0, pool_timeout=60,
                                             connect_args={"check_same_thread": False})  # one thread at a time
            _configure(self.sync_writer, "BEGIN IMMEDIATE")
            self.sync_reader = create_engine(sync_url(db_path), pool_size=4, max_overflow=4,
                                             connect_args={"check_same_thread": False})  # query()'s threads
            _configure(self.sync_reader, "BEGIN")
            self.locks = FileLocks(db_path)
        self._sync_conn: Connection | None = None  # write_sync()'s, kept (SQLite)
        self._write_sessions = async_sessionmaker(self.writer, expire_on_commit=False)
        self._read_sessions = async_sessionmaker(self.reader, expire_on_commit=False)
        self._listeners: list[Any] = []

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """One write transaction (BEGIN IMMEDIATE): committed on exit, rolled back on error.

        The writer is held from the start of the block, not from its first statement (a session
        connects lazily): what a block reads before its first statement (``utcnow()`` of a sync
        point or a chunk record) is then ordered against every other write."""
        # The sessionmaker's begin() ends the block (commit or rollback, then the connection
        # back to the pool) in a task of its own that a cancel of ours does not interrupt.
        async with self._write_sessions.begin() as session:
            await session.connection()
            yield session

    async def query(self, fn: Callable[[Connection], T]) -> T:
        """``fn(conn)`` in one transaction, rolled back after it (a read: whatever it wrote is
        undone); its result. ``fn`` runs SQLAlchemy Core on a synchronous Connection. SQLite: in
        a thread (one hop for the whole transaction). PostgreSQL: on a pooled asyncpg connection
        (``run_sync``)."""
        if self.shared:
            async with self.reader.connect() as conn:
                return await conn.run_sync(fn)  # rolled back (read only) when the block exits
        return await asyncio.to_thread(self._query_sync, fn)

    def _query_sync(self, fn: Callable[[Connection], T]) -> T:
        with self.sync_reader.connect() as conn:
            return fn(conn)  # its first statement begins; giving the connection back rolls back

    @contextmanager
    def write_sync(self) -> Iterator[Connection]:
        """One write transaction (BEGIN IMMEDIATE) on a synchronous connection: committed on exit,
        rolled back on error. Blocking: call it in a thread, one at a time.

        On SQLite the connection is kept from one call to the next (replaced if the driver
        invalidated it): taking it from the pool and giving it back cost as much as a small
        group's statements. On PostgreSQL each call takes it from the pool, whose ping finds a
        connection the server ended."""
        if self.shared:
            with self.sync_writer.begin() as conn:
                yield conn
            return
        conn = self._sync_conn
        if conn is None or conn.closed or conn.invalidated:
            if conn is not None:
                conn.close()
            conn = self._sync_conn = self.sync_writer.connect()
        with conn.begin():
            yield conn

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A read-only session; its snapshot ends when the block exits."""
        async with self._read_sessions() as session:
            try:
                yield session
            finally:
                # Nothing was written: a rollback that fails (the connection was lost, maybe by
                # the block's own error) changes nothing the block read, and must not replace
                # the block's error (asyncpg: "another operation is in progress"). The pool
                # drops such a connection when the session closes.
                await run_to_completion(_rollback_quietly(session))

    def sync_commits(self) -> None:
        """Make every transaction committed so far power-loss durable (blocking: call it in
        a thread). SQLite connections run ``synchronous=NORMAL``: a commit survives a process
        crash at once, a power loss only once the WAL is next synced (a checkpoint, the uploads'
        syncfs). An answer that promises a durable record calls this first: one fsync.
        PostgreSQL flushed its WAL before the commit returned: nothing to do."""
        if self.path is None:
            return
        try:
            fd = os.open(f"{self.path}-wal", os.O_RDONLY)
        except FileNotFoundError:
            return  # no WAL: every commit is in the main file, synced by the checkpoint
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    async def serialize(self, s: AsyncSession, kind: str, key: str) -> None:
        """Make the transaction of ``s`` the only one about ``key`` (of ``kind``) until it ends:
        PostgreSQL's transaction-level advisory lock (two job starts of one batch id on two
        processes: the second waits, then sees the first). SQLite's single writer already is."""
        if self.shared:
            await s.execute(select(func.pg_advisory_xact_lock(KINDS[kind], func.hashtext(key))))

    async def notify(self, s: AsyncSession, channel: str, payload: str = "") -> None:
        """Tell the listeners of ``channel`` when ``s`` commits (PostgreSQL's NOTIFY; nothing on
        SQLite, whose processes poll)."""
        if self.shared:
            await s.execute(select(func.pg_notify(channel, payload)))

    async def notify_now(self, channel: str, payload: str = "") -> None:
        """``notify`` in a transaction of its own (after a commit that made the work visible)."""
        if self.shared:
            async with self.write() as s:
                await self.notify(s, channel, payload)

    async def listen(self, channel: str, callback: Callable[[], Any]) -> bool:
        """Call ``callback`` (on this loop) whenever ``channel`` is notified, on a connection of
        its own until ``dispose``. False where there is no such thing (SQLite) or the
        connection could not be made (the caller's polling is the fallback)."""
        if not self.shared:
            return False
        import asyncpg

        try:
            conn = await asyncpg.connect(libpq_url(str(self.target)))
            await conn.add_listener(channel, lambda *_args: callback())
        except (OSError, asyncpg.PostgresError) as e:
            log.warning("cannot LISTEN on %s (%s): polling only", channel, e)
            return False
        self._listeners.append(conn)
        return True

    async def dispose(self) -> None:
        for conn in self._listeners:
            with contextlib.suppress(Exception):
                await conn.close()
        self._listeners.clear()
        await self.locks.close()
        await self.writer.dispose()
        if self.reader is not self.writer:
            await self.reader.dispose()
        if self._sync_conn is not None:
            self._sync_conn.close()
            self._sync_conn = None
        self.sync_writer.dispose()
        if not self.shared:
            self.sync_reader.dispose()
