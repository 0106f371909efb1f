"""Removing file rows outside the group commit (the janitor, the restore after a reboot).

A file row's delete updates its batch's counts (migration 0005's trigger on ``batch_files``),
which locks the batch row after the file row. The group commit (``ledger``), a drop and a
file's removal lock the batch row first. So here too the batches are locked first, in id order
(PostgreSQL; SQLite's single writer needs nothing): one order everywhere, no deadlock.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from server.db.models import Batch, BatchFile


async def delete_files(s: AsyncSession, *where: ColumnElement[bool]) -> int:
    """Delete the file rows matching ``where`` in ``s``'s transaction, their batches' rows locked
    first; how many were deleted."""
    await s.execute(select(Batch.id).where(Batch.id.in_(select(BatchFile.batch_pk).where(*where)))
                    .order_by(Batch.id).with_for_update(key_share=True))
    res: Any = await s.execute(delete(BatchFile).where(*where))
    return int(res.rowcount)
