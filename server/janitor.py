"""Cleanup plan/apply and drop, used by the CLI (``filedrop cleanup|drop``) and by the janitor
task that runs inside the server every ``FILEDROP_JANITOR_INTERVAL``.

What cleanup removes, one :class:`Item` each:

    expired-batch      an upload batch idle past its TTL (any state, tombstones too): rows and bytes
    chunk-leftovers    ``chunks/`` of a file that is already assembled (state complete)
    orphan-dir         an upload batch or file directory that no database row refers to
    missing-bytes      a complete file row whose ``data`` is gone; recorded chunks whose bytes are gone
    temp-file          a dot-name temp left by a crash (``.part`` of uploads and assembly, ``.tmp`` of
                       the publisher, a dropped smartlink folder), or an ended job's fetched assets
    expired-job        a finished job past its retention whose callback and e-mails are settled:
                       its rows (its smartlinks only with ``smartlinks=True``)
    orphan-smartlinks  (``smartlinks=True``) a smartlink directory no job refers to, untouched for
                       the retention

Invariants:

* Never removes what is in use. A batch is in use while its (or any of its files') idle clock is
  younger than the TTL, while any file under it was written within the grace
  (``FILEDROP_CLEANUP_GRACE``, 10 min: a chunk being received keeps touching its ``.part``), or
  while a running job uses it. These checks
  read only the database and the disk, so they hold for the CLI beside a live server too. A
  file being assembled keeps its batch. Nothing under a running job's smartlink directory is
  touched. The TTL is never shorter than the grace (the CLI refuses an ``--older-than`` below it).
* :func:`plan` only reads; :func:`apply` re-checks every item (a conditional ``UPDATE``/``DELETE``
  under the writer lock, or a fresh ``stat``), so what woke up in between is kept (result
  ``kept: in use``).
* Rows before bytes for a batch: its row first becomes a ``dropped`` tombstone (a late chunk is
  refused), then its bytes go, then the row. A failure in between leaves a tombstone that the
  next pass finishes.
* Idempotent: a second run right after the first finds nothing to do.
* One pass at a time, across every process (the CLI, each app process's janitor): a pass holds
  the ``janitor`` lock (an advisory lock on PostgreSQL, ``flock`` beside the SQLite file), so two
  never plan the same item and remove it twice. The CLI waits for a pass under way; the
  in-server janitor skips its turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web
from sqlalchemy import delete, exists, func, select, update

from server.config import Settings
from server.db import Database, log_failure, utcnow
from server.db.job_models import Job, JobRow
from server.db.models import Batch, BatchFile
from server.errors import BatchNotFound, JobRunning, NotFound, SmartlinkBatchNotFound
from server.jobs import assets as job_assets
from server.jobs import control as job_control
from server.jobs import queries as job_queries
from server.jobs import results as job_results
from server.jobs.contract import BATCH_ID_RE, MAX_NAME_PAIR, NAME_RE  # the names jobs check
from server.jobs.operation import reads_upload_batch
from server.jobs.publish import forget_owner
from server.jobs.states import ACTIVE as RUNNING  # holds its batch: running or waiting for data
from server.keys import DATABASE, JANITOR, SETTINGS
from server.uploads.assembly import Snapshot, chunks_present
from server.uploads.chunkset import ChunkSet
from server.uploads.rows import delete_files
from server.uploads.store import UploadStore

log = logging.getLogger("filedrop.janitor")

# A crash leftover is old; anything written more recently than the grace may belong to a request or
# a render still under way (a slow chunk keeps touching its .part file), so it is left alone. This
# is the default of FILEDROP_CLEANUP_GRACE (Settings.cleanup_grace), which every pass uses.
GRACE = 600.0
# How long `drop --smartlinks --force` waits for a running job to notice its cancel flag before
# marking it cancelled itself (no server may be running it at all).
CANCEL_WAIT = 10.0
SMARTLINK_EXTS = (".html", ".pdf")  # <reference_id>.<suffix><ext>, what a job publishes per row

Progress = Callable[[int, int, "Item"], None]  # (done, total, item just handled)


@dataclass
class Item:
    kind: str
    target: str  # what the table shows: a batch id, a job id, a path relative to the data dir
    bytes: int = 0
    detail: str = ""
    result: str = "planned"  # removed | would remove | kept: in use | error: ...
    # What apply needs (never shown).
    path: Path | None = None
    key: Any = None

    @property
    def failed(self) -> bool:
        return self.result.startswith("error")


@dataclass
class Plan:
    items: list[Item] = field(default_factory=list)
    dry_run: bool = False

    @property
    def bytes_freed(self) -> int:
        done = "would remove" if self.dry_run else "removed"
        return sum(i.bytes for i in self.items if i.result == done)

    @property
    def errors(self) -> list[Item]:
        return [i for i in self.items if i.failed]


# --- disk helpers (blocking; called through asyncio.to_thread) ---------------------------------


def _du(path: Path) -> int:
    """Bytes of the regular files under ``path`` (0 if it is gone); symlinks are not followed."""
    total = 0
    try:
        st = path.lstat()
    except FileNotFoundError:
        return 0
    if not path.is_dir() or path.is_symlink():
        return st.st_size
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _newest_mtime(path: Path) -> float:
    """The newest mtime of ``path`` and everything under it (0.0 if it is gone)."""
    try:
        newest = path.lstat().st_mtime
    except FileNotFoundError:
        return 0.0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            with contextlib.suppress(FileNotFoundError):
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def _remove_counted(path: Path, tick: Callable[[int], None]) -> None:
    """``_remove`` for a big tree, file by file, calling ``tick(files removed so far)`` now and
    then (from this thread) so a terminal can show progress."""
    n = 0
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(root, name))
            n += 1
            if n % 100 == 0:
                tick(n)
        for name in dirs:
            _remove(Path(root) / name)
    _remove(path)
    tick(n)


def _count_files(path: Path) -> int:
    return sum(len(files) for _root, _dirs, files in os.walk(path))


def _remove(path: Path) -> None:
    """Remove a file or a directory tree; what is already gone is fine."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def _listdir(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _is_temp(name: str) -> bool:
    """Dot-names the server writes before an os.replace (NGINX refuses to serve them)."""
    return name.startswith(".") and (name.endswith(".part") or name.endswith(".tmp"))


