"""Telling the job's owner it finished: a signed callback POST and e-mails.

The callback body is the job's status JSON; ``X-Filedrop-Signature: sha256=<hex>`` is the
HMAC-SHA256 of exactly those bytes under ``settings.callback_secret``, so a receiver can check
``hmac.compare_digest(sign(secret, body), header)``. Delivery is at-least-once: the state is
recorded on the job after the attempt, so a crash between the receiver's 2xx and that record
sends it again on restart.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from email.message import EmailMessage
from typing import Any

import aiosmtplib

from server.config import Settings
from server.jobs.fetch import Fetcher, FetchError

log = logging.getLogger("filedrop.jobs.notify")

SIGNATURE_HEADER = "X-Filedrop-Signature"


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def callback_body(job: dict[str, Any]) -> bytes:
    return json.dumps(job, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


async def deliver_callback(fetcher: Fetcher, settings: Settings, url: str, job: dict[str, Any],
                           note: Callable[[str, str], Awaitable[None]]) -> bool:
    """POST the job JSON to ``url``; up to ``callback_retries`` attempts, the delay doubling from
    ``callback_backoff``. True once a 2xx arrives. ``note(level, message)`` records each attempt."""
    body = callback_body(job)
    headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(settings.callback_secret, body)}
    attempts = max(1, settings.callback_retries)
    delay = settings.callback_backoff
    for attempt in range(1, attempts + 1):
        try:
            status = await fetcher.post(url, body, headers)
            if 200 <= status < 300:
                await note("info", f"callback delivered to {url} (attempt {attempt}, HTTP {status})")
                return True
            problem = f"HTTP {status}"
        except FetchError as e:
            problem = str(e)
        await note("warning", f"callback attempt {attempt}/{attempts} to {url} failed: {problem}")
        if attempt < attempts:
            await asyncio.sleep(delay)  # backoff between delivery attempts (production, not a test wait)
            delay *= 2
    return False


async def send_emails(settings: Settings, to: list[str], job: dict[str, Any], result_url: str) -> None:
    """One message to all ``to`` addresses through ``smtp_host:smtp_port``; raises on failure."""
    msg = EmailMessage()
    msg["From"] = settings.smtp_from
    msg["To"] = ", ".join(to)
    msg["Subject"] = f"filedrop batch {job['batch_id']}: {job['status']}"
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
    lines += ["", f"Result (every row's link): {result_url}", ""]
    msg.set_content("\n".join(lines))
    await aiosmtplib.send(msg, hostname=settings.smtp_host, port=settings.smtp_port,
                          timeout=settings.fetch_timeout, start_tls=False, use_tls=False)
