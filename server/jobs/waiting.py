"""Jobs that wait for their data (``data_upload=url``, seed 004's flow).

A start without rows makes the job ``Waiting for data`` with ``data_expires``, the expiry of its
signed upload URL. The one PUT of the rows to that URL (``receive``) validates them as a start
does, inserts them and makes the job ``Queued`` in one transaction; from then on it runs like any
other. A job nobody sent data to before its expiry is ended ``Expired`` (``expire_due``, run by
``expire_loop`` in every API process), with its notifications, like any other end.

Invariants:
* Data lands at most once: the rows are inserted in the transaction whose conditional UPDATE
  (``status = 'Waiting for data' AND data_expires > now``) moves the job on; a second PUT, or one
  that finishes after the expiry, changes nothing (409 ``ERR_DATA_RECEIVED``, 403 ``ERR_URL_EXPIRED``).
  The expiry counts when the data has arrived, not when its request began.
* Expiring is one conditional UPDATE too: a job ends Expired once, whichever process sees it first,
  and never after its data arrived.
* Portable SQL (SQLite now, PostgreSQL next): plain comparisons on ``data_expires``, ``CASE``, and
  ``UPDATE ... RETURNING``; nothing is kept in a process's memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import case, insert, select, update

from server.db import Database, log_failure, utcnow
from server.db.job_models import Job, JobLog, JobRow
from server.errors import DataReceived, JobNotFound, JobNotWaiting, UrlExpired
from server.jobs.queries import add_log, insert_rows
from server.jobs.states import EXPIRED, WAITING, iso

log = logging.getLogger("filedrop.jobs.waiting")

EXPIRE_POLL = 1.0  # seconds between looks for waiting jobs whose upload URL has expired
EXPIRE_BATCH = 500  # jobs ended per transaction
ROWS = JobRow.__table__


@dataclass(frozen=True)
class Received:
    """A waiting job that got its rows: what the caller needs to launch it."""

    job_id: str
    errored: int
    max_errors: int | None


async def owner_of(db: Database, batch_id: str, job_id: str) -> str | None:
    """Who ``job_id`` of ``batch_id`` belongs to (None: no such job): the owner a signed URL of
    the job acts for."""
    async with db.read() as s:
        return await s.scalar(select(Job.owner).where(Job.job_id == job_id, Job.batch_id == batch_id))


def _refusal(job: Job) -> Exception:
    """Why ``job`` takes no data now."""
    if job.status in (EXPIRED, WAITING):
        return UrlExpired(f"the upload URL of job {job.job_id} expired at {iso(job.data_expires)} before its "
                          "data arrived: start a new job")
    if job.data_expires is not None and job.total_count:
        return DataReceived(f"the data of job {job.job_id} arrived already (status {job.status}): an upload "
                            "URL takes one PUT")
    if job.data_expires is None:
        return JobNotWaiting(f"job {job.job_id} was started with its rows: it waits for no data")
    return JobNotWaiting(f"job {job.job_id} ended ({job.status}) before its data arrived")


async def receive(db: Database, owner: str, batch_id: str, job_id: str, records: list[tuple[object, ...]],
                  problems: list[str]) -> Received:
    """Insert the rows of a waiting job (prepared by ``service.prepare_rows``: ``problems`` are
    the log lines of bad rows) and make it ``Queued``, all in one transaction. JobNotFound;
    DataReceived / JobNotWaiting / UrlExpired when it is not waiting any more."""
    now = utcnow()
    async with db.write() as s:
        job = await s.scalar(select(Job).where(Job.job_id == job_id, Job.batch_id == batch_id, Job.owner == owner))
        if job is None:
            raise JobNotFound(f"no job {job_id!r} in batch {batch_id!r}")
        errored = len(problems)
        moved = await s.execute(update(Job).where(Job.job_id == job_id, Job.status == WAITING, Job.data_expires > now)
                                .values(status="Queued", total_count=len(records), errored_count=errored))
        if not moved.rowcount:
            raise _refusal(job)
        await insert_rows(s, records)
        entries = [f"data received: {len(records)} rows" + (f", {errored} invalid" if errored else "")
                   + "; queued"] + problems
        await s.execute(insert(JobLog), [{"job_id": job_id, "at": now, "level": "error" if i else "info",
                                          "message": m} for i, m in enumerate(entries)])
        return Received(job_id, errored, job.max_errors)


async def check_waiting(db: Database, owner: str, batch_id: str, job_id: str) -> None:
    """Raise (as ``receive`` would) unless the job waits for data now: checked before the body
    is parsed, so a second PUT is refused without parsing 50 MB for nothing."""
    now = utcnow()
    async with db.read() as s:
        job = await s.scalar(select(Job).where(Job.job_id == job_id, Job.batch_id == batch_id, Job.owner == owner))
        if job is None:
            raise JobNotFound(f"no job {job_id!r} in batch {batch_id!r}")
        if job.status != WAITING or job.data_expires is None or job.data_expires <= now:
            raise _refusal(job)


async def expire_due(db: Database) -> list[str]:
    """End ``Expired`` every job still waiting for data past its upload URL's expiry (one
    conditional UPDATE; notifications pending as for any end). Returns the jobs ended."""
    now = utcnow()
    async with db.read() as s:
        due = list((await s.scalars(select(Job.job_id).where(Job.status == WAITING, Job.data_expires <= now)
                                    .limit(EXPIRE_BATCH))).all())
    if not due:
        return []
    async with db.write() as s:
        res = await s.execute(
            update(Job).where(Job.job_id.in_(due), Job.status == WAITING, Job.data_expires <= now)
            .values(status=EXPIRED, finished=now, reason="no data arrived before the upload URL expired",
                    callback_state=case((Job.callback_url.is_not(None), "pending"), else_="none"),
                    email_state=case((Job.callback_emails.is_not(None), "pending"), else_="none"))
            .returning(Job.job_id, Job.data_expires))
        ended = res.all()
        for job_id, expires in ended:
            await add_log(s, job_id, [("info", f"Expired: no data arrived before the upload URL expired at "
                                               f"{iso(expires)}")])
    return [job_id for job_id, _ in ended]


async def expire_loop(db: Database, woken: Callable[[], None]) -> None:
    """Owned task of the API process: every ``EXPIRE_POLL`` s, end the waiting jobs whose URL
    has expired and wake the notifier (``woken``) for them. A failed round is logged and the
    next one runs."""
    while True:
        try:
            ended = await expire_due(db)
            if ended:
                log.info("%d job(s) ended Expired: no data before their upload URL expired (%s)", len(ended),
                         ", ".join(ended[:10]))
                woken()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the database busy, say: look again next round
            log_failure(log, "expiring jobs that wait for data failed", e)
        await asyncio.sleep(EXPIRE_POLL)  # the period of the sweep (production pace, not a test wait)