def _quiet_since(path: Path, wall_cutoff: float) -> bool:
    """Nothing under ``path`` was written since ``wall_cutoff``, and it is still there: a path
    that vanished while the plan was made was in use (a completed file's dir, removed just after
    the listing that found it), not a leftover."""
    newest = _newest_mtime(path)
    return 0.0 < newest < wall_cutoff


def _older(path: Path, wall_cutoff: float) -> bool:
    try:
        return path.lstat().st_mtime < wall_cutoff
    except FileNotFoundError:
        return False


# --- plan ---------------------------------------------------------------------------------------


@dataclass
class _Ages:
    now: datetime
    wall: float  # time.time() at the same moment, for mtimes
    ttl: float
    retention: float
    grace: float

    @property
    def batch_cutoff(self) -> datetime:
        return self.now - timedelta(seconds=self.ttl)

    @property
    def grace_cutoff(self) -> datetime:
        return self.now - timedelta(seconds=self.grace)

    @property
    def job_cutoff(self) -> datetime:
        return self.now - timedelta(seconds=self.retention)

    @property
    def wall_grace(self) -> float:
        return self.wall - self.grace


def _ages(settings: Settings, older_than: float | None) -> _Ages:
    ttl = settings.batch_ttl if older_than is None else older_than
    retention = settings.job_retention if older_than is None else older_than
    # Never shorter than the grace: an upload or a job's notifications may still be under way.
    # (The CLI refuses an --older-than below it rather than let this raise it silently.)
    grace = settings.cleanup_grace
    return _Ages(now=utcnow(), wall=time.time(), ttl=max(ttl, grace), retention=max(retention, grace),
                 grace=grace)


def _rel(settings: Settings, path: Path) -> str:
    """A path as the table shows it: relative to the data dir when under it."""
    try:
        return str(path.relative_to(settings.data_dir))
    except ValueError:
        return str(path)


async def plan(db: Database, settings: Settings, *, older_than: float | None = None,
               smartlinks: bool = False) -> Plan:
    """What a cleanup would remove now (read-only). ``older_than`` (seconds) replaces both the
    batch TTL and the job retention; either is at least the grace (``settings.cleanup_grace``)."""
    ages = _ages(settings, older_than)
    out = Plan()
    async with db.read() as s:
        running = (await s.execute(select(Job.job_id, Job.batch_id, Job.upload_batch_id, Job.owner)
                                   .where(Job.status.in_(RUNNING)))).all()
        batches = (await s.execute(
            select(Batch.id, Batch.batch_id, Batch.owner, Batch.state, Batch.updated_at,
                   func.max(BatchFile.updated_at).label("files_updated_at"))
            .outerjoin(BatchFile, BatchFile.batch_pk == Batch.id).group_by(Batch.id))).all()
        files = (await s.execute(select(BatchFile.id, BatchFile.batch_pk, BatchFile.state, BatchFile.updated_at,
                                        BatchFile.size, BatchFile.chunk_count, BatchFile.chunk_size,
                                        BatchFile.chunk_ids, BatchFile.loose_ids))).all()
        # A job whose callback or e-mails are still to be sent (ended while no server ran, or a
        # `drop` tombstone kept for them) waits for the notifier, however old: it expires once
        # they are settled.
        expired_jobs = (await s.execute(
            select(Job.job_id, Job.batch_id, Job.finished).where(
                Job.finished.is_not(None), Job.finished < ages.job_cutoff, Job.status.not_in(RUNNING),
                ~job_queries.unsent())
            .order_by(Job.finished))).all()
        job_batches = set((await s.scalars(select(Job.batch_id).distinct())).all())
        job_ids = set((await s.scalars(select(Job.job_id))).all())
        stems_of: dict[str, set[str]] = {}
        if smartlinks:
            for r in (await s.execute(
                    select(JobRow.job_id, JobRow.reference_id, JobRow.suffix).join(Job, Job.job_id == JobRow.job_id)
                    .where(Job.finished.is_not(None), Job.finished < ages.job_cutoff,
                           Job.status.not_in(RUNNING), ~job_queries.unsent()))).all():
                stems_of.setdefault(r.job_id, set()).update(_stems([r]))
    busy_uploads = {(r.owner, r.upload_batch_id) for r in running if r.upload_batch_id}  # reads_upload_batch
    busy_smartlinks = {r.batch_id for r in running}
    await asyncio.to_thread(_plan_uploads, settings, ages, out, batches, files, busy_uploads)
    await asyncio.to_thread(_plan_smartlinks, settings, ages, out, expired_jobs, job_batches,
                            busy_smartlinks, smartlinks, stems_of)
    await asyncio.to_thread(_plan_job_assets, settings, ages, out, {r.job_id for r in running})
    await asyncio.to_thread(_plan_job_results, settings, ages, out, job_ids)
    kinds: dict[str, int] = {}
    for i in out.items:
        kinds[i.kind] = kinds.get(i.kind, 0) + 1
    log.log(logging.INFO if out.items else logging.DEBUG, "cleanup plan: %s (batch TTL %.0f s, job retention "
            "%.0f s, %d running job(s))", ", ".join(f"{n} {k}" for k, n in kinds.items())
            or "nothing to remove", ages.ttl, ages.retention, len(running))
    return out


