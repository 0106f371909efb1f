"""The job service: start (validate, insert job + rows in one transaction), status, log,
result, cancel. Handlers and the ``SmartLinks.Generate`` operation call only this.

Invariants:
* Everything a client sends is validated before anything is written; a refused start leaves
  no job, no rows, no files (422 naming the field, 413 for data over the limit).
* One running job per ``batch_id``: the same inputs again return that job (``created`` False),
  other inputs are a 409; the check and the insert share one ``BEGIN IMMEDIATE`` transaction.
* A ``batch_id`` belongs to the key that first used it: another key gets 409 (it is a folder
  that NGINX serves, so sharing it would let one customer overwrite another's links).
* Jobs are visible only to their owner (others get 404).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

from sqlalchemy import insert, select, text

from server.config import Settings
from server.db import Database, utcnow
from server.db.job_models import Job, JobLog, JobRow
from server.errors import Conflict, NotFound, PayloadTooLarge, Unprocessable
from server.jobs.fetch import Fetcher, FetchError
from server.jobs.pool import RUNNING, JobEngine, iso, job_json
from server.jobs.render import BATCH_ID_RE, STRATEGIES, TemplateInvalid, check_row, compile_template

JOB_ID_RE = re.compile(r"^[0-9a-f]{32}\Z")
PARAM_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
EMAIL_RE = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?"
                      r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*\Z")
MAX_EMAILS = 50
ROW_STATUS = {"pending": "pending", "claimed": "pending", "done": "succeeded", "error": "errored",
              "skipped": "skipped"}


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


@dataclass(frozen=True)
class Started:
    job: dict[str, Any]
    created: bool  # False: an identical start of a running job returned that job


def parse_rows(raw: bytes, where: str) -> list[Any]:
    """A JSON array of rows, or JSON Lines. Raises Unprocessable naming ``where``."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return _parse_lines(raw, where)
    if isinstance(doc, list):
        rows = doc
    elif isinstance(doc, dict):
        rows = [doc]  # JSON Lines with a single line
    else:
        raise Unprocessable(f"{where} must be a JSON array of rows or JSON Lines", field=where)
    if not rows:
        raise Unprocessable(f"{where} has no rows", field=where)
    return rows


def _parse_lines(raw: bytes, where: str) -> list[Any]:
    rows: list[Any] = []
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise Unprocessable(f"{where} is not UTF-8 JSON", field=where) from None
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise Unprocessable(f"{where} is neither a JSON array nor JSON Lines (line {n}: {e})",
                                    field=where) from None
    if not rows:
        raise Unprocessable(f"{where} is empty", field=where)
    return rows


def prepare_rows(job_id: str, rows: list[Any], min_suffix: int) -> tuple[list[dict[str, Any]], list[str]]:
    """Row records for ``job_rows`` (generated suffixes included) and the log lines of bad rows."""
    records: list[dict[str, Any]] = []
    problems: list[str] = []
    seen: dict[tuple[str, str], int] = {}
    for idx, row in enumerate(rows):
        error = check_row(row, min_suffix)
        ref = row.get("reference_id") if isinstance(row, dict) else None
        suffix = row.get("suffix") if isinstance(row, dict) else None
        ref = ref if isinstance(ref, str) else ""
        suffix = suffix if isinstance(suffix, str) and suffix else secrets.token_hex(12)
        if error is None:
            first = seen.setdefault((ref, suffix), idx)
            if first != idx:
                error = f"duplicate reference_id and suffix (same as row {first})"
        data = row.get("data", {}) if isinstance(row, dict) else {}
        pdf = row.get("pdf") if isinstance(row, dict) else None
        records.append({
            "job_id": job_id, "idx": idx, "reference_id": ref[:256], "suffix": suffix[:256],
            "pdf": pdf if isinstance(pdf, str) and pdf else None,
            "data": json.dumps(data, ensure_ascii=False, separators=(",", ":")) if error is None else "{}",
            "status": "error" if error else "pending", "error": error,
        })
        if error:
            problems.append(f"row {idx}: {error}")
    return records, problems


