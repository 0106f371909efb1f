"""``filedrop worker``: claims rows of running jobs from the database, has its render process
render them, publishes the pages and marks the rows. ``filedrop serve`` runs
``FILEDROP_WORKERS`` of these (``server.jobs.pool``); more can run on their own, here or on
other hosts sharing the database and the data dir.

The worker itself never runs a template: it is the small supervising loop that a runaway
render cannot stall. It owns one render process (``server.jobs.child``, limited in memory and
CPU priority) and kills it when a row takes too long, when the row's job is cancelled or gone,
and when the worker stops (``runner.RowRunner``).

Invariants:
* Everything is in the database and the data dir: a worker holds rows only as ``claimed`` rows
  naming it, so any worker or API process can tell whose rows are whose.
* A worker proves it lives by a heartbeat (``job_workers.seen_at``, every second). A worker
  whose heartbeat is older than ``LOST_AFTER``, or whose process is gone from this host, is
  dead: the first live worker to see it hands its claimed rows back to the queue (no attempt
  counted) and removes the temp files it left. A worker that finds itself declared dead drops
  what it holds (its rows already went back) and registers again.
* Its claims are a lease: it publishes a group only while its last heartbeat is younger than
  ``FENCE`` and its rows are still its own (checked after the group is written and synced,
  before it is renamed into place), and renames nothing after ``PUBLISH_BY`` s past that
  heartbeat. Others declare it dead only ``LOST_AFTER`` s after it, so a worker that stalled
  (alive, silent for 20 s) never publishes after another process handed its rows back or
  ended the job, as long as the hosts' clocks agree within ``MAX_SKEW``.
* On SIGTERM it kills its render process (and abandons a fetch), hands back the rows it had not
  published, and exits within ``STOP_GRACE`` s whatever the templates do; within ``STOP_DEADLINE``
  s whatever it waits for (a database that does not answer, a disk): past that it exits at once
  and its rows go back as a dead worker's do.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from server.config import Settings
from server.db import Database, log_failure, utcnow
from server.db.job_models import Job
from server.durable import boot_id, spread_subdirs
from server.jobs import control, queries
from server.jobs.assets import Assets, JobRef, UploadFiles
from server.jobs.childproc import ChildGone, RenderProcess
from server.jobs.fetch import Fetcher
from server.jobs.lifeline import die_with_parent
from server.jobs.publish import write_owner
from server.jobs.render import Asset
from server.jobs.runner import RowRunner
from server.jobs.states import RUNNING

log = logging.getLogger("filedrop.jobs.worker")

HEARTBEAT = 1.0  # s between heartbeats
REAP_EVERY = 2.0  # s between looks for dead workers
LOST_AFTER = 20.0  # a worker silent this long is dead (it may be on another host)
MAX_SKEW = 5.0  # hosts' clocks agree within this (NTP): seen_at is written by one, read by others
FENCE = LOST_AFTER / 2  # a worker publishes only while its last heartbeat is this recent...
PUBLISH_BY = LOST_AFTER - MAX_SKEW - 1.0  # ...and renames nothing later than this after it
IDLE_POLL = 1.0  # an idle worker looks for work this often (SIGUSR1 wakes it at once)
STOP_GRACE = 3.0  # after SIGTERM, the loop gets this long to hand rows back before it is cancelled
# ...and the process this long to exit, whatever it waits for (SQLite's busy_timeout is 10 s, and
# a write may wait it out twice): under the 10 s that `filedrop serve` promises for its SIGTERM.
STOP_DEADLINE = 8.0
WORKER_POOL = 3  # database connections of a worker: its loop, its heartbeat, a reap
CLAIM_FIRST = 16  # rows of a job's first claim; then what this worker renders in CLAIM_SECONDS
CLAIM_SECONDS = 1.0  # small enough that the last claims of a job spread over the workers
CLAIM_MAX = 2000  # claims and published groups have a fixed cost (~10-15 ms each): at 500, workers used 40% more CPU
# Workers run at a lower CPU priority than the API (their render processes lower still: 10): status
# calls and uploads stay fast while every core renders (bench: status p99 during a 10k job).
NICE = 5


class JobUnrenderable(Exception):
    """The job's template cannot be compiled in a render process (its reason ends the job)."""


