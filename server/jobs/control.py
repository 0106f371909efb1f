"""Cancelling and ending jobs, the same way for everyone who does it: a worker (its job is done,
or ``max_errors`` was exceeded), the API (cancel), the janitor and ``filedrop drop --force``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from server.config import Settings
from server.db import Database
from server.jobs import assets, queries
from server.jobs.publish import remove_stale_temps
from server.jobs.states import FINISHED

log = logging.getLogger("filedrop.jobs")

END_POLL = 0.05  # how often a canceller looks whether the workers have ended the job


async def end(db: Database, settings: Settings, job_id: str, *, failed: str | None = None,
              forced: str | None = None) -> queries.Finished | None:
    """End ``job_id`` if nothing holds it any more (see ``queries.finish``), then release its
    fetched assets. None while it still has work, or once it has ended already."""
    done = await queries.finish(db, job_id, failed=failed, forced=forced)
    if done is not None:
        await asyncio.to_thread(assets.release, settings, job_id)
        (log.error if failed else log.info)("job %s %s", job_id, done.summary)
    return done


async def cancel(db: Database, settings: Settings, job_ids: Sequence[str], reason: str,
                 level: str = "info") -> list[str]:
    """Ask running jobs to stop (their pending rows are skipped at once) and end those no
    worker holds a row of; workers holding rows stop rendering (a render mid-row is killed)
    and end the others. Returns the jobs that were running."""
    hit = await queries.request_cancel(db, job_ids, reason, level)
    for job_id in hit:
        await end(db, settings, job_id)
    return hit


async def forget_worker(db: Database, settings: Settings, worker_id: str) -> list[tuple[str, str]]:
    """A worker is gone: remove the temp files it left (they carry its id), then hand its rows
    back. In that order: once its rows are back in the queue another worker may finish their
    job, and a job that ended has no temp file left. Returns (job_id, batch_id) of the jobs it
    held rows of."""
    assert settings.smartlink_root is not None
    for _job_id, batch_id in await queries.held_by(db, worker_id):
        n = await asyncio.to_thread(remove_stale_temps, settings.smartlink_root / batch_id, worker_id)
        if n:
            log.info("removed %d temp file(s) worker %s left in %s/", n, worker_id, batch_id)
    return await queries.release_worker(db, worker_id)


async def wait_ended(db: Database, job_ids: Sequence[str], timeout: float) -> list[str]:
    """Wait up to ``timeout`` s for the jobs to reach an end state; those still running."""
    deadline = time.monotonic() + timeout
    while True:
        still = [j for j in job_ids if (await queries.job_state(db, j) or ("Completed", False))[0] not in FINISHED]
        if not still or time.monotonic() >= deadline:
            return still
        await asyncio.sleep(END_POLL)  # the workers end the job; poll under a deadline
