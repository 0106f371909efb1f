"""The single writer: a ``Database.write()`` block is one BEGIN IMMEDIATE transaction that
holds the writer for the whole block."""

from __future__ import annotations

import asyncio

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
