"""Where upload bytes live, and the disk steps of receiving and completing a file.

Disk layout (the janitor codes against it; every path is derived from row ids, never from a
client-supplied name):

    <data_dir>/uploads/<batches.id>/                      batch dir
    <batch dir>/<batch_files.id>.data                     a complete file
    <batch dir>/.<file_idx>.<tag>-<random>.part           a request's body before its file row exists
                                                          (a whole file, or a file's first chunk);
                                                          <tag>: the app process writing it
    <batch dir>/<batch_files.id>/                         file dir, while the file is received
    <file dir>/partial                                    the file being received: every chunk of the
                                                          uniform layout at chunk_idx * chunk_size
    <file dir>/chunks/<chunk_idx>                         a chunk stored on its own (other chunkings,
                                                          a chunk sent without Content-Length)
    <file dir>/chunks/.<chunk_idx>.<tag>-<random>.part    such a chunk being received
    <file dir>/.data.<tag>-<random>.part                  a concatenation under way
    <data_dir>/uploads/.synced                            boot id of the last start (JSON)

A complete file has no directory of its own (its file dir goes once it is complete): creating
an inode is the dearest step of a small upload here (ext4 scans for one not recently freed), so a
whole-file upload costs one, its temp, renamed into place.

Chunks of the uniform layout (all chunks but the last the same size, as every known client
sends them) are written where they belong in ``partial``, so completing the file is a rename;
chunks stored on their own are copied into ``partial`` when they fit the layout, and otherwise
the file is concatenated into a temp. Bytes reach a final name only by temp (a dot-name, or
``partial``) -> ``os.replace`` in the same directory.

Space is reserved (``fallocate``) for the bytes a request declares before they are written,
so that concurrent writers see each other in ``statvfs`` and the free-disk floor holds.
Nothing here syncs: the upload service makes bytes durable in groups (``syncfs``, see
``server.uploads.durability``). The functions are synchronous disk work, called in threads,
except ``receive`` (a coroutine that hands its disk work to threads).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from server.durable import drop_cached, reserve, spread_subdirs, start_writeback

# Bytes hashed per thread hop: large enough that the hop is noise, small enough that a few hundred
# parallel uploads stay far below the RSS budget. A body no larger than this is written in one
# thread hop (open, reserve, write, close).
WRITE_BUFFER = 1 << 20
READ_BLOCK = 1 << 20  # read size when hashing what arrived out of order
DIR_MODE = 0o700
FILE_MODE = 0o600


class BodyTooLarge(Exception):
    """The request body went past the limit while streaming (nothing of it is kept)."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


class BelowFloor(Exception):
    """Writing would leave less free space than the floor (the reservation is given back)."""

    def __init__(self, free: int) -> None:
        super().__init__(free)
        self.free = free


@dataclass(frozen=True)
class Target:
    """Where a body goes: a fresh temp (``fresh``: created here, removed on any failure), or
    ``partial`` at ``offset`` (shared by the file's requests; an unrecorded range is simply
    written again by the chunk's next attempt)."""

    path: Path
    offset: int = 0
    fresh: bool = True


def remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def make_dirs(path: Path) -> None:
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)


def open_making_dirs(path: Path, flags: int) -> int:
    """``os.open(path, flags, FILE_MODE)``, its folders made only when they are missing (a
    ``mkdir`` per request cost a failed system call each on the hot path)."""
    try:
        return os.open(path, flags, FILE_MODE)
    except FileNotFoundError:
        make_dirs(path.parent)
        return os.open(path, flags, FILE_MODE)


def replace_making_dirs(src: Path, dst: Path) -> None:
    """``os.replace(src, dst)``, the folders of ``dst`` made only when they are missing."""
    try:
        os.replace(src, dst)
    except FileNotFoundError:
        if not os.path.lexists(src):
            raise
        make_dirs(dst.parent)
        os.replace(src, dst)


