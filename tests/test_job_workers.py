"""Workers as real processes beside a real server: a cancel stops a row mid-render, a worker
killed with SIGKILL is replaced and its rows done exactly once, SIGTERM stops everything within
10 s whatever the templates do (a worker also while the database's writer is held elsewhere),
counts move as rows complete, the final log line counts skipped rows, ``started`` is when the
start was accepted. A worker and its render process agree on which templates are compiled, and a
render process's answers for a claim that ended are never read as another job's."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests

from server.app import create_app
from server.config import Settings
from server.db import Database
from server.janitor import drop_smartlink_batch
from server.jobs import queries
from server.jobs.fetch import Fetcher
from server.jobs.queries import Claimed
from server.jobs.runner import RowRunner
from server.jobs.worker import LoadedJob, Worker
from tests.support.jobs import add_running_job, get_json, rows, start_ok, wait_job
from tests.support.live import (
    AUTH,
    FINISHED,
    get,
    published,
    server_with_bystander,
    start,
    wait_end,
)
from tests.support.server import ServerProcess
from tests.support.waiting import wait_until
from tests.test_job_resume import alive, descendants

NEVER = {"body": "{% if data.spin %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                 "{% endfor %}{% endif %}<p>{{ data.n }}</p>"}
# About 0.05-0.2 s of sandboxed looping per row (machine-dependent): rows complete one by one.
SLOW = {"body": "{% for i in range(10) %}{% for j in range(100000) %}{% endfor %}{% endfor %}<p>{{ data.n }}</p>"}


@pytest.fixture
def attacked(server_factory, tmp_path: Path):  # type: ignore[no-untyped-def]
    return server_with_bystander(server_factory, tmp_path, 10.0)


def checker_busy(server_pid: int) -> bool:
    """The server's template checker (its own render process) holds over 100 MB."""
    from tests.test_job_resume import children

    for pid in children(server_pid):
        try:
            if "server.jobs.child" in Path(f"/proc/{pid}/cmdline").read_text():
                rss = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                           if line.startswith("VmRSS:"))
                return int(rss.split()[1]) > 100 << 10
        except (OSError, StopIteration):
            continue
    return False


def _try(fn, *args):  # type: ignore[no-untyped-def]
    try:
        return fn(*args)
    except requests.RequestException as e:
        return e


def db(srv: ServerProcess) -> sqlite3.Connection:
    return sqlite3.connect(Path(srv.env["FILEDROP_DATA_DIR"]) / "filedrop.sqlite3")


def workers(srv: ServerProcess) -> dict[str, int]:
    with db(srv) as c:
        return dict(c.execute("SELECT worker_id, pid FROM job_workers"))


def row_states(srv: ServerProcess, job_id: str) -> dict[str, int]:
    with db(srv) as c:
        return dict(c.execute("SELECT status, count(*) FROM job_rows WHERE job_id=? GROUP BY status", (job_id,)))


def rendering(srv: ServerProcess, job_id: str, idx: int) -> bool:
    with db(srv) as c:
        row = c.execute("SELECT status FROM job_rows WHERE job_id=? AND idx=?", (job_id, idx)).fetchone()
    return row is not None and row[0] == "claimed"


@pytest.mark.slow
def test_cancel_of_a_row_that_never_ends_answers_cancelled_within_2s(attacked) -> None:
    srv, probe = attacked
    data = [{"reference_id": "spin", "suffix": "s" * 16, "data": {"spin": True, "n": 0}}]
    with probe:
        job = start(srv, "never", NEVER, data).json()
        wait_until(lambda: rendering(srv, job["job_id"], 0), timeout=60, what="the row to be rendering")
        assert srv.proc is not None
        procs = descendants(srv.proc.pid)
        t0 = time.monotonic()
        r = requests.post(f"{srv.url}/api/batch/never/{job['job_id']}/cancel", headers=AUTH, timeout=30)
        took = time.monotonic() - t0
        wait_until(lambda: len(probe.latencies) >= 20, timeout=30, what="20 probe calls")
    probe.check()
    body = r.json()
    assert r.status_code == 200 and body["status"] == "Cancelled", body
    assert took < 2.0, f"cancel answered after {took:.2f} s"
    assert (body["succeededCount"], body["erroredCount"]) == (0, 0)
    # The render process that was at it is dead (killed, not asked): nothing of the job can
    # be written any more; the folder stays empty and the row skipped.
    now = set(descendants(srv.proc.pid))
    assert any(p not in now for p in procs), "no render process was killed"
    assert not any(alive(p) for p in procs if p not in now)
    assert published(srv, "never") == []
    assert row_states(srv, job["job_id"]) == {"skipped": 1}
    log = get(srv, f"/api/batch/never/{job['job_id']}/log")["log"]
    assert log[-1]["message"] == "Cancelled: 0 succeeded, 0 errored, 1 skipped of 1 (cancelled by request)"