def host_key() -> str:
    """This host for this boot, and the process-id namespace whose pids ``pid_alive`` can judge:
    workers registered under another boot id are all dead. A container that shares the host's
    name (host networking) and boot id but has pids of its own is another host here: its pids
    mean nothing in ours (its worker's pid 7 is no process of ours, or an unrelated one)."""
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        pid_ns = ""
    return f"{socket.gethostname()}/{boot_id()}/{pid_ns}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class LoadedJob:
    job_id: str
    batch_id: str
    owner: str
    upload_batch_id: str | None
    strategy: str
    template: str
    params: str
    out_dir: Path
    max_errors: int | None = None
    assets: dict[str, Asset] = field(default_factory=dict)
    version: int = 0  # bumped when assets resolve; a render process gets each version once
    claim_size: int = CLAIM_FIRST

    @property
    def ref(self) -> JobRef:
        return JobRef(self.job_id, self.owner, self.upload_batch_id)

    def adapt(self, rows: int, seconds: float) -> None:
        """Claims of about CLAIM_SECONDS of this worker's work, at the pace it just had."""
        if rows:
            self.claim_size = max(1, min(CLAIM_MAX, int(rows / max(seconds, 1e-3) * CLAIM_SECONDS)))


class Worker:
    def __init__(self, db: Database, settings: Settings, fetcher: Fetcher, files: UploadFiles | None,
                 worker_id: str | None = None) -> None:
        self.db = db
        self.settings = settings
        self.id = worker_id or secrets.token_hex(8)
        self.host = host_key()
        self.stopping = asyncio.Event()
        self.wake = asyncio.Event()
        self.lost = False
        self.beat_ok = time.monotonic()  # when the last heartbeat (or the registration) landed
        self.child: RenderProcess | None = None
        self.jobs: dict[str, LoadedJob] = {}
        self.assets = Assets(settings, fetcher, files, self._note)
        self._rr = 0
        self.refused: str | None = None  # why it would not work (``run``)

    # ---- life cycle ------------------------------------------------------------------------

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def poke(self) -> None:
        self.wake.set()

    def stop_reason(self) -> str | None:
        return "stopping" if self.stopping.is_set() else "lost" if self.lost else None

    def lease(self) -> float | None:
        """Until when (``time.monotonic()``) this worker may still rename pages into place, or
        None when its heartbeat is too old to start (see the module docstring)."""
        if time.monotonic() - self.beat_ok >= FENCE:
            return None
        return self.beat_ok + PUBLISH_BY

    async def run(self) -> None:
        """Work until ``stop()``; then hand back what is held and deregister. Refuses to work
        (``refused`` says why) in a data dir that cannot be the one its database's other
        processes share."""
        if not await self._register():
            return
        self.refused = await self._foreign_data_dir()
        if self.refused is not None:
            log.error("worker %s: %s", self.id, self.refused)
            with contextlib.suppress(Exception):
                await queries.release_worker(self.db, self.id)
            return
        self.beat_ok = time.monotonic()
        log.info("worker %s (pid %d) started", self.id, os.getpid())
        beats = asyncio.create_task(self._beats(), name=f"worker-{self.id}-heartbeat")
        orphans = True  # the first round hands back rows claimed by no registered worker
        stale = False  # a round failed: rows it claimed may still be marked ours
        try:
            with contextlib.suppress(ChildGone, OSError):  # else it starts with the first rows
                # Warm before the first rows: a render process takes 0.1-0.3 s to start.
                self.child = await RenderProcess.start(self.settings)
            while not self.stopping.is_set():
                try:
                    if orphans:
                        await self._reap(orphans=True)
                        orphans = False
                    if stale:  # no claim is open between rounds: whatever it holds is lost track of
                        await queries.hand_back_own(self.db, self.id)
                        stale = False
                    if self.lost:
                        await self._rejoin()
                    busy = await self._round()
                except (asyncio.CancelledError, KeyboardInterrupt):
                    raise
                except Exception as e:  # the database busy past its timeout, say: not a reason to die
                    log_failure(log, "worker %s: round failed; trying again", e, self.id)
                    stale, busy = True, False
                if not busy:
                    self.wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.wake.wait(), IDLE_POLL)
        finally:
            beats.cancel()
            await asyncio.gather(beats, return_exceptions=True)
            await self.drop_child()
            with contextlib.suppress(Exception):  # the database may be what failed
                await queries.release_worker(self.db, self.id)
            log.info("worker %s stopped", self.id)

    async def _foreign_data_dir(self) -> str | None:
        """Why this process's data dir is not the one the other processes of its PostgreSQL
        database share, or None: no smartlinks folder where jobs of the database have already
        published pages (a host where the shared dir is not mounted, a mistyped path). Its
        pages would go where no NGINX serves them, their rows marked done. (On SQLite the
        database is the data dir's.)"""
        root = self.settings.smartlink_root
        assert root is not None
        if not self.db.shared or root.exists():
            return None
        try:
            if not await queries.any_published(self.db):
                return None  # a new installation: the first job's load makes the folder
        except Exception as e:  # the database failing: the rounds will say so
            log_failure(log, "worker %s: could not check the data dir", e, self.id)
            return None
        return (f"FILEDROP_SMARTLINK_ROOT {root} does not exist, but jobs of this database have published pages "
                f"there: FILEDROP_DATA_DIR ({self.settings.data_dir}) is not the data dir the other processes "
                "share (is it mounted here?); not starting")

    async def _register(self) -> bool:
        """Register, trying again while the database refuses (PostgreSQL restarting, sessions
        ended): a start that meets that is no reason to die with a traceback. False if told to
        stop first."""
        delay = 0.1
        while True:
            try:
                await queries.register_worker(self.db, self.id, self.host, os.getpid())
                return True
            except Exception as e:
                log_failure(log, "worker %s: registering failed; trying again", e, self.id)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)  # the pause between tries, or stop
            if self.stopping.is_set():
                return False
            delay = min(delay * 2, IDLE_POLL)

    async def _rejoin(self) -> None:
        log.warning("worker %s was declared dead (no heartbeat for %.0f s): its rows went back to the "
                    "queue; registering again", self.id, LOST_AFTER)
        self.jobs.clear()
        await queries.release_worker(self.db, self.id)
        await queries.register_worker(self.db, self.id, self.host, os.getpid())
        self.beat_ok = time.monotonic()
        self.lost = False

    async def _beats(self) -> None:
        last_reap = time.monotonic()
        while True:
            await asyncio.sleep(HEARTBEAT)  # the heartbeat's period
            try:
                sent = time.monotonic()
                if await queries.heartbeat(self.db, self.id):
                    self.beat_ok = sent  # seen_at is no older than this
                else:
                    self.lost = True
                if time.monotonic() - last_reap >= REAP_EVERY:
                    last_reap = time.monotonic()
                    await self._reap()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # e.g. the writer busy past its timeout: try again next beat
                log_failure(log, "worker %s: heartbeat failed", e, self.id)

    async def _reap(self, orphans: bool = False) -> None:
        """Hand back the rows of dead workers (and, with ``orphans``, of rows claimed by no
        registered worker: what a crash of everything left)."""
        now = utcnow()
        dead = [w for w in await queries.workers(self.db)
                if w.worker_id != self.id
                and ((now - w.seen_at).total_seconds() > LOST_AFTER or (w.host == self.host and not pid_alive(w.pid)))]
        for w in dead:
            held = await control.forget_worker(self.db, self.settings, w.worker_id)
            log.warning("worker %s (pid %d on %s) is gone; rows it held in %d job(s) go back to the queue",
                        w.worker_id, w.pid, w.host.split("/")[0], len(held))
        if orphans or dead:
            held = await queries.release_orphans(self.db)
            if held:
                log.warning("rows of %d job(s) were claimed by no live worker: back to the queue", len(held))

    # ---- the work ----------------------------------------------------------------------------

    async def _round(self) -> bool:
        """Serve one job that has work (round robin over running jobs); False if none had."""
        running = await queries.running_jobs(self.db)
        for job_id in [j for j in self.jobs if j not in running]:
            del self.jobs[job_id]
        n = len(running)
        for k in range(n):
            if self.stop_reason():
                return True
            if await self._serve(running[(self._rr + k) % n]):
                self._rr = (self._rr + k + 1) % n
                return True
        return False

    async def _serve(self, job_id: str) -> bool:
        job = self.jobs.get(job_id) or await self._load(job_id)
        if job is None:
            return False
        rows = await queries.claim_rows(self.db, job_id, self.id, job.claim_size)
        if not rows:
            return await control.end(self.db, self.settings, job_id) is not None
        began = time.monotonic()
        runner = RowRunner(self, job, rows)
        try:
            await runner.run()
        except JobUnrenderable as e:
            self.jobs.pop(job_id, None)
            await control.end(self.db, self.settings, job_id, failed=str(e))
            return True
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as e:
            log_failure(log, "worker %s: job %s: %d claimed rows handed back", e, self.id, job_id, len(runner.rows))
            await self.drop_child()
            out = queries.Outcome.empty()
            out.release = [r.idx for r in runner.rows]
            await queries.record(self.db, job_id, self.id, out)
            await asyncio.sleep(IDLE_POLL)  # do not spin on a fault of ours
            return True
        job.adapt(len(runner.rows), time.monotonic() - began)
        if self.stop_reason() is None:  # the job's last rows, or a cancel: end it if nothing is held
            await control.end(self.db, self.settings, job_id)
        return True

    async def _load(self, job_id: str) -> LoadedJob | None:
        async with self.db.read() as s:
            job = await s.get(Job, job_id)
            if job is not None:
                s.expunge(job)
        if job is None or job.status not in RUNNING:
            return None
        root = self.settings.smartlink_root
        assert root is not None
        out_dir = root / job.batch_id
        made, problem = await asyncio.to_thread(_make_dir, root, out_dir)
        if problem is not None:
            await control.end(self.db, self.settings, job_id,
                              failed=f"cannot create the output folder {job.batch_id}/: {problem}")
            return None
        if made:
            # Dropped between our read and the mkdir? Then the folder must not come back.
            state = await queries.job_state(self.db, job_id)
            if state is None or state[0] not in RUNNING:
                with contextlib.suppress(OSError):
                    out_dir.rmdir()
                return None
        try:  # the folder's owner outlives the job rows (their retention): no other key takes it over
            await asyncio.to_thread(write_owner, root, job.batch_id, job.owner)
        except OSError as e:
            await control.end(self.db, self.settings, job_id,
                              failed=f"cannot record the owner of the output folder {job.batch_id}/: {e.strerror or e}")
            return None
        loaded = LoadedJob(job.job_id, job.batch_id, job.owner, job.upload_batch_id, job.strategy, job.template,
                           job.params or "{}", out_dir, job.max_errors)
        self.jobs[job_id] = loaded
        return loaded

    async def resolve(self, job: LoadedJob, keys: Iterable[str]) -> None:
        job.assets.update(await self.assets.resolve(job.ref, keys))
        job.version += 1

    async def _note(self, job_id: str, level: str, message: str) -> None:
        await queries.note(self.db, job_id, level, message)

    # ---- the render process ------------------------------------------------------------------

    async def child_for(self, job: LoadedJob) -> RenderProcess:
        """This worker's render process, with ``job``'s template compiled and its assets known."""
        if self.child is None or not self.child.alive:
            await self.drop_child()
            self.child = await RenderProcess.start(self.settings)
        child = self.child
        if not child.knows(job.job_id):
            await child.send({"op": "job", "job_id": job.job_id, "template": job.template,
                              "strategy": job.strategy, "batch_id": job.batch_id, "params": job.params})
            t = self.settings.render_timeout
            try:
                header, _ = await child.recv(t)
            except TimeoutError:
                await self.drop_child()
                raise JobUnrenderable(f"compiling the template took longer than FILEDROP_RENDER_TIMEOUT ({t:g} s)") from None
            except ChildGone as e:
                await self.drop_child()
                raise JobUnrenderable(f"the render process died compiling the template (exit status {e.returncode}; "
                                      f"FILEDROP_RENDER_MEMORY is {self.settings.render_memory:,} bytes)") from None
            if header.get("job_id") != job.job_id:
                # Not the reply: answers the process still owed a claim that ended without killing
                # it. A fault of ours, not the job's (the caller hands the claim back).
                await self.drop_child()
                raise RuntimeError(f"render process {child.pid}: a message of {sorted(header)} came as the reply "
                                   f"to the compile of job {job.job_id}")
            if not header.get("ok"):
                if header.get("status") == "limit":
                    await self.drop_child()
                raise JobUnrenderable(f"the template cannot be compiled: {header.get('error')}")
            child.learnt(job.job_id)
        if child.assets_version(job.job_id) != job.version:
            items = {k: {"path": a.path, "size": a.size, "error": a.error} for k, a in job.assets.items()}
            await child.send({"op": "assets", "job_id": job.job_id, "items": items})
            child.set_assets_version(job.job_id, job.version)
        return child

    async def drop_child(self) -> None:
        """Kill and reap the render process (if any): nothing it was doing goes on."""
        child, self.child = self.child, None
        if child is not None:
            await child.close()


