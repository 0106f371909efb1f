"""The store's streamed writes: a body is written as it arrives and hashed in a thread behind
it; what waits for the hash is bounded per file, across the file's requests; what was hashed
leaves the page cache behind the writes."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from server.uploads.store import BEHIND, DROP_LAG, HASH_BLOCK, HashLane, _Stream
from tests.support.fs import cached_bytes
from tests.support.waiting import async_wait_until

PIECE = 256 << 10  # what one socket read hands over


async def test_a_files_bytes_waiting_for_their_hash_are_bounded_across_its_requests(tmp_path) -> None:
    """The hashing thread is held: the file's first request writes BEHIND blocks and ends; its
    next request (the same lane) may hand over one more block, and then waits, instead of
    piling up a new window of bytes per request. Once the hash goes on, both bodies are hashed
    in order and the file holds them."""
    loop = asyncio.get_running_loop()
    gate = threading.Event()
    executor = ThreadPoolExecutor(1)
    loop.set_default_executor(executor)
    held = executor.submit(gate.wait, 60)  # every hash job queues behind this
    fd = os.open(tmp_path / "partial", os.O_WRONLY | os.O_CREAT, 0o600)
    lane, sent = HashLane(), bytearray()
    try:
        first = _Stream(loop, fd, 0, lane)
        for _ in range(BEHIND * HASH_BLOCK // PIECE):
            piece = os.urandom(PIECE)
            await asyncio.wait_for(first.write(piece), 10)  # the window is not full: no wait
            sent += piece
        closed = threading.Event()
        first.finish(closed.set)
        assert not closed.is_set(), "the file must stay open while its blocks wait for the hash"

        second = _Stream(loop, fd, len(sent), lane)

        async def next_block() -> None:
            for _ in range(HASH_BLOCK // PIECE):
                piece = os.urandom(PIECE)
                sent.extend(piece)
                await second.write(piece)

        writing = asyncio.ensure_future(next_block())

        async def handed_over() -> bool:  # its block is written and handed to the lane
            return len(lane.window) > BEHIND or writing.done()

        await async_wait_until(handed_over, what="the second request's block on the lane")
        assert len(lane.window) == BEHIND + 1
        done, _ = await asyncio.wait([writing], timeout=0.2)
        assert not done, "a second request must wait while the file's window is full"

        gate.set()
        await asyncio.wait_for(writing, 30)
        second.finish(lambda: None)
        await asyncio.wait_for(lane.settle(), 30)
        assert lane.hasher.hexdigest() == hashlib.sha256(sent).hexdigest()
        assert closed.is_set()
        with open(tmp_path / "partial", "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == hashlib.sha256(sent).hexdigest()
    finally:
        gate.set()
        held.result(10)
        os.close(fd)
        executor.shutdown(wait=True)


async def test_a_hashed_body_leaves_the_page_cache_behind_its_writes(tmp_path) -> None:
    """32 MiB streamed with a hash lane, on a disk-backed file system: the file is whole and its
    hash right, and most of it is out of the page cache once the body ends (all but about the
    last DROP_LAG bytes, and pages the disk was still writing when they were let go), so that a
    server taking large uploads does not grow its cache by every byte. A body written through
    the cache and kept would leave all 32 MiB there."""
    probe = tmp_path / "probe"
    probe.write_bytes(os.urandom(1 << 16))
    with open(probe, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if cached_bytes(probe):
        pytest.skip("this file system keeps written pages cached whatever is asked (tmpfs)")
    loop = asyncio.get_running_loop()
    path = tmp_path / "partial"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    lane, sent = HashLane(), hashlib.sha256()
    size = 32 << 20
    closed = asyncio.Event()

    def close() -> None:  # what the store does once no thread uses the file
        os.close(fd)
        closed.set()

    stream = _Stream(loop, fd, 0, lane)
    try:
        for _ in range(size // PIECE):
            piece = os.urandom(PIECE)
            sent.update(piece)
            await asyncio.wait_for(stream.write(piece), 10)
    except BaseException:
        os.close(fd)
        raise
    stream.finish(close)
    await asyncio.wait_for(closed.wait(), 30)
    await asyncio.wait_for(lane.settle(), 30)
    assert lane.hasher.hexdigest() == sent.hexdigest()
    assert cached_bytes(path) <= size // 2, f"{cached_bytes(path)} of {size} bytes still cached (DROP_LAG {DROP_LAG})"
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == sent.hexdigest()
