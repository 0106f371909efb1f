"""One claim of rows through a worker's render process, under the hard limits.

The render process answers row by row. Between answers the worker enforces, from outside:
* time: a row that takes longer than ``FILEDROP_RENDER_TIMEOUT`` gets its process killed;
* memory: a process over ``FILEDROP_RENDER_MEMORY`` reports the row and exits (or just dies);
  either way the row was killed by a limit: the first time it goes back to the queue with one
  more ``attempt``, the second time it errors naming the limit. The rows after it in the claim
  go to a fresh process;
* cancel: every ``CHECK`` s it reads the job's state (a primary-key read), also while it
  fetches the rows' remote assets; cancelled, dropped or ended elsewhere, the process is killed
  at once, mid-row if need be, a fetch in flight is abandoned, and rows not yet published are
  skipped (cancel) or forgotten (the job is gone);
* stop (SIGTERM): the process is killed (a fetch abandoned), rows not yet published go back
  to the queue.

Rendered pages are published and recorded in groups (``FLUSH_*``): counts move at least every
``FLUSH_SECONDS`` while rows complete, and the render process keeps rendering meanwhile (its
answers queue up, bounded). A page is published only after a fresh look at the job, and a row is
marked done only after its files are published.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from server.jobs import control, queries
from server.jobs.childproc import ChildGone, RenderProcess
from server.jobs.publish import Item, stage
from server.jobs.queries import Claimed, Outcome

if TYPE_CHECKING:
    from server.jobs.worker import LoadedJob, Worker

log = logging.getLogger("filedrop.jobs.worker")

CHECK = 0.2  # s between looks at the job's state while rendering: bounds the cancel latency
FLUSH_SECONDS = 0.5  # publish + record at least this often while rows complete (counts move)...
FLUSH_ROWS = 2000  # ...or after this many rows (one syncfs and one transaction for them all)...
FLUSH_BYTES = 8 << 20  # ...or this many bytes of pages (bounds the worker's memory)
ASSET_ROUNDS = 4  # rows needing assets are sent again after each fetch round
STREAM_SECONDS = 5.0  # a worker keeps claiming more of one job this long, then looks at the others
MAX_ATTEMPTS = 2  # renders of one row a limit may kill: the first goes back to the queue


class Stop(Exception):
    """The claim ends early; ``why``: cancel | gone | stopping | lost."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


@dataclass
class _Buffer:
    pages: list[tuple[Claimed, bytes, list[list[str]]]] = field(default_factory=list)
    out: Outcome = field(default_factory=Outcome.empty)
    size: int = 0
    since: float = field(default_factory=time.monotonic)

    def due(self) -> bool:
        return bool(self.pages or self.out) and (len(self.pages) + len(self.out.errors) >= FLUSH_ROWS
                                                  or self.size >= FLUSH_BYTES
                                                  or time.monotonic() - self.since >= FLUSH_SECONDS)


