"""PostgreSQL as the database (``FILEDROP_DATABASE_URL``): ``filedrop migrate`` and the at-head
check on it, an unreachable server named without its password, the settings of several app
processes, and NGINX's upstream over them. (The contract suites run on both engines: the
``engines`` marker; several real processes: ``tests/test_scale_out.py``.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server import nginx as ngx
from server.config import Settings
from server.db.migrate import head_revisions
from server.db.revision import current_revisions
from tests.conftest import API_KEY
from tests.support.jobs import add_running_job
from tests.support.server import REPO, server_env
from tests.support.waiting import free_port


def _run(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "server", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_serve_refuses_an_unmigrated_postgres_database_and_two_migrates_at_once_agree(
        tmp_path: Path, empty_database: str) -> None:
    database = empty_database
    env = server_env(tmp_path / "d", API_KEY, database_url=database)
    serve = _run(env, "serve")
    out, err = serve.communicate(timeout=60)
    assert serve.returncode == 2, (out, err)
    assert "filedrop migrate" in err and "is at revision none" in err, err
    assert "Traceback" not in err

    # Two hosts running `filedrop migrate` together: one migrates, the other finds it at head.
    procs = [_run(env, "migrate") for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert current_revisions(database) == head_revisions(database)
    assert all("Traceback" not in e for _o, e in outs), outs


def test_an_unreachable_postgres_server_is_named_without_its_password(tmp_path: Path) -> None:
    url = f"postgresql+asyncpg://filedrop:s3cret-pw@127.0.0.1:{free_port()}/filedrop"
    env = server_env(tmp_path / "d", API_KEY, database_url=url)
    for args in (("serve",), ("migrate",)):
        proc = _run(env, *args)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode != 0, (args, out, err)
        assert "s3cret-pw" not in out + err, (args, err)
        assert "127.0.0.1" in err and "Traceback" not in err, (args, err)


@pytest.mark.parametrize("env,named", [
    ({"FILEDROP_APP_PROCESSES": "2"}, "FILEDROP_APP_PROCESSES=2 needs PostgreSQL"),
    ({"FILEDROP_APP_PROCESSES": "0"}, "FILEDROP_APP_PROCESSES"),
    ({"FILEDROP_DATABASE_URL": "mysql://u:pw@h/db"}, "is not PostgreSQL"),
    ({"FILEDROP_DATABASE_URL": "postgresql+asyncpg://u:pw@h:5432/"}, "names no database"),
    ({"FILEDROP_DATABASE_URL": "postgresql://h/db", "FILEDROP_DATABASE_POOL": "1"}, "FILEDROP_DATABASE_POOL"),
    ({"FILEDROP_DATABASE_URL": "postgresql://h/db", "FILEDROP_APP_PROCESSES": "3",
      "FILEDROP_APP_PORT": "65534"}, "go past port 65535"),
])
def test_scale_out_settings_are_refused_naming_them(env: dict[str, str], named: str) -> None:
    with pytest.raises(ValueError, match=named) as e:
        Settings.from_env(env)
    assert "pw@" not in str(e.value)


def test_nothing_changes_without_the_new_settings(tmp_path: Path) -> None:
    s = Settings.from_env({"FILEDROP_DATA_DIR": str(tmp_path)})
    assert s.database == tmp_path / "filedrop.sqlite3" and s.app_processes == 1
    assert s.app_ports == (s.app_port,)
    servers = ngx.values(s)["APP_SERVERS"]
    assert servers == f"server 127.0.0.1:{s.app_port};"


def test_nginx_upstream_lists_every_app_process(tmp_path: Path) -> None:
    s = Settings.from_env({"FILEDROP_DATA_DIR": str(tmp_path), "FILEDROP_APP_PORT": "9101",
                           "FILEDROP_APP_PROCESSES": "3", "FILEDROP_DATABASE_URL": "postgresql://u@h/db"})
    conf = ngx.render(s, tmp_path / "p", listen=f"127.0.0.1:{free_port()}").read_text()
    upstream = conf.split("upstream filedrop_app {", 1)[1].split("}", 1)[0]
    assert [line.strip() for line in upstream.splitlines() if line.strip().startswith("server ")] == [
        "server 127.0.0.1:9101;", "server 127.0.0.1:9102;", "server 127.0.0.1:9103;"]
    assert "least_conn" not in upstream and "ip_hash" not in upstream and "hash " not in upstream  # round-robin


_HOLD_A_LOCK = """
import asyncio, sys
from sqlalchemy import text, update
from server.db import Database
from server.db.job_models import JobWorker

