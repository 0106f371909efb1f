"""On finish: a signed callback to a real receiver (first attempt fails, retried), e-mail through
a real aiosmtpd server, and the callback refused by the fetch guard when 127.0.0.1 is not allowed."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from email import message_from_bytes
from email.utils import parsedate_to_datetime

import pytest
from sqlalchemy import func, select

from server.app import create_app
from server.db.job_models import Job
from server.keys import JOBS
from tests.support.database import connect
from tests.support.jobs import (
    SEED_ROWS,
    SEED_TEMPLATE,
    callback_receiver,
    get_json,
    smtp_server,
    start,
    start_ok,
    wait_job,
)
from tests.support.uploads import assert_error

pytestmark = pytest.mark.engines


def job_row(settings, job_id: str) -> tuple:
    with connect(settings) as c:
        return tuple(c.execute(select(Job.callback_state, Job.email_state).where(Job.job_id == job_id)).one())


async def test_callback_is_signed_and_retried(client, settings) -> None:
    async with callback_receiver(fail_first=1) as rcv:
        job = await start_ok(client, "cb", SEED_TEMPLATE, SEED_ROWS, callback_url=rcv.url)
        await asyncio.wait_for(rcv.delivered.wait(), timeout=30)
        await client.app[JOBS].notified(job["job_id"], timeout=30)
    assert len(rcv.attempts) == 2
    for headers, body in rcv.attempts:
        expected = "sha256=" + hmac.new(settings.callback_secret.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["X-Filedrop-Signature"], expected)
        assert headers["Content-Type"] == "application/json"
    sent = json.loads(rcv.attempts[-1][1])
    assert sent["job_id"] == job["job_id"] and sent["status"] == "Completed" and sent["succeededCount"] == 2
    assert sent["finished"] is not None
    assert job_row(settings, job["job_id"])[0] == "sent"
    log = (await get_json(client, f"/api/batch/cb/{job['job_id']}/log"))["log"]
    assert any("callback attempt 1/5" in e["message"] and "HTTP 500" in e["message"] for e in log)
    assert any("callback delivered" in e["message"] and "attempt 2" in e["message"] for e in log)


async def test_callback_gives_up_after_retries(aiohttp_client, settings) -> None:
    client = await aiohttp_client(create_app(settings.replace(callback_retries=3)))
    async with callback_receiver(fail_first=100) as rcv:
        job = await start_ok(client, "cbfail", SEED_TEMPLATE, SEED_ROWS, callback_url=rcv.url)
        await client.app[JOBS].notified(job["job_id"], timeout=30)
    assert len(rcv.attempts) == 3
    assert job_row(settings, job["job_id"])[0] == "failed"
    # the last attempt is the giving up: an error, as the e-mail's last is (it was a warning like the others)
    log = (await get_json(client, f"/api/batch/cbfail/{job['job_id']}/log"))["log"]
    assert [e["level"] for e in log if e["message"].startswith("callback attempt")] == ["warning", "warning", "error"]


async def test_callback_to_internal_address_refused_at_start(aiohttp_client, settings) -> None:
    # The guard would refuse it at the end (and retry 5 times for nothing): refused up front.
    client = await aiohttp_client(create_app(settings.replace(fetch_allow=(), callback_retries=2)))
    async with callback_receiver() as rcv:
        r = await start(client, "cbguard", SEED_TEMPLATE, SEED_ROWS, callback_url=rcv.url)
        body = await assert_error(r, 422, "ERR_FIELD_INVALID")
        assert body["field"] == "callback_url" and "internal address 127.0.0.1" in body["message"]
        # A name that does not resolve may resolve later: accepted (its attempts are logged).
        job = await start_ok(client, "cbdns", SEED_TEMPLATE, SEED_ROWS, callback_url="http://no-such-host.invalid/h")
        await client.app[JOBS].notified(job["job_id"], timeout=30)
    assert rcv.attempts == []
    assert job_row(settings, job["job_id"])[0] == "failed"
    with connect(settings) as c:
        assert c.scalar(select(func.count()).select_from(Job).where(Job.batch_id == "cbguard")) == 0


async def test_email_is_sent_with_status_and_result_link(aiohttp_client, settings) -> None:
    async with smtp_server() as (port, smtp):
        client = await aiohttp_client(create_app(settings.replace(smtp_port=port, smtp_from="jobs@filedrop.test")))
        job = await start_ok(client, "mail", SEED_TEMPLATE, SEED_ROWS,
                             callback_emails="ops@example.com, boss@example.org")
        done = await wait_job(client, "mail", job["job_id"])
        await asyncio.wait_for(smtp.received.wait(), timeout=30)
        await client.app[JOBS].notified(job["job_id"], timeout=30)
    assert len(smtp.messages) == 1
    mail_from, rcpts, content = smtp.messages[0]
    assert mail_from == "jobs@filedrop.test"
    assert sorted(rcpts) == ["boss@example.org", "ops@example.com"]
    msg = message_from_bytes(content)
    assert msg["Subject"] == f"filedrop batch mail: {done['status']}"
    # RFC 5322's required Date (it had none), and a Message-ID that is the job's
    assert abs(parsedate_to_datetime(msg["Date"]).timestamp() - time.time()) < 120
    assert msg["Message-ID"] == f"<filedrop.{job['job_id']}@filedrop.test>"
    text = msg.get_payload(decode=True).decode()
    assert f"Job:       {job['job_id']}" in text and "Succeeded: 2 of 2" in text
    assert f"{settings.public_url}/api/batch/mail/{job['job_id']}/result" in text
    assert job_row(settings, job["job_id"])[1] == "sent"


async def test_email_goes_once_to_each_mailbox_however_spelled(aiohttp_client, settings) -> None:
    async with smtp_server() as (port, smtp):
        client = await aiohttp_client(create_app(settings.replace(smtp_port=port)))
        job = await start_ok(client, "maildup", SEED_TEMPLATE, SEED_ROWS,
                             callback_emails="dup@example.com, dup@example.com,DUP@example.com,ops@example.com")
        await client.app[JOBS].notified(job["job_id"], timeout=30)
    assert len(smtp.messages) == 1
    _from, rcpts, content = smtp.messages[0]
    assert rcpts == ["dup@example.com", "ops@example.com"]  # the first spelling kept, in order
    assert message_from_bytes(content)["To"] == "dup@example.com, ops@example.com"
    assert job_row(settings, job["job_id"])[1] == "sent"


class _RefusingFirst:
    """An aiosmtpd handler that answers 451 (try again later) to the first ``fail_first``
    messages, then accepts."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fail_first: int) -> None:
        self.loop, self.fail_first = loop, fail_first
        self.tries = 0
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.received = asyncio.Event()

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802 (aiosmtpd API)
        self.tries += 1
        if self.tries <= self.fail_first:
            return "451 Requested action aborted: try again later"
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        self.loop.call_soon_threadsafe(self.received.set)
        return "250 Message accepted for delivery"


