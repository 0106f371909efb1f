"""The worker pool: claims rows, renders them (threads, or render processes for big jobs),
records results, finishes jobs, sends notifications.

Invariants:
* A row is claimed by one conditional ``UPDATE job_rows SET status='claimed' ... WHERE
  status='pending' ... RETURNING`` through the single writer (``BEGIN IMMEDIATE``), so two
  workers never get the same row.
* Row statuses and the job's counts change in the same transaction, so they never drift.
* A row is marked ``done`` only after its file is published (temp -> durable -> rename).
* After a crash, ``claimed`` rows go back to ``pending`` (``resume``); re-rendering gives the
  same bytes, so every row ends with exactly one final file and is counted once.
* A job is finished exactly once (conditional UPDATE on its running status), by the worker
  that sees it with no pending rows and nothing in flight.
* Cancel (by request or by ``max_errors``) is a flag checked before every claim and between
  rows inside the render thread (between bounded calls into a render process); rows not
  rendered become ``skipped``. The event loop never renders.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import aiosmtplib
from sqlalchemy import bindparam, func, insert, select, text, update

from server.config import Settings
from server.db import Database, utcnow
from server.db.job_models import Job, JobLog
from server.jobs.fetch import Fetcher, FetchError
from server.jobs.notify import deliver_callback, send_emails
from server.jobs.publish import remove_stale_temps
from server.jobs.render import (
    AssetError,
    Compiled,
    JobSpec,
    Renderer,
    RowIn,
    RowOut,
    compile_template,
    die_with_parent,
    render_in_process,
    warm_up,
)

log = logging.getLogger("filedrop.jobs")

CLAIM_ROWS = 500  # rows per claim: big enough to amortise the writer and one syncfs, small enough to cancel fast
PROCESS_CALL_ROWS = 250  # rows per call into a render process...
PROCESS_CALL_SECONDS = 0.2  # ...and its time budget: bounds the cancel latency there
PROCESS_MIN_ROWS = 1000  # smaller jobs render in threads: not worth the IPC (or a first spawn)
RUNNING = ("Queued", "In progress")
FINISHED = ("Completed", "Completed with errors", "Cancelled", "Failed")


class JobFailed(Exception):
    """The job as a whole cannot go on (status ``Failed``); the message is its reason."""


class FileSource(Protocol):
    """What the engine needs from the upload service: a complete file's path (``.path``)."""

    async def __call__(self, owner: str, batch_id: str, file_idx: int) -> Any: ...


def iso(dt: datetime | None) -> str | None:
    """ISO-8601 UTC with milliseconds and ``Z``, as in the seed (``2021-06-25T13:13:10.477Z``)."""
    if dt is None:
        return None
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def job_json(job: Job) -> dict[str, Any]:
    """The job as every endpoint (and the callback) shows it: the seed's keys + totalCount, strategy."""
    out: dict[str, Any] = {
        "batch_id": job.batch_id,
        "job_id": job.job_id,
        "status": job.status,
        "started": iso(job.started),
        "finished": iso(job.finished),
        "succeededCount": job.succeeded_count,
        "erroredCount": job.errored_count,
        "totalCount": job.total_count,
        "strategy": job.strategy,
    }
    if job.reason:
        out["reason"] = job.reason
    return out


