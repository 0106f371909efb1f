"""A render process: ``python -m server.jobs.child``, started by a worker (or by the API's
template checker) and spoken to over stdin/stdout (``server.jobs.wire``).

The only place user templates are compiled and rendered. Before it reads any template it limits
itself: address space (``RLIMIT_AS`` = ``FILEDROP_RENDER_MEMORY``), digits of a number
(``sys.set_int_max_str_digits``), CPU priority (nice), and it dies with its parent
(``PR_SET_PDEATHSIG``). Time is limited from outside: the parent kills it when a row takes
longer than ``FILEDROP_RENDER_TIMEOUT`` (a thread in here could not interrupt a C-level
computation that holds the GIL). A ``MemoryError`` is reported for the row at hand, then the
process exits: its heap may be in pieces, a fresh one takes over.

Messages in (``op``): ``config`` (first, once), ``check`` (compile a master smartlink),
``job`` (compile one and keep it), ``assets`` (what the job's asset keys resolved to), ``rows``
(render; one answer per row, in order, sent in groups at least every ``FLUSH_SECONDS`` while rows
complete; the row at hand is always in shared memory, see ``Child.progress``).
"""

from __future__ import annotations

import gc
import json
import mmap
import os
import resource
import signal
import struct
import sys
import time
from collections import OrderedDict
from typing import Any, BinaryIO

from server.jobs.contract import TemplateInvalid
from server.jobs.lifeline import die_with_parent
from server.jobs.render import Asset, AssetReader, Page, Renderer, RowFailed, compile_master
from server.jobs.sandbox import LimitedEnvironment, LimitHit
from server.jobs.wire import encode, read_sync

NICE = 5  # on top of its worker's: render processes yield the CPU to the API and to the workers' bookkeeping
MAX_MESSAGE = 1 << 30  # a claim's rows carry their data: up to FILEDROP_MAX_DATA_SIZE together
MEMORY_EXIT = 3
PROGRESS = struct.Struct("<qq")  # (sequence, row index): see Child.progress
FLUSH_ROWS = 100  # answers are sent in groups of at most this many rows...
FLUSH_BYTES = 4 << 20  # ...or bytes of pages...
FLUSH_SECONDS = 0.1  # ...and at least this often while rows complete


def _limit(config: dict[str, Any]) -> None:
    die_with_parent(int(config["parent"]), signal.SIGKILL)
    try:
        os.nice(NICE)
    except OSError:
        pass
    memory = int(config["memory"])
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    sys.set_int_max_str_digits(int(config["max_digits"]))


def _cut(text: str, n: int = 2000) -> str:
    return text if len(text) <= n else text[:n] + "…"