async def test_email_is_retried_as_callbacks_are(aiohttp_client, settings) -> None:
    from aiosmtpd.controller import Controller

    from tests.support.waiting import free_port

    handler = _RefusingFirst(asyncio.get_running_loop(), fail_first=2)
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    await asyncio.to_thread(controller.start)
    try:
        client = await aiohttp_client(create_app(settings.replace(smtp_port=port, callback_retries=3)))
        job = await start_ok(client, "mailretry", SEED_TEMPLATE, SEED_ROWS, callback_emails="ops@example.com")
        await client.app[JOBS].notified(job["job_id"], timeout=30)
    finally:
        await asyncio.to_thread(controller.stop)
    assert handler.tries == 3 and len(handler.messages) == 1
    assert job_row(settings, job["job_id"])[1] == "sent"
    log = (await get_json(client, f"/api/batch/mailretry/{job['job_id']}/log"))["log"]
    failed = [e for e in log if "e-mail attempt" in e["message"]]
    assert [e["message"].split(" to ")[0] for e in failed] == ["e-mail attempt 1/3", "e-mail attempt 2/3"]
    assert all("451" in e["message"] and e["level"] == "warning" for e in failed)
    assert any(e["message"] == "e-mail sent to ops@example.com (attempt 3)" for e in log)


async def test_email_gives_up_after_retries_when_smtp_is_down(aiohttp_client, settings) -> None:
    from tests.support.waiting import free_port

    port = free_port()  # nothing listens there
    client = await aiohttp_client(create_app(settings.replace(smtp_port=port, callback_retries=3)))
    job = await start_ok(client, "maildown", SEED_TEMPLATE, SEED_ROWS, callback_emails="ops@example.com")
    await client.app[JOBS].notified(job["job_id"], timeout=30)
    assert job_row(settings, job["job_id"])[1] == "failed"
    log = (await get_json(client, f"/api/batch/maildown/{job['job_id']}/log"))["log"]
    failed = [(e["level"], e["message"].split(" to ")[0]) for e in log if "e-mail attempt" in e["message"]]
    assert failed == [("warning", "e-mail attempt 1/3"), ("warning", "e-mail attempt 2/3"),
                      ("error", "e-mail attempt 3/3")]


async def test_the_email_does_not_wait_for_the_callbacks_retries(aiohttp_client, settings) -> None:
    """Callback and e-mail go side by side: a receiver that fails every attempt (3, 2 s then 4 s
    apart) does not hold back the e-mail, which waited for all of them before."""
    async with smtp_server() as (port, smtp), callback_receiver(fail_first=100) as rcv:
        client = await aiohttp_client(create_app(settings.replace(
            smtp_port=port, callback_retries=3, callback_backoff=2.0)))
        job = await start_ok(client, "both", SEED_TEMPLATE, SEED_ROWS, callback_url=rcv.url,
                             callback_emails="ops@example.com")
        await asyncio.wait_for(smtp.received.wait(), timeout=30)
        assert len(rcv.attempts) < 3, "the e-mail waited for the callback to give up"
        await client.app[JOBS].notified(job["job_id"], timeout=60)
    assert len(rcv.attempts) == 3 and len(smtp.messages) == 1
    assert job_row(settings, job["job_id"]) == ("failed", "sent")
