"""Telling the job's owner it finished: a signed callback (POST or GET) and e-mails.

``notification_method`` POST (the default): the body is the job's status JSON;
``X-Filedrop-Signature: sha256=<hex>`` is the HMAC-SHA256 of exactly those bytes under
``settings.callback_secret``, so a receiver can check ``hmac.compare_digest(sign(secret, body),
header)``. GET (seed 004): ``batch_id``, ``job_id``, ``status``, ``succeededCount`` and
``erroredCount`` are appended to the URL's query, form-encoded in that order, then
``signature=<hex>``, the HMAC-SHA256 of exactly that encoded text (``notification_query``); the
header carries it too. Delivery is at-least-once: the state is recorded on the job after the
attempt, so a crash between the receiver's 2xx and that record sends it again on restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from datetime import timedelta
from email.message import EmailMessage
from email.utils import formatdate, parseaddr
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import aiosmtplib
from sqlalchemy import select, update

from server.config import Settings
from server.db import Database, connection_lost, log_failure
from server.db.engine import database_locked
from server.db.job_models import Job
from server.jobs import queries
from server.jobs.fetch import Fetcher, FetchError
from server.jobs.states import FINISHED, job_json
from server.signing import Link, Signer, expiry_after

log = logging.getLogger("filedrop.jobs.notify")

SIGNATURE_HEADER = "X-Filedrop-Signature"


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def callback_body(job: dict[str, Any]) -> bytes:
    return json.dumps(job, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def notification_query(job: dict[str, Any]) -> str:
    """What a GET notification appends to the callback URL's query (before ``signature``), and
    exactly the text its signature covers."""
    return urlencode([(k, str(job[k])) for k in ("batch_id", "job_id", "status", "succeededCount", "erroredCount")])


def notification_url(url: str, job: dict[str, Any], secret: str) -> tuple[str, str]:
    """The GET notification's URL (the callback URL's own query kept, ours appended) and its
    signature header."""
    query = notification_query(job)
    signature = sign(secret, query.encode("ascii"))
    parts = urlsplit(url)
    ours = f"{query}&signature={signature.removeprefix('sha256=')}"
    return urlunsplit(parts._replace(query=f"{parts.query}&{ours}" if parts.query else ours, fragment="")), signature


async def deliver_callback(fetcher: Fetcher, settings: Settings, url: str, job: dict[str, Any],
                           note: Callable[[str, str], Awaitable[None]], method: str = "POST") -> bool:
    """Call ``url`` with the job (POST: its JSON; GET: its counts in the query, see the module
    docstring); up to ``callback_retries`` attempts, the delay doubling from
    ``callback_backoff``. True once a 2xx arrives. ``note(level, message)`` records each attempt
    (the last failed one as an error)."""
    body: bytes | None
    if method == "GET":
        target, signature = notification_url(url, job, settings.callback_secret)
        body, headers = None, {SIGNATURE_HEADER: signature}
    else:
        target, body = url, callback_body(job)
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(settings.callback_secret, body)}
    attempts = max(1, settings.callback_retries)
    delay = settings.callback_backoff
    for attempt in range(1, attempts + 1):
        try:
            status = await fetcher.send(method, target, headers, body)
            if 200 <= status < 300:
                await note("info", f"callback delivered to {url} (attempt {attempt}, HTTP {status})")
                return True
            problem = f"HTTP {status}"
        except FetchError as e:
            problem = str(e)
        await note("warning" if attempt < attempts else "error",  # the last: given up, as for e-mails
                   f"callback attempt {attempt}/{attempts} to {url} failed: {problem}")
        if attempt < attempts:
            await asyncio.sleep(delay)  # backoff between delivery attempts (production, not a test wait)
            delay *= 2
    return False


def distinct_addresses(addresses: Iterable[str]) -> list[str]:
    """``addresses`` without blanks and repeats, compared case-insensitively (the first spelling
    kept): one mailbox is one RCPT."""
    seen: set[str] = set()
    out: list[str] = []
    for a in addresses:
        a = a.strip()
        if a and a.casefold() not in seen:
            seen.add(a.casefold())
            out.append(a)
    return out


async def send_emails(settings: Settings, to: list[str], job: dict[str, Any], result: Link | None,
                      recipients: list[str] | None = None) -> dict[str, tuple[int, str]]:
    """One message to the ``to`` addresses through ``smtp_host:smtp_port``, sent to
    ``recipients`` (default: all of ``to``; a retry's are those still waiting); raises on
    failure. Returns the recipients the server refused, each with its reply's code and text
    (every one of them refused: ``aiosmtplib.SMTPRecipientsRefused``). ``result``: the signed
    link to the result, and until when it works; None: the job was dropped, its result is gone."""
    msg = EmailMessage()
    msg["From"] = settings.smtp_from
    msg["To"] = ", ".join(to)
    msg["Subject"] = f"filedrop batch {job['batch_id']}: {job['status']}"
    # RFC 5322 requires Date; the Message-ID is the job's, so a message sent again (a retry, or
    # at-least-once across a crash) is recognisably the same one.
    msg["Date"] = formatdate(usegmt=True)
    domain = parseaddr(settings.smtp_from)[1].rpartition("@")[2] or "localhost"
    msg["Message-ID"] = f"<filedrop.{job['job_id']}@{domain}>"
    lines = [
        f"Batch:     {job['batch_id']}",
        f"Job:       {job['job_id']}",
        f"Status:    {job['status']}",
        f"Succeeded: {job['succeededCount']} of {job['totalCount']}",
        f"Errored:   {job['erroredCount']}",
        f"Started:   {job['started']}",
        f"Finished:  {job['finished']}",
    ]
    if job.get("reason"):
        lines.append(f"Reason:    {job['reason']}")
    if result is None:
        lines += ["", "Result: none, the batch was dropped (`filedrop drop`): its pages and rows are gone", ""]
    else:
        lines += ["", f"Result (every row's link, as CSV; no key needed): {result.url}",
                  f"This link works until {result.expires:%Y-%m-%d %H:%M:%S} UTC.", ""]
    msg.set_content("\n".join(lines))
    errors, _ = await aiosmtplib.send(msg, recipients=to if recipients is None else recipients,
                                      hostname=settings.smtp_host, port=settings.smtp_port,
                                      timeout=settings.fetch_timeout, start_tls=False, use_tls=False)
    return {a: (r.code, r.message) for a, r in errors.items()}


async def deliver_emails(settings: Settings, to: list[str], job: dict[str, Any],
                         result_link: Callable[[], Awaitable[Link]] | None,
                         note: Callable[[str, str], Awaitable[None]]) -> bool:
    """``send_emails`` with the callbacks' retry policy: up to ``callback_retries`` attempts, the
    delay doubling from ``callback_backoff``. True once the server took the message for every
    address. An attempt goes to the addresses still waiting: one the server refused with a 4xx
    (try later) waits for the next attempt, one refused with a 5xx is refused for good (logged
    as an error, not tried again; the outcome is then False). ``result_link()`` makes the
    result's link, once: every attempt sends the same message (None: the job was dropped).
    ``note(level, message)`` records each attempt (the last failed one as an error)."""
    result = None if result_link is None else await result_link()
    attempts = max(1, settings.callback_retries)
    delay = settings.callback_backoff
    waiting = list(to)
    lost = False  # an address refused for good
    for attempt in range(1, attempts + 1):
        level = "warning" if attempt < attempts else "error"
        try:
            try:
                refused = await send_emails(settings, to, job, result, waiting)
            except aiosmtplib.SMTPRecipientsRefused as e:  # every address of this attempt refused
                refused = {r.recipient: (r.code, r.message) for r in e.recipients}
            took = [a for a in waiting if a not in refused]
            if took:
                await note("info", f"e-mail sent to {', '.join(took)}" + (f" (attempt {attempt})" if attempt > 1 else ""))
            for a, (code, text) in refused.items():
                if code >= 500:
                    lost = True
                    await note("error", f"e-mail to {a} refused for good: {code} {text}")
            waiting = [a for a in waiting if a in refused and refused[a][0] < 500]
            if not waiting:
                return not lost
            await note(level, f"e-mail attempt {attempt}/{attempts} to {', '.join(waiting)} failed: "
                       + "; ".join(f"{refused[a][0]} {refused[a][1]}" for a in waiting))
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
            await note(level, f"e-mail attempt {attempt}/{attempts} to {', '.join(waiting)} failed: {e}")
        if attempt < attempts:
            await asyncio.sleep(delay)  # backoff between delivery attempts (production, not a test wait)
            delay *= 2
    return False


class Notifier:
    """Sends the callback and e-mails of every ended job, whichever process ended it (a worker,
    an API cancel, ``drop --force``): an owned loop in the API process that looks for jobs with
    a ``pending`` notification every ``POLL`` s (or when woken).

    With several app processes one sends: the one holding the ``notifier`` lock (an advisory
    lock on PostgreSQL, gone with its process); the others try to take it every
    ``STANDBY_POLL`` s. Each notification is taken with a conditional UPDATE (``pending`` ->
    ``sending``), so it is sent once; the outcome (``sent``/``failed``) is recorded after the
    attempt. Whoever takes the lock first turns ``sending`` back into ``pending``: only a
    holder that died (or lost its database connection) can have left it (at-least-once for a
    crash between the receiver's 2xx and that record). A send of the holder's own that fails
    once it took its notification (its job log or its outcome not written: the database busy
    past its timeout, its connection lost) does not leave it ``sending`` either: the loop puts
    it back (``_unstick``). Each job is sent from its own task, at most ``PARALLEL`` at a time.

    A job ``filedrop drop`` removed before its notification was sent is a tombstone
    (``queries.DROPPED``, hidden from the API): sent like any job, with the job JSON frozen at the
    drop (and no result link, which is gone), its attempts logged by the server (its job log is
    gone), and deleted in the transaction that records its last outcome.
    """

    POLL = 0.5
    STANDBY_POLL = 1.0
    PARALLEL = 16

    def __init__(self, db: Database, settings: Settings, fetcher: Fetcher, signer: Signer) -> None:
        self.db = db
        self.settings = settings
        self.fetcher = fetcher
        self.signer = signer  # the app's: one cache of the signing keys per process
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(self.PARALLEL)
        self._tasks: set[asyncio.Task[None]] = set()
        self._busy: set[str] = set()  # jobs a task of ours is sending
        # (job_id, state column) a send of ours took and failed to settle -> the state to record
        self._stuck: dict[tuple[str, str], str] = {}
        self.leading = False  # this process holds the notifier lock...
        self._epoch = 0  # ...taken on this lock connection

    def wake(self) -> None:
        self._wake.set()

    async def result_link(self, job: Job) -> Link:
        """The e-mail's link to an ended job's result: the download link ``?format=url`` gives
        (the CSV, no key), for as long as a signed URL may live (``max_url_ttl``) but not past
        the job's removal (``job_retention`` after it finished). A browser is never asked for
        the key (``server.auth``): a login typed into its dialog would be kept for the origin
        the tenants' smartlinks share, and sent with their requests."""
        expires = expiry_after(self.settings.max_url_ttl)
        if job.finished is not None:
            expires = min(expires, (job.finished + timedelta(seconds=self.settings.job_retention))
                          .replace(microsecond=0))
        return await self.signer.result_link(job.batch_id, job.job_id, job.owner, expires)

    async def recover(self) -> None:
        """As the lock is taken: what a dead holder left ``sending`` is sent again."""
        async with self.db.write() as s:
            await s.execute(update(Job).where(Job.callback_state == "sending").values(callback_state="pending"))
            await s.execute(update(Job).where(Job.email_state == "sending").values(email_state="pending"))

    async def _lead(self) -> bool:
        locks = self.db.locks
        # The lock went with a broken connection (a PostgreSQL restart): another process may hold
        # it now, and two senders would each put the other's sends in flight back to pending.
        if self.leading and (locks.epoch != self._epoch or not await locks.holds("notifier")):
            log.warning("the notifier lock was lost with the database connection; taking it again")
            self.leading = False
        if not self.leading and await locks.try_take("notifier"):
            self.leading, self._epoch = True, locks.epoch
            await self.recover()
        return self.leading

    async def run(self) -> None:
        try:
            while True:
                self._wake.clear()
                try:
                    leading = await self._lead()
                    if not leading:  # whoever holds the lock put what we left `sending` back as it took it
                        self._stuck.clear()
                    for job_id in await self._due() if leading else []:
                        if job_id in self._busy:
                            continue
                        await self._slots.acquire()
                        self._busy.add(job_id)
                        t = asyncio.create_task(self._send(job_id), name=f"job-notify-{job_id}")
                        self._tasks.add(t)
                        t.add_done_callback(self._tasks.discard)
                    if leading:
                        await self._unstick()  # after the sends: one that cannot be recorded holds none up
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # the database busy, say: look again at the next poll
                    log_failure(log, "looking for notifications to send failed", e)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.POLL if self.leading else self.STANDBY_POLL)
        finally:
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self.leading:
                self.leading = False
                with contextlib.suppress(Exception):
                    await self.db.locks.release("notifier")

    async def _unstick(self) -> None:
        """Settle what a send of ours took and could not settle (``_deliver``): nothing else
        looks at a ``sending`` notification before the lock changes hands. Back to ``pending``
        after a database fault (sent again at once: at-least-once, as after a crash); ``failed``
        after a fault of ours, which would come back with every attempt. An entry goes once
        its state is recorded (the database may still be failing: the next poll tries again)."""
        if not self._stuck:
            return
        stuck = dict(self._stuck)
        async with self.db.write() as s:
            for (job_id, name), state in stuck.items():
                column = getattr(Job, name)
                await s.execute(update(Job).where(Job.job_id == job_id, column == "sending").values({name: state}))
                await s.execute(queries.forget_dropped_stmt(job_id))
        for k in stuck:
            del self._stuck[k]

    async def _deliver(self, job_id: str, name: str, delivery: Awaitable[bool]) -> None:
        """Await ``delivery`` of a notification this process took (its ``name`` column is
        ``sending``) and record the outcome; if either raises, leave the state to
        ``_unstick``."""
        try:
            ok = await delivery
            await self._set(job_id, **{name: "sent" if ok else "failed"})
        except Exception as e:
            transient = connection_lost(e) is not None or database_locked(e)
            self._stuck[(job_id, name)] = "pending" if transient else "failed"
            self.wake()
            raise

    async def _due(self) -> list[str]:
        async with self.db.read() as s:
            return list((await s.scalars(select(Job.job_id).where(
                (Job.callback_state == "pending") | (Job.email_state == "pending"),
                Job.status.in_(FINISHED)))).all())

    async def _take(self, job_id: str, column: Any) -> bool:
        async with self.db.write() as s:
            res = await s.execute(update(Job).where(Job.job_id == job_id, column == "pending")
                                  .values({column: "sending"}))
        return bool(res.rowcount)

    async def _set(self, job_id: str, **values: str) -> None:
        """Record an outcome; a tombstone (dropped meanwhile, too) whose notifications are now all
        settled goes in the same transaction."""
        async with self.db.write() as s:
            await s.execute(update(Job).where(Job.job_id == job_id).values(**values))
            await s.execute(queries.forget_dropped_stmt(job_id))

    async def _send(self, job_id: str) -> None:
        try:
            async with self.db.read() as s:
                job = await s.get(Job, job_id)
                if job is not None:
                    s.expunge(job)
            if job is None:
                return
            dropped = job.batch_id == queries.DROPPED
            body = json.loads(job.template) if dropped else job_json(job)

            async def note(level: str, message: str) -> None:
                if dropped:  # nobody can read its job log any more: the server's log says it
                    log.log(logging.getLevelName(level.upper()), "dropped job %s (batch %s): %s",
                            job_id, body["batch_id"], message)
                else:
                    await queries.note(self.db, job_id, level, message)

            async def callback() -> None:
                if job.callback_url and await self._take(job_id, Job.callback_state):
                    await self._deliver(job_id, "callback_state", deliver_callback(
                        self.fetcher, self.settings, job.callback_url, body, note, job.notification_method))

            async def emails() -> None:
                if job.callback_emails and await self._take(job_id, Job.email_state):
                    to = distinct_addresses(job.callback_emails.split(","))  # also jobs stored before starts deduped
                    url = None if dropped else functools.partial(self.result_link, job)  # made as it is sent
                    await self._deliver(job_id, "email_state", deliver_emails(self.settings, to, body, url, note))

            # Side by side: neither waits for the other's retries. Each settles its own state;
            # the one that settles last forgets a dropped job's tombstone.
            for failed in await asyncio.gather(callback(), emails(), return_exceptions=True):
                if isinstance(failed, asyncio.CancelledError):
                    raise failed
                if isinstance(failed, BaseException):
                    log_failure(log, "job %s: notification failed", failed, job_id)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log_failure(log, "job %s: notification failed", e, job_id)
        finally:
            self._busy.discard(job_id)
            self._slots.release()
