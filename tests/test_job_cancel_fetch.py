"""Cancel means stopped, also while a worker waits for a remote asset (issue 8): over the real
app and its worker processes, with an asset server on 127.0.0.1 that holds its answer far
longer than the 2 s a cancel may take (FILEDROP_FETCH_TIMEOUT 20 s, as in production).

An API cancel, ``max_errors`` and a worker's SIGTERM stop the fetch in flight (the asset
server sees its client go away), nothing of the job is published afterwards, and another
job's fetch of the same moment goes on undisturbed."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from server.db.job_models import JobRow
from server.jobs import queries
from server.keys import DATABASE
from tests.support.jobs import AUTH, get_json, rows, slow_asset_server, start_ok, wait_job
from tests.support.waiting import async_wait_until

pytestmark = pytest.mark.engines

SCRIPT = b"window.fetched = 'late';"
QUIET = 3.0  # s a cancelled job is watched for files appearing after its asset is finally answered


@pytest.fixture
def settings(settings):  # type: ignore[no-untyped-def]
    return settings.replace(fetch_timeout=20.0)  # the fetch would outlive any cancel bound by far


def inline_script(url: str) -> dict[str, Any]:
    return {"body": "<p>{{ data.n }}</p>", "scripts": [{"src": url, "inline": True}]}


async def status(client, batch_id: str, job_id: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return await get_json(client, f"/api/batch/{batch_id}/{job_id}/status")


async def arrived(srv, n: int = 1) -> None:  # type: ignore[no-untyped-def]
    async def got() -> bool:
        return len(srv.arrived) >= n

    await async_wait_until(got, timeout=60, what=f"{n} asset request(s) to be held by the slow server")


async def abandoned(srv, what: str) -> None:  # type: ignore[no-untyped-def]
    async def gone() -> bool:
        return what in srv.abandoned

    await async_wait_until(gone, timeout=5, what=f"the fetch of {what} to be abandoned")


async def nothing_appears(folder: Path) -> None:
    """No file of the job appears for ``QUIET`` s (an absence: watched with a deadline)."""
    async def appeared() -> list[str]:
        return sorted(p.name for p in folder.iterdir()) if folder.exists() else []

    deadline = time.monotonic() + QUIET
    while time.monotonic() < deadline:
        assert await appeared() == [], f"files of a cancelled job appeared: {await appeared()}"
        await asyncio.sleep(0.05)  # the watch's pace, under the QUIET deadline


@pytest.mark.parametrize("strategy", ["mixed", "original"])
async def test_cancel_during_a_fetch_answers_cancelled_within_2s(client, settings, strategy) -> None:
    async with slow_asset_server(SCRIPT) as srv:
        job = await start_ok(client, "cfetch", inline_script(srv.url("/a.js")), rows(3), strategy=strategy)
        jid = job["job_id"]
        await arrived(srv)
        t0 = time.monotonic()
        r = await client.post(f"/api/batch/cfetch/{jid}/cancel", headers=AUTH)
        body = await r.json()
        took = time.monotonic() - t0
        assert r.status == 200 and body["status"] == "Cancelled", (took, body)
        assert took < 2.0, f"cancel answered after {took:.2f} s"
        assert (body["succeededCount"], body["erroredCount"], body["reason"]) == (0, 0, "cancelled by request")
        await abandoned(srv, "/a.js")
        # The asset answers now: a fetch that was still going on would let rows render and publish.
        srv.release()
        await nothing_appears(settings.smartlink_root / "cfetch")
        assert srv.arrived == ["/a.js"] and srv.answered == [], (srv.arrived, srv.answered)
    result = (await get_json(client, f"/api/batch/cfetch/{jid}/result"))["rows"]
    assert [x["status"] for x in result] == ["skipped"] * 3
    assert not (settings.assets_dir / jid).exists()  # the job's assets went with it (no temp left)


async def test_max_errors_during_a_fetch_cancels_without_waiting_for_it(client, settings) -> None:
    # Rows 0-15 (a worker's first claim) need the slow asset; the rest fail on their data
    # before any asset is looked at (the template's pdf), so max_errors=0 cancels the job
    # while the asset is still held (whichever worker errs, whether the fetch started).
    template = {"body": "<p>{{ data.n }}</p>", "pdf": "{{ '' if 1 // data.d else '' }}",
                "scripts": [{"src": "{{ data.src }}", "inline": True}]}
    async with slow_asset_server(SCRIPT) as srv:
        data = [{"reference_id": f"r{i:04d}", "suffix": "s" * 16,
                 "data": {"n": i, "d": 1 if i < 16 else 0, "src": srv.url("/a.js")}} for i in range(64)]
        t0 = time.monotonic()
        job = await start_ok(client, "cmax", template, data, strategy="mixed", max_errors=0)
        done = await wait_job(client, "cmax", job["job_id"], timeout=15)
        took = time.monotonic() - t0
        assert done["status"] == "Cancelled", done
        assert "max_errors (0) exceeded" in done["reason"], done
        assert took < 10.0, f"the job ended {took:.1f} s after its start (the asset is held 30 s)"
        assert srv.answered == []
        for what in srv.arrived:  # a fetch that started was abandoned
            await abandoned(srv, what)
        srv.release()
        await nothing_appears(settings.smartlink_root / "cmax")
    assert done["succeededCount"] == 0 and done["erroredCount"] >= 1


async def test_a_worker_stopped_mid_fetch_exits_at_once_and_hands_its_rows_back(client, settings) -> None:
    db = client.app[DATABASE]
    async with slow_asset_server(SCRIPT) as srv:
        job = await start_ok(client, "cterm", inline_script(srv.url("/a.js")), rows(3), strategy="mixed")
        jid = job["job_id"]
        await arrived(srv)

        async def holder() -> str | None:
            async with db.read() as s:
                return await s.scalar(select(JobRow.claimed_by).where(JobRow.job_id == jid,
                                                                      JobRow.status == "claimed").limit(1))

        worker_id = await holder()
        assert worker_id is not None, "no worker holds the rows"
        pid = next(w.pid for w in await queries.workers(db) if w.worker_id == worker_id)
        t0 = time.monotonic()
        os.kill(pid, signal.SIGTERM)

        async def exited() -> bool:
            return not Path(f"/proc/{pid}").exists()

        await async_wait_until(exited, timeout=10, what="the worker to exit")
        took = time.monotonic() - t0
        assert took < 2.0, f"the worker exited {took:.2f} s after SIGTERM"
        await abandoned(srv, "/a.js")
        # Its rows went back to the queue (no attempt counted), for another worker.
        async with db.read() as s:
            attempts = (await s.scalars(select(JobRow.attempts).where(JobRow.job_id == jid))).all()
        assert list(attempts) == [0, 0, 0]
        srv.release()
        done = await wait_job(client, "cterm", jid, timeout=60)
    assert (done["status"], done["succeededCount"]) == ("Completed", 3), done
    page = (settings.smartlink_root / "cterm" / "ref000000.s00000000000000000000.html").read_text()
    assert "window.fetched = 'late';" in page


async def test_cancel_of_one_job_leaves_another_jobs_fetch_alone(client, settings) -> None:
    async with slow_asset_server(SCRIPT) as srv:
        a = await start_ok(client, "cone", inline_script(srv.url("/a.js?for=one")), rows(3), strategy="mixed")
        await arrived(srv, 1)
        b = await start_ok(client, "ctwo", inline_script(srv.url("/a.js?for=two")), rows(3), strategy="mixed")
        await arrived(srv, 2)  # both workers are fetching, one asset each
        r = await client.post(f"/api/batch/cone/{a['job_id']}/cancel", headers=AUTH)
        body = await r.json()
        assert body["status"] == "Cancelled", body
        await abandoned(srv, "/a.js?for=one")
        assert srv.abandoned == ["/a.js?for=one"]
        assert (await status(client, "ctwo", b["job_id"]))["status"] == "In progress"
        srv.release()
        done = await wait_job(client, "ctwo", b["job_id"], timeout=60)
    assert (done["status"], done["succeededCount"]) == ("Completed", 3), done
    assert srv.answered == ["/a.js?for=two"]
    assert "window.fetched = 'late';" in (settings.smartlink_root / "ctwo" /
                                          "ref000002.s00000000000000000002.html").read_text()
    assert not (settings.smartlink_root / "cone").exists() or not any((settings.smartlink_root / "cone").iterdir())
