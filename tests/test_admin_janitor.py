"""The janitor inside the server (periodic, owned, stopped with the app), and cleanup never
removing what is in use while uploads and a job are under way."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from datetime import timedelta

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy import event, update
from sqlalchemy.orm import Session

from server import janitor
from server.app import create_app
from server.config import Settings
from server.db import utcnow
from server.db.job_models import Job
from server.keys import DATABASE, JANITOR, JOBS
from tests.conftest import OTHER_KEY
from tests.support.disk_state import (
    HOUR,
    FileSpec,
    add_batch,
    add_job,
    age,
    batch_state,
    count,
    run_cli_async,
    session,
    table,
)
from tests.support.jobs import SEED_TEMPLATE, get_json, serve, start_ok, wait_job
from tests.support.jobs import rows as job_rows
from tests.support.uploads import Uploads
from tests.support.waiting import async_wait_until

pytestmark = pytest.mark.engines


async def test_janitor_runs_periodically_in_server_and_stops_with_it(aiohttp_client, settings: Settings) -> None:
    pk, _ = add_batch(settings, "expired", [FileSpec()], idle=25 * HOUR)
    client: TestClient = await aiohttp_client(create_app(settings.replace(janitor_interval=0.2)))
    jan = client.app[JANITOR]
    await asyncio.wait_for(jan.passed.wait(), 10)
    assert jan.last is not None and [i.target for i in jan.last.items] == ["expired"]
    assert not (settings.uploads_dir / str(pk)).exists() and batch_state(settings, "expired") is None
    # It keeps running: a leftover made now is gone by a later pass.
    # (In a thread: a blocking SQLite write must not stall the loop the janitor writes from.)
    pk2, _ = await asyncio.to_thread(add_batch, settings, "expired-later", [FileSpec()], idle=25 * HOUR)
    async def second_pass_done() -> bool:  # the row goes during the pass; the count after it
        return await _gone(settings, "expired-later") and jan.passes >= 2
    await async_wait_until(second_pass_done, timeout=10, what="second janitor pass")
    assert not (settings.uploads_dir / str(pk2)).exists()
    task = jan.task
    assert task is not None and not task.done()
    await client.close()
    assert task.done() and task.cancelled()


async def _gone(settings: Settings, batch_id: str) -> bool:
    return await asyncio.to_thread(batch_state, settings, batch_id) is None


async def test_janitor_interval_zero_disables_it(client: TestClient, settings: Settings) -> None:
    pk, _ = add_batch(settings, "expired", [FileSpec()], idle=25 * HOUR)
    jan = client.app[JANITOR]
    assert jan.task is None and jan.passes == 0
    # The same janitor can still be run by hand (the CLI's path); it finds the batch.
    result = await jan.run_once()
    assert [i.result for i in result.items] == ["removed"]
    assert not (settings.uploads_dir / str(pk)).exists()


@pytest.mark.parametrize("smartlinks", [False, True], ids=["pages-kept", "pages-removed"])
async def test_the_janitor_removes_an_expired_jobs_pages_when_told(aiohttp_client, settings: Settings,
                                                                   smartlinks: bool) -> None:
    """A batch's expired job beside a newer one: without FILEDROP_JANITOR_SMARTLINKS the janitor
    removes the old job's row and leaves its pages (after it nothing names them); with it, they go
    with the row, and the newer job's pages stay either way."""
    old = add_job(settings, "o" * 32, "lives-on", finished_ago=40 * 24 * HOUR,
                  rows=[("old1", "s" * 16), ("shared", "s" * 16)])
    new = add_job(settings, "n" * 32, "lives-on", finished_ago=HOUR, rows=[("shared", "s" * 16), ("new1", "s" * 16)])
    client: TestClient = await aiohttp_client(create_app(settings.replace(janitor_interval=0,
                                                                          janitor_smartlinks=smartlinks)))
    result = await client.app[JANITOR].run_once()
    assert [(i.kind, i.target, i.result) for i in result.items] == [("expired-job", "o" * 32, "removed")]
    assert count(settings, Job) == 1
    assert old[0].exists() is not smartlinks  # the old job's own page
    assert all(p.exists() for p in new)  # the newer job's, the shared name included


