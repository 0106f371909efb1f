"""The job service, as the API uses it: start (validate, insert job + rows in one transaction),
status, log, result, cancel, a batch's jobs. Handlers and ``SmartLinks.Generate`` call only this.

Invariants:
* Everything a client sends is validated before anything is written; a refused start leaves
  no job, no rows, no files (422 naming the field, 413 for data over the limit).
* The API process never compiles or renders a template: the shape of the master smartlink is
  checked here, its Jinja2 in the template checker's render process (``server.jobs.checker``).
* One running job per ``batch_id``: the same inputs again return that job (``created`` False),
  other inputs are a 409; the check and the insert share one write transaction that is the
  only one about that batch id (``BEGIN IMMEDIATE``; on PostgreSQL an advisory transaction
  lock on it), so two app processes cannot both start one.
* A ``batch_id`` belongs to the key that first used it: another key gets 409 (it is a folder
  that NGINX serves, so sharing it would let one customer overwrite another's links).
* Jobs are visible only to their owner (others get 404). Everything is read from the database:
  a job ``drop`` removed is 404 at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from sqlalchemy import Row, bindparam, insert, select

from server.config import Settings
from server.db import Database, utcnow
from server.db.job_models import Job, JobLog, JobRow
from server.errors import (
    BatchTaken,
    DataTooLarge,
    JobNotFinished,
    JobNotFound,
    JobRunning,
    SmartlinkBatchNotFound,
    Unprocessable,
)
from server.jobs import control, results, waiting
from server.jobs.checker import TemplateChecker
from server.jobs.contract import BATCH_ID_RE, STRATEGIES, TemplateInvalid, check_row, parse_master
from server.jobs.fetch import Fetcher, FetchError, FetchRefused
from server.jobs.notify import distinct_addresses
from server.jobs.pool import WorkerPool
from server.jobs.publish import folder_owner
from server.jobs.queries import JOBS_CHANNEL, insert_rows, storable
from server.jobs.states import (
    ACTIVE,
    FINISHED,
    JOB_JSON_COLUMNS,
    ROW_STATUS,
    WAITING,
    iso,
    job_json,
    row_label,
)
from server.jsondoc import JsonRefused, loads, parse_json
from server.signing import parse_expires_in

JOB_ID_RE = re.compile(r"^[0-9a-f]{32}\Z")
# Built once (building the comparisons and their cache key cost 20% of a status call's CPU).
_JOB = select(*JOB_JSON_COLUMNS).where(Job.job_id == bindparam("job_id"), Job.batch_id == bindparam("batch_id"),
                                       Job.owner == bindparam("owner"))
MAX_PARAM_NAME = 64
PARAM_RE = re.compile(rf"^[A-Za-z_][A-Za-z0-9_]{{0,{MAX_PARAM_NAME - 1}}}\Z")
EMAIL_RE = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?"
                      r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*\Z")
MAX_EMAILS = 50
NOTIFICATION_METHODS = ("POST", "GET")
WAIT_POLL = 0.05  # job_finished / notified look at the database this often
_BOM = "\ufeff"


@dataclass(frozen=True)
class StartInput:
    """A start request as parsed from HTTP (or from an execute call): raw, not yet validated."""

    batch_id: str
    document_file: bytes | None = None
    document_id: str | None = None
    api_url: str | None = None
    data: bytes | None = None
    data_field: str = "data"
    strategy: str | None = None
    max_errors: str | None = None
    callback_url: str | None = None
    callback_emails: str | None = None
    params: dict[str, bytes] = field(default_factory=dict)
    upload_batch_id: str | None = None
    data_upload: str | None = None  # "url": no rows now; they come by a PUT to a signed upload URL
    expires_in: str | None = None  # seconds that URL lives (data_upload=url only)
    notification_method: str | None = None  # POST (default) or GET, for callback_url


@dataclass(frozen=True)
class Started:
    job: dict[str, Any]
    created: bool  # False: an identical start of a running job returned that job
    data_expires: datetime | None = None  # set while the job waits for its data (data_upload=url)


def _other_life(running: Job, wait: float | None) -> bool:
    """Whether a repeated start of a job waiting for its data asks for an upload URL of another
    life (``expires_in``) than the job was given: then it is not the same start (a 409, not the
    first URL with an expiry the client did not ask for). The life is the job's expiry less its
    start, both in whole seconds, as the start set them."""
    if wait is None or running.status != WAITING or running.data_expires is None:
        return False
    given = (running.data_expires - running.created_at.replace(microsecond=0)).total_seconds()
    return abs(given - wait) > 1


def parse_rows(raw: bytes, where: str, max_digits: int | None = None) -> list[Any]:
    """A JSON array of rows, or JSON Lines (a BOM in front is fine either way). Raises
    Unprocessable naming ``where`` (also for nesting too deep, lone surrogates and integers of
    more than ``max_digits`` digits)."""
    try:
        doc = loads(raw, max_digits)
    except JsonRefused as e:
        if not str(e).startswith("is not JSON"):  # deep, a lone surrogate, not UTF-8, long number: no line helps
            raise Unprocessable(f"{where} {e}", field=where) from None
        return _parse_lines(raw, where, max_digits)
    if isinstance(doc, list):
        rows = doc
    elif isinstance(doc, dict):
        rows = [doc]  # JSON Lines with a single line
    else:
        raise Unprocessable(f"{where} must be a JSON array of rows or JSON Lines", field=where)
    if not rows:
        raise Unprocessable(f"{where} has no rows", field=where)
    return rows


def _parse_lines(raw: bytes, where: str, max_digits: int | None) -> list[Any]:
    rows: list[Any] = []
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Unprocessable(f"{where} is not UTF-8 JSON", field=where) from None
    for n, line in enumerate(text.removeprefix(_BOM).splitlines(), 1):
        if line.strip():
            try:
                rows.append(loads(line, max_digits))
            except JsonRefused as e:
                if not str(e).startswith("is not JSON"):  # JSON, but not acceptable: say that, not "neither"
                    raise Unprocessable(f"{where} line {n} {e}", field=where) from None
                raise Unprocessable(f"{where} is neither a JSON array nor JSON Lines (line {n} {e})",
                                    field=where) from None
    if not rows:
        raise Unprocessable(f"{where} is empty", field=where)
    return rows


_ROW_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _row_encoder() -> Callable[[Any], str]:
    """``_ROW_JSON.encode`` for a row's data (a dict from ``json.loads``: no cycles to look
    for). ``encode`` builds the C encoder again for every call; built once, 10,000 rows took
    8.7-13.5 ms against 16.9-28.9. The same text (CPython's ``JSONEncoder.iterencode``, minus
    the circular check)."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # a Python without the C accelerator
        return _ROW_JSON.encode
    c = make(None, _ROW_JSON.default, json.encoder.encode_basestring, None, ":", ",", False, False, True)
    return lambda data: "".join(c(data, 0))


