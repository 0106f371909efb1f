"""When upload bytes and records survive a power loss.

* **Group syncs.** ``Durability.synced()`` returns once a sync that *started after the call*
  has finished: one ``syncfs`` of the uploads' file system (which holds the database's WAL too,
  unless the database lives elsewhere: then its WAL is fsynced as well; PostgreSQL flushes its
  own before a commit returns). Callers arriving while a sync runs share the next one
  (leader/follower, as PostgreSQL flushes its WAL for a group of commits), so N requests
  completing together cost two syncs, not 5 N fsyncs.
* **A file answered complete is durable**: its bytes are synced before the transaction that
  records it complete (so the record can never outlive its bytes), and that commit, with the
  renames done inside it, is synced before the answer (``server.uploads.recorder``).
* **Chunks of a bigger file** are recorded as soon as their bytes are written (a ``kill -9``
  cannot lose them: the page cache outlives the process) and become power-loss durable at chunk
  points: at most every second while chunks arrive, and at every clean stop, a sync runs, then
  the chunk ids *this process* recorded before it are added to their files' ``synced_ids`` (the
  rows locked, in id order). A process vouches only for the bytes it wrote: with several app
  processes, on one host or several sharing the data dir, one host's sync never marks another
  host's unsynced chunks.
* **After a reboot** (the boot id this host last recorded in ``uploads/.synced`` is not this
  boot's), a file recorded complete whose rename was lost gets its synced bytes back (see
  ``_restore_complete``), and every file still receiving forgets the chunks not in
  ``synced_ids`` (loose chunk files removed, ``received`` recomputed) and its client sends them
  again: it asks which ids the server has. The start runs under the ``uploads-start`` lock, so of
  the processes starting after a reboot only the first forgets (before any of them records a
  chunk of this boot). ``.synced`` keeps one boot id per host: another host's start is not a
  reboot of this one.
* **A restart in the same boot** loses nothing: on SQLite (one host) the start syncs and marks
  every recorded chunk. On PostgreSQL it marks none (another host's unsynced chunks may be
  recorded): what a crashed process recorded stays unmarked, which costs at most a resend after
  a later reboot.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import bindparam, select, update

from server.db import Database, log_failure, utcnow
from server.db.models import BatchFile
from server.durable import boot_id, fsync_dir, syncfs
from server.uploads.chunkset import ChunkSet
from server.uploads.model import chunk_length
from server.uploads.rows import delete_files
from server.uploads.store import UploadStore, make_dirs, remove, replace_making_dirs

log = logging.getLogger("filedrop.uploads")
_UNSETTLED = ("receiving", "assembling")
_IN_BATCH = 500  # ids per IN (...) list


class SyncBarrier:
    """``wait()`` returns once a run of ``fn`` that started after the call has finished (or
    raises its error). Calls made while ``fn`` runs share the next run."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn = fn
        self._next: asyncio.Future[None] | None = None
        self._runner: asyncio.Task[None] | None = None
        self.runs = 0

    async def wait(self) -> None:
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        fut = self._next
        if self._runner is None or self._runner.done():
            self._runner = asyncio.ensure_future(self._run())
        # Shielded: a caller that goes away does not cancel the sync the others wait for.
        await asyncio.shield(fut)

    async def _run(self) -> None:
        while self._next is not None:
            fut, self._next = self._next, None
            try:
                await asyncio.to_thread(self._fn)
            except BaseException as e:  # handed to every waiter; a cancel (shutdown) ends the runner
                fut.set_exception(e if isinstance(e, Exception) else asyncio.CancelledError())
                fut.exception()  # retrieved here: a waiter may have gone away
                if not isinstance(e, Exception):
                    raise
            else:
                fut.set_result(None)
            self.runs += 1

    async def aclose(self) -> None:
        """Wait for the running sync (and the one queued behind it)."""
        while self._runner is not None and not self._runner.done():
            await asyncio.gather(self._runner, return_exceptions=True)


