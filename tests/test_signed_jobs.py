"""Jobs that wait for their data (data_upload=url), against the real app in process (its
workers real processes) on a migrated SQLite file: the start's answer, the one PUT, every
refusal of a start or a PUT, the duplicate-start rules, cancel, max_errors, Expired."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timedelta

import pytest

from server.app import create_app
from server.keys import JOBS
from tests.conftest import OTHER_KEY
from tests.support.jobs import (
    AUTH,
    SEED_ROWS,
    SEED_TEMPLATE,
    get_json,
    rows,
    start,
    start_ok,
    wait_job,
)
from tests.support.signed import path_of, with_param
from tests.support.uploads import assert_error
from tests.support.waiting import async_wait_until


def parse_iso(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ")


async def start_waiting(client, batch_id: str, **fields) -> dict:  # type: ignore[no-untyped-def]
    r = await start(client, batch_id, SEED_TEMPLATE, None, data_upload="url", **fields)
    body = await r.json()
    assert r.status == 201, body
    return body


async def put_data(client, url: str, data: bytes, headers: dict | None = None):  # type: ignore[no-untyped-def]
    return await client.put(path_of(url), data=data, headers=headers or {})


async def test_a_start_without_rows_waits_for_them_and_one_put_runs_it(client, settings) -> None:
    before = datetime.utcnow().replace(microsecond=0)
    job = await start_waiting(client, "waits")
    assert job["status"] == "Waiting for data" and job["totalCount"] == 0 and job["finished"] is None
    assert job["upload_URL"].startswith(f"{settings.public_url}/api/batch/waits/{job['job_id']}/data?")
    expires = parse_iso(job["expires"])
    assert before + timedelta(hours=8) <= expires <= before + timedelta(hours=8, seconds=5)  # default 8 h
    status = await get_json(client, f"/api/batch/waits/{job['job_id']}/status")
    assert status["status"] == "Waiting for data"
    # The seed's rows as JSON Lines, no key, no Content-Type.
    body = "\n".join(json.dumps(r) for r in SEED_ROWS).encode()
    r = await put_data(client, job["upload_URL"], body)
    got = await r.json()
    assert r.status == 201, got
    assert got["job_id"] == job["job_id"] and got["status"] in ("Queued", "In progress", "Completed")
    assert got["totalCount"] == 2
    done = await wait_job(client, "waits", job["job_id"])
    assert done["status"] == "Completed" and done["succeededCount"] == 2
    page = settings.smartlink_root / "waits" / "5ef3501829bf41003d6da7b4.5f1ea1e9b982f900468aeb5b.html"
    assert "Client 240 000 009 425" in page.read_text()
    log = [e["message"] for e in (await get_json(client, f"/api/batch/waits/{job['job_id']}/log"))["log"]]
    assert log[0].startswith("waiting for data: strategy smallest, the upload URL expires at ")
    assert "data received: 2 rows; queued" in log
    # One PUT per URL: the data arrived already.
    await assert_error(await put_data(client, job["upload_URL"], body), 409, "ERR_DATA_RECEIVED")


async def test_bad_data_is_refused_as_a_start_would_and_loses_nothing(client) -> None:
    job = await start_waiting(client, "badput", expires_in="600")
    url = job["upload_URL"]
    for data, words in ((b"not json", "neither a JSON array nor JSON Lines"), (b"[]", "has no rows"),
                        (b"", "is empty"), (b"[" * 100 + b"]" * 100, "nested"),
                        (b'[{"reference_id": "\\ud800"}]', "surrogate")):
        body = await assert_error(await put_data(client, url, data), 422, "ERR_FIELD_INVALID")
        assert body["field"] == "data" and words in body["message"], body
    status = await get_json(client, f"/api/batch/badput/{job['job_id']}/status")
    assert status["status"] == "Waiting for data" and status["totalCount"] == 0
    r = await put_data(client, url, json.dumps(rows(3)).encode(), {"Content-Type": "application/json"})
    assert r.status == 201, await r.text()
    assert (await wait_job(client, "badput", job["job_id"]))["succeededCount"] == 3


async def test_data_over_the_limit_is_413_streamed_or_declared(aiohttp_client, settings) -> None:
    client = await aiohttp_client(create_app(settings.replace(max_data_size=4096)))
    job = await start_waiting(client, "toolarge")
    big = json.dumps([{"reference_id": "r", "data": {"x": "y" * 5000}}]).encode()
    body = await assert_error(await put_data(client, job["upload_URL"], big), 413, "ERR_DATA_TOO_LARGE")
    assert body["message"] == "data is over the 4096-byte limit (FILEDROP_MAX_DATA_SIZE)"

    async def chunked():  # no Content-Length: counted as it streams
        for _ in range(10):
            yield b" " * 1000

    body = await assert_error(await put_data(client, job["upload_URL"], chunked()), 413, "ERR_DATA_TOO_LARGE")
    assert "FILEDROP_MAX_DATA_SIZE" in body["message"]
    # Exactly at the limit is fine.
    exact = json.dumps(rows(1)).encode()
    r = await put_data(client, job["upload_URL"], exact + b" " * (4096 - len(exact)))
    assert r.status == 201, await r.text()


async def test_start_options_of_a_waiting_job_are_checked(client) -> None:
    cases = [
        ({"data_upload": "s3"}, "data_upload", "data_upload must be url"),
        ({"data_upload": "url", "expires_in": "0"}, "expires_in", "at least 1"),
        ({"data_upload": "url", "expires_in": "1.5"}, "expires_in", "whole number"),
        ({"data_upload": "url", "expires_in": str(7 * 86400 + 1)}, "expires_in", "FILEDROP_MAX_URL_TTL"),
        ({"expires_in": "60"}, "expires_in", "data_upload=url only"),
        ({"notification_method": "PUT", "callback_url": "http://127.0.0.1:9/h"}, "notification_method", "POST or GET"),
        ({"notification_method": "GET"}, "notification_method", "needs a callback_url"),
    ]
    for fields, field, words in cases:
        r = await start(client, "opts", SEED_TEMPLATE, None if "data_upload" in fields else SEED_ROWS, **fields)
        body = await assert_error(r, 422, "ERR_FIELD_INVALID")
        assert body["field"] == field and words in body["message"], (fields, body)
    r = await start(client, "opts", SEED_TEMPLATE, SEED_ROWS, data_upload="url")
    body = await assert_error(r, 422, "ERR_FIELD_INVALID")
    assert body["field"] == "data_upload" and "not both" in body["message"]
    r = await start(client, "opts", SEED_TEMPLATE, None)
    assert (await assert_error(r, 422, "ERR_FIELD_INVALID"))["field"] == "data"
    assert (await get_json(client, "/api/batch/opts/jobs"))["jobs"] == []  # nothing was written


async def test_a_waiting_job_holds_its_batch(client) -> None:
    job = await start_waiting(client, "held", expires_in="3600")
    # The same start again: that job, its URL again (same expiry).
    r = await start(client, "held", SEED_TEMPLATE, None, data_upload="url", expires_in="3600")
    again = await r.json()
    assert r.status == 200 and again["job_id"] == job["job_id"] and again["expires"] == job["expires"]
    assert again["upload_URL"] == job["upload_URL"]
    # Another life for the URL is another start: not the first URL with a life not asked for.
    for other_life in ("100", ""):  # "": the default, 8 h
        body = await assert_error(await start(client, "held", SEED_TEMPLATE, None, data_upload="url",
                                              expires_in=other_life), 409, "ERR_JOB_RUNNING")
        assert body["job_id"] == job["job_id"]
    # Other inputs (rows now, or another template): the batch has a running job.
    body = await assert_error(await start(client, "held", SEED_TEMPLATE, SEED_ROWS), 409, "ERR_JOB_RUNNING")
    assert body["job_id"] == job["job_id"]
    # Another key cannot use the batch id, nor see the job.
    other = {"X-API-Key": OTHER_KEY}
    await assert_error(await start(client, "held", SEED_TEMPLATE, None, headers=other, data_upload="url"),
                       409, "ERR_BATCH_TAKEN")
    await assert_error(await client.get(f"/api/batch/held/{job['job_id']}/status", headers=other), 404,
                       "ERR_JOB_NOT_FOUND")
    # Cancelled while waiting: ended at once, and its URL takes no data.
    r = await client.post(f"/api/batch/held/{job['job_id']}/cancel", headers=AUTH)
    assert (await r.json())["status"] == "Cancelled"
    body = await assert_error(await put_data(client, job["upload_URL"], json.dumps(SEED_ROWS).encode()), 409,
                              "ERR_JOB_NOT_WAITING")
    assert "Cancelled" in body["message"]
    # The batch is free again.
    assert (await start_waiting(client, "held"))["job_id"] != job["job_id"]


async def test_the_data_put_with_the_key_and_jobs_that_wait_for_none(client) -> None:
    job = await start_waiting(client, "keyed")
    path = f"/api/batch/keyed/{job['job_id']}/data"
    # Another key: no such job; no key at all: 401.
    await assert_error(await client.put(path, data=b"[]", headers={"X-API-Key": OTHER_KEY}), 404, "ERR_JOB_NOT_FOUND")
    assert (await client.put(path, data=b"[]")).status == 401
    r = await client.put(path, data=json.dumps(rows(2)).encode(), headers=AUTH)
    assert r.status == 201, await r.text()
    # A job started with its rows waits for none.
    plain = await start_ok(client, "plain", SEED_TEMPLATE, SEED_ROWS)
    body = await assert_error(await client.put(f"/api/batch/plain/{plain['job_id']}/data", data=b"[]", headers=AUTH),
                              409, "ERR_JOB_NOT_WAITING")
    assert "started with its rows" in body["message"]


async def test_bad_rows_at_the_put_count_against_max_errors(client) -> None:
    job = await start_waiting(client, "maxerr", max_errors="0")
    r = await put_data(client, job["upload_URL"], json.dumps([{"reference_id": "../x"}, *rows(2)]).encode())
    got = await r.json()
    assert r.status == 201 and got["status"] == "Cancelled" and got["erroredCount"] == 1, got
    assert got["reason"] == "max_errors (0) exceeded: 1 rows errored"


async def test_an_unused_url_ends_the_job_expired(client, settings) -> None:
    job = await start_waiting(client, "expires", expires_in="1")

    async def ended() -> dict | None:  # type: ignore[type-arg]
        s = await get_json(client, f"/api/batch/expires/{job['job_id']}/status")
        return s if s["status"] == "Expired" else None

    status = await async_wait_until(ended, timeout=15, interval=0.1, what="the job to end Expired")
    assert status["finished"] is not None and status["reason"] == "no data arrived before the upload URL expired"
    body = await assert_error(await put_data(client, job["upload_URL"], json.dumps(SEED_ROWS).encode()), 403,
                              "ERR_URL_EXPIRED")
    assert "expired at" in body["message"]
    # With the key too: the window is closed.
    r = await client.put(f"/api/batch/expires/{job['job_id']}/data", data=json.dumps(SEED_ROWS).encode(), headers=AUTH)
    await assert_error(r, 403, "ERR_URL_EXPIRED")
    await client.app[JOBS].job_finished(job["job_id"], timeout=1)  # an end state, as the service sees it
    log = (await get_json(client, f"/api/batch/expires/{job['job_id']}/log"))["log"]
    assert log[-1]["message"].startswith("Expired: no data arrived before the upload URL expired at ")
    # The batch is free again for a new start.
    assert (await start_waiting(client, "expires"))["status"] == "Waiting for data"


async def test_the_download_link_is_for_ended_jobs(client) -> None:
    job = await start_waiting(client, "notyet")
    r = await client.get(f"/api/batch/notyet/{job['job_id']}/result?format=url", headers=AUTH)
    body = await assert_error(r, 409, "ERR_JOB_NOT_FINISHED")
    assert "Waiting for data" in body["message"]
    done = await start_ok(client, "ended", SEED_TEMPLATE, SEED_ROWS)
    await wait_job(client, "ended", done["job_id"])
    for bad in ("0", "x", str(7 * 86400 + 1)):
        r = await client.get(f"/api/batch/ended/{done['job_id']}/result?format=url&expires_in={bad}", headers=AUTH)
        assert (await assert_error(r, 422, "ERR_FIELD_INVALID"))["field"] == "expires_in"
    # expires_in without format=url asks for a link the answer does not hold: refused, not passed over
    for fmt in ("", "&format=csv", "&format=json"):
        r = await client.get(f"/api/batch/ended/{done['job_id']}/result?expires_in=60{fmt}", headers=AUTH)
        body = await assert_error(r, 422, "ERR_FIELD_INVALID")
        assert (body["field"], body["message"]) == ("expires_in", "expires_in applies to format=url only")
    r = await client.get(f"/api/batch/ended/{done['job_id']}/result?format=url", headers=AUTH)
    link = await r.json()
    assert r.status == 200 and set(link) == {"download_url", "expires"}
    assert parse_iso(link["expires"]) - datetime.utcnow() > timedelta(minutes=59)  # default 1 h
    # Straight to the app (no NGINX in front): the app sends the file, the same bytes as format=csv.
    r = await client.get(path_of(link["download_url"]))
    assert r.status == 200 and r.headers["Content-Type"] == "text/csv; charset=utf-8"
    assert r.headers["Cache-Control"] == "private, no-store" and "X-Accel-Redirect" not in r.headers
    csv_keyed = await (await client.get(f"/api/batch/ended/{done['job_id']}/result?format=csv", headers=AUTH)).text()
    assert await r.text() == csv_keyed and csv_keyed.count("succeeded") == 2
    # format=json is not what was signed.
    r = await client.get(path_of(with_param(link["download_url"], "format", "json")))
    await assert_error(r, 403, "ERR_URL_INVALID")
    await assert_error(await client.get(f"/api/batch/ended/{done['job_id']}/result?format=xml", headers=AUTH), 422,
                       "ERR_FIELD_INVALID")


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_other_methods_on_a_signed_url_are_not_opened_by_it(client, method: str) -> None:
    job = await start_waiting(client, "methods")
    r = await client.request(method, path_of(job["upload_URL"]))
    assert r.status == 401  # a signature signed for PUT is no credential for anything else: no key, 401
    r = await client.request(method, path_of(job["upload_URL"]), headers=AUTH)
    assert r.status == 405  # and the data route is PUT only


async def test_expired_jobs_are_cleaned_up_like_other_finished_jobs(client, settings) -> None:
    from server.janitor import cleanup
    from server.keys import DATABASE

    job = await start_waiting(client, "cleaned", expires_in="1")
    await client.app[JOBS].job_finished(job["job_id"], timeout=15)
    with sqlite3.connect(settings.db_path) as c:  # finished 31 days ago, as far as cleanup can tell
        c.execute("UPDATE jobs SET finished = datetime(finished, '-31 days') WHERE job_id = ?", (job["job_id"],))
    plan = await cleanup(client.app[DATABASE], settings)
    assert [(i.kind, i.target, i.result) for i in plan.items if i.kind == "expired-job"] == [
        ("expired-job", job["job_id"], "removed")]
    await assert_error(await client.get(f"/api/batch/cleaned/{job['job_id']}/status", headers=AUTH), 404)


async def test_drop_refuses_a_waiting_job_unless_forced(client, settings) -> None:
    from server.errors import JobRunning
    from server.janitor import drop_smartlink_batch
    from server.keys import DATABASE

    job = await start_waiting(client, "dropwait")
    with pytest.raises(JobRunning):
        await drop_smartlink_batch(client.app[DATABASE], settings, "dropwait")
    await drop_smartlink_batch(client.app[DATABASE], settings, "dropwait", force=True, cancel_wait=5)
    await assert_error(await put_data(client, job["upload_URL"], json.dumps(SEED_ROWS).encode()), 403,
                       "ERR_URL_INVALID")  # the job is gone: its URL names nothing


async def test_a_result_csv_goes_with_its_job(client, settings) -> None:
    import os
    import time

    from server.janitor import cleanup, drop_smartlink_batch
    from server.keys import DATABASE

    done = await start_ok(client, "csvgone", SEED_TEMPLATE, SEED_ROWS)
    await wait_job(client, "csvgone", done["job_id"])
    r = await client.get(f"/api/batch/csvgone/{done['job_id']}/result?format=url", headers=AUTH)
    assert r.status == 200
    csv_file = settings.results_dir / f"{done['job_id']}.csv"
    assert csv_file.read_text().startswith("reference_id,suffix,url,status,error\n")
    assert oct(csv_file.stat().st_mode & 0o777) == "0o600"
    await drop_smartlink_batch(client.app[DATABASE], settings, "csvgone")  # the job's rows go, the CSV stays
    plan = await cleanup(client.app[DATABASE], settings)
    assert [i for i in plan.items if i.kind == "temp-file"] == []  # younger than the grace: kept
    old = time.time() - settings.cleanup_grace - 60
    os.utime(csv_file, (old, old))
    plan = await cleanup(client.app[DATABASE], settings)
    assert [(i.kind, i.detail, i.result) for i in plan.items] == [
        ("temp-file", "result CSV of a job that is gone", "removed")]
    assert not csv_file.exists()


@pytest.mark.engines
async def test_a_signed_url_whose_batch_id_is_no_batch_id_is_invalid_not_a_500(client) -> None:
    """The routes that take a signature look up the owner of the batch their path names before
    anything checks that name: a NUL in it (``%00``) reached PostgreSQL, which refuses one in a
    query parameter, and a request without any key was a 500 with a traceback. No URL is signed
    for such a name: 403 ERR_URL_INVALID, as for any other changed path."""
    job = await start_waiting(client, "nulbatch")
    r = await client.post("/api/v1/upload", headers=AUTH)
    batch = (await r.json())["batchId"]
    r = await client.post(f"/api/v1/upload/{batch}/0/presign", headers=AUTH)
    presigned = (await r.json())["upload_URL"]
    data_url = path_of(job["upload_URL"])
    tampered = {
        "data PUT": ("PUT", data_url.replace("/nulbatch/", "/nul%00batch/")),
        "result GET": ("GET", data_url.replace("/nulbatch/", "/nul%00batch/").replace("/data?", "/result?")),
        "upload PUT": ("PUT", path_of(presigned).replace(f"/{batch}/", f"/{batch[:4]}%00{batch[4:]}/")),
    }
    for what, (method, path) in tampered.items():
        r = await client.request(method, path, data=b"[]", headers={"X-File-Name": "a.txt"})
        assert r.status == 403, (what, r.status, await r.text())
        await assert_error(r, 403, "ERR_URL_INVALID")


@pytest.mark.engines
async def test_a_job_route_whose_batch_id_holds_a_nul_is_404_with_the_key(client) -> None:
    """The same NUL with the key: the job routes read the job by (job_id, batch_id) without
    checking the batch id, and on PostgreSQL each was a 500. No job is in such a batch: 404."""
    job = await start_waiting(client, "nulkeyed")
    base = f"/api/batch/nul%00keyed/{job['job_id']}"
    for method, path in (("GET", "/status"), ("GET", "/log"), ("GET", "/result"), ("GET", "/cancel"),
                         ("POST", "/cancel"), ("PUT", "/data")):
        r = await client.request(method, base + path, data=b"[]", headers=AUTH)
        assert r.status == 404, (method, path, r.status, await r.text())
        await assert_error(r, 404, "ERR_JOB_NOT_FOUND")
    assert (await get_json(client, f"/api/batch/nulkeyed/{job['job_id']}/status"))["status"] == "Waiting for data"
