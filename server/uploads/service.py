"""The upload service: batches, files and chunks as rows; bytes through ``UploadStore``.

Invariants:
* A batch belongs to the owner that created it; for anyone else it does not exist (404).
  ``state``: open -> dropped | executed. Closed batches stay as tombstone rows and refuse
  uploads (404), so a late chunk cannot resurrect them.
* One path receives every upload: a whole file is the one-chunk case. A body is written where
  it belongs before it is recorded (a chunk of the uniform layout at its offset in ``partial``;
  a file's first chunk, a whole file, or a chunk of another chunking in a temp), then recorded
  with the others arriving at the same moment in one transaction (``server.uploads.recorder``).
  Recording the same chunk twice is a no-op (idempotent: clients and urllib3 retry POSTs).
  Writing in place is one request's at a time per chunk, and over before the file's completion
  begins (``assembly.Placing``): bytes never land in place after their chunk or file is done.
* A file is complete when it is answered complete: the request that sends its last missing
  chunk makes the complete file (a rename of ``partial`` with the uniform layout, else a
  concatenation), its bytes are synced, its record committed and synced, then it is answered
  201; a repeat answered complete waits for a sync too (the commit it read may not be durable
  yet). If that fails (no space, I/O error), the file keeps its chunks and is assembled again by
  the next request for it or at the next start (``server.uploads.assembly``); its info says
  ``"state": "assembling"`` meanwhile. Exactly once: conditional ``UPDATE``s pick one assembler.
* Chunks of a bigger file are durable against a crash once answered and against a power loss
  at the next chunk point (``server.uploads.durability``).
* Client-supplied names are data in rows; every path comes from row ids (``UploadStore``).
* Several app processes may serve one database and data dir (PostgreSQL): what this process
  remembers (open batches, files as last recorded) only saves reads; the recording transaction
  decides on the rows. Its upload temps carry its tag and are its own while it lives (the
  ``process`` lock); a start removes only those of processes that are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import uuid
from collections.abc import AsyncIterable, Awaitable, Callable
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from server.config import Settings
from server.db import Database, utcnow
from server.db.models import Batch, BatchFile
from server.errors import (
    BatchNotFound,
    ChunkCountChanged,
    ChunkCountInvalid,
    ChunkIndexInvalid,
    ChunkTooLarge,
    DiskFull,
    FileIncomplete,
    FileNotFound,
    FileSizeChanged,
    FileSizeMismatch,
    FileTooLarge,
    FileTooManyChunks,
    JobRunning,
)
from server.uploads.assembly import Assembler, Hashes, Placing, Snapshot, Stats, prepare
from server.uploads.chunkset import ChunkSet
from server.uploads.durability import Durability
from server.uploads.faults import storage_error
from server.uploads.ledger import chunks_do_not_fit
from server.uploads.model import FileInfo, FileState, UploadOutcome, UploadRequest, chunk_length
from server.uploads.operations import ExecuteContext, OperationRegistry, OperationResult
from server.uploads.recorder import Arrival, Recorder
from server.uploads.store import (
    WRITE_BUFFER,
    BodyTooLarge,
    HashLane,
    Target,
    UploadStore,
    hash_file,
    remove,
    remove_tree,
)

log = logging.getLogger("filedrop.uploads")
_KNOWN_LIMIT = 10_000  # open batches and receiving files remembered; the transaction checks again
_SNAPSHOT = (BatchFile.id, BatchFile.batch_pk, BatchFile.size, BatchFile.chunk_count, BatchFile.chunk_size,
             BatchFile.chunk_ids, BatchFile.loose_ids, BatchFile.received, BatchFile.state, BatchFile.sha256)

__all__ = ["FileInfo", "FileState", "UploadOutcome", "UploadRequest", "UploadService"]


class UploadService:
    def __init__(self, db: Database, settings: Settings, operations: OperationRegistry) -> None:
        self.db = db
        self.settings = settings
        self.operations = operations
        self.tag = secrets.token_hex(4)  # this process, in its temps' names (see recover)
        self.store = UploadStore(settings.uploads_dir, settings.min_free_disk, self.tag)
        self.stats = Stats()
        self.durability = Durability(db, self.store)
        self.hashes = Hashes()
        self.placing = Placing()
        self.assembler = Assembler(db, self.store, self.durability, self.hashes, self.stats, settings, self.placing)
        self.recorder = Recorder(db, self.store, self.durability, settings)
        self._open_batches: dict[str, tuple[str, int]] = {}  # batch_id -> (owner, row id)
        # (batch pk, fileIdx) -> the file as this process last recorded it: where the next chunk
        # goes without a read. The recording transaction checks everything again; a chunk the
        # copy says is recorded, or a declaration it disagrees with, is checked with a read.
        self._files: dict[tuple[int, int], tuple[Snapshot, str]] = {}
        # Set by the app (jobs): the job that reads a batch's files, if any (None: nothing checks).
        self.readers: Callable[[str, str], Awaitable[str | None]] | None = None

    # -- life cycle ----------------------------------------------------------------------
    async def recover(self) -> int:
        """At start: forget what a reboot lost, sync what a crash left, remove the temps of
        requests cut off, assemble what was left to assemble (returns how many). One process
        at a time (the ``uploads-start`` lock): of several starting after a reboot, the first
        forgets what the reboot lost before any records a chunk."""
        locks = self.db.locks
        await locks.try_take("process", int(self.tag, 16))  # held while this process lives
        async with locks.held("uploads-start", wait=None):
            await asyncio.to_thread(self.store.prepare)
            await self.durability.start()
            removed = await self._remove_temps()
            uncommitted = await self._remove_uncommitted()
        if removed:
            log.info("removed %d upload temp(s) left by processes that are gone", removed)
        if uncommitted:
            log.info("removed %d upload(s) a crash left renamed into place but not recorded", uncommitted)
        return await self.assembler.recover()

    async def _remove_temps(self) -> int:
        """The temps of requests (and assemblies) cut off: on SQLite (one app process) every one
        there is before the first request; on PostgreSQL those of processes that are gone (their
        ``process`` lock is free) or untagged. After ``durability.start``: after a reboot, a
        concatenation's temp may be what a file recorded complete gets its bytes back from."""
        found = await asyncio.to_thread(self.store.request_temps)
        dead: dict[str | None, bool] = {None: True}
        for _path, tag in found:
            if tag not in dead:
                dead[tag] = not self.db.shared or (tag != self.tag and (
                    not _is_tag(tag) or not await self.db.locks.alive("process", int(tag, 16))))
        gone = [path for path, tag in found if dead[tag]]
        for path in gone:
            await asyncio.to_thread(remove, path)
        return len(gone)

    async def _remove_uncommitted(self) -> int:
        """SQLite: the bytes of file rows a crash left uncommitted (renamed into place by the
        transaction that inserted the row, which never committed). SQLite hands their ids out
        again (AUTOINCREMENT counts committed rows only), and the next file given one must not
        find them: a ``partial`` longer than that file refused its completion for good. Every id
        over the last row's is such a leftover, or a removed row's (its removal is durable: the
        start synced). PostgreSQL never hands out a sequence's value twice: there they are the
        janitor's orphans."""
        if self.db.shared:
            return 0
        async with self.db.read() as s:
            last = await s.scalar(select(func.max(BatchFile.id))) or 0
        found = await asyncio.to_thread(self.store.files_over, last)
        for path in found:
            await asyncio.to_thread(remove_tree if path.is_dir() else remove, path)
        return len(found)

    async def sync_points(self, every: float) -> None:
        """Owned task: chunks become power-loss durable at most every ``every`` seconds."""
        await self.durability.chunk_points(every)

    async def sync_point(self) -> None:
        await self.durability.chunk_point()

    async def close(self) -> None:
        """Record what is queued, let assemblies finish, make the chunks received durable."""
        await self.recorder.close()
        await self.assembler.idle()
        if self.durability.unsynced:
            await self.durability.chunk_point()
        await self.durability.barrier.aclose()

    async def idle(self) -> None:
        """Wait until no assembly is running (tests and the janitor use it)."""
        await self.assembler.idle()

    async def settle(self, batch_id: str) -> None:
        await self.assembler.settle(batch_id)

    # -- batches -------------------------------------------------------------------------
    async def create_batch(self, owner: str) -> str:
        batch_id = uuid.uuid4().hex
        now = utcnow()
        async with self.db.write() as s:
            s.add(Batch(batch_id=batch_id, owner=owner, state="open", created_at=now, updated_at=now))
        return batch_id

    async def _open_batch(self, s: AsyncSession, owner: str, batch_id: str, *, lock: bool = False) -> Batch:
        """``lock``: in a write, the batch row is locked first (PostgreSQL), as the group commit
        locks it before its files: one order, no deadlock."""
        query = select(Batch).where(Batch.batch_id == batch_id)
        batch = await s.scalar(query.with_for_update(key_share=True) if lock else query)
        if batch is None or batch.owner != owner:
            raise BatchNotFound(f"batch {batch_id} not found")
        if batch.state != "open":
            raise BatchNotFound(f"batch {batch_id} was {batch.state}")
        return batch

    async def _batch_pk(self, owner: str, batch_id: str, create: bool) -> int:
        """The row id of ``owner``'s open batch (remembered; the recording transaction checks
        again). ``create``: a legacy upload makes its batch (client-chosen id) on first use."""
        hit = self._open_batches.get(batch_id)
        if hit is not None and hit[0] == owner and not create:
            return hit[1]
        async with self.db.read() as s:
            row = (await s.execute(select(Batch.owner, Batch.id, Batch.state)
                                   .where(Batch.batch_id == batch_id))).one_or_none()
        if row is None and create:
            row = await self._make_batch(owner, batch_id)
        if row is None or row.owner != owner:
            raise BatchNotFound(f"batch {batch_id} not found")
        if row.state != "open":
            raise BatchNotFound(f"batch {batch_id} was {row.state}")
        if len(self._open_batches) >= _KNOWN_LIMIT:
            self._open_batches.clear()
        self._open_batches[batch_id] = (owner, row.id)
        return int(row.id)

    async def _make_batch(self, owner: str, batch_id: str) -> Any:
        """A legacy batch made on first use; if another process made it meanwhile, that one."""
        find = select(Batch.owner, Batch.id, Batch.state).where(Batch.batch_id == batch_id)
        try:
            async with self.db.write() as s:
                row = (await s.execute(find)).one_or_none()
                if row is None:
                    now = utcnow()
                    s.add(Batch(batch_id=batch_id, owner=owner, state="open", created_at=now, updated_at=now))
                    await s.flush()
                    row = (await s.execute(find)).one()
                return row
        except IntegrityError:  # made by another process since our read (the id is unique)
            async with self.db.read() as s:
                return (await s.execute(find)).one()

    async def drop_batch(self, owner: str, batch_id: str, *, refuse_if_read: bool = False) -> None:
        """Remove a batch's files (rows and bytes); its row stays as a ``dropped`` tombstone.
        ``refuse_if_read`` (the API): JobRunning while a job started from the batch reads it."""
        await self.settle(batch_id)
        if refuse_if_read:
            await self._refuse_if_read(owner, batch_id)
        async with self.db.write() as s:
            batch = await self._open_batch(s, owner, batch_id, lock=True)
            await self._close(s, batch, "dropped")
        await self._remove_after_commit(self.store.batch_dir(batch.id))

    async def _close(self, s: AsyncSession, batch: Batch, state: str) -> None:
        await s.execute(delete(BatchFile).where(BatchFile.batch_pk == batch.id))
        batch.state = state
        batch.updated_at = utcnow()
        self._open_batches.pop(batch.batch_id, None)
        for key in [k for k in self._files if k[0] == batch.id]:
            del self._files[key]

    async def _remove_after_commit(self, path: Path) -> None:
        """Remove bytes whose rows were just deleted: once that delete is durable, so that a
        power loss cannot bring back rows (an open batch, complete files) without their bytes."""
        await self.durability.synced()
        await asyncio.to_thread(remove_tree, path)

    # -- files ---------------------------------------------------------------------------
    async def list_files(self, owner: str, batch_id: str) -> list[FileState]:
        """Every file with at least one chunk received, by fileIdx."""
        async with self.db.read() as s:
            batch = await self._open_batch(s, owner, batch_id)
            files = (await s.scalars(select(BatchFile).where(BatchFile.batch_pk == batch.id)
                                     .order_by(BatchFile.file_idx))).all()
            # Built inside the session: the read session's rollback expires its objects.
            return [self._state(batch_id, f) for f in files if f.chunk_ids]

    async def file_state(self, owner: str, batch_id: str, file_idx: int) -> FileState:
        """One file's state; 404 until its first chunk is recorded (the nuxeo client reads a
        200 as "resume from these chunk ids")."""
        async with self.db.read() as s:
            batch = await self._open_batch(s, owner, batch_id)
            f = await self._file(s, batch, file_idx)
            if not f.chunk_ids:
                raise FileNotFound(f"file {file_idx} of batch {batch_id} not found")
            return self._state(batch_id, f)

    async def _refuse_if_read(self, owner: str, batch_id: str) -> None:
        if self.readers is None:
            return
        async with self.db.read() as s:
            await self._open_batch(s, owner, batch_id)  # 404 first: another key learns nothing
        job_id = await self.readers(owner, batch_id)
        if job_id is not None:
            raise JobRunning(f"batch {batch_id} is in use by job {job_id}, started from it: cancel the job or "
                             "wait for it to end")

    async def delete_file(self, owner: str, batch_id: str, file_idx: int) -> None:
        """Remove one file (row and bytes); JobRunning while a job started from the batch reads it."""
        await self.settle(batch_id)
        await self._refuse_if_read(owner, batch_id)
        async with self.db.write() as s:
            batch = await self._open_batch(s, owner, batch_id, lock=True)
            f = await self._file(s, batch, file_idx)
            await s.execute(delete(BatchFile).where(BatchFile.id == f.id))
            batch.updated_at = utcnow()
        self._files.pop((batch.id, file_idx), None)
        await self.durability.synced()  # the row's removal durable before its bytes go
        await asyncio.to_thread(self.store.remove_file, batch.id, f.id)

    async def open_file(self, owner: str, batch_id: str, file_idx: int) -> FileInfo:
        """A complete file's path and metadata (404 if missing or not complete). Waits for
        the batch's running assemblies first."""
        await self.settle(batch_id)
        async with self.db.read() as s:
            batch = await self._open_batch(s, owner, batch_id)
            f = await self._file(s, batch, file_idx)
            if f.state != "complete" or f.sha256 is None:
                raise FileIncomplete(f"file {file_idx} of batch {batch_id} is not complete")
            return FileInfo(self.store.data_path(batch.id, f.id), f.name, f.size, f.sha256, f.mimetype)

    async def _file(self, s: AsyncSession, batch: Batch, file_idx: int) -> BatchFile:
        f = await s.scalar(select(BatchFile).where(BatchFile.batch_pk == batch.id, BatchFile.file_idx == file_idx))
        if f is None:
            raise FileNotFound(f"file {file_idx} of batch {batch.batch_id} not found")
        return f

    def _state(self, batch_id: str, f: BatchFile) -> FileState:
        ids = ChunkSet(f.chunk_ids)
        state = f.state
        if state == "receiving" and ids.covers(f.chunk_count):
            # Every chunk is there but the file is not: an assembly failed. This request is
            # "the next request for it": assemble it again (in the background).
            self.assembler.ensure(batch_id, f.id, claimed=False)
            state = "assembling"
        elif state == "assembling" and self.assembler.running(f.id) is None:
            # Another process assembles it (waited for in the background), or one that died did
            # (taken over).
            self.assembler.ensure(batch_id, f.id, claimed=True)
        return FileState(batch_id, f.file_idx, f.name, f.size, f.mimetype, f.upload_type == "chunked",
                         f.chunk_count, ids.ids(), f.received, state, f.sha256)

    # -- receiving -----------------------------------------------------------------------
    def _check(self, req: UploadRequest) -> None:
        """Every limit and rule that needs no row, before a byte is read (the free disk:
        ``_check_disk``)."""
        s = self.settings
        if req.size > s.max_file_size:
            raise FileTooLarge(f"X-File-Size {req.size} is over the {s.max_file_size} byte file limit "
                               "(FILEDROP_MAX_FILE_SIZE)")
        if req.chunk_count > s.max_chunks_per_file:
            raise FileTooManyChunks(f"X-Upload-Chunk-Count {req.chunk_count} is over the limit of "
                                    f"{s.max_chunks_per_file} chunks per file (FILEDROP_MAX_CHUNKS_PER_FILE)")
        if req.chunk_idx >= req.chunk_count:
            raise ChunkIndexInvalid(f"chunk index {req.chunk_idx} is not below chunk count {req.chunk_count}")
        if req.chunk_count > max(req.size, 1):  # every chunk holds at least one byte
            raise ChunkCountInvalid(f"{req.chunk_count} chunks cannot make {req.size} bytes")
        cl = req.content_length
        if not req.chunked and req.size > s.max_chunk_size:
            raise ChunkTooLarge(f"a file over {s.max_chunk_size} bytes (FILEDROP_MAX_CHUNK_SIZE) must be sent "
                                "in chunks")
        if cl is not None and cl > s.max_chunk_size:
            raise ChunkTooLarge(f"request body of {cl} bytes is over the {s.max_chunk_size} byte chunk limit "
                                "(FILEDROP_MAX_CHUNK_SIZE)")
        if cl is not None and (cl != req.size if req.chunk_count == 1 else cl > req.size):
            # "the body's length": NGINX passes a small chunked body on with a Content-Length.
            raise FileSizeMismatch(f"the body's length {cl} does not match X-File-Size {req.size}")
        if cl == 0 and req.chunk_count > 1:
            raise _empty_chunk(req)

    def _check_disk(self, req: UploadRequest) -> None:
        """The free-disk floor, before a byte is written (after the early answer: a repeat is
        answered as one, whatever the disk)."""
        s, cl = self.settings, req.content_length
        incoming = cl if cl is not None else min(req.size, s.max_chunk_size)
        free = self.store.free_bytes(max_age=0.2)  # at most five statvfs a second on the event loop
        if free - incoming < s.min_free_disk:
            raise DiskFull(f"not enough free disk space: {incoming} more bytes would leave {free - incoming} "
                           f"free, under FILEDROP_MIN_FREE_DISK ({s.min_free_disk} bytes)")

    async def receive(self, owner: str, batch_id: str, req: UploadRequest, body: AsyncIterable[bytes], *,
                      create: bool = False) -> UploadOutcome:
        """Store one upload request's body (a whole file or one chunk) and record it.

        Checks every limit it can before reading a byte; a body that breaks one while
        streaming is removed and nothing is recorded. Sending a recorded chunk again is a
        no-op. ``create``: a legacy upload makes its batch (client-chosen id) on first use.
        """
        self._check(req)
        batch_pk = await self._batch_pk(owner, batch_id, create)
        f, state = None, None
        if req.chunk_count > 1:
            f, state = self._files.get((batch_pk, req.file_idx), (None, None))
            if f is None or state != "receiving" or req.chunk_idx in ChunkSet(f.chunk_ids) or \
                    (f.chunk_count, f.size) != (req.chunk_count, req.size):
                f, state = await self._read_file(batch_pk, req.file_idx)
            if f is not None and state is not None:
                early = await self._early(batch_id, req, f, state)
                if early is not None:
                    return early
        self._check_disk(req)
        return await _Receipt(self, owner, batch_id, batch_pk, req, f).run(body)

    async def _read_file(self, batch_pk: int, file_idx: int) -> tuple[Snapshot | None, str | None]:
        async with self.db.read() as s:
            row = (await s.execute(select(*_SNAPSHOT).where(
                BatchFile.batch_pk == batch_pk, BatchFile.file_idx == file_idx))).one_or_none()
        if row is None or not row.chunk_ids:
            self._files.pop((batch_pk, file_idx), None)
            return None, None
        self._remember(Snapshot.of(row), row.state, file_idx)
        return Snapshot.of(row), row.state

    def _remember(self, f: Snapshot, state: str, file_idx: int) -> None:
        key = (f.batch_pk, file_idx)
        if state == "complete":
            self._files.pop(key, None)
            return
        if len(self._files) >= _KNOWN_LIMIT:
            self._files.clear()
        self._files[key] = (f, state)

    async def _early(self, batch_id: str, req: UploadRequest, f: Snapshot, state: str) -> UploadOutcome | None:
        """The answer before a byte of the body is read, when the file's row decides it: a
        changed declaration, a chunk already recorded, a file complete or being assembled."""
        if f.chunk_count != req.chunk_count:
            raise ChunkCountChanged(f"file {req.file_idx} was declared with {f.chunk_count} chunks, "
                                    f"not {req.chunk_count}")
        if f.size != req.size:
            raise FileSizeChanged(f"file {req.file_idx} was declared with {f.size} bytes, not {req.size}")
        ids = ChunkSet(f.chunk_ids)
        waiting = state == "receiving" and ids.covers(f.chunk_count)  # a failed assembly: assemble again
        if req.chunk_idx not in ids and state == "receiving" and not waiting:
            return None
        complete = state == "complete"
        digest = f.sha256 if complete else None  # read with its state: no other query
        if complete:
            # The commit that completed it may not be durable yet (SQLite commits with
            # synchronous=NORMAL; the sync after it is what its own 201 waits for): a 201 says
            # the file survives a power loss, so this one waits for a sync too.
            await self.durability.synced()
        if state == "assembling" or waiting:
            # Assembling here, elsewhere (waited for) or nowhere any more (taken over).
            task = self.assembler.ensure(batch_id, f.id, claimed=state == "assembling")
            digest = await asyncio.shield(task)  # raises what the assembly met (507, 503, 500)
            complete = digest is not None
        size = req.content_length or 0
        return UploadOutcome(batch_id, req.file_idx, req.chunked, size, f.chunk_count, ids.ids(), complete, digest)

    # -- execute -------------------------------------------------------------------------
    async def execute(self, owner: str, batch_id: str, file_idx: int | None, operation: str,
                      params: dict[str, Any], context: dict[str, Any], *, keep: bool = False) -> OperationResult:
        """Run a registered operation on the batch (or one file); then, as Nuxeo does, remove
        the batch unless ``keep`` (X-Batch-No-Drop) or the operation says otherwise."""
        await self.settle(batch_id)
        async with self.db.read() as s:
            batch = await self._open_batch(s, owner, batch_id)
            batch_pk = batch.id
            if file_idx is not None:
                await self._file(s, batch, file_idx)
        op = self.operations.get(operation)
        result = await op(ExecuteContext(owner, batch_id, file_idx, params, context))
        if result.drop_batch and not keep:
            # Removing the batch is refused under a job started from it, as DELETE is: its rows
            # may publish the batch's files (X-Batch-No-Drop runs the operation and keeps it).
            # (Its owner was checked above; closed since, it is answered as before: below.)
            if self.readers is not None and (job_id := await self.readers(owner, batch_id)) is not None:
                raise JobRunning(f"batch {batch_id} is in use by job {job_id}, started from it: execute it with "
                                 "X-Batch-No-Drop: true (the batch stays), cancel the job or wait for it to end")
            async with self.db.write() as s:
                closing = await s.get(Batch, batch_pk, with_for_update={"key_share": True})
                if closing is None or closing.state != "open":
                    return result
                await self._close(s, closing, "executed")
            await self._remove_after_commit(self.store.batch_dir(batch_pk))
        return result

    async def manifest(self, ctx: ExecuteContext) -> OperationResult:
        """``Batch.Manifest``: name, size and SHA-256 of every file (or of ``ctx.file_idx``)."""
        if ctx.file_idx is None:
            files = await self.list_files(ctx.owner, ctx.batch_id)
        else:
            files = [await self.file_state(ctx.owner, ctx.batch_id, ctx.file_idx)]
        out: list[dict[str, Any]] = []
        for f in files:
            entry: dict[str, Any] = {"fileIdx": str(f.file_idx), "name": f.name, "size": f.size}
            if f.complete:
                entry["sha256"] = f.sha256
            else:
                entry["complete"] = False
            out.append(entry)
        return OperationResult(200, {"batchId": ctx.batch_id, "files": out})