@pytest.mark.slow
def test_a_worker_killed_mid_row_is_replaced_and_every_row_done_once(server_factory) -> None:
    srv = server_factory(workers="2")
    n = 300
    job = start(srv, "kill9", SLOW, rows(n)).json()
    jid = job["job_id"]
    wait_until(lambda: get(srv, f"/api/batch/kill9/{jid}/status")["succeededCount"] >= 5, timeout=60,
               what="some rows done")
    before = workers(srv)
    with db(srv) as c:
        holder = c.execute("SELECT claimed_by FROM job_rows WHERE job_id=? AND status='claimed' LIMIT 1",
                           (jid,)).fetchone()
    assert holder is not None, "no row was being rendered"
    os.kill(before[holder[0]], signal.SIGKILL)
    wait_until(lambda: holder[0] not in workers(srv) and len(workers(srv)) == 2, timeout=30,
               what="the killed worker to be replaced")
    done = wait_end(srv, "kill9", jid, timeout=120)
    assert (done["status"], done["succeededCount"], done["erroredCount"]) == ("Completed", n, 0), done
    assert published(srv, "kill9") == [f"ref{i:06d}.s{i:020d}.html" for i in range(n)]  # no temps either
    assert row_states(srv, jid) == {"done": n}
    with db(srv) as c:  # handed back without an attempt: the worker died, not the row
        assert c.execute("SELECT max(attempts) FROM job_rows WHERE job_id=?", (jid,)).fetchone()[0] == 0


@pytest.mark.slow
def test_sigterm_stops_the_server_and_its_workers_within_10s(server_factory) -> None:
    srv = server_factory(workers="2")
    data = [{"reference_id": f"spin{i}", "suffix": "s" * 16, "data": {"spin": True, "n": i}} for i in range(2)]
    job = start(srv, "term", NEVER, data).json()
    wait_until(lambda: rendering(srv, job["job_id"], 0) and rendering(srv, job["job_id"], 1), timeout=60,
               what="both rows to be rendering")
    # And a start whose template takes seconds to compile (Jinja2 folds 300 MB of constants
    # into code) is being checked when the signal comes.
    slow = {"body": "{{ 'x' | center(150000000) ~ 'y' | center(150000000) }}"}
    checking: dict[str, object] = {}
    t = threading.Thread(target=lambda: checking.update(r=_try(start, srv, "slowcheck", slow, [])), daemon=True)
    t.start()
    assert srv.proc is not None
    wait_until(lambda: checker_busy(srv.proc.pid), timeout=30, what="the checker to be compiling it")
    procs = descendants(srv.proc.pid)  # two workers, two render processes, the checker
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    srv.proc.wait(timeout=10)
    assert time.monotonic() - t0 < 10
    t.join(timeout=10)
    r = checking["r"]
    assert not isinstance(r, requests.Response) or r.status_code == 503, r  # or the connection closed
    wait_until(lambda: not any(alive(p) for p in procs), timeout=5, what="workers and render processes to exit")
    # The workers handed their rows back (not killed by a limit: no attempt counted).
    assert row_states(srv, job["job_id"]) == {"pending": 2}
    with db(srv) as c:
        assert c.execute("SELECT count(*) FROM job_workers").fetchone()[0] == 0
        assert c.execute("SELECT max(attempts) FROM job_rows").fetchone()[0] == 0
    # A shutdown is no fault: no traceback and no ERROR line from the server or its workers
    # (its loops and the workers' are cancelled, maybe mid-query: test_db_writer.py covers that moment).
    log = srv.log_path.read_text()
    assert "Traceback" not in log and " ERROR " not in log, log


