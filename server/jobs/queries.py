"""Every change of a job's rows and state, as SQLAlchemy Core on the models: claim, mark,
hand back, cancel, finish. Workers, the API, the janitor and ``filedrop drop`` all go through
these, so a job moves the same way whoever moves it.

Invariants:
* A row is claimed by one conditional ``UPDATE ... WHERE status='pending' ... RETURNING`` that
  names the worker (``claimed_by``): two workers never get the same row. Every later change of a
  claimed row checks ``status='claimed' AND claimed_by=<that worker>``, so a worker whose rows
  were handed back (it was declared dead) changes nothing.
* Row statuses and the job's counts change in the same transaction, so they never drift.
* A job ends exactly once (a conditional UPDATE on its running status), and only when no row is
  claimed: nobody still holds a row that could be published after the end. A cancelled job
  skips its pending rows at once, so no worker claims them.
* Portable SQL (SQLite and PostgreSQL): no engine-only functions. On PostgreSQL (READ
  COMMITTED, several processes) every transaction that changes a job's rows locks the job row
  first (``FOR NO KEY UPDATE``, jobs in id order), then its rows: one lock order, no deadlock.
  A claim picks its rows with ``FOR UPDATE SKIP LOCKED``. SQLite ignores the locking clauses:
  its single writer (``BEGIN IMMEDIATE``) already runs these transactions one at a time.
* Text from a client or a template (errors, log lines) never holds NUL, which PostgreSQL's
  text refuses: it is stored as ``\x00``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any, NamedTuple

from sqlalchemy import Select, Update, bindparam, delete, exists, func, insert, or_, select, update
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncSession

from server.db import Database, utcnow
from server.db.job_models import Job, JobLog, JobRow, JobWorker
from server.errors import JobRunning
from server.jobs.states import ACTIVE, JOB_JSON_COLUMNS, RUNNING, WAITING, job_json, row_label

ROWS = JobRow.__table__
BATCH = 500  # ids per IN (...) list
JOBS_CHANNEL = "filedrop_jobs"  # PostgreSQL NOTIFY channel: a job was queued (workers LISTEN)


# A new row as ``insert_rows`` takes it: a tuple in this order (claimed_by: NULL).
NEW_ROW = ("job_id", "idx", "reference_id", "suffix", "pdf", "data", "status", "error", "attempts")
INSERT_CHUNK = 5000  # rows per executemany
_insert_sql: dict[str, str] = {}


def _row_insert(dialect: Dialect) -> str:
    """``INSERT INTO job_rows (NEW_ROW...) VALUES (...)`` compiled from the model for
    ``dialect``, with positional placeholders in NEW_ROW's order."""
    sql = _insert_sql.get(dialect.name)
    if sql is None:
        compiled = insert(ROWS).values({c: bindparam(c) for c in NEW_ROW}).compile(dialect=dialect)
        if tuple(compiled.positiontup or ()) != NEW_ROW:
            raise RuntimeError(f"{dialect.name}: the row insert is not positional in NEW_ROW's order")
        sql = _insert_sql[dialect.name] = compiled.string
    return sql


async def insert_rows(s: AsyncSession, rows: Sequence[tuple[Any, ...]]) -> None:
    """Insert a job's new rows (tuples in NEW_ROW's order) in ``s``'s transaction. Parameters
    go to the driver's executemany as they are (the columns are plain text and integers: nothing
    to convert): 10,000 rows took 58-96 ms through SQLAlchemy's per-row processing of a dict a
    row, 30-48 ms as tuples."""
    conn = await s.connection()
    sql = _row_insert(conn.dialect)
    for i in range(0, len(rows), INSERT_CHUNK):
        await conn.exec_driver_sql(sql, list(rows[i:i + INSERT_CHUNK]))


class Claimed(NamedTuple):
    """A row a worker holds (a named tuple: 10,000 made in 3 ms, as a frozen dataclass in 11)."""

    idx: int
    reference_id: str
    suffix: str
    pdf: str | None
    data: str  # the row's JSON
    attempts: int


