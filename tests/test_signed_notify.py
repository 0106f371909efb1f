"""notification_method: GET (seed 004) calls the callback URL with the job's counts in the query
and a signature over them, on a real receiver on 127.0.0.1, retried like a POST; POST stays the
default; a job that ends Expired is notified too (callback and e-mail). The e-mail's result link
is a signed download URL, opened without a key, until a time the e-mail states."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import hmac
import io
import json
import re
import time
from datetime import UTC, datetime
from email import message_from_bytes
from urllib.parse import parse_qsl, urlencode

from aiohttp import web

from server.app import create_app
from server.keys import JOBS
from tests.support.jobs import (
    SEED_ROWS,
    SEED_TEMPLATE,
    serve,
    smtp_server,
    start,
    start_ok,
    wait_job,
)
from tests.support.signed import flip_last, params_of, path_of, with_param
from tests.support.uploads import assert_error


class Receiver:
    """Records (method, query string, headers, body); 500 to the first ``fail_first`` calls."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.calls: list[tuple[str, str, dict[str, str], bytes]] = []
        self.delivered = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.calls.append((request.method, request.query_string, dict(request.headers), await request.read()))
        if len(self.calls) <= self.fail_first:
            return web.Response(status=500)
        self.delivered.set()
        return web.Response(status=204)


def check(query: str, secret: str) -> dict[str, str]:
    """What a receiver does (README): recompute the signature over the five parameters."""
    params = dict(parse_qsl(query))
    signed = urlencode([(k, params[k]) for k in ("batch_id", "job_id", "status", "succeededCount", "erroredCount")])
    expected = hmac.new(secret.encode(), signed.encode(), hashlib.sha256).hexdigest()
    assert hmac.compare_digest(params["signature"], expected), (query, signed)
    return params


async def test_a_get_notification_carries_the_counts_and_a_signature(client, settings) -> None:
    rcv = Receiver(fail_first=1)
    async with serve(rcv.handle) as port:
        url = f"http://127.0.0.1:{port}/listener?partner=p%201"
        rows = [*SEED_ROWS, {"reference_id": "bad/ref", "data": {}}]
        job = await start_ok(client, "getnote", SEED_TEMPLATE, rows, callback_url=url, notification_method="get")
        await asyncio.wait_for(rcv.delivered.wait(), timeout=30)
        await client.app[JOBS].notified(job["job_id"], timeout=30)
    assert len(rcv.calls) == 2  # the first answered 500: retried
    for method, query, headers, body in rcv.calls:
        assert method == "GET" and body == b""
        params = check(query, settings.callback_secret)
        assert headers["X-Filedrop-Signature"] == "sha256=" + params["signature"]
    assert params == {"partner": "p 1", "batch_id": "getnote", "job_id": job["job_id"],
                      "status": "Completed with errors", "succeededCount": "2", "erroredCount": "1",
                      "signature": params["signature"]}
    # A changed value breaks the signature.
    tampered = rcv.calls[-1][1].replace("succeededCount=2", "succeededCount=3")
    params = dict(parse_qsl(tampered))
    signed = urlencode([(k, params[k]) for k in ("batch_id", "job_id", "status", "succeededCount", "erroredCount")])
    assert params["signature"] != hmac.new(settings.callback_secret.encode(), signed.encode(),
                                           hashlib.sha256).hexdigest()
    log = [e["message"] for e in (await (await client.get(
        f"/api/batch/getnote/{job['job_id']}/log", headers={"X-API-Key": "test-key-0123456789"})).json())["log"]]
    assert any(m.startswith("callback attempt 1/5 to ") and "HTTP 500" in m for m in log)


async def test_post_stays_the_default(client, settings) -> None:
    rcv = Receiver()
    async with serve(rcv.handle) as port:
        job = await start_ok(client, "postnote", SEED_TEMPLATE, SEED_ROWS, callback_url=f"http://127.0.0.1:{port}/h")
        await client.app[JOBS].notified(job["job_id"], timeout=30)
    ((method, query, headers, body),) = rcv.calls
    assert method == "POST" and query == "" and json.loads(body)["status"] == "Completed"
    assert headers["X-Filedrop-Signature"] == "sha256=" + hmac.new(settings.callback_secret.encode(), body,
                                                                   hashlib.sha256).hexdigest()


async def test_a_job_that_expired_unused_is_notified(aiohttp_client, settings) -> None:
    rcv = Receiver()
    async with serve(rcv.handle) as port, smtp_server() as (smtp_port, smtp):
        client = await aiohttp_client(create_app(settings.replace(smtp_port=smtp_port)))
        r = await start(client, "expnote", SEED_TEMPLATE, None, data_upload="url", expires_in="1",
                        callback_url=f"http://127.0.0.1:{port}/h", notification_method="GET",
                        callback_emails="ops@example.com")
        job = await r.json()
        assert r.status == 201, job
        await client.app[JOBS].notified(job["job_id"], timeout=30)
    ((method, query, _headers, _body),) = rcv.calls
    params = check(query, settings.callback_secret)
    assert (method, params["status"], params["succeededCount"]) == ("GET", "Expired", "0")
    ((_from, _to, content),) = smtp.messages
    text = message_from_bytes(content).get_payload(decode=True).decode()
    assert "Status:    Expired" in text and "Reason:    no data arrived before the upload URL expired" in text
    done = await wait_job(client, "expnote", job["job_id"])
    assert done["status"] == "Expired"