_encode_row_data = _row_encoder()  # stateless once made: one for every start


def prepare_rows(job_id: str, rows: list[Any], min_suffix: int) -> tuple[list[tuple[Any, ...]], list[str]]:
    """Rows for ``job_rows`` (``queries.NEW_ROW`` tuples, generated suffixes included) and the
    log lines of bad rows."""
    records: list[tuple[Any, ...]] = []
    problems: list[str] = []
    seen: dict[tuple[str, str], int] = {}
    encode = _encode_row_data
    for idx, row in enumerate(rows):
        error = check_row(row, min_suffix)
        raw_ref = row.get("reference_id") if isinstance(row, dict) else None
        suffix = row.get("suffix") if isinstance(row, dict) else None
        ref = raw_ref if isinstance(raw_ref, str) else ""
        suffix = suffix if isinstance(suffix, str) and suffix else secrets.token_hex(12)
        if error is None:
            first = seen.setdefault((ref, suffix), idx)
            if first != idx:
                error = f"duplicate reference_id and suffix (same as row {first})"
        data = row.get("data", {}) if isinstance(row, dict) else {}
        pdf = row.get("pdf") if isinstance(row, dict) else None
        # NEW_ROW: job_id, idx, reference_id, suffix, pdf, data, status, error, attempts
        records.append((job_id, idx, ref[:256], suffix[:256], pdf if isinstance(pdf, str) and pdf else None,
                        encode(data) if error is None else "{}", "error" if error else "pending", error, 0))
        if error:
            problems.append(f"{row_label(idx, raw_ref)}: {error}")
    return records, problems


