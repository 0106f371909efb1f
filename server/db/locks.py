"""Locks that outlive no process: one holder at a time across every process of a deployment.

What they guard (``KINDS``): the janitor (one cleanup pass at a time), the notification loop
(one process sends callbacks and e-mails), the upload service's start (one process at a time
checks for a reboot and forgets what it lost), one assembly of a file (``assemble``, per file
id), and an app process's life (``process``, per process tag: its upload temps are its own
while it lives).

* **PostgreSQL**: session-level advisory locks (``pg_try_advisory_lock(classid, objid)``) on one
  connection of their own per process, in autocommit (no transaction is ever held open). They
  go when the process does: a ``kill -9`` closes the connection and the server drops its locks
  at once; a host that vanishes is noticed by TCP keepalives within about 25 s (set on that
  connection). If the connection itself breaks, every lock of the process is lost with it: the
  next call makes a new connection and ``epoch`` counts up, so a long-lived holder (the
  notifier) can tell that what it took under an older epoch is gone.
* **SQLite** (one app process, one host): ``flock`` on a file beside the database for the
  singletons (the CLI's ``cleanup`` and the server's janitor are two processes), in-process
  sets for the per-item kinds (only the one app process assembles or writes upload temps).

Nothing waits on a lock inside the database: ``held(wait=...)`` polls ``try_take`` under a
deadline, so one lock connection serves every lock of the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from sqlalchemy import func, literal, select
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.pool import NullPool

from server.db.completion import run_to_completion
from server.db.outage import unreachable_on_connect

log = logging.getLogger("filedrop.db")

# classid of each kind: "fd" in the high half keeps clear of other applications sharing the server.
KINDS = {"janitor": 0x66640001, "notifier": 0x66640002, "uploads-start": 0x66640003, "assemble": 0x66640004,
         "process": 0x66640005, "job-start": 0x66640006}  # job-start: transaction locks (Database.serialize)
_SINGLETONS = ("janitor", "notifier", "uploads-start")  # SQLite: flock files (several processes)
POLL = 0.05  # s between tries while waiting for a lock


def _objid(ident: int) -> int:
    return ident & 0x7FFFFFFF  # an int4 (a process tag's 31 bits; file ids are far below)


class Locks:
    """The interface both engines give (see the module docstring)."""

    epoch = 0  # counts the lock connections made (PostgreSQL): locks of an older one are gone

    async def try_take(self, kind: str, ident: int = 0) -> bool:
        raise NotImplementedError

    async def release(self, kind: str, ident: int = 0) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Give up every lock (the process stops)."""

    async def holds(self, kind: str, ident: int = 0) -> bool:
        """Whether this process still holds the lock it took (PostgreSQL: False once the lock
        connection broke, which took the lock with it; a holder that makes no other lock call
        would not learn it otherwise)."""
        raise NotImplementedError

    async def alive(self, kind: str, ident: int) -> bool:
        """True while someone holds the lock (a process lives); False if it could be taken."""
        if await self.try_take(kind, ident):
            await self.release(kind, ident)
            return False
        return True

    @asynccontextmanager
    async def held(self, kind: str, ident: int = 0, *, wait: float | None = 0.0,
                   waiting: Callable[[], None] | None = None) -> AsyncIterator[bool]:
        """Hold the lock for the block: yields True once taken, False if it could not be within
        ``wait`` seconds (None: as long as it takes; ``waiting`` is called once if it must
        wait). Released on exit."""
        deadline = None if wait is None else time.monotonic() + wait
        got = await self.try_take(kind, ident)
        if not got and waiting is not None and wait != 0:
            waiting()
        while not got and (deadline is None or time.monotonic() < deadline):
            await asyncio.sleep(POLL)  # another process holds it: poll under the deadline
            got = await self.try_take(kind, ident)
        try:
            yield got
        finally:
            if got:
                await self.release(kind, ident)