@dataclass
class Outcome:
    """What a worker learnt about claimed rows. ``retry``: a limit killed the render; the row
    goes back to the queue with one more attempt. ``release``: back without an attempt (the
    worker is stopping). ``skip``: the job was cancelled before they were rendered."""

    done: list[int]
    errors: list[tuple[int, str, str]]  # (idx, reference_id, message)
    retry: list[int]
    release: list[int]
    skip: list[int]

    @classmethod
    def empty(cls) -> Outcome:
        return cls([], [], [], [], [])

    def __bool__(self) -> bool:
        return bool(self.done or self.errors or self.retry or self.release or self.skip)


@dataclass(frozen=True)
class Counts:
    succeeded: int
    errored: int
    max_errors: int | None


def storable(value: str) -> str:
    """``value`` storable as text on both engines (PostgreSQL refuses NUL)."""
    return value.replace("\x00", "\\x00") if "\x00" in value else value


async def lock_jobs(s: AsyncSession, job_ids: Sequence[str]) -> list[str]:
    """Lock the job rows (PostgreSQL; nothing on SQLite) before their rows are changed, in id
    order; the ids that exist."""
    if not job_ids:
        return []
    return list((await s.scalars(select(Job.job_id).where(Job.job_id.in_(sorted(set(job_ids))))
                                 .order_by(Job.job_id).with_for_update(key_share=True))).all())


async def add_log(s: AsyncSession, job_id: str, entries: Sequence[tuple[str, str]]) -> None:
    if entries:
        now = utcnow()
        await s.execute(insert(JobLog), [{"job_id": job_id, "at": now, "level": lv, "message": storable(m)}
                                         for lv, m in entries])


async def note(db: Database, job_id: str, level: str, message: str) -> None:
    async with db.write() as s:
        await add_log(s, job_id, [(level, message)])


def _mine(job_id: str, worker_id: str) -> Any:
    return (ROWS.c.job_id == job_id) & (ROWS.c.status == "claimed") & (ROWS.c.claimed_by == worker_id)


def _among(ids: Iterable[int]) -> Iterable[Any]:
    """Conditions that together select exactly the rows ``ids``, each of at most ``BATCH``
    parameters: a run of consecutive indexes (the usual group of done rows) is one range, the
    rest go in ``IN`` lists. One statement per condition: for a group of 2,000 rows of one claim
    that is one statement, not four ``IN`` lists of 500 to compile and bind (each statement costs
    a worker about 1 ms of CPU through the async driver)."""
    pieces: list[tuple[Any, int]] = []  # (condition, its parameters)
    loose: list[int] = []
    for _step, run in groupby(enumerate(sorted(set(ids))), lambda p: p[1] - p[0]):
        idxs = [idx for _i, idx in run]
        if len(idxs) >= 3:
            pieces.append((ROWS.c.idx.between(idxs[0], idxs[-1]), 2))
        else:
            loose += idxs
    pieces += [(ROWS.c.idx.in_(loose[k:k + BATCH]), len(loose[k:k + BATCH])) for k in range(0, len(loose), BATCH)]
    parts: list[Any] = []
    used = 0
    for cond, cost in pieces:
        if parts and used + cost > BATCH:
            yield or_(*parts)
            parts, used = [], 0
        parts.append(cond)
        used += cost
    if parts:
        yield or_(*parts)


# ---- claims ------------------------------------------------------------------------------------


async def running_jobs(db: Database) -> list[str]:
    """Jobs a worker may have work for (or may finish), oldest first."""
    async with db.read() as s:
        return list((await s.scalars(select(Job.job_id).where(Job.status.in_(RUNNING))
                                     .order_by(Job.created_at))).all())


def _pending_from(job_id: str, claim_from: int) -> Any:
    """The job's pending rows, from its claim cursor on (its primary key's range): no pending row
    is below the cursor, since whatever goes back to pending (a retry, a release, a hand-back)
    resets it to 0."""
    return (ROWS.c.job_id == job_id) & (ROWS.c.idx >= claim_from) & (ROWS.c.status == "pending")