def _plan_uploads(settings: Settings, ages: _Ages, out: Plan, batches: Iterable[Any],
                  files: Iterable[Any], busy: set[tuple[str, str]]) -> None:
    root = settings.uploads_dir
    store = UploadStore(root)
    by_pk = {b.id: b for b in batches}
    files_of: dict[int, dict[int, Any]] = {}
    for f in files:
        files_of.setdefault(f.batch_pk, {})[f.id] = f

    expired: set[int] = set()
    for b in by_pk.values():
        bdir = store.batch_dir(b.id)
        idle_since = max(b.updated_at, b.files_updated_at or b.updated_at)
        if idle_since >= ages.batch_cutoff or (b.owner, b.batch_id) in busy:
            continue
        if _newest_mtime(bdir) >= ages.wall_grace:  # a chunk still arriving or being assembled
            continue
        expired.add(b.id)
        n = len(files_of.get(b.id, {}))
        out.items.append(Item("expired-batch", b.batch_id, _du(bdir), f"{b.state}, {n} file(s)",
                              path=bdir, key=b.id))

    # Per-file leftovers of the batches that stay.
    for pk, fs in files_of.items():
        b = by_pk[pk]
        if pk in expired or (b.owner, b.batch_id) in busy:
            continue
        for f in fs.values():
            fdir = store.file_dir(pk, f.id)
            settled = f.updated_at < ages.grace_cutoff
            if f.state == "complete" and settled:
                for left in (store.chunks_dir(pk, f.id), store.partial_path(pk, f.id)):
                    if left.exists():  # a complete file's file dir goes; this one was left behind
                        out.items.append(Item("chunk-leftovers", _rel(settings, left), _du(left),
                                              f"batch {b.batch_id}", path=left, key=f.id))
                data = store.data_path(pk, f.id)
                if b.state == "open" and not data.exists():
                    out.items.append(Item("missing-bytes", _rel(settings, data), 0,
                                          f"batch {b.batch_id}: file row of a complete file without data",
                                          path=data, key=f.id))
            if f.state == "receiving" and settled and b.state == "open":
                kept = chunks_present(store, Snapshot.of(f))[0]
                gone = [i for i in ChunkSet(f.chunk_ids).ids() if i not in kept]
                if gone:
                    out.items.append(Item("missing-bytes", _rel(settings, fdir), 0,
                                          f"batch {b.batch_id}: chunks {gone} recorded without their bytes",
                                          path=fdir, key=(f.id, "chunks")))
            if f.state != "assembling":
                for d in (fdir, store.chunks_dir(pk, f.id)):
                    for e in _listdir(d):
                        p = Path(e.path)
                        if _is_temp(e.name) and _older(p, ages.wall_grace):
                            out.items.append(Item("temp-file", _rel(settings, p), _du(p),
                                                  f"batch {b.batch_id}", path=p))

    # Directories no row refers to (a crash between mkdir and commit, or a row removed by hand).
    marker = UploadStore(root).sync_marker.name  # the service's durability point: never an orphan
    for e in _listdir(root):
        p = Path(e.path)
        if e.name == marker:
            continue
        pk = int(e.name) if e.name.isdigit() else None
        if pk is None or pk not in by_pk:
            if _quiet_since(p, ages.wall_grace):
                out.items.append(Item("orphan-dir", _rel(settings, p), _du(p), "no batch row", path=p))
            continue
        b = by_pk[pk]
        if pk in expired or (b.owner, b.batch_id) in busy:
            continue
        known = files_of.get(pk, {})
        for fe in _listdir(p):
            fp = Path(fe.path)
            if _is_temp(fe.name):  # a whole-file upload being received: <batch dir>/.<idx>.<random>.part
                if _older(fp, ages.wall_grace):
                    out.items.append(Item("temp-file", _rel(settings, fp), _du(fp), f"batch {b.batch_id}", path=fp))
                continue
            fid = _file_id(fe.name)  # <file id>/ (a file dir) or <file id>.data (a complete file)
            if (fid is None or fid not in known) and _quiet_since(fp, ages.wall_grace):
                out.items.append(Item("orphan-dir", _rel(settings, fp), _du(fp),
                                      f"no file row in batch {b.batch_id}", path=fp))


