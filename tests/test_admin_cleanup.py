"""`filedrop cleanup`: each kind of leftover is found, removed and reported with its bytes; what is
in use stays; --dry-run changes nothing; errors give a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server.config import Settings
from server.db.job_models import Job, JobLog, JobRow
from server.db.models import Batch, BatchFile
from tests.support.database import connect
from tests.support.disk_state import (
    DAY,
    HOUR,
    FileSpec,
    add_batch,
    add_job,
    admin_env,
    age,
    batch_counts,
    batch_state,
    chunk_ids,
    count,
    freed,
    run_cli,
    table,
)
from tests.support.server import REPO

pytestmark = pytest.mark.engines

# A trigger that makes the database refuse to delete the batch 'stuck', per engine.
REFUSE_DELETE = {
    "sqlite": ["CREATE TRIGGER stuck BEFORE DELETE ON batches WHEN old.batch_id = 'stuck' "
               "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"],
    "postgresql": ["CREATE FUNCTION refuse_stuck() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                   "IF old.batch_id = 'stuck' THEN RAISE EXCEPTION 'refused by the test'; END IF; RETURN old; END $$",
                   "CREATE TRIGGER stuck BEFORE DELETE ON batches FOR EACH ROW EXECUTE FUNCTION refuse_stuck()"],
}


def _leftovers(settings: Settings) -> dict[str, object]:
    """One of each kind cleanup removes by default, and a live batch it must keep."""
    up = settings.uploads_dir
    expired_pk, _ = add_batch(settings, "expired", [FileSpec(data=b"e" * 3000), FileSpec(data=b"f" * 500)],
                              idle=25 * HOUR)
    tomb_pk, _ = add_batch(settings, "tombstone", [], state="dropped", idle=30 * HOUR)
    live_pk, (done_id, gone_id, recv_id) = add_batch(settings, "live", [
        FileSpec(data=b"x" * 100, chunks={0: b"c" * 70, 1: b"c" * 30}),  # assembled, chunks left
        FileSpec(data=None),  # complete, but its data is gone
        FileSpec(state="receiving", data=None, chunks={0: b"r" * 10}, chunk_rows_without_bytes=[1],
                 temps={"chunks/.2.deadbeef.part": b"p" * 40}),  # a crashed chunk upload
    ], idle=HOUR)
    # The live batch was just touched: its idle clock is fresh, only its leftovers are old.
    from datetime import timedelta

    from sqlalchemy import update

    from server.db import utcnow
    from tests.support.disk_state import session
    with session(settings) as s:
        s.execute(update(Batch).where(Batch.id == live_pk).values(updated_at=utcnow() - timedelta(seconds=60)))
        s.commit()
    orphan = up / "999"
    (orphan / "5").mkdir(parents=True)
    (orphan / "5" / "data").write_bytes(b"o" * 200)
    orphan_file = up / str(live_pk) / "12345"
    orphan_file.mkdir()
    (orphan_file / "data").write_bytes(b"z" * 50)
    assembly_temp = up / str(live_pk) / str(done_id) / ".data.0123abcd.part"
    assembly_temp.write_bytes(b"a" * 60)
    whole_temp = up / str(live_pk) / ".3.0123abcd.part"  # a whole-file upload cut off by a crash
    whole_temp.write_bytes(b"w" * 15)
    receiving = up / str(live_pk) / ".4.4567cdef.part"  # one being received right now
    receiving.write_bytes(b"n" * 5)
    for p in (orphan, orphan_file, assembly_temp, whole_temp, up / str(live_pk) / str(recv_id)):
        age(p, HOUR)
    old_links = add_job(settings, "a" * 32, "oldlinks", finished_ago=31 * DAY,
                        rows=[("r1", "s" * 16), ("r2", "t" * 16)])
    render_temp = settings.smartlink_root / "oldlinks" / ".r3.tttttttttttttttt.html.1a2b3c4d.tmp"
    render_temp.write_bytes(b"t" * 25)
    age(render_temp, HOUR)
    return dict(expired_pk=expired_pk, tomb_pk=tomb_pk, live_pk=live_pk, done_id=done_id, gone_id=gone_id,
                recv_id=recv_id, orphan=orphan, orphan_file=orphan_file, assembly_temp=assembly_temp,
                whole_temp=whole_temp, receiving=receiving, old_links=old_links, render_temp=render_temp)


def test_cleanup_removes_each_kind_reports_bytes_and_is_idempotent(settings: Settings) -> None:
    st = _leftovers(settings)
    up = settings.uploads_dir
    live = up / str(st["live_pk"])
    r = run_cli(settings, "cleanup")
    assert r.returncode == 0, r.stderr
    rows = table(r.stdout)
    assert {k: len(v) for k, v in rows.items()} == {
        "expired-batch": 2, "chunk-leftovers": 1, "orphan-dir": 2, "missing-bytes": 2, "temp-file": 4,
        "expired-job": 1}, r.stdout
    assert all(row[2] == "removed" for rs in rows.values() for row in rs), r.stdout
    assert {row[0] for row in rows["expired-batch"]} == {"expired", "tombstone"}
    assert [row[1] for row in rows["expired-batch"] if row[0] == "expired"] == ["3500"]
    # 3500 (expired) + 100 (chunks) + 200 + 50 (orphans) + 40 + 60 + 15 + 25 (temps)
    assert freed(r.stdout) == 3990
    assert "3990 bytes (3.9 KiB) freed, 0 error(s)" in r.stdout

    assert not (up / str(st["expired_pk"])).exists() and not (up / str(st["tomb_pk"])).exists()
    assert batch_state(settings, "expired") is None and batch_state(settings, "tombstone") is None
    assert count(settings, BatchFile, BatchFile.batch_pk == st["expired_pk"]) == 0
    assert not (live / str(st["done_id"]) / "chunks").exists()
    assert (live / f"{st['done_id']}.data").read_bytes() == b"x" * 100  # the assembled file stays
    assert count(settings, BatchFile, BatchFile.id == st["gone_id"]) == 0
    assert count(settings, BatchFile, BatchFile.id == st["recv_id"]) == 1
    assert chunk_ids(settings, st["recv_id"]) == [0]  # chunk 1 had no bytes: forgotten
    assert (live / str(st["recv_id"]) / "chunks" / "0").read_bytes() == b"r" * 10
    assert not (live / str(st["recv_id"]) / "chunks" / ".2.deadbeef.part").exists()
    for p in ("orphan", "orphan_file", "assembly_temp", "whole_temp", "render_temp"):
        assert not Path(st[p]).exists(), p  # type: ignore[arg-type]
    assert Path(st["receiving"]).exists()  # type: ignore[arg-type]
    assert batch_state(settings, "live") == "open"
    counts = batch_counts(settings)  # the removed rows left the batch's counts (kept by triggers)
    assert set(counts) == {"live"} and counts["live"][:2] == counts["live"][2:] and counts["live"][0] > 0, counts
    # The job's rows go; its smartlinks stay without --smartlinks.
    assert count(settings, Job) == count(settings, JobRow) == count(settings, JobLog) == 0
    assert all(p.exists() for p in st["old_links"])  # type: ignore[attr-defined]
    assert "removed expired-batch expired" in r.stderr  # every step is logged

    again = run_cli(settings, "cleanup")
    assert again.returncode == 0
    assert again.stdout.strip().splitlines()[-1].startswith("0 item(s), 0 removed, 0 bytes"), again.stdout


def test_two_cleanups_started_together_remove_each_item_once(settings: Settings) -> None:
    """Two janitors at once (two ``filedrop cleanup`` processes; an app process's janitor takes the
    same lock): one pass at a time, so every item is removed by exactly one of them and the other
    finds it gone instead of removing it again or racing the first."""
    st = _leftovers(settings)
    env = admin_env(settings)
    procs = [subprocess.Popen([sys.executable, "-m", "server", "cleanup"], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    targets: list[tuple[str, str]] = []
    for out, _err in outs:
        for kind, rs in table(out).items():
            assert all(row[2] == "removed" for row in rs), out
            targets += [(kind, row[0]) for row in rs]
    # What one cleanup alone removes (the test above), each item once across both.
    assert len(targets) == len(set(targets)) == 12, outs
    assert sum(freed(out) for out, _err in outs) == 3990, outs
    assert sorted(freed(out) for out, _err in outs)[0] == 0, outs  # the second found nothing left
    assert all("Traceback" not in err for _out, err in outs), outs
    assert batch_state(settings, "expired") is None and batch_state(settings, "live") == "open"
    assert Path(st["receiving"]).exists()  # type: ignore[arg-type]


def test_dry_run_reports_the_same_and_changes_nothing(settings: Settings) -> None:
    st = _leftovers(settings)
    before = sorted(str(p) for p in settings.data_dir.rglob("*") if "sqlite" not in p.name)
    r = run_cli(settings, "cleanup", "--dry-run")
    assert r.returncode == 0, r.stderr
    rows = table(r.stdout)
    assert sum(len(v) for v in rows.values()) == 12
    assert all(row[2] == "would remove" for rs in rows.values() for row in rs)
    assert freed(r.stdout) == 3990 and "would be freed" in r.stdout and "dry run" in r.stdout
    assert sorted(str(p) for p in settings.data_dir.rglob("*") if "sqlite" not in p.name) == before
    assert batch_state(settings, "expired") == "open" and count(settings, Job) == 1
    assert count(settings, BatchFile, BatchFile.id == st["gone_id"]) == 1


def test_older_than_replaces_the_ttl_and_is_refused_under_the_grace(settings: Settings) -> None:
    add_batch(settings, "two-hours", [FileSpec()], idle=2 * HOUR)
    add_batch(settings, "one-minute", [FileSpec()], idle=60)
    add_job(settings, "b" * 32, "recent-job", finished_ago=2 * HOUR, rows=[("r", "s" * 16)])
    r = run_cli(settings, "cleanup")
    assert r.returncode == 0 and table(r.stdout) == {}, r.stdout
    r = run_cli(settings, "cleanup", "--older-than", "1h")
    assert r.returncode == 0, r.stderr
    rows = table(r.stdout)
    assert [row[0] for row in rows["expired-batch"]] == ["two-hours"]
    assert [row[0] for row in rows["expired-job"]] == ["b" * 32]
    # Below the grace: refused, saying so, rather than silently raised to it.
    for below in ("0", "1s", "9m"):
        r = run_cli(settings, "cleanup", "--older-than", below)
        assert r.returncode == 2 and r.stdout == "", r.stdout
        assert f"--older-than {below if below != '0' else '0s'} is below the safety floor of 10m" in r.stderr
        assert "FILEDROP_CLEANUP_GRACE" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(settings, "cleanup", "--older-than", "10m")
    assert r.returncode == 0 and table(r.stdout) == {}, r.stdout
    assert batch_state(settings, "one-minute") == "open"
    # The TTL setting is the default.
    r = run_cli(settings, "cleanup", batch_ttl="30s")  # (keyword: admin_env adds FILEDROP_)
    assert r.returncode == 0, r.stderr
    assert batch_state(settings, "one-minute") == "open"  # 60 s idle, but the grace is 10 min
    # The setting lowers the floor, and then the value asked for is what is used.
    r = run_cli(settings, "cleanup", "--older-than", "30s", cleanup_grace="30s")
    assert r.returncode == 0, r.stderr
    assert [row[0] for row in table(r.stdout)["expired-batch"]] == ["one-minute"]
    bad = run_cli(settings, "cleanup", "--older-than", "soon")
    assert bad.returncode == 2 and "not a duration" in bad.stderr


def test_smartlinks_go_only_with_the_flag_and_shared_names_stay(settings: Settings) -> None:
    root = settings.smartlink_root
    assert root is not None
    # An errored row may carry any reference_id: its name never becomes a path to remove.
    old = add_job(settings, "c" * 32, "sl", finished_ago=40 * DAY,
                  rows=[("a", "s" * 16), ("b", "s" * 16), ("../../outside", "s" * 16)])
    outside = settings.data_dir / f"outside.{'s' * 16}.html"
    assert old[2].resolve() == outside and outside.exists()
    (root / "sl" / "a.ssssssssssssssss.pdf").write_bytes(b"%PDF" + b"0" * 96)
    # A newer run of the same batch re-published "b": that file stays with the newer job.
    add_job(settings, "d" * 32, "sl", finished_ago=DAY, rows=[("b", "s" * 16)], publish=False)
    orphan = root / "nojob"
    orphan.mkdir()
    (orphan / "x.yyyyyyyyyyyyyyyy.html").write_bytes(b"h" * 11)
    age(orphan, 31 * DAY)
    young_orphan = root / "young"
    young_orphan.mkdir()
    (young_orphan / "x.yyyyyyyyyyyyyyyy.html").write_bytes(b"h" * 11)

    dry = run_cli(settings, "cleanup", "--smartlinks", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    # The plan counts every file of the job's names (b's too: apply keeps it, and says so).
    assert table(dry.stdout)["expired-job"][0][:3] == ["c" * 32, str(2 * len(b"<p>a</p>") + 100), "would remove"]
    r = run_cli(settings, "cleanup", "--smartlinks")
    assert r.returncode == 0, r.stderr
    rows = table(r.stdout)
    assert [row[:3] for row in rows["expired-job"]] == [["c" * 32, str(len(b"<p>a</p>") + 100), "removed"]]
    assert [row[0] for row in rows["orphan-smartlinks"]] == ["smartlinks/nojob"]
    assert outside.exists()
    assert not (root / "sl" / "a.ssssssssssssssss.html").exists()
    assert not (root / "sl" / "a.ssssssssssssssss.pdf").exists()
    assert (root / "sl" / "b.ssssssssssssssss.html").exists()
    assert not orphan.exists() and young_orphan.exists()
    assert count(settings, Job) == 1
    assert freed(r.stdout) == len(b"<p>a</p>") + 100 + 11


def test_an_expired_jobs_result_csv_is_counted_in_what_was_freed(settings: Settings) -> None:
    # The CSV that result?format=url wrote goes with the job: its bytes are freed bytes (they
    # were reported as 0 bytes removed).
    from server.jobs.results import path_of

    add_job(settings, "a" * 32, "withcsv", finished_ago=40 * DAY, rows=[("r", "s" * 16)], publish=False)
    csv = path_of(settings, "a" * 32)
    csv.parent.mkdir(parents=True, exist_ok=True)
    csv.write_bytes(b"c" * 1234)
    r = run_cli(settings, "cleanup")
    assert r.returncode == 0, r.stderr
    assert [row[:3] for row in table(r.stdout)["expired-job"]] == [["a" * 32, "1234", "removed"]]
    assert freed(r.stdout) == 1234 and not csv.exists() and count(settings, Job) == 0


def test_a_row_name_no_file_can_have_is_no_path_to_look_at(settings: Settings) -> None:
    """A row of 128 + 128 characters (the contract allowed it before the 249 rule) never had a
    page: its 262-byte name is skipped, not an ENAMETOOLONG traceback that stops the cleanup."""
    assert settings.smartlink_root is not None
    add_job(settings, "e" * 32, "longnames", finished_ago=40 * DAY, rows=[("r" * 128, "s" * 128)], publish=False)
    kept = add_job(settings, "f" * 32, "longnames", finished_ago=40 * DAY, rows=[("r" * 128, "s" * 121)])
    for args in (("--dry-run",), ()):
        r = run_cli(settings, "cleanup", "--smartlinks", *args)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert sorted(row[0] for row in table(r.stdout)["expired-job"]) == ["e" * 32, "f" * 32]
    assert not kept[0].exists() and count(settings, Job) == 0


def test_errors_are_reported_per_item_with_a_non_zero_exit(settings: Settings) -> None:
    add_batch(settings, "stuck", [FileSpec(data=b"s" * 10)], idle=25 * HOUR)
    add_batch(settings, "expired", [FileSpec(data=b"e" * 10)], idle=25 * HOUR)
    # The database refuses to delete one row (as a locked or broken database would); works as
    # root too, where file permissions would not stop anything.
    with connect(settings) as db:
        for statement in REFUSE_DELETE[db.dialect.name]:
            db.exec_driver_sql(statement)
    r = run_cli(settings, "cleanup")
    rows = table(r.stdout)
    assert r.returncode == 1, r.stdout + r.stderr
    results = {row[0]: row[2] for row in rows["expired-batch"]}
    assert results["expired"] == "removed"
    assert results["stuck"].startswith("error:") and "refused by the test" in results["stuck"]
    assert "1 error(s)" in r.stdout and len(r.stdout.splitlines()) == 4  # header, 2 rows, total
    assert "could not remove expired-batch stuck" in r.stderr
    # The row stays as a tombstone (a late chunk is refused); the next pass finishes it.
    assert batch_state(settings, "stuck") == "dropped" and batch_state(settings, "expired") is None
    with connect(settings) as db:
        db.exec_driver_sql("DROP TRIGGER stuck" + (" ON batches" if db.dialect.name == "postgresql" else ""))
    r = run_cli(settings, "cleanup")
    assert r.returncode == 0 and [row[0] for row in table(r.stdout)["expired-batch"]] == ["stuck"]
    assert batch_state(settings, "stuck") is None


def test_unmigrated_database_exits_2(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path / "nodb")
    for args in (["cleanup"], ["drop", "x"]):
        r = run_cli(s, *args)
        assert r.returncode == 2 and "filedrop migrate" in r.stderr


@pytest.mark.parametrize("kind", ["part", "assembling", "job-batch", "running-job-dir"])
def test_what_is_in_use_stays_even_with_older_than_the_floor(settings: Settings, kind: str) -> None:
    root = settings.smartlink_root
    assert root is not None
    if kind == "part":
        # Idle clock long expired, but a chunk is still being written (its .part is fresh).
        pk, (fid,) = add_batch(settings, "b", [FileSpec(state="receiving", data=None)], idle=25 * HOUR)
        part = settings.uploads_dir / str(pk) / str(fid) / "chunks" / ".0.abcd.part"
        part.parent.mkdir()
        part.write_bytes(b"p")
        keep = [part]
    elif kind == "assembling":
        pk, (fid,) = add_batch(settings, "b", [FileSpec(state="assembling", data=None, chunks={0: b"c"},
                                                        temps={".data.abcd.part": b"a"}, idle=60)],
                               idle=25 * HOUR, disk_age=2 * HOUR)
        keep = [settings.uploads_dir / str(pk) / str(fid) / ".data.abcd.part"]
    elif kind == "job-batch":
        # The upload batch a running job reads its template/PDFs from.
        pk, _ = add_batch(settings, "b", [FileSpec()], idle=25 * HOUR)
        add_job(settings, "e" * 32, "links", status="In progress", rows=[("r", "s" * 16)], publish=False,
                upload_batch_id="b")
        keep = [settings.uploads_dir / str(pk)]
    else:
        add_job(settings, "f" * 32, "links", status="Completed", finished_ago=40 * DAY, rows=[("r", "s" * 16)])
        add_job(settings, "e" * 32, "links", status="In progress", rows=[("q", "s" * 16)], publish=False)
        tmp = root / "links" / ".q.ssssssssssssssss.html.abcd.tmp"
        tmp.write_bytes(b"t")
        age(tmp, HOUR)
        keep = [tmp, root / "links" / "r.ssssssssssssssss.html"]
    r = run_cli(settings, "cleanup", "--older-than", "10m", "--smartlinks")
    assert r.returncode == 0, r.stderr
    assert table(r.stdout) == {}, r.stdout
    for p in keep:
        assert p.exists(), p
    if kind != "running-job-dir":
        assert batch_state(settings, "b") == "open"


async def test_an_orphan_smartlink_folder_a_job_starts_in_is_kept(settings: Settings, monkeypatch) -> None:
    """cleanup --smartlinks checked that no job refers to the folder, then walked it for its
    newest file, then removed it in place: a job started meanwhile published pages into the
    folder being removed. The check and the move out of reach are now one transaction under
    the batch's start lock."""
    from server import janitor
    from server.db import Database

    root = settings.smartlink_root
    assert root is not None
    orphan = root / "reused"
    orphan.mkdir(parents=True)
    (orphan / "x.yyyyyyyyyyyyyyyy.html").write_bytes(b"h" * 11)
    age(orphan, 31 * DAY)
    real = janitor._newest_mtime
    walks: list[Path] = []

    def a_start_comes_in_during_the_walk(path):
        newest = real(path)
        walks.append(path)
        if len(walks) == 2:  # the apply's walk (the plan's is the first)
            add_job(settings, "a" * 32, "reused", status="In progress", rows=[("n1", "s" * 16)], publish=False)
        return newest

    monkeypatch.setattr(janitor, "_newest_mtime", a_start_comes_in_during_the_walk)
    db = Database(settings.database, settings.database_pool)
    try:
        plan = await janitor.cleanup(db, settings, smartlinks=True)
    finally:
        await db.dispose()
    assert len(walks) == 2
    assert [(i.kind, i.result) for i in plan.items] == [("orphan-smartlinks", "kept: in use")]
    assert (orphan / "x.yyyyyyyyyyyyyyyy.html").exists()


