"""The single writer: a ``Database.write()`` block is one BEGIN IMMEDIATE transaction that
holds the writer for the whole block."""

from __future__ import annotations

import asyncio
import logging

import pytest

from server.config import Settings
from server.db import Database


async def test_a_write_block_holds_the_writer_before_its_first_statement(settings: Settings) -> None:
    db = Database(settings.db_path)
    try:
        entered = asyncio.Event()

        async def other() -> None:
            async with db.write():
                entered.set()  # e.g. a sync point taking its time under the writer

        async with db.write():
            task = asyncio.ensure_future(other())
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(asyncio.shield(entered.wait()), 0.3)
        await asyncio.wait_for(task, 5)
        assert entered.is_set()
    finally:
        await db.dispose()


async def test_write_sync_keeps_its_sqlite_connection_and_replaces_an_invalidated_one(settings: Settings) -> None:
    """The group commit's connection stays checked out between groups (a checkout per group cost
    as much as its statements); one the driver invalidated is replaced, and a transaction that
    failed is rolled back, not carried into the next."""
    from sqlalchemy import text

    db = Database(settings.db_path)
    try:
        with db.write_sync() as first:
            first.execute(text("CREATE TABLE t (n INTEGER)"))
        with db.write_sync() as second:
            second.execute(text("INSERT INTO t VALUES (1)"))
        assert second is first
        with pytest.raises(RuntimeError), db.write_sync() as conn:
            conn.execute(text("INSERT INTO t VALUES (2)"))
            raise RuntimeError("a failed group")
        first.invalidate()
        with db.write_sync() as third:
            third.execute(text("INSERT INTO t VALUES (3)"))
        assert third is not first
        async with db.read() as s:
            assert (await s.execute(text("SELECT n FROM t ORDER BY n"))).scalars().all() == [1, 3]
    finally:
        await db.dispose()
    assert db._sync_conn is None


@pytest.mark.parametrize("database", ["sqlite", "postgresql"], indirect=True)
async def test_query_runs_a_read_in_one_call_and_undoes_any_write(settings: Settings) -> None:
    """``Database.query``: ``fn`` gets a synchronous connection in a transaction that sees what
    was committed, its result comes back, its error too, and what it wrote is rolled back."""
    from sqlalchemy import text

    db = Database(settings.database)
    try:
        async with db.write() as s:
            await s.execute(text("CREATE TABLE q (n INTEGER)"))
            await s.execute(text("INSERT INTO q VALUES (1), (2)"))

        def read_and_try_to_write(conn) -> list[int]:  # type: ignore[no-untyped-def]
            seen = list(conn.execute(text("SELECT n FROM q ORDER BY n")).scalars())
            conn.execute(text("INSERT INTO q VALUES (3)"))
            return seen

        assert await db.query(read_and_try_to_write) == [1, 2]
        with pytest.raises(ZeroDivisionError):
            await db.query(lambda conn: conn.execute(text("SELECT 1")).scalar() / 0)
        assert await db.query(lambda conn: list(conn.execute(text("SELECT n FROM q ORDER BY n")).scalars())) == [1, 2]
        async with db.read() as s:
            assert (await s.execute(text("SELECT count(*) FROM q"))).scalar() == 2
    finally:
        await db.dispose()


async def test_a_write_that_waits_out_busy_timeout_is_a_503_not_a_500(aiohttp_client, settings: Settings,
                                                                    caplog) -> None:
    """Another process holding SQLite's write lock past busy_timeout (10 s; a worker frozen in
    its publish transaction, seen with SIGSTOP) made a cancel a 500 ERR_INTERNAL with a
    traceback: busy, say so (503 ERR_SERVER_BUSY, Retry-After) in one WARNING line."""
    import sqlite3

    from server.app import create_app
    from tests.conftest import API_KEY

    client = await aiohttp_client(create_app(settings))
    holder = sqlite3.connect(settings.db_path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        r = await client.post("/api/v1/upload", headers={"X-API-Key": API_KEY})
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    body = await r.json()
    assert r.status == 503 and body["code"] == "ERR_SERVER_BUSY", body
    assert "locked by another process" in body["message"] and r.headers["Retry-After"] == "1"
    assert not [rec for rec in caplog.records if rec.levelname == "ERROR" or rec.exc_info]
    r = await client.post("/api/v1/upload", headers={"X-API-Key": API_KEY})  # the lock released: fine again
    assert r.status in (200, 201), await r.text()


@pytest.mark.parametrize("database", ["sqlite", "postgresql"], indirect=True)
async def test_a_task_cancelled_while_its_session_ends_gives_the_connection_back_without_an_error(
        settings: Settings, caplog) -> None:
    """A shutdown cancels the tasks that read and write (the job-expiry loop, the notifier). A
    cancel landing while the pool rolled a session's connection back on its return made
    SQLAlchemy log "Exception during reset or similar" with a traceback (``filedrop serve`` on
    an address it cannot bind printed it now and then). The end of every ``read()`` and
    ``write()`` runs to completion; the cancel is raised after it. The pool's ``reset`` event
    cancels the task at that moment, every time."""
    from sqlalchemy import event, text

    db = Database(settings.database)
    target: list[asyncio.Task[None]] = []

    def cancel_on_reset(_dbapi_conn, _record, _state) -> None:  # type: ignore[no-untyped-def]
        if target:
            target.pop().cancel()

    engines = {id(e): e for e in (db.reader, db.writer)}.values()
    for engine in engines:
        event.listen(engine.sync_engine, "reset", cancel_on_reset)
    try:
        async with db.write() as s:
            await s.execute(text("CREATE TABLE c (n INTEGER)"))

        async def read() -> None:
            async with db.read() as s:
                await s.execute(text("SELECT count(*) FROM c"))

        async def write(fail: bool) -> None:
            async with db.write() as s:
                await s.execute(text("INSERT INTO c VALUES (1)"))
                if fail:
                    raise LookupError("the block's own error")

        for body in (read, lambda: write(False), lambda: write(True)):
            task = asyncio.ensure_future(body())
            target.append(task)
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 10)
            assert not target, "the pool reset no connection: the test tested nothing"
        async with db.read() as s:  # the committed write is there, the failed one is not
            assert (await s.execute(text("SELECT count(*) FROM c"))).scalar() == 1
        for engine in engines:
            assert engine.pool.checkedout() == 0
    finally:
        for engine in engines:
            event.remove(engine.sync_engine, "reset", cancel_on_reset)
        await db.dispose()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text
