"""`filedrop drop`: an upload batch's rows and bytes; with --smartlinks a smartlink batch's files
and its jobs' rows, refused while a job of it runs unless --force."""

from __future__ import annotations

import asyncio
import json
import subprocess
from email import message_from_bytes

import pytest
from sqlalchemy import update

from server.app import create_app
from server.config import Settings
from server.db import utcnow
from server.db.job_models import Job, JobLog, JobRow, JobWorker
from server.db.models import BatchFile
from server.keys import JOBS
from tests.support.disk_state import (
    DAY,
    FileSpec,
    add_batch,
    add_job,
    batch_state,
    count,
    freed,
    job_status,
    run_cli,
    run_cli_async,
    session,
    table,
)
from tests.support.jobs import AUTH, callback_receiver, get_json, smtp_server, start_ok
from tests.support.jobs import rows as job_rows
from tests.support.waiting import async_wait_until

pytestmark = pytest.mark.engines


def test_drop_upload_batch_removes_rows_and_bytes_and_keeps_a_tombstone(settings: Settings) -> None:
    pk, ids = add_batch(settings, "cust-1", [FileSpec(data=b"a" * 700),
                                             FileSpec(state="receiving", data=None, chunks={0: b"c" * 300})])
    other_pk, _ = add_batch(settings, "cust-2", [FileSpec(data=b"b" * 10)])
    r = run_cli(settings, "drop", "cust-1")
    assert r.returncode == 0, r.stderr
    rows = table(r.stdout)
    assert rows["drop-batch"] == [["cust-1", "1000", "removed", "was open, 2 file(s)"]]
    assert freed(r.stdout) == 1000
    assert not (settings.uploads_dir / str(pk)).exists()
    assert count(settings, BatchFile, BatchFile.batch_pk == pk) == 0
    assert count(settings, BatchFile, BatchFile.id.in_(ids)) == 0
    assert batch_state(settings, "cust-1") == "dropped"  # a late upload into it is refused
    assert "dropped upload batch cust-1" in r.stderr
    # Nothing else was touched; dropping again says there is nothing there (no "1 removed").
    assert (settings.uploads_dir / str(other_pk)).exists() and batch_state(settings, "cust-2") == "open"
    again = run_cli(settings, "drop", "cust-1")
    assert again.returncode == 1 and again.stdout == "", again.stdout
    assert again.stderr.strip() == "filedrop: upload batch 'cust-1' is already dropped: nothing left to remove"


def test_drop_of_a_closed_batch_with_bytes_left_removes_them(settings: Settings) -> None:
    """A tombstone whose bytes a failed pass left behind is still cleaned up by a drop."""
    pk, _ = add_batch(settings, "half-gone", [FileSpec(data=b"h" * 300)], state="dropped")
    r = run_cli(settings, "drop", "half-gone")
    assert r.returncode == 0, r.stderr
    assert table(r.stdout)["drop-batch"] == [["half-gone", "300", "removed", "was dropped, 1 file(s)"]]
    assert not (settings.uploads_dir / str(pk)).exists()
    again = run_cli(settings, "drop", "half-gone")
    assert again.returncode == 1 and "already dropped" in again.stderr


def test_drop_unknown_batch_exits_1(settings: Settings) -> None:
    r = run_cli(settings, "drop", "nope")
    assert r.returncode == 1 and "no upload batch 'nope'" in r.stderr and r.stdout == ""
    r = run_cli(settings, "drop", "--smartlinks", "nope")
    assert r.returncode == 1 and "no smartlink batch 'nope'" in r.stderr
    r = run_cli(settings, "drop", "--smartlinks", "../uploads")
    assert r.returncode == 1 and "not a smartlink batch id" in r.stderr
    assert settings.uploads_dir.parent.exists()


