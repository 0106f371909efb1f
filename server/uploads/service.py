"""The upload service: batches, files and chunks as rows; bytes through ``UploadStore``.

Invariants:
* A batch belongs to the owner that created it; for anyone else it does not exist (404).
  ``state``: open -> dropped | executed. Closed batches stay as tombstone rows and refuse
  uploads (404), so a late chunk cannot resurrect them.
* A chunk is recorded only after its bytes are written and renamed into place; recording the
  same chunk twice is a no-op (idempotent: clients and urllib3 retry POSTs). Chunks become
  power-loss durable in groups (``sync_points``; see ``server.uploads.store``); after a reboot
  the chunks recorded since the last durability point are forgotten and sent again.
* A file is assembled exactly once: the "all chunks present" check and the flip
  receiving -> assembling is one conditional UPDATE whose row count picks the single winner.
  The winner assembles outside any transaction, in a thread, then marks the file complete.
  A one-chunk file (every normal upload) is "assembled" by its rename into ``data`` in the
  same transaction that records it. Multi-chunk files are assembled by a task the service
  owns; the last chunk is answered once every chunk is durably stored (as Nuxeo, which
  concatenates chunks lazily), and everything that reads a file's bytes (``open_file``,
  ``execute``) or removes them waits for its batch's assemblies first. Files found in
  ``assembling`` at start-up are assembled again (``recover``).
* Client-supplied names are data in rows; every path comes from row ids (``UploadStore``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import urllib.parse
import uuid
from collections.abc import AsyncIterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import and_, bindparam, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from server.config import Settings
from server.db import Database, utcnow
from server.db.models import Batch, BatchFile, Chunk
from server.durable import boot_id, fsync_dir
from server.errors import BadRequest, InsufficientStorage, NotFound, PayloadTooLarge
from server.uploads.operations import ExecuteContext, OperationRegistry, OperationResult
from server.uploads.store import BodyTooLarge, UploadStore, remove, remove_tree

log = logging.getLogger("filedrop.uploads")

# Legacy clients choose their batch ids: 1-128 of [A-Za-z0-9._-], not starting with a dot
# (so never ".", ".." or a dot-name) and never containing "..". Ids are only ever data, but a
# strict alphabet keeps them safe in logs, URLs and NGINX paths.
_BATCH_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_FILE_IDX = re.compile(r"[0-9]{1,9}")
_MAX_NAME = 255  # characters; what common file systems allow for one name
MAX_CHUNKS = 1_000_000  # most chunks one file may be declared with (X-Upload-Chunk-Count)
_NAME_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f/\\]")
_KNOWN_LIMIT = 10_000
_TOUCH_EVERY = timedelta(seconds=30)  # a receiving file's updated_at is refreshed at most this often


def _hot_statements() -> dict[str, Any]:
    """The statements of the upload hot path, built once (building them per request cost as
    much CPU as running them)."""
    fa, others = aliased(BatchFile), aliased(BatchFile)
    chunk_ids = select(func.group_concat(Chunk.chunk_idx))
    return {
        # Everything _claim decides on, in one query.
        "claim": select(
            Batch.id, Batch.owner, Batch.state, fa.id, fa.state, fa.chunk_count, fa.size,
            select(func.count()).select_from(others).where(others.batch_pk == Batch.id).scalar_subquery(),
            select(func.coalesce(func.sum(others.size), 0)).where(others.batch_pk == Batch.id).scalar_subquery(),
            chunk_ids.where(Chunk.file_id == fa.id).scalar_subquery(),
        ).outerjoin(fa, and_(fa.batch_pk == Batch.id, fa.file_idx == bindparam("file_idx")))
        .where(Batch.batch_id == bindparam("batch_id")),
        # Everything _record decides on, in one query.
        "record": select(
            Batch.state, BatchFile.state, BatchFile.chunk_count, BatchFile.size,
            chunk_ids.where(Chunk.file_id == BatchFile.id).scalar_subquery(),
            select(func.coalesce(func.sum(Chunk.size), 0)).where(Chunk.file_id == BatchFile.id).scalar_subquery(),
            BatchFile.updated_at,
        ).join(Batch, Batch.id == BatchFile.batch_pk).where(BatchFile.id == bindparam("file_id")),
        "insert_batch": insert(Batch).returning(Batch.id),
        "insert_file": insert(BatchFile).returning(BatchFile.id),
        "insert_chunk": insert(Chunk),
        "touch_file": update(BatchFile).where(BatchFile.id == bindparam("file_id"))
        .values(updated_at=bindparam("now")),
        "complete_file": update(BatchFile).where(BatchFile.id == bindparam("file_id"))
        .values(state="complete", sha256=bindparam("sha"), updated_at=bindparam("now")),
        # The exactly-once claim of assembly: all chunks present and still receiving.
        "start_assembly": update(BatchFile).where(
            BatchFile.id == bindparam("file_id"), BatchFile.state == "receiving",
            select(func.count()).where(Chunk.file_id == BatchFile.id).scalar_subquery() == BatchFile.chunk_count,
        ).values(state="assembling", updated_at=bindparam("now")),
    }


_SQL = _hot_statements()


def check_batch_id(value: str) -> str:
    """Return ``value`` if it is a valid batch id, else raise 400 ERR_BATCH_ID_INVALID."""
    if not _BATCH_ID.fullmatch(value) or ".." in value:
        raise BadRequest(
            "batch id must be 1-128 characters of A-Z a-z 0-9 . _ -, not start with '.' nor contain '..'",
            code="ERR_BATCH_ID_INVALID")
    return value


def parse_file_idx(value: str | None) -> int:
    if value is None or not _FILE_IDX.fullmatch(value.strip()):
        raise BadRequest("fileIdx must be a non-negative integer", code="ERR_FILE_IDX_INVALID")
    return int(value)


def parse_count(value: str | None, what: str, header: str, *, minimum: int = 0,
                maximum: int = 1 << 62) -> int:
    if value is None:
        raise BadRequest(f"{header} is required", code=f"ERR_{what}_MISSING")
    v = value.strip()
    if not v.isascii() or not v.isdigit() or len(v) > 19 or not minimum <= int(v) <= maximum:
        raise BadRequest(f"{header} must be an integer from {minimum} to {maximum}", code=f"ERR_{what}_INVALID")
    return int(v)


def decode_file_name(value: str | None) -> str:
    """Percent-decode X-File-Name as strict UTF-8.

    Rejected (400 ERR_FILE_NAME_INVALID): missing or empty, non-UTF-8 escapes, control
    characters including NUL, path separators ``/`` and ``\\``, ``.`` and ``..``, more than 255
    characters. A name is one file name as every client OS knows it; the server never uses it
    as a path, but a separator or a NUL in one is always a confused or hostile client.
    """
    if value is None or not value.strip():
        raise BadRequest("X-File-Name is required", code="ERR_FILE_NAME_INVALID")
    try:
        raw = value.encode("utf-8", "surrogateescape")
        name = urllib.parse.unquote_to_bytes(raw).decode("utf-8")
    except UnicodeError:
        raise BadRequest("X-File-Name is not percent-encoded UTF-8", code="ERR_FILE_NAME_INVALID") from None
    if _NAME_FORBIDDEN.search(name) or name in (".", ".."):
        raise BadRequest("X-File-Name must not contain path separators or control characters",
                         code="ERR_FILE_NAME_INVALID")
    if len(name) > _MAX_NAME:
        raise BadRequest(f"X-File-Name is longer than {_MAX_NAME} characters", code="ERR_FILE_NAME_INVALID")
    return name


@dataclass(frozen=True)
class UploadRequest:
    """One upload request (a whole file, or one chunk of it), parsed from headers."""

    file_idx: int
    name: str
    size: int  # the whole file's declared size (X-File-Size)
    mimetype: str
    chunked: bool
    chunk_idx: int = 0
    chunk_count: int = 1
    content_length: int | None = None  # of this request's body, when the client sent one


@dataclass(frozen=True)
class UploadOutcome:
    batch_id: str
    file_idx: int
    chunked: bool
    uploaded_size: int  # bytes of this request's body
    chunk_count: int
    chunk_ids: list[int]
    complete: bool  # every chunk is there (the file is assembled, or was already)


@dataclass(frozen=True)
class FileState:
    batch_id: str
    file_idx: int
    name: str
    size: int
    mimetype: str
    chunked: bool
    chunk_count: int
    chunk_ids: list[int]
    received: int
    state: str
    sha256: str | None

    @property
    def complete(self) -> bool:
        return self.state == "complete"


@dataclass(frozen=True)
class FileInfo:
    """A complete file, for other components (the job engine reads it, never writes)."""

    path: Path
    name: str
    size: int
    sha256: str
    mimetype: str


@dataclass(frozen=True)
class _Known:
    """A file known to be receiving: lets a chunk skip the claim transaction (the record
    transaction checks everything again, so a stale entry costs one refused request)."""

    owner: str
    batch_pk: int
    file_id: int
    chunk_count: int
    size: int


@dataclass(frozen=True)
class _Slot:
    batch_pk: int
    file_id: int
    done: UploadOutcome | None = None  # set when no body needs reading (idempotent repeat)
    replaced: Path | None = None


@dataclass
class Stats:
    """Counters since start (exactly-once assembly is checked against them)."""

    assembled: int = 0
    assembly_failed: int = 0
    recovered: int = 0


class UploadService:
    def __init__(self, db: Database, settings: Settings, operations: OperationRegistry) -> None:
        self.db = db
        self.settings = settings
        self.operations = operations
        self.store = UploadStore(settings.uploads_dir)
        self.stats = Stats()
        self._tasks: set[asyncio.Task[None]] = set()
        self._assemblies: dict[str, set[asyncio.Task[None]]] = {}  # batch_id -> running assemblies
        self._known: dict[tuple[str, int], _Known] = {}
        self._open_batches: dict[str, tuple[str, int]] = {}  # batch_id -> (owner, row id), open ones
        self._unsynced = asyncio.Event()  # chunks were recorded since the last sync point

    # -- life cycle ----------------------------------------------------------------------
    async def recover(self) -> int:
        """Forget chunks a reboot may have lost, then assemble again every file a crash left
        in ``assembling``; returns how many. Ends with a fresh durability point."""
        await self._forget_unsynced_chunks()
        async with self.db.read() as s:
            rows = (await s.execute(
                select(Batch.batch_id, BatchFile.batch_pk, BatchFile.id, BatchFile.chunk_count, BatchFile.size)
                .join(Batch).where(BatchFile.state == "assembling", Batch.state == "open"))).all()
        for batch_id, batch_pk, file_id, count, size in rows:
            log.info("recovering file %s of batch %s left assembling", file_id, batch_id)
            self._start_assembly(batch_id, batch_pk, file_id, count, size)
        self.stats.recovered += len(rows)
        # Whole-file temps in batch dirs belong to requests of a previous run (the janitor
        # looks for temps in file dirs only): before the first request, all are leftovers.
        removed = await asyncio.to_thread(self.store.remove_batch_temps)
        if removed:
            log.info("removed %d whole-file temp(s) left by a previous run", removed)
        await self.sync_point()
        return len(rows)

    async def sync_point(self) -> None:
        """Make every chunk recorded so far power-loss durable (one syncfs) and say so."""
        self._unsynced.clear()
        try:
            async with self.db.write():
                at = utcnow()  # under the writer: no chunk record is half done (see _record)
            await asyncio.to_thread(self.store.sync_point, at)
        except BaseException:
            # Cancelled (shutdown stops the periodic task) or failed: the chunks are still
            # unsynced, so the next sync point, or the one ``close`` runs, must not skip them.
            self._unsynced.set()
            raise

    async def sync_points(self, every: float) -> None:
        """Owned task: a sync point at most every ``every`` seconds while chunks arrive."""
        while True:
            await self._unsynced.wait()
            await asyncio.sleep(every)  # group the chunks of this interval into one syncfs
            try:
                await self.sync_point()
            except Exception:  # e.g. the writer busy past its pool timeout: try again next time
                log.exception("sync point failed; the chunks stay unsynced until the next one")

    async def _forget_unsynced_chunks(self) -> None:
        """After a reboot, chunks recorded after the last durability point may have lost
        bytes the database still counts: forget them (rows and files) so clients resend them.
        A process crash alone (same boot) loses nothing: the page cache outlived it."""
        last = await asyncio.to_thread(self.store.last_sync_point)
        if last is None or last[0] == boot_id():
            return
        since = last[1]
        async with self.db.write() as s:
            rows = (await s.execute(
                select(BatchFile.batch_pk, Chunk.file_id, Chunk.chunk_idx).join(BatchFile)
                .where(Chunk.received_at > since, BatchFile.state.in_(("receiving", "assembling"))))).all()
            file_ids = sorted({r.file_id for r in rows})
            if file_ids:
                await s.execute(delete(Chunk).where(Chunk.file_id.in_(file_ids), Chunk.received_at > since))
                await s.execute(update(BatchFile).where(BatchFile.id.in_(file_ids))
                                .values(state="receiving", updated_at=utcnow()))
        for batch_pk, file_id, idx in rows:
            remove(self.store.chunk_path(batch_pk, file_id, idx))
        if rows:
            log.warning("the machine rebooted after the last durability point (%s): forgot %d chunk(s) "
                        "of %d file(s); clients will send them again", since.isoformat(), len(rows),
                        len(file_ids))

    async def close(self) -> None:
        """Let running assemblies finish (they are short and leave a consistent state), then
        make what was received durable."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._unsynced.is_set():
            await self.sync_point()

    async def idle(self) -> None:
        """Wait until no assembly is running (tests and the janitor use it)."""
        await self.close()

    def _start_assembly(self, batch_id: str, batch_pk: int, file_id: int, count: int, size: int) -> None:
        task = asyncio.ensure_future(self._assemble(batch_pk, file_id, count, size))
        self._tasks.add(task)
        running = self._assemblies.setdefault(batch_id, set())
        running.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            running.discard(t)
            if not running and self._assemblies.get(batch_id) is running:
                del self._assemblies[batch_id]
        task.add_done_callback(done)

    async def settle(self, batch_id: str) -> None:
        """Wait for the batch's running assemblies (shielded: a caller that goes away does
        not stop them)."""
        while running := self._assemblies.get(batch_id):
            await asyncio.shield(asyncio.gather(*running, return_exceptions=True))

    def _forget(self, batch_id: str, file_ids: list[int]) -> None:
        for key in [k for k, v in self._known.items() if k[0] == batch_id and v.file_id in file_ids]:
            del self._known[key]

    # -- batches -------------------------------------------------------------------------
    async def create_batch(self, owner: str) -> str:
        batch_id = uuid.uuid4().hex
        now = utcnow()
        async with self.db.write() as s:
            s.add(Batch(batch_id=batch_id, owner=owner, state="open", created_at=now, updated_at=now))
        return batch_id

    async def _open_batch(self, s: AsyncSession, owner: str, batch_id: str) -> Batch:
        batch = await s.scalar(select(Batch).where(Batch.batch_id == batch_id))
        if batch is None or batch.owner != owner:
            raise NotFound(f"batch {batch_id} not found", code="ERR_BATCH_NOT_FOUND")
        if batch.state != "open":
            raise NotFound(f"batch {batch_id} was {batch.state}", code="ERR_BATCH_NOT_FOUND")
        return batch

    async def drop_batch(self, owner: str, batch_id: str) -> None:
        """Remove a batch's files (rows and bytes); its row stays as a ``dropped`` tombstone."""
        await self.settle(batch_id)
        async with self.db.write() as s:
            batch = await self._open_batch(s, owner, batch_id)
            await self._close(s, batch, "dropped")
        await self._remove_after_commit(self.store.batch_dir(batch.id))

    async def _close(self, s: AsyncSession, batch: Batch, state: str) -> None:
        ids = (await s.scalars(select(BatchFile.id).where(BatchFile.batch_pk == batch.id))).all()
        await s.execute(delete(BatchFile).where(BatchFile.batch_pk == batch.id))
        batch.state = state
        batch.updated_at = utcnow()
        self._open_batches.pop(batch.batch_id, None)
        self._forget(batch.batch_id, list(ids))

    async def _remove_after_commit(self, path: Path) -> None:
        """Remove bytes whose rows were just deleted: once that delete is durable, so that a
        power loss cannot bring back rows (an open batch, complete files) without their bytes."""
        await asyncio.to_thread(self.db.sync_commits)
        await asyncio.to_thread(remove_tree, path)

    # -- files ---------------------------------------------------------------------------
    async def list_files(self, owner: str, batch_id: str) -> list[FileState]:
        """Every file with at least one chunk received, by fileIdx."""
        async with self.db.read() as s:
            batch = await self._open_batch(s, owner, batch_id)
            files = (await s.scalars(select(BatchFile).where(BatchFile.batch_pk == batch.id)
                                     .order_by(BatchFile.file_idx))).all()
            chunks = await self._chunks_of(s, [f.id for f in files])
            # Built inside the session: the read session's rollback expires its objects.
            return [self._state(batch_id, f, chunks.get(f.id, [])) for f in files if chunks.get(f.id)]

    async def file_state(self, owner: str, batch_id: str, file_idx: int) -> FileState:
        """One file's state; 404 until its first chunk is recorded (the nuxeo client reads a
        200 as "resume from these chunk ids")."""
        async with self.db.read() as s:
            batch = await self._open_batch(s, owner, batch_id)
            f = await self._file(s, batch, file_idx)
            chunks = (await self._chunks_of(s, [f.id])).get(f.id, [])
            if not chunks:
                raise NotFound(f"file {file_idx} of batch {batch_id} not found", code="ERR_FILE_NOT_FOUND")
            return self._state(batch_id, f, chunks)

    async def delete_file(self, owner: str, batch_id: str, file_idx: int) -> None:
        await self.settle(batch_id)
        async with self.db.write() as s:
            batch = await self._open_batch(s, owner, batch_id)
            f = await self._file(s, batch, file_idx)
            await s.execute(delete(BatchFile).where(BatchFile.id == f.id))
            batch.updated_at = utcnow()
        self._forget(batch_id, [f.id])
        await self._remove_after_commit(self.store.file_dir(batch.id, f.id))

    async def open_file(self, owner: str, batch_id: str, file_idx: int) -> FileInfo:
        """A complete file's path and metadata (404 if missing or not complete). Waits for
        the batch's running assemblies first."""
        await self.settle(batch_id)
        async with self.db.read() as s:
            batch = await self._open_batch(s, owner, batch_id)
            f = await self._file(s, batch, file_idx)
            if f.state != "complete" or f.sha256 is None:
                raise NotFound(f"file {file_idx} of batch {batch_id} is not complete", code="ERR_FILE_INCOMPLETE")
            return FileInfo(self.store.data_path(batch.id, f.id), f.name, f.size, f.sha256, f.mimetype)

    async def _file(self, s: AsyncSession, batch: Batch, file_idx: int) -> BatchFile:
        f = await s.scalar(select(BatchFile).where(BatchFile.batch_pk == batch.id, BatchFile.file_idx == file_idx))
        if f is None:
            raise NotFound(f"file {file_idx} of batch {batch.batch_id} not found", code="ERR_FILE_NOT_FOUND")
        return f

    @staticmethod
    async def _chunks_of(s: AsyncSession, file_ids: list[int]) -> dict[int, list[tuple[int, int]]]:
        out: dict[int, list[tuple[int, int]]] = {}
        if not file_ids:
            return out
        rows = await s.execute(select(Chunk.file_id, Chunk.chunk_idx, Chunk.size)
                               .where(Chunk.file_id.in_(file_ids)).order_by(Chunk.file_id, Chunk.chunk_idx))
        for file_id, idx, size in rows:
            out.setdefault(file_id, []).append((idx, size))
        return out

    @staticmethod
    def _state(batch_id: str, f: BatchFile, chunks: list[tuple[int, int]]) -> FileState:
        return FileState(batch_id, f.file_idx, f.name, f.size, f.mimetype, f.upload_type == "chunked",
                         f.chunk_count, [i for i, _ in chunks], sum(n for _, n in chunks), f.state, f.sha256)

    # -- receiving -----------------------------------------------------------------------
    async def receive(self, owner: str, batch_id: str, req: UploadRequest, body: AsyncIterable[bytes], *,
                      create: bool = False) -> UploadOutcome:
        """Store one upload request's body (a whole file or one chunk) and record it.

        ``create``: a legacy upload creates its batch (client-chosen id) on first use.
        Checks every limit before reading a byte; a body that breaks one while streaming is
        deleted and nothing is recorded. Sending a chunk that is already recorded is a no-op.
        """
        s = self.settings
        if req.size > s.max_file_size:
            raise PayloadTooLarge(f"X-File-Size {req.size} is over the {s.max_file_size} byte file limit",
                                  code="ERR_FILE_TOO_LARGE")
        if req.chunk_idx >= req.chunk_count:
            raise BadRequest(f"chunk index {req.chunk_idx} is not below chunk count {req.chunk_count}",
                             code="ERR_CHUNK_INDEX_INVALID")
        if req.chunk_count > max(req.size, 1):  # every chunk holds at least one byte
            raise BadRequest(f"{req.chunk_count} chunks cannot make {req.size} bytes", code="ERR_CHUNK_COUNT_INVALID")
        cl = req.content_length
        if not req.chunked and req.size > s.max_chunk_size:
            raise PayloadTooLarge(f"a file over {s.max_chunk_size} bytes must be sent in chunks",
                                  code="ERR_CHUNK_TOO_LARGE")
        if cl is not None and cl > s.max_chunk_size:
            raise PayloadTooLarge(f"request body of {cl} bytes is over the {s.max_chunk_size} byte chunk limit",
                                  code="ERR_CHUNK_TOO_LARGE")
        if cl is not None and (cl != req.size if not req.chunked else cl > req.size):
            raise BadRequest(f"Content-Length {cl} does not match X-File-Size {req.size}",
                             code="ERR_FILE_SIZE_MISMATCH")
        incoming = cl if cl is not None else min(req.size, s.max_chunk_size)
        if self.store.free_bytes() - incoming < s.min_free_disk:  # one statvfs: no thread needed
            raise InsufficientStorage("not enough free disk space for this upload", code="ERR_DISK_FULL")

        if not req.chunked:
            whole = await self._receive_whole(owner, batch_id, req, body, create)
            if whole is not None:
                return whole
        known = self._known.get((batch_id, req.file_idx))
        if (known is not None and known.owner == owner and known.chunk_count == req.chunk_count
                and known.size == req.size):
            slot = _Slot(known.batch_pk, known.file_id)
        else:
            slot = await self._claim(owner, batch_id, req, create)
        if slot.replaced is not None:
            await asyncio.to_thread(remove_tree, slot.replaced)
        if slot.done is not None:
            return slot.done
        # A one-chunk file is hashed on the way in (it is complete when recorded); a chunked
        # file is hashed while it is assembled, beside the copy, off the chunks' critical path.
        hasher = hashlib.sha256() if req.chunk_count == 1 else None
        temp = self.store.chunk_temp(slot.batch_pk, slot.file_id, req.chunk_idx)
        received = await self._stream(body, temp, req, hasher)
        outcome, assemble = await self._record(slot, batch_id, req, temp, received, hasher)
        if assemble:
            self._start_assembly(batch_id, slot.batch_pk, slot.file_id, req.chunk_count, req.size)
        return outcome

    async def _open_batch_pk(self, owner: str, batch_id: str) -> int | None:
        """The row id of an open batch of ``owner`` (cached; the recording transaction checks
        again), None if there is no such batch id at all; 404 for a closed or foreign one."""
        hit = self._open_batches.get(batch_id)
        if hit is not None and hit[0] != owner:
            hit = None  # maybe stale (the batch removed, its id taken by this owner): the row decides
        if hit is None:
            async with self.db.read() as s:
                row = (await s.execute(select(Batch.owner, Batch.id, Batch.state)
                                       .where(Batch.batch_id == batch_id))).one_or_none()
            if row is None:
                return None
            if row[2] != "open":
                raise NotFound(f"batch {batch_id} not found", code="ERR_BATCH_NOT_FOUND")
            if len(self._open_batches) >= _KNOWN_LIMIT:
                self._open_batches.clear()
            hit = self._open_batches[batch_id] = (row[0], row[1])
        if hit[0] != owner:
            raise NotFound(f"batch {batch_id} not found", code="ERR_BATCH_NOT_FOUND")
        return hit[1]

    async def _receive_whole(self, owner: str, batch_id: str, req: UploadRequest, body: AsyncIterable[bytes],
                             create: bool) -> UploadOutcome | None:
        """A whole-file upload in one write transaction: the body goes to a temp in the batch
        dir first, then its file row is made complete, its chunk recorded and the temp renamed
        to ``data``, all at once. (Whole files are most of the traffic of small uploads, and
        the single writer is their bottleneck.) None: the batch does not exist yet (a legacy
        upload creates it through the general path)."""
        batch_pk = await self._open_batch_pk(owner, batch_id)
        if batch_pk is None:
            if create:
                return None
            raise NotFound(f"batch {batch_id} not found", code="ERR_BATCH_NOT_FOUND")
        hasher = hashlib.sha256()
        temp = self.store.whole_temp(batch_pk, req.file_idx)
        received = await self._stream(body, temp, req, hasher)
        now = utcnow()
        replaced: Path | None = None
        file_id = 0
        try:
            async with self.db.write() as s:
                row = (await s.execute(_SQL["claim"], {"batch_id": batch_id, "file_idx": req.file_idx})).one_or_none()
                if row is None and create:  # removed meanwhile (janitor, CLI): a legacy upload makes it anew
                    row = await self._insert_batch(s, owner, batch_id, now)
                if row is None or row[1] != owner or row[2] != "open":
                    self._open_batches.pop(batch_id, None)
                    raise NotFound(f"batch {batch_id} not found", code="ERR_BATCH_NOT_FOUND")
                pk, _owner, _state, old_id, f_state, f_count, f_size, n_files, n_bytes, ids_csv = row
                if pk != batch_pk:
                    # The cached row id is stale: the batch was removed (janitor, CLI) and its
                    # id made anew. The row decides; the temp is renamed across (same disk).
                    self._open_batches[batch_id] = (owner, pk)
                    batch_pk = pk
                if old_id is not None:
                    ids = _ids(ids_csv)
                    if f_state == "receiving" and ids and f_count != 1:
                        raise BadRequest(f"file {req.file_idx} was declared with {f_count} chunks, not 1",
                                         code="ERR_CHUNK_COUNT_CHANGED")
                    if f_state != "complete" and ids and f_count == 1:  # one chunk of one, being assembled: a repeat
                        remove(temp)
                        return UploadOutcome(batch_id, req.file_idx, False, received, 1, ids, True)
                    # A complete file is replaced (as in Nuxeo), and so is one still being assembled
                    # (its last chunk was answered 201: complete to the client; the assembly sees
                    # its row gone); an empty declaration is superseded.
                    await s.execute(delete(BatchFile).where(BatchFile.id == old_id))
                    self._forget(batch_id, [old_id])
                    if f_state != "assembling":  # else its assembly removes it, finding the row gone
                        replaced = self.store.file_dir(batch_pk, old_id)
                    n_files, n_bytes = n_files - 1, n_bytes - f_size
                self._check_limits(n_files, n_bytes, req.size)
                file_id = (await s.execute(_SQL["insert_file"], {
                    "batch_pk": batch_pk, "file_idx": req.file_idx, "name": req.name, "mimetype": req.mimetype,
                    "size": req.size, "upload_type": "normal", "chunk_count": 1, "state": "complete",
                    "sha256": hasher.hexdigest(), "created_at": now, "updated_at": now})).scalar_one()
                await s.execute(_SQL["insert_chunk"], {"file_id": file_id, "chunk_idx": 0, "size": received,
                                                       "received_at": now})
                data = self.store.data_path(batch_pk, file_id)
                data.parent.mkdir(parents=True, exist_ok=True)  # a rolled-back id may come again
                os.replace(temp, data)
        except BaseException:
            remove(temp)
            raise
        await asyncio.to_thread(_durable_whole, data, self.db)
        if replaced is not None:
            await asyncio.to_thread(remove_tree, replaced)
        self.stats.assembled += 1
        return UploadOutcome(batch_id, req.file_idx, False, received, 1, [0], True)

    async def _stream(self, body: AsyncIterable[bytes], temp: Path, req: UploadRequest, hasher: Any) -> int:
        """Receive a body into ``temp`` within the chunk limit and the declared size; its size."""
        limit = min(self.settings.max_chunk_size, req.size)
        try:
            # A one-chunk file is complete once recorded: durable first. Chunks of bigger files
            # become durable at the next sync point.
            received = await self.store.receive(body, temp, limit, hasher, durable=req.chunk_count == 1)
        except BodyTooLarge:
            if limit == self.settings.max_chunk_size:
                raise PayloadTooLarge(f"request body is over the {limit} byte chunk limit",
                                      code="ERR_CHUNK_TOO_LARGE") from None
            raise BadRequest(f"body is longer than X-File-Size {req.size}", code="ERR_FILE_SIZE_MISMATCH") from None
        if not req.chunked and received.size != req.size:
            remove(received.path)
            raise BadRequest(f"body of {received.size} bytes is shorter than X-File-Size {req.size}",
                             code="ERR_FILE_SIZE_MISMATCH")
        return received.size

    async def _claim(self, owner: str, batch_id: str, req: UploadRequest, create: bool) -> _Slot:
        """Find or make the batch and file rows for an upload (one short write transaction,
        one query to read everything it decides on: the writer is the bottleneck for small files)."""
        now = utcnow()
        replaced = None
        async with self.db.write() as s:
            row = (await s.execute(_SQL["claim"], {"batch_id": batch_id, "file_idx": req.file_idx})).one_or_none()
            if row is None and create:
                row = await self._insert_batch(s, owner, batch_id, now)
            if row is None or row[1] != owner or row[2] != "open":
                raise NotFound(f"batch {batch_id} not found" if row is None or row[1] != owner
                               else f"batch {batch_id} was {row[2]}", code="ERR_BATCH_NOT_FOUND")
            batch_pk, _owner, _state, file_id, f_state, f_count, f_size, n_files, n_bytes, ids_csv = row
            kind = "chunked" if req.chunked else "normal"
            if file_id is not None:
                ids = _ids(ids_csv)
                if f_state == "complete" and not req.chunked:
                    # A whole-file upload onto a complete file replaces it (as in Nuxeo).
                    await s.execute(delete(BatchFile).where(BatchFile.id == file_id))
                    self._forget(batch_id, [file_id])
                    replaced = self.store.file_dir(batch_pk, file_id)
                    file_id, n_files, n_bytes = None, n_files - 1, n_bytes - f_size
                elif not ids and f_state == "receiving":
                    # Nothing received yet: the client may declare the file anew.
                    self._check_limits(n_files - 1, n_bytes - f_size, req.size)
                    await s.execute(update(BatchFile).where(BatchFile.id == file_id).values(
                        chunk_count=req.chunk_count, size=req.size, name=req.name, mimetype=req.mimetype,
                        upload_type=kind, updated_at=now))
                    f_count, f_size = req.chunk_count, req.size
                elif f_count != req.chunk_count:
                    raise BadRequest(f"file {req.file_idx} was declared with {f_count} chunks, not "
                                     f"{req.chunk_count}", code="ERR_CHUNK_COUNT_CHANGED")
                elif f_size != req.size:
                    raise BadRequest(f"file {req.file_idx} was declared with {f_size} bytes, not {req.size}",
                                     code="ERR_FILE_SIZE_CHANGED")
                elif f_state != "receiving" or req.chunk_idx in ids:
                    done = UploadOutcome(batch_id, req.file_idx, req.chunked, 0, f_count, ids, len(ids) == f_count)
                    return _Slot(batch_pk, file_id, done=done)
            if file_id is None:
                self._check_limits(n_files, n_bytes, req.size)
                file_id = (await s.execute(_SQL["insert_file"], {
                    "batch_pk": batch_pk, "file_idx": req.file_idx, "name": req.name, "mimetype": req.mimetype,
                    "size": req.size, "upload_type": kind, "chunk_count": req.chunk_count, "state": "receiving",
                    "created_at": now, "updated_at": now})).scalar_one()
                f_count, f_size = req.chunk_count, req.size
        if len(self._known) >= _KNOWN_LIMIT:
            self._known.clear()
        self._known[(batch_id, req.file_idx)] = _Known(owner, batch_pk, file_id, f_count, f_size)
        return _Slot(batch_pk, file_id, replaced=replaced)

    @staticmethod
    async def _insert_batch(s: AsyncSession, owner: str, batch_id: str, now: Any) -> tuple[Any, ...]:
        """Make a legacy batch (client-chosen id); returns a row shaped like the claim query's."""
        pk = (await s.execute(_SQL["insert_batch"], {"batch_id": batch_id, "owner": owner, "state": "open",
                                                     "created_at": now, "updated_at": now})).scalar_one()
        return (pk, owner, "open", None, None, None, None, 0, 0, None)

    def _check_limits(self, other_files: int, other_bytes: int, size: int) -> None:
        cfg = self.settings
        if other_files + 1 > cfg.max_files_per_batch:
            raise PayloadTooLarge(f"a batch holds at most {cfg.max_files_per_batch} files",
                                  code="ERR_BATCH_TOO_MANY_FILES")
        if other_bytes + size > cfg.max_batch_bytes:
            raise PayloadTooLarge(f"a batch holds at most {cfg.max_batch_bytes} bytes", code="ERR_BATCH_TOO_LARGE")

    async def _record(self, slot: _Slot, batch_id: str, req: UploadRequest, temp: Path, size: int,
                      hasher: Any) -> tuple[UploadOutcome, bool]:
        """Rename the received chunk into place and record it; flip the file to ``assembling``
        when this was its last missing chunk. Returns (outcome, this request must assemble).

        The rename happens inside the write transaction, so "not recorded yet" and the rename
        are one step for every other writer (a duplicate chunk never replaces a recorded one);
        it is a metadata operation. A one-chunk file (fsynced on the way in) is made durable
        right after the commit, before the client is answered; a chunk of a bigger file at the
        next sync point.
        """
        final = self.store.chunk_path(slot.batch_pk, slot.file_id, req.chunk_idx)
        data = self.store.data_path(slot.batch_pk, slot.file_id)
        stray: Path | None = None
        try:
            async with self.db.write() as s:
                # Taken under the writer: a sync point's time (also taken under it) orders
                # every chunk record, rename included, before or after that sync point.
                now = utcnow()
                row = (await s.execute(_SQL["record"], {"file_id": slot.file_id})).one_or_none()
                if row is None or row[0] != "open":
                    # Its rows are gone: whatever directory this request made is ours to remove.
                    stray = (self.store.file_dir(slot.batch_pk, slot.file_id) if row is None
                             else self.store.batch_dir(slot.batch_pk))
                    self._known.pop((batch_id, req.file_idx), None)
                    raise NotFound(f"batch {batch_id} or its file {req.file_idx} was removed meanwhile",
                                   code="ERR_FILE_NOT_FOUND" if row is None else "ERR_BATCH_NOT_FOUND")
                _b_state, f_state, f_count, f_size, ids_csv, received, touched = row
                ids = _ids(ids_csv)
                if f_count != req.chunk_count or f_size != req.size:
                    raise BadRequest(f"file {req.file_idx} was declared anew meanwhile",
                                     code="ERR_CHUNK_COUNT_CHANGED")
                if f_state != "receiving" or req.chunk_idx in ids:
                    remove(temp)
                    return UploadOutcome(batch_id, req.file_idx, req.chunked, size, f_count, ids,
                                         len(ids) == f_count), False
                total = received + size
                last = len(ids) + 1 == f_count
                if total > f_size or (last and total != f_size):
                    raise BadRequest(f"the chunks of file {req.file_idx} add up to {total} bytes, X-File-Size "
                                     f"is {f_size}", code="ERR_FILE_SIZE_MISMATCH")
                if last and f_count > 1 and self.store.free_bytes() - f_size < self.settings.min_free_disk:
                    raise InsufficientStorage("not enough free disk space to assemble this file",
                                              code="ERR_DISK_FULL")
                await s.execute(_SQL["insert_chunk"], {"file_id": slot.file_id, "chunk_idx": req.chunk_idx,
                                                       "size": size, "received_at": now})
                assemble = inline = False
                if last and f_count == 1 and hasher is not None:
                    # A one-chunk file is assembled by renaming it into place: no copy, no task.
                    os.replace(temp, data)
                    await s.execute(_SQL["complete_file"], {"file_id": slot.file_id, "sha": hasher.hexdigest(),
                                                            "now": now})
                    inline = True
                elif last:
                    os.replace(temp, final)
                    res = await s.execute(_SQL["start_assembly"], {"file_id": slot.file_id, "now": now})
                    assemble = res.rowcount == 1  # type: ignore[attr-defined]
                else:
                    os.replace(temp, final)
                    if now - touched > _TOUCH_EVERY:  # the idle clock the janitor reads; minutes matter
                        await s.execute(_SQL["touch_file"], {"file_id": slot.file_id, "now": now})
                ids = sorted([*ids, req.chunk_idx])
        except BaseException:
            remove(temp)
            if stray is not None:
                await asyncio.to_thread(remove_tree, stray)
            raise
        if inline:
            self._forget(batch_id, [slot.file_id])
            await asyncio.to_thread(_settle_inline, data, final.parent, self.db)
            self.stats.assembled += 1
        else:
            self._unsynced.set()
            if last:
                self._known.pop((batch_id, req.file_idx), None)
        return UploadOutcome(batch_id, req.file_idx, req.chunked, size, req.chunk_count, ids, last), assemble

    async def _assemble(self, batch_pk: int, file_id: int, chunk_count: int, size: int) -> None:
        try:
            digest = await asyncio.to_thread(self.store.assemble, batch_pk, file_id, chunk_count, size)
        except (OSError, ValueError) as e:
            self.stats.assembly_failed += 1
            log.error("assembling file %s of batch %s failed: %s", file_id, batch_pk, e)
            if not await self._repair(batch_pk, file_id):  # deleted, dropped or replaced meanwhile
                await asyncio.to_thread(remove_tree, self.store.file_dir(batch_pk, file_id))
            return
        async with self.db.write() as s:
            res = await s.execute(update(BatchFile).where(BatchFile.id == file_id, BatchFile.state == "assembling")
                                  .values(state="complete", sha256=digest, updated_at=utcnow()))
        self.stats.assembled += 1
        if res.rowcount == 1:  # type: ignore[attr-defined]
            await asyncio.to_thread(self.store.remove_chunks, batch_pk, file_id)
        else:  # deleted or dropped meanwhile
            await asyncio.to_thread(remove_tree, self.store.file_dir(batch_pk, file_id))

    async def _repair(self, batch_pk: int, file_id: int) -> bool:
        """After a failed assembly: forget chunks whose bytes are missing or wrong and let the
        client send them again (the file goes back to ``receiving``). False: the file's row is
        gone."""
        async with self.db.write() as s:
            rows = (await s.execute(select(Chunk.chunk_idx, Chunk.size).where(Chunk.file_id == file_id))).all()
            bad = []
            for idx, size in rows:
                p = self.store.chunk_path(batch_pk, file_id, idx)
                try:
                    ok = p.stat().st_size == size
                except OSError:
                    ok = False
                if not ok:
                    bad.append(idx)
            if bad:
                await s.execute(delete(Chunk).where(Chunk.file_id == file_id, Chunk.chunk_idx.in_(bad)))
            res = await s.execute(update(BatchFile).where(BatchFile.id == file_id, BatchFile.state == "assembling")
                                  .values(state="receiving", updated_at=utcnow()))
        return res.rowcount == 1  # type: ignore[attr-defined]

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
            async with self.db.write() as s:
                closing = await s.get(Batch, batch_pk)
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


def _ids(csv: str | None) -> list[int]:
    """Chunk ids from SQLite's group_concat (unordered)."""
    return sorted(int(i) for i in csv.split(",")) if csv else []


def _durable_whole(data: Path, db: Database) -> None:
    """Make a file answered complete durable: its rename into ``data``, the entries of its
    file dir and (new with a batch's first file) batch dir, and its record. Once the first
    fsync has committed the file system's journal the others find little left to do."""
    fsync_dir(data.parent)
    fsync_dir(data.parent.parent)
    fsync_dir(data.parent.parent.parent)
    db.sync_commits()


def _settle_inline(data: Path, chunks_dir: Path, db: Database) -> None:
    """Make a one-chunk file durable as a whole one and drop the chunks dir its temp lived in."""
    _durable_whole(data, db)
    try:
        chunks_dir.rmdir()
    except OSError:
        pass  # not empty: a concurrent duplicate's temp; the janitor takes stale temps