async def claim_rows(db: Database, job_id: str, worker_id: str, n: int) -> list[Claimed]:
    """Up to ``n`` pending rows of a running, not cancelled job, in index order, now held by
    ``worker_id``. The first claim moves the job to ``In progress``."""
    async with db.write() as s:
        job = (await s.execute(select(Job.status, Job.cancel_requested, Job.claim_from)
                               .where(Job.job_id == job_id).with_for_update(key_share=True))).first()
        if job is None or job.status not in RUNNING or job.cancel_requested:
            return []
        # A CTE, evaluated once. As an ``IN (subquery)`` PostgreSQL may run the subquery again
        # for each row of a nested-loop semi-join, each run skipping the rows this statement
        # just updated (SKIP LOCKED): the claim took every pending row of the job, not ``n``.
        todo = (select(ROWS.c.idx).where(_pending_from(job_id, job.claim_from))
                .order_by(ROWS.c.idx).limit(n).with_for_update(skip_locked=True).cte("todo"))
        res = await s.execute(
            update(ROWS).where(ROWS.c.job_id == job_id, ROWS.c.idx.in_(select(todo.c.idx)), ROWS.c.status == "pending")
            .values(status="claimed", claimed_by=worker_id)
            .returning(ROWS.c.idx, ROWS.c.reference_id, ROWS.c.suffix, ROWS.c.pdf, ROWS.c.data, ROWS.c.attempts))
        rows = sorted(map(Claimed._make, res.all()), key=lambda r: r.idx)
        if rows:
            await s.execute(update(Job).where(Job.job_id == job_id).values(claim_from=rows[-1].idx + 1))
            if job.status == "Queued":  # (once In progress, a job never goes back to Queued)
                began = await s.execute(update(Job).where(Job.job_id == job_id, Job.status == "Queued")
                                        .values(status="In progress"))
                if began.rowcount:
                    await add_log(s, job_id, [("info", "in progress")])
        return rows


async def record(db: Database, job_id: str, worker_id: str, out: Outcome) -> Counts | None:
    """Apply a worker's outcome for rows it holds, the job's counts and the log, in one
    transaction. None if the job is gone (dropped)."""
    n_done = n_errors = 0
    async with db.write() as s:
        await lock_jobs(s, [job_id])
        for among in _among(out.done):
            res = await s.execute(update(ROWS).where(_mine(job_id, worker_id), among)
                                  .values(status="done", claimed_by=None))
            n_done += res.rowcount
        logged: list[tuple[str, str]] = []
        for idx, ref, message in out.errors:
            res = await s.execute(update(ROWS).where(_mine(job_id, worker_id), ROWS.c.idx == idx)
                                  .values(status="error", error=storable(message), claimed_by=None))
            if res.rowcount:
                n_errors += 1
                logged.append(("error", f"{row_label(idx, ref)}: {message}"))
        back = False
        for among in _among(out.retry):
            res = await s.execute(update(ROWS).where(_mine(job_id, worker_id), among)
                                  .values(status="pending", claimed_by=None, attempts=ROWS.c.attempts + 1))
            back = back or bool(res.rowcount)
        for among in _among(out.release):
            res = await s.execute(update(ROWS).where(_mine(job_id, worker_id), among)
                                  .values(status="pending", claimed_by=None))
            back = back or bool(res.rowcount)
        for among in _among(out.skip):
            await s.execute(update(ROWS).where(_mine(job_id, worker_id), among)
                            .values(status="skipped", claimed_by=None))
        if back:
            await s.execute(update(Job).where(Job.job_id == job_id).values(claim_from=0))
        res = await s.execute(update(Job).where(Job.job_id == job_id).values(
            succeeded_count=Job.succeeded_count + n_done, errored_count=Job.errored_count + n_errors)
            .returning(Job.succeeded_count, Job.errored_count, Job.max_errors))
        row = res.first()
        await add_log(s, job_id, logged if row is not None else [])
    return None if row is None else Counts(*row)


# ---- cancel and finish -------------------------------------------------------------------------


async def request_cancel(db: Database, job_ids: Sequence[str], reason: str, level: str = "info") -> list[str]:
    """Cancel running jobs (and jobs waiting for their data): ``cancel_requested`` set, pending
    rows skipped (no worker claims them any more), one log line. Workers holding rows see the flag, stop (killing a render
    mid-row) and finish the job. Returns the jobs that were running and not cancelled yet."""
    async with db.write() as s:
        await lock_jobs(s, job_ids)
        res = await s.execute(update(Job).where(Job.job_id.in_(job_ids), Job.status.in_(ACTIVE),
                                                Job.cancel_requested.is_(False))
                              .values(cancel_requested=True, reason=reason).returning(Job.job_id, Job.claim_from))
        hit = list(res.all())
        for job_id, claim_from in hit:
            await s.execute(skip_pending(job_id, claim_from))
            await add_log(s, job_id, [(level, f"cancelling: {reason}")])
    return [job_id for job_id, _ in hit]