def test_drop_smartlinks_removes_files_and_job_rows(settings: Settings) -> None:
    paths = add_job(settings, "a" * 32, "links", finished_ago=DAY, rows=[("r1", "s" * 16), ("r2", "s" * 16)])
    add_job(settings, "b" * 32, "links", finished_ago=60, rows=[("r3", "s" * 16)])
    keep = add_job(settings, "c" * 32, "other", finished_ago=60, rows=[("r1", "s" * 16)])
    size = sum(p.stat().st_size for p in paths) + len("<p>r3</p>")
    r = run_cli(settings, "drop", "--smartlinks", "links")
    assert r.returncode == 0, r.stderr
    assert table(r.stdout)["drop-smartlinks"] == [["links", str(size), "removed", "2 job(s)"]]
    assert settings.smartlink_root is not None
    assert not (settings.smartlink_root / "links").exists()
    assert count(settings, Job, Job.batch_id == "links") == 0
    assert count(settings, JobRow) == 1 and count(settings, JobLog) == 1  # those of "other"
    assert all(p.exists() for p in keep)


def test_drop_smartlinks_refuses_a_running_job_unless_forced(settings: Settings) -> None:
    paths = add_job(settings, "d" * 32, "busy", status="In progress", rows=[("r1", "s" * 16)])
    r = run_cli(settings, "drop", "--smartlinks", "busy")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "running job(s) " + "d" * 32 in r.stderr and "--force" in r.stderr
    assert all(p.exists() for p in paths) and job_status(settings, "d" * 32) == "In progress"
    # No worker holds a row of it: --force cancels it through the jobs code, which ends it at once.
    r = run_cli(settings, "drop", "--smartlinks", "busy", "--force", "--cancel-wait", "30")
    assert r.returncode == 0, r.stderr
    assert "cancelled " + "d" * 32 in r.stdout
    assert "marked Cancelled" not in r.stderr and "Cancelled: 0 succeeded, 0 errored, 1 skipped of 1" in r.stderr
    assert not any(p.exists() for p in paths) and count(settings, Job) == 0


def test_drop_force_ends_a_job_whose_worker_does_not_answer(settings: Settings) -> None:
    """A row is held by a registered worker that never reacts (stopped, say): after
    --cancel-wait the CLI ends the job itself, and the folder is gone all the same."""
    paths = add_job(settings, "9" * 32, "stuck", status="In progress", rows=[("r1", "s" * 16), ("r2", "s" * 16)])
    with session(settings) as s:
        now = utcnow()
        s.add(JobWorker(worker_id="w" * 16, host="elsewhere/boot", pid=1, started_at=now, seen_at=now))
        s.execute(update(JobRow).where(JobRow.job_id == "9" * 32, JobRow.idx == 0)
                  .values(status="claimed", claimed_by="w" * 16))
        s.commit()
    r = run_cli(settings, "drop", "--smartlinks", "stuck", "--force", "--cancel-wait", "0.3")
    assert r.returncode == 0, r.stderr
    assert "marked Cancelled" in r.stderr and "cancelled " + "9" * 32 in r.stdout
    assert "no worker stopped it in time" in r.stderr
    assert not any(p.exists() for p in paths) and count(settings, Job) == 0
    assert not (settings.smartlink_root / "stuck").exists()


def test_drop_upload_batch_used_by_a_running_job_is_refused_unless_forced(settings: Settings) -> None:
    pk, _ = add_batch(settings, "tpl", [FileSpec()])
    add_job(settings, "e" * 32, "links", status="Queued", rows=[("r1", "s" * 16)], publish=False,
            upload_batch_id="tpl")
    r = run_cli(settings, "drop", "tpl")
    assert r.returncode == 3 and "e" * 32 in r.stderr
    assert (settings.uploads_dir / str(pk)).exists() and batch_state(settings, "tpl") == "open"
    r = run_cli(settings, "drop", "tpl", "--force", "--cancel-wait", "0.2")
    assert r.returncode == 0, r.stderr
    assert job_status(settings, "e" * 32) == "Cancelled"
    assert not (settings.uploads_dir / str(pk)).exists()


def test_drop_upload_batch_is_not_held_by_another_keys_job_on_the_same_id(settings: Settings) -> None:
    """Another key's job whose batch id is the upload batch's reads nothing of it (its `batch:`
    files are its own key's): the drop was refused (3) naming that job, and `--force` cancelled
    it."""
    pk, _ = add_batch(settings, "same-id", [FileSpec()])
    add_job(settings, "f" * 32, "same-id", status="Queued", rows=[("r1", "s" * 16)], publish=False,
            upload_batch_id="same-id", owner="p" * 64)
    r = run_cli(settings, "drop", "same-id", "--force", "--cancel-wait", "0.2")
    assert r.returncode == 0, r.stderr
    assert "f" * 32 not in r.stdout + r.stderr
    assert job_status(settings, "f" * 32) == "Queued"  # the other key's job goes on
    assert not (settings.uploads_dir / str(pk)).exists() and batch_state(settings, "same-id") == "dropped"


