"""Job lifecycle over the real app: max_errors cancels with a reason, cancel stops new rows
within a second and keeps written ones, a duplicate start returns the running job."""

from __future__ import annotations

import time

import pytest

from server.keys import JOBS
from tests.support.jobs import AUTH, get_json, rows, start, start_ok, wait_job
from tests.support.uploads import assert_error
from tests.support.waiting import async_wait_until

pytestmark = pytest.mark.engines

# ~1-2 ms of sandboxed work per row, so a few thousand rows stay in progress for seconds.
SLOW = {"body": "{% for i in range(20000) %}{% endfor %}<p>{{ data.n }}</p>"}
DIVIDE = {"body": "<p>{{ 100 // data.d }}</p>"}


def divide_rows(n: int, zeros: set[int]) -> list[dict]:
    return [{"reference_id": f"r{i}", "suffix": f"{i:016d}", "data": {"d": 0 if i in zeros else 1}} for i in range(n)]


async def status(client, batch_id: str, job_id: str) -> dict:
    return await get_json(client, f"/api/batch/{batch_id}/{job_id}/status")


async def test_max_errors_exceeded_cancels_with_reason(client, settings) -> None:
    job = await start_ok(client, "maxerr", DIVIDE, divide_rows(4000, {10, 20, 30}), max_errors=2)
    done = await wait_job(client, "maxerr", job["job_id"])
    assert done["status"] == "Cancelled", done
    assert done["erroredCount"] == 3
    assert "max_errors (2) exceeded" in done["reason"]
    assert done["succeededCount"] + done["erroredCount"] < 4000
    files = list((settings.smartlink_root / "maxerr").iterdir())
    assert len(files) == done["succeededCount"]
    log = (await get_json(client, f"/api/batch/maxerr/{job['job_id']}/log"))["log"]
    assert any("max_errors (2) exceeded" in e["message"] and e["level"] == "error" for e in log)
    result = (await get_json(client, f"/api/batch/maxerr/{job['job_id']}/result"))["rows"]
    assert sum(r["status"] == "skipped" for r in result) == 4000 - done["succeededCount"] - 3
    assert "ZeroDivisionError" in next(r["error"] for r in result if r["reference_id"] == "r10")


async def test_max_errors_not_exceeded_completes_with_errors(client) -> None:
    job = await start_ok(client, "maxok", DIVIDE, divide_rows(300, {1, 150, 299}), max_errors=3)
    done = await wait_job(client, "maxok", job["job_id"])
    assert (done["status"], done["succeededCount"], done["erroredCount"]) == ("Completed with errors", 297, 3)
    assert "reason" not in done


async def test_max_errors_zero_and_a_bad_row_cancels_at_once(client, settings) -> None:
    data = [{"reference_id": "bad id!"}, *rows(500)]
    job = await start_ok(client, "maxzero", {"body": "x"}, data, max_errors=0)
    done = await wait_job(client, "maxzero", job["job_id"])
    assert (done["status"], done["succeededCount"], done["erroredCount"]) == ("Cancelled", 0, 1)
    assert "max_errors (0) exceeded" in done["reason"]


async def test_cancel_stops_new_rows_within_a_second(client, settings) -> None:
    job = await start_ok(client, "cancelme", SLOW, rows(4000))
    jid = job["job_id"]

    async def some_done() -> bool:
        s = await status(client, "cancelme", jid)
        return s["status"] == "In progress" and s["succeededCount"] > 0

    await async_wait_until(some_done, timeout=30, what="first rows rendered")
    t0 = time.monotonic()
    r = await client.post(f"/api/batch/cancelme/{jid}/cancel", headers=AUTH)
    body = await r.json()
    elapsed = time.monotonic() - t0
    assert r.status == 200 and body["status"] == "Cancelled", body
    assert elapsed < 1.0, f"cancel took {elapsed:.2f}s"
    assert body["reason"] == "cancelled by request"
    assert 0 < body["succeededCount"] < 4000 and body["erroredCount"] == 0
    # rows already written stay; nothing was written after the job ended
    written = sorted(p.name for p in (settings.smartlink_root / "cancelme").iterdir())
    assert len(written) == body["succeededCount"] and not any(n.startswith(".") for n in written)
    result = (await get_json(client, f"/api/batch/cancelme/{jid}/result"))["rows"]
    assert sum(r["status"] == "succeeded" for r in result) == body["succeededCount"]
    assert sum(r["status"] == "skipped" for r in result) == 4000 - body["succeededCount"]
    # cancel is idempotent (GET accepted too) and the status stays
    r = await client.get(f"/api/batch/cancelme/{jid}/cancel", headers=AUTH)
    assert (await r.json())["status"] == "Cancelled"
    log = (await get_json(client, f"/api/batch/cancelme/{jid}/log"))["log"]
    assert any("cancelling: cancelled by request" in e["message"] for e in log)
    assert "skipped" in log[-1]["message"]