def skip_pending(job_id: str, claim_from: int) -> Update:
    """A cancelled job's pending rows -> skipped, looked for as claims look (``_pending_from``):
    the rows done below the claim cursor are not read."""
    return update(ROWS).where(_pending_from(job_id, claim_from)).values(status="skipped")


@dataclass(frozen=True)
class Finished:
    job_id: str
    status: str
    summary: str


def pending_left(job_id: str, claim_from: int) -> Select[tuple[bool]]:
    """Whether the job has a pending row, looked for as claims look (``_pending_from``)."""
    return select(exists().where(_pending_from(job_id, claim_from)))


async def finish(db: Database, job_id: str, *, failed: str | None = None, forced: str | None = None) -> Finished | None:
    """End a running job, or do nothing (None) while it still has work: a claimed row, or
    (not cancelled) a pending one. ``failed``: it cannot go on (status Failed, that reason).
    ``forced``: cancelled by someone who waited for its workers in vain (``drop --force``); its
    claimed rows are skipped too. Rows not done become ``skipped``."""
    now = utcnow()
    async with db.write() as s:
        job = await s.get(Job, job_id, with_for_update={"key_share": True})
        if job is None or job.status not in ACTIVE:
            return None
        final = failed is not None or forced is not None
        if job.status == WAITING and not (final or job.cancel_requested):
            return None  # no rows yet is not done: it waits for its data (or ends Expired)
        if not final:
            # Pending rows first, from the claim cursor, as claims look for them: mid-job there
            # are some, found at once. Only then the claimed rows, which no index finds (see
            # ``JobRow``): a look through the job's rows, once its last ones are claimed. Asked
            # the other way round, every worker's end of a claim paid that look mid-job (0.35 s
            # in the writer at 500,000 done rows of a million).
            if not job.cancel_requested and await s.scalar(pending_left(job_id, job.claim_from)):
                return None
            if await s.scalar(select(exists().where(ROWS.c.job_id == job_id, ROWS.c.status == "claimed"))):
                return None
        if final:
            # Claimed rows too, which no index finds: a look through the job's rows (a job that
            # failed, or a ``drop --force`` that waited in vain).
            await s.execute(update(ROWS).where(ROWS.c.job_id == job_id, ROWS.c.status.in_(("pending", "claimed")))
                            .values(status="skipped", claimed_by=None))
        elif job.cancel_requested:
            # Cancelled, and no row claimed (asked above): what is open is pending, found from
            # the claim cursor as claims find it.
            await s.execute(skip_pending(job_id, job.claim_from))
        if failed is not None:
            status, reason = "Failed", failed
        elif forced is not None or job.cancel_requested:
            status = "Cancelled"
            reason = (job.reason or "cancelled") + (f" ({forced})" if forced else "")
        else:
            status = "Completed with errors" if job.errored_count else "Completed"
            reason = None
        await s.execute(update(Job).where(Job.job_id == job_id, Job.status.in_(ACTIVE)).values(
            status=status, finished=now, reason=reason, started=func.coalesce(Job.started, now),
            callback_state="pending" if job.callback_url else "none",
            email_state="pending" if job.callback_emails else "none"))
        # Every row is done, errored or skipped now, and the counts count the first two (each is
        # moved with the rows, under this lock), so the rest were skipped: no count of the rows.
        skipped = job.total_count - job.succeeded_count - job.errored_count
        summary = (f"{status}: {job.succeeded_count} succeeded, {job.errored_count} errored, "
                   f"{skipped} skipped of {job.total_count}" + (f" ({reason})" if reason else ""))
        await add_log(s, job_id, [("error" if failed else "info", summary)])
    return Finished(job_id, status, summary)


# ---- drop ----------------------------------------------------------------------------------------

# A dropped job whose notification is still to be sent: ``filedrop drop`` keeps its job row with
# this as ``batch_id`` and ``owner`` (a dot is in no batch id, and an owner is a SHA-256 in hex),
# so no API path, list, start check or cleanup of a batch ever sees it: every one of them asks
# for a batch id, or an owner, or both. ``template`` holds the job JSON it ended with (its batch
# id included); the notifier sends that and then deletes the row.
DROPPED = ".dropped"
OPEN = ("pending", "sending")  # a notification still to be sent (or being sent)