class JobService:
    def __init__(self, db: Database, settings: Settings, fetcher: Fetcher, engine: JobEngine) -> None:
        self.db = db
        self.settings = settings
        self.fetcher = fetcher
        self.engine = engine

    # ---- start ------------------------------------------------------------------------------

    def _check_options(self, inp: StartInput) -> tuple[str, int | None, str | None, list[str], dict[str, Any]]:
        if not BATCH_ID_RE.match(inp.batch_id or ""):
            raise Unprocessable("batch_id must be 1-128 of A-Z a-z 0-9 _ - and not start with - or _",
                                field="batch_id")
        strategy = (inp.strategy or "smallest").strip()
        if strategy not in STRATEGIES:
            raise Unprocessable(f"strategy must be one of {', '.join(STRATEGIES)}", field="strategy")
        max_errors: int | None = None
        if inp.max_errors is not None and inp.max_errors.strip():
            if not re.fullmatch(r"\d{1,9}", inp.max_errors.strip()):
                raise Unprocessable("max_errors must be a non-negative integer", field="max_errors")
            max_errors = int(inp.max_errors)
        callback_url = (inp.callback_url or "").strip() or None
        if callback_url:
            parts = urlsplit(callback_url)
            allowed = ("https", "http") if self.settings.allow_http_callbacks else ("https",)
            if parts.scheme not in allowed or not parts.hostname:
                raise Unprocessable("callback_url must be an https:// URL", field="callback_url")
        emails = [e.strip() for e in (inp.callback_emails or "").split(",") if e.strip()]
        for e in emails:
            if not EMAIL_RE.match(e):
                raise Unprocessable(f"callback_emails: {e!r} is not an e-mail address", field="callback_emails")
        if len(emails) > MAX_EMAILS:
            raise Unprocessable(f"callback_emails: at most {MAX_EMAILS} addresses", field="callback_emails")
        params: dict[str, Any] = {}
        for name, raw in inp.params.items():
            where = f"param.{name}"
            if not PARAM_RE.match(name):
                raise Unprocessable(f"{where}: the name must be a letter or _ then letters, digits, _",
                                    field=where)
            try:
                params[name] = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                raise Unprocessable(f"{where} is not JSON", field=where) from None
        return strategy, max_errors, callback_url, emails, params

    async def _template(self, inp: StartInput) -> tuple[Any, str]:
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
            # In a thread: compiling a big template takes seconds (Jinja2's parser and code
            # generator are Python), which the event loop must not spend.
            return await asyncio.to_thread(compile_template, raw)
        except TemplateInvalid as e:
            raise Unprocessable(f"{where}: {e}", field=where) from None

    async def start(self, owner: str, inp: StartInput) -> Started:
        strategy, max_errors, callback_url, emails, params = self._check_options(inp)
        compiled, template = await self._template(inp)
        where = inp.data_field
        if inp.data is None:
            raise Unprocessable("data or data_file is required", field="data")
        if len(inp.data) > self.settings.max_data_size:
            raise PayloadTooLarge(f"{where} is over the {self.settings.max_data_size}-byte limit",
                                  code="ERR_DATA_TOO_LARGE")
        job_id = secrets.token_hex(16)
        rows = await asyncio.to_thread(parse_rows, inp.data, where)
        records, problems = await asyncio.to_thread(prepare_rows, job_id, rows, self.settings.min_suffix_length)
        params_json = json.dumps(params, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        inputs_hash = hashlib.sha256(json.dumps([
            template, hashlib.sha256(inp.data).hexdigest(), strategy, max_errors, callback_url, emails,
            params_json, inp.upload_batch_id]).encode()).hexdigest()
        now = utcnow()
        errored = len(problems)
        async with self.db.write() as s:
            other = await s.scalar(select(Job.owner).where(Job.batch_id == inp.batch_id, Job.owner != owner).limit(1))
            if other is not None:
                raise Conflict(f"batch_id {inp.batch_id!r} is used by another API key", code="ERR_BATCH_TAKEN")
            running = await s.scalar(select(Job).where(Job.batch_id == inp.batch_id, Job.status.in_(RUNNING)))
            if running is not None:
                if running.inputs_hash == inputs_hash:
                    return Started(job_json(running), created=False)
                raise Conflict(f"batch {inp.batch_id!r} has a running job {running.job_id} with other inputs; "
                               "cancel it or wait for it to finish", code="ERR_JOB_RUNNING", job_id=running.job_id)
            job = Job(job_id=job_id, batch_id=inp.batch_id, owner=owner, status="Queued", strategy=strategy,
                      inputs_hash=inputs_hash, template=template, params=params_json,
                      upload_batch_id=inp.upload_batch_id, max_errors=max_errors, callback_url=callback_url,
                      callback_emails=",".join(emails) or None, total_count=len(records), succeeded_count=0,
                      errored_count=errored, cancel_requested=False, created_at=now,
                      callback_state="none", email_state="none")
            s.add(job)
            await s.flush()
            for i in range(0, len(records), 5000):
                await s.execute(insert(JobRow.__table__), records[i:i + 5000])  # Core: 2x the ORM bulk path
            entries = [f"queued: {len(records)} rows, strategy {strategy}"
                       + (f", {errored} invalid" if errored else "")] + problems
            await s.execute(insert(JobLog), [{"job_id": job_id, "at": now, "level": "error" if i else "info",
                                              "message": m} for i, m in enumerate(entries)])
        self.engine.enqueue(job_id, compiled)
        return Started(job_json(job), created=True)

    # ---- reading ----------------------------------------------------------------------------

    async def _job(self, owner: str, batch_id: str, job_id: str) -> Job:
        if JOB_ID_RE.match(job_id):
            async with self.db.read() as s:
                job = await s.scalar(select(Job).where(Job.job_id == job_id, Job.batch_id == batch_id,
                                                       Job.owner == owner))
                if job is not None:
                    s.expunge(job)  # keep its loaded values past the read's rollback
            if job is not None:
                return job
        raise NotFound(f"no job {job_id!r} in batch {batch_id!r}", code="ERR_JOB_NOT_FOUND")

    async def status(self, owner: str, batch_id: str, job_id: str) -> dict[str, Any]:
        # A running job's progress comes from the engine (committed values, no DB round trip, so
        # status stays fast while rendering keeps the GIL busy); otherwise from the database.
        snap = self.engine.snapshot(owner, batch_id, job_id)
        return snap if snap is not None else job_json(await self._job(owner, batch_id, job_id))

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
            rows = (await s.execute(text("SELECT reference_id, suffix, status, error FROM job_rows "
                                         "WHERE job_id=:j ORDER BY idx"), {"j": job_id})).all()
        return [{"reference_id": ref, "suffix": suffix,
                 "url": f"{base}/{batch_id}/{ref}.{suffix}.html" if st == "done" else None,
                 "status": ROW_STATUS.get(st, st), "error": err} for ref, suffix, st, err in rows]

    async def cancel(self, owner: str, batch_id: str, job_id: str, wait: float = 2.0) -> dict[str, Any]:
        """Request cancellation and wait (up to ``wait`` s) for the pool to stop the job."""
        await self._job(owner, batch_id, job_id)
        if await self.engine.cancel(job_id, "cancelled by request"):
            try:
                await self.engine.job_finished(job_id, timeout=wait)
            except TimeoutError:
                pass
        return job_json(await self._job(owner, batch_id, job_id))
