"""Group commit of upload records: requests whose bodies arrive at about the same moment are
recorded in one write transaction, and those that complete a file share its two syncs.

One owned task takes every request queued so far (a group, at most ``MAX_GROUP``) and:

1. runs one sync (``Durability.sync_now``) if the group before it completed a file or removed a
   row, or if one of this group's requests completes a file: that one sync makes the last
   group's commit (and its renames) durable, and this group's bytes: a file's bytes must be
   durable before the record that says it is complete (PostgreSQL pipelines its WAL flushes so);
2. answers the last group's completions and removes the bytes its commit no longer needs;
3. runs one ``BEGIN IMMEDIATE`` transaction: reads the group's batch and file rows in one
   query (``FOR UPDATE`` of the batch rows, a no-op on SQLite, for PostgreSQL), decides each
   request in order against what the earlier ones changed, writes the rows (one ``INSERT ...
   RETURNING``, one ``executemany`` ``UPDATE``, one ``DELETE``), and moves each request's bytes
   into place (renames) before the commit, so that "recorded" and "in place" are one step for
   every other writer: a duplicate chunk never replaces a recorded one. Requests that only
   recorded a chunk are answered at once; those that completed a file wait for the next sync.

All of that runs in one thread hop per group (``Database.write_sync``), so a group costs one
sync, one transaction and a couple of trips through the event loop, whatever its size.

A request that breaks a rule (404, 400, 413) gets its error and its temp is removed; the others
of its group go on. A rename that fails rolls the transaction back and the group is tried again
without that request. Each request costs one write transaction at most; a storage fault
becomes the client's error (``server.uploads.faults``) with nothing half-recorded.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

from sqlalchemy.exc import IntegrityError

from server.config import Settings
from server.db import Database
from server.uploads.durability import Durability
from server.uploads.faults import storage_error
from server.uploads.ledger import Arrival, Ledger, MoveFailed, Pending, Plan, Recorded
from server.uploads.store import UploadStore, remove

log = logging.getLogger("filedrop.uploads")
MAX_GROUP = 64

__all__ = ["Arrival", "Recorded", "Recorder"]


class Recorder:
    def __init__(self, db: Database, store: UploadStore, durability: Durability, settings: Settings) -> None:
        self.db = db
        self.store = store
        self.durability = durability
        self.settings = settings
        self.ledger = Ledger(store, settings)
        self._queue: list[Pending] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._bodies: list[Pending] = []  # small whole files to write before they are recorded
        self._bodies_wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self.groups = 0  # transactions run (tests read it)

    async def record(self, arrival: Arrival) -> Recorded:
        """Record ``arrival`` with whatever else is waiting; its answer once it is (and, if it
        completed its file, once that is durable)."""
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        fut: asyncio.Future[Recorded] = asyncio.get_running_loop().create_future()
        if arrival.body is not None:
            if self._writer is None or self._writer.done():
                self._writer = asyncio.ensure_future(self._write_loop())
            self._bodies.append(Pending(arrival, fut))
            self._bodies_wake.set()
        else:
            self._queue.append(Pending(arrival, fut))
            self._wake.set()
        return await asyncio.shield(fut)  # a caller that goes away does not stop its group

    async def close(self) -> None:
        """Write and record what is queued, then end the tasks."""
        self._closing = True
        self._bodies_wake.set()
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
        self._wake.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        self._closing = False

    async def _write_loop(self) -> None:
        """Small whole files are written to their temps here, one batch per thread hop, while
        the recorder syncs and commits the ones before them: creating a file is the dearest
        step of a small upload, and one writer at a time does not contend for the directory."""
        while True:
            if not self._bodies:
                if self._closing:
                    return
                await self._bodies_wake.wait()
                self._bodies_wake.clear()
                continue
            batch, self._bodies = self._bodies[:MAX_GROUP], self._bodies[MAX_GROUP:]
            try:
                written = await asyncio.to_thread(self._write_bodies, batch)
            except Exception as e:  # a bug: answer everyone rather than hang them
                log.exception("writing %d upload(s) failed", len(batch))
                for p in batch:
                    p.error = p.error or e
                written = []
            self._finish([p for p in batch if p not in written])
            self._queue += written
            self._wake.set()

    async def _run(self) -> None:
        # The group committed last and waiting for the sync that makes it durable (files it
        # completed, rows it removed), with its plan.
        waiting: tuple[list[Pending], Plan] | None = None
        while True:
            if not self._queue and waiting is None:
                if self._closing:
                    return
                await self._wake.wait()
                self._wake.clear()
                continue
            group, self._queue = self._queue[:MAX_GROUP], self._queue[MAX_GROUP:]
            try:
                # One thread hop a group: the sync (the last group's records, this group's
                # bytes), the last group's clean-up, this group's transaction and renames.
                plan = await asyncio.to_thread(self._step, waiting, group)
            except Exception as e:  # a bug: answer everyone rather than hang them
                log.exception("recording a group of %d upload(s) failed", len(group))
                for p in (*group, *(waiting[0] if waiting else ())):
                    p.error = p.error or e
                plan = None
            if waiting is not None:
                self._finish(waiting[0])
            waiting = None
            if plan is not None:
                self.durability.touch(plan.touched)
                later = [p for p in group if p.error is None and p.result is not None and p.result.completed]
                self._finish([p for p in group if p not in later])
                if later or plan.removed:
                    waiting = (later, plan)
            else:
                self._finish(group)

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
        """One transaction for ``live``; None if it could not be made (each has its error)."""
        for attempt in range(3):
            plan = Plan()
            try:
                with self.db.write_sync() as conn:
                    self.ledger.apply(conn, live, plan)
            except MoveFailed as f:  # rolled back: try again without that request
                plan.undo()
                self._fail([f.pending], self._mapped(f.error, "moving the upload into place"))
                live.remove(f.pending)
                if not live:
                    return None
                continue
            except IntegrityError:  # another process made the same file row meanwhile
                plan.undo()
                if attempt == 2:
                    raise
                continue
            except Exception as e:
                plan.undo()
                self._fail(live, self._mapped(e, "recording the upload"))
                return None
            self.groups += 1
            for path in plan.discard:
                remove(path)
            return plan
        return None

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