def _file_id(name: str) -> int | None:
    """The file row id an entry of a batch dir belongs to: ``<id>`` (its file dir) or
    ``<id>.data`` (the complete file)."""
    stem = name[:-len(".data")] if name.endswith(".data") else name
    return int(stem) if stem.isdigit() else None


def _plan_smartlinks(settings: Settings, ages: _Ages, out: Plan, expired_jobs: Iterable[Any],
                     job_batches: set[str], busy: set[str], smartlinks: bool,
                     stems_of: dict[str, set[str]]) -> None:
    root = settings.smartlink_root
    assert root is not None
    for j in expired_jobs:
        if j.batch_id in busy:  # a later run of the same batch is writing into the same directory
            continue
        d = root / j.batch_id if BATCH_ID_RE.fullmatch(j.batch_id) else None
        # With smartlinks: its files' bytes (apply reports what it really freed: names a newer
        # job of the batch also published stay).
        size = sum(_du(d / (stem + ext)) for stem in stems_of.get(j.job_id, ()) for ext in SMARTLINK_EXTS) \
            if smartlinks and d is not None else 0
        out.items.append(Item("expired-job", j.job_id, size,
                              f"batch {j.batch_id}, finished {j.finished:%Y-%m-%d %H:%M}Z"
                              + (", with its smartlinks" if smartlinks else ""),
                              path=d, key=(j.job_id, j.batch_id, smartlinks)))
    for e in _listdir(root):
        if _is_temp(e.name) and _quiet_since(Path(e.path), ages.wall_grace):  # a drop cut short
            out.items.append(Item("temp-file", _rel(settings, Path(e.path)), _du(Path(e.path)),
                                  "a dropped smartlink folder", path=Path(e.path)))
            continue
        if not e.is_dir(follow_symlinks=False) or not BATCH_ID_RE.fullmatch(e.name) or e.name in busy:
            continue
        d = Path(e.path)
        for f in _listdir(d):
            p = Path(f.path)
            if _is_temp(f.name) and _older(p, ages.wall_grace):
                out.items.append(Item("temp-file", _rel(settings, p), _du(p), f"batch {e.name}", path=p))
        if smartlinks and e.name not in job_batches and _quiet_since(d, ages.wall - ages.retention):
            out.items.append(Item("orphan-smartlinks", _rel(settings, d), _du(d), "no job row",
                                  path=d, key=e.name))


def _plan_job_assets(settings: Settings, ages: _Ages, out: Plan, running: set[str]) -> None:
    """Fetched assets of a job that is no longer running (its end removes them; a crash
    between the two leaves them)."""
    for e in _listdir(settings.assets_dir):
        p = Path(e.path)
        if e.name not in running and _quiet_since(p, ages.wall_grace):
            out.items.append(Item("temp-file", _rel(settings, p), _du(p), f"assets of job {e.name}", path=p))


def _plan_job_results(settings: Settings, ages: _Ages, out: Plan, jobs: set[str]) -> None:
    """Result CSVs (what signed download URLs serve) of jobs that are gone (dropped, or removed
    by a cleanup that stopped half-way), and crash leftovers of their writing."""
    for e in _listdir(settings.results_dir):
        p = Path(e.path)
        gone = e.name.endswith(job_results.SUFFIX) and e.name.removesuffix(job_results.SUFFIX) not in jobs
        if (gone or _is_temp(e.name)) and _older(p, ages.wall_grace):
            out.items.append(Item("temp-file", _rel(settings, p), _du(p), "result CSV of a job that is gone"
                                  if gone else "result CSV temp left by a crash", path=p))


# --- apply --------------------------------------------------------------------------------------