def _make_dir(root: Path, out_dir: Path) -> tuple[bool, str | None]:
    """(made it now, problem): the job's folder is made by its load, never by a publish. The
    root carries ext4's top-of-hierarchy hint (``spread_subdirs``, as the uploads folder): a
    batch's pages are then made in a block group ext4 picks for its folder, not where the
    batches dropped or expired last left their freed inodes (on this machine's disk, 2,000
    pages took 630-810 µs of CPU each there, 30-40 µs in a folder under the hint)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        spread_subdirs(root)
        out_dir.mkdir()
        return True, None
    except FileExistsError:
        return False, None if out_dir.is_dir() and not out_dir.is_symlink() else "File exists"
    except OSError as e:
        return False, e.strerror or str(e)


# ---- the process -------------------------------------------------------------------------------


async def serve(settings: Settings, worker_id: str | None = None) -> int:
    """Run one worker until SIGTERM/SIGINT (SIGUSR1: look for work now); its exit status (2:
    it refused to work, saying why)."""
    from server.uploads.operations import OperationRegistry
    from server.uploads.service import UploadService

    db = Database(settings.database, min(settings.database_pool, WORKER_POOL))
    fetcher = Fetcher(settings.fetch_allow, settings.fetch_timeout, settings.fetch_max_bytes)
    worker = Worker(db, settings, fetcher, UploadService(db, settings, OperationRegistry()), worker_id)
    await db.listen(queries.JOBS_CHANNEL, worker.poke)  # PostgreSQL: a job queued anywhere wakes it
    loop = asyncio.get_running_loop()
    deadline = threading.Timer(STOP_DEADLINE, _exit_late, (worker.id,))
    deadline.daemon = True

    def stop() -> None:
        worker.stop()
        if not deadline.is_alive():
            deadline.start()

    loop.add_signal_handler(signal.SIGTERM, stop)
    loop.add_signal_handler(signal.SIGINT, stop)
    loop.add_signal_handler(signal.SIGUSR1, worker.poke)
    task = asyncio.create_task(worker.run(), name=f"worker-{worker.id}")
    try:
        stopping = asyncio.create_task(worker.stopping.wait())
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not task.done():
            _done, pending = await asyncio.wait({task}, timeout=STOP_GRACE)
            if pending:
                log.warning("worker %s: still busy %.0f s after SIGTERM (waiting for the database or the disk?): "
                            "cancelling it", worker.id, STOP_GRACE)
                task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
        return 2 if worker.refused is not None else 0  # refused: logged in one line
    finally:
        await worker.drop_child()
        await fetcher.close()
        await db.dispose()


def _exit_late(worker_id: str) -> None:
    """The deadline thread: the worker is still there ``STOP_DEADLINE`` s after SIGTERM (a
    write waiting out busy_timeout, a thread in a disk sync, which cancelling cannot stop).
    Exit now: the render process dies with it (PR_SET_PDEATHSIG), and its rows and temp files
    go as a dead worker's (``filedrop serve`` at once; other workers within 2 s on this host)."""
    log.error("worker %s: still running %.0f s after SIGTERM: exiting now; its rows go back as a dead worker's",
              worker_id, STOP_DEADLINE)
    os._exit(1)


def main(settings: Settings, worker_id: str | None = None, parent: int | None = None) -> int:
    if parent is not None:  # started by `filedrop serve`: stop with it (SIGTERM: rows handed back)
        die_with_parent(parent, signal.SIGTERM)
    with contextlib.suppress(OSError):
        os.nice(NICE)
    gc.freeze()  # the modules loaded so far stay: full collections no longer walk them
    return asyncio.run(serve(settings, worker_id))

