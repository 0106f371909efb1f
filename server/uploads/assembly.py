"""Completing a file: its SHA-256 as the bytes arrive, and its chunks turned into ``data``.

* ``Hashes`` keeps, per file, a SHA-256 of the bytes that arrived in order (a ``HashLane``: each
  chunk is hashed in a thread as it streams in, when the file's hash has reached its offset, and
  nobody waits for it before the file completes). At completion only the rest is hashed. It is
  this process's memory: after a restart, or for chunks that arrived out of order, the rest is
  simply larger; nothing depends on it for correctness.
* ``prepare`` makes the completed file from a file's recorded chunks: with the uniform layout
  every chunk is already in ``partial`` (chunks stored on their own are copied in when they fit),
  so the file is ``partial`` itself; otherwise the chunks are concatenated into a temp. The
  request that sends a file's last missing chunk prepares it *before* its record, so the file is
  complete when it is answered complete.
* ``Assembler`` assembles the files nobody prepared: the last two chunks arrived together (the
  one recorded last claims the file: ``receiving -> assembling`` in its transaction), an
  assembly failed (the file went back to ``receiving`` with every chunk: the next request for
  it, or the next start, assembles it again), or a crash left one ``assembling``. Exactly once:
  the claim is one conditional ``UPDATE``; completion is another (``assembling -> complete``);
  and across processes an assembly runs only under the file's ``assemble`` lock (an advisory
  lock on PostgreSQL, held by the process while it lives): a file left ``assembling`` by a
  process that died is taken over by the next request for it (or the next start) anywhere, one
  that a live process assembles is waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from server.config import Settings
from server.db import Database, utcnow
from server.db.models import Batch, BatchFile
from server.errors import FiledropError, FileSizeMismatch
from server.uploads.chunkset import ChunkSet
from server.uploads.durability import Durability
from server.uploads.faults import storage_error
from server.uploads.model import chunk_length
from server.uploads.store import BelowFloor, HashLane, UploadStore, hash_file, remove

log = logging.getLogger("filedrop.uploads")
HASHES_KEPT = 4096  # files whose running SHA-256 is kept (a few hundred bytes each)


@dataclass
class Stats:
    """Counters since start (exactly-once assembly is checked against them)."""

    assembled: int = 0  # files completed (in place, concatenated, or whole)
    assembly_failed: int = 0
    recovered: int = 0


@dataclass(frozen=True)
class Snapshot:
    """What a completion is made from: a file row as read."""

    id: int
    batch_pk: int
    size: int
    chunk_count: int
    chunk_size: int | None
    chunk_ids: bytes
    loose_ids: bytes
    received: int = 0
    sha256: str | None = None  # of a complete file, as read (a repeat's answer carries it)

    @classmethod
    def of(cls, r: Any) -> Snapshot:
        return cls(r.id, r.batch_pk, r.size, r.chunk_count, r.chunk_size, r.chunk_ids, r.loose_ids,
                   getattr(r, "received", 0), getattr(r, "sha256", None))


@dataclass
class _Running:
    lane: HashLane
    upto: int  # bytes of the file handed to the lane, in order
    busy: bool = False  # a request feeds it now


class Hashes:
    def __init__(self) -> None:
        self._files: dict[int, _Running] = {}

    def begin(self, file_id: int | None, offset: int) -> HashLane | None:
        """The lane to feed a chunk at ``offset`` into as it streams in, or None (it is hashed at
        the end). ``file_id`` None: the first chunk of a file not made yet."""
        if offset == 0:
            return HashLane()
        st = self._files.get(file_id) if file_id is not None else None
        if st is None or st.busy or st.upto != offset or st.lane.broken:
            return None
        st.busy = True
        return st.lane

    def end(self, file_id: int | None, offset: int, lane: HashLane | None, length: int, recorded: bool) -> None:
        """After the chunk's record: the lane goes on if the chunk was recorded; if it was not,
        the lane holds bytes the file does not, and is dropped."""
        if lane is None or file_id is None:
            return
        st = self._files.get(file_id)
        if not recorded:
            if st is not None and st.lane is lane:
                del self._files[file_id]
            return
        if st is None and offset == 0 or st is not None and st.lane is lane:
            if len(self._files) >= HASHES_KEPT and file_id not in self._files:
                self._files.pop(next(iter(self._files)))
            self._files[file_id] = _Running(lane, offset + length)

    async def take(self, file_id: int) -> tuple[Any, int] | None:
        """(a copy of the file's running hash, the bytes it covers), or None."""
        st = self._files.get(file_id)
        if st is None or st.busy:
            return None
        await st.lane.settle()
        return None if st.lane.broken else (st.lane.hasher.copy(), st.upto)

    def forget(self, file_id: int) -> None:
        self._files.pop(file_id, None)


class Placing:
    """This process's requests writing a chunk in place (into ``partial``, the inode that becomes
    ``data``): one at a time per chunk (a second copy arriving meanwhile is stored on its own,
    and recorded or dropped like any chunk), and none while the file is being completed (its
    completion first waits for those under way). So no byte lands in place after another copy
    of its chunk was recorded, or after the file was made complete: a client sending one chunk
    twice at once with different bytes cannot leave a complete file whose bytes differ from its
    SHA-256. Requests of other app processes are not seen (README, More than one process)."""

    def __init__(self) -> None:
        self._writing: dict[int, dict[int, asyncio.Event]] = {}  # file id -> chunk idx -> set when done
        self._completing: dict[int, int] = {}  # file id -> completions under way

    def claim(self, file_id: int, idx: int) -> asyncio.Event | None:
        """The right to write chunk ``idx`` in place (release it after the chunk's record), or
        None: another request writes it in place, or the file is being completed."""
        if file_id in self._completing:
            return None
        chunks = self._writing.setdefault(file_id, {})
        if idx in chunks:
            return None
        done = chunks[idx] = asyncio.Event()
        return done

    def release(self, file_id: int, idx: int, done: asyncio.Event) -> None:
        chunks = self._writing.get(file_id)
        if chunks is not None and chunks.get(idx) is done:
            del chunks[idx]
            if not chunks:
                del self._writing[file_id]
        done.set()

    @contextlib.asynccontextmanager
    async def completing(self, file_id: int, mine: asyncio.Event | None = None) -> AsyncIterator[bool]:
        """While a completion of the file runs (from ``prepare`` to its record): no new writer in
        place; those under way (but the caller's own, ``mine``) are waited for first. Yields
        whether it waited (then what the caller read of the file may be out of date)."""
        self._completing[file_id] = self._completing.get(file_id, 0) + 1
        waited = False
        try:
            while others := [e for e in self._writing.get(file_id, {}).values() if e is not mine]:
                waited = True
                await others[0].wait()
            yield waited
        finally:
            if (n := self._completing[file_id] - 1) > 0:
                self._completing[file_id] = n
            else:
                del self._completing[file_id]


class _RenameFailed(Exception):
    """The completion's rename into ``data`` failed, raised out of the transaction that records
    the file complete (rolling it back)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def prepare(store: UploadStore, f: Snapshot, mine: tuple[int, Path | None] | None = None,
            running: tuple[Any, int] | None = None) -> tuple[Path, str]:
    """Make the complete file from ``f``'s recorded chunks plus ``mine`` (its index and temp,
    None: written in place) when it is the last one; returns (what becomes ``data``, SHA-256).
    Blocking: call it in a thread. Raises ValueError if the chunks do not make ``f.size`` bytes."""
    loose = {i: store.chunk_path(f.batch_pk, f.id, i) for i in ChunkSet(f.loose_ids).ids()}
    if mine is not None and mine[1] is not None:
        loose[mine[0]] = mine[1]
    sizes = {i: os.stat(p).st_size for i, p in loose.items()}
    stride, n = f.chunk_size, f.chunk_count
    partial = store.partial_path(f.batch_pk, f.id)
    if stride is not None and all(sizes[i] == chunk_length(f.size, n, stride, i) for i in loose):
        for i, p in sorted(loose.items()):
            store.place(p, partial, i * stride)
        hasher, upto = running or (hashlib.sha256(), 0)
        if upto < f.size:
            hash_file(partial, upto, f.size, hasher)
        actual = os.stat(partial).st_size
        if actual != f.size:
            raise ValueError(f"the chunks written in place of file {f.id} hold {actual} bytes, {f.size} were declared")
        return partial, hasher.hexdigest()
    sources: list[tuple[Path, int, int]] = []
    for i in range(n):
        if i in loose:
            sources.append((loose[i], 0, sizes[i]))
        elif stride is not None:
            sources.append((partial, i * stride, chunk_length(f.size, n, stride, i)))
        else:
            raise ValueError(f"chunk {i} of file {f.id} is neither on its own nor in place")
    total = sum(length for _, _, length in sources)
    if total != f.size:
        raise ValueError(f"the chunks of file {f.id} hold {total} bytes, {f.size} were declared")
    hasher = hashlib.sha256()
    temp = store.concat(f.batch_pk, f.id, sources, f.size, hasher)
    return temp, hasher.hexdigest()


def chunks_present(store: UploadStore, snap: Snapshot) -> tuple[ChunkSet, ChunkSet, int]:
    """The recorded chunks of ``snap`` whose bytes are on disk (a chunk file for one stored on
    its own; ``partial`` long enough for one in place): (ids, loose ids, bytes). Blocking.
    Chunks that are all there but do not add up to the file's size are all forgotten."""
    ids, loose, old_loose = ChunkSet(), ChunkSet(), ChunkSet(snap.loose_ids)
    stride, n = snap.chunk_size, snap.chunk_count
    try:
        partial_size = os.stat(store.partial_path(snap.batch_pk, snap.id)).st_size
    except FileNotFoundError:
        partial_size = -1
    received = 0
    for i in ChunkSet(snap.chunk_ids).ids():
        if i in old_loose:
            try:
                length = os.stat(store.chunk_path(snap.batch_pk, snap.id, i)).st_size
            except FileNotFoundError:
                continue
            loose.add(i)
        elif stride is not None and partial_size >= i * stride + chunk_length(snap.size, n, stride, i):
            length = chunk_length(snap.size, n, stride, i)
        else:
            continue
        ids.add(i)
        received += length
    if received != snap.size and len(ids) == n:
        return ChunkSet(), ChunkSet(), 0
    return ids, loose, received