async def apply(db: Database, settings: Settings, the_plan: Plan, *, dry_run: bool = False,
                older_than: float | None = None, progress: Progress | None = None) -> Plan:
    """Carry out ``the_plan`` item by item, re-checking each; errors are recorded per item (and
    logged), never raised. With ``dry_run`` nothing changes: every item reads ``would remove``."""
    the_plan.dry_run = dry_run
    ages = _ages(settings, older_than)
    total = len(the_plan.items)
    for n, item in enumerate(the_plan.items, 1):
        if dry_run:
            item.result = "would remove"
            log.info("would remove %s %s (%d bytes) %s", item.kind, item.target, item.bytes, item.detail)
        else:
            try:
                kept = not await _APPLY[item.kind](db, settings, ages, item)
                item.result = "kept: in use" if kept else "removed"
                log.info("%s %s %s (%d bytes) %s", "kept (in use)" if kept else "removed", item.kind,
                         item.target, item.bytes, item.detail)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # one failure must not stop the rest of the pass
                log.error("could not remove %s %s: %s", item.kind, item.target, e)
                first_line = " ".join(str(e).partition("\n")[0].split())  # one table row per item
                item.result = f"error: {e.__class__.__name__}: {first_line}"
        if progress is not None:
            progress(n, total, item)
    return the_plan


async def _apply_expired_batch(db: Database, settings: Settings, ages: _Ages, item: Item) -> bool:
    assert item.path is not None
    if await asyncio.to_thread(_newest_mtime, item.path) >= time.time() - ages.grace:
        return False
    cutoff = ages.batch_cutoff
    fresh_file = exists().where(BatchFile.batch_pk == Batch.id, BatchFile.updated_at >= cutoff)
    used_by_job = exists().where(reads_upload_batch(Batch.owner, Batch.batch_id), Job.status.in_(RUNNING))
    async with db.write() as s:
        res = await s.execute(update(Batch).where(Batch.id == item.key, Batch.updated_at < cutoff,
                                                  ~fresh_file, ~used_by_job).values(state="dropped"))
    if res.rowcount == 0:
        return False
    await asyncio.to_thread(_remove, item.path)
    async with db.write() as s:
        await s.execute(delete(Batch).where(Batch.id == item.key))
    return True


async def _apply_chunk_leftovers(db: Database, settings: Settings, ages: _Ages, item: Item) -> bool:
    async with db.read() as s:
        state = await s.scalar(select(BatchFile.state).where(BatchFile.id == item.key))
    if state != "complete":
        return False
    assert item.path is not None
    await asyncio.to_thread(_remove, item.path)
    with contextlib.suppress(OSError):  # the file dir, once nothing is left in it
        item.path.parent.rmdir()
    return True


async def _apply_missing_bytes(db: Database, settings: Settings, ages: _Ages, item: Item) -> bool:
    assert item.path is not None
    settled = BatchFile.updated_at < ages.grace_cutoff
    if isinstance(item.key, tuple):  # a receiving file: forget its chunks without bytes (clients resend them)
        file_id = item.key[0]
        async with db.read() as s:
            row = (await s.execute(select(BatchFile).where(BatchFile.id == file_id, BatchFile.state == "receiving",
                                                           settled))).scalar_one_or_none()
            snap = Snapshot.of(row) if row is not None else None
            synced = ChunkSet(row.synced_ids) if row is not None else ChunkSet()
        if snap is None:
            return False
        ids, loose, received = await asyncio.to_thread(chunks_present, UploadStore(settings.uploads_dir), snap)
        if bytes(ids) == snap.chunk_ids:
            return False
        async with db.write() as s:
            res = await s.execute(update(BatchFile).where(
                BatchFile.id == file_id, BatchFile.state == "receiving", BatchFile.chunk_ids == snap.chunk_ids)
                .values(chunk_ids=bytes(ids), loose_ids=bytes(loose), received=received,
                        synced_ids=bytes(ChunkSet.of(i for i in synced.ids() if i in ids))))
        return res.rowcount == 1  # type: ignore[attr-defined]
    if item.path.exists():
        return False
    async with db.write() as s:
        deleted = await delete_files(s, BatchFile.id == item.key, BatchFile.state == "complete", settled)
    if not deleted:
        return False
    await asyncio.to_thread(_remove, item.path.with_suffix(""))  # what is left of its file dir
    return True


async def _apply_orphan_dir(db: Database, settings: Settings, ages: _Ages, item: Item) -> bool:
    assert item.path is not None
    rel = item.path.relative_to(settings.uploads_dir).parts
    async with db.read() as s:
        if rel[0].isdigit() and await s.scalar(select(Batch.id).where(Batch.id == int(rel[0]))):
            fid = _file_id(rel[1]) if len(rel) > 1 else None
            if len(rel) == 1 or (fid is not None and await s.scalar(
                    select(BatchFile.id).where(BatchFile.id == fid, BatchFile.batch_pk == int(rel[0])))):
                return False
    if await asyncio.to_thread(_newest_mtime, item.path) >= time.time() - ages.grace:
        return False
    await asyncio.to_thread(_remove, item.path)
    return True


async def _apply_temp_file(db: Database, settings: Settings, ages: _Ages, item: Item) -> bool:
    assert item.path is not None
    if not _older(item.path, time.time() - ages.grace):
        return not item.path.exists()
    await asyncio.to_thread(_remove, item.path)
    return True