@pytest.mark.slow
def test_counts_move_per_row_and_the_last_log_line_counts_skipped_rows(server_factory) -> None:
    srv = server_factory(workers="1")
    accepted = datetime.now(UTC).replace(tzinfo=None)
    r = start(srv, "progress", SLOW, rows(300))
    job = r.json()
    jid = job["job_id"]
    # `started`: the time the start was accepted, in the start's own answer (seed 000).
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", job["started"]), job
    started = datetime.strptime(job["started"], "%Y-%m-%dT%H:%M:%S.%fZ")
    assert abs((started - accepted).total_seconds()) < 5
    # Once rows complete (a worker is spawned with the first job: seconds on a loaded machine),
    # the count moves at least once a second while rows complete: each move is waited for with
    # a 1 s deadline, four times (or until the job ends).
    wait_until(lambda: get(srv, f"/api/batch/progress/{jid}/status")["succeededCount"] > 0, timeout=60,
               what="the first row done")

    def count() -> int | None:
        s = get(srv, f"/api/batch/progress/{jid}/status")
        return s["succeededCount"] if s["status"] in ("Queued", "In progress") else None

    def moved(last: int) -> tuple[str, int | None] | None:
        c = count()
        return ("ended", None) if c is None else (("moved", c) if c != last else None)

    last = count()
    assert last is not None
    moves: list[int] = []
    while len(moves) < 4:
        kind, value = wait_until(lambda last=last: moved(last), timeout=1.0, interval=0.02,
                                 what=f"the count to move from {last} (at least once a second)")
        if kind == "ended" or value is None:
            break
        moves.append(value)
        last = value
    assert len(moves) >= 3, moves
    assert any(c < 50 for c in moves), f"counts moved only in big steps: {moves}"
    r = requests.post(f"{srv.url}/api/batch/progress/{jid}/cancel", headers=AUTH, timeout=30)
    body = r.json()
    assert body["status"] == "Cancelled", body
    assert body["started"] == job["started"]
    result = get(srv, f"/api/batch/progress/{jid}/result")["rows"]
    skipped = sum(x["status"] == "skipped" for x in result)
    assert skipped == 300 - body["succeededCount"] > 0
    log = get(srv, f"/api/batch/progress/{jid}/log")["log"]
    assert log[-1]["message"] == (f"Cancelled: {body['succeededCount']} succeeded, 0 errored, {skipped} skipped "
                                  "of 300 (cancelled by request)")
    assert body["status"] in FINISHED


