"""Several processes on one PostgreSQL database, all real: ``scripts/run`` with
``FILEDROP_APP_PROCESSES=3`` and ``FILEDROP_WORKERS=2`` (3 app processes behind NGINX's
round-robin ``upstream``, 2 ``filedrop worker`` processes, each a child of the supervisor).

* 20 chunked uploads whose chunks land on different app processes (NGINX's access log names the
  process that answered each): every SHA-256 right, every file completed and assembled once.
* A 5,000-row job during which one worker and the app process that sends the callbacks are
  ``kill -9``'d: one page per row on disk, no temp left, one callback.
* A worker frozen while it holds rows: declared dead, the job ends without it, it publishes
  nothing once thawed.
* Caches of one process (open batches, API keys) do not outlive a change made through another.

(Two janitors at once: ``tests/test_admin_cleanup.py``, on both engines.)
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import create_engine, func, select, text

from server.db.job_models import JobRow, JobWorker
from server.db.locks import KINDS
from server.db.urls import sync_url
from tests.conftest import API_KEY
from tests.support.jobs import start_rows_job
from tests.support.server import REPO
from tests.support.uploads import upload_headers
from tests.support.waiting import free_port, free_ports_in_a_row, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600),
              pytest.mark.parametrize("database", ["postgresql"], indirect=True)]

AUTH = {"X-API-Key": API_KEY}
APPS, WORKERS = 3, 2
READY = "Ctrl-C stops them all"
FINISHED = ("Completed", "Completed with errors", "Cancelled", "Failed")


class Stack:
    """``scripts/run`` over a data dir and the test's PostgreSQL database (its own session, as a
    terminal would run it)."""

    def __init__(self, tmp_path: Path, database: str, **extra: str) -> None:
        self.data = tmp_path / "var"
        self.log = tmp_path / "run.log"
        self.http_port, self.app_port = free_port(), free_ports_in_a_row(APPS)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FILEDROP_")}
        env.update(FILEDROP_DATA_DIR=str(self.data), FILEDROP_HTTP_PORT=str(self.http_port),
                   FILEDROP_PAGE_PORT=str(free_port()),
                   FILEDROP_APP_PORT=str(self.app_port), FILEDROP_API_KEYS=API_KEY, FILEDROP_DATABASE_URL=database,
                   FILEDROP_APP_PROCESSES=str(APPS), FILEDROP_WORKERS=str(WORKERS), FILEDROP_JANITOR_INTERVAL="0",
                   FILEDROP_MIN_FREE_DISK="1M", FILEDROP_FETCH_ALLOW="127.0.0.1", FILEDROP_ALLOW_HTTP_CALLBACKS="1",
                   FILEDROP_CALLBACK_BACKOFF="0.2", FILEDROP_LOG_LEVEL="DEBUG")
        env.update({f"FILEDROP_{k.upper()}": v for k, v in extra.items()})
        self.database = database
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([str(REPO / "scripts" / "run")], cwd=REPO, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(self._up, timeout=180, interval=0.1, what=f"scripts/run (log: {self.log})")
        except BaseException:
            self.stop()
            raise

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"scripts/run exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
        return READY in self.log.read_text()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def children(self, what: str) -> list[int]:
        """Pids of the supervisor's children whose command line holds ``what``."""
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid), "-f", what], capture_output=True, text=True,
                             timeout=10).stdout.split()
        return [int(p) for p in out]

    def stop(self) -> None:
        """Ctrl-C, as a terminal sends it; KILL whatever is left past the bound."""
        if self.proc.poll() is not None:
            return
        kids = [int(p) for p in subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True,
                                               timeout=10).stdout.split()]
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            for pid in kids:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.kill()
            self.proc.wait(timeout=10)

    def access_log(self) -> list[str]:
        path = self.data / "nginx" / "logs" / "access.log"
        return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def stack(tmp_path: Path, database: str) -> Iterator[Any]:
    started: list[Stack] = []

    def start(**extra: str) -> Stack:
        s = Stack(tmp_path, database, **extra)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def _upload_chunk_major(base: str, batch_id: str, files: dict[int, bytes], chunk: int) -> None:
    """Chunk 0 of every file, then chunk 1 of every file, ... one request after the other on one
    connection: NGINX's round-robin hands request n to process n mod 3, so chunk i of file f
    goes to (20 i + f) mod 3, and each file's 6 chunks reach every process. (Four files sent at
    once, as this test first did, leave it to chance: all 6 chunks of one file on one process
    happened in a full run.)"""
    parts = {idx: [data[i:i + chunk] for i in range(0, len(data), chunk)] for idx, data in files.items()}
    with requests.Session() as http:
        for i in range(max(map(len, parts.values()))):
            for idx, data in files.items():
                h = upload_headers(f"f{idx}.bin", len(data), chunk=(i, len(parts[idx])))
                r = http.post(f"{base}/api/v1/upload/{batch_id}/{idx}", data=parts[idx][i], headers=h, timeout=60)
                assert r.status_code in (201, 202), (idx, i, r.status_code, r.text)


