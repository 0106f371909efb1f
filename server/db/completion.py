"""Database calls that must not be cut off half-way by a cancel."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def run_to_completion(aw: Awaitable[T]) -> T:
    """Await ``aw`` in a task of its own, to its end even if the caller is cancelled meanwhile;
    the caller's cancel is raised after (whatever the task's outcome). A shutdown cancels the
    tasks that read and write, and a cancel landing inside a driver's round trip leaves the
    connection mid-call: the pool's rollback of a session's connection on its return then logs
    an error with a traceback and discards it, and the lock connection's next statement finds it
    in use (``locks``). SQLAlchemy ends its own ``async with`` blocks so (``Database.write()``
    uses one); a session's quiet rollback and each statement of the lock connection, this."""
    task = asyncio.ensure_future(aw)
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait((task,))  # (a cancel of the caller does not reach the task)
        except asyncio.CancelledError as e:
            cancelled = e
    if cancelled is not None:
        if not task.cancelled():
            task.exception()  # retrieved: what the caller sees is its cancel
        raise cancelled
    return task.result()