async def test_drop_force_without_a_server_leaves_the_callback_to_the_next_start(aiohttp_client,
                                                                                settings: Settings) -> None:
    """Ended as Cancelled by the CLI (no worker held a row of it): its callback is still sent,
    by the server that starts next."""
    add_batch(settings, "tpl2", [FileSpec()])
    jid = "f" * 32
    add_job(settings, jid, "links2", status="Queued", rows=[("r1", "s" * 16)], publish=False,
            upload_batch_id="tpl2")
    async with callback_receiver() as rcv:
        with session(settings) as s:
            s.execute(update(Job).where(Job.job_id == jid).values(callback_url=rcv.url))
            s.commit()
        rc, out, err = await run_cli_async(settings, "drop", "tpl2", "--force", "--cancel-wait", "0.2")
        assert rc == 0 and "Cancelled: 0 succeeded, 0 errored, 1 skipped of 1" in err, out + err
        assert job_status(settings, jid) == "Cancelled"
        client = await aiohttp_client(create_app(settings))
        await client.app[JOBS].notified(jid, timeout=30)
        assert rcv.delivered.is_set()
    assert json.loads(rcv.attempts[-1][1])["status"] == "Cancelled"


# ~1-2 ms of sandboxed work per row (as in the job lifecycle tests): the job stays in progress.
SLOW = {"body": "{% for i in range(20000) %}{% endfor %}<p>{{ data.n }}</p>"}


async def test_drop_force_beside_a_live_server_lets_its_engine_cancel_the_job(client, settings: Settings) -> None:
    """The CLI and the server are different processes: --force cancels through the database and
    the live server's workers stop the job (no "marked Cancelled" fallback); nothing is written after."""
    job = await start_ok(client, "live", SLOW, job_rows(10_000))  # far longer than the two CLI runs
    jid = job["job_id"]

    async def rendering() -> bool:
        s = await get_json(client, f"/api/batch/live/{jid}/status")
        return s["status"] == "In progress" and s["succeededCount"] > 0
    await async_wait_until(rendering, timeout=30, what="first rows rendered")

    rc, out, err = await run_cli_async(settings, "drop", "--smartlinks", "live")
    assert rc == 3 and jid in err, out + err
    rc, out, err = await run_cli_async(settings, "drop", "--smartlinks", "live", "--force", "--cancel-wait", "20")
    assert rc == 0, err
    assert "marked Cancelled" not in err  # a worker (or the cancel itself) ended it
    assert table(out)["drop-smartlinks"][0][0] == "live" and f"cancelled {jid}" in out
    await client.app[JOBS].job_finished(jid, timeout=10)
    assert settings.smartlink_root is not None
    assert not (settings.smartlink_root / "live").exists()  # not re-created by a late write
    assert await asyncio.to_thread(count, settings, Job) == 0
    r = await client.get(f"/api/batch/live/{jid}/status", headers=AUTH)
    assert r.status == 404