@dataclass(eq=False)
class Runtime:
    """In-memory state of one running job in this process."""

    job_id: str
    batch_id: str = ""
    owner: str = ""
    upload_batch_id: str | None = None
    max_errors: int | None = None
    errored: int = 0
    compiled: Compiled | None = None  # handed over by the start (else compiled by _load)
    renderer: Renderer | None = None
    # The job's JSON as last committed, kept by the worker that commits each change: status
    # calls for a running job are answered from here, without a database round trip.
    snapshot: dict[str, Any] | None = None
    spec: JobSpec | None = None
    use_processes: bool = False
    cancel: threading.Event = field(default_factory=threading.Event)
    exhausted: bool = False  # no pending rows left to claim
    cursor: int = 0  # rows below this idx are all claimed already (claims go in idx order)
    inflight: int = 0
    finishing: bool = False
    assets: dict[str, Any] = field(default_factory=dict)
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    load_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class JobEngine:
    def __init__(self, db: Database, settings: Settings, fetcher: Fetcher, files: FileSource | None) -> None:
        self.db = db
        self.settings = settings
        self.fetcher = fetcher
        self.files = files
        self.workers = max(1, settings.workers)
        self._active: dict[str, Runtime] = {}
        self._order: list[str] = []
        self._rr = 0
        self._wake = asyncio.Event()
        self._halt = threading.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._notify_tasks: set[asyncio.Task[None]] = set()
        self._finished = _Signals()
        self._notified = _Signals()
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="render")
        self._procs: ProcessPoolExecutor | None = None  # made on the first big job (_processes_ready)
        self._procs_up: list[asyncio.Future[int]] = []
        self._procs_broken = False

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Resume interrupted work, then start the workers."""
        await self.resume()
        for i in range(self.workers):
            t = asyncio.create_task(self._worker(), name=f"job-worker-{i}")
            self._tasks.add(t)

    async def stop(self, grace: float = 5.0) -> None:
        """Let in-flight batches finish (up to ``grace`` s), then cancel everything we own.
        Rows left ``claimed`` go back to ``pending`` on the next start."""
        self._halt.set()
        self._wake.set()
        tasks = list(self._tasks)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=grace)
            for t in pending:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for t in list(self._notify_tasks):
            t.cancel()
        await asyncio.gather(*self._notify_tasks, return_exceptions=True)
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._procs is not None:
            self._procs.shutdown(wait=True, cancel_futures=True)

    async def resume(self) -> None:
        """After a crash: claimed rows -> pending, running jobs re-queued, stray temps removed,
        unsent notifications sent."""
        async with self.db.write() as s:
            await s.execute(text(
                "UPDATE job_rows SET status='pending' WHERE status='claimed' AND job_id IN "
                "(SELECT job_id FROM jobs WHERE status IN ('Queued','In progress'))"))
        async with self.db.read() as s:
            running = (await s.execute(select(Job.job_id, Job.batch_id).where(Job.status.in_(RUNNING)))).all()
            unsent = (await s.scalars(select(Job.job_id).where(
                Job.status.in_(FINISHED),
                (Job.callback_state == "pending") | (Job.email_state == "pending")))).all()
        assert self.settings.smartlink_root is not None
        for job_id, batch_id in running:
            n = await asyncio.to_thread(remove_stale_temps, self.settings.smartlink_root / batch_id)
            if n:
                log.info("job %s: removed %d stray temp files", job_id, n)
            self.enqueue(job_id)
        for job_id in unsent:
            self._spawn_notify(job_id)

    def enqueue(self, job_id: str, compiled: Compiled | None = None) -> None:
        """Run ``job_id``; ``compiled`` is its template as the start already compiled it."""
        if job_id not in self._active:
            self._active[job_id] = Runtime(job_id, compiled=compiled)
            self._order.append(job_id)
        self._finished.get(job_id)
        self._wake.set()

    # ---- signals for callers and tests ------------------------------------------------------

    async def job_finished(self, job_id: str, timeout: float | None = None) -> None:
        """Return once ``job_id`` has reached an end state (at once if it already has)."""
        ev = self._finished.get(job_id)
        if not ev.is_set():
            async with self.db.read() as s:
                status = await s.scalar(select(Job.status).where(Job.job_id == job_id))
            if status in FINISHED:
                ev.set()
        await asyncio.wait_for(ev.wait(), timeout)

    async def notified(self, job_id: str, timeout: float | None = None) -> None:
        """Return once the job's callback/e-mails have been delivered or given up on."""
        ev = self._notified.get(job_id)
        if not ev.is_set():
            async with self.db.read() as s:
                row = (await s.execute(select(Job.status, Job.callback_state, Job.email_state)
                                       .where(Job.job_id == job_id))).first()
            if row is not None and row[0] in FINISHED and "pending" not in (row[1], row[2]):
                ev.set()
        await asyncio.wait_for(ev.wait(), timeout)

    def snapshot(self, owner: str, batch_id: str, job_id: str) -> dict[str, Any] | None:
        """The running job's JSON as last committed, if this engine runs it (else None)."""
        rt = self._active.get(job_id)
        if rt is None or rt.snapshot is None or rt.owner != owner or rt.batch_id != batch_id:
            return None
        return dict(rt.snapshot)

    # ---- cancel -----------------------------------------------------------------------------

    async def cancel(self, job_id: str, reason: str, level: str = "info") -> bool:
        """Request cancellation; True if the job was still running. Idempotent."""
        async with self.db.write() as s:
            res = await s.execute(update(Job).where(Job.job_id == job_id, Job.status.in_(RUNNING),
                                                    Job.cancel_requested.is_(False))
                                  .values(cancel_requested=True, reason=reason))
            if res.rowcount:
                await self._log(s, job_id, [(level, f"cancelling: {reason}")])
        rt = self._active.get(job_id)
        if rt is not None:
            if res.rowcount and rt.snapshot is not None:
                rt.snapshot["reason"] = reason
            rt.cancel.set()
            self._wake.set()
        return bool(res.rowcount)

    # ---- the workers ------------------------------------------------------------------------

    def _next(self) -> Runtime | None:
        n = len(self._order)
        for k in range(n):
            job_id = self._order[(self._rr + k) % n]
            rt = self._active[job_id]
            if rt.finishing:
                continue
            if rt.cancel.is_set() or rt.exhausted:
                if rt.inflight == 0:
                    self._rr = (self._rr + k + 1) % n
                    return rt
                continue
            self._rr = (self._rr + k + 1) % n
            return rt
        return None

    async def _worker(self) -> None:
        while not self._halt.is_set():
            rt = self._next()
            if rt is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._step(rt)
            except asyncio.CancelledError:
                raise
            except JobFailed as e:
                log.error("job %s failed: %s", rt.job_id, e)
                await self._fail(rt, str(e))
            except Exception as e:
                log.exception("job %s failed", rt.job_id)
                await self._fail(rt, f"internal error: {e.__class__.__name__}: {e}")

    async def _load(self, rt: Runtime) -> None:
        async with rt.load_lock:
            if rt.renderer is not None:
                return
            async with self.db.read() as s:
                job = await s.get(Job, rt.job_id)
                if job is not None:
                    s.expunge(job)  # keep its loaded values past the read's rollback
            if job is None:
                raise RuntimeError("job row vanished")
            # Compiled once per job: by the start, or here (after a restart) in a thread.
            compiled = rt.compiled or (await asyncio.to_thread(compile_template, job.template))[0]
            rt.compiled = None  # the Renderer holds it from now on
            assert self.settings.smartlink_root is not None
            rt.batch_id, rt.owner, rt.upload_batch_id = job.batch_id, job.owner, job.upload_batch_id
            rt.max_errors, rt.errored = job.max_errors, job.errored_count
            rt.snapshot = job_json(job)
            if job.cancel_requested:
                rt.cancel.set()
            out_dir = self.settings.smartlink_root / job.batch_id
            try:
                await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
            except OSError as e:
                raise JobFailed(f"cannot create the output folder {job.batch_id}/: {e.strerror or e}") from None
            rt.spec = JobSpec(job.job_id, job.template, job.strategy, job.batch_id, job.params or "{}", str(out_dir))
            rt.use_processes = self.settings.render_processes > 0 and job.total_count >= PROCESS_MIN_ROWS
            rt.renderer = Renderer(compiled, job.strategy, job.batch_id, json.loads(job.params or "{}"), out_dir)
            await self._check_max_errors(rt)

    async def _step(self, rt: Runtime) -> None:
        if rt.renderer is None:
            await self._load(rt)
        if rt.cancel.is_set() or rt.exhausted:
            if rt.inflight == 0 and not rt.finishing:
                await self._finish(rt)
            return
        # Counted in flight from before the claim: a worker that sees the cancel while this
        # claim waits for the writer must not finish the job (and skip rows) under it.
        rt.inflight += 1
        try:
            rows = await self._claim(rt, CLAIM_ROWS)
            if rows:
                results = await self._render(rt, rows)
                await self._mark(rt, results)
            else:
                rt.exhausted = True
        finally:
            rt.inflight -= 1
        if (rt.exhausted or rt.cancel.is_set()) and rt.inflight == 0 and not rt.finishing:
            await self._finish(rt)

    async def _claim(self, rt: Runtime, n: int) -> list[RowIn]:
        began: datetime | None = None
        async with self.db.write() as s:
            # A cancel recorded by another process (e.g. `filedrop drop --force`) counts too.
            if await s.scalar(select(Job.cancel_requested).where(Job.job_id == rt.job_id)):
                rt.cancel.set()
                return []
            res = await s.execute(text(
                "UPDATE job_rows SET status='claimed' WHERE job_id=:j AND idx IN (SELECT idx FROM job_rows "
                "WHERE job_id=:j AND idx >= :c AND status='pending' ORDER BY idx LIMIT :n) "
                "RETURNING idx, reference_id, suffix, pdf, data"), {"j": rt.job_id, "c": rt.cursor, "n": n})
            rows = [RowIn(*r) for r in res.all()]
            if rows:
                # Rows never go back to pending while this process runs (only resume does that,
                # before any claim), so the primary key range scan can start past them.
                rt.cursor = max(rt.cursor, max(r.idx for r in rows) + 1)
                started = await s.execute(update(Job).where(Job.job_id == rt.job_id, Job.status == "Queued")
                                          .values(status="In progress", started=func.coalesce(Job.started, utcnow())))
                if started.rowcount:
                    await self._log(s, rt.job_id, [("info", "in progress")])
                    began = await s.scalar(select(Job.started).where(Job.job_id == rt.job_id))
        if began is not None and rt.snapshot is not None:
            rt.snapshot.update(status="In progress", started=iso(began))
        rows.sort(key=lambda r: r.idx)
        return rows

    async def _render(self, rt: Runtime, rows: list[RowIn]) -> list[RowOut]:
        assert rt.renderer is not None
        renderer = rt.renderer
        loop = asyncio.get_running_loop()

        def stop() -> bool:
            return rt.cancel.is_set() or self._halt.is_set()

        final: dict[int, RowOut] = {}
        todo = rows
        for _round in range(4):  # each round fetches the assets the previous one found missing
            if rt.use_processes and self._processes_ready():
                out = await self._render_in_processes(rt, todo, stop)
            else:
                out = await loop.run_in_executor(self._executor, renderer.render_rows, todo, rt.assets, stop)
            need = [r for r in out if r.status == "need"]
            final.update((r.idx, r) for r in out if r.status != "need")
            if not need:
                break
            await self._resolve(rt, {k for r in need for k in r.needs})
            wanted = {r.idx for r in need}
            todo = [r for r in todo if r.idx in wanted]
        else:
            for r in need:
                final[r.idx] = RowOut(r.idx, "error", "assets unavailable: " + ", ".join(r.needs))
        return [final[r.idx] for r in rows]

    def _processes_ready(self) -> bool:
        """Whether the render processes are up; the first call starts them. Until they are (a
        spawn takes 0.3-1 s), big jobs render in threads, so nobody waits for the spawn."""
        if self._procs_broken:
            return False
        if self._procs is None:
            # Render processes keep CPU-bound Jinja2 off this process's GIL and use the second
            # core (bench, README: a higher ratio to the bare loop than threads, similar p99).
            # "spawn" because forking a process that runs threads and an event loop is unsafe.
            try:
                self._procs = ProcessPoolExecutor(max_workers=self.settings.render_processes,
                                                  mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=die_with_parent, initargs=(os.getpid(),))
                loop = asyncio.get_running_loop()
                self._procs_up = [loop.run_in_executor(self._procs, warm_up)
                                  for _ in range(self.settings.render_processes)]
            except Exception as e:  # e.g. a __main__ without the `if __name__ == "__main__"` guard
                self._processes_failed(e)
            return False
        for f in self._procs_up:
            if not f.done():
                return False
            if f.cancelled() or f.exception() is not None:
                self._processes_failed(f.exception() or RuntimeError("render process start cancelled"))
                return False
        return True

    def _processes_failed(self, e: BaseException) -> None:
        """Render processes are unusable (could not start, or one died): threads from now on."""
        if not self._procs_broken:
            log.error("render processes unusable, rendering in threads from now on: %r", e)
        self._procs_broken = True
        if self._procs is not None:
            self._procs.shutdown(wait=False, cancel_futures=True)

    async def _render_in_processes(self, rt: Runtime, rows: list[RowIn], stop: Callable[[], bool]) -> list[RowOut]:
        assert rt.spec is not None
        loop = asyncio.get_running_loop()
        assert self._procs is not None
        out: list[RowOut] = []
        # A process cannot see rt.cancel, so each call is bounded in rows and in time (rows it
        # had no time for come back "skipped" and are sent again): cancel is checked between.
        todo = list(rows)
        while todo:
            if stop():
                out += [RowOut(r.idx, "skipped") for r in todo]
                break
            chunk, todo = todo[:PROCESS_CALL_ROWS], todo[PROCESS_CALL_ROWS:]
            try:
                res = await loop.run_in_executor(self._procs, render_in_process, rt.spec, chunk,
                                                 dict(rt.assets), PROCESS_CALL_SECONDS)
            except BrokenProcessPool as e:  # a render process died (OOM kill, ...): go on in threads
                self._processes_failed(e)
                assert rt.renderer is not None
                rest = chunk + todo
                return out + await loop.run_in_executor(self._executor, rt.renderer.render_rows, rest,
                                                        rt.assets, stop)
            attempted = [r for r in res if r.status != "skipped"]
            out += attempted
            seen = {r.idx for r in attempted}
            todo = [r for r in chunk if r.idx not in seen] + todo
        return out

    async def _resolve(self, rt: Runtime, keys: Iterable[str]) -> None:
        async def one(key: str) -> None:
            lock = rt.locks.setdefault(key, asyncio.Lock())
            async with lock:
                if key in rt.assets:
                    return
                if key.startswith("url:"):
                    try:
                        rt.assets[key] = await self.fetcher.get(key[4:])
                    except FetchError as e:
                        rt.assets[key] = AssetError(str(e))
                    await self._note(rt.job_id, "info" if isinstance(rt.assets[key], bytes) else "error",
                                     f"asset {key[4:]}: " + (f"{len(rt.assets[key])} bytes fetched"
                                                             if isinstance(rt.assets[key], bytes)
                                                             else rt.assets[key].message))
                else:
                    idx = int(key.split(":", 1)[1])
                    if self.files is None or rt.upload_batch_id is None:
                        rt.assets[key] = AssetError(f"{key}: this job has no upload batch")
                        return
                    try:
                        info = await self.files(rt.owner, rt.upload_batch_id, idx)
                        rt.assets[key] = str(info.path)
                    except Exception as e:
                        msg = getattr(e, "message", None) or str(e)
                        rt.assets[key] = AssetError(f"{key}: file {idx} of upload batch {rt.upload_batch_id}: {msg}")

        await asyncio.gather(*(one(k) for k in keys))

    async def _mark(self, rt: Runtime, results: list[RowOut]) -> None:
        done = [r.idx for r in results if r.status == "done"]
        errors = [r for r in results if r.status == "error"]
        skipped = [r.idx for r in results if r.status == "skipped"]
        # Rows skipped because the server is stopping (not cancelled) are simply handed back.
        back_to = "skipped" if rt.cancel.is_set() else "pending"
        # Only rows still `claimed` change (and are counted): a job finished meanwhile (Failed,
        # or cancelled by another process) has already settled its rows.
        n_done = n_errors = 0
        async with self.db.write() as s:
            for i in range(0, len(done), 500):
                res = await s.execute(text("UPDATE job_rows SET status='done' WHERE job_id=:j AND idx IN :ids "
                                           "AND status='claimed'").bindparams(bindparam("ids", expanding=True)),
                                      {"j": rt.job_id, "ids": done[i:i + 500]})
                n_done += res.rowcount
            if errors:
                res = await s.execute(text("UPDATE job_rows SET status='error', error=:e WHERE job_id=:j AND idx=:i "
                                           "AND status='claimed'"),
                                      [{"j": rt.job_id, "i": r.idx, "e": r.error} for r in errors])
                n_errors = res.rowcount
            if skipped:
                await s.execute(text("UPDATE job_rows SET status=:st WHERE job_id=:j AND idx IN :ids "
                                     "AND status='claimed'").bindparams(bindparam("ids", expanding=True)),
                                {"st": back_to, "j": rt.job_id, "ids": skipped})
            res = await s.execute(update(Job).where(Job.job_id == rt.job_id).values(
                succeeded_count=Job.succeeded_count + n_done,
                errored_count=Job.errored_count + n_errors).returning(Job.succeeded_count, Job.errored_count))
            succeeded, rt.errored = res.one()
            if errors:
                await self._log(s, rt.job_id, [("error", f"row {r.idx}: {r.error}") for r in errors])
        if rt.snapshot is not None:
            rt.snapshot.update(succeededCount=succeeded, erroredCount=rt.errored)
        if errors:
            await self._check_max_errors(rt)

    async def _check_max_errors(self, rt: Runtime) -> None:
        if rt.max_errors is not None and rt.errored > rt.max_errors and not rt.cancel.is_set():
            await self.cancel(rt.job_id, f"max_errors ({rt.max_errors}) exceeded: {rt.errored} rows errored",
                              level="error")
            rt.cancel.set()

    async def _finish(self, rt: Runtime, failed: str | None = None) -> None:
        rt.finishing = True
        now = utcnow()
        async with self.db.write() as s:
            job = await s.get(Job, rt.job_id)
            if job is None or job.status not in RUNNING:
                self._retire(rt)
                return
            cancelled = rt.cancel.is_set() or job.cancel_requested
            if failed is None and not cancelled:
                left = await s.scalar(text("SELECT count(*) FROM job_rows WHERE job_id=:j AND "
                                           "status IN ('pending','claimed')"), {"j": rt.job_id})
                if left:  # rows appeared back (should not happen in one process): keep going
                    rt.exhausted, rt.finishing = False, False
                    self._wake.set()
                    return
            skipped = (await s.execute(text("UPDATE job_rows SET status='skipped' WHERE job_id=:j AND "
                                            "status IN ('pending','claimed')"), {"j": rt.job_id})).rowcount
            if failed is not None:
                status, reason = "Failed", failed
            elif cancelled:
                status, reason = "Cancelled", job.reason or "cancelled"
            else:
                status = "Completed with errors" if job.errored_count else "Completed"
                reason = None
            await s.execute(update(Job).where(Job.job_id == rt.job_id, Job.status.in_(RUNNING)).values(
                status=status, finished=now, reason=reason, started=func.coalesce(Job.started, now),
                callback_state="pending" if job.callback_url else "none",
                email_state="pending" if job.callback_emails else "none"))
            summary = (f"{status}: {job.succeeded_count} succeeded, {job.errored_count} errored, "
                       f"{skipped} skipped of {job.total_count}")
            await self._log(s, rt.job_id, [("error" if failed else "info", summary + (f" ({reason})" if reason else ""))])
        log.info("job %s %s", rt.job_id, summary)
        self._retire(rt)
        self._spawn_notify(rt.job_id)

    async def _fail(self, rt: Runtime, reason: str) -> None:
        try:
            await self._finish(rt, failed=reason)
        except Exception:
            log.exception("job %s: could not record the failure", rt.job_id)
            self._retire(rt)

    def _retire(self, rt: Runtime) -> None:
        self._active.pop(rt.job_id, None)
        if rt.job_id in self._order:
            self._order.remove(rt.job_id)
        self._finished.get(rt.job_id).set()

    # ---- log --------------------------------------------------------------------------------

    @staticmethod
    async def _log(s: Any, job_id: str, entries: list[tuple[str, str]]) -> None:
        now = utcnow()
        await s.execute(insert(JobLog), [{"job_id": job_id, "at": now, "level": lv, "message": m}
                                         for lv, m in entries])

    async def _note(self, job_id: str, level: str, message: str) -> None:
        async with self.db.write() as s:
            await self._log(s, job_id, [(level, message)])

    # ---- notifications ----------------------------------------------------------------------

    def _spawn_notify(self, job_id: str) -> None:
        if self._halt.is_set():
            return
        t = asyncio.create_task(self._notify(job_id), name=f"job-notify-{job_id}")
        self._notify_tasks.add(t)
        t.add_done_callback(self._notify_tasks.discard)

    async def _notify(self, job_id: str) -> None:
        try:
            async with self.db.read() as s:
                job = await s.get(Job, job_id)
                if job is not None:
                    s.expunge(job)
            if job is None:
                return
            body = job_json(job)
            if job.callback_url and job.callback_state == "pending":
                ok = await deliver_callback(self.fetcher, self.settings, job.callback_url, body,
                                            lambda lv, m: self._note(job_id, lv, m))
                await self._set_state(job_id, callback_state="sent" if ok else "failed")
            if job.callback_emails and job.email_state == "pending":
                to = [a for a in job.callback_emails.split(",") if a]
                url = f"{self.settings.public_url.rstrip('/')}/api/batch/{job.batch_id}/{job_id}/result"
                try:
                    await send_emails(self.settings, to, body, url)
                    await self._note(job_id, "info", f"e-mail sent to {', '.join(to)}")
                    await self._set_state(job_id, email_state="sent")
                except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
                    await self._note(job_id, "error", f"e-mail to {', '.join(to)} failed: {e}")
                    await self._set_state(job_id, email_state="failed")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job %s: notification failed", job_id)
        finally:
            self._notified.get(job_id).set()

    async def _set_state(self, job_id: str, **values: str) -> None:
        async with self.db.write() as s:
            await s.execute(update(Job).where(Job.job_id == job_id).values(**values))


class _Signals:
    """job id -> asyncio.Event, bounded: the oldest events that are already set are forgotten
    (a later waiter on such a job finds its end state in the database instead)."""

    LIMIT = 10_000

    def __init__(self) -> None:
        self._events: OrderedDict[str, asyncio.Event] = OrderedDict()

    def get(self, job_id: str) -> asyncio.Event:
        ev = self._events.get(job_id)
        if ev is None:
            ev = self._events[job_id] = asyncio.Event()
            if len(self._events) > self.LIMIT:
                for k in [k for k, e in self._events.items() if e.is_set()][: len(self._events) - self.LIMIT]:
                    del self._events[k]
        return ev