class Child:
    def __init__(self, config: dict[str, Any], out: BinaryIO) -> None:
        self.out = out
        # (sequence, row index) of the row being rendered, in memory the parent maps too: when it
        # kills this process for a limit it knows which row was at fault, though answers are
        # sent in groups.
        self.progress = mmap.mmap(int(config["progress_fd"]), PROGRESS.size)
        self.seq = 0
        self.answers: list[dict[str, Any]] = []
        self.pages: list[bytes] = []
        self.pending = 0
        self.flushed = time.monotonic()
        self.memory = int(config["memory"])
        self.env = LimitedEnvironment(int(config["max_digits"]), int(config["max_page_size"]))
        self.max_page_size = int(config["max_page_size"])
        self.reader = AssetReader(int(config["asset_memory"]))
        self.jobs: OrderedDict[str, Renderer] = OrderedDict()
        self.jobs_kept = int(config["jobs_kept"])  # the parent mirrors this cache

    def send(self, header: dict[str, Any], blobs: tuple[bytes, ...] = ()) -> None:
        self.out.write(encode(header, blobs))
        self.out.flush()

    def memory_message(self) -> str:
        return (f"memory limit: the render process needed more than FILEDROP_RENDER_MEMORY "
                f"({self.memory:,} bytes)")

    def compile(self, template: str) -> Any:
        return compile_master(json.loads(template), self.env)

    def handle(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op == "check":
            try:
                self.compile(msg["template"])
                self.send({"ok": True})
            except TemplateInvalid as e:
                self.send({"ok": False, "error": str(e)})
        elif op == "job":
            job_id = msg["job_id"]
            if job_id not in self.jobs:
                try:
                    compiled = self.compile(msg["template"])
                except TemplateInvalid as e:
                    self.send({"ok": False, "error": str(e)})
                    return
                self.jobs[job_id] = Renderer(compiled, msg["strategy"], msg["batch_id"], json.loads(msg["params"]),
                                             self.reader, self.max_page_size)
                while len(self.jobs) > self.jobs_kept:
                    self.jobs.popitem(last=False)
            self.jobs.move_to_end(job_id)
            self.send({"ok": True})
        elif op == "assets":
            r = self.jobs.get(msg["job_id"])
            if r is not None:
                for key, a in msg["items"].items():
                    r.assets[key] = Asset(a.get("path"), int(a.get("size") or 0), a.get("error"))
        elif op == "rows":
            r = self.jobs[msg["job_id"]]
            for (idx, ref, suffix, pdf), data in zip(msg["rows"], msg["data"], strict=True):
                self.row(r, idx, ref, suffix, pdf, data)
            self.flush()
        else:
            raise SystemExit(f"render process: unknown message {op!r}")

    def row(self, r: Renderer, idx: int, ref: str, suffix: str, pdf: str | None, data: Any) -> None:
        self.seq += 1
        PROGRESS.pack_into(self.progress, 0, self.seq, idx)  # before the row: whom a kill was for
        try:
            out = r.render(idx, ref, suffix, pdf, data)
        except MemoryError:
            out = None
        except (RowFailed, LimitHit) as e:
            out = e
        except Exception as e:  # a template that fails on this row's data
            out = RowFailed(f"render failed: {e.__class__.__name__}: {e}")
        if out is None:
            self.flush()
            self.send({"answers": [{"idx": idx, "status": "limit", "error": self.memory_message()}]})
            sys.exit(MEMORY_EXIT)
        if isinstance(out, Page):
            self.answers.append({"idx": idx, "status": "done", "size": len(out.html),
                                 "extra": [list(x) for x in out.extra]})
            self.pages.append(out.html)
            self.pending += len(out.html)
        elif isinstance(out, Exception):
            self.answers.append({"idx": idx, "status": "error", "error": _cut(str(out))})
        else:
            self.answers.append({"idx": idx, "status": "need", "needs": out})
        if len(self.answers) >= FLUSH_ROWS or self.pending >= FLUSH_BYTES or \
                time.monotonic() - self.flushed >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Send the answers so far in one message (pages in one blob): per-row messages cost
        the parent more than rendering. Sent at least every FLUSH_SECONDS while rows complete."""
        if self.answers:
            self.send({"answers": self.answers}, (b"".join(self.pages),))
            self.answers, self.pages, self.pending = [], [], 0
        self.flushed = time.monotonic()


def main() -> int:
    inp = sys.stdin.buffer
    # The protocol owns the real stdout; anything printed goes to stderr (the worker's log).
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    first = read_sync(inp, MAX_MESSAGE, MAX_MESSAGE)
    if first is None or first[0].get("op") != "config":
        return 2
    _limit(first[0])
    child = Child(first[0], out)
    child.send({"ready": True, "pid": os.getpid()})
    gc.freeze()  # the modules loaded so far stay: full collections no longer walk them
    while True:
        try:
            msg = read_sync(inp, MAX_MESSAGE, MAX_MESSAGE)
        except MemoryError:
            msg = None
        if msg is None:
            return 0
        try:
            child.handle(msg[0])
        except MemoryError:
            # Compiling (or reading a message) went over the limit: say so if we still can.
            try:
                child.flush()
                child.send({"ok": False, "status": "limit", "error": child.memory_message()})
            finally:
                os._exit(MEMORY_EXIT)


if __name__ == "__main__":
    raise SystemExit(main())
