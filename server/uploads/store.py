"""Where upload bytes live, and the disk steps that keep them crash safe.

Disk layout (the janitor codes against it; every path is derived from row ids, never from a
client-supplied name):

    <data_dir>/uploads/<batches.id>/                      batch dir
    <batch dir>/<batch_files.id>/                         file dir
    <file dir>/chunks/<chunk_idx>                         a received chunk (renamed into place)
    <file dir>/chunks/.<chunk_idx>.<random>.part          a chunk being received
    <batch dir>/.<file_idx>.<random>.part                  a whole-file upload being received
    <file dir>/data                                       the assembled file
    <file dir>/.data.<random>.part                        the assembled file being written
    <data_dir>/uploads/.synced                            the last durability point (JSON)

Bytes reach their final name only by temp (a dot-name) -> ``os.replace`` in the same directory,
so a crash leaves either the old state or the new one plus a temp the janitor removes.

Durability comes in two strengths. A complete file (a whole-file upload, an assembled one) is
fsynced before it is recorded complete. A chunk of a multi-chunk file is recorded as soon as
its bytes are written: a process crash (kill -9) cannot lose them, the page cache outlives the
process. A power loss can, so chunks are made durable in groups: ``sync_point`` runs one
``syncfs`` and then records its time and the machine's boot id in ``.synced``. After a reboot
that was not preceded by a sync point, the upload service forgets the chunks recorded after
it and the client sends them again (it asks which ids the server has). An fsync per 8 MiB chunk
cost a third of the upload speed here.
The functions here are synchronous disk work: callers run them in a thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import shutil
import threading
from collections.abc import AsyncIterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from server.durable import boot_id, fsync_dir, start_writeback, syncfs

# Bytes gathered from the socket before one write: large enough that the thread hop per write
# is noise, small enough that a few hundred parallel uploads stay far below the RSS budget.
WRITE_BUFFER = 1 << 20
COPY_BLOCK = 1 << 20  # read size when hashing chunk files at assembly


class BodyTooLarge(Exception):
    """The request body went past the limit while streaming (the temp file is already gone)."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


@dataclass(frozen=True)
class Received:
    path: Path  # the temp file (fsynced if received durable), not yet renamed into place
    size: int


def remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class UploadStore:
    """Paths under ``<data_dir>/uploads`` and the disk steps of receiving and assembling."""

    def __init__(self, root: Path) -> None:
        self.root = root

    # -- paths (row ids only) ------------------------------------------------------------
    def batch_dir(self, batch_pk: int) -> Path:
        return self.root / str(int(batch_pk))

    def file_dir(self, batch_pk: int, file_id: int) -> Path:
        return self.batch_dir(batch_pk) / str(int(file_id))

    def chunks_dir(self, batch_pk: int, file_id: int) -> Path:
        return self.file_dir(batch_pk, file_id) / "chunks"

    def chunk_path(self, batch_pk: int, file_id: int, chunk_idx: int) -> Path:
        return self.chunks_dir(batch_pk, file_id) / str(int(chunk_idx))

    def chunk_temp(self, batch_pk: int, file_id: int, chunk_idx: int) -> Path:
        return self.chunks_dir(batch_pk, file_id) / f".{int(chunk_idx)}.{secrets.token_hex(8)}.part"

    def whole_temp(self, batch_pk: int, file_idx: int) -> Path:
        """A whole-file upload being received (before its file row exists)."""
        return self.batch_dir(batch_pk) / f".{int(file_idx)}.{secrets.token_hex(8)}.part"

    def data_path(self, batch_pk: int, file_id: int) -> Path:
        return self.file_dir(batch_pk, file_id) / "data"

    # -- durability points ---------------------------------------------------------------
    @property
    def sync_marker(self) -> Path:
        return self.root / ".synced"

    def sync_point(self, at: datetime) -> None:
        """Make everything written so far durable, then record ``at`` (taken before the sync)
        and this boot's id as the last durability point."""
        self.root.mkdir(parents=True, exist_ok=True)
        syncfs(self.root)
        temp = self.root / f".synced.{secrets.token_hex(4)}.part"
        temp.write_text(json.dumps({"boot_id": boot_id(), "at": at.isoformat()}))
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, self.sync_marker)
        fsync_dir(self.root)

    def last_sync_point(self) -> tuple[str, datetime] | None:
        """(boot id, time) of the last durability point, or None if none was recorded."""
        try:
            raw = json.loads(self.sync_marker.read_text())
            return str(raw["boot_id"]), datetime.fromisoformat(raw["at"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def free_bytes(self) -> int:
        self.root.mkdir(parents=True, exist_ok=True)
        return shutil.disk_usage(self.root).free

    # -- receiving -----------------------------------------------------------------------
    async def receive(self, body: AsyncIterable[bytes], temp: Path, limit: int,
                      hasher: hashlib._Hash | None = None, *, durable: bool = True) -> Received:
        """Stream ``body`` into ``temp`` (created here); at most ``limit`` bytes. ``durable``:
        fsync it before returning (else the next ``sync_point`` makes it durable).

        Writes happen in a thread, one buffer at a time, overlapping with reading the next
        buffer from the socket; ``hasher`` (if given) is updated in another thread beside the
        write (hashlib releases the GIL), in order. At most three buffers are in memory per
        request. On any error, including a client that goes away and cancellation, the temp
        file is removed (once no thread uses it any more).
        """
        temp.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        loop = asyncio.get_running_loop()
        writing: asyncio.Future[None] | None = None
        hashing: asyncio.Future[None] | None = None
        size = 0
        pieces: list[bytes] = []  # joined once per block: one copy of every byte, not two
        pending = 0
        try:
            async for data in body:
                size += len(data)
                if size > limit:
                    raise BodyTooLarge(limit)
                pieces.append(data)
                pending += len(data)
                if pending >= WRITE_BUFFER:
                    block = b"".join(pieces)
                    pieces.clear()
                    pending = 0
                    if writing is not None:
                        await writing
                    # Nothing is pending now: the block ends at `size`.
                    writing = loop.run_in_executor(None, _write_all, fd, block,
                                                   size - len(block) if durable else None)
                    if hasher is not None:
                        if hashing is not None:
                            await hashing
                        hashing = loop.run_in_executor(None, hasher.update, block)
            if writing is not None:
                await writing
            tail = b"".join(pieces)
            writing = loop.run_in_executor(None, _finish, fd, tail, durable)
            if hasher is not None:
                if hashing is not None:
                    await hashing
                hasher.update(tail)
            await writing
        except BaseException:
            if writing is not None and not writing.done():
                # A thread still writes to fd: close and remove once it is done.
                writing.add_done_callback(lambda _f: _discard(fd, temp))
            else:
                _discard(fd, temp)
            raise
        os.close(fd)
        return Received(temp, size)

    # -- assembling ----------------------------------------------------------------------
    def assemble(self, batch_pk: int, file_id: int, chunk_count: int, size: int) -> str:
        """Turn ``chunks/0..n-1`` into ``data`` atomically; return its SHA-256 (hex).

        The kernel copies (``copy_file_range``) while a second thread hashes the same chunks
        (hashlib releases the GIL), so hashing costs no time on two cores. Idempotent, so
        crash recovery can call it again: if ``data`` is already in place (a crash after the
        rename) it is only hashed. Raises ValueError if the bytes do not add up to ``size``.
        """
        fdir = self.file_dir(batch_pk, file_id)
        data = self.data_path(batch_pk, file_id)
        if data.exists():
            _check_size(data, size)
            return _sha256_file(data)
        chunks = [self.chunk_path(batch_pk, file_id, i) for i in range(chunk_count)]
        if chunk_count == 1:
            _check_size(chunks[0], size)
            digest = _sha256_file(chunks[0])
            os.replace(chunks[0], data)
            fsync_dir(fdir)
            return digest
        temp = fdir / f".data.{secrets.token_hex(8)}.part"
        hashing = _Hashing(chunks)
        hashing.start()
        try:
            with open(temp, "wb") as out:
                for chunk in chunks:
                    with open(chunk, "rb") as src:
                        _copy(src.fileno(), out.fileno())
                out.flush()
                os.fsync(out.fileno())
            _check_size(temp, size)
            digest = hashing.result()
            os.replace(temp, data)
        except BaseException:
            hashing.join()
            remove(temp)
            raise
        fsync_dir(fdir)
        return digest

    def remove_batch_temps(self) -> int:
        """Remove every ``<batch dir>/.<file_idx>.<random>.part``; how many (start-up only)."""
        removed = 0
        if not self.root.is_dir():
            return 0
        for batch in os.scandir(self.root):
            if not (batch.is_dir(follow_symlinks=False) and batch.name.isdigit()):
                continue
            for entry in os.scandir(batch.path):
                if entry.name.startswith(".") and entry.name.endswith(".part") and entry.is_file(follow_symlinks=False):
                    remove(Path(entry.path))
                    removed += 1
        return removed

    def remove_chunks(self, batch_pk: int, file_id: int) -> None:
        remove_tree(self.chunks_dir(batch_pk, file_id))


def _discard(fd: int, temp: Path) -> None:
    os.close(fd)
    remove(temp)


def _write_all(fd: int, data: bytes, offset: int | None = None) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
    if offset is not None:
        # Start writeback of this block now, while the next one arrives: the fsync that must
        # come before the file is recorded then finds little left to write.
        start_writeback(fd, offset, len(data))


def _finish(fd: int, data: bytes, durable: bool) -> None:
    if data:
        _write_all(fd, data)
    if durable:
        os.fsync(fd)


def _copy(src: int, dst: int) -> None:
    """Append all of ``src`` to ``dst`` in the kernel (no round trip through user space)."""
    remaining = os.fstat(src).st_size
    while remaining > 0:
        n = os.copy_file_range(src, dst, min(remaining, 1 << 30))
        if n == 0:
            raise ValueError("chunk file shrank while it was copied")
        remaining -= n


class _Hashing(threading.Thread):
    """SHA-256 of files read in order, in its own thread."""

    def __init__(self, paths: list[Path]) -> None:
        super().__init__(name="assemble-sha256", daemon=True)
        self.paths = paths
        self.digest: str | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            h = hashlib.sha256()
            for p in self.paths:
                with open(p, "rb") as f:
                    while block := f.read(COPY_BLOCK):
                        h.update(block)
            self.digest = h.hexdigest()
        except BaseException as e:  # handed to the caller by result()
            self.error = e

    def result(self) -> str:
        self.join()
        if self.error is not None:
            raise self.error
        assert self.digest is not None
        return self.digest


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _check_size(path: Path, size: int) -> None:
    actual = os.stat(path).st_size
    if actual != size:
        raise ValueError(f"{path} holds {actual} bytes, {size} were declared")