def _empty_chunk(req: UploadRequest) -> FileSizeMismatch:
    """Recorded, an empty chunk would stand for its index: the right bytes sent again would be a
    repeat, passed over, and the file could never add up to its size."""
    return FileSizeMismatch(f"chunk {req.chunk_idx} of file {req.file_idx} is empty: each of a file's "
                            f"{req.chunk_count} chunks holds at least one byte")


def _is_tag(tag: str | None) -> bool:
    return tag is not None and 0 < len(tag) <= 8 and all(c in "0123456789abcdef" for c in tag)


class _Receipt:
    """One request's body: where it goes, receiving it, preparing the file when it is the
    last chunk, recording it."""

    def __init__(self, service: UploadService, owner: str, batch_id: str, batch_pk: int, req: UploadRequest,
                 f: Snapshot | None) -> None:
        self.s, self.owner, self.batch_id, self.batch_pk, self.req, self.f = service, owner, batch_id, batch_pk, req, f
        store, cfg = service.store, service.settings
        self.limit = min(cfg.max_chunk_size, req.size)
        self.lane: HashLane | None = None
        self.offset = 0  # of this body in the complete file, when known
        self.placing: asyncio.Event | None = None  # held while this request may write in place
        if f is None:  # no row yet (or nothing stored): the body waits in the batch dir
            self.target = Target(store.arrival_temp(batch_pk, req.file_idx))
            self.lane = service.hashes.begin(None, 0) if req.chunk_idx == 0 else None
        elif f.chunk_size is not None and req.content_length == chunk_length(f.size, f.chunk_count, f.chunk_size,
                                                                                 req.chunk_idx) \
                and (placing := service.placing.claim(f.id, req.chunk_idx)) is not None:
            self.placing = placing
            self.offset = req.chunk_idx * f.chunk_size  # the uniform layout: in place
            self.target = Target(store.partial_path(batch_pk, f.id), self.offset, fresh=False)
            self.limit = req.content_length
            self.lane = service.hashes.begin(f.id, self.offset)
        else:  # another chunking, no Content-Length, or a copy of a chunk being written in place: on its own
            self.target = Target(store.chunk_temp(batch_pk, f.id, req.chunk_idx))
        self.reserve = req.content_length if req.content_length is not None else self.limit
        self.last = f is not None and len(ChunkSet(f.chunk_ids)) + 1 == f.chunk_count

    async def run(self, body: AsyncIterable[bytes]) -> UploadOutcome:
        try:
            return await self._run(body)
        finally:
            self._release()

    def _release(self) -> None:
        """Done with writing in place (at the record: an assembly it starts waits for that)."""
        if self.placing is not None and self.f is not None:
            self.s.placing.release(self.f.id, self.req.chunk_idx, self.placing)
            self.placing = None

    async def _run(self, body: AsyncIterable[bytes]) -> UploadOutcome:
        s, req = self.s, self.req
        completion: Path | None = None
        recorded = None
        if req.chunk_count == 1 and req.content_length is not None and req.content_length <= WRITE_BUFFER:
            return await self._small(body)
        completing = contextlib.AsyncExitStack()
        try:
            length = await self._receive(body)
            digest = None
            if req.chunk_count == 1:
                assert self.lane is not None
                await self.lane.settle()
                if self.lane.broken:  # a block of it was not hashed: the digest comes from disk
                    hasher = hashlib.sha256()
                    await asyncio.to_thread(hash_file, self.target.path, 0, length, hasher)
                    digest = hasher.hexdigest()
                else:
                    digest = self.lane.hasher.hexdigest()
            if self.f is not None:
                total = self.f.received + length
                if total > req.size or (self.last and total != req.size):
                    raise chunks_do_not_fit(req.file_idx, total, req.size)
            if self.last and self.f is not None:
                # Until its record: no other request of ours writes into the file in place.
                if await completing.enter_async_context(s.placing.completing(self.f.id, self.placing)):
                    await self._look_again()  # others wrote meanwhile: the file as recorded now
            if self.last and self.f is not None:
                mine = (req.chunk_idx, self.target.path if self.target.fresh else None)
                if self.lane is not None:
                    await self.lane.settle()
                    running = None if self.lane.broken else (self.lane.hasher.copy(), self.offset + length)
                else:  # this chunk was not hashed on its way in: what arrived in order before it was
                    running = await s.hashes.take(self.f.id)
                completion, digest = await asyncio.to_thread(prepare, s.store, self.f, mine, running)
            recorded = await s.recorder.record(Arrival(
                self.owner, self.batch_id, self.batch_pk, req, length,
                self.target.path if self.target.fresh else None, self.f.id if self.f else None,
                self.f.chunk_size if self.f else None, digest, completion,
                (self.f.chunk_ids, self.f.loose_ids) if completion is not None and self.f else None))
        except BaseException as e:
            if self.target.fresh:
                remove(self.target.path)
            elif self.f is not None and isinstance(e, FileNotFound | BatchNotFound):
                # Written in place for a file whose row went meanwhile (deleted, replaced, its
                # batch dropped): the write made its folder again. Ids are never reused: it goes.
                await asyncio.to_thread(remove_tree, s.store.file_dir(self.batch_pk, self.f.id))
            if completion is not None and completion.name != "partial":
                remove(completion)
            if isinstance(e, ValueError):  # the chunks did not make the declared file
                raise FileSizeMismatch(f"file {req.file_idx}: {e}") from None
            mapped = storage_error(e, s.settings.min_free_disk, f"receiving file {req.file_idx}")
            if isinstance(e, FileNotFound | BatchNotFound) or isinstance(mapped, FileNotFound):
                # What this process remembered of the file (or batch) is out of date: read it
                # again next time, or the chunk sent again meets the same 404 for ever.
                s._files.pop((self.batch_pk, req.file_idx), None)
                if isinstance(e, BatchNotFound):
                    s._open_batches.pop(self.batch_id, None)
            if isinstance(mapped, FileNotFound):
                # Its bytes went with the file, or with the whole batch (dropped, executed): the
                # latter is said at once as every later request will say it, not "send it again".
                # Read, not remembered: another process may have closed it.
                async with s.db.read() as session:
                    await s._open_batch(session, self.owner, self.batch_id)
                if self.f is not None:
                    # Or the file is still there: another copy of this chunk completed it (or
                    # recorded the chunk) meanwhile, and the clean-up after it took what this
                    # request had read of the file, its own temp in the file dir included. Then
                    # this one is a repeat, answered as one (201 with the SHA-256 once complete).
                    f, state = await s._read_file(self.batch_pk, req.file_idx)
                    if f is not None and state is not None and f.id == self.f.id:
                        early = await s._early(self.batch_id, req, f, state)
                        if early is not None:
                            return early
            if mapped is not None:
                raise mapped from None
            raise
        finally:
            await completing.aclose()
            self._release()
            file_id = recorded.file_id if recorded is not None else (self.f.id if self.f else None)
            s.hashes.end(file_id, self.offset, self.lane if req.chunk_count > 1 else None,
                         recorded.outcome.uploaded_size if recorded else 0, recorded is not None and recorded.new)
        row = recorded.row
        if req.chunk_count > 1 and row.id is not None:
            s._remember(Snapshot(row.id, row.batch_pk, row.size, row.chunk_count, row.chunk_size,
                                 bytes(row.chunk_ids), bytes(row.loose_ids), row.received), row.state, req.file_idx)
        if recorded.assemble and recorded.file_id is not None:
            # Claimed by its own record, or (a repeat) a failed assembly to claim and run again.
            digest = await asyncio.shield(s.assembler.ensure(self.batch_id, recorded.file_id, claimed=recorded.new))
            o = recorded.outcome
            return UploadOutcome(o.batch_id, o.file_idx, o.chunked, o.uploaded_size, o.chunk_count, o.chunk_ids,
                                 digest is not None, digest)
        if recorded.outcome.complete and not recorded.new:
            # A repeat of a complete file, answered by its group at once: in the group that
            # completed the file, before the sync that makes that commit durable (see _early).
            await s.durability.synced()
        if recorded.completed:
            s.stats.assembled += 1
            log.debug("file %s of batch %s complete (its last chunk)", recorded.file_id, self.batch_id)
            if recorded.file_id is not None:
                s.hashes.forget(recorded.file_id)
        return recorded.outcome

    async def _look_again(self) -> None:
        """The file's row read again after waiting for other copies of its chunks: when this
        chunk is recorded by now (or the file complete, or gone), this request is no longer the
        one to complete it, and its record is a repeat's (or an error)."""
        assert self.f is not None
        f, state = await self.s._read_file(self.batch_pk, self.req.file_idx)
        if f is None or f.id != self.f.id or state != "receiving" or self.req.chunk_idx in ChunkSet(f.chunk_ids):
            self.last = False
            return
        self.f = f
        self.last = len(ChunkSet(f.chunk_ids)) + 1 == f.chunk_count

    async def _small(self, body: AsyncIterable[bytes]) -> UploadOutcome:
        """A whole file of at most WRITE_BUFFER bytes: read into memory, then written, hashed and
        recorded by its group, in the group's one thread hop."""
        req, pieces, size = self.req, [], 0
        async for data in body:
            size += len(data)
            if size > self.limit:
                raise FileSizeMismatch(f"body is longer than X-File-Size ({self.limit} bytes)")
            pieces.append(data)
        if size != req.size:
            raise FileSizeMismatch(f"body of {size} bytes is shorter than X-File-Size {req.size}")
        recorded = await self.s.recorder.record(Arrival(
            self.owner, self.batch_id, self.batch_pk, req, size, self.target.path, None, body=b"".join(pieces)))
        if recorded.completed:
            self.s.stats.assembled += 1
            log.debug("file %s of batch %s complete (whole)", recorded.file_id, self.batch_id)
        return recorded.outcome

    async def _receive(self, body: AsyncIterable[bytes]) -> int:
        req = self.req
        try:
            length = await self.s.store.receive(body, self.target, limit=self.limit, reserve_bytes=self.reserve,
                                                declared=req.content_length, lane=self.lane)
        except BodyTooLarge:
            if self.limit == self.s.settings.max_chunk_size:
                raise ChunkTooLarge(f"request body is over the {self.limit} byte chunk limit "
                                    "(FILEDROP_MAX_CHUNK_SIZE)") from None
            raise FileSizeMismatch(f"body is longer than {'X-File-Size' if self.limit == req.size else 'this chunk'} "
                                   f"({self.limit} bytes)") from None
        if req.chunk_count == 1 and length != req.size:
            raise FileSizeMismatch(f"body of {length} bytes is shorter than X-File-Size {req.size}")
        if length == 0 and req.chunk_count > 1:  # sent without Content-Length
            raise _empty_chunk(req)
        return length