class RowRunner:
    """Rows of one job through the render process: the claim it is given, and more claims of the
    same job while the render process is still busy with the last (so it never waits for the
    database between claims), for up to ``STREAM_SECONDS``."""

    def __init__(self, worker: Worker, job: LoadedJob, rows: list[Claimed]) -> None:
        self.w = worker
        self.job = job
        self.rows = list(rows)
        self.buf = _Buffer()
        self.cancel_seen = False
        self.began = time.monotonic()
        self.refill = True  # while claiming more of this job may give rows

    @property
    def timeout(self) -> float:
        return self.w.settings.render_timeout

    async def run(self) -> None:
        """Render, publish and record every row of the claim (or hand them back)."""
        todo = self.rows
        try:
            for _round in range(ASSET_ROUNDS):
                needs = await self._pass(todo)
                if not needs:
                    break
                await self._resolve({k for _r, ks in needs for k in ks})
                todo = [r for r, _ks in needs]
            else:
                for r, ks in needs:
                    self.buf.out.errors.append((r.idx, r.reference_id, "assets unavailable: " + ", ".join(ks)))
            await self._flush()
        except Stop as e:
            await self._stopped(e.why)

    async def _pass(self, rows: list[Claimed]) -> list[tuple[Claimed, list[str]]]:
        """Send the rows to the render process and take its answers (in groups, in order) until
        each row has one. The time limit runs per row: the child marks each row it starts in
        shared memory, so a row that outlives the limit is known even when the rows before it
        were not answered yet (those go to the fresh process, innocent)."""
        queue = deque(rows)
        needs: list[tuple[Claimed, list[str]]] = []
        child = await self._send(queue)
        seen = sent = child.progress()
        deadline = time.monotonic() + self.timeout
        next_check = time.monotonic() + CHECK
        while queue:
            if time.monotonic() >= next_check:
                await self._check()
                next_check = time.monotonic() + CHECK
            # Rows done and not yet published are published FLUSH_SECONDS after the last flush
            # even when no other answer comes meanwhile (a row slower than that would otherwise
            # hold the one before it back, and the counts would move every second row).
            flush_at = self.buf.since + FLUSH_SECONDS if self.buf.pages or self.buf.out else deadline
            try:
                header, blobs = await child.recv(max(0.0, min(deadline, next_check, flush_at) - time.monotonic()))
            except TimeoutError:
                if self.buf.due():
                    await self._flush()
                now_at = child.progress()
                if now_at != seen:  # the child moved on to another row: its time starts now
                    seen, deadline = now_at, time.monotonic() + self.timeout
                    continue
                if time.monotonic() < deadline:
                    continue
                await self.w.drop_child()
                self._blame(queue, now_at, sent, f"time limit: rendering this row took longer than "
                                              f"FILEDROP_RENDER_TIMEOUT ({self.timeout:g} s)")
            except ChildGone as e:
                at = child.progress()
                await self.w.drop_child()
                self._blame(queue, at, sent, f"the render process died while rendering this row "
                                       f"(exit status {e.returncode})")
            else:
                died = self._answers(queue, header, blobs[0] if blobs else b"", needs)
                if self.buf.due():
                    await self._flush()
                elif self.buf.out.errors and self.job.max_errors is not None:
                    # A job with max_errors has its errored rows counted at once (it stops
                    # early); its pages wait for their group, one syncfs for all of them.
                    await self._record_errors()
                if not died and len(queue) < self.job.claim_size // 2:
                    await self._more(child, queue)
                seen, deadline = child.progress(), time.monotonic() + self.timeout
                if not died:
                    continue
                await self.w.drop_child()  # it said it went over the memory limit, and exits
            # The process was killed or died: the rest of the claim goes to a fresh one.
            if queue:
                child = await self._send(queue)
                seen = sent = child.progress()
                deadline = time.monotonic() + self.timeout
        return needs

    async def _resolve(self, keys: set[str]) -> None:
        """Fetch the assets the rows need, looking at the job every ``CHECK`` s meanwhile, as
        while rendering: a fetch may take ``FILEDROP_FETCH_TIMEOUT`` (20 s), ten times what a
        cancel may. When the claim must end (cancel, ``max_errors``, the job ended or dropped,
        SIGTERM) the fetch is cancelled at once (its connection closed, nothing of it stored)
        and ``_check`` raises Stop. Only this job's fetch: a worker serves one job at a time."""
        await self._check()  # cancelled meanwhile (by this pass's own errors, say): fetch nothing
        fetch = asyncio.create_task(self.w.resolve(self.job, keys), name=f"assets-{self.job.job_id}")
        try:
            while True:
                done, _ = await asyncio.wait({fetch}, timeout=CHECK)
                if done:
                    fetch.result()  # the fetch's own failure, if any, is the claim's
                    return
                await self._check()
        finally:
            if not fetch.done():
                fetch.cancel()
                await asyncio.wait({fetch})  # its connection is closed, its temp file gone
            elif not fetch.cancelled():
                fetch.exception()  # retrieved: a Stop that raced the fetch's end wins

    def _answers(self, queue: deque[Claimed], header: dict[str, Any], blob: bytes,
                 needs: list[tuple[Claimed, list[str]]]) -> bool:
        """Take a group of answers; True if the last says the process went over its memory."""
        at = 0
        for a in header.get("answers") or []:
            row = queue.popleft() if queue else None
            if row is None or a.get("idx") != row.idx:  # not the protocol: trust nothing it says
                raise RuntimeError(f"render process answered {a.get('idx')!r} for row {row and row.idx}")
            status = a.get("status")
            if status == "done":
                size = int(a.get("size") or 0)
                page, at = blob[at:at + size], at + size
                self.buf.pages.append((row, page, a.get("extra") or []))
                self.buf.size += size
            elif status == "need":
                needs.append((row, list(a.get("needs") or [])))
            elif status == "limit":
                self._killed(row, str(a.get("error")))
                return True
            else:
                self.buf.out.errors.append((row.idx, row.reference_id, str(a.get("error"))))
        return False

    def _blame(self, queue: deque[Claimed], at: tuple[int, int], sent: tuple[int, int], why: str) -> None:
        """The process was killed (or died) at row ``at`` (its progress mark; ``sent``: the mark
        when these rows were sent): that row was killed by a limit; rows before it finished but
        their answers were lost with the process: they stay in the queue for a fresh one."""
        if at[0] > sent[0]:
            for i, row in enumerate(queue):
                if row.idx == at[1]:
                    del queue[i]
                    self._killed(row, why)
                    return
        self._killed(queue.popleft(), why)  # it went before it started one of these

    async def _more(self, child: RenderProcess, queue: deque[Claimed]) -> None:
        """Claim the next rows of the job before the render process runs out of these."""
        if not self.refill or time.monotonic() - self.began > STREAM_SECONDS or self.cancel_seen \
                or self.w.stop_reason() is not None:
            return
        self.job.adapt(len(self.rows) - len(queue), time.monotonic() - self.began)
        more = await queries.claim_rows(self.w.db, self.job.job_id, self.w.id, self.job.claim_size)
        if not more:
            self.refill = False
            return
        self.rows += more
        queue.extend(more)
        await child.send_rows(self.job.job_id, more)

    async def _send(self, queue: deque[Claimed]) -> RenderProcess:
        child = await self.w.child_for(self.job)
        await child.send_rows(self.job.job_id, queue)
        return child

    def _killed(self, row: Claimed, why: str) -> None:
        """A limit (or a crash) killed the render of ``row``: back to the queue once, then error."""
        tries = row.attempts + 1
        if tries >= MAX_ATTEMPTS:
            self.buf.out.errors.append((row.idx, row.reference_id, f"{why} (on {tries} attempts)"))
        else:
            self.buf.out.retry.append(row.idx)
        log.warning("job %s row %d: %s (attempt %d)", self.job.job_id, row.idx, why, tries)

    async def _check(self) -> None:
        """Raise Stop when the claim must end: the worker stops or was declared dead, the job
        was cancelled, ended or dropped. Kills the render process first (mid-row if need be):
        once this raises, nothing of the claim can be rendered or published any more."""
        why = self.w.stop_reason()
        if why is None:
            state = await queries.job_state(self.w.db, self.job.job_id)
            if state is None or state[0] not in ("Queued", "In progress"):
                why = "gone"
            elif state[1] or self.cancel_seen:
                why = "cancel"
        if why is not None:
            await self.w.drop_child()
            raise Stop(why)

    async def _flush(self) -> None:
        buf, self.buf = self.buf, _Buffer()
        out = buf.out
        if buf.pages:
            try:
                await self._check()
                await self._publish(buf.pages, out)
            except Stop as e:
                self.buf = buf  # _stopped settles them
                raise e from None
        if out:
            await self._record(out)

    async def _record_errors(self) -> None:
        """Record the errored rows of the buffer now, alone (no publish)."""
        errors, self.buf.out.errors = self.buf.out.errors, []
        await self._record(Outcome([], errors, [], [], []))

    async def _record(self, out: Outcome) -> None:
        """Record ``out``; cancel the job when its errors went over ``max_errors``."""
        counts = await queries.record(self.w.db, self.job.job_id, self.w.id, out)
        if counts is None:
            # As for every Stop: nothing of the claim renders on, and none of its answers is left
            # queued for the next job's compile to read as its reply.
            await self.w.drop_child()
            raise Stop("gone")
        if counts.max_errors is not None and counts.errored > counts.max_errors and not self.cancel_seen:
            self.cancel_seen = True
            await control.cancel(self.w.db, self.w.settings, [self.job.job_id],
                                 f"max_errors ({counts.max_errors}) exceeded: {counts.errored} rows errored",
                                 level="error")

    async def _publish(self, pages: list[tuple[Claimed, bytes, list[list[str]]]], out: Outcome) -> None:
        settings = self.w.settings
        items: list[Item] = []
        owner: dict[str, Claimed] = {}
        for row, html, extra in pages:
            # A row's files are one unit: its page is not served without its PDF (the row errors).
            name = f"{row.reference_id}.{row.suffix}.html"
            items.append(Item(name, data=html, unit=row.idx))
            owner[name] = row
            for extra_name, source in extra:
                items.append(Item(extra_name, source=source, unit=row.idx))
                owner[extra_name] = row
        need = sum(len(i.data) if i.data is not None else _size(i.source) for i in items)
        free = await asyncio.to_thread(_free_bytes, self.job.out_dir)
        if free is not None and free - need < settings.min_free_disk:
            msg = (f"disk space limit: publishing would leave less than FILEDROP_MIN_FREE_DISK "
                   f"({settings.min_free_disk:,} bytes) free")
            out.errors += [(row.idx, row.reference_id, msg) for row, _h, _e in pages]
            return
        staged = await asyncio.to_thread(stage, self.job.out_dir, items, self.w.id)
        # The fence: written and synced, but renamed into place only if these rows are still
        # this worker's and its lease runs (a worker declared dead while it stalled publishes
        # nothing after its rows went back or the job ended).
        until = self.w.lease()
        try:
            if until is None:
                raise Stop("lost")
            await self._check()
            if not await queries.holds(self.w.db, self.job.job_id, self.w.id, [row.idx for row, _h, _e in pages]):
                raise Stop("lost")
        except Stop:
            await asyncio.to_thread(staged.discard)
            await self.w.drop_child()  # nothing of this claim renders on
            raise
        errors = await asyncio.to_thread(staged.commit, until)
        failed: dict[int, str] = {}
        for name, err in errors.items():
            failed.setdefault(owner[name].idx, err)
        for row, _html, _extra in pages:
            if row.idx in failed:
                out.errors.append((row.idx, row.reference_id, failed[row.idx]))
            else:
                out.done.append(row.idx)

    async def _stopped(self, why: str) -> None:
        """Settle every row of the claim that has no outcome yet."""
        settled = set(self.buf.out.retry) | set(self.buf.out.done) | {idx for idx, _ref, _m in self.buf.out.errors}
        open_rows = [r.idx for r in self.rows if r.idx not in settled]
        if why == "gone":
            return  # nothing of ours to record: the job is gone
        # "lost": declared dead (our rows went back: recording changes nothing), or our lease ran
        # out before the heartbeat was: then the rows are still ours and must go back now.
        out = Outcome(self.buf.out.done, self.buf.out.errors, self.buf.out.retry, [], [])
        if why == "cancel":
            out.skip = open_rows
        else:
            out.release = open_rows
        self.buf = _Buffer()
        await queries.record(self.w.db, self.job.job_id, self.w.id, out)


def _size(path: str | None) -> int:
    try:
        return os.stat(path).st_size if path else 0
    except OSError:
        return 0


def _free_bytes(path: os.PathLike[str]) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize
