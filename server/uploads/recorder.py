"""Group commit of upload records: requests whose bodies arrive at about the same moment are
recorded in one write transaction, and those that complete a file share its two syncs.

One owned task takes every request queued so far (a group, at most ``MAX_GROUP``) and:

1. runs one sync (``Durability.sync_now``) if the group before it completed a file or removed a
   row, or if one of this group's requests completes a file: that one sync makes the last
   group's commit (and its renames) durable, and this group's bytes: a file's bytes must be
   durable before the record that says it is complete (PostgreSQL pipelines its WAL flushes so);
2. answers the last group's completions and removes the bytes its commit no longer needs;
3. runs one ``BEGIN IMMEDIATE`` transaction: reads the group's batch and file rows in one
   query (``FOR UPDATE`` of the batch rows, a no-op on SQLite, for PostgreSQL), decides each
   request in order against what the earlier ones changed, writes the rows (one ``INSERT ...
   RETURNING``, one ``executemany`` ``UPDATE``, one ``DELETE``), and moves each request's bytes
   into place (renames) before the commit, so that "recorded" and "in place" are one step for
   every other writer: a duplicate chunk never replaces a recorded one. Requests that only
   recorded a chunk are answered at once; those that completed a file wait for the next sync.

All of that runs in one thread hop per group (``Database.write_sync``), so a group costs one
sync, one transaction and a couple of trips through the event loop, whatever its size.

A request that breaks a rule (404, 400, 413) gets its error and its temp is removed; the others
of its group go on. A rename that fails rolls the transaction back and the group is tried again
without that request. Each request costs one write transaction at most; a storage fault
becomes the client's error (``server.uploads.faults``) with nothing half-recorded.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, and_, bindparam, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from server.config import Settings
from server.db import Database, utcnow
from server.db.models import Batch, BatchFile
from server.errors import (
    BatchNotFound,
    BatchTooLarge,
    BatchTooManyFiles,
    ChunkCountChanged,
    FiledropError,
    FileNotFound,
    FileSizeChanged,
    FileSizeMismatch,
)
from server.uploads.chunkset import ChunkSet
from server.uploads.durability import Durability
from server.uploads.faults import storage_error
from server.uploads.model import UploadOutcome, UploadRequest, stride_of
from server.uploads.store import Target, UploadStore, make_dirs, remove

log = logging.getLogger("filedrop.uploads")
MAX_GROUP = 64
_B = Batch.__table__
_F = BatchFile.__table__
_MUTABLE = ("chunk_ids", "loose_ids", "synced_ids", "received", "state", "sha256", "updated_at")


@dataclass
class Arrival:
    """A request's body, received and waiting to be recorded."""

    owner: str
    batch_id: str
    batch_pk: int  # the batch dir its bytes were written under
    req: UploadRequest
    length: int
    temp: Path | None  # a fresh temp holding the body; None: written in place in ``partial``
    file_id: int | None  # the file row the bytes were written for; None: no row existed
    stride: int | None = None  # the chunk size an in-place write assumed
    digest: str | None = None  # SHA-256 of the whole file, when this request completes it
    completion: Path | None = None  # what becomes ``data`` (``partial`` or a concatenation)
    assumed: tuple[bytes, bytes] | None = None  # (chunk_ids, loose_ids) the completion was made from
    body: bytes | None = None  # a small whole file, written to ``temp`` (and hashed) by its group

    @property
    def completes(self) -> bool:
        """It makes a file complete: its bytes must be durable before its record."""
        return self.digest is not None or self.body is not None


