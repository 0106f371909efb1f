"""The workers ``filedrop serve`` runs: ``FILEDROP_WORKERS`` ``filedrop worker`` processes,
started with the first job (at boot if jobs are waiting), each replaced when it dies.

Invariants:
* The pool holds no job state: it only keeps processes alive. Jobs live in the database, so a
  worker started here and one started by hand on another host are alike.
* A worker that exits is forgotten at once (its claimed rows go back to the queue, its temp
  files go) instead of after the heartbeat timeout, then replaced, with a backoff that grows
  while replacements keep dying young.
* The workers die with the server (PR_SET_PDEATHSIG: SIGTERM); ``stop`` sends SIGTERM, gives
  them ``STOP_TIMEOUT`` s to hand their rows back, then kills what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sys
import time

from server.config import Settings
from server.db import Database, log_failure
from server.jobs import control, queries
from server.jobs.childproc import ROOT

log = logging.getLogger("filedrop.jobs.pool")

STOP_TIMEOUT = 5.0  # SIGTERM -> exit; a worker needs well under a second (STOP_GRACE at worst)
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 10.0
HEALTHY_AFTER = 30.0  # a worker that ran this long resets the backoff


class WorkerPool:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        self.procs: dict[str, asyncio.subprocess.Process] = {}  # worker id -> process
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        env = {k: v for k, v in os.environ.items() if not k.startswith("FILEDROP_")}
        self._env = {**env, **settings.to_env()}

    @property
    def started(self) -> bool:
        return bool(self._tasks)

    def ensure_started(self) -> None:
        """Start the workers if they are not running yet (idempotent)."""
        if self._tasks or self._stopping:
            return
        for slot in range(self.settings.workers):
            self._tasks.add(asyncio.create_task(self._keep(slot), name=f"worker-slot-{slot}"))
        log.info("starting %d worker(s)", self.settings.workers)

    async def wake(self) -> None:
        """Tell idle workers to look for work now (a job was queued). Only those that have
        registered: before that, SIGUSR1 would still have its default action (terminate)."""
        if not self.procs:
            return
        ready = {w.worker_id for w in await queries.workers(self.db)}
        for worker_id, proc in list(self.procs.items()):
            if worker_id in ready and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGUSR1)

    async def _keep(self, slot: int) -> None:
        backoff = BACKOFF_FIRST
        while not self._stopping:
            worker_id = secrets.token_hex(8)
            began = time.monotonic()
            try:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "server", "worker", "--id", worker_id, "--parent", str(os.getpid()),
                    cwd=ROOT, env=self._env)
            except OSError as e:
                log.error("cannot start a worker: %s", e)
            else:
                self.procs[worker_id] = proc
                try:
                    code = await proc.wait()
                finally:
                    del self.procs[worker_id]
                try:
                    await control.forget_worker(self.db, self.settings, worker_id)
                except Exception as e:  # its heartbeat will go stale: the other workers hand them back
                    log_failure(log, "could not hand back the rows of worker %s", e, worker_id)
                if self._stopping:
                    return
                log.warning("worker %s (slot %d, pid %d) exited with status %s; starting another", worker_id, slot,
                            proc.pid, code)
            backoff = BACKOFF_FIRST if time.monotonic() - began > HEALTHY_AFTER else min(backoff * 2, BACKOFF_MAX)
            await asyncio.sleep(backoff)  # restart backoff: a worker that dies at once must not spin

    def signal_stop(self) -> None:
        """Begin stopping (SIGTERM to every worker) without waiting: the server's shutdown
        calls this first, so workers stop while the server drains its requests."""
        self._stopping = True
        for proc in list(self.procs.values()):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()

    async def stop(self) -> None:
        """Stop every worker: SIGTERM, ``STOP_TIMEOUT`` s, then SIGKILL."""
        self.signal_stop()
        procs = list(self.procs.values())
        if procs:
            _done, slow = await asyncio.wait([asyncio.create_task(p.wait()) for p in procs], timeout=STOP_TIMEOUT)
            if slow:
                log.warning("%d worker(s) still running %.0f s after SIGTERM: killing them", len(slow), STOP_TIMEOUT)
                for p in procs:
                    if p.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            p.kill()
        # Each slot now hands its worker's rows back; one sleeping in a restart backoff is cancelled.
        if self._tasks:
            _done, idle = await asyncio.wait(self._tasks, timeout=2.0)
            for t in idle:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
