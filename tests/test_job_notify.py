"""On finish: a signed callback to a real receiver (first attempt fails, retried), e-mail through
a real aiosmtpd server, and the callback refused by the fetch guard when 127.0.0.1 is not allowed."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import sqlite3
import time
from email import message_from_bytes
from email.utils import parsedate_to_datetime

import pytest
from aiohttp import web
from sqlalchemy import create_engine, func, select, text

from server.app import create_app
from server.db.job_models import Job
from server.keys import JOBS
from tests.support.database import connect
from tests.support.jobs import (
    AUTH,
    SEED_ROWS,
    SEED_TEMPLATE,
    callback_receiver,
    get_json,
    serve,
    smtp_server,
    start,
    start_ok,
    wait_job,
)
from tests.support.uploads import assert_error
from tests.support.waiting import async_wait_until

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
    handler = _RefusingFirst(asyncio.get_running_loop(), fail_first=2)
    async with smtp_server(handler) as (port, _):
        client = await aiohttp_client(create_app(settings.replace(smtp_port=port, callback_retries=3)))
        job = await start_ok(client, "mailretry", SEED_TEMPLATE, SEED_ROWS, callback_emails="ops@example.com")
        await client.app[JOBS].notified(job["job_id"], timeout=30)
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


class DatabaseHold:
    """Another process's hold on the database, as the notifier meets it writing the job's log:
    on SQLite the write lock (BEGIN IMMEDIATE) kept past busy_timeout ("database is locked"); on
    PostgreSQL an ACCESS EXCLUSIVE lock on job_logs, and the sessions that wait for it ended
    (pg_terminate_backend: "the database connection was lost"; a worker's too, if one waits:
    workers recover from that)."""

    def __init__(self, settings) -> None:  # type: ignore[no-untyped-def]
        self.settings = settings
        self.sqlite: sqlite3.Connection | None = None
        self.engine = None if not settings.database_url else \
            create_engine(settings.sync_db_url, isolation_level="AUTOCOMMIT")
        self.locker = self.engine.connect() if self.engine is not None else None

    def take(self) -> None:
        if self.locker is None:
            self.sqlite = sqlite3.connect(self.settings.db_path, isolation_level=None, check_same_thread=False)
            self.sqlite.execute("BEGIN IMMEDIATE")
        else:
            self.locker.execute(text("BEGIN"))
            self.locker.execute(text("LOCK TABLE job_logs IN ACCESS EXCLUSIVE MODE"))

    def end_waiters(self) -> None:
        """PostgreSQL: end the sessions waiting for the lock on job_logs (not those waiting for
        them, e.g. for a job row one of them holds: they go on once these are gone)."""
        assert self.engine is not None
        with self.engine.connect() as probe:
            probe.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE relation = 'job_logs'::regclass AND NOT granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"))

    def release(self) -> None:
        if self.sqlite is not None:
            self.sqlite.execute("ROLLBACK")
            self.sqlite.close()
            self.sqlite = None
        if self.locker is not None:
            self.locker.execute(text("ROLLBACK"))

    def close(self) -> None:
        self.release()
        if self.locker is not None:
            self.locker.close()
        if self.engine is not None:
            self.engine.dispose()


async def test_a_database_fault_while_notifying_does_not_leave_it_sending(client, settings, caplog) -> None:
    """The receiver took the first callback; recording that failed (the database held by another
    process). The failure was only logged: the callback stayed `sending`, which the notifier
    never looks at again before a restart. It goes back to `pending` and is sent again
    (at-least-once, as after a crash)."""
    hold = DatabaseHold(settings)
    calls: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        calls.append(request.method)
        if len(calls) == 1:  # the first delivery arrives: its record meets the hold
            await asyncio.to_thread(hold.take)
        return web.Response(status=204)

    failed = "notification failed"

    async def failed_once() -> bool:
        if any(failed in r.getMessage() for r in caplog.records):
            return True
        if settings.database_url and len(calls) == 1:  # (the attempt after is not to be ended)
            await asyncio.to_thread(hold.end_waiters)
        return False

    try:
        async with serve(handler) as port:
            job = await start_ok(client, "cbfault", SEED_TEMPLATE, SEED_ROWS,
                                 callback_url=f"http://127.0.0.1:{port}/hook")
            await async_wait_until(failed_once, timeout=30, interval=0.05, what="the notifier's write to fail")
            await asyncio.to_thread(hold.release)
            await client.app[JOBS].notified(job["job_id"], timeout=30)
    finally:
        await asyncio.to_thread(hold.close)
    assert calls == ["POST", "POST"]
    assert job_row(settings, job["job_id"])[0] == "sent"
    lines = [r for r in caplog.records if failed in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING and lines[0].exc_info is None, lines



async def test_a_fault_of_ours_while_notifying_ends_it_failed(aiohttp_client, settings, caplog) -> None:
    """An exception of another kind after the e-mail was taken (here a From no e-mail header can
    hold: a linefeed inside) left it `sending` for ever. Sent again it would fail again: it is
    recorded `failed`, with the traceback in the log (our fault). The settings refuse such a From
    (FILEDROP_SMTP_FROM), so it is given to this app's own Settings past them, and the job, with
    no worker to run it (they would read the settings again), is ended by a cancel."""
    async with smtp_server() as (port, smtp):
        client = await aiohttp_client(create_app(settings.replace(
            workers=0, smtp_port=port, smtp_from="jobs@filedrop.test\nBcc: x@example.com")))
        job = await start_ok(client, "mailfault", SEED_TEMPLATE, SEED_ROWS, callback_emails="ops@example.com")
        r = await client.post(f"/api/batch/mailfault/{job['job_id']}/cancel", headers=AUTH)
        assert r.status == 200 and (await r.json())["status"] == "Cancelled"
        await client.app[JOBS].notified(job["job_id"], timeout=30)
    assert smtp.messages == []
    assert job_row(settings, job["job_id"])[1] == "failed"
    lines = [r for r in caplog.records if "notification failed" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.ERROR and lines[0].exc_info is not None, lines


async def test_a_callback_is_delivered_by_its_status_whatever_the_body_that_follows(aiohttp_client,
                                                                                     settings) -> None:
    """The receiver answered 200 at once, then kept its body coming (here: announced and never
    sent; a huge or endless one alike). The whole body was read, unbounded: the attempt ran into
    FILEDROP_FETCH_TIMEOUT and counted as failed (and was sent again), and a big body sat in the
    API process's memory. The status is the answer: the body is not read."""
    requests: list[str] = []
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        requests.append(request.method)
        resp = web.StreamResponse(status=200)
        resp.content_length = 10 << 30  # 10 GiB promised
        await resp.prepare(request)
        await release.wait()  # ...and none of it sent
        return resp

    client = await aiohttp_client(create_app(settings.replace(fetch_timeout=3.0, callback_retries=2)))
    try:
        async with serve(handler) as port:
            job = await start_ok(client, "cbbody", SEED_TEMPLATE, SEED_ROWS,
                                 callback_url=f"http://127.0.0.1:{port}/hook")
            await client.app[JOBS].notified(job["job_id"], timeout=30)
            release.set()
    finally:
        release.set()
    assert requests == ["POST"]
    assert job_row(settings, job["job_id"])[0] == "sent"
    log = (await get_json(client, f"/api/batch/cbbody/{job['job_id']}/log"))["log"]
    assert any("callback delivered" in e["message"] and "(attempt 1, HTTP 200)" in e["message"] for e in log), log


