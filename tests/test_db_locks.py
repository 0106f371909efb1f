"""The PostgreSQL advisory locks (``server/db/locks.py``) when their caller is cancelled."""

from __future__ import annotations

import asyncio
import logging

import pytest
from sqlalchemy import event

from server.config import Settings
from server.db.locks import KINDS, AdvisoryLocks
from server.db.urls import async_url


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
async def test_a_lock_call_cancelled_mid_statement_loses_no_lock_and_leaves_none_behind(
        settings: Settings, caplog) -> None:
    """A shutdown cancels the loops that take and give back locks (the notifier, the janitor,
    assemblies). A cancel landing while the lock connection's statement was on its way left the
    connection mid-call: the next call found it in use, dropped it and with it every lock of the
    process (one ERROR line), and a lock the cut-off statement had taken was held by nobody. Each
    statement now runs to its end; a lock taken for a cancelled caller is given back. The
    connection's ``before_cursor_execute`` event cancels the caller as its statement is sent."""
    url = async_url(settings.database)
    locks, other = AdvisoryLocks(url), AdvisoryLocks(url)
    target: list[asyncio.Task[object]] = []
    statements: list[str] = []

    def cancel_on_execute(_conn, _cursor, statement, *_args) -> None:  # type: ignore[no-untyped-def]
        if target and "advisory" in statement:
            statements.append(statement)
            target.pop().cancel()

    try:
        assert await locks.try_take("notifier")  # held throughout: must not be lost
        epoch = locks.epoch
        event.listen(locks._engine.sync_engine, "before_cursor_execute", cancel_on_execute)

        task = asyncio.ensure_future(locks.try_take("assemble", 7))
        target.append(task)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        assert statements and "pg_try_advisory_lock" in statements[-1], "no statement was cut: the test tested nothing"
        assert await other.try_take("assemble", 7), "the cancelled take left the lock held by nobody"
        await other.release("assemble", 7)

        assert await locks.try_take("assemble", 8)
        task = asyncio.ensure_future(locks.release("assemble", 8))
        target.append(task)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        assert "pg_advisory_unlock" in statements[-1], "no statement was cut: the test tested nothing"
        assert await other.try_take("assemble", 8), "the cancelled release kept the lock"
        await other.release("assemble", 8)

        assert await locks.try_take("janitor")  # the connection is not left mid-call
        assert locks.epoch == epoch, "the lock connection was dropped and made again"
        assert not await other.try_take("notifier"), "the notifier's lock was lost"
        assert (KINDS["notifier"], 0) in locks._held
    finally:
        event.remove(locks._engine.sync_engine, "before_cursor_execute", cancel_on_execute)
        await locks.close()
        await other.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