async def test_duplicate_start_returns_the_running_job(client) -> None:
    data = rows(4000)
    job = await start_ok(client, "dup", SLOW, data, strategy="smallest")
    again = await start(client, "dup", SLOW, data, strategy="smallest")
    body = await again.json()
    assert again.status == 200, body
    assert body["job_id"] == job["job_id"]
    other = await start(client, "dup", SLOW, data, strategy="mixed")
    err = await assert_error(other, 409, "ERR_JOB_RUNNING")
    assert err["job_id"] == job["job_id"]
    r = await client.post(f"/api/batch/dup/{job['job_id']}/cancel", headers=AUTH)
    assert (await r.json())["status"] == "Cancelled"
    # once it has ended, the same inputs start a new job
    fresh = await start_ok(client, "dup", {"body": "x"}, rows(2))
    assert fresh["job_id"] != job["job_id"]
    assert (await wait_job(client, "dup", fresh["job_id"]))["status"] == "Completed"


async def test_api_keeps_answering_during_a_big_job(client) -> None:
    from tests.support.uploads import Uploads

    job = await start_ok(client, "busy", SLOW, rows(5000))
    jid = job["job_id"]

    async def running() -> bool:
        s = await status(client, "busy", jid)
        return s["status"] == "In progress" and s["succeededCount"] > 0

    await async_wait_until(running, timeout=30, what="the job to be rendering")
    up = Uploads(client)
    worst = 0.0
    seen_running = 0
    for i in range(10):
        t0 = time.monotonic()
        s = await status(client, "busy", jid)
        batch = await up.create()
        await up.upload(batch, 0, b"x" * 4096, f"f{i}.bin")
        worst = max(worst, time.monotonic() - t0)
        seen_running += s["status"] == "In progress"
    assert seen_running >= 5, "the job ended too early to show anything"
    assert worst < 1.0, f"a status + upload round took {worst:.2f}s during the job"
    r = await client.post(f"/api/batch/busy/{jid}/cancel", headers=AUTH)
    assert (await r.json())["status"] == "Cancelled"


async def test_job_that_cannot_write_its_folder_fails_with_reason(client, settings) -> None:
    from tests.support.jobs import callback_receiver

    settings.smartlink_root.mkdir(parents=True, exist_ok=True)
    (settings.smartlink_root / "blocked").write_text("a file where the folder should be")
    async with callback_receiver() as rcv:
        job = await start_ok(client, "blocked", {"body": "x"}, rows(3), callback_url=rcv.url)
        done = await wait_job(client, "blocked", job["job_id"])
        await client.app[JOBS].notified(job["job_id"], timeout=30)
    assert done["status"] == "Failed" and "cannot create the output folder blocked/" in done["reason"]
    assert (done["succeededCount"], done["erroredCount"], done["totalCount"]) == (0, 0, 3)
    assert done["finished"] is not None
    result = (await get_json(client, f"/api/batch/blocked/{job['job_id']}/result"))["rows"]
    assert {r["status"] for r in result} == {"skipped"}
    assert len(rcv.attempts) == 1 and b'"status":"Failed"' in rcv.attempts[0][1]


async def test_log_format_must_be_known(client) -> None:
    """``?format=xml`` answered JSON; result's unknown format was already a 422."""
    job = await start_ok(client, "logfmt", {"body": "x"}, rows(1))
    await wait_job(client, "logfmt", job["job_id"])
    r = await client.get(f"/api/batch/logfmt/{job['job_id']}/log?format=xml", headers=AUTH)
    body = await assert_error(r, 422, "ERR_FIELD_INVALID")
    assert (body["field"], body["message"]) == ("format", "format must be json or text")
    r = await client.get(f"/api/batch/logfmt/{job['job_id']}/log?format=text", headers=AUTH)
    assert r.status == 200 and r.content_type == "text/plain" and "queued: 1 rows" in await r.text()
    assert (await get_json(client, f"/api/batch/logfmt/{job['job_id']}/log?format=json"))["log"]