class AdvisoryLocks(Locks):
    """PostgreSQL advisory locks on a connection of their own."""

    def __init__(self, url: URL) -> None:
        self._engine = create_async_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        unreachable_on_connect(self._engine)
        self._conn: AsyncConnection | None = None
        self._mutex = asyncio.Lock()
        self._held: set[tuple[int, int]] = set()

    async def _connection(self) -> AsyncConnection:
        if self._conn is None:
            conn = await self._engine.connect()
            # A host that vanishes (no FIN) must not keep its locks for the kernel's 2 hours.
            for name, value in (("tcp_keepalives_idle", "10"), ("tcp_keepalives_interval", "5"),
                                ("tcp_keepalives_count", "3")):
                await conn.execute(select(func.set_config(name, value, False)))
            self._conn = conn
            self.epoch += 1
        return self._conn

    async def _call(self, fn: object, key: tuple[int, int]) -> bool:
        try:
            conn = await self._connection()
            return bool(await conn.scalar(select(fn(*key))))  # type: ignore[operator]
        except Exception:
            # The connection broke: the server dropped every lock it held.
            if self._held:
                log.error("the lock connection to the database broke: %d lock(s) lost", len(self._held))
            self._held.clear()
            conn, self._conn = self._conn, None
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.invalidate()
            raise

    async def _take(self, key: tuple[int, int]) -> bool:
        async with self._mutex:
            if key in self._held:  # session locks stack; ours are taken once
                return False
            got = await self._call(func.pg_try_advisory_lock, key)
            if got:
                self._held.add(key)
            return got

    async def _release(self, key: tuple[int, int]) -> None:
        async with self._mutex:
            if key not in self._held:
                return
            self._held.discard(key)
            with contextlib.suppress(Exception):  # a broken connection released it already
                await self._call(func.pg_advisory_unlock, key)

    # Each statement runs to its end even if the caller is cancelled meanwhile (a shutdown
    # cancels the loops that hold locks): one cut off mid-way would leave the connection busy,
    # so that the next call dropped it and every lock of the process with it, and a lock taken
    # for a caller that never learns it would be held by nobody until the process ends.
    async def try_take(self, kind: str, ident: int = 0) -> bool:
        key = (KINDS[kind], _objid(ident))
        take = asyncio.ensure_future(self._take(key))
        try:
            return await run_to_completion(take)
        except asyncio.CancelledError:
            if take.done() and not take.cancelled() and take.exception() is None and take.result():
                await run_to_completion(self._release(key))  # the caller will never hold it
            raise

    async def release(self, kind: str, ident: int = 0) -> None:
        await run_to_completion(self._release((KINDS[kind], _objid(ident))))

    async def holds(self, kind: str, ident: int = 0) -> bool:
        return await run_to_completion(self._holds((KINDS[kind], _objid(ident))))

    async def _holds(self, key: tuple[int, int]) -> bool:
        async with self._mutex:
            if key not in self._held or self._conn is None:  # never taken, or its connection is gone
                return False
            try:  # a session lock lives as long as its session: the connection answering is the proof
                await self._call(lambda *_key: literal(1), key)
            except Exception:  # _call said so and forgot every lock
                return False
            return True

    async def close(self) -> None:
        self._held.clear()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None
        await self._engine.dispose()


class FileLocks(Locks):
    """SQLite: ``flock`` on ``<database>.<kind>.lock`` for the singletons, in-process for the rest."""

    def __init__(self, db_path: Path) -> None:
        self._base = db_path
        self._fds: dict[str, int] = {}
        self._local: set[tuple[str, int]] = set()

    async def try_take(self, kind: str, ident: int = 0) -> bool:
        KINDS[kind]  # noqa: B018  (an unknown kind is a KeyError on both engines)
        if kind not in _SINGLETONS:
            if (kind, ident) in self._local:
                return False
            self._local.add((kind, ident))
            return True
        if kind in self._fds:
            return False
        path = self._base.with_name(f"{self._base.name}.{kind}.lock")
        fd = await asyncio.to_thread(os.open, path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fds[kind] = fd
        return True

    async def holds(self, kind: str, ident: int = 0) -> bool:
        return kind in self._fds if kind in _SINGLETONS else (kind, ident) in self._local

    async def release(self, kind: str, ident: int = 0) -> None:
        if kind not in _SINGLETONS:
            self._local.discard((kind, ident))
            return
        fd = self._fds.pop(kind, None)
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock

    async def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._local.clear()