def unsent() -> Any:
    """Jobs with a notification still to be sent."""
    return or_(Job.callback_state.in_(OPEN), Job.email_state.in_(OPEN))


async def drop_batch(db: Database, batch_id: str,
                     away: Callable[[], Any] | None = None) -> tuple[list[str], list[str], Any]:
    """Remove the jobs of ``batch_id`` (job, rows, log) in one transaction, except what a
    notification still needs: a job whose callback or e-mails are still to be sent becomes a
    tombstone (``DROPPED``: unreachable by every API; its rows and log go, its end-state JSON is
    frozen in ``template``), which the notifier deletes once it has sent them. So a drop loses
    no notification, even with no server running (the next one sends it), and the callback of a
    job is taken and sent by the notifier alone, as for any other job.

    The transaction is the batch's start lock (``serialize``, as a start takes): a job started
    since the caller's check (it holds the batch) makes it raise JobRunning, changing nothing,
    and ``away`` (blocking; the caller's move of the batch's folder out of reach) runs before it
    commits, so a start after the drop finds neither the jobs nor the folder, and its pages are
    never in the folder being removed. Returns (the batch's job ids, those kept as tombstones,
    what ``away`` returned)."""
    async with db.write() as s:
        await db.serialize(s, "job-start", batch_id)
        ids = list((await s.scalars(select(Job.job_id).where(Job.batch_id == batch_id))).all())
        await lock_jobs(s, ids)
        started = (await s.scalars(select(Job.job_id).where(Job.batch_id == batch_id, Job.status.in_(ACTIVE)))).all()
        if started:
            raise JobRunning(f"smartlink batch {batch_id!r} has running job(s) {', '.join(started)}, started "
                             "after the drop began: nothing was dropped; retry (with --force to cancel them)")
        kept = (await s.execute(select(*JOB_JSON_COLUMNS).where(Job.batch_id == batch_id, unsent()))).all()
        for job in kept:
            await s.execute(update(Job).where(Job.job_id == job.job_id).values(
                batch_id=DROPPED, owner=DROPPED, upload_batch_id=None, params="{}",
                template=json.dumps(job_json(job), ensure_ascii=False, separators=(",", ":"))))
        kept_ids = [j.job_id for j in kept]
        for among in _chunks(kept_ids):
            await s.execute(delete(ROWS).where(ROWS.c.job_id.in_(among)))
            await s.execute(delete(JobLog).where(JobLog.job_id.in_(among)))
        await s.execute(delete(Job).where(Job.batch_id == batch_id))
        moved = await asyncio.to_thread(away) if away is not None else None
    return ids, kept_ids, moved


def _chunks(ids: Sequence[str]) -> Iterable[Sequence[str]]:
    return (ids[i:i + BATCH] for i in range(0, len(ids), BATCH))


def forget_dropped_stmt(job_id: str) -> Any:
    """Delete the tombstone (``DROPPED``) of ``job_id`` once its notifications are settled (sent,
    failed, none); nothing for any other job."""
    return delete(Job).where(Job.job_id == job_id, Job.batch_id == DROPPED, ~unsent())


async def holds(db: Database, job_id: str, worker_id: str, idxs: Sequence[int]) -> bool:
    """True while ``worker_id`` holds every row ``idxs`` of ``job_id`` (none was handed back)."""
    held = 0
    async with db.read() as s:
        for among in _among(idxs):
            held += await s.scalar(select(func.count()).select_from(ROWS).where(_mine(job_id, worker_id), among)) or 0
    return held == len(set(idxs))


async def any_published(db: Database) -> bool:
    """Whether a job of this database has published a page (a succeeded row)."""
    async with db.read() as s:
        return await s.scalar(select(exists().where(Job.succeeded_count > 0))) is True


async def job_state(db: Database, job_id: str) -> tuple[str, bool] | None:
    """(status, cancel_requested) of a job, or None once it is gone: what a worker checks
    while it renders."""
    async with db.read() as s:
        row = (await s.execute(select(Job.status, Job.cancel_requested).where(Job.job_id == job_id))).first()
    return None if row is None else (row[0], bool(row[1]))


# ---- workers -------------------------------------------------------------------------------------