def _device(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return os.stat(path).st_dev


class Durability:
    def __init__(self, db: Database, store: UploadStore) -> None:
        self.db = db
        self.store = store
        self._db_elsewhere = db.path is not None and _device(Path(db.path).parent) != _device(store.root)
        self.barrier = SyncBarrier(lambda: self.sync_now())  # looked up each time: tests wrap it
        self._touched: dict[int, ChunkSet] = {}  # file id -> chunk ids this process recorded, unsynced
        self._pending = asyncio.Event()  # chunks were recorded since the last chunk point

    def sync_now(self) -> None:
        """One sync, now (blocking: in a thread). ``synced()`` shares them between callers."""
        try:
            syncfs(self.store.root)
        except FileNotFoundError:  # nothing uploaded yet: the folder is made, then synced
            make_dirs(self.store.root)
            syncfs(self.store.root)
        if self._db_elsewhere:
            self.db.sync_commits()

    async def synced(self) -> None:
        """Return once everything written and committed before this call is durable."""
        await self.barrier.wait()

    @property
    def unsynced(self) -> bool:
        return self._pending.is_set()

    def touch(self, recorded: dict[int, ChunkSet]) -> None:
        """This process recorded these chunks (file id -> ids), not yet power-loss durable."""
        for file_id, ids in recorded.items():
            mine = self._touched.setdefault(file_id, ChunkSet())
            for i in ids.ids():
                mine.add(i)
        if recorded:
            self._pending.set()

    # -- chunk points ---------------------------------------------------------------------------
    async def chunk_point(self) -> None:
        """Make every chunk this process recorded so far power-loss durable, and say so in
        their files' ``synced_ids``."""
        mine, self._touched = self._touched, {}
        self._pending.clear()
        try:
            await self.synced()  # every chunk in ``mine`` was written before it was recorded
            await self._mark_synced(mine)
        except BaseException:
            # Cancelled (shutdown stops the periodic task) or failed: these chunks are still
            # unsynced, so the next point, or the one the stop runs, must not skip them.
            self.touch(mine)
            raise

    async def _mark_synced(self, mine: dict[int, ChunkSet]) -> None:
        """Add ``mine`` to the files' ``synced_ids`` (only ids still recorded): the rows are
        locked in id order and merged, so points of several processes never undo each other."""
        todo = sorted(mine)
        files = BatchFile.__table__
        for n in range(0, len(todo), _IN_BATCH):
            part = todo[n:n + _IN_BATCH]
            async with self.db.write() as s:
                rows = (await s.execute(select(files.c.id, files.c.chunk_ids, files.c.synced_ids)
                                        .where(files.c.id.in_(part), files.c.state.in_(_UNSETTLED))
                                        .order_by(files.c.id).with_for_update())).all()
                changes = []
                for r in rows:
                    recorded, synced = ChunkSet(r.chunk_ids), ChunkSet(r.synced_ids)
                    merged = synced.copy()
                    for i in mine[r.id].ids():
                        if i in recorded:
                            merged.add(i)
                    if merged != synced:
                        changes.append({"b_id": r.id, "b_ids": bytes(merged)})
                if changes:
                    await s.execute(update(files).where(files.c.id == bindparam("b_id"))
                                    .values(synced_ids=bindparam("b_ids")), changes)

    async def _sync_all_recorded(self) -> None:
        """Read every recorded chunk id, sync, then record them as synced (SQLite's start: one
        host, so the sync covers every process that wrote them). Reading first is what makes it
        right: a chunk is recorded only after its bytes are written."""
        async with self.db.read() as s:
            rows = (await s.execute(select(BatchFile.id, BatchFile.chunk_ids).where(
                BatchFile.state.in_(_UNSETTLED), BatchFile.chunk_ids != BatchFile.synced_ids))).all()
        await self.synced()
        await self._mark_synced({r.id: ChunkSet(r.chunk_ids) for r in rows})

    async def chunk_points(self, every: float) -> None:
        """Owned task: a chunk point at most every ``every`` seconds while chunks arrive."""
        while True:
            await self._pending.wait()
            await asyncio.sleep(every)  # group the chunks of this interval into one sync
            try:
                await self.chunk_point()
            except Exception as e:  # e.g. the writer busy past its pool timeout: try again next time
                log_failure(log, "chunk sync point failed; the chunks stay unsynced until the next one", e)

    # -- start ------------------------------------------------------------------------------------
    async def start(self) -> int:
        """At start (under the ``uploads-start`` lock): after a reboot of this host, forget the
        chunks no sync covered (returns how many); on SQLite sync every recorded chunk (a
        restart in the same boot lost none); then record this boot."""
        forgotten = 0
        await self._take_back_uncommitted()
        last = await asyncio.to_thread(self._last_boot)
        if last is not None and last != boot_id():
            await self._restore_complete()
            forgotten = await self._forget_unsynced()
        if not self.db.shared:
            await self._sync_all_recorded()
        await asyncio.to_thread(self._write_boot)
        return forgotten

    async def _take_back_uncommitted(self) -> int:
        """A file not recorded complete whose ``<id>.data`` is there: the transaction that renamed
        its completion into place (``ledger``, ``Assembler``) never committed -- the process was
        killed between the rename and the commit, or the power went after the rename reached the
        disk and before the commit did. The row is right (the file was never answered complete)
        and the disk is made to agree with it: a ``partial`` renamed away is put back (without
        it, the chunks recorded in place are gone and the last chunk sent again would make a file
        of holes, answered complete with their SHA-256); a concatenation goes (its chunks are
        where they were). Each under its row's lock, so that a live process's rename not yet
        committed (PostgreSQL) is waited for, then found complete. Returns how many."""
        async with self.db.read() as s:
            rows = (await s.execute(select(BatchFile.id, BatchFile.batch_pk)
                                    .where(BatchFile.state.in_(_UNSETTLED)))).all()
        found = await asyncio.to_thread(lambda: [r for r in rows if self.store.data_path(r.batch_pk, r.id).exists()])
        taken = 0
        for r in found:
            async with self.db.write() as s:
                row = (await s.execute(select(BatchFile.chunk_ids, BatchFile.loose_ids)
                                       .where(BatchFile.id == r.id, BatchFile.state.in_(_UNSETTLED))
                                       .with_for_update())).one_or_none()
                if row is not None and await asyncio.to_thread(self._take_back, r.batch_pk, r.id,
                                                               ChunkSet(row.chunk_ids), ChunkSet(row.loose_ids)):
                    taken += 1
        return taken

    def _take_back(self, batch_pk: int, file_id: int, ids: ChunkSet, loose: ChunkSet) -> bool:
        data, partial = self.store.data_path(batch_pk, file_id), self.store.partial_path(batch_pk, file_id)
        if not data.exists():
            return False
        if any(i not in loose for i in ids.ids()) and not partial.exists():  # chunks in place: it was ``partial``
            replace_making_dirs(data, partial)
            log.warning("file %s: its completion was renamed into place but never recorded: partial put back",
                        file_id)
        else:
            remove(data)
            log.warning("file %s: its completion was renamed into place but never recorded: removed", file_id)
        return True

    def _marker(self) -> dict[str, object]:
        try:
            found = json.loads(self.store.sync_marker.read_text())
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    def _last_boot(self) -> str | None:
        """The boot id this host last started in: ``boot_id`` when the marker is this host's
        (or names none: written before hosts were told apart), else its entry in ``others``."""
        marker, host = self._marker(), socket.gethostname()
        if marker.get("host", host) == host:
            found = marker.get("boot_id")
        else:
            others = marker.get("others")
            found = others.get(host) if isinstance(others, dict) else None
        return None if found is None else str(found)

    def _write_boot(self) -> None:
        marker = self.store.sync_marker
        make_dirs(marker.parent)
        old, host = self._marker(), socket.gethostname()
        others = dict(old["others"]) if isinstance(old.get("others"), dict) else {}  # type: ignore[call-overload]
        if old.get("boot_id") is not None and old.get("host", host) != host:
            others[str(old["host"])] = old["boot_id"]
        others.pop(host, None)
        temp = marker.with_name(f"{marker.name}.{os.getpid()}.part")
        temp.write_text(json.dumps({"boot_id": boot_id(), "host": host, "at": utcnow().isoformat(),
                                    "others": others}))
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, marker)
        fsync_dir(marker.parent)

    async def _restore_complete(self) -> None:
        """After a reboot: a file recorded complete whose rename into place was lost with the
        power (its record reached the disk, the rename did not: it was not answered yet) gets its
        bytes back from where they were synced before the record -- ``partial``, a
        concatenation's temp, or the whole file's temp -- checked against its SHA-256. One whose
        bytes are nowhere is removed: its client, never told it was complete, sends it again."""
        async with self.db.read() as s:
            rows = (await s.execute(select(BatchFile.id, BatchFile.batch_pk, BatchFile.file_idx, BatchFile.size,
                                           BatchFile.sha256).where(BatchFile.state == "complete"))).all()
        lost = await asyncio.to_thread(lambda: [r.id for r in rows if not self._put_back(r)])
        if lost:
            async with self.db.write() as s:
                await delete_files(s, BatchFile.id.in_(lost), BatchFile.state == "complete")
            log.warning("the machine rebooted: %d file(s) recorded complete had lost their bytes and were removed "
                        "(they had not been answered complete; their clients send them again)", len(lost))

    def _put_back(self, r) -> bool:  # type: ignore[no-untyped-def]
        data = self.store.data_path(r.batch_pk, r.id)
        if data.exists():
            return True
        fdir, bdir = self.store.file_dir(r.batch_pk, r.id), self.store.batch_dir(r.batch_pk)
        candidates = [self.store.partial_path(r.batch_pk, r.id), *fdir.glob(".data.*.part"),
                      *bdir.glob(f".{r.file_idx}.*.part")]
        for c in candidates:
            try:
                if c.stat().st_size == r.size and _sha256(c) == r.sha256:
                    os.replace(c, data)
                    log.warning("file %s was recorded complete but its rename was lost: put back from %s",
                                r.id, c.name)
                    return True
            except OSError:
                continue
        return False

    async def _forget_unsynced(self) -> int:
        async with self.db.read() as s:
            rows = (await s.execute(
                select(BatchFile.id, BatchFile.batch_pk, BatchFile.size, BatchFile.chunk_count, BatchFile.chunk_size,
                       BatchFile.chunk_ids, BatchFile.loose_ids, BatchFile.synced_ids)
                .where(BatchFile.state.in_(_UNSETTLED), BatchFile.chunk_ids != BatchFile.synced_ids))).all()
        plans = await asyncio.to_thread(lambda: [self._forget_plan(r) for r in rows])
        forgotten = 0
        async with self.db.write() as s:
            for r, (ids, loose, received, gone) in sorted(zip(rows, plans, strict=True), key=lambda x: x[0].id):
                res = await s.execute(update(BatchFile).where(BatchFile.id == r.id, BatchFile.chunk_ids == r.chunk_ids)
                                      .values(chunk_ids=bytes(ids), loose_ids=bytes(loose), received=received,
                                              state="receiving", updated_at=utcnow())
                                      .execution_options(synchronize_session=False))
                if res.rowcount == 1:  # type: ignore[attr-defined]
                    forgotten += len(ChunkSet(r.chunk_ids)) - len(ids)
                    for p in gone:
                        remove(p)
        if forgotten:
            log.warning("the machine rebooted since the last start: forgot %d chunk(s) no sync covered, of %d "
                        "file(s); their clients will send them again", forgotten, len(rows))
        return forgotten

    def _forget_plan(self, r) -> tuple[ChunkSet, ChunkSet, int, list[Path]]:  # type: ignore[no-untyped-def]
        """What a file keeps after a power loss: its synced ids whose bytes are there."""
        ids, loose, old_loose = ChunkSet(), ChunkSet(), ChunkSet(r.loose_ids)
        received = 0
        for i in ChunkSet(r.synced_ids).ids():
            if i in old_loose:
                try:
                    length = os.stat(self.store.chunk_path(r.batch_pk, r.id, i)).st_size
                except FileNotFoundError:
                    continue
                loose.add(i)
            elif r.chunk_size:
                length = chunk_length(r.size, r.chunk_count, r.chunk_size, i)
            else:
                continue
            ids.add(i)
            received += length
        gone = [self.store.chunk_path(r.batch_pk, r.id, i) for i in old_loose.ids() if i not in loose]
        return ids, loose, received, gone


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