@pytest.mark.slow
def test_a_worker_started_on_its_own_shares_the_work(server_factory) -> None:
    """`filedrop worker` by hand (as on another host: same database and data dir) claims rows
    beside the server's own worker, and stops on SIGTERM handing its rows back."""
    import subprocess
    import sys

    from tests.support.server import REPO

    srv = server_factory(workers="1")
    n = 300
    jid = start(srv, "shared", SLOW, rows(n)).json()["job_id"]
    wait_until(lambda: len(workers(srv)) == 1, timeout=30, what="the server's worker")
    own = set(workers(srv))
    extra = subprocess.Popen([sys.executable, "-m", "server", "worker"], cwd=REPO, env=srv.env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def helped() -> bool:
            with db(srv) as c:
                by = {w for (w,) in c.execute("SELECT DISTINCT claimed_by FROM job_rows WHERE job_id=? AND "
                                              "status='claimed'", (jid,))}
            return bool(by - own - {None})
        wait_until(helped, timeout=60, what="the worker started by hand to claim rows")
        extra.send_signal(signal.SIGTERM)
        assert extra.wait(timeout=10) == 0
    finally:
        if extra.poll() is None:
            extra.kill()
            extra.wait(timeout=10)
    assert set(workers(srv)) == own  # it deregistered
    done = wait_end(srv, "shared", jid, timeout=120)
    assert (done["status"], done["succeededCount"]) == ("Completed", n)
    assert published(srv, "shared") == [f"ref{i:06d}.s{i:020d}.html" for i in range(n)]


@pytest.mark.slow
def test_a_worker_stopped_while_the_database_is_locked_exits_within_10s(server_factory) -> None:
    """SIGTERM while another process holds SQLite's writer (busy_timeout 10 s, and every write
    the worker still has to make waits for it): the worker exits within the 10 s promise
    anyway, and what it held is done exactly once after it is gone."""
    srv = server_factory(workers="1")
    n = 60  # a first claim (16 rows) held at the SIGTERM, and rows left for the next worker
    jid = start(srv, "locked", SLOW, rows(n)).json()["job_id"]
    wait_until(lambda: row_states(srv, jid).get("claimed", 0) > 0 and len(workers(srv)) == 1, timeout=60,
               what="the worker to hold rows")
    (pid,) = workers(srv).values()
    with db(srv) as c:
        c.execute("BEGIN IMMEDIATE")  # the writer, held until the worker has exited
        os.kill(pid, signal.SIGTERM)
        t0 = time.monotonic()
        wait_until(lambda: not alive(pid), timeout=30, interval=0.05, what="the worker to exit")
        took = time.monotonic() - t0
        c.rollback()
    assert took < 10, f"the worker exited {took:.1f} s after SIGTERM"
    done = wait_end(srv, "locked", jid, timeout=120)
    assert (done["status"], done["succeededCount"], done["erroredCount"]) == ("Completed", n, 0), done
    assert published(srv, "locked") == [f"ref{i:06d}.s{i:020d}.html" for i in range(n)]  # no temps either


async def test_a_long_job_between_short_ones_stays_compiled_in_the_render_process(settings: Settings,
                                                                                 tmp_path: Path) -> None:
    """A worker mirrors the templates its render process keeps (the 4 used last) and sends rows
    without the template to a process that has it. One long job served between short ones
    (L S1 S2 S3 L S4 L) must be the same "used last" on both sides: the process dropped L for S4
    while the worker, which had seen L used again, still counted it compiled, sent L's rows alone,
    and the process died of it (its first row blamed for the crash)."""
    db = Database(settings.database)
    fetcher = Fetcher(("127.0.0.1",), 5, 1 << 20)
    worker = Worker(db, settings, fetcher, None, "w-kept-templates")
    try:
        jobs = {name: LoadedJob(f"job-{name}", f"batch-{name}", "owner", None, "smallest",
                                json.dumps({"body": f"<p>{name} {{{{ data.n }}}}</p>"}), "{}", tmp_path)
                for name in ("L", "S1", "S2", "S3", "S4")}
        pids = set()
        for n, name in enumerate(["L", "S1", "S2", "S3", "L", "S4", "L"]):
            child = await worker.child_for(jobs[name])
            pids.add(child.pid)
            await child.send_rows(jobs[name].job_id, [Claimed(n, f"r{n}", "s" * 16, None, json.dumps({"n": n}), 0)])
            header, blobs = await child.recv(30)
            assert [(a["idx"], a["status"]) for a in header["answers"]] == [(n, "done")], header
            assert f"<p>{name} {n}</p>".encode() in blobs[0]
        assert len(pids) == 1  # one render process served them all: none died
    finally:
        await worker.drop_child()
        await fetcher.close()
        await db.dispose()


async def test_a_claim_whose_job_was_dropped_leaves_no_answer_for_the_next_job(aiohttp_client,
                                                                              settings: Settings) -> None:
    """``drop --smartlinks --force`` ends a job and removes it while a worker renders a claim of
    it. The worker learns it when it records a group (here: errored rows of a max_errors job,
    recorded at once); the rest of the claim must not render on. Its render process is killed,
    and the worker's next job is compiled and rendered as usual (the process's answers for the
    dropped job were read as the next job's compile reply, and that job was marked Failed:
    "the template cannot be compiled: None")."""
    settings = settings.replace(workers=0)  # this test's worker is the only one
    client = await aiohttp_client(create_app(settings))
    dropped = (await start_ok(client, "dropped", {"body": "{{ data.x.y }}"}, rows(300), max_errors=1000))["job_id"]
    after = (await start_ok(client, "after", {"body": "<p>{{ data.n }}</p>"}, rows(3)))["job_id"]
    db = Database(settings.database)
    fetcher = Fetcher(("127.0.0.1",), 5, 1 << 20)
    worker = Worker(db, settings, fetcher, None, "w-dropped-under-it")
    try:
        await queries.register_worker(db, worker.id, worker.host, os.getpid())
        job = await worker._load(dropped)
        assert job is not None
        pid = (await worker.child_for(job)).pid  # warm, as a busy worker's process is
        claim = await queries.claim_rows(db, dropped, worker.id, 300)
        assert len(claim) == 300
        await drop_smartlink_batch(db, settings, "dropped", force=True, cancel_wait=0)
        await RowRunner(worker, job, claim).run()  # its first group of answers meets the job gone
        assert not alive(pid), "the render process of the dropped job's claim renders on"
        assert await worker._serve(after)
        done = await wait_job(client, "after", after)
        assert (done["status"], done["succeededCount"]) == ("Completed", 3), done
        assert [r["status"] for r in (await get_json(client, f"/api/batch/after/{after}/result"))["rows"]] == \
            ["succeeded"] * 3
    finally:
        await worker.drop_child()
        await fetcher.close()
        await db.dispose()


async def test_a_compile_reply_is_the_answer_to_its_own_request(settings: Settings, tmp_path: Path) -> None:
    """Should a render process still owe answers of another claim when the worker asks it to
    compile a job's template, those answers are no reply to that: the worker drops the process
    and raises (its caller hands the claim back, as for any fault of ours) instead of ending the
    job as Failed with "the template cannot be compiled: None"."""
    db = Database(settings.database)
    fetcher = Fetcher(("127.0.0.1",), 5, 1 << 20)
    worker = Worker(db, settings, fetcher, None, "w-stale-answers")
    try:
        one, two = (LoadedJob(f"job-{n}", f"batch-{n}", "owner", None, "smallest",
                              json.dumps({"body": "<p>{{ data.n }}</p>"}), "{}", tmp_path) for n in (1, 2))
        child = await worker.child_for(one)
        await child.send_rows(one.job_id, [Claimed(i, f"r{i}", "s" * 16, None, json.dumps({"n": i}), 0)
                                           for i in range(3)])  # answered, never read
        with pytest.raises(RuntimeError, match="job-2"):  # not JobUnrenderable: the job is not at fault
            await worker.child_for(two)
        assert worker.child is None and not alive(child.pid)
        assert (await worker.child_for(two)).alive  # a fresh process compiles it
    finally:
        await worker.drop_child()
        await fetcher.close()
        await db.dispose()


def test_a_worker_in_another_pid_namespace_of_this_host_is_not_taken_for_dead(server_factory, tmp_path) -> None:
    """A worker in a container on this host that shares its host name (host networking) and its
    boot id, but not its process ids: a pid of one means nothing to the other, so neither may
    judge the other gone by it. Before, each declared the other's workers gone at every look
    (every 2 s, for ever): rows taken back mid-render, a WARNING pair each time."""
    import shutil
    import subprocess
    import sys

    from server.jobs.worker import HEARTBEAT, REAP_EVERY
    from tests.support.server import REPO

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a PID namespace of its own needs root and unshare(1)")
    srv = server_factory(workers="1")
    first = start(srv, "first", SLOW, rows(2)).json()["job_id"]  # the server's worker starts with it
    assert wait_end(srv, "first", first)["status"] == "Completed"
    own = set(workers(srv))
    assert len(own) == 1
    out = tmp_path / "contained.log"
    with open(out, "wb") as log:
        contained = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable, "-m", "server",
                                      "worker"], cwd=REPO, env=srv.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        def looked() -> bool:  # its heartbeats went on past a periodic look for dead workers
            with db(srv) as c:
                got = c.execute("SELECT started_at, seen_at FROM job_workers WHERE worker_id <> ?",
                                tuple(own)).fetchone()
            if got is None:
                return False
            began, seen = (datetime.fromisoformat(t) for t in got)
            return (seen - began).total_seconds() >= REAP_EVERY + HEARTBEAT
        wait_until(looked, timeout=60, interval=0.1, what="the contained worker to look for dead workers")
        jid = start(srv, "both", {"body": "<p>{{ data.n }}</p>"}, rows(200)).json()["job_id"]
        done = wait_end(srv, "both", jid)
        assert (done["status"], done["succeededCount"]) == ("Completed", 200)
        assert len(published(srv, "both")) == 200
    finally:
        # The worker itself (unshare's child, pid 1 of its namespace) stops on SIGTERM; unshare
        # then exits with it.
        for pid in Path(f"/proc/{contained.pid}/task/{contained.pid}/children").read_text().split():
            os.kill(int(pid), signal.SIGTERM)
        try:
            contained.wait(timeout=15)
        except subprocess.TimeoutExpired:
            contained.kill()
            contained.wait(timeout=10)
    logs = srv.log_path.read_text() + out.read_text()
    assert "started" in out.read_text(), out.read_text()[-2000:]
    assert "is gone" not in logs and "declared dead" not in logs, [
        line for line in logs.splitlines() if "is gone" in line or "declared dead" in line][:4]


