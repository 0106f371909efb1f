"""The transaction of a group of upload records (``server.uploads.recorder`` runs it): the
group's batch and file rows read in one query, each request decided in order against what the
ones before it changed, the rows written in a few statements, the bytes moved into place.

Decisions, per request (a whole file is the one-chunk case):

* the batch must be the caller's and open (404 otherwise);
* a file with nothing stored yet may be declared anew; a whole-file upload replaces a complete
  file (as in Nuxeo) or one being assembled; a changed chunk count or size is 400;
* a chunk already recorded, or of a complete file, is a repeat: answered, nothing changes;
* a new file is checked against the batch's limits (413: the counts on the batch row, which
  triggers keep, as this group's decisions change them), made with the chunk size its first
  chunk implies (``model.stride_of``), and its bytes moved: a whole file to ``<id>.data``, a
  first chunk 0 of a uniform layout to ``partial``, any other chunk to ``chunks/<idx>``;
* the chunks may not add up to more than the declared size, and the last to exactly it (400);
* the last missing chunk completes the file with what its request prepared (``partial`` or a
  concatenation, and the SHA-256), if the file is still as it was prepared from; otherwise the
  file becomes ``assembling`` and that request assembles it (``server.uploads.assembly``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, and_, bindparam, delete, insert, select, update

from server.config import Settings
from server.db import utcnow
from server.db.direct import Direct
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
    JobRunning,
)
from server.uploads.chunkset import ChunkSet
from server.uploads.model import UploadOutcome, UploadRequest, stride_of
from server.uploads.store import UploadStore, remove, replace_making_dirs

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
class Pending:
    arrival: Arrival
    future: asyncio.Future[Recorded]
    result: Recorded | None = None
    error: BaseException | None = None


@dataclass
class _Move:
    pending: Pending
    row: Row
    src: Path
    dst: Callable[[], Path]


@dataclass
class Plan:
    new: list[Row] = field(default_factory=list)
    dirty: list[Row] = field(default_factory=list)
    deleted: list[Row] = field(default_factory=list)
    moves: list[_Move] = field(default_factory=list)
    moved: list[tuple[Path, Path]] = field(default_factory=list)  # (dst, src), to undo
    discard: list[Path] = field(default_factory=list)  # temps not needed (after the commit)
    removed: list[tuple[int, int]] = field(default_factory=list)  # (batch pk, file id) of removed rows
    completed: list[Row] = field(default_factory=list)  # their chunks go (once that is durable)
    touched: dict[int, ChunkSet] = field(default_factory=dict)  # file id -> chunks recorded, not yet synced

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


class MoveFailed(Exception):
    def __init__(self, pending: Pending, error: OSError) -> None:
        super().__init__(str(error))
        self.pending = pending
        self.error = error


# The group's statements, built once (building them per group costs as much as running them),
# and run on SQLite's own cursor (``server.db.direct``: SQLAlchemy's work around each execution
# was most of a group's transaction).
# SQLite: one query reads the group's batches and files (BEGIN IMMEDIATE already excludes every
# other writer). PostgreSQL: the batch rows are locked first, in id order (writers of a batch's
# files queue on its row), then the file rows, in id order, so what is read is what others
# committed last and nobody changes it before this commit (a chunk point, an assembler).
_ROWS = Direct(select(_B.c.id.label("b_pk"), _B.c.batch_id.label("b_batch_id"), _B.c.owner.label("b_owner"),
                      _B.c.state.label("b_state"), _B.c.file_count.label("b_files"),
                      _B.c.declared_bytes.label("b_bytes"), *_F.c)
               .select_from(_B.outerjoin(_F, and_(_F.c.batch_pk == _B.c.id,
                                                  _F.c.file_idx.in_(bindparam("idxs", expanding=True)))))
               .where(_B.c.batch_id.in_(bindparam("batch_ids", expanding=True))))
_LOCK_BATCHES = (select(_B.c.id).where(_B.c.batch_id.in_(bindparam("batch_ids", expanding=True)))
                 .order_by(_B.c.id).with_for_update(key_share=True))
_LOCK_FILES = (select(_F.c.id).where(_F.c.batch_pk.in_(select(_B.c.id).where(
    _B.c.batch_id.in_(bindparam("batch_ids", expanding=True)))), _F.c.file_idx.in_(bindparam("idxs", expanding=True)))
    .order_by(_F.c.id).with_for_update(key_share=True))
_DELETE = Direct(delete(_F).where(_F.c.id.in_(bindparam("ids", expanding=True))))
_INSERT = Direct(insert(_F).returning(_F.c.id, sort_by_parameter_order=True))
_UPDATE = Direct(update(_F).where(_F.c.id == bindparam("b_id")).values({c: bindparam(f"b_{c}") for c in _MUTABLE}))


def chunks_do_not_fit(file_idx: int, total: int, size: int) -> FileSizeMismatch:
    """A chunk that would take the file's chunks past its size, or end them short of it. Which
    is wrong, this chunk or those stored (a client resuming with another chunk size), the server
    cannot tell: the answer says how to recover from either."""
    return FileSizeMismatch(f"the chunks of file {file_idx} add up to {total} bytes, X-File-Size is {size}: send "
                            "this chunk again with its right length, or, if the chunks stored were sent with another "
                            "chunk size, remove the file (DELETE) and send it again")


class Ledger:
    """Decides and writes one group's records (blocking: in the recorder's thread)."""

    def __init__(self, store: UploadStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        # Set by the app (jobs): the job that reads a batch's files, asked on this transaction's
        # connection (None: nothing checks). A whole file does not replace one under it.
        self.readers: Callable[[Connection, str, str], str | None] | None = None

    def apply(self, conn: Connection, live: list[Pending], plan: Plan) -> None:
        batches: dict[str, Any] = {}
        files: dict[tuple[int, int], Row] = {}
        keys = {"batch_ids": sorted({p.arrival.batch_id for p in live}),
                "idxs": sorted({p.arrival.req.file_idx for p in live})}
        if conn.dialect.name != "sqlite":
            conn.execute(_LOCK_BATCHES, {"batch_ids": keys["batch_ids"]})
            conn.execute(_LOCK_FILES, keys)
        totals: dict[int, list[int]] = {}  # batch pk -> [files, declared bytes], as the group changes them
        for r in _ROWS.all(conn, keys):
            batches[r.b_batch_id] = _Batch(r.b_pk, r.b_owner, r.b_state)
            totals[r.b_pk] = [r.b_files, r.b_bytes]
            if r.id is not None:
                files[(r.batch_pk, r.file_idx)] = Row.of(r)
        now = utcnow()
        for p in live:
            p.error, p.result = None, None
            a = p.arrival
            try:
                p.result = self._decide(conn, p, batches, files, totals, plan, now)
            except FiledropError as e:
                p.error = e
                plan.discard += [x for x in (a.temp, a.completion) if x is not None and x.name != "partial"]
        if plan.deleted:
            _DELETE.run(conn, {"ids": [r.id for r in plan.deleted]})
        if plan.new:
            ids = _INSERT.one_each(conn, [r.values() for r in plan.new])
            for r, new_id in zip(plan.new, ids, strict=True):
                r.id = new_id
        if plan.moves:
            self._move_all(plan)
        dirty = sorted((r for r in plan.dirty if r not in plan.deleted), key=lambda r: r.id or 0)
        if dirty:
            _UPDATE.run(conn, [{"b_id": r.id, **{f"b_{c}": v for c, v in r.values().items() if c in _MUTABLE}}
                               for r in dirty])
        for p in live:  # what this process now vouches for at its next chunk point
            res = p.result
            if res is not None and res.new and res.row.id is not None and res.row.state != "complete" \
                    and res.row not in plan.deleted:
                plan.touched.setdefault(res.row.id, ChunkSet()).add(p.arrival.req.chunk_idx)

    def _move_all(self, plan: Plan) -> None:
        for m in plan.moves:
            dst = m.dst()
            try:
                replace_making_dirs(m.src, dst)
            except OSError as e:
                raise MoveFailed(m.pending, e) from e
            plan.moved.append((dst, m.src))

    # -- one request's decision ---------------------------------------------------------------------
    def _decide(self, conn: Connection, p: Pending, batches: dict[str, Any], files: dict[tuple[int, int], Row],
                totals: dict[int, list[int]], plan: Plan, now: datetime) -> Recorded:
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
            return self._create(p, b.id, files, totals, plan, now, replacing=f)  # nothing stored yet: declared anew
        if f is not None and not req.chunked and req.chunk_count == 1 and (f.state == "complete" or f.chunk_count != 1):
            if f.state == "receiving" and f.chunk_count != 1:
                raise ChunkCountChanged(f"file {req.file_idx} was declared with {f.chunk_count} chunks, not 1")
            if f.id is not None and self.readers is not None and (job := self.readers(conn, a.owner, a.batch_id)) is not None:
                # Its rows may publish the file (``batch:<fileIdx>``): as DELETE, refused.
                raise JobRunning(f"file {req.file_idx} of batch {a.batch_id} is in use by job {job}, started from "
                                 "the batch: cancel the job or wait for it to end before replacing it")
            # A whole file replaces a complete one, as in Nuxeo.
            return self._create(p, b.id, files, totals, plan, now, replacing=f)
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
            raise chunks_do_not_fit(req.file_idx, total, f.size)
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

    def _create(self, p: Pending, batch_pk: int, files: dict[tuple[int, int], Row], totals: dict[int, list[int]],
                plan: Plan, now: datetime, replacing: Row | None = None) -> Recorded:
        """A new row for this request; ``replacing``: the row it takes the place of, removed only
        once the new one passed every check (a refused replacement leaves the old file as it was)."""
        a, req, cfg = p.arrival, p.arrival.req, self.settings
        t = totals[batch_pk]  # read with every batch of the group
        n_files, n_bytes = t
        if replacing is not None:
            n_files, n_bytes = n_files - 1, n_bytes - replacing.size
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
        if replacing is not None:
            self._remove(replacing, batch_pk, files, totals, plan)
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
        t[0], t[1] = n_files + 1, n_bytes + req.size
        if complete:
            plan.completed.append(f)
        return self._recorded(a, f, new=True, completed=complete, assemble=False)

    def _complete(self, p: Pending, f: Row, a: Arrival, plan: Plan) -> None:
        assert a.completion is not None
        completion = a.completion
        plan.moves.append(_Move(p, f, completion, lambda: self.store.data_path(f.batch_pk, f.id or 0)))
        f.state, f.sha256 = "complete", a.digest
        f.synced_ids = bytes(f.chunk_ids)
        plan.completed.append(f)

    def _remove(self, f: Row, batch_pk: int, files: dict[tuple[int, int], Row], totals: dict[int, list[int]],
                plan: Plan) -> None:
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
        t = totals[batch_pk]
        t[0], t[1] = t[0] - 1, t[1] - f.size

    @staticmethod
    def _recorded(a: Arrival, f: Row, *, new: bool, completed: bool = False, assemble: bool = False) -> Recorded:
        complete = f.state == "complete"  # whole, completed now, or a repeat: the row holds its SHA-256
        outcome = UploadOutcome(a.batch_id, a.req.file_idx, a.req.chunked, a.length, f.chunk_count,
                                f.chunk_ids.ids(), complete, f.sha256 if complete else None)
        return Recorded(outcome, f, new=new, completed=completed, assemble=assemble)