async def test_drop_force_of_a_job_with_callback_and_emails_still_notifies_once(aiohttp_client,
                                                                                 settings: Settings) -> None:
    """The job ended by --force is gone from the API at once, yet its callback and its e-mail
    are sent, once each, by the server's notifier; then nothing of the job is left."""
    async with callback_receiver() as rcv, smtp_server() as (smtp_port, smtp):
        client = await aiohttp_client(create_app(settings.replace(smtp_port=smtp_port)))
        job = await start_ok(client, "noisy", SLOW, job_rows(10_000), callback_url=rcv.url,
                             callback_emails="ops@example.com")
        jid = job["job_id"]

        async def rendering() -> bool:
            return (await get_json(client, f"/api/batch/noisy/{jid}/status"))["succeededCount"] > 0
        await async_wait_until(rendering, timeout=30, what="first rows rendered")

        rc, out, err = await run_cli_async(settings, "drop", "--smartlinks", "noisy", "--force", "--cancel-wait", "20")
        assert rc == 0, out + err
        assert f"cancelled {jid}" in out and "Traceback" not in err
        for what in ("status", "log", "result", "cancel"):  # at once, whatever the notifier is doing
            r = await client.get(f"/api/batch/noisy/{jid}/{what}", headers=AUTH)
            assert r.status == 404, (what, await r.text())
        assert (await get_json(client, "/api/batch/noisy/jobs"))["jobs"] == []
        await asyncio.wait_for(rcv.delivered.wait(), timeout=30)
        await asyncio.wait_for(smtp.received.wait(), timeout=30)
        await client.app[JOBS].notified(jid, timeout=30)  # sent, and the job's last row deleted
        assert await asyncio.to_thread(count, settings, Job) == 0
        assert await asyncio.to_thread(count, settings, JobRow) == 0
        assert await asyncio.to_thread(count, settings, JobLog) == 0
    assert len(rcv.attempts) == 1 and len(smtp.messages) == 1
    sent = json.loads(rcv.attempts[0][1])
    assert (sent["batch_id"], sent["job_id"], sent["status"]) == ("noisy", jid, "Cancelled")
    assert "filedrop drop --force" in sent["reason"] and sent["finished"] is not None
    msg = message_from_bytes(smtp.messages[0][2])
    assert msg["Subject"] == "filedrop batch noisy: Cancelled"
    text = msg.get_payload(decode=True).decode()
    assert f"Job:       {jid}" in text
    # The notifier may take the ended job in the moment before the drop hides it (it looks every
    # 0.5 s): then its e-mail was made from the job as it was, with the result link of then.
    assert ("the batch was dropped" in text) != (f"/api/batch/noisy/{jid}/result" in text), text


async def test_drop_with_no_server_running_leaves_the_notifications_to_the_next_one(aiohttp_client,
                                                                                    settings: Settings) -> None:
    """Nothing is lost across processes: a job --force ends with no server up, and one that had
    just completed with its callback not sent yet, are both announced by the next server (which
    never shows them: 404)."""
    forced, done = "a1" * 16, "b2" * 16
    add_job(settings, forced, "quiet", status="Queued", rows=[("r1", "s" * 16)], publish=False)
    add_job(settings, done, "quiet", finished_ago=5, rows=[("r2", "s" * 16)])
    async with callback_receiver() as rcv:
        with session(settings) as s:
            s.execute(update(Job).where(Job.job_id == forced).values(callback_url=rcv.url))
            s.execute(update(Job).where(Job.job_id == done).values(callback_url=rcv.url, callback_state="pending"))
            s.commit()
        rc, out, err = await run_cli_async(settings, "drop", "--smartlinks", "quiet", "--force", "--cancel-wait", "0.2")
        assert rc == 0, out + err
        assert table(out)["drop-smartlinks"][0][:1] == ["quiet"] and f"cancelled {forced}" in out
        assert await asyncio.to_thread(count, settings, Job, Job.batch_id == "quiet") == 0
        assert await asyncio.to_thread(count, settings, JobRow) == 0
        client = await aiohttp_client(create_app(settings))
        for jid in (forced, done):
            r = await client.get(f"/api/batch/quiet/{jid}/status", headers=AUTH)
            assert r.status == 404
        for jid in (forced, done):
            await client.app[JOBS].notified(jid, timeout=30)
        assert await asyncio.to_thread(count, settings, Job) == 0
    sent = sorted((b["job_id"], b["batch_id"], b["status"]) for b in (json.loads(a[1]) for a in rcv.attempts))
    assert sent == sorted([(forced, "quiet", "Cancelled"), (done, "quiet", "Completed")])