@dataclass(eq=False)
class Row:
    """A file row as the group sees it (new rows have no id until inserted)."""

    batch_pk: int
    file_idx: int
    name: str
    mimetype: str
    size: int
    upload_type: str
    chunk_count: int
    chunk_size: int | None
    chunk_ids: ChunkSet
    loose_ids: ChunkSet
    synced_ids: bytes
    received: int
    state: str
    sha256: str | None
    created_at: datetime
    updated_at: datetime
    id: int | None = None

    @classmethod
    def of(cls, r: Any) -> Row:
        return cls(r.batch_pk, r.file_idx, r.name, r.mimetype, r.size, r.upload_type, r.chunk_count, r.chunk_size,
                   ChunkSet(r.chunk_ids), ChunkSet(r.loose_ids), r.synced_ids, r.received, r.state, r.sha256,
                   r.created_at, r.updated_at, r.id)

    def values(self) -> dict[str, Any]:
        return {"batch_pk": self.batch_pk, "file_idx": self.file_idx, "name": self.name, "mimetype": self.mimetype,
                "size": self.size, "upload_type": self.upload_type, "chunk_count": self.chunk_count,
                "chunk_size": self.chunk_size, "chunk_ids": bytes(self.chunk_ids),
                "loose_ids": bytes(self.loose_ids), "synced_ids": self.synced_ids, "received": self.received,
                "state": self.state, "sha256": self.sha256, "created_at": self.created_at,
                "updated_at": self.updated_at}

    @property
    def covered(self) -> bool:
        return self.chunk_ids.covers(self.chunk_count)


@dataclass
class Recorded:
    outcome: UploadOutcome
    row: Row
    new: bool  # this request's chunk was recorded now (not a repeat)
    completed: bool  # this request made the file complete
    assemble: bool  # every chunk is there and nobody prepared the file: it must be assembled

    @property
    def file_id(self) -> int | None:
        """None when a later request of the same group replaced the file before it was made."""
        return self.row.id


@dataclass(frozen=True)
class _Batch:
    id: int
    owner: str
    state: str


@dataclass(eq=False)
class _Pending:
    arrival: Arrival
    future: asyncio.Future[Recorded]
    result: Recorded | None = None
    error: BaseException | None = None


@dataclass
class _Move:
    pending: _Pending
    row: Row
    src: Path
    dst: Callable[[], Path]


@dataclass
class _Plan:
    new: list[Row] = field(default_factory=list)
    dirty: list[Row] = field(default_factory=list)
    deleted: list[Row] = field(default_factory=list)
    moves: list[_Move] = field(default_factory=list)
    moved: list[tuple[Path, Path]] = field(default_factory=list)  # (dst, src), to undo
    discard: list[Path] = field(default_factory=list)  # temps not needed (after the commit)
    removed: list[tuple[int, int]] = field(default_factory=list)  # (batch pk, file id) of removed rows
    completed: list[Row] = field(default_factory=list)  # their chunks go (once that is durable)
    touched: set[int] = field(default_factory=set)

    def mark(self, row: Row) -> None:
        if row.id is not None and row not in self.dirty:
            self.dirty.append(row)

    def undo(self) -> None:
        for dst, src in reversed(self.moved):
            try:
                os.replace(dst, src)
            except OSError:
                remove(dst)
        self.moved.clear()


class _MoveFailed(Exception):
    def __init__(self, pending: _Pending, error: OSError) -> None:
        super().__init__(str(error))
        self.pending = pending
        self.error = error


# The group's statements, built once (building them per group costs as much as running them).
_ROWS = (select(_B.c.id.label("b_pk"), _B.c.batch_id.label("b_batch_id"), _B.c.owner.label("b_owner"),
                _B.c.state.label("b_state"), *_F.c)
         .select_from(_B.outerjoin(_F, and_(_F.c.batch_pk == _B.c.id,
                                            _F.c.file_idx.in_(bindparam("idxs", expanding=True)))))
         .where(_B.c.batch_id.in_(bindparam("batch_ids", expanding=True)))
         .with_for_update(of=_B))  # PostgreSQL: writers of a batch's files queue on its row
_TOTALS = (select(_F.c.batch_pk, func.count(), func.coalesce(func.sum(_F.c.size), 0))
           .where(_F.c.batch_pk.in_(bindparam("pks", expanding=True))).group_by(_F.c.batch_pk))
_DELETE = delete(_F).where(_F.c.id.in_(bindparam("ids", expanding=True)))
_INSERT = insert(_F).returning(_F.c.id, sort_by_parameter_order=True)
_UPDATE = update(_F).where(_F.c.id == bindparam("b_id")).values({c: bindparam(f"b_{c}") for c in _MUTABLE})


class Recorder:
    def __init__(self, db: Database, store: UploadStore, durability: Durability, settings: Settings) -> None:
        self.db = db
        self.store = store
        self.durability = durability
        self.settings = settings
        self._queue: list[_Pending] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._bodies: list[_Pending] = []  # small whole files to write before they are recorded
        self._bodies_wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self.groups = 0  # transactions run (tests read it)

    async def record(self, arrival: Arrival) -> Recorded:
        """Record ``arrival`` with whatever else is waiting; its answer once it is (and, if it
        completed its file, once that is durable)."""
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        fut: asyncio.Future[Recorded] = asyncio.get_running_loop().create_future()
        if arrival.body is not None:
            if self._writer is None or self._writer.done():
                self._writer = asyncio.ensure_future(self._write_loop())
            self._bodies.append(_Pending(arrival, fut))
            self._bodies_wake.set()
        else:
            self._queue.append(_Pending(arrival, fut))
            self._wake.set()
        return await asyncio.shield(fut)  # a caller that goes away does not stop its group

    async def close(self) -> None:
        """Write and record what is queued, then end the tasks."""
        self._closing = True
        self._bodies_wake.set()
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
        self._wake.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        self._closing = False

    async def _write_loop(self) -> None:
        """Small whole files are written to their temps here, one batch per thread hop, while
        the recorder syncs and commits the ones before them: creating a file is the dearest
        step of a small upload, and one writer at a time does not contend for the directory."""
        while True:
            if not self._bodies:
                if self._closing:
                    return
                await self._bodies_wake.wait()
                self._bodies_wake.clear()
                continue
            batch, self._bodies = self._bodies[:MAX_GROUP], self._bodies[MAX_GROUP:]
            try:
                written = await asyncio.to_thread(self._write_bodies, batch)
            except Exception as e:  # a bug: answer everyone rather than hang them
                log.exception("writing %d upload(s) failed", len(batch))
                for p in batch:
                    p.error = p.error or e
                written = []
            self._finish([p for p in batch if p not in written])
            self._queue += written
            self._wake.set()

    async def _run(self) -> None:
        # The group committed last and waiting for the sync that makes it durable (files it
        # completed, rows it removed), with its plan.
        waiting: tuple[list[_Pending], _Plan] | None = None
        while True:
            if not self._queue and waiting is None:
                if self._closing:
                    return
                await self._wake.wait()
                self._wake.clear()
                continue
            group, self._queue = self._queue[:MAX_GROUP], self._queue[MAX_GROUP:]
            try:
                # One thread hop a group: the sync (the last group's records, this group's
                # bytes), the last group's clean-up, this group's transaction and renames.
                plan = await asyncio.to_thread(self._step, waiting, group)
            except Exception as e:  # a bug: answer everyone rather than hang them
                log.exception("recording a group of %d upload(s) failed", len(group))
                for p in (*group, *(waiting[0] if waiting else ())):
                    p.error = p.error or e
                plan = None
            if waiting is not None:
                self._finish(waiting[0])
            waiting = None
            if plan is not None:
                self.durability.touch(plan.touched)
                later = [p for p in group if p.error is None and p.result is not None and p.result.completed]
                self._finish([p for p in group if p not in later])
                if later or plan.removed:
                    waiting = (later, plan)
            else:
                self._finish(group)

    @staticmethod
    def _finish(group: list[_Pending]) -> None:
        for p in group:
            if p.future.done():
                continue
            if p.error is None:
                assert p.result is not None
                p.future.set_result(p.result)
            else:
                p.future.set_exception(p.error)
                p.future.exception()  # retrieved: its caller may have gone away

    def _mapped(self, e: BaseException, what: str) -> BaseException:
        return storage_error(e, self.settings.min_free_disk, what) or e

    def _step(self, waiting: tuple[list[_Pending], _Plan] | None, group: list[_Pending]) -> _Plan | None:
        """Blocking, in a thread: sync if the last group or this one needs it, then clean up
        after the last group (its removals are durable now) and record this one."""
        live = group
        if waiting is not None or any(p.arrival.completes for p in live):
            try:
                self.durability.sync_now()
            except Exception as e:
                if waiting is not None:  # committed, but not known durable: not answered complete
                    self._fail(waiting[0], self._mapped(e, "making the upload's record durable"))
                    waiting[1].removed.clear()
                    waiting[1].completed.clear()
                self._fail([p for p in live if p.arrival.completes], self._mapped(e, "making the uploaded bytes durable"))
                live = [p for p in live if not p.arrival.completes]
        if waiting is not None:
            self._clean(waiting[1])
        return self._commit(live) if live else None

    def _write_bodies(self, group: list[_Pending]) -> list[_Pending]:
        """Write (and hash) small whole files, each to its temp (blocking: in a thread), before
        the sync that makes them durable. Returns those written."""
        live = []
        for p in group:
            a = p.arrival
            if a.body is not None and a.digest is None:
                assert a.temp is not None
                hasher = hashlib.sha256()
                try:
                    self.store.write_small(Target(a.temp), a.body, len(a.body), hasher)
                except Exception as e:
                    self._fail([p], self._mapped(e, f"writing file {a.req.file_idx}"))
                    continue
                a.digest, a.body = hasher.hexdigest(), b""  # written: the memory goes
            live.append(p)
        return live

    def _commit(self, live: list[_Pending]) -> _Plan | None:
        """One transaction for ``live``; None if it could not be made (each has its error)."""
        for attempt in range(3):
            plan = _Plan()
            try:
                with self.db.write_sync() as conn:
                    self._apply(conn, live, plan)
            except _MoveFailed as f:  # rolled back: try again without that request
                plan.undo()
                self._fail([f.pending], self._mapped(f.error, "moving the upload into place"))
                live.remove(f.pending)
                if not live:
                    return None
                continue
            except IntegrityError:  # another process made the same file row meanwhile
                plan.undo()
                if attempt == 2:
                    raise
                continue
            except Exception as e:
                plan.undo()
                self._fail(live, self._mapped(e, "recording the upload"))
                return None
            self.groups += 1
            for path in plan.discard:
                remove(path)
            return plan
        return None

    def _clean(self, plan: _Plan) -> None:
        """After the sync that made ``plan``'s commit durable: the bytes it no longer needs."""
        for pk, file_id in plan.removed:
            self.store.remove_file(pk, file_id)
        for r in plan.completed:
            if r.id is not None and r.chunk_count > 1:  # a whole file never had a file dir
                self.store.remove_file_dir(r.batch_pk, r.id)

    @staticmethod
    def _fail(group: list[_Pending], error: BaseException) -> None:
        for p in group:
            p.error = error
            for path in (p.arrival.temp, p.arrival.completion):
                if path is not None and path.name != "partial":
                    remove(path)

    # -- the transaction ----------------------------------------------------------------------
    def _apply(self, conn: Connection, live: list[_Pending], plan: _Plan) -> None:
        batches: dict[str, Any] = {}
        files: dict[tuple[int, int], Row] = {}
        for r in conn.execute(_ROWS, {"batch_ids": sorted({p.arrival.batch_id for p in live}),
                                      "idxs": sorted({p.arrival.req.file_idx for p in live})}):
            batches[r.b_batch_id] = _Batch(r.b_pk, r.b_owner, r.b_state)
            if r.id is not None:
                files[(r.batch_pk, r.file_idx)] = Row.of(r)
        pks = sorted({b.id for b in batches.values()})
        totals: dict[int, list[int]] = {}  # batch pk -> [files, declared bytes], read when needed
        totals_read = False
        now = utcnow()
        for p in live:
            p.error, p.result = None, None
            a = p.arrival
            try:
                if pks and not totals_read and _may_add_file(a, files, batches):
                    totals.update({pk: [n, size] for pk, n, size in conn.execute(_TOTALS, {"pks": pks})})
                    totals_read = True
                p.result = self._decide(p, batches, files, totals, plan, now)
            except FiledropError as e:
                p.error = e
                plan.discard += [x for x in (a.temp, a.completion) if x is not None and x.name != "partial"]
        if plan.deleted:
            conn.execute(_DELETE, {"ids": [r.id for r in plan.deleted]})
        if plan.new:
            ids = conn.execute(_INSERT, [r.values() for r in plan.new]).scalars().all()
            for r, new_id in zip(plan.new, ids, strict=True):
                r.id = new_id
        if plan.moves:
            self._move_all(plan)
        dirty = [r for r in plan.dirty if r not in plan.deleted]
        if dirty:
            conn.execute(_UPDATE, [{"b_id": r.id, **{f"b_{c}": v for c, v in r.values().items() if c in _MUTABLE}}
                                   for r in dirty])
        plan.touched |= {r.id for r in (*plan.new, *dirty)
                         if r.id is not None and r.state != "complete" and r not in plan.deleted}

    def _move_all(self, plan: _Plan) -> None:
        for m in plan.moves:
            dst = m.dst()
            try:
                make_dirs(dst.parent)
                os.replace(m.src, dst)
            except OSError as e:
                raise _MoveFailed(m.pending, e) from e
            plan.moved.append((dst, m.src))

    # -- one request's decision ---------------------------------------------------------------------
    def _decide(self, p: _Pending, batches: dict[str, Any], files: dict[tuple[int, int], Row],
                totals: dict[int, list[int]], plan: _Plan, now: datetime) -> Recorded:
        a, req = p.arrival, p.arrival.req
        b = batches.get(a.batch_id)
        if b is None or b.owner != a.owner:
            raise BatchNotFound(f"batch {a.batch_id} not found")
        if b.state != "open":
            raise BatchNotFound(f"batch {a.batch_id} was {b.state}")
        f = files.get((b.id, req.file_idx))
        if a.file_id is not None and (f is None or f.id != a.file_id or b.id != a.batch_pk):
            raise FileNotFound(f"file {req.file_idx} of batch {a.batch_id} was removed or replaced meanwhile; "
                               "send it again")
        if f is not None and not f.chunk_ids and f.state == "receiving":
            self._remove(f, b.id, files, totals, plan)  # nothing stored yet: declared anew
            f = None
        if f is not None and not req.chunked and req.chunk_count == 1 and (f.state == "complete" or f.chunk_count != 1):
            if f.state == "receiving" and f.chunk_count != 1:
                raise ChunkCountChanged(f"file {req.file_idx} was declared with {f.chunk_count} chunks, not 1")
            self._remove(f, b.id, files, totals, plan)  # a whole file replaces a complete one, as in Nuxeo
            f = None
        if f is None:
            return self._create(p, b.id, files, totals, plan, now)
        if f.chunk_count != req.chunk_count:
            raise ChunkCountChanged(f"file {req.file_idx} was declared with {f.chunk_count} chunks, "
                                    f"not {req.chunk_count}")
        if f.size != req.size:
            raise FileSizeChanged(f"file {req.file_idx} was declared with {f.size} bytes, not {req.size}")
        if f.state != "receiving" or req.chunk_idx in f.chunk_ids:
            plan.discard += [x for x in (a.temp, a.completion) if x is not None and x.name != "partial"]
            return self._recorded(a, f, new=False, assemble=f.state == "receiving" and f.covered)
        total = f.received + a.length
        last = len(f.chunk_ids) + 1 == f.chunk_count
        if total > f.size or (last and total != f.size):
            raise FileSizeMismatch(f"the chunks of file {req.file_idx} add up to {total} bytes, X-File-Size is {f.size}")
        before = (bytes(f.chunk_ids), bytes(f.loose_ids))
        prepared = a.completion is not None and last and a.assumed == before
        if a.completion is not None and not prepared and a.completion.name != "partial":
            plan.discard.append(a.completion)  # made from another state of the file: not used
        if a.temp is not None and not prepared:
            idx = req.chunk_idx
            plan.moves.append(_Move(p, f, a.temp, lambda f=f, idx=idx: self.store.chunk_path(f.batch_pk, f.id or 0, idx)))
            f.loose_ids.add(idx)
        elif a.temp is not None:
            plan.discard.append(a.temp)  # its bytes are in the completion already
        f.chunk_ids.add(req.chunk_idx)
        f.received = total
        f.updated_at = now
        plan.mark(f)
        if prepared:
            self._complete(p, f, a, plan)
        elif last:
            f.state = "assembling"  # the exactly-once claim: this request assembles it
        return self._recorded(a, f, new=True, completed=prepared, assemble=last and not prepared)

    def _create(self, p: _Pending, batch_pk: int, files: dict[tuple[int, int], Row], totals: dict[int, list[int]],
                plan: _Plan, now: datetime) -> Recorded:
        a, req, cfg = p.arrival, p.arrival.req, self.settings
        n_files, n_bytes = totals.get(batch_pk, [0, 0])
        if n_files + 1 > cfg.max_files_per_batch:
            raise BatchTooManyFiles(f"a batch holds at most {cfg.max_files_per_batch} files "
                                    "(FILEDROP_MAX_FILES_PER_BATCH)")
        if n_bytes + req.size > cfg.max_batch_bytes:
            raise BatchTooLarge(f"a batch holds at most {cfg.max_batch_bytes} bytes (FILEDROP_MAX_BATCH_BYTES); "
                                f"{n_bytes} are declared already")
        if a.temp is None:  # written in place for a row that is gone
            raise FileNotFound(f"file {req.file_idx} of batch {a.batch_id} was removed meanwhile; send it again")
        if a.length > req.size or (req.chunk_count == 1 and a.length != req.size):
            raise FileSizeMismatch(f"the chunks of file {req.file_idx} add up to {a.length} bytes, "
                                   f"X-File-Size is {req.size}")
        idx = req.chunk_idx
        stride = stride_of(req.size, req.chunk_count, idx, a.length)
        complete = req.chunk_count == 1
        f = Row(batch_pk, req.file_idx, req.name, req.mimetype, req.size, req.upload_type, req.chunk_count, stride,
                ChunkSet.of([idx]), ChunkSet(), b"", a.length, "complete" if complete else "receiving",
                a.digest if complete else None, now, now)
        if complete:
            f.synced_ids = bytes(f.chunk_ids)
            plan.moves.append(_Move(p, f, a.temp, lambda: self.store.data_path(f.batch_pk, f.id or 0)))
        elif idx == 0 and stride is not None:  # the first chunk starts the in-place file
            plan.moves.append(_Move(p, f, a.temp, lambda: self.store.partial_path(f.batch_pk, f.id or 0)))
        else:
            f.loose_ids.add(idx)
            plan.moves.append(_Move(p, f, a.temp, lambda: self.store.chunk_path(f.batch_pk, f.id or 0, idx)))
        files[(batch_pk, req.file_idx)] = f
        plan.new.append(f)
        t = totals.setdefault(batch_pk, [0, 0])
        t[0], t[1] = n_files + 1, n_bytes + req.size
        if complete:
            plan.completed.append(f)
        return self._recorded(a, f, new=True, completed=complete, assemble=False)

    def _complete(self, p: _Pending, f: Row, a: Arrival, plan: _Plan) -> None:
        assert a.completion is not None
        completion = a.completion
        plan.moves.append(_Move(p, f, completion, lambda: self.store.data_path(f.batch_pk, f.id or 0)))
        f.state, f.sha256 = "complete", a.digest
        f.synced_ids = bytes(f.chunk_ids)
        plan.completed.append(f)

    def _remove(self, f: Row, batch_pk: int, files: dict[tuple[int, int], Row], totals: dict[int, list[int]],
                plan: _Plan) -> None:
        if f.id is None:  # made earlier in this group: it is never inserted, its bytes go
            plan.new.remove(f)
            if f in plan.completed:
                plan.completed.remove(f)
            plan.discard += [m.src for m in plan.moves if m.row is f]
            plan.moves = [m for m in plan.moves if m.row is not f]
        else:
            plan.deleted.append(f)
            if f.state != "assembling":  # else its assembler removes it, finding the row gone
                plan.removed.append((f.batch_pk, f.id))
        del files[(batch_pk, f.file_idx)]
        t = totals.get(batch_pk)
        if t is not None:
            t[0], t[1] = t[0] - 1, t[1] - f.size

    @staticmethod
    def _recorded(a: Arrival, f: Row, *, new: bool, completed: bool = False, assemble: bool = False) -> Recorded:
        outcome = UploadOutcome(a.batch_id, a.req.file_idx, a.req.chunked, a.length, f.chunk_count,
                                f.chunk_ids.ids(), f.state == "complete")
        return Recorded(outcome, f, new=new, completed=completed, assemble=assemble)


def _may_add_file(a: Arrival, files: dict[tuple[int, int], Row], batches: dict[str, Any]) -> bool:
    b = batches.get(a.batch_id)
    if b is None:
        return False
    f = files.get((b.id, a.req.file_idx))
    return f is None or not f.chunk_ids or not a.req.chunked
