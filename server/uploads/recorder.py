"""Group commit of upload records: requests whose bodies arrive at about the same moment are
recorded in one write transaction, and those that complete a file share its two syncs.

Two threads do it, each going from one group to the next without a trip through the event
loop (which is busy with requests: waiting for it between groups cost as much as a group's
transaction), and posting their answers to it:

* the writer (small whole files only) creates and writes each body to its temp and hashes it, a
  batch at a time, then hands them to the recorder;
* the recorder takes every request queued so far (a group, at most ``MAX_GROUP``) and:

1. runs one sync (``Durability.sync_now``) if the group before it completed a file or removed a
   row, or if one of this group's requests completes a file: that one sync makes the last
   group's commit (and its renames) durable, and this group's bytes: a file's bytes must be
   durable before the record that says it is complete (PostgreSQL pipelines its WAL flushes so);
2. answers the last group's completions and removes the bytes its commit no longer needs;
3. runs one ``BEGIN IMMEDIATE`` transaction: reads the group's batch and file rows in one
   query (``FOR NO KEY UPDATE`` of the batch rows, a no-op on SQLite, for PostgreSQL), decides each
   request in order against what the earlier ones changed, writes the rows (``INSERT ...
   RETURNING``: one a new row on SQLite's own cursor, ``server.db.direct``, one for all on
   PostgreSQL; one ``executemany`` ``UPDATE``; one ``DELETE``), and moves each request's bytes
   into place (renames) before the commit, so that "recorded" and "in place" are one step for
   every other writer: a duplicate chunk never replaces a recorded one. Requests that only
   recorded a chunk are answered at once; those that completed a file wait for the next sync.

So a group costs one sync, one transaction (``Database.write_sync``) and one trip to the
event loop for its answers, whatever its size. A thread starts when something is queued for it
and ends after ``LINGER`` seconds without work (at once when the service closes).

A request that breaks a rule (404, 400, 413) gets its error and its temp is removed; the others
of its group go on. A rename that fails rolls the transaction back and the group is tried again
without that request; a row the database refuses (``DataError``: the statements do not say
whose) has the group tried again one request per transaction, so that only its own fails.
Each request costs one write transaction at most (two when a row was refused); a storage fault
becomes the client's error (``server.uploads.faults``) with nothing half-recorded.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections.abc import Callable

from sqlalchemy.exc import DataError, IntegrityError

from server.config import Settings
from server.db import Database
from server.uploads.chunkset import ChunkSet
from server.uploads.durability import Durability
from server.uploads.faults import storage_error
from server.uploads.ledger import Arrival, Ledger, MoveFailed, Pending, Plan, Recorded
from server.uploads.store import UploadStore, remove

log = logging.getLogger("filedrop.uploads")
MAX_GROUP = 64
LINGER = 1.0  # seconds a thread waits for more work before it ends

__all__ = ["Arrival", "Recorded", "Recorder"]


class _Lane:
    """Requests queued for one thread, which takes them at most ``MAX_GROUP`` at a time. The
    thread starts when something is queued and none runs, and ends once nothing has been queued
    for ``linger`` seconds (at once when closing)."""

    def __init__(self, name: str, run: Callable[[], None]) -> None:
        self.name = name
        self.run = run
        self.queue: list[Pending] = []
        self.cv = threading.Condition()
        self.thread: threading.Thread | None = None
        self.closing = False
        self.linger = LINGER

    def submit(self, pending: list[Pending]) -> None:
        if not pending:
            return
        with self.cv:
            self.queue += pending
            if self.thread is None:
                self.thread = threading.Thread(target=self.run, name=self.name, daemon=True)
                self.thread.start()
            else:
                self.cv.notify()

    def take(self, more: bool = False) -> list[Pending] | None:
        """In the thread: the next requests; ``[]`` when none is queued but ``more`` work is
        left; None when the thread is to end."""
        with self.cv:
            if not self.queue and not more:
                if not self.closing:
                    self.cv.wait(self.linger)
                if not self.queue:
                    self.thread = None
                    return None
            group, self.queue = self.queue[:MAX_GROUP], self.queue[MAX_GROUP:]
            return group

    async def close(self) -> None:
        """Let the thread work through what is queued, and wait for it to end."""
        with self.cv:
            self.closing = True
            thread = self.thread
            self.cv.notify()
        try:
            if thread is not None:
                await asyncio.to_thread(thread.join)
                await asyncio.sleep(0)  # the answers it posted before it ended run first
        finally:
            self.closing = False


class Recorder:
    def __init__(self, db: Database, store: UploadStore, durability: Durability, settings: Settings) -> None:
        self.db = db
        self.store = store
        self.durability = durability
        self.settings = settings
        self.ledger = Ledger(store, settings)
        # Two threads, each going from one group to the next without a trip through the event
        # loop (busy with requests): small whole files are written, then groups are recorded;
        # answers are posted to the loop.
        self.writes = _Lane("filedrop-upload-writer", self._write_loop)
        self.records = _Lane("filedrop-recorder", self._record_loop)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.groups = 0  # transactions run (tests read it)

    async def record(self, arrival: Arrival) -> Recorded:
        """Record ``arrival`` with whatever else is waiting; its answer once it is (and, if it
        completed its file, once that is durable)."""
        self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[Recorded] = self._loop.create_future()
        (self.writes if arrival.body is not None else self.records).submit([Pending(arrival, fut)])
        return await asyncio.shield(fut)  # a caller that goes away does not stop its group

    async def close(self) -> None:
        """Write, record and answer what is queued, then end the threads."""
        await self.writes.close()
        await self.records.close()

    def _write_loop(self) -> None:
        """The writer thread: small whole files are written to their temps, a batch at a time,
        while the recorder syncs and commits the ones before them (creating a file is the
        dearest step of a small upload, and one writer at a time does not contend for the
        directory)."""
        while (batch := self.writes.take()) is not None:
            try:
                written = self._write_bodies(batch)
            except Exception as e:  # a bug: answer everyone rather than hang them
                log.exception("writing %d upload(s) failed", len(batch))
                for p in batch:
                    p.error = p.error or e
                written = []
            self._post([p for p in batch if p not in written], {})
            self.records.submit(written)

    def _record_loop(self) -> None:
        """The recorder thread: one step per group, back to back."""
        # The group committed last and waiting for the sync that makes it durable (files it
        # completed, rows it removed), with its plan.
        waiting: tuple[list[Pending], Plan] | None = None
        while (group := self.records.take(more=waiting is not None)) is not None:
            try:
                # The sync (the last group's records, this group's bytes), the last group's
                # clean-up, this group's transaction and renames.
                plan = self._step(waiting, group)
            except Exception as e:  # a bug: answer everyone rather than hang them
                log.exception("recording a group of %d upload(s) failed", len(group))
                for p in (*group, *(waiting[0] if waiting else ())):
                    p.error = p.error or e
                plan = None
            answered = list(waiting[0]) if waiting is not None else []
            waiting = None
            if plan is not None:
                later = [p for p in group if p.error is None and p.result is not None and p.result.completed]
                answered += [p for p in group if p not in later]
                if later or plan.removed:
                    waiting = (later, plan)
            else:
                answered += group
            self._post(answered, plan.touched if plan is not None else {})

    def _post(self, answered: list[Pending], touched: dict[int, ChunkSet]) -> None:
        """From a thread: answer these (and note the chunks recorded) on the event loop."""
        if not answered and not touched:
            return

        def answer() -> None:
            self.durability.touch(touched)
            self._finish(answered)
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(answer)
        except RuntimeError:  # the loop is closed: nobody waits for these any more
            pass

    @staticmethod
    def _finish(group: list[Pending]) -> None:
        for p in group:
            if p.future.done():
                continue
            if p.error is None:
                assert p.result is not None
                p.future.set_result(p.result)
            else:
                p.future.set_exception(p.error)
                p.future.exception()  # retrieved: its caller may have gone away

    def _mapped(self, e: BaseException, what: str) -> BaseException:
        return storage_error(e, self.settings.min_free_disk, what) or e

    def _step(self, waiting: tuple[list[Pending], Plan] | None, group: list[Pending]) -> Plan | None:
        """Blocking, in a thread: sync if the last group or this one needs it, then clean up
        after the last group (its removals are durable now) and record this one."""
        live = group
        if waiting is not None or any(p.arrival.completes for p in live):
            try:
                self.durability.sync_now()
            except Exception as e:
                if waiting is not None:  # committed, but not known durable: not answered complete
                    self._fail(waiting[0], self._mapped(e, "making the upload's record durable"))
                    waiting[1].removed.clear()
                    waiting[1].completed.clear()
                self._fail([p for p in live if p.arrival.completes], self._mapped(e, "making the uploaded bytes durable"))
                live = [p for p in live if not p.arrival.completes]
        if waiting is not None:
            self._clean(waiting[1])
        return self._commit(live) if live else None

    def _write_bodies(self, group: list[Pending]) -> list[Pending]:
        """Write (and hash) small whole files, each to its temp (blocking: in a thread), before
        the sync that makes them durable. Returns those written."""
        todo = [p for p in group if p.arrival.body is not None and p.arrival.digest is None]
        errors = self.store.write_files([(p.arrival.temp, p.arrival.body) for p in todo])  # type: ignore[misc]
        failed = set()
        for p, error in zip(todo, errors, strict=True):
            a = p.arrival
            if error is not None:
                self._fail([p], self._mapped(error, f"writing file {a.req.file_idx}"))
                failed.add(id(p))
                continue
            assert a.body is not None
            a.digest, a.body = hashlib.sha256(a.body).hexdigest(), b""  # written: the memory goes
        return [p for p in group if id(p) not in failed]

    def _commit(self, live: list[Pending]) -> Plan | None:
        """One transaction for ``live``; None if it could not be made (each has its error).
        ``live`` is not changed: the caller answers each of its requests, those failed here too."""
        live = list(live)  # a request whose move failed leaves this list, not the caller's group
        retries = 2
        # Each turn commits, or fails a request and goes on without it, or uses a retry: at most
        # one transaction per request and two more. A failed move uses no retry: the requests
        # left must be recorded by a commit, never answered from a transaction rolled back.
        while live:
            plan = Plan()
            try:
                with self.db.write_sync() as conn:
                    self.ledger.apply(conn, live, plan)
            except MoveFailed as f:  # rolled back: try again without that request
                plan.undo()
                self._fail([f.pending], self._mapped(f.error, "moving the upload into place"))
                live.remove(f.pending)
                continue
            except IntegrityError:  # another process made the same file row meanwhile
                plan.undo()
                if not retries:
                    raise
                retries -= 1
                continue
            except Exception as e:
                plan.undo()
                if isinstance(e, DataError) and len(live) > 1:
                    # A value one row's column cannot hold; the group's statements do not say whose.
                    return self._each_alone(live)
                self._fail(live, self._mapped(e, "recording the upload"))
                return None
            self.groups += 1
            for path in plan.discard:
                remove(path)
            return plan
        return None

    def _each_alone(self, live: list[Pending]) -> Plan | None:
        """``live`` in one transaction per request, in order (each decided against what those
        before it committed, as in one transaction): a request fails only for its own row. One
        plan for what was committed; None if nothing was."""
        merged: Plan | None = None
        for p in live:
            plan = self._commit([p])
            if plan is None:
                continue
            if merged is None:
                merged = plan
                continue
            merged.removed += plan.removed
            merged.completed += plan.completed
            for file_id, ids in plan.touched.items():
                mine = merged.touched.setdefault(file_id, ChunkSet())
                for i in ids.ids():
                    mine.add(i)
        return merged

    def _clean(self, plan: Plan) -> None:
        """After the sync that made ``plan``'s commit durable: the bytes it no longer needs."""
        for pk, file_id in plan.removed:
            self.store.remove_file(pk, file_id)
        for r in plan.completed:
            if r.id is not None and r.chunk_count > 1:  # a whole file never had a file dir
                self.store.remove_file_dir(r.batch_pk, r.id)

    @staticmethod
    def _fail(group: list[Pending], error: BaseException) -> None:
        for p in group:
            p.error = error
            for path in (p.arrival.temp, p.arrival.completion):
                if path is not None and path.name != "partial":
                    remove(path)