class Assembler:
    """Owns the assemblies of files nobody prepared (see the module docstring)."""

    def __init__(self, db: Database, store: UploadStore, durability: Durability, hashes: Hashes,
                 stats: Stats, settings: Settings, placing: Placing) -> None:
        self.db = db
        self.store = store
        self.durability = durability
        self.hashes = hashes
        self.placing = placing
        self.stats = stats
        self.settings = settings
        self._running: dict[int, asyncio.Task[str | None]] = {}  # file id -> its assembly
        self._by_batch: dict[str, set[asyncio.Task[str | None]]] = {}

    def running(self, file_id: int) -> asyncio.Task[str | None] | None:
        return self._running.get(file_id)

    def ensure(self, batch_id: str, file_id: int, *, claimed: bool) -> asyncio.Task[str | None]:
        """The assembly of ``file_id`` (started unless it runs already); its result is the file's
        SHA-256 if the file is complete after it ("" for a complete row without one), else None.
        ``claimed``: the file is ``assembling`` (the caller's transaction flipped it, or it was
        found so: another process's assembly is waited for, a dead one's taken over); else it is
        claimed here, if it still waits (``receiving`` with every chunk), and nothing happens if
        it does not."""
        task = self._running.get(file_id)
        if task is not None:
            return task
        task = asyncio.ensure_future(self._assemble(batch_id, file_id, claimed))
        self._running[file_id] = task
        batch = self._by_batch.setdefault(batch_id, set())
        batch.add(task)

        def done(t: asyncio.Task[str | None]) -> None:
            self._running.pop(file_id, None)
            batch.discard(t)
            if not batch and self._by_batch.get(batch_id) is batch:
                del self._by_batch[batch_id]
            if not t.cancelled() and (e := t.exception()) is not None and not isinstance(e, FiledropError):
                # A fault of ours (a storage fault was logged and turned into a FiledropError):
                # the file stays as it was, for the next start to assemble.
                log.error("assembling file %s of batch %s failed", file_id, batch_id, exc_info=e)
        task.add_done_callback(done)
        return task

    async def settle(self, batch_id: str) -> None:
        """Wait for the batch's running assemblies (shielded: a caller that goes away does
        not stop them)."""
        while running := self._by_batch.get(batch_id):
            await asyncio.shield(asyncio.gather(*running, return_exceptions=True))

    async def idle(self) -> None:
        while self._running:
            await asyncio.gather(*list(self._running.values()), return_exceptions=True)

    async def recover(self) -> int:
        """At start: assemble every file a crash left ``assembling`` or a failure left waiting."""
        async with self.db.read() as s:
            rows = (await s.execute(
                select(Batch.batch_id, BatchFile.id, BatchFile.state, BatchFile.chunk_count, BatchFile.chunk_ids)
                .join(Batch, Batch.id == BatchFile.batch_pk)
                .where(BatchFile.state.in_(("assembling", "receiving")), Batch.state == "open"))).all()
        todo = [r for r in rows if r.state == "assembling" or ChunkSet(r.chunk_ids).covers(r.chunk_count)]
        for r in todo:  # (one another live process assembles is waited for, not done twice)
            log.info("assembling file %s of batch %s, left %s", r.id, r.batch_id, r.state)
            self.ensure(r.batch_id, r.id, claimed=r.state == "assembling")
        self.stats.recovered += len(todo)
        return len(todo)

    async def _assemble(self, batch_id: str, file_id: int, claimed: bool) -> str | None:
        # Taken before the claim, so that from the claim on the claimant holds it; waited for
        # as long as another process assembles the file (it lives: the lock goes with it).
        async with self.db.locks.held("assemble", file_id, wait=None):
            if not claimed and not await self._claim(file_id):
                return await self._complete(file_id)
            async with self.db.read() as s:
                row = (await s.execute(select(BatchFile).where(BatchFile.id == file_id))).scalar_one_or_none()
                if row is not None and row.state == "complete":
                    return row.sha256 or ""  # another process assembled it while we waited for the lock
                snap = Snapshot.of(row) if row is not None and row.state == "assembling" else None
            if snap is None:
                return None
            log.debug("assembling file %s of batch %s", file_id, batch_id)
            return await self._assemble_claimed(batch_id, file_id, snap)

    async def _complete(self, file_id: int) -> str | None:
        """The file's SHA-256 if it is complete (read with its state; "" if none is recorded),
        else None."""
        async with self.db.read() as s:
            row = (await s.execute(select(BatchFile.state, BatchFile.sha256)
                                   .where(BatchFile.id == file_id))).one_or_none()
        return (row.sha256 or "") if row is not None and row.state == "complete" else None

    async def _assemble_claimed(self, batch_id: str, file_id: int, snap: Snapshot) -> str | None:
        async with self.placing.completing(file_id):
            return await self._assemble_quiet(batch_id, file_id, snap)

    async def _assemble_quiet(self, batch_id: str, file_id: int, snap: Snapshot) -> str | None:
        """A storage fault on the way to the commit (the free-disk floor included) gives the
        file back (``receiving``, every chunk: the next request for it assembles it again) and
        is the client's error, logged in one line (``server.uploads.faults``)."""
        what = f"assembling file {file_id} of batch {batch_id}"
        try:
            running = await self.hashes.take(file_id)
            completion, digest = await asyncio.to_thread(prepare, self.store, snap, None, running)
        except (OSError, ValueError, BelowFloor) as e:
            raise await self._failed(what, batch_id, snap, None, e) from None
        try:
            await self.durability.synced()  # the bytes before the record that says complete
        except OSError as e:
            raise await self._failed(what, batch_id, snap, completion, e) from None
        data = self.store.data_path(snap.batch_pk, file_id)
        try:
            async with self.db.write() as s:
                found = (await s.execute(select(BatchFile.state, BatchFile.sha256)
                                         .where(BatchFile.id == file_id))).one_or_none()
                state, recorded = (found.state, found.sha256) if found is not None else (None, None)
                if state == "assembling":
                    await s.execute(update(BatchFile).where(BatchFile.id == file_id)
                                    .values(state="complete", sha256=digest, synced_ids=snap.chunk_ids,
                                            updated_at=utcnow()))
                    try:
                        await asyncio.to_thread(os.replace, completion, data)
                    except OSError as e:
                        raise _RenameFailed(e) from e  # out of the transaction: rolled back
        except _RenameFailed as e:
            raise await self._failed(what, batch_id, snap, completion, e.error) from None
        if state is None:  # replaced meanwhile (the replacing upload left its directory to us)
            await asyncio.to_thread(self.store.remove_file, snap.batch_pk, file_id)
            return None
        if state != "assembling":
            if completion.name != "partial":
                await asyncio.to_thread(remove, completion)
            return (recorded or "") if state == "complete" else None  # completed by another: its record's
        try:
            await self.durability.synced()  # the record before anyone is told
        except OSError as e:  # recorded complete, not known durable: not answered complete
            raise storage_error(e, self.settings.min_free_disk, f"{what}: making its record durable") or e from None
        await asyncio.to_thread(self.store.remove_file_dir, snap.batch_pk, file_id)
        self.hashes.forget(file_id)
        self.stats.assembled += 1
        log.debug("file %s of batch %s complete (assembled)", file_id, batch_id)
        return digest

    async def _failed(self, what: str, batch_id: str, snap: Snapshot, completion: Path | None,
                      e: OSError | ValueError | BelowFloor) -> BaseException:
        """After an assembly failed before its commit: its completion removed, the file given
        back; the error to raise."""
        self.stats.assembly_failed += 1
        if completion is not None and completion.name != "partial":
            await asyncio.to_thread(remove, completion)
        await self._give_back(snap, forget=isinstance(e, ValueError))
        if isinstance(e, ValueError):
            log.error("%s failed: %s; its chunks without their bytes are forgotten", what, e)
            return FileSizeMismatch(f"file of batch {batch_id}: {e}; the chunks without their bytes were "
                                    "forgotten: send them again")
        return storage_error(e, self.settings.min_free_disk, what) or e

    async def _claim(self, file_id: int) -> bool:
        async with self.db.write() as s:
            row = (await s.execute(select(BatchFile.chunk_count, BatchFile.chunk_ids)
                                   .where(BatchFile.id == file_id, BatchFile.state == "receiving"))).one_or_none()
            if row is None or not ChunkSet(row.chunk_ids).covers(row.chunk_count):
                return False
            res = await s.execute(update(BatchFile).where(BatchFile.id == file_id, BatchFile.state == "receiving",
                                                          BatchFile.chunk_ids == row.chunk_ids)
                                  .values(state="assembling", updated_at=utcnow()))
            return res.rowcount == 1  # type: ignore[attr-defined]

    async def _give_back(self, snap: Snapshot, *, forget: bool) -> None:
        """After a failed assembly the file waits for the next attempt (``receiving`` with its
        chunks); ``forget``: its bytes did not add up, so the chunks whose bytes are missing or
        the wrong size are forgotten (the client sends them again)."""
        ids, loose, received = ChunkSet(snap.chunk_ids), ChunkSet(snap.loose_ids), None
        if forget:
            ids, loose, received = await asyncio.to_thread(chunks_present, self.store, snap)
        values: dict[str, Any] = {"state": "receiving", "chunk_ids": bytes(ids), "loose_ids": bytes(loose),
                                  "updated_at": utcnow()}
        if received is not None:
            values["received"] = received
        async with self.db.write() as s:
            await s.execute(update(BatchFile).where(BatchFile.id == snap.id, BatchFile.state == "assembling")
                            .values(**values))
