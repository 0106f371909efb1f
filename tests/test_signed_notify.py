"""notification_method: GET (seed 004) calls the callback URL with the job's counts in the query
and a signature over them, on a real receiver on 127.0.0.1, retried like a POST; POST stays the
default; a job that ends Expired is notified too (callback and e-mail)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
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