class UploadStore:
    """Paths under ``<data_dir>/uploads`` and the disk steps of receiving and completing."""

    def __init__(self, root: Path, min_free: int = 0, tag: str = "0") -> None:
        self.root = root
        self.min_free = min_free
        self.tag = tag  # this process's, in the names of its arrival temps
        self._free = (0, -1e9)  # (free bytes, when read)

    def prepare(self) -> None:
        """At start: the uploads folder, whose batch dirs are spread over the disk's block groups
        (``spread_subdirs``): a new batch's files are not made where the inodes of the batches
        just removed are (ext4 without a journal skips recently freed inodes one by one, so that
        each new file costs a scan past all of them)."""
        make_dirs(self.root)
        spread_subdirs(self.root)

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
        return self.chunks_dir(batch_pk, file_id) / f".{int(chunk_idx)}.{self.tag}-{secrets.token_hex(8)}.part"

    def arrival_temp(self, batch_pk: int, file_idx: int) -> Path:
        """A body received before its file row exists (a whole file, a file's first chunk)."""
        return self.batch_dir(batch_pk) / f".{int(file_idx)}.{self.tag}-{secrets.token_hex(8)}.part"

    def partial_path(self, batch_pk: int, file_id: int) -> Path:
        return self.file_dir(batch_pk, file_id) / "partial"

    def data_path(self, batch_pk: int, file_id: int) -> Path:
        return self.batch_dir(batch_pk) / f"{int(file_id)}.data"

    @property
    def sync_marker(self) -> Path:
        return self.root / ".synced"

    # -- space -----------------------------------------------------------------------------
    def free_bytes(self, max_age: float = 0.0) -> int:
        """Free bytes of the uploads' file system; ``max_age``: a reading that recent will do
        (a request's early check; the reservation before writing reads it afresh)."""
        now = time.monotonic()
        if max_age and now - self._free[1] < max_age:
            return self._free[0]
        try:
            free = shutil.disk_usage(self.root).free
        except FileNotFoundError:
            make_dirs(self.root)
            free = shutil.disk_usage(self.root).free
        self._free = (free, now)
        return free

    def _reserve(self, fd: int, offset: int, length: int) -> None:
        """Take ``length`` bytes at ``offset`` of ``fd`` from the disk unless that would leave less
        than the floor, and check the floor again after (another request may have reserved
        meanwhile). Raises OSError ENOSPC, or BelowFloor (the caller gives a fresh temp back)."""
        free = os.statvfs(self.root)
        if free.f_bavail * free.f_frsize - length < self.min_free:
            raise BelowFloor(free.f_bavail * free.f_frsize)
        reserve(fd, offset, length)
        free = os.statvfs(self.root)
        if free.f_bavail * free.f_frsize < self.min_free:
            raise BelowFloor(free.f_bavail * free.f_frsize)

    def _open(self, target: Target, reserve_bytes: int) -> int:
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if target.fresh else 0)
        fd = open_making_dirs(target.path, flags)
        try:
            self._reserve(fd, target.offset, reserve_bytes)
        except BaseException:
            _discard(fd, target)
            raise
        return fd

    def write_files(self, files: list[tuple[Path, bytes]]) -> list[BaseException | None]:
        """Create and write small fresh files one after the other (blocking: in one thread, the
        only one writing such files): what failed, in order. The floor is checked once for all
        of them, and their bytes are taken from the disk by the writes right after it (the file
        system counts them at once), which the next check sees; bodies that stream reserve
        theirs first (``fallocate``)."""
        results: list[BaseException | None] = []
        room = self.free_bytes() - self.min_free if files else 0
        for path, data in files:
            try:
                if room - len(data) < 0:
                    raise BelowFloor(room + self.min_free)
                fd = open_making_dirs(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
                try:
                    _pwrite(fd, data, 0)
                finally:
                    os.close(fd)
                room -= len(data)
                results.append(None)
            except Exception as e:
                remove(path)
                results.append(e)
        return results

    def write_small(self, target: Target, data: bytes, reserve_bytes: int, hasher: hashlib._Hash | None) -> None:
        """Create, reserve, write and close in one go (blocking: in a thread)."""
        fd = self._open(target, reserve_bytes)
        try:
            _pwrite(fd, data, target.offset)
            if hasher is not None:
                hasher.update(data)
        except BaseException:
            _discard(fd, target)
            raise
        os.close(fd)

    # -- receiving ---------------------------------------------------------------------------
    async def receive(self, body: AsyncIterable[bytes], target: Target, *, limit: int, reserve_bytes: int,
                      declared: int | None, lane: HashLane | None = None) -> int:
        """Stream ``body`` (at most ``limit`` bytes) into ``target``; returns its size.

        ``reserve_bytes`` are taken from the disk before the first write (the declared length, or
        the most the body may be: what a fresh temp's body left of that is given back once it has
        ended). A body ``declared`` (Content-Length) to hold at most WRITE_BUFFER bytes is read
        whole, then written (and hashed) in one thread hop. Any other
        is written as it arrives (its file exists from the start: a stalled client's temp is
        there for the janitor to see) through a ``_Stream``: written on the loop, hashed in order
        in a thread (``lane``), and this returns without waiting for the hash. On any error, a
        client that goes away and cancellation included, a fresh temp is removed (once no thread
        uses it any more).
        """
        loop = asyncio.get_running_loop()
        size = 0
        if declared is not None and declared <= WRITE_BUFFER:
            pieces: list[bytes] = []
            async for data in body:
                size += len(data)
                if size > limit:
                    raise BodyTooLarge(limit)
                pieces.append(data)
            hasher = None
            if lane is not None:
                await lane.settle()
                hasher = lane.hasher
            await loop.run_in_executor(None, self.write_small, target, b"".join(pieces), reserve_bytes, hasher)
            return size
        opening = loop.run_in_executor(None, self._open, target, reserve_bytes)
        stream: _Stream | None = None
        try:
            async for data in body:
                size += len(data)
                if size > limit:
                    raise BodyTooLarge(limit)
                if stream is None:  # the first piece waited in the socket while the file opened
                    stream = _Stream(loop, await opening, target.offset, lane)
                await stream.write(data)
            if stream is None:
                stream = _Stream(loop, await opening, target.offset, lane)
            if target.fresh and size < reserve_bytes:
                # A body of unknown length reserved the most it may hold, and ``fallocate`` keeps
                # blocks past the end of a file until a truncate: give back what it did not use
                # (to its own size, which releases them), before it is recorded and may become
                # ``partial``, which other requests then write into.
                await loop.run_in_executor(None, os.ftruncate, stream.fd, size)
        except BaseException:
            if stream is not None:
                stream.finish(partial(_discard, stream.fd, target))
            else:
                opening.add_done_callback(lambda f: f.cancelled() or f.exception() or _discard(f.result(), target))
            raise
        stream.finish(partial(os.close, stream.fd))
        return size

    # -- completing --------------------------------------------------------------------------
    def place(self, chunk: Path, partial: Path, offset: int) -> None:
        """Copy a chunk stored on its own into ``partial`` at ``offset`` (in the kernel)."""
        make_dirs(partial.parent)
        with open(chunk, "rb") as src:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT, FILE_MODE)
            try:
                length = os.fstat(src.fileno()).st_size
                self._reserve(fd, offset, length)
                _copy_range(src.fileno(), fd, offset, length)
            finally:
                os.close(fd)

    def concat(self, batch_pk: int, file_id: int, sources: list[tuple[Path, int, int]], size: int,
               hasher: hashlib._Hash) -> Path:
        """Concatenate ``(path, offset, length)`` ranges into a fresh temp in the file dir,
        hashing them on the way; returns the temp (not yet renamed). Space is reserved first."""
        temp = self.file_dir(batch_pk, file_id) / f".data.{self.tag}-{secrets.token_hex(8)}.part"
        target = Target(temp)
        fd = self._open(target, size)
        try:
            pos = 0
            for path, offset, length in sources:
                with open(path, "rb") as src:
                    _copy_range(src.fileno(), fd, pos, length, src_offset=offset)
                    _hash_range(src.fileno(), offset, length, hasher)
                pos += length
        except BaseException:
            _discard(fd, target)
            raise
        os.close(fd)
        return temp

    def remove_file_dir(self, batch_pk: int, file_id: int) -> None:
        """What a complete file no longer needs: its file dir (chunks, temps)."""
        remove_tree(self.file_dir(batch_pk, file_id))

    def remove_file(self, batch_pk: int, file_id: int) -> None:
        """Every byte of a file whose row is gone: its data and its file dir."""
        remove(self.data_path(batch_pk, file_id))
        remove_tree(self.file_dir(batch_pk, file_id))

    def files_over(self, last_id: int) -> list[Path]:
        """Every ``<batch dir>/<file id>/`` and ``<batch dir>/<file id>.data`` of an id over
        ``last_id``."""
        found: list[Path] = []
        if not self.root.is_dir():
            return found
        for batch in os.scandir(self.root):
            if not (batch.is_dir(follow_symlinks=False) and batch.name.isdigit()):
                continue
            for entry in os.scandir(batch.path):
                stem = entry.name.removesuffix(".data")
                if stem.isascii() and stem.isdigit() and int(stem) > last_id:
                    found.append(Path(entry.path))
        return found

    def request_temps(self) -> list[tuple[Path, str | None]]:
        """Every temp of a request or an assembly with its tag (None: named before temps carried
        one): ``<batch dir>/.<file_idx>.<tag>-<random>.part``, and in each file dir
        ``.data.<tag>-<random>.part`` and ``chunks/.<chunk_idx>.<tag>-<random>.part``."""
        found: list[tuple[Path, str | None]] = []
        if not self.root.is_dir():
            return found
        for batch in os.scandir(self.root):
            if not (batch.is_dir(follow_symlinks=False) and batch.name.isdigit()):
                continue
            dirs = [batch.path]
            while dirs:
                for entry in os.scandir(dirs.pop()):
                    if entry.is_dir(follow_symlinks=False):
                        if entry.name.isdigit() or entry.name == "chunks":  # a file dir, its chunks
                            dirs.append(entry.path)
                    elif entry.name.startswith(".") and entry.name.endswith(".part") and entry.is_file(
                            follow_symlinks=False):
                        middle = entry.name[1:-len(".part")].partition(".")[2]
                        found.append((Path(entry.path), middle.partition("-")[0] if "-" in middle else None))
        return found