async def main(url, how):
    db = Database(url)
    stmt = update(JobWorker).where(JobWorker.worker_id == "w").values(pid=2)
    if how == "sync":  # the upload recorder's psycopg connection
        with db.sync_writer.connect() as c:
            c.execute(stmt)
            print("locked", flush=True)
            sys.stdin.read()  # frozen mid-transaction until the test closes our stdin
            c.commit()
    else:
        async with db.write() as s:
            await s.execute(stmt)
            print("locked", flush=True)
            sys.stdin.read()
    await db.writer.dispose()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
@pytest.mark.parametrize("how", ["async", "sync"])
async def test_a_process_frozen_inside_a_transaction_does_not_hold_its_locks_for_ever(
        database: str, how: str) -> None:
    """A process stopped between two statements of a transaction (SIGSTOP, swapped out, a host
    that hangs) keeps its row locks until PostgreSQL ends its session: after IDLE_IN_TRANSACTION
    s, not never. Without that, a worker frozen while holding a job's row lock stops every other
    worker and the reaper that should hand its rows back (seen in CI as a job that never ended)."""
    import asyncio
    import time

    from server.db import Database
    from server.db.engine import IDLE_IN_TRANSACTION
    from server.jobs import queries

    db = Database(database)
    try:
        await queries.register_worker(db, "w", "h", 1)
        holder = subprocess.Popen([sys.executable, "-c", _HOLD_A_LOCK, database, how], cwd=REPO, text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "locked", holder.stderr
            began = time.monotonic()
            assert await asyncio.wait_for(queries.heartbeat(db, "w"), IDLE_IN_TRANSACTION + 20)
            waited = time.monotonic() - began
            assert IDLE_IN_TRANSACTION - 1 < waited, f"the lock was free after {waited:.1f} s: the test held nothing"
            out, err = holder.communicate(input="", timeout=60)
        finally:
            holder.kill()
        assert holder.returncode != 0 and "idle-in-transaction timeout" in err, err[-2000:]
    finally:
        await db.writer.dispose()
        db.sync_writer.dispose()


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_a_job_survives_the_database_ending_every_session_of_its_processes(server_factory, database: str) -> None:
    """PostgreSQL restarted, or sessions ended by an operator or a timeout, while a job runs:
    the server and its workers make new connections and the job completes, each lost
    connection logged in one line, no traceback."""

    import requests
    from sqlalchemy import create_engine, text

    from server.db.urls import sync_url
    from tests.support.jobs import start_rows_job
    from tests.support.waiting import wait_until

    srv = server_factory(workers="2")
    auth = {"X-API-Key": API_KEY}
    n = 3000
    job_id = start_rows_job(srv.url, "lost", n)

    def status() -> dict:
        r = requests.get(f"{srv.url}/api/batch/lost/{job_id}/status", headers=auth, timeout=30)
        return r.json() if r.status_code == 200 else {}

    admin = create_engine(sync_url(database))
    ended = mid_job = 0
    done = -1
    try:
        with admin.connect() as c:
            for _ in range(3):  # three times, each once the job has moved on since the last
                st = wait_until(lambda done=done: (x := status()).get("status") in ("In progress", "Completed")
                                and x.get("succeededCount", 0) > done and x, timeout=60, interval=0.01,
                                what="the job to move on")
                mid_job += st["status"] == "In progress"
                done = st["succeededCount"]
                ended += c.execute(text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                        "WHERE datname = current_database() AND pid <> pg_backend_pid()")).scalar()
    finally:
        admin.dispose()
    assert ended >= 3, ended  # the server, its workers: each had sessions to lose
    assert mid_job >= 1, "the job ended before the first kill: make it longer"
    end = wait_until(lambda: (st := status()).get("status") in ("Completed", "Error", "Cancelled") and st,
                     timeout=180, interval=0.2, what="the job to end")
    assert end["status"] == "Completed" and end["succeededCount"] == n, end
    log = srv.log_path.read_text()
    assert "Traceback" not in log, log[-4000:]


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
async def test_a_worker_whose_registration_loses_its_session_registers_again(
        settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """A worker starting while PostgreSQL ends sessions (a restart, an operator): its
    registration's connection is lost mid-statement. It tries again and starts, the loss logged
    in one line (seen in a full run as a worker dead of a traceback right after its start). Made
    deterministic: the registration waits on a table lock while its session is ended."""
    import asyncio
    import logging

    from sqlalchemy import create_engine, text

    from server.db import Database
    from server.db.urls import sync_url
    from server.jobs import queries
    from server.jobs.fetch import Fetcher
    from server.jobs.worker import Worker
    from tests.support.waiting import async_wait_until, wait_until

    db = Database(settings.database)
    admin = create_engine(sync_url(settings.database), isolation_level="AUTOCOMMIT")
    fetcher = Fetcher(("127.0.0.1",), 5, 1 << 20)
    worker = Worker(db, settings, fetcher, None, "w-register-test")
    task: asyncio.Task[None] | None = None
    try:
        with admin.connect() as probe, admin.connect() as locker:
            locker.execute(text("BEGIN"))
            locker.execute(text("LOCK TABLE job_workers IN ACCESS EXCLUSIVE MODE"))
            caplog.set_level(logging.INFO, logger="filedrop.jobs.worker")
            task = asyncio.create_task(worker.run())

            def waiting() -> list[int]:
                return list(probe.execute(text(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()")).scalars())
            blocked = await asyncio.to_thread(wait_until, waiting, timeout=30, interval=0.02,
                                              what="the registration to wait on the lock")
            ended = probe.execute(text("SELECT count(pg_terminate_backend(pid)) FROM unnest(CAST(:p AS int[])) "
                                       "AS pid"), {"p": blocked}).scalar()
            assert ended == len(blocked) >= 1
            locker.execute(text("ROLLBACK"))

        async def registered() -> bool:
            assert not task.done(), task.exception() if not task.cancelled() else "cancelled"
            return any(w.worker_id == worker.id for w in await queries.workers(db))
        await async_wait_until(registered, timeout=30, interval=0.05, what="the worker to register")
        worker.stop()
        await asyncio.wait_for(task, 30)  # raises if run() died of the lost connection
    finally:
        if task is not None and not task.done():
            worker.stop()
            await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 30)
        admin.dispose()
        await fetcher.close()
        await db.dispose()
    lost = [r for r in caplog.records if "registering failed" in r.getMessage()]
    assert lost and all(r.exc_info is None and "connection was lost" in r.getMessage() for r in lost), \
        [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("database", ["sqlite", "postgresql"], indirect=True)
async def test_claims_take_at_most_n_rows_and_a_live_worker_hands_back_what_it_lost_track_of(
        settings: Settings) -> None:
    """A claim of n rows takes n rows (on PostgreSQL it once took every pending row: its
    ``IN (SELECT ... LIMIT n FOR UPDATE SKIP LOCKED)`` ran again per row). After a failed round a worker hands back every row still claimed in its name (it has no
    claim open between rounds); nobody else would, since it is alive. It stays registered, and
    another worker's rows stay where they are."""
    from sqlalchemy import select

    from server.db import Database
    from server.db.job_models import JobRow, JobWorker
    from server.jobs import queries

    db = Database(settings.database)
    try:
        await add_running_job(db, "j1", "b", 6)
        for w in ("w1", "w2"):
            await queries.register_worker(db, w, "h", 1)
        mine = await queries.claim_rows(db, "j1", "w1", 4)
        theirs = await queries.claim_rows(db, "j1", "w2", 2)
        assert len(mine) == 4 and len(theirs) == 2

        assert await queries.hand_back_own(db, "w1") == [("j1", "b")]
        async with db.read() as s:
            rows = dict((await s.execute(select(JobRow.idx, JobRow.claimed_by))).all())
            workers = set((await s.scalars(select(JobWorker.worker_id))).all())
        assert sorted(i for i, w in rows.items() if w is None) == sorted(r.idx for r in mine)
        assert sorted(i for i, w in rows.items() if w == "w2") == sorted(r.idx for r in theirs)
        assert workers == {"w1", "w2"}
        assert [r.idx for r in await queries.claim_rows(db, "j1", "w1", 10)] == sorted(r.idx for r in mine)
    finally:
        await db.writer.dispose()
        if db.reader is not db.writer:
            await db.reader.dispose()
        db.sync_writer.dispose()


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
async def test_a_request_whose_database_connection_is_lost_answers_503_and_logs_one_line(
        client, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    """A request whose session PostgreSQL ends under it (here: the session ends itself, a real
    loss) answers 503 ERR_SERVER_BUSY ("retry shortly") and logs one WARNING line, no traceback;
    the retry works on a new connection, and nothing of the batch is lost."""
    import logging

    from sqlalchemy import text

    from server.uploads.service import UploadService
    from tests.support.uploads import Uploads, assert_error

    up = Uploads(client)
    batch = await up.create()
    assert (await up.post(batch, 0, b"kept")).status == 201
    real = UploadService.list_files
    fired: list[bool] = []

    async def loses_its_connection_once(self, owner, batch_id):  # type: ignore[no-untyped-def]
        if not fired:
            fired.append(True)
            async with self.db.read() as s:
                await s.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
        return await real(self, owner, batch_id)

    monkeypatch.setattr(UploadService, "list_files", loses_its_connection_once)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        body = await assert_error(await up.info(batch), 503, "ERR_SERVER_BUSY")
    assert "connection to the database was lost" in body["message"], body
    lost = [r for r in caplog.records if "database connection was lost" in r.getMessage()]
    assert len(lost) == 1 and lost[0].levelno == logging.WARNING and lost[0].exc_info is None, lost
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    r = await up.info(batch)
    assert r.status == 200 and [f["name"] for f in await r.json()] == ["f.bin"], await r.text()


async def test_a_postgresql_restart_is_503_and_one_line_per_failure_not_a_traceback(
        aiohttp_client, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    """PostgreSQL stopped and started again (an upgrade, a failover) under a running app: while it
    shuts down ("the database system is shutting down") and while it is down (connection
    refused), a request answers 503 ERR_SERVER_BUSY with Retry-After, the upload recorder's
    psycopg connection included, and every failure (the request's, the background loops') is
    one WARNING line, no traceback; once it is back the same requests work, nothing lost. (A lost
    session alone was handled; a connection that could not be made again was a 500
    ERR_INTERNAL and an ERROR traceback in every loop twice a second, and a notification whose
    outcome met it was marked failed instead of being sent again.) A cluster of its own: this
    test stops it."""
    import logging

    from sqlalchemy import create_engine, text

    from server.app import create_app
    from server.db import connection_lost
    from server.db.locks import AdvisoryLocks
    from server.db.migrate import upgrade
    from server.db.urls import async_url, sync_url
    from tests.support.postgres import PostgresCluster
    from tests.support.uploads import Uploads, assert_error
    from tests.support.waiting import async_wait_until, wait_until

    cluster = PostgresCluster().start()
    try:
        url = cluster.database_url(cluster.create_database())
        upgrade(url)
        settings = Settings(data_dir=tmp_path / "var", database_url=url, api_keys=(API_KEY,), min_free_disk=1 << 20,
                            janitor_interval=0, workers=0)
        up = Uploads(await aiohttp_client(create_app(settings)))
        locks = AdvisoryLocks(async_url(url))
        batch = await up.create()
        assert (await up.post(batch, 0, b"kept")).status == 201

        async def refused(what: str) -> None:
            caplog.clear()
            with caplog.at_level(logging.INFO):
                body = await assert_error(await up.info(batch), 503, "ERR_SERVER_BUSY")
                assert "retry shortly" in body["message"], body
                await assert_error(await up.post(batch, 1, b"late"), 503, "ERR_SERVER_BUSY")
                # The notifier's loop (the advisory lock's connection, then the pool) met it too.
                await async_wait_until(lambda: _async_true(any("looking for notifications" in r.getMessage()
                                                               for r in caplog.records)),
                                       timeout=10, what="the notifier's poll to fail")
            tracebacks = [r for r in caplog.records if r.exc_info]
            assert not tracebacks, (what, [r.getMessage() for r in tracebacks])
            lost = [r for r in caplog.records if "database connection was lost" in r.getMessage()]
            assert len(lost) >= 2 and all(what in r.getMessage() for r in lost), (what, [r.getMessage() for r in lost])

        # Shutting down: a smart stop waits for the session held here, and refuses new ones
        # meanwhile; the app's pooled sessions are ended so that it needs new ones.
        admin = create_engine(sync_url(cluster.url))
        try:
            with admin.connect() as held:
                cluster.stop_server("smart", wait=False)
                wait_until(lambda: not _accepts(url), timeout=30, what="the server refusing new sessions")
                held.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"),
                             {"d": url.rsplit("/", 1)[1]})
                await refused("shutting down")
        finally:
            admin.dispose()
        wait_until(lambda: not cluster.server_running(), timeout=60, what="the server to stop")
        await refused("cannot connect")  # down: connection refused
        # The advisory locks' own connection too (what a standby notifier's poll takes).
        with pytest.raises(Exception) as lost:
            await locks.try_take("notifier")
        assert connection_lost(lost.value) is not None, repr(lost.value)

        cluster.start_server()
        r = await up.info(batch)
        assert r.status == 200 and [f["name"] for f in await r.json()] == ["f.bin"], await r.text()
        assert (await up.post(batch, 1, b"late")).status == 201
        assert await locks.try_take("notifier")
        await locks.close()
    finally:
        cluster.stop()


async def _async_true(value: bool) -> bool:
    return value


def _accepts(url: str) -> bool:
    """Whether a new session to ``url`` can be made now."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    from server.db.urls import sync_url

    engine = create_engine(sync_url(url))
    try:
        with engine.connect() as c:
            return c.execute(text("SELECT 1")).scalar() == 1
    except OperationalError:
        return False
    finally:
        engine.dispose()


async def test_a_notifier_whose_lock_went_with_a_postgresql_restart_stops_sending(tmp_path: Path) -> None:
    """Two app processes' notifiers (real ``Notifier``s on two ``Database``s), the first holding
    the ``notifier`` lock; PostgreSQL stops: the lock went with the first's connection, so it
    must stop sending, and once the server is back one of them leads. Before, nothing told the
    first (it makes no lock call while it leads): it went on as the sender while the other took
    the lock, both sent, and each turned the other's sends in flight back to pending (seen: a
    callback delivered three times across a restart)."""
    import asyncio

    from server.db import Database
    from server.db.migrate import upgrade
    from server.jobs.fetch import Fetcher
    from server.jobs.notify import Notifier
    from server.signing import Signer, SigningKeys
    from tests.support.postgres import PostgresCluster
    from tests.support.waiting import async_wait_until

    cluster = PostgresCluster().start()
    dbs: list[Database] = []
    fetchers: list[Fetcher] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        url = cluster.database_url(cluster.create_database())
        upgrade(url)
        settings = Settings(data_dir=tmp_path / "var", database_url=url, api_keys=(API_KEY,), workers=0)
        notifiers = []
        for _ in range(2):
            db = Database(url)
            dbs.append(db)
            fetchers.append(Fetcher((), 5.0, 1 << 20))
            notifiers.append(Notifier(db, settings, fetchers[-1], Signer(SigningKeys(db), "http://x")))
        first, second = notifiers
        tasks.append(asyncio.create_task(first.run()))

        async def leads(n: Notifier) -> bool:
            return n.leading
        await async_wait_until(lambda: leads(first), timeout=10, what="the first notifier to lead")
        tasks.append(asyncio.create_task(second.run()))

        await asyncio.to_thread(cluster.stop_server, "fast")

        async def stepped_down() -> bool:
            return not first.leading
        await async_wait_until(stepped_down, timeout=5, what="the first notifier to see its lock gone")
        await asyncio.to_thread(cluster.start_server)

        async def one_leads() -> bool:  # whichever took the lock again
            return first.leading + second.leading == 1
        await async_wait_until(one_leads, timeout=30, what="one notifier to lead again")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for db in dbs:
            await db.dispose()
        for fetcher in fetchers:
            await fetcher.close()
        cluster.stop()