async def _apply_expired_job(db: Database, settings: Settings, ages: _Ages, item: Item) -> bool:
    job_id, batch_id, with_smartlinks = item.key
    names: set[str] = set()
    gone = None
    root = settings.smartlink_root
    async with db.write() as s:
        if with_smartlinks:
            # Under the batch's start lock (as drop does): see below.
            await db.serialize(s, "job-start", batch_id)
            names = _stems((await s.execute(select(JobRow.reference_id, JobRow.suffix)
                                            .where(JobRow.job_id == job_id))).all())
        res = await s.execute(delete(Job).where(Job.job_id == job_id, Job.finished.is_not(None),
                                                Job.status.not_in(RUNNING), ~job_queries.unsent()))
        if res.rowcount == 0:
            return False
        # Names a remaining job of the same batch also published stay (a re-run overwrote them).
        keep = set()
        if names:
            keep = _stems((await s.execute(
                select(JobRow.reference_id, JobRow.suffix).join(Job, Job.job_id == JobRow.job_id)
                .where(Job.batch_id == batch_id))).all())
        others = await s.scalar(select(func.count()).select_from(Job).where(Job.batch_id == batch_id))
        running = others and await s.scalar(select(func.count()).select_from(Job)
                                            .where(Job.batch_id == batch_id, Job.status.in_(RUNNING)))
        if with_smartlinks and not others and root is not None:
            # The batch's last job: its folder holds no other job's page. Moved out of reach in
            # this transaction, so that a job started after it gets a new folder; removed page by
            # page after the commit, a job started meanwhile had its pages of the same names
            # removed once published, or its folder removed under it.
            gone = await asyncio.to_thread(_rename_away, root, batch_id)
    # What was really freed: the pages removed (none while a newer run of the batch writes), and
    # the job's signed downloads' CSV, which the plan did not count.
    item.bytes = 0
    if gone is not None:
        item.bytes = await asyncio.to_thread(_du, gone)
        await asyncio.to_thread(_remove, gone)
    elif names and item.path is not None and not running:
        # Other jobs of the batch stay (ended: a running one leaves every page to it). A job
        # started between the commit and these unlinks that publishes one of these names,
        # which no remaining job had, loses that page: a narrow race, left (README).
        item.bytes = await asyncio.to_thread(_remove_smartlinks, item.path, names - keep)
    csv = job_results.path_of(settings, job_id)
    item.bytes += await asyncio.to_thread(_du, csv)
    await asyncio.to_thread(_remove, csv)
    return True


def _stems(rows: Iterable[Any]) -> set[str]:
    """``<reference_id>.<suffix>`` of job rows, only where both are valid names that fit one file
    name: an errored row may carry anything (``../x``, 257 characters), and it published nothing."""
    return {f"{r.reference_id}.{r.suffix}" for r in rows
            if NAME_RE.fullmatch(r.reference_id) and NAME_RE.fullmatch(r.suffix)
            and len(r.reference_id) + len(r.suffix) <= MAX_NAME_PAIR}


def _remove_smartlinks(d: Path, stems: set[str]) -> int:
    freed = 0
    for stem in stems:
        for ext in SMARTLINK_EXTS:
            p = d / (stem + ext)
            freed += _du(p)
            _remove(p)
    return freed


async def _apply_orphan_smartlinks(db: Database, settings: Settings, ages: _Ages, item: Item) -> bool:
    assert item.path is not None and settings.smartlink_root is not None
    if await asyncio.to_thread(_newest_mtime, item.path) >= time.time() - ages.retention:
        return False
    # Still no job, checked and the folder moved out of reach in one transaction under the
    # batch's start lock (as drop does): a job started meanwhile keeps it; one started after
    # gets a new folder instead of publishing into the one being removed.
    root = settings.smartlink_root
    async with db.write() as s:
        await db.serialize(s, "job-start", item.key)
        if await s.scalar(select(func.count()).select_from(Job).where(Job.batch_id == item.key)):
            return False
        gone = await asyncio.to_thread(_rename_away, root, item.key)
    if gone is None:
        return False
    await asyncio.to_thread(_remove, gone)
    return True


_APPLY = {
    "expired-batch": _apply_expired_batch,
    "chunk-leftovers": _apply_chunk_leftovers,
    "missing-bytes": _apply_missing_bytes,
    "orphan-dir": _apply_orphan_dir,
    "temp-file": _apply_temp_file,
    "expired-job": _apply_expired_job,
    "orphan-smartlinks": _apply_orphan_smartlinks,
}


def one_at_a_time(db: Database, wait: float | None) -> contextlib.AbstractAsyncContextManager[bool]:
    """The ``janitor`` lock for one pass: yields False if another pass held it for ``wait``
    seconds (None: as long as it takes, saying so once in the log)."""
    return db.locks.held("janitor", wait=wait,
                         waiting=lambda: log.info("another cleanup is running: waiting for it to finish"))