async def register_worker(db: Database, worker_id: str, host: str, pid: int) -> None:
    now = utcnow()
    async with db.write() as s:
        await s.execute(delete(JobWorker).where(JobWorker.worker_id == worker_id))
        await s.execute(insert(JobWorker).values(worker_id=worker_id, host=host, pid=pid, started_at=now,
                                                 seen_at=now))


async def heartbeat(db: Database, worker_id: str) -> bool:
    """Refresh the worker's ``seen_at``; False if it was declared dead meanwhile."""
    async with db.write() as s:
        res = await s.execute(update(JobWorker).where(JobWorker.worker_id == worker_id).values(seen_at=utcnow()))
    return bool(res.rowcount)


async def workers(db: Database) -> list[JobWorker]:
    async with db.read() as s:
        found = list((await s.scalars(select(JobWorker))).all())
        for w in found:
            s.expunge(w)
    return found


def claimed_in_running_jobs(held_by: Any) -> Select[tuple[str]]:
    """The running jobs with rows claimed ``held_by``. Only running jobs' rows are read (their
    primary key's prefix): ``job_rows`` keeps every finished job's rows for the retention, and
    there is no index on ``status`` (see ``JobRow``), so a scan of all of them (1.7 s at a
    million rows on SQLite) would hold the writer while a worker starts or stops."""
    running = select(Job.job_id).where(Job.status.in_(RUNNING))
    return select(ROWS.c.job_id).distinct().where(ROWS.c.job_id.in_(running), ROWS.c.status == "claimed", held_by)


async def _hand_back(s: AsyncSession, held_by: Any) -> list[tuple[str, str]]:
    """Claimed rows of running jobs matching ``held_by`` -> pending (no attempt counted: the
    holder may have died for reasons of its own); (job_id, batch_id) of the jobs concerned."""
    candidates = (await s.scalars(claimed_in_running_jobs(held_by))).all()
    if not candidates:
        return []
    locked = await lock_jobs(s, candidates)  # the jobs before their rows, as everywhere
    running = select(Job.job_id).where(Job.job_id.in_(locked), Job.status.in_(RUNNING)).scalar_subquery()
    res = await s.execute(update(ROWS).where(ROWS.c.job_id.in_(running), ROWS.c.status == "claimed", held_by)
                          .values(status="pending", claimed_by=None).returning(ROWS.c.job_id))
    jobs = sorted(set(res.scalars().all()))
    if not jobs:
        return []
    await s.execute(update(Job).where(Job.job_id.in_(jobs)).values(claim_from=0))
    return [(j, b) for j, b in (await s.execute(select(Job.job_id, Job.batch_id).where(Job.job_id.in_(jobs)))).all()]


async def held_by(db: Database, worker_id: str) -> list[tuple[str, str]]:
    """(job_id, batch_id) of the running jobs ``worker_id`` holds claimed rows of."""
    async with db.read() as s:
        jobs = claimed_in_running_jobs(ROWS.c.claimed_by == worker_id).subquery()
        return [(j, b) for j, b in (await s.execute(select(Job.job_id, Job.batch_id)
                                                    .where(Job.job_id.in_(select(jobs))))).all()]


async def release_worker(db: Database, worker_id: str) -> list[tuple[str, str]]:
    """A worker is gone (stopped, or dead): its claimed rows go back to the queue and its
    registration goes. Returns (job_id, batch_id) of the jobs it held rows of."""
    async with db.write() as s:
        held = await _hand_back(s, ROWS.c.claimed_by == worker_id)
        await s.execute(delete(JobWorker).where(JobWorker.worker_id == worker_id))
    return held


async def hand_back_own(db: Database, worker_id: str) -> list[tuple[str, str]]:
    """A live worker lost track of its claim (a round failed before its rows were recorded or
    handed back): every row it holds goes back to the queue; it stays registered."""
    async with db.write() as s:
        return await _hand_back(s, ROWS.c.claimed_by == worker_id)


async def release_orphans(db: Database) -> list[tuple[str, str]]:
    """Claimed rows no registered worker holds (a crash of every process) go back to the queue."""
    async with db.write() as s:
        live = select(JobWorker.worker_id).scalar_subquery()
        return await _hand_back(s, ROWS.c.claimed_by.is_(None) | ROWS.c.claimed_by.not_in(live))