async def test_a_job_whose_notifications_are_still_to_be_sent_is_kept_until_they_are(aiohttp_client,
                                                                                    settings: Settings) -> None:
    """Jobs ended while no app process ran (workers run on their own; `drop --force` ends a job
    with no server up), and a `drop` tombstone kept for its notifications, wait for the next
    server's notifier. cleanup removed them once past the retention (`--older-than` may be as
    short as the grace): the callback, and the tombstone's, were never sent. They are kept
    until their notifications are settled, then expire like any other job."""
    import json

    from sqlalchemy import update

    from server.app import create_app
    from server.keys import JOBS
    from tests.support.disk_state import run_cli_async, session
    from tests.support.jobs import callback_receiver

    pending, dropped, quiet = "a1" * 16, "b2" * 16, "c3" * 16
    add_job(settings, pending, "waits", finished_ago=HOUR, rows=[("r1", "s" * 16)])
    add_job(settings, dropped, "gone", finished_ago=HOUR, rows=[("r2", "s" * 16)])
    add_job(settings, quiet, "other", finished_ago=HOUR, rows=[("r3", "s" * 16)])  # nothing to send
    async with callback_receiver() as rcv:
        with session(settings) as s:
            s.execute(update(Job).where(Job.job_id.in_([pending, dropped]))
                      .values(callback_url=rcv.url, callback_state="pending"))
            s.commit()
        rc, out, err = await run_cli_async(settings, "drop", "--smartlinks", "gone")
        assert rc == 0, out + err
        rc, out, err = await run_cli_async(settings, "cleanup", "--older-than", "30m")
        assert rc == 0, out + err
        assert [r[0] for r in table(out).get("expired-job", [])] == [quiet], out
        assert count(settings, Job, Job.job_id.in_([pending, dropped])) == 2
        client = await aiohttp_client(create_app(settings))
        for jid in (pending, dropped):
            await client.app[JOBS].notified(jid, timeout=30)
        sent = sorted((b["job_id"], b["batch_id"]) for b in (json.loads(a[1]) for a in rcv.attempts))
        assert sent == sorted([(pending, "waits"), (dropped, "gone")])
        # Settled: the job expires as any other (the tombstone went with its last outcome).
        rc, out, err = await run_cli_async(settings, "cleanup", "--older-than", "30m")
        assert rc == 0, out + err
        assert [r[0] for r in table(out).get("expired-job", [])] == [pending], out
    assert count(settings, Job) == 0