@pytest.mark.parametrize("database", ["sqlite", "postgresql"], indirect=True)
async def test_a_dead_workers_temp_files_are_gone_before_its_rows_go_back(settings: Settings) -> None:
    """A worker that died mid-publish left temp files beside the pages; once its rows are back in
    the queue another worker may finish the job at once, and a job that ended has no temp file
    left (``test_scale_out``'s frozen worker: the job was Completed while the dead worker's
    temp was still being removed). So its temps go first, then its rows."""
    import asyncio

    from sqlalchemy import func, select

    from server.db.job_models import JobRow
    from server.jobs import control

    db = Database(settings.database)
    folder = settings.smartlink_root / "b"
    folder.mkdir(parents=True)
    for i in range(2000):  # a publish group's worth: their removal takes a while
        (folder / f".deadbeefdeadbeef.{i}.tmp").write_bytes(b"x")
    try:
        await add_running_job(db, "j1", "b", 3)
        await queries.register_worker(db, "deadbeefdeadbeef", "elsewhere", 1)
        assert len(await queries.claim_rows(db, "j1", "deadbeefdeadbeef", 3)) == 3
        both: list[int] = []
        watching, done = asyncio.Event(), asyncio.Event()

        async def watch() -> None:  # what another worker would see meanwhile (each read yields)
            while not done.is_set():
                async with db.read() as s:
                    pending = await s.scalar(select(func.count()).select_from(JobRow).where(JobRow.status == "pending"))
                temps = sum(1 for p in folder.iterdir() if p.name.endswith(".tmp"))
                if pending and temps:
                    both.append(temps)
                watching.set()

        watcher = asyncio.create_task(watch())
        await asyncio.wait_for(watching.wait(), timeout=10)
        assert await control.forget_worker(db, settings, "deadbeefdeadbeef") == [("j1", "b")]
        done.set()
        await watcher
        assert not both, f"rows back in the queue while {both[0]} temp file(s) of their dead worker were left"
        assert not list(folder.iterdir())
    finally:
        await db.dispose()


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_a_worker_whose_data_dir_is_not_the_shared_one_refuses_to_start(server_factory, tmp_path) -> None:
    """``FILEDROP_DATA_DIR=/srv/filedrop filedrop worker`` on a host where the shared data dir is
    not mounted (or a typo): its pages would go where no NGINX serves them, and their rows be
    marked done. Before, it made the folders itself and took its share of every job (846 pages
    of a 3,000-row job ended up there, the job Completed, those links 404). It exits with one
    line naming the setting instead, having made nothing; the job is done by the others."""
    import subprocess
    import sys

    from tests.support.server import REPO

    srv = server_factory(workers="1")
    first = start(srv, "first", SLOW, rows(2)).json()["job_id"]
    assert wait_end(srv, "first", first)["status"] == "Completed"  # pages were published in the data dir
    elsewhere = tmp_path / "not-mounted"
    env = {**srv.env, "FILEDROP_DATA_DIR": str(elsewhere)}
    lost = subprocess.run([sys.executable, "-m", "server", "worker"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert lost.returncode == 2, (lost.returncode, lost.stderr[-2000:])
    assert "FILEDROP_DATA_DIR" in lost.stderr and "Traceback" not in lost.stderr, lost.stderr[-2000:]
    assert not (elsewhere / "smartlinks").exists()
