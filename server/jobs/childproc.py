"""A render process (``server.jobs.child``) seen from its parent: start it with the limits,
talk to it, kill it. The parent enforces time: every ``recv`` has a deadline, and a child that
misses it is killed (SIGKILL) and reaped before anything else happens, so nothing it was doing
can finish afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import struct
import sys
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.config import Settings
from server.jobs.wire import MAX_HEADER, WireError, encode, encode_rows, max_blob, read_async

if TYPE_CHECKING:
    from server.jobs.queries import Claimed

log = logging.getLogger("filedrop.jobs.worker")

ROOT = Path(__file__).resolve().parents[2]  # the checkout: `python -m server.jobs.child` runs from it
READ_AHEAD = 8 << 20  # bytes of answers buffered while the parent publishes: the child keeps rendering
ANSWERS = 16  # answer messages queued before the reading stops
PROGRESS = struct.Struct("<qq")  # as server.jobs.child writes it
START_TIMEOUT = 30.0
JOBS_KEPT = 4  # compiled templates a render process keeps (a worker moves between running jobs)  # a loaded machine may take seconds to start Python


class ChildGone(Exception):
    """The render process exited (or was killed); ``returncode`` says how."""

    def __init__(self, returncode: int | None) -> None:
        super().__init__(f"the render process exited (status {returncode})")
        self.returncode = returncode


class RenderProcess:
    def __init__(self, proc: asyncio.subprocess.Process, settings: Settings, progress: mmap.mmap) -> None:
        self.proc = proc
        self._progress = progress
        self.max_blob = max_blob(settings.max_page_size)  # a group of pages (the child keeps to it)
        self.pid = proc.pid
        # Jobs whose template this child has compiled (it keeps the JOBS_KEPT last used, like
        # this mirror: a use is a ``knows`` here, the rows that follow it there) -> the version
        # of their assets it was sent.
        self._jobs: OrderedDict[str, int] = OrderedDict()
        # One task reads whole messages into a queue: a recv that times out (the caller polls
        # for cancels between answers) never leaves half a message read.
        # Bounded: a full queue stops the reading, the pipe fills and the child waits (memory
        # here stays at about ANSWERS pages plus READ_AHEAD bytes).
        self._answers: asyncio.Queue[tuple[dict[str, Any], list[bytes]] | None] = asyncio.Queue(ANSWERS)
        self._ended = False
        self._reader = asyncio.create_task(self._read(), name=f"render-process-{proc.pid}")

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            while (msg := await read_async(self.proc.stdout, MAX_HEADER, self.max_blob)) is not None:
                await self._answers.put(msg)
        except WireError as e:  # the child keeps within the limits it was given: a fault of ours
            log.error("render process %d: %s: killed", self.pid, e)
            self.kill()
        finally:
            self._ended = True
            with contextlib.suppress(asyncio.QueueFull):
                self._answers.put_nowait(None)

    @classmethod
    async def start(cls, settings: Settings) -> RenderProcess:
        # The child writes (sequence, row index) here before each row (PROGRESS).
        fd = os.memfd_create("filedrop-render-progress")
        try:
            os.ftruncate(fd, PROGRESS.size)
            progress = mmap.mmap(fd, PROGRESS.size)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "server.jobs.child", cwd=ROOT, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, limit=READ_AHEAD, pass_fds=(fd,))
        finally:
            os.close(fd)
        child = cls(proc, settings, progress)
        try:
            await child.send({"op": "config", "parent": os.getpid(), "progress_fd": fd, "memory": settings.render_memory,
                              "max_digits": settings.max_number_digits, "max_page_size": settings.max_page_size,
                              "asset_memory": settings.job_asset_memory, "jobs_kept": JOBS_KEPT})
            ready = await child.recv(START_TIMEOUT)
            if not ready[0].get("ready"):
                raise ChildGone(None)
        except BaseException:
            await child.close()
            raise
        return child

    def progress(self) -> tuple[int, int]:
        """(sequence, index) of the row the child started last: the sequence moves with each row."""
        seq, idx = PROGRESS.unpack_from(self._progress, 0)
        return seq, idx

    def knows(self, job_id: str) -> bool:
        if job_id in self._jobs:
            self._jobs.move_to_end(job_id)
            return True
        return False

    def learnt(self, job_id: str) -> None:
        self._jobs[job_id] = -1
        while len(self._jobs) > JOBS_KEPT:
            self._jobs.popitem(last=False)

    def assets_version(self, job_id: str) -> int:
        return self._jobs.get(job_id, -1)

    def set_assets_version(self, job_id: str, version: int) -> None:
        if job_id in self._jobs:
            self._jobs[job_id] = version

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def send(self, header: dict[str, Any], blobs: tuple[bytes, ...] = ()) -> None:
        await self.write(encode(header, blobs))

    async def send_rows(self, job_id: str, rows: Sequence[Claimed]) -> None:
        await self.write(encode_rows(job_id, [[r.idx, r.reference_id, r.suffix, r.pdf] for r in rows],
                                     [r.data for r in rows]))

    async def write(self, message: bytes) -> None:
        """Send an encoded message (``wire.encode``)."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(message)
            await self.proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            raise ChildGone(await self._reap()) from None

    async def recv(self, timeout: float) -> tuple[dict[str, Any], list[bytes]]:
        """The next answer within ``timeout`` s. Raises TimeoutError (the child is still
        running: the caller decides whether to kill it) or ChildGone."""
        if self._ended and self._answers.empty():
            raise ChildGone(await self._reap())
        msg = await asyncio.wait_for(self._answers.get(), timeout)
        if msg is None:
            raise ChildGone(await self._reap())
        return msg

    def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    async def _reap(self) -> int | None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), 10)
        return self.proc.returncode

    async def close(self) -> int | None:
        """Kill and reap: once this returns, the process does nothing more."""
        self.kill()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        code = await self._reap()
        with contextlib.suppress(BufferError):
            self._progress.close()
        self._reader.cancel()  # it may wait to queue answers nobody will read
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        return code
