"""Seed 004's flow, end to end through NGINX (the project's nginx.conf) in front of a real
`filedrop serve` and its workers: create a job that waits for its data, PUT the rows to its
upload URL with plain HTTP and no key, follow the status to Completed, download the result by
its signed link (NGINX sends the file from disk) and check every row, and receive the GET
notification with a valid signature on a real receiver on 127.0.0.1. Then every refusal, through
NGINX, each in the JSON shape: a changed path, query, expiry or signature, a URL that expires
during the test, a second PUT, bad data, and data over the limit (NGINX and the app agree)."""

from __future__ import annotations

import csv
import http.client
import io
import json
import sqlite3
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import requests

from server.api.signed import RESULT_PATH
from server.app import create_app
from server.config import Settings
from tests.conftest import API_KEY, AUTH
from tests.support.jobs import SEED_ROWS, SEED_TEMPLATE, rows, start_ok, wait_job
from tests.support.live import FINISHED
from tests.support.nginx import app_behind_nginx, fetch
from tests.support.signed import (
    app_and_front,
    flip_last,
    get_receiver,
    path_of,
    valid_get_notification,
    with_param,
)
from tests.support.waiting import wait_until

SECRET = "callback-secret-for-the-flow"


def create(base: str, batch_id: str, **fields: str) -> dict[str, Any]:
    files: dict[str, Any] = {"document_file": ("t.json", json.dumps(SEED_TEMPLATE), "application/json"),
                             "data_upload": (None, "url")}
    files.update({k: (None, v) for k, v in fields.items()})
    r = requests.post(f"{base}/api/batch/{batch_id}/start", headers=AUTH, files=files, timeout=60)
    assert r.status_code == 201, r.text
    return r.json()


