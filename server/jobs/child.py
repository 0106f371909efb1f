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
from collections.abc import Iterable
from typing import Any, BinaryIO

from server.jobs.contract import TemplateInvalid
from server.jobs.lifeline import die_with_parent
from server.jobs.render import Asset, AssetReader, Page, Renderer, RowFailed, compile_master
from server.jobs.sandbox import LimitedEnvironment, LimitHit
from server.jobs.wire import GROUP_BYTES, MAX_HEADER, encode, max_blob, read_sync

NICE = 5  # on top of its worker's: render processes yield the CPU to the API and to the workers' bookkeeping
MAX_MESSAGE = 1 << 30  # a claim's rows carry their data: up to FILEDROP_MAX_DATA_SIZE together
MEMORY_EXIT = 3
PROGRESS = struct.Struct("<qq")  # (sequence, row index): see Child.progress
FLUSH_ROWS = 100  # answers are sent in groups of at most this many rows, or wire.GROUP_BYTES of pages...
FLUSH_SECONDS = 0.1  # ...and at least this often while rows complete
# ...and before a group would pass what the parent reads (wire.max_blob of pages, wire.MAX_HEADER
# of header): it kills a process that sends more. The answers' share of a header, and what an
# answer takes besides its strings (a bound: idx, status, size, the keys).
HEADER_ROOM = MAX_HEADER - 1024
ANSWER_BYTES = 96


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


def _bound(texts: Iterable[str]) -> int:
    """At most the bytes of header an answer with these strings takes: JSON escapes a character
    to 12 bytes at most (``\\ud835\\udcb3``, a surrogate pair)."""
    return ANSWER_BYTES + 12 * sum(map(len, texts))


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
        self.pending = 0  # bytes of self.pages
        self.head = 0  # at most the bytes self.answers take in a header (_bound)
        self.flushed = time.monotonic()
        self.memory = int(config["memory"])
        self.env = LimitedEnvironment(int(config["max_digits"]), int(config["max_page_size"]))
        self.max_page_size = int(config["max_page_size"])
        self.max_blob = max_blob(self.max_page_size)
        self.reader = AssetReader(int(config["asset_memory"]))
        self.jobs: OrderedDict[str, Renderer] = OrderedDict()
        # The jobs_kept used last (a job or rows message uses one); the parent mirrors this cache.
        self.jobs_kept = int(config["jobs_kept"])

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
                    self.send({"ok": False, "error": str(e), "job_id": job_id})
                    return
                self.jobs[job_id] = Renderer(compiled, msg["strategy"], msg["batch_id"], json.loads(msg["params"]),
                                             self.reader, self.max_page_size)
                while len(self.jobs) > self.jobs_kept:
                    self.jobs.popitem(last=False)
            self.jobs.move_to_end(job_id)
            self.send({"ok": True, "job_id": job_id})  # the job named: the parent matches reply to request
        elif op == "assets":
            r = self.jobs.get(msg["job_id"])
            if r is not None:
                for key, a in msg["items"].items():
                    r.assets[key] = Asset(a.get("path"), int(a.get("size") or 0), a.get("error"))
        elif op == "rows":
            r = self.jobs[msg["job_id"]]
            # Used now, as the parent's mirror counts it (RenderProcess.knows): the two drop the
            # same template, or it would send rows of one this process no longer has.
            self.jobs.move_to_end(msg["job_id"])
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
        page = b""
        if isinstance(out, Page):
            answer: dict[str, Any] = {"idx": idx, "status": "done", "size": len(out.html),
                                      "extra": [list(x) for x in out.extra]}
            page, head = out.html, _bound(s for x in out.extra for s in x) if out.extra else ANSWER_BYTES
        elif isinstance(out, Exception):
            error = _cut(str(out))
            answer, head = {"idx": idx, "status": "error", "error": error}, _bound((error,))
        else:
            answer, head = {"idx": idx, "status": "need", "needs": out}, _bound(out)
            if head > HEADER_ROOM and (n := len(json.dumps(answer))) > HEADER_ROOM:
                # URLs rendered from the row's data that no message can carry (nor an HTTP
                # server take in a request line): the row's error, not a message the parent refuses.
                answer = {"idx": idx, "status": "error", "error": (
                    f"asset URLs too long: the assets this row needs take {n:,} bytes to name, over the "
                    f"{HEADER_ROOM:,} one answer of a render process may take")}
                head = _bound((answer["error"],))
        # A page is at most FILEDROP_MAX_PAGE_SIZE (the renderer errors the row otherwise): alone
        # it is within max_blob, and the group is sent first when this one would take it past.
        if self.answers and (self.pending + len(page) > self.max_blob or self.head + head > HEADER_ROOM):
            self.flush()
        self.answers.append(answer)
        self.head += head
        if page:
            self.pages.append(page)
            self.pending += len(page)
        if len(self.answers) >= FLUSH_ROWS or self.pending >= GROUP_BYTES or \
                time.monotonic() - self.flushed >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Send the answers so far in one message (pages in one blob): per-row messages cost
        the parent more than rendering. Sent at least every FLUSH_SECONDS while rows complete;
        a message stays within what the parent reads (``row``)."""
        if self.answers:
            self.send({"answers": self.answers}, (b"".join(self.pages),))
            self.answers, self.pages, self.pending, self.head = [], [], 0, 0
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
                child.send({"ok": False, "status": "limit", "error": child.memory_message(),
                            "job_id": msg[0].get("job_id")})
            finally:
                os._exit(MEMORY_EXIT)


if __name__ == "__main__":
    raise SystemExit(main())