async def cleanup(db: Database, settings: Settings, *, older_than: float | None = None,
                  dry_run: bool = False, smartlinks: bool = False,
                  progress: Progress | None = None) -> Plan:
    """Plan, then apply (or only mark, with ``dry_run``). See the module docstring. The caller
    holds the ``janitor`` lock (``one_at_a_time``)."""
    the_plan = await plan(db, settings, older_than=older_than, smartlinks=smartlinks)
    return await apply(db, settings, the_plan, dry_run=dry_run, older_than=older_than, progress=progress)


# --- drop ---------------------------------------------------------------------------------------


async def _cancel_running(db: Database, settings: Settings, job_filter: Any, what: str, force: bool,
                          cancel_wait: float) -> list[str]:
    """Refuse (Conflict) while jobs matching ``job_filter`` run, unless ``force``: then cancel them
    through the jobs code, as an API cancel does (a live server's workers may hold their rows, in
    other processes): pending rows are skipped at once, a worker mid-row kills its render and
    ends the job as ``Cancelled``. If no worker does so within ``cancel_wait`` (none may be
    running), the jobs are ended here; a worker that still held a row cannot publish it into
    the dropped folder afterwards (see ``drop_smartlink_batch``)."""
    async with db.read() as s:
        running = list((await s.scalars(select(Job.job_id).where(job_filter, Job.status.in_(RUNNING)))).all())
    if not running:
        return []
    if not force:
        raise JobRunning(f"{what} is in use by running job(s) {', '.join(running)}: "
                         "retry when they finish, or use --force to cancel them first")
    await job_control.cancel(db, settings, running, "cancelled by `filedrop drop --force`")
    log.info("asked running job(s) %s to cancel", ", ".join(running))
    still = await job_control.wait_ended(db, running, cancel_wait)
    if still:
        # Ended as a worker would (notifications become pending: the next server sends them).
        for job_id in still:
            await job_control.end(db, settings, job_id, forced="no worker stopped it in time")
        log.warning("job(s) %s did not stop within %.1f s: marked Cancelled", ", ".join(still), cancel_wait)
    return running


async def drop_upload_batch(db: Database, settings: Settings, batch_id: str, *, force: bool = False,
                            cancel_wait: float = CANCEL_WAIT) -> Item:
    """Remove an upload batch's file rows and bytes through the upload service's own drop; its
    row stays as a ``dropped`` tombstone (as after an API drop) until cleanup expires it. A batch
    already closed only loses what bytes are left. Raises NotFound, or Conflict while a running
    job reads it (unless ``force``, which cancels that job first). A closed batch with nothing
    left is NotFound ("already dropped"): a second drop says the batch was not there."""
    from server.uploads.operations import OperationRegistry
    from server.uploads.service import UploadService

    async with db.read() as s:
        b = (await s.execute(select(Batch.id, Batch.state, Batch.owner).where(Batch.batch_id == batch_id))).first()
        if b is not None:
            nfiles = await s.scalar(select(func.count()).select_from(BatchFile).where(BatchFile.batch_pk == b.id))
    if b is None:
        raise BatchNotFound(f"no upload batch {batch_id!r}")
    bdir = UploadStore(settings.uploads_dir).batch_dir(b.id)
    if b.state != "open" and not await asyncio.to_thread(bdir.exists):
        raise BatchNotFound(f"upload batch {batch_id!r} is already {b.state}: nothing left to remove")
    cancelled = await _cancel_running(db, settings, reads_upload_batch(b.owner, batch_id), f"upload batch {batch_id!r}",
                                      force, cancel_wait)
    size = await asyncio.to_thread(_du, bdir)
    item = Item("drop-batch", batch_id, size, f"was {b.state}, {nfiles} file(s)"
                + (f", cancelled job(s) {', '.join(cancelled)}" if cancelled else ""), result="removed")
    try:
        if b.state == "open":
            with contextlib.suppress(NotFound):  # closed meanwhile: then only leftovers remain
                await UploadService(db, settings, OperationRegistry()).drop_batch(b.owner, batch_id)
        await asyncio.to_thread(_remove, bdir)
    except OSError as e:  # the rows went first (a tombstone): a later drop or cleanup removes the rest
        item.result = f"error: {e.__class__.__name__}: {e.strerror or e}"
        log.error("upload batch %s: could not remove %s: %s", batch_id, bdir, e)
        return item
    log.info("dropped upload batch %s (%d bytes) %s", batch_id, size, item.detail)
    return item


def _rename_away(root: Path, batch_id: str) -> Path | None:
    """Move a smartlink folder out of NGINX's reach in one step (a dot name, which nginx.conf
    refuses, in the same root); None if there is none. Publishing goes by path into
    ``<root>/<batch_id>/`` and never creates it, so a late publish fails instead of writing into
    a live folder, and the tree can then be removed without new files appearing in it."""
    gone = root / f".{batch_id}.{secrets.token_hex(4)}.dropped.tmp"
    try:
        os.rename(root / batch_id, gone)
    except FileNotFoundError:
        return None
    forget_owner(root, batch_id)  # the batch_id is free again
    return gone