def status(base: str, batch_id: str, job_id: str) -> dict[str, Any]:
    r = requests.get(f"{base}/api/batch/{batch_id}/{job_id}/status", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def put(url: str, body: bytes, headers: dict[str, str] | None = None) -> requests.Response:
    """The PUT a partner's curl makes: no key, the body as is."""
    return requests.put(url, data=body, headers=headers or {}, timeout=60)


def error_of(r: requests.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["Content-Type"].startswith("application/json")
    body = r.json()
    assert body["entity-type"] == "exception" and body["status"] == status and body["code"] == code, body
    assert body["message"]
    return body


def seed_rows(n: int) -> list[dict[str, Any]]:
    return [{"reference_id": f"5ef35018{i:016d}", "suffix": f"5f1ea1e9{i:016d}",
             "data": {"num_client": f"240 000 {i:03d} 425", "montant": str(100 + i)}} for i in range(n)]


def test_seed_004_flow_through_nginx(server_factory, nginx_factory, tmp_path: Path) -> None:
    srv, front = app_behind_nginx(server_factory, nginx_factory, tmp_path / "srv", API_KEY, callback_secret=SECRET)
    with get_receiver() as rcv:
        before = datetime.utcnow().replace(microsecond=0)
        job = create(front.url, "batch-file-160427", callback_url=rcv.url, notification_method="GET")
        job_id = job["job_id"]
        assert job["status"] == "Waiting for data" and job["totalCount"] == 0
        assert job["upload_URL"].startswith(f"{front.url}/api/batch/batch-file-160427/{job_id}/data?")
        expires = datetime.strptime(job["expires"], "%Y-%m-%dT%H:%M:%S.%fZ")
        assert before + timedelta(hours=8) <= expires <= before + timedelta(hours=8, seconds=10)
        assert status(front.url, "batch-file-160427", job_id)["status"] == "Waiting for data"

        # The records, as JSON Lines, by a plain HTTP PUT without any key (http.client: nothing added).
        records = seed_rows(120)
        body = "\n".join(json.dumps(r) for r in records).encode()
        conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=60)
        try:
            conn.request("PUT", path_of(job["upload_URL"]), body=body)
            answer = conn.getresponse()
            put_body = json.loads(answer.read())
        finally:
            conn.close()
        assert answer.status == 201, put_body
        assert put_body["job_id"] == job_id and put_body["totalCount"] == 120

        done = wait_until(lambda: (s := status(front.url, "batch-file-160427", job_id))["status"] in FINISHED and s,
                          timeout=120, interval=0.1, what="the job to end")
        assert done["status"] == "Completed" and done["succeededCount"] == 120 and done["erroredCount"] == 0

        # The result: a signed link, downloaded without the key.
        r = requests.get(f"{front.url}/api/batch/batch-file-160427/{job_id}/result?format=url", headers=AUTH,
                         timeout=30)
        assert r.status_code == 200, r.text
        link = r.json()
        assert link["download_url"].startswith(f"{front.url}/api/batch/batch-file-160427/{job_id}/result?")
        got = requests.get(link["download_url"], timeout=30)
        assert got.status_code == 200, got.text
        assert got.headers["Content-Type"] == "text/csv; charset=utf-8"
        assert got.headers["Content-Disposition"] == f'attachment; filename="{job_id}.csv"'
        assert got.headers["Cache-Control"] == "private, no-store"
        assert got.headers["X-Content-Type-Options"] == "nosniff" and "X-Accel-Redirect" not in got.headers
        table = list(csv.DictReader(io.StringIO(got.content.decode("utf-8"))))
        assert len(table) == 120
        for row, sent in zip(table, records, strict=True):  # every row, in order
            assert row["reference_id"] == sent["reference_id"] and row["suffix"] == sent["suffix"]
            assert row["status"] == "succeeded" and row["error"] == ""
            assert row["url"] == f"{front.url}/batch-file-160427/{sent['reference_id']}.{sent['suffix']}.html"
        for row in (table[0], table[-1]):  # and the links answer through NGINX
            page = requests.get(row["url"], timeout=30)
            assert page.status_code == 200 and "Client 240 000" in page.text
        keyed = requests.get(f"{front.url}/api/batch/batch-file-160427/{job_id}/result?format=csv", headers=AUTH,
                             timeout=30)
        assert got.content == keyed.content  # the same bytes as the keyed CSV

        # NGINX sent it from disk: what the app answers NGINX for that URL is only a redirect to
        # its internal location (asked straight, with the header NGINX adds)...
        accel = requests.get(srv.url + path_of(link["download_url"]), headers={"X-Filedrop-Accel": "results"},
                             timeout=30)
        assert accel.status_code == 200 and accel.content == b""
        assert accel.headers["X-Accel-Redirect"] == f"/.filedrop/results/{job_id}.csv"
        # ...which nobody reaches from outside; and straight to the app (no NGINX) the app sends it.
        hidden = fetch(front.port, "GET", f"/.filedrop/results/{job_id}.csv")
        assert hidden.status == 404 and hidden.json()["code"] == "ERR_NOT_FOUND"
        direct = requests.get(srv.url + path_of(link["download_url"]), timeout=30)
        assert direct.status_code == 200 and direct.content == got.content

        # The notification, by GET, signed over its query.
        rcv.got.wait(timeout=30)
        assert len(rcv.calls) == 1, rcv.calls
        method, path, headers = rcv.calls[0]
        assert method == "GET" and path.startswith("/hook/batch-file?token=abc&batch_id=")
        params = valid_get_notification(path.split("?", 1)[1], SECRET)
        assert params["token"] == "abc"  # the receiver's own query is kept
        assert (params["batch_id"], params["job_id"], params["status"]) == ("batch-file-160427", job_id, "Completed")
        assert (params["succeededCount"], params["erroredCount"]) == ("120", "0")
        assert headers["X-Filedrop-Signature"] == "sha256=" + params["signature"]
    log = srv.log_path.read_text(errors="replace")
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


def test_every_refusal_through_nginx(server_factory, nginx_factory, tmp_path: Path) -> None:
    srv, front = app_and_front(server_factory, nginx_factory, tmp_path / "srv", API_KEY, max_data_size="4K")
    job = create(front.url, "refusals")
    other = create(front.url, "refusals-2")
    url = job["upload_URL"]
    good = json.dumps(rows(2)).encode()
    sig = dict(p.split("=", 1) for p in url.split("?", 1)[1].split("&"))["signature"]
    changed = {
        "another job's path": url.replace(job["job_id"], other["job_id"]),
        "another batch": url.replace("/refusals/", "/refusals-2/"),
        "a later expiry": with_param(url, "expires", str(int(time.time()) + 86400)),
        "the signature": with_param(url, "signature", flip_last(sig)),
        "an added parameter": url + "&format=csv",
        "a parameter twice": url + f"&signature={sig}",
        "another key id": with_param(url, "kid", "0badc0de"),
    }
    for what, bad in changed.items():
        body = error_of(put(bad, good), 403, "ERR_URL_INVALID")
        assert "does not match" in body["message"] or "once" in body["message"], (what, body)
    # Without its signature it is a plain request without a key: 401, empty.
    unsigned = url.split("&signature=")[0]
    r = put(unsigned, good)
    assert r.status_code == 401 and r.content == b""
    # The upload URL's signature does not open the result (another method and path).
    r = requests.get(f"{front.url}/api/batch/refusals/{job['job_id']}/result?" + url.split("?", 1)[1], timeout=30)
    error_of(r, 403, "ERR_URL_INVALID")

    # Bad data: 422 as for a start; the job still waits.
    body = error_of(put(url, b'{"reference_id": "x"'), 422, "ERR_FIELD_INVALID")
    assert body["field"] == "data"
    # Over FILEDROP_MAX_DATA_SIZE (4 KiB): NGINX refuses a declared length, the app a streamed one,
    # with the same status, code and message; exactly the limit passes both.
    too_big = b" " * 4096 + good
    for r in (put(url, too_big), requests.put(srv.url + path_of(url), data=too_big, timeout=30),
              put(url, iter([too_big[:3000], too_big[3000:]])),  # chunked: no Content-Length
              requests.put(srv.url + path_of(url), data=iter([too_big[:3000], too_big[3000:]]), timeout=30)):
        body = error_of(r, 413, "ERR_DATA_TOO_LARGE")
        assert body["message"] == "data is over the 4096-byte limit (FILEDROP_MAX_DATA_SIZE)"
    assert status(front.url, "refusals", job["job_id"])["status"] == "Waiting for data"
    # NGINX refuses a declared length itself, before a byte reaches the app: an NGINX with the
    # same settings and no app behind it answers 413 over the limit and 503 (no app) at it.
    alone = nginx_factory(Settings(data_dir=tmp_path / "srv", max_data_size=4096))
    exact = good + b" " * (4096 - len(good))
    path = path_of(url)
    assert alone.fetch("PUT", path, body=too_big).json()["message"] == body["message"]
    assert alone.fetch("PUT", path, body=exact).json()["code"] == "ERR_APP_UNAVAILABLE"
    r = put(url, exact)
    assert r.status_code == 201, r.text
    # A second PUT after the data arrived.
    body = error_of(put(url, good), 409, "ERR_DATA_RECEIVED")
    assert "arrived already" in body["message"]

    # A URL that expires during the test: wait (bounded) until it is refused as expired.
    short = create(front.url, "refusals-3", expires_in="2")
    deadline = datetime.strptime(short["expires"], "%Y-%m-%dT%H:%M:%S.%fZ")
    assert deadline - datetime.utcnow() <= timedelta(seconds=2)
    # (A Response is falsy when its status is an error: the predicates return it in a tuple.)
    (expired,) = wait_until(lambda: (r := put(short["upload_URL"], b"")).status_code == 403 and (r,),
                            timeout=20, interval=0.1, what="the short URL to expire")
    assert error_of(expired, 403, "ERR_URL_EXPIRED")["message"].startswith("this URL expired at ")
    ended = wait_until(lambda: (s := status(front.url, "refusals-3", short["job_id"]))["status"] == "Expired" and s,
                       timeout=20, interval=0.1, what="the job to end Expired")
    assert ended["reason"] == "no data arrived before the upload URL expired"
    # A download link that expires during the test.
    wait_until(lambda: status(front.url, "refusals", job["job_id"])["status"] in FINISHED, timeout=60,
               what="the job to end")
    r = requests.get(f"{front.url}/api/batch/refusals/{job['job_id']}/result?format=url&expires_in=2",
                     headers=AUTH, timeout=30)
    link = r.json()["download_url"]
    assert requests.get(link, timeout=30).status_code == 200
    (gone,) = wait_until(lambda: (r := requests.get(link, timeout=30)).status_code == 403 and (r,), timeout=20,
                         interval=0.1, what="the download link to expire")
    error_of(gone, 403, "ERR_URL_EXPIRED")

    # Each refusal is at most one line in the log, and none is a traceback.
    log = srv.log_path.read_text(errors="replace")
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    assert log.count("signed URL refused") >= len(changed) + 2
    with sqlite3.connect(tmp_path / "srv" / "filedrop.sqlite3") as c:
        assert c.execute("SELECT count(*) FROM job_rows WHERE job_id = ?", (job["job_id"],)).fetchone() == (2,)


async def test_a_head_of_a_url_signed_for_get_is_judged_as_that_get(aiohttp_client, settings: Settings) -> None:
    """HEAD is GET without the body (RFC 9110, 9.3.2): a download link signed for GET answers a
    HEAD with the GET's status and headers, while a HEAD with no signature still needs the key.
    In process, on the production app."""
    client = await aiohttp_client(create_app(settings))
    done = await start_ok(client, "heads", SEED_TEMPLATE, SEED_ROWS)
    await wait_job(client, "heads", done["job_id"])
    r = await client.get(f"/api/batch/heads/{done['job_id']}/result?format=url", headers=AUTH)
    link = path_of((await r.json())["download_url"])
    got = await client.get(link)
    assert got.status == 200, await got.text()
    head = await client.head(link)
    assert head.status == 200 and await head.read() == b""
    for name in ("Content-Type", "Content-Length", "Content-Disposition", "Cache-Control"):
        assert head.headers[name] == got.headers[name], name
    # The signature is what allows it: without it, a HEAD is a request without a key.
    head = await client.head(link.split("&signature=")[0])
    assert head.status == 401 and "WWW-Authenticate" in head.headers


def test_the_result_route_answers_head(settings: Settings) -> None:
    app = create_app(settings)
    assert ("HEAD", RESULT_PATH) in {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource}