def test_20_files_round_robin_across_3_app_processes_each_assembled_once(stack: Any) -> None:
    s = stack()
    r = requests.post(f"{s.url}/api/v1/upload/", headers=AUTH, timeout=30)
    assert r.status_code == 201, r.text
    batch_id = r.json()["batchId"]
    chunk = 64 * 1024
    files = {idx: os.urandom(chunk * 5 + 1000 * idx + 1) for idx in range(20)}  # 6 chunks each
    _upload_chunk_major(s.url, batch_id, files, chunk)

    def infos() -> dict[int, Any] | None:
        got = {}
        for idx in files:
            r = requests.get(f"{s.url}/api/v1/upload/{batch_id}/{idx}", headers=AUTH, timeout=30)
            if r.status_code != 200 or not r.json()["complete"]:
                return None
            got[idx] = r.json()
        return got

    done = wait_until(infos, timeout=60, interval=0.2, what="all 20 files complete")
    for idx, data in files.items():
        assert done[idx]["sha256"] == hashlib.sha256(data).hexdigest(), idx
        assert int(done[idx]["size"]) == len(data)
    on_disk = [p for p in (s.data / "uploads").rglob("*.data")]
    assert sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in on_disk) == sorted(
        hashlib.sha256(d).hexdigest() for d in files.values())

    # Round-robin: each file's chunks were answered by more than one process, and all 3 served.
    ports = {str(p) for p in range(s.app_port, s.app_port + APPS)}
    chunk_line = re.compile(rf'"POST /api/v1/upload/{batch_id}/(\d+) HTTP/1.1" 20[12] .* upstream=127\.0\.0\.1:(\d+)$')

    def served() -> dict[int, list[str]] | None:
        by_file: dict[int, list[str]] = defaultdict(list)
        for line in s.access_log():
            if m := chunk_line.search(line):
                by_file[int(m.group(1))].append(m.group(2))
        return by_file if sum(map(len, by_file.values())) == 20 * 6 else None

    by_file = wait_until(served, timeout=30, what="NGINX's access log of the 120 chunks")  # flushed every 2 s
    assert set().union(*by_file.values()) == ports, by_file
    assert all(len(set(up)) > 1 for up in by_file.values()), by_file

    # Assembled once: each file was completed by exactly one process (DEBUG lines of all three),
    # and none began assembling a file twice.
    log = s.log.read_text()
    completed = Counter(re.findall(rf"file (\d+) of batch {batch_id} complete", log))
    assert len(completed) == 20 and set(completed.values()) == {1}, completed
    assembling = Counter(re.findall(rf"assembling file (\d+) of batch {batch_id}\b", log))
    assert all(n == 1 for n in assembling.values()), assembling
    assert "Traceback" not in log


class _Receiver(http.server.ThreadingHTTPServer):
    """A callback receiver on 127.0.0.1: records every POST, answers 204."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.posts.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


def _status(s: Stack, batch_id: str, job_id: str) -> dict[str, Any] | None:
    """The job's status, or None while the process NGINX picked is going down or restarting."""
    try:
        r = requests.get(f"{s.url}/api/batch/{batch_id}/{job_id}/status", headers=AUTH, timeout=30)
    except requests.ConnectionError:
        return None
    return r.json() if r.status_code == 200 else None