async def drop_smartlink_batch(db: Database, settings: Settings, batch_id: str, *, force: bool = False,
                               cancel_wait: float = CANCEL_WAIT, progress: Progress | None = None) -> Item:
    """Remove a smartlink batch's published files and its jobs' rows (jobs, rows, logs): the rows
    go and the folder is moved out of NGINX's reach in one transaction, then the files go. A job
    whose callback or e-mails are still to be sent keeps its job row, hidden from every API
    (404), until the server's notifier has sent them (``queries.drop_batch``). Raises NotFound
    when there is neither, Conflict while one of its jobs runs unless ``force`` (or when one
    started since). ``progress`` hears (files removed, files) while the files go. Once it
    returns the folder is gone and stays gone: it is renamed away first (``_rename_away``)."""
    if not BATCH_ID_RE.fullmatch(batch_id):
        raise SmartlinkBatchNotFound(f"{batch_id!r} is not a smartlink batch id")
    assert settings.smartlink_root is not None
    d = settings.smartlink_root / batch_id
    async with db.read() as s:
        job_ids = list((await s.scalars(select(Job.job_id).where(Job.batch_id == batch_id))).all())
    njobs = len(job_ids)
    if not njobs and not d.exists():
        raise SmartlinkBatchNotFound(f"no smartlink batch {batch_id!r} (no job and no {d})")
    cancelled = await _cancel_running(db, settings, Job.batch_id == batch_id, f"smartlink batch {batch_id!r}",
                                      force, cancel_wait)
    # A job whose callback or e-mails are still to be sent (one --force just ended, say) keeps a
    # tombstone no API can see until the server's notifier has sent them (queries.drop_batch).
    # The folder is renamed away in the same transaction, under the batch's start lock: a job
    # started meanwhile refuses the drop (JobRunning), one started after it gets a new folder.
    # (Renamed after the rows were gone, a start in between published into the folder then
    # removed: its rows said succeeded, its pages were 404.)
    root = settings.smartlink_root
    item = Item("drop-smartlinks", batch_id, 0, f"{njobs} job(s)"
                + (f", cancelled {', '.join(cancelled)}" if cancelled else ""), result="removed")
    gone = None
    try:
        job_ids, kept, gone = await job_queries.drop_batch(db, batch_id, lambda: _rename_away(root, batch_id))
    except OSError as e:  # the folder could not be moved: nothing was dropped (the transaction rolled back)
        item.result = f"error: {e.__class__.__name__}: {e.strerror or e}"
        log.error("smartlink batch %s not dropped: could not move %s out of reach: %s", batch_id, d, e)
        return item
    if kept:
        log.info("job(s) %s: their notifications are left to the server's notifier (sent by a running "
                 "or the next server)", ", ".join(kept))
    for job_id in job_ids:
        await asyncio.to_thread(job_assets.release, settings, job_id)
    try:
        item.bytes = await asyncio.to_thread(_du, gone) if gone is not None else 0
        if gone is None:
            pass
        elif progress is None:
            await asyncio.to_thread(_remove, gone)
        else:
            total = await asyncio.to_thread(_count_files, gone)
            await asyncio.to_thread(_remove_counted, gone, lambda n: progress(n, total, item))
    except OSError as e:  # renamed away already: the next cleanup removes the rest
        item.result = f"error: {e.__class__.__name__}: {e.strerror or e}"
        log.error("dropped smartlink batch %s, but could not remove %s: %s", batch_id, gone, e)
        return item
    log.info("dropped smartlink batch %s (%d bytes) %s", batch_id, item.bytes, item.detail)
    return item


# --- the janitor inside the server --------------------------------------------------------------


class Janitor:
    """Runs :func:`cleanup` every ``interval`` seconds in one owned task. ``passed`` is set after
    each pass (tests wait on it); ``last`` is the last pass's plan."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        self.passes = 0
        self.last: Plan | None = None
        self.passed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def run_once(self) -> Plan:
        async with one_at_a_time(self.db, wait=0) as mine:
            if not mine:  # another process is cleaning up: its pass covers this one
                log.debug("janitor: another process holds the janitor lock; skipping this pass")
                self.passed.set()
                return Plan()
            result = await cleanup(self.db, self.settings, smartlinks=self.settings.janitor_smartlinks)
        self.passes += 1
        self.last = result
        if result.items:
            log.info("janitor pass %d: %d item(s), %d bytes freed, %d error(s)", self.passes,
                     len(result.items), result.bytes_freed, len(result.errors))
        self.passed.set()
        return result

    async def run_forever(self, interval: float) -> None:
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bad pass (e.g. the disk went away) must not end the janitor
                log_failure(log, "janitor pass failed", e)
            await asyncio.sleep(interval)


async def janitor_context(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    janitor = Janitor(app[DATABASE], settings)
    app[JANITOR] = janitor
    if settings.janitor_interval > 0:
        janitor.task = asyncio.create_task(janitor.run_forever(settings.janitor_interval),
                                           name="filedrop-janitor")
    yield
    if janitor.task is not None:
        janitor.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await janitor.task