async def test_cleanup_while_uploads_and_a_job_are_under_way(client: TestClient, settings: Settings) -> None:
    """A chunk stalled mid-body, chunked uploads finishing and assembling, a running job (its
    directory, its rows, an expired job of the same batch): cleanup, both as the CLI beside the
    server and as the in-process janitor over and over, plans none of it; every upload ends
    whole and the job completes."""
    async with contextlib.AsyncExitStack() as stack:
        await _cleanup_while_busy(client, settings, stack)


async def _cleanup_while_busy(client: TestClient, settings: Settings, stack: contextlib.AsyncExitStack) -> None:
    up = Uploads(client)
    root = settings.smartlink_root
    assert root is not None

    # 1. A chunked file whose second chunk is stuck halfway through its body (its .part is open).
    stalled = await up.create()
    data = os.urandom(300_000)
    parts = [data[:100_000], data[100_000:200_000], data[200_000:]]
    r = await up.post(stalled, 0, parts[0], chunk=(0, 3), size=len(data))
    assert r.status == 202, await r.text()
    release = asyncio.Event()

    async def slow_body():  # type: ignore[no-untyped-def]
        yield parts[1][:50_000]
        await release.wait()
        yield parts[1][50_000:]

    stuck = asyncio.create_task(up.post(stalled, 0, slow_body(), chunk=(1, 3), size=len(data)))

    async def part_open() -> bool:
        return any(settings.uploads_dir.glob("*/*/chunks/.1.*.part"))
    await async_wait_until(part_open, timeout=10, what="the stalled chunk's .part file")

    # 2. A real job, held "In progress" by its script asset (served from 127.0.0.1 only once the
    # gate opens), plus, as rows and files, an expired earlier job of the same batch and a
    # crash-old temp file in its directory: all stay while it runs.
    gate = asyncio.Event()

    async def gated_asset(_request: web.Request) -> web.Response:
        await gate.wait()
        return web.Response(body=b"window.ready = true;")

    asset = await stack.enter_async_context(serve(gated_asset))
    stack.callback(gate.set)  # a failing test must not leave the asset server's handler waiting
    template = {"body": "<p>{{ data.n }}</p>", "scripts": [{"src": f"http://127.0.0.1:{asset}/v.js"}]}
    job = await start_ok(client, "live-links", template, job_rows(300), strategy="original")

    async def running() -> bool:
        s = await get_json(client, f"/api/batch/live-links/{job['job_id']}/status")
        return s["status"] == "In progress"
    await async_wait_until(running, timeout=30, what="the job to be in progress")
    published = await asyncio.to_thread(add_job, settings, "8" * 32, "live-links", status="Completed",
                                        finished_ago=40 * 86400, rows=[("old", "s" * 16)])
    leftover_like = root / "live-links" / ".r4.ssssssssssssssss.html.1e1e1e1e.tmp"
    leftover_like.write_bytes(b"<p>old")
    age(leftover_like, HOUR)

    # 3. Parallel chunked uploads (they complete and assemble) while the in-process janitor runs
    # cleanup over and over and the CLI runs one beside the server, all at the grace (--older-than 10m, the floor).
    burst = await up.create()
    payloads = [os.urandom(200_000 + i) for i in range(6)]
    done = asyncio.Event()
    found: list[janitor.Item] = []

    async def janitor_loop() -> int:
        for passes in range(1, 10_000):  # bounded; ends when the uploads are done
            plan = await janitor.cleanup(client.app[DATABASE], settings, older_than=0, smartlinks=True)
            found.extend(plan.items)  # not even planned: nothing here is a leftover
            if done.is_set():
                return passes
        raise AssertionError("the uploads did not finish")

    async def uploads() -> None:
        try:
            await asyncio.gather(*(up.upload(burst, i, p, f"f{i}.bin", chunk_size=50_000)
                                   for i, p in enumerate(payloads)))
        finally:
            done.set()

    loop_task = asyncio.create_task(janitor_loop())
    (rc, out, err), _ = await asyncio.gather(run_cli_async(settings, "cleanup", "--older-than", "10m", "--smartlinks"),
                                             uploads())
    passes = await asyncio.wait_for(loop_task, 60)
    assert passes >= 1
    assert found == [], [(i.kind, i.target, i.result) for i in found]
    assert rc == 0, err
    assert table(out) == {}, out

    # Everything goes on as if nothing had happened.
    release.set()
    r = await stuck
    assert r.status == 202, await r.text()
    r = await up.post(stalled, 0, parts[2], chunk=(2, 3), size=len(data))
    assert r.status == 201, await r.text()
    manifest = await up.manifest(stalled)
    assert manifest["files"][0]["sha256"] == hashlib.sha256(data).hexdigest()
    manifest = await up.manifest(burst)
    assert [f["sha256"] for f in manifest["files"]] == [hashlib.sha256(p).hexdigest() for p in payloads]
    status = await get_json(client, f"/api/batch/live-links/{job['job_id']}/status")
    assert status["status"] == "In progress", status
    gate.set()
    done_job = await wait_job(client, "live-links", job["job_id"])
    assert done_job["status"] == "Completed" and done_job["succeededCount"] == 300, done_job
    assert len(list((root / "live-links").glob("ref*.html"))) == 300
    assert all(p.exists() for p in published) and leftover_like.exists()
    assert count(settings, Job) == 2