class _PickyRecipients:
    """An aiosmtpd handler that refuses one mailbox for good (550), answers another "try again
    later" (450) the first ``busy`` times, and takes the rest."""

    def __init__(self, loop: asyncio.AbstractEventLoop, busy: int) -> None:
        self.loop, self.busy = loop, busy
        self.rcpts: list[tuple[str, int]] = []  # every RCPT and the code it got
        self.messages: list[tuple[list[str], bytes]] = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options) -> str:  # noqa: N802 (aiosmtpd API)
        if address == "nobody@example.com":
            self.rcpts.append((address, 550))
            return "550 5.1.1 no such user"
        if address == "busy@example.com" and self.busy > 0:
            self.busy -= 1
            self.rcpts.append((address, 450))
            return "450 4.2.1 mailbox busy, try again later"
        self.rcpts.append((address, 250))
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802 (aiosmtpd API)
        self.messages.append((list(envelope.rcpt_tos), envelope.content))
        return "250 Message accepted for delivery"


async def test_an_email_refused_for_some_recipients_is_retried_for_those_and_not_called_sent(
        aiohttp_client, settings) -> None:
    """The SMTP server took the message for one address, answered 450 (try later) for another and
    550 (no such user) for a third. That counted as sent to all three: the log said so, the 450
    was never tried again and the 550 went unmentioned. Now each attempt goes to the addresses
    still waiting (the same message), a 4xx is retried with the backoff, a 5xx is logged and not
    retried, and the e-mail is `sent` only when every address was taken."""
    handler = _PickyRecipients(asyncio.get_running_loop(), busy=1)
    async with smtp_server(handler) as (port, _):
        client = await aiohttp_client(create_app(settings.replace(smtp_port=port, callback_retries=3)))
        job = await start_ok(client, "mailpicky", SEED_TEMPLATE, SEED_ROWS,
                             callback_emails="ok@example.com,busy@example.com,nobody@example.com")
        await client.app[JOBS].notified(job["job_id"], timeout=30)
    assert handler.rcpts == [("ok@example.com", 250), ("busy@example.com", 450), ("nobody@example.com", 550),
                             ("busy@example.com", 250)]
    assert [rcpts for rcpts, _ in handler.messages] == [["ok@example.com"], ["busy@example.com"]]
    first, second = (message_from_bytes(content) for _, content in handler.messages)
    assert first["Message-ID"] == second["Message-ID"] == f"<filedrop.{job['job_id']}@localhost>"
    assert first["To"] == "ok@example.com, busy@example.com, nobody@example.com"
    assert job_row(settings, job["job_id"])[1] == "failed"  # one mailbox never got it
    log = [(e["level"], e["message"]) for e in
           (await get_json(client, f"/api/batch/mailpicky/{job['job_id']}/log"))["log"] if "e-mail" in e["message"]]
    assert ("info", "e-mail sent to ok@example.com") in log, log
    assert any(level == "error" and m.startswith("e-mail to nobody@example.com refused for good: 550")
               for level, m in log), log
    assert any(level == "warning" and m.startswith("e-mail attempt 1/3 to busy@example.com failed: 450")
               for level, m in log), log
    assert ("info", "e-mail sent to busy@example.com (attempt 2)") in log, log