HASH_BLOCK = 2 << 20  # bytes of a streamed body handed to the hashing thread in one hop
# Blocks of one file (of its lane, whichever request wrote them; of one body without a lane)
# written but not yet hashed. A block is handed over by the read that takes it to HASH_BLOCK bytes,
# so it holds less than HASH_BLOCK plus one read (server.protocol.RECV_SIZE, 1 MiB): with the block
# being filled, a file's bytes waiting in memory for the hash stay under 4 x 3 = 12 MiB (8 MiB
# when reads come in whole mebibytes).
BEHIND = 3
DROP_LAG = 2 * HASH_BLOCK  # how far behind the block just written a hashed block leaves the page cache


class HashLane:
    """A SHA-256 fed in order, across the requests of a file: each body's blocks are hashed in
    a thread after those before them (``tail``), and nobody waits for it until the digest is
    needed (``settle``). ``broken``: a block was not hashed; the digest must come from disk."""

    def __init__(self) -> None:
        self.hasher = hashlib.sha256()
        self.tail: asyncio.Future[None] | None = None
        self.window: list[asyncio.Future[None]] = []  # blocks handed over, not known to be hashed
        self.broken = False

    async def settle(self) -> None:
        """Wait until every block handed to the lane is hashed."""
        while self.tail is not None and not self.tail.done():
            await asyncio.wait([self.tail])


