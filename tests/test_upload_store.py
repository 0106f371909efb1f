"""The store's streamed writes: a body is written as it arrives and hashed in a thread behind
it; what waits for the hash is bounded per file, across the file's requests."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from server.uploads.store import BEHIND, HASH_BLOCK, HashLane, _Stream
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