def test_a_folder_that_vanished_during_the_plan_is_not_old(tmp_path) -> None:
    """A folder listed by the plan and gone when its age is read (a completed file's dir,
    removed right after the listing) was in use: its missing mtime must not read as "older
    than the grace" (the full suite once planned such a dir as an orphan)."""
    old = tmp_path / "old"
    old.mkdir()
    (old / "f").write_bytes(b"x")
    past = time.time() - 3600
    for p in (old / "f", old):
        os.utime(p, (past, past))
    cutoff = time.time() - 600
    assert janitor._quiet_since(old, cutoff)
    assert not janitor._quiet_since(tmp_path / "gone", cutoff)
    assert not janitor._quiet_since(tmp_path, cutoff)  # written just now


async def test_the_last_expired_job_of_a_batch_takes_its_folder_out_of_reach_as_its_row_goes(
        aiohttp_client, settings: Settings) -> None:
    """With FILEDROP_JANITOR_SMARTLINKS, an expired job's pages went one by one after its row
    was deleted: a job of the same batch started in between had its pages of the same names
    removed once published, or its folder removed under it (the pages 404, the rows
    succeeded). When no job of the batch is left, the folder is now moved out of reach in the
    transaction that deletes the row (under the batch's start lock, as drop does), so a job
    started after it gets a folder of its own; the batch id is then free for any key. Every
    commit is watched: none may leave the row gone and the folder still there."""
    root = settings.smartlink_root
    assert root is not None
    client: TestClient = await aiohttp_client(create_app(settings.replace(janitor_interval=0,
                                                                          janitor_smartlinks=True)))
    job = await start_ok(client, "last-one", SEED_TEMPLATE, job_rows(3))
    assert (await wait_job(client, "last-one", job["job_id"]))["status"] == "Completed"
    pages = sorted(p.name for p in (root / "last-one").iterdir())
    assert len(pages) == 3
    await asyncio.to_thread(_age_job, settings, job["job_id"], 40 * 24 * HOUR)

    seen: list[tuple[int, bool]] = []  # (job rows left, folder there) after each commit

    def after_commit(_session: Session) -> None:
        seen.append((count(settings, Job, Job.job_id == job["job_id"]), (root / "last-one").exists()))

    event.listen(Session, "after_commit", after_commit)
    try:
        result = await client.app[JANITOR].run_once()
    finally:
        event.remove(Session, "after_commit", after_commit)
    assert [(i.kind, i.result) for i in result.items] == [("expired-job", "removed")]
    assert (0, False) in seen and (0, True) not in seen, seen
    assert result.items[0].bytes >= sum(len(p) for p in pages)  # what the folder held, at least
    assert not (root / "last-one").exists()

    # The batch id is free again: another key's job of it publishes into a folder of its own.
    other = await start_ok(client, "last-one", SEED_TEMPLATE, job_rows(3), headers={"X-API-Key": OTHER_KEY})
    await client.app[JOBS].job_finished(other["job_id"], timeout=60)
    r = await client.get(f"/api/batch/last-one/{other['job_id']}/status", headers={"X-API-Key": OTHER_KEY})
    assert (await r.json())["status"] == "Completed"
    assert sorted(p.name for p in (root / "last-one").iterdir()) == pages


def _age_job(settings: Settings, job_id: str, seconds: float) -> None:
    with session(settings) as s:
        s.execute(update(Job).where(Job.job_id == job_id).values(finished=utcnow() - timedelta(seconds=seconds)))
        s.commit()