class _Stream:
    """A body written as it arrives, each piece with one ``pwrite`` on the event loop (a copy
    into the page cache, like a bare handler's: profiling showed writes handed to threads cost
    twice the CPU, the pieces going cold between cores); every HASH_BLOCK bytes are then
    hashed (in order, on the lane) and their writeback started, in one thread hop of the
    default executor, while the loop reads on. ``write`` waits only when BEHIND blocks of the
    file are still waiting for that: counted on the lane, so a file's requests following each
    other faster than its hash cannot pile up its bytes in memory."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, offset: int, lane: HashLane | None) -> None:
        self.loop = loop
        self.fd = fd
        self.offset = offset  # where the next piece goes
        self.lane = lane
        self._pieces: list[bytes] = []
        self._start = offset  # of the pieces not yet handed to a thread
        self._jobs: list[asyncio.Future[None]] = []  # this body's, in order
        self._window = lane.window if lane is not None else []

    async def write(self, data: bytes) -> None:
        _pwrite(self.fd, data, self.offset)
        self.offset += len(data)
        if self.lane is not None:  # kept for the hash; a body without a lane is hashed at the end
            self._pieces.append(data)
        if self.offset - self._start >= HASH_BLOCK:
            self._hand_off()
            window = self._window
            while len(window) > BEHIND:
                await asyncio.wait([window[0]])
                window[:] = [j for j in window if not j.done()]

    def _hand_off(self) -> None:
        pieces, start, length = self._pieces, self._start, self.offset - self._start
        self._pieces, self._start = [], self.offset
        previous = self.lane.tail if self.lane is not None else None
        job = asyncio.ensure_future(self._job(previous, pieces, start, length))
        if self.lane is not None:
            self.lane.tail = job
        self._jobs.append(job)
        window = self._window
        while window and window[0].done():
            del window[0]
        window.append(job)

    async def _job(self, previous: asyncio.Future[None] | None, pieces: list[bytes], start: int, length: int) -> None:
        if previous is not None:  # in order: the hash is one stream
            await asyncio.wait([previous])
        lane = self.lane
        hasher = lane.hasher if lane is not None and not lane.broken else None
        try:
            await self.loop.run_in_executor(None, _hash_and_write_back, self.fd, pieces, start, length, hasher)
        except Exception:  # e.g. out of memory: the digest will be read back from disk instead
            if lane is not None:
                lane.broken = True

    def finish(self, then: Callable[[], None]) -> None:
        """Hand the rest to the lane; run ``then`` (close the file, or discard a temp) once no
        thread uses the file any more. Does not wait."""
        if self.offset > self._start:
            self._hand_off()
        running = [j for j in self._jobs if not j.done()]
        if not running:
            then()
            return
        asyncio.gather(*running).add_done_callback(lambda _f: then())


def _hash_and_write_back(fd: int, pieces: list[bytes], start: int, length: int, hasher: hashlib._Hash | None) -> None:
    if hasher is not None:
        for p in pieces:
            hasher.update(p)
    # Start writeback of this block now, while the next ones arrive: the sync that must come
    # before the file is answered complete then finds little left to write.
    start_writeback(fd, start, length)
    if hasher is not None and start >= DROP_LAG:
        # The block DROP_LAG bytes back is hashed and (mostly) written back by now, and nothing
        # here reads it again: drop it from the page cache, so that the cache recycles a few
        # pages instead of growing by every byte uploaded (a growing cache cost 2-4 times the CPU
        # a GiB on the machine measured; docs/benchmarks.md). Pages still being written stay.
        drop_cached(fd, start - DROP_LAG, length)


def hash_file(path: Path, start: int, end: int, hasher: hashlib._Hash) -> None:
    """Feed bytes ``[start, end)`` of ``path`` to ``hasher``; ValueError if the file is short."""
    with open(path, "rb") as f:
        _hash_range(f.fileno(), start, end - start, hasher)


def _hash_range(fd: int, offset: int, length: int, hasher: hashlib._Hash) -> None:
    while length > 0:
        block = os.pread(fd, min(length, READ_BLOCK), offset)
        if not block:
            raise ValueError(f"a file ended {length} bytes early")
        hasher.update(block)
        offset += len(block)
        length -= len(block)


def _discard(fd: int, target: Target) -> None:
    os.close(fd)
    if target.fresh:
        remove(target.path)


def _pwrite(fd: int, data: bytes | memoryview, offset: int, writeback: bool = False) -> None:
    view = memoryview(data)
    start = offset
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n
    if writeback:
        # Start writeback of this block now, while the next one arrives: the sync that must
        # come before the file is answered complete then finds little left to write.
        start_writeback(fd, start, len(data))


def _copy_range(src: int, dst: int, dst_offset: int, length: int, src_offset: int = 0) -> None:
    """Copy ``length`` bytes of ``src`` (from ``src_offset``) to ``dst`` at ``dst_offset``, in
    the kernel where it can (no round trip through user space)."""
    while length > 0:
        try:
            n = os.copy_file_range(src, dst, min(length, 1 << 30), src_offset, dst_offset)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            block = os.pread(src, min(length, READ_BLOCK), src_offset)
            n = len(block)
            if n:
                _pwrite(dst, block, dst_offset)
        if n == 0:
            raise ValueError("a chunk file shrank while it was copied")
        src_offset += n
        dst_offset += n
        length -= n