def _notifier_pid(database: str) -> int | None:
    """The app process holding the ``notifier`` lock (the one that sends callbacks): its lock
    connection's client port, found among this host's sockets."""
    engine = create_engine(sync_url(database))
    try:
        with engine.connect() as c:
            port = c.execute(text("SELECT a.client_port FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                                  "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = :k"),
                             {"k": KINDS["notifier"]}).scalar()
    finally:
        engine.dispose()
    if port is None:
        return None
    out = subprocess.run(["ss", "-Htnp", "state", "established", f"( sport = :{port} )"], capture_output=True,
                         text=True, timeout=10).stdout
    m = re.search(r"pid=(\d+)", out)
    return int(m.group(1)) if m else None


def test_5000_row_job_survives_kill_9_of_a_worker_and_an_app_process(stack: Any, database: str) -> None:
    s = stack()
    receiver = _Receiver()
    try:
        n = 5000
        # Who to kill is looked up first: between the first 300 pages and the kills the job
        # must not end (on a loaded machine these lookups took long enough once).
        workers = wait_until(lambda: w if len(w := s.children("server worker")) == WORKERS else None,
                             timeout=30, what=f"{WORKERS} workers")
        notifier = wait_until(lambda: _notifier_pid(database), timeout=30, what="the notifier lock's holder")
        apps = s.children("server serve")
        assert notifier in apps, (notifier, apps)
        job_id = start_rows_job(s.url, "big", n, callback_url=receiver.url)
        out_dir = s.data / "smartlinks" / "big"

        def pages() -> int:
            return sum(1 for p in out_dir.iterdir() if p.name.endswith(".html")) if out_dir.exists() else 0

        wait_until(lambda: pages() >= 300, timeout=120, interval=0.05, what="the first 300 pages")
        assert s.children("server worker") == workers and _notifier_pid(database) == notifier
        os.kill(workers[0], signal.SIGKILL)
        os.kill(notifier, signal.SIGKILL)
        at_kill = pages()
        assert at_kill < n, "the job ended before the kills: make it longer"

        end = wait_until(lambda: (st := _status(s, "big", job_id)) and st["status"] in FINISHED and st,
                         timeout=300, interval=0.2, what=f"job {job_id} to end (log: {s.log})")
        assert end["status"] == "Completed", end
        text_log = s.log.read_text()
        assert "worker 1 was killed by SIGKILL" in text_log or "worker 2 was killed by SIGKILL" in text_log
        assert re.search(r"app process \d \(port \d+\) was killed by SIGKILL", text_log), text_log[-3000:]
        # Both were restarted by the supervisor, alone (the others ran on).
        wait_until(lambda: len(re.findall(r"(app process \d \(port \d+\)|worker \d) is back \(pid",
                                          s.log.read_text())) == 2, timeout=60, what="both killed processes back")

        r = requests.get(f"{s.url}/api/batch/big/{job_id}/result", headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        result = r.json()["rows"]
        assert len(result) == n and {x["status"] for x in result} == {"succeeded"}, Counter(x["status"] for x in result)
        names = [x["url"].rsplit("/", 1)[1] for x in result]
        assert len(set(names)) == n
        # Exactly one file per row, each with its row's page; a killed worker's temps are gone.
        wait_until(lambda: sorted(p.name for p in out_dir.iterdir()) == sorted(names), timeout=60,
                   what="one page per row and no temp file")
        for x in result[:: n // 50]:
            page = (out_dir / x["url"].rsplit("/", 1)[1]).read_text()
            assert f"<p>{int(x['reference_id'][3:])}</p>" in page, (x, page)

        # One callback: wait until it is recorded as sent, then stop every process (nothing can
        # send later) and count.
        wait_until(lambda: receiver.posts, timeout=60, what="the callback")
        s.stop()
        assert len(receiver.posts) == 1, receiver.posts
        assert receiver.posts[0]["job_id"] == job_id and receiver.posts[0]["status"] == "Completed"
        assert receiver.posts[0]["succeededCount"] == n
    finally:
        receiver.close()


def _claimed_by_pid(database: str, job_id: str) -> dict[int, int]:
    """{worker pid: rows of ``job_id`` it holds claimed}."""
    engine = create_engine(sync_url(database))
    try:
        with engine.connect() as c:
            got = c.execute(select(JobWorker.pid, func.count()).join(JobRow, JobRow.claimed_by == JobWorker.worker_id)
                            .where(JobRow.job_id == job_id, JobRow.status == "claimed").group_by(JobWorker.pid))
            return {int(pid): int(n) for pid, n in got}
    finally:
        engine.dispose()


def _freeze_a_worker_holding_rows(s: Stack, job_id: str) -> int:
    """SIGSTOP a worker at a moment it holds claimed rows of the job (checked once it is
    stopped: one that had just recorded its claim is thawed and another moment tried)."""
    for _ in range(50):
        held = wait_until(lambda: _claimed_by_pid(s.database, job_id), timeout=30, interval=0.02,
                          what="a worker holding rows")
        pid = next(iter(held))
        os.kill(pid, signal.SIGSTOP)
        if _claimed_by_pid(s.database, job_id).get(pid):
            return pid
        os.kill(pid, signal.SIGCONT)
    raise AssertionError("no worker was caught holding rows in 50 tries")


def test_a_stalled_worker_declared_dead_publishes_nothing_after_the_job_ended(stack: Any) -> None:
    """A worker frozen (SIGSTOP) while it holds rows: after 20 s the other worker hands its rows
    back and the job completes without it; thawed, it must not rename a page it rendered before:
    every page keeps the inode it had when the job ended, no temp is left. (Its lease and the
    job's state both stop it here; the lease alone covers a stall between that check and the
    renames, a window this test cannot aim at.)"""
    s = stack()
    n = 3000
    job_id = start_rows_job(s.url, "stall", n)
    out_dir = s.data / "smartlinks" / "stall"
    wait_until(lambda: out_dir.exists() and sum(1 for _ in out_dir.iterdir()) >= 200, timeout=120, interval=0.02,
               what="the first 200 pages")
    frozen = _freeze_a_worker_holding_rows(s, job_id)
    try:
        end = wait_until(lambda: (st := _status(s, "stall", job_id)) and st["status"] in FINISHED and st,
                         timeout=120, interval=0.2, what=f"job {job_id} to end without the frozen worker")
        assert end["status"] == "Completed" and end["succeededCount"] == n, end
        inodes = {p.name: p.stat().st_ino for p in out_dir.iterdir()}
        assert len(inodes) == n and all(name.endswith(".html") for name in inodes)
    finally:
        os.kill(frozen, signal.SIGCONT)
    wait_until(lambda: "was declared dead (no heartbeat for 20 s)" in s.log.read_text(), timeout=30,
               what="the thawed worker to find itself declared dead")
    assert {p.name: p.stat().st_ino for p in out_dir.iterdir()} == inodes


def test_what_one_process_remembers_does_not_outlive_a_change_made_through_another(stack: Any) -> None:
    """Each app process keeps caches (open batches, API keys): a batch dropped through one is
    refused by the others at once, and a key revoked by ``filedrop keys revoke`` stops working
    on every process within the keys' cache bound (5 s)."""
    s = stack()
    direct = [f"http://127.0.0.1:{p}" for p in range(s.app_port, s.app_port + APPS)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FILEDROP_")}
    env.update(FILEDROP_DATA_DIR=str(s.data), FILEDROP_DATABASE_URL=s.database)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "server", *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=60)

    # A batch every process has seen (its cache says open), dropped through the first.
    r = requests.post(f"{direct[0]}/api/v1/upload/", headers=AUTH, timeout=30)
    batch_id = r.json()["batchId"]
    for i, url in enumerate(direct):
        h = upload_headers(f"f{i}.bin", 3)
        assert requests.post(f"{url}/api/v1/upload/{batch_id}/{i}", data=b"abc", headers=h,
                             timeout=30).status_code == 201
    assert requests.delete(f"{direct[0]}/api/v1/upload/{batch_id}", headers=AUTH, timeout=30).status_code in (200, 204)
    for i, url in enumerate(direct[1:], 1):
        r = requests.post(f"{url}/api/v1/upload/{batch_id}/{i + 10}", data=b"abc",
                          headers=upload_headers("late.bin", 3), timeout=30)
        assert r.status_code == 404 and r.json()["code"] == "ERR_BATCH_NOT_FOUND", (url, r.status_code, r.text)
    assert not list((s.data / "uploads").rglob("*.data"))  # nothing of the dropped batch came back

    # A key every process has accepted (cached), revoked from the command line.
    made = cli("keys", "create", "carol")
    assert made.returncode == 0, made.stderr
    key = {"X-API-Key": made.stdout.strip()}
    for url in direct:
        assert requests.get(f"{url}/api/v1/upload/handlers", headers=key, timeout=30).status_code == 200
    assert cli("keys", "revoke", "carol").returncode == 0
    revoked_at = time.monotonic()
    wait_until(lambda: all(requests.get(f"{url}/api/v1/upload/handlers", headers=key, timeout=30).status_code == 401
                           for url in direct), timeout=30, interval=0.1, what="every process to refuse the key")
    took = time.monotonic() - revoked_at
    assert took < 5.0 + 2.0, f"the revoked key worked {took:.1f} s on (bound: 5 s, plus 2 s of headroom)"