def test_drop_smartlinks_that_cannot_be_removed_says_so_and_exits_1(settings: Settings) -> None:
    """A folder the server may not move (here: immutable) is an error row and exit 1, not a
    'removed' with exit 0; the files stay where they were."""
    assert settings.smartlink_root is not None
    d = settings.smartlink_root / "stuck"
    d.mkdir(parents=True)
    (d / "r.s0000000000000000.html").write_text("<p>page</p>")
    subprocess.run(["chattr", "+i", str(d)], check=True)  # root, ext4: renames are refused (EPERM)
    try:
        r = run_cli(settings, "drop", "--smartlinks", "stuck")
    finally:
        subprocess.run(["chattr", "-i", str(d)], check=True)
    assert r.returncode == 1, r.stdout + r.stderr
    (row,) = table(r.stdout)["drop-smartlinks"]
    assert row[0] == "stuck" and row[2].startswith("error: PermissionError"), row
    assert (d / "r.s0000000000000000.html").exists() and "Traceback" not in r.stderr


async def test_a_job_started_while_a_drop_runs_is_not_dropped_with_the_folder(settings: Settings,
                                                                             monkeypatch) -> None:
    """A start can land after drop's check (the jobs it cancels, none here) and before it removes
    the rows: then the drop is refused, changing nothing. The rows used to go in one transaction
    and the folder was renamed after it (following a walk of its bytes): a job started between
    them published into the folder then removed, and its rows said `succeeded` for pages that
    were 404 (seen by hand: a 9-row job started 1.2 s into the drop of a 20,000-page batch)."""
    from server import janitor
    from server.db import Database
    from server.errors import JobRunning
    from server.jobs import queries

    assert settings.smartlink_root is not None
    old = add_job(settings, "a" * 32, "links", finished_ago=DAY, rows=[("r1", "s" * 16)])
    real = queries.drop_batch

    async def a_start_comes_in_first(db, batch_id, *args, **kwargs):
        add_job(settings, "b" * 32, batch_id, status="In progress", rows=[("n1", "s" * 16)])  # and its page
        return await real(db, batch_id, *args, **kwargs)

    monkeypatch.setattr(queries, "drop_batch", a_start_comes_in_first)
    db = Database(settings.database, settings.database_pool)
    try:
        with pytest.raises(JobRunning, match="started after the drop began"):
            await janitor.drop_smartlink_batch(db, settings, "links")
    finally:
        await db.dispose()
    assert all(p.exists() for p in old) and (settings.smartlink_root / "links" / f"n1.{'s' * 16}.html").exists()
    assert job_status(settings, "b" * 32) == "In progress" and job_status(settings, "a" * 32) == "Completed"
    # Once the new job has ended, the drop goes through.
    monkeypatch.setattr(queries, "drop_batch", real)
    with session(settings) as s:
        s.execute(update(Job).where(Job.job_id == "b" * 32).values(status="Completed", finished=utcnow()))
        s.commit()
    r = run_cli(settings, "drop", "--smartlinks", "links")
    assert r.returncode == 0, r.stderr
    assert not (settings.smartlink_root / "links").exists() and count(settings, Job) == 0


def test_drop_of_an_upload_batch_whose_bytes_cannot_be_removed_says_so_and_exits_1(settings: Settings) -> None:
    """A file the server may not remove (here: immutable) was a traceback of `drop` (exit 1 by
    accident, no table). As for `--smartlinks`: an error row, exit 1; the rows are dropped (the
    batch a tombstone) and the next cleanup removes the bytes once they can go."""
    pk, _ = add_batch(settings, "stuck-up", [FileSpec(data=b"s" * 40)])
    (f,) = [p for p in (settings.uploads_dir / str(pk)).rglob("*") if p.is_file()]
    subprocess.run(["chattr", "+i", str(f)], check=True)  # root, ext4: unlink refused (EPERM)
    try:
        r = run_cli(settings, "drop", "stuck-up")
    finally:
        subprocess.run(["chattr", "-i", str(f)], check=True)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    (row,) = table(r.stdout)["drop-batch"]
    assert row[0] == "stuck-up" and row[2].startswith("error: PermissionError"), row
    assert "1 error(s)" in r.stdout.splitlines()[-1]
    assert batch_state(settings, "stuck-up") == "dropped"  # a late chunk is refused
    again = run_cli(settings, "drop", "stuck-up")  # now it can go
    assert again.returncode == 0, again.stdout + again.stderr
    assert table(again.stdout)["drop-batch"][0][2] == "removed"
    assert not (settings.uploads_dir / str(pk)).exists()