class JobService:
    def __init__(self, db: Database, settings: Settings, fetcher: Fetcher, checker: TemplateChecker,
                 pool: WorkerPool) -> None:
        self.db = db
        self.settings = settings
        self.fetcher = fetcher
        self.checker = checker
        self.pool = pool

    # ---- start ------------------------------------------------------------------------------

    def _check_options(self, inp: StartInput) -> tuple[str, int | None, str | None, list[str], dict[str, Any], str]:
        if not BATCH_ID_RE.match(inp.batch_id or ""):
            raise Unprocessable("batch_id must be 1-128 of A-Z a-z 0-9 _ - and not start with - or _",
                                field="batch_id")
        strategy = (inp.strategy or "smallest").strip()
        if strategy not in STRATEGIES:
            raise Unprocessable(f"strategy must be one of {', '.join(STRATEGIES)}", field="strategy")
        max_errors: int | None = None
        if inp.max_errors is not None and inp.max_errors.strip():
            if not re.fullmatch(r"[0-9]{1,9}", inp.max_errors.strip()):  # not \d: it takes "٣" (int() reads 3)
                raise Unprocessable("max_errors must be a non-negative integer of at most 9 digits "
                                    "(999999999: a fixed limit)", field="max_errors")
            max_errors = int(inp.max_errors.strip())
        callback_url = (inp.callback_url or "").strip() or None
        if callback_url:
            allowed = ("https", "http") if self.settings.allow_http_callbacks else ("https",)
            try:
                parts = urlsplit(callback_url)
                port = parts.port  # ValueError for one that is not a number 0-65535
            except ValueError as e:  # (also a bracketed host that is not an IPv6 address)
                raise Unprocessable(f"callback_url is not a valid URL: {e}", field="callback_url") from None
            if parts.scheme not in allowed or not parts.hostname:
                raise Unprocessable("callback_url must be an https:// URL", field="callback_url")
            if port == 0:
                raise Unprocessable("callback_url: port 0 cannot be called", field="callback_url")
        # One mailbox is one RCPT: repeats go, however they are spelled (the first spelling kept).
        emails = distinct_addresses((inp.callback_emails or "").split(","))
        for e in emails:
            if not EMAIL_RE.match(e):
                raise Unprocessable(f"callback_emails: {(e[:100] + '…' if len(e) > 100 else e)!r} is not an e-mail "
                                    "address", field="callback_emails")
        if len(emails) > MAX_EMAILS:
            raise Unprocessable(f"callback_emails: at most {MAX_EMAILS} addresses (a fixed limit, not a setting)",
                                field="callback_emails")
        method = (inp.notification_method or "").strip().upper() or "POST"
        if method not in NOTIFICATION_METHODS:
            raise Unprocessable("notification_method must be POST or GET", field="notification_method")
        if inp.notification_method and not callback_url:
            raise Unprocessable("notification_method needs a callback_url", field="notification_method")
        params: dict[str, Any] = {}
        for name, raw in inp.params.items():
            where = f"param.{name}"
            if not PARAM_RE.match(name):
                raise Unprocessable(f"{where}: the name must be a letter or _ then letters, digits, _ "
                                    f"(ASCII), at most {MAX_PARAM_NAME} characters in all", field=where)
            params[name] = parse_json(raw, where, max_digits=self.settings.max_number_digits)
        return strategy, max_errors, callback_url, emails, params, method

    def _data_upload(self, inp: StartInput) -> float | None:
        """Seconds the job waits for its data (``data_upload=url``), or None: the rows are in
        the start."""
        mode = (inp.data_upload or "").strip()
        if not mode:
            if inp.expires_in is not None and inp.expires_in.strip():
                raise Unprocessable("expires_in applies to data_upload=url only", field="expires_in")
            return None
        if mode != "url":
            raise Unprocessable("data_upload must be url (or absent: the rows come with the start)",
                                field="data_upload")
        if inp.data is not None:
            raise Unprocessable(f"give either {inp.data_field} or data_upload=url, not both", field="data_upload")
        return parse_expires_in(inp.expires_in, self.settings.upload_url_ttl, self.settings.max_url_ttl)

    async def _check_callback(self, url: str | None) -> None:
        """A callback the fetch guard will refuse is refused now, not retried at the end."""
        if url:
            try:
                await self.fetcher.check_url(url)
            except FetchRefused as e:
                raise Unprocessable(f"callback_url: {e}", field="callback_url") from None
            except FetchError:
                pass  # a name that does not resolve now may later: the delivery attempts tell

    async def _template(self, owner: str, inp: StartInput) -> str:
        if inp.document_file is not None:
            raw, where = inp.document_file, "document_file"
        elif inp.document_id:
            if not inp.api_url:
                raise Unprocessable("api_url is required with document_id", field="api_url")
            base = inp.api_url.strip()
            url = (base.replace("{document_id}", quote(inp.document_id, safe="")) if "{document_id}" in base
                   else base.rstrip("/") + "/" + quote(inp.document_id, safe=""))
            try:
                raw = await self.fetcher.get(url)
            except FetchError as e:
                raise Unprocessable(f"api_url: cannot fetch the master smartlink: {e}", field="api_url") from None
            where = "document_id"
        else:
            raise Unprocessable("document_file, or document_id with api_url, is required", field="document_file")
        try:
            _doc, template = await asyncio.to_thread(parse_master, raw,  # JSON of up to 20 MB: off the loop
                                                     self.settings.max_number_digits)
            await self.checker.check(template, owner)  # in the key's turn: keys wait for their own checks only
        except TemplateInvalid as e:
            raise Unprocessable(f"{where}: {e}", field=where) from None
        return template

    async def start(self, owner: str, inp: StartInput) -> Started:
        accepted = utcnow()  # `started`: when the start was accepted (seed 000)
        strategy, max_errors, callback_url, emails, params, method = self._check_options(inp)
        wait = self._data_upload(inp)
        await self._check_callback(callback_url)
        template = await self._template(owner, inp)
        job_id = secrets.token_hex(16)
        if wait is None:
            records, problems = await self._rows(job_id, inp.data, inp.data_field)
            data_digest = hashlib.sha256(inp.data or b"").hexdigest()
            expires = None
        else:  # rows come later, by a PUT to the job's signed upload URL
            records, problems, data_digest = [], [], "data_upload=url"
            expires = (accepted + timedelta(seconds=wait)).replace(microsecond=0)
        params_json = json.dumps(params, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        inputs_hash = hashlib.sha256(json.dumps([
            template, data_digest, strategy, max_errors, callback_url, emails, params_json, inp.upload_batch_id]
            + ([method] if method != "POST" else [])).encode()).hexdigest()  # (a POST start hashes as before)
        errored = len(problems)
        async with self.db.write() as s:
            await self.db.serialize(s, "job-start", inp.batch_id)
            other = await s.scalar(select(Job.owner).where(Job.batch_id == inp.batch_id, Job.owner != owner).limit(1))
            if other is not None:
                raise BatchTaken(f"batch_id {inp.batch_id!r} is used by another API key")
            holder = await asyncio.to_thread(folder_owner, self.settings.smartlink_root, inp.batch_id)
            if holder is not None and holder != owner:  # its jobs are gone (retention), its pages are not
                raise BatchTaken(f"batch_id {inp.batch_id!r} is used by another API key (its pages are still "
                                 "published; they go with `filedrop drop --smartlinks` or `cleanup --smartlinks`)")
            running = await s.scalar(select(Job).where(Job.batch_id == inp.batch_id, Job.status.in_(ACTIVE)))
            if running is not None:
                if running.inputs_hash == inputs_hash and not _other_life(running, wait):
                    return Started(job_json(running), created=False,
                                   data_expires=running.data_expires if running.status == WAITING else None)
                raise JobRunning(f"batch {inp.batch_id!r} has a running job {running.job_id} with other inputs; "
                                 "cancel it or wait for it to finish", job_id=running.job_id)
            job = Job(job_id=job_id, batch_id=inp.batch_id, owner=owner, status="Queued" if wait is None else WAITING,
                      strategy=strategy, inputs_hash=inputs_hash, template=template, params=params_json,
                      upload_batch_id=inp.upload_batch_id, max_errors=max_errors, callback_url=callback_url,
                      callback_emails=",".join(emails) or None, total_count=len(records), succeeded_count=0,
                      errored_count=errored, cancel_requested=False, created_at=accepted, started=accepted,
                      callback_state="none", email_state="none", claim_from=0, data_expires=expires,
                      notification_method=method)
            s.add(job)
            await s.flush()
            await insert_rows(s, records)
            entries = ([f"queued: {len(records)} rows, strategy {strategy}" + (f", {errored} invalid" if errored else "")]
                       if wait is None else [f"waiting for data: strategy {strategy}, the upload URL expires at "
                                             f"{iso(expires)}"]) + problems
            await s.execute(insert(JobLog), [{"job_id": job_id, "at": accepted, "level": "error" if i else "info",
                                              "message": storable(m)} for i, m in enumerate(entries)])
        if wait is not None:
            return Started(job_json(job), created=True, data_expires=expires)
        return Started(await self._launch(owner, inp.batch_id, job_id, errored, max_errors) or job_json(job),
                       created=True)

    async def _rows(self, job_id: str, data: bytes | None, where: str) -> tuple[list[dict[str, Any]], list[str]]:
        """The rows of ``data`` (a JSON array or JSON Lines) as ``job_rows`` records, and the log
        lines of the bad ones. Unprocessable naming ``where``; DataTooLarge over the limit."""
        if data is None:
            raise Unprocessable("data or data_file (or data_upload=url) is required", field="data")
        if len(data) > self.settings.max_data_size:
            raise DataTooLarge(f"{where} is over the {self.settings.max_data_size}-byte limit (FILEDROP_MAX_DATA_SIZE)")
        rows = await asyncio.to_thread(parse_rows, data, where, self.settings.max_number_digits)
        return await asyncio.to_thread(prepare_rows, job_id, rows, self.settings.min_suffix_length)

    async def _launch(self, owner: str, batch_id: str, job_id: str, errored: int,
                      max_errors: int | None) -> dict[str, Any] | None:
        """A job whose rows are in: cancel it if its bad rows alone exceed ``max_errors`` (its
        JSON then), else wake the workers (None)."""
        if max_errors is not None and errored > max_errors:  # bad rows alone are too many: end it now
            await control.cancel(self.db, self.settings, [job_id],
                                 f"max_errors ({max_errors}) exceeded: {errored} rows errored", level="error")
            return job_json(await self._job(owner, batch_id, job_id))
        await self.db.notify_now(JOBS_CHANNEL, job_id)  # idle workers anywhere look now
        self.pool.ensure_started()
        await self.pool.wake()
        return None

    # ---- data for a job that waits for it (data_upload=url) ------------------------------------

    async def receive_data(self, owner: str, batch_id: str, job_id: str, data: bytes) -> dict[str, Any]:
        """The one PUT of a waiting job's rows (a JSON array or JSON Lines, checked as a start's
        ``data``): the job is ``Queued`` and runs; its JSON. JobNotFound, DataReceived,
        JobNotWaiting, UrlExpired, Unprocessable (bad data), DataTooLarge."""
        records, problems = await self._rows(job_id, data, "data")
        got = await waiting.receive(self.db, owner, batch_id, job_id, records, problems)
        launched = await self._launch(owner, batch_id, job_id, got.errored, got.max_errors)
        return launched or job_json(await self._job(owner, batch_id, job_id))

    async def check_waiting(self, owner: str, batch_id: str, job_id: str) -> None:
        """Raise as ``receive_data`` would unless the job waits for its data now (before a
        body is read)."""
        if not (JOB_ID_RE.match(job_id) and BATCH_ID_RE.match(batch_id)):  # (a NUL: PostgreSQL's 500)
            raise JobNotFound(f"no job {job_id!r} in batch {batch_id!r}")
        await waiting.check_waiting(self.db, owner, batch_id, job_id)

    async def owner_of(self, batch_id: str, job_id: str) -> str | None:
        return await waiting.owner_of(self.db, batch_id, job_id) if JOB_ID_RE.match(job_id) else None

    # ---- reading ----------------------------------------------------------------------------

    async def _job(self, owner: str, batch_id: str, job_id: str) -> Row[Any]:
        """The job as its endpoints show it (``JOB_JSON_COLUMNS``): a primary-key read in one
        ``query`` (clients poll the status back to back while workers record progress)."""
        if JOB_ID_RE.match(job_id) and BATCH_ID_RE.match(batch_id):  # no NUL reaches PostgreSQL (a 500)
            params = {"job_id": job_id, "batch_id": batch_id, "owner": owner}
            row = await self.db.query(lambda conn: conn.execute(_JOB, params).first())
            if row is not None:
                return row
        raise JobNotFound(f"no job {job_id!r} in batch {batch_id!r}")

    async def status(self, owner: str, batch_id: str, job_id: str) -> dict[str, Any]:
        return job_json(await self._job(owner, batch_id, job_id))

    async def log(self, owner: str, batch_id: str, job_id: str) -> dict[str, Any]:
        job = await self._job(owner, batch_id, job_id)
        async with self.db.read() as s:
            rows = (await s.execute(select(JobLog.at, JobLog.level, JobLog.message)
                                    .where(JobLog.job_id == job_id).order_by(JobLog.id))).all()
        return {**job_json(job), "log": [{"at": iso(at), "level": lv, "message": m} for at, lv, m in rows]}

    async def result(self, owner: str, batch_id: str, job_id: str) -> list[dict[str, Any]]:
        """Every row: reference_id, suffix, url (of a published row, else null), status, error."""
        await self._job(owner, batch_id, job_id)
        base = self.settings.public_url.rstrip("/")
        async with self.db.read() as s:
            rows = (await s.execute(select(JobRow.reference_id, JobRow.suffix, JobRow.status, JobRow.error)
                                    .where(JobRow.job_id == job_id).order_by(JobRow.idx))).all()
        return [{"reference_id": ref, "suffix": suffix,
                 "url": f"{base}/{batch_id}/{ref}.{suffix}.html" if st == "done" else None,
                 "status": ROW_STATUS.get(st, st), "error": err} for ref, suffix, st, err in rows]

    async def result_file(self, owner: str, batch_id: str, job_id: str) -> Path:
        """The result of an ended job as a CSV file (``results.csv_text``, the bytes of
        ``?format=csv``), written once under ``FILEDROP_DATA_DIR/results/``: what signed download
        URLs serve. JobNotFinished while the job runs (its rows still change)."""
        job = await self._job(owner, batch_id, job_id)
        if job.status not in FINISHED:
            raise JobNotFinished(f"job {job_id} is {job.status}: its result can be downloaded once it has ended")
        path = results.path_of(self.settings, job_id)
        if not await asyncio.to_thread(path.exists):
            await asyncio.to_thread(results.write, path, await self.result(owner, batch_id, job_id))
        return path

    async def batch_jobs(self, owner: str, batch_id: str) -> dict[str, Any]:
        """The caller's jobs of ``batch_id``, newest first (an empty list when there are none)."""
        if not BATCH_ID_RE.match(batch_id):
            raise SmartlinkBatchNotFound(f"{batch_id!r} is not a batch id (1-128 of A-Z a-z 0-9 _ -, "
                                         "not starting with - or _)")
        async with self.db.read() as s:
            jobs = (await s.scalars(select(Job).where(Job.batch_id == batch_id, Job.owner == owner)
                                    .order_by(Job.created_at.desc(), Job.job_id))).all()
            out = [job_json(j) for j in jobs]
        return {"batch_id": batch_id, "jobs": out}

    async def cancel(self, owner: str, batch_id: str, job_id: str, wait: float = 2.0) -> dict[str, Any]:
        """Request cancellation and wait (up to ``wait`` s) for the job to stop: workers kill a
        render mid-row, so it normally answers ``Cancelled`` within a fraction of a second."""
        await self._job(owner, batch_id, job_id)
        if await control.cancel(self.db, self.settings, [job_id], "cancelled by request"):
            await control.wait_ended(self.db, [job_id], wait)
        return job_json(await self._job(owner, batch_id, job_id))

    # ---- waiting (callers and tests) ---------------------------------------------------------

    async def job_finished(self, job_id: str, timeout: float | None = None) -> None:
        """Return once ``job_id`` has reached an end state (or is gone: dropped); TimeoutError
        after ``timeout`` s."""
        await self._wait(lambda st: st is None or st[0] in FINISHED, job_id, timeout, "end")

    async def notified(self, job_id: str, timeout: float | None = None) -> None:
        """Return once the job's callback/e-mails have been delivered or given up on (or the job
        is gone)."""
        await self._wait(lambda st: st is None or (st[0] in FINISHED and not {"pending", "sending"} & set(st[1:])),
                         job_id, timeout, "notifications")

    async def _wait(self, done: Any, job_id: str, timeout: float | None, what: str) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            async with self.db.read() as s:
                row = (await s.execute(select(Job.status, Job.callback_state, Job.email_state)
                                       .where(Job.job_id == job_id))).first()
            if done(None if row is None else tuple(row)):
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id}: no {what} within {timeout} s")
            await asyncio.sleep(WAIT_POLL)  # progress is made by other processes: poll under a deadline