async def test_smartlinks_generate_takes_the_notification_method(client, settings) -> None:
    auth = {"X-API-Key": "test-key-0123456789"}
    batch = (await (await client.post("/api/v1/upload", headers=auth)).json())["batchId"]
    for idx, doc in enumerate((SEED_TEMPLATE, SEED_ROWS)):
        r = await client.post(f"/api/v1/upload/{batch}/{idx}", data=json.dumps(doc).encode(),
                              headers={**auth, "X-File-Name": f"{idx}.json"})
        assert r.status == 201, await r.text()
    rcv = Receiver()
    async with serve(rcv.handle) as port:
        r = await client.post(f"/api/v1/upload/{batch}/execute/SmartLinks.Generate", headers=auth, json={"params": {
            "template": 0, "data": 1, "batch_id": "fromupload", "callback_url": f"http://127.0.0.1:{port}/h",
            "notification_method": "GET"}})
        job = await r.json()
        assert r.status == 202, job
        await client.app[JOBS].notified(job["job_id"], timeout=30)
    ((method, query, _headers, _body),) = rcv.calls
    assert method == "GET" and check(query, settings.callback_secret)["status"] == "Completed"


async def emailed_link(aiohttp_client, settings, batch_id: str):  # type: ignore[no-untyped-def]
    """Run a job with an e-mail through a real aiosmtpd server: (client, the job's status, the
    message's text, the result link in it)."""
    async with smtp_server() as (port, smtp):
        client = await aiohttp_client(create_app(settings.replace(smtp_port=port)))
        job = await start_ok(client, batch_id, SEED_TEMPLATE, SEED_ROWS, callback_emails="ops@example.com")
        await client.app[JOBS].notified(job["job_id"], timeout=30)
    done = await wait_job(client, batch_id, job["job_id"])
    ((_from, _to, content),) = smtp.messages
    text = message_from_bytes(content).get_payload(decode=True).decode()
    links = re.findall(r"https?://\S+", text)
    assert len(links) == 1, text
    return client, done, text, links[0]


async def test_the_emails_result_link_is_signed_and_needs_no_key(aiohttp_client, settings) -> None:
    """Whoever gets the e-mail opens the result without the key (a key typed into a browser's
    login dialog would be kept for the origin the tenants' smartlinks share), as long as a
    signed URL may live (FILEDROP_MAX_URL_TTL), and the e-mail says until when."""
    client, done, text, link = await emailed_link(aiohttp_client, settings, "maillink")
    job_id = done["job_id"]
    assert link.startswith(f"{settings.public_url}/api/batch/maillink/{job_id}/result?"), link
    params = dict(params_of(link))
    assert params.keys() == {"format", "expires", "kid", "signature"} and params["format"] == "csv", params
    expires = int(params["expires"])
    assert abs(expires - (time.time() + settings.max_url_ttl)) < 120, (expires, time.time())
    assert f"until {datetime.fromtimestamp(expires, UTC):%Y-%m-%d %H:%M:%S} UTC" in text, text
    r = await client.get(path_of(link))  # no key
    assert r.status == 200, await r.text()
    assert r.headers["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(await r.text())))
    assert [(row["status"], bool(row["url"])) for row in rows] == [("succeeded", True)] * 2, rows
    # A changed link is refused, and nothing is answered for it.
    for changed in (with_param(link, "signature", flip_last(params["signature"])),
                    with_param(link, "expires", str(expires + 3600)),
                    with_param(link, "format", "json")):
        await assert_error(await client.get(path_of(changed)), 403, "ERR_URL_INVALID")
    # The signature opens that one request: the job's other routes still want the key.
    r = await client.get(path_of(link).replace("/result?", "/status?"))
    assert r.status == 401


async def test_the_emails_result_link_does_not_outlive_the_job(aiohttp_client, settings) -> None:
    """With FILEDROP_JOB_RETENTION under FILEDROP_MAX_URL_TTL the job (and its result) is removed
    first: the link says it ends then, not at a time it can no longer keep."""
    client, done, text, link = await emailed_link(aiohttp_client, settings.replace(job_retention=86400.0),
                                                  "mailkept")
    finished = datetime.strptime(done["finished"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC, microsecond=0)
    expires = int(dict(params_of(link))["expires"])
    assert expires == int(finished.timestamp()) + 86400, (expires, done["finished"])
    assert f"until {datetime.fromtimestamp(expires, UTC):%Y-%m-%d %H:%M:%S} UTC" in text, text
    assert (await client.get(path_of(link))).status == 200
