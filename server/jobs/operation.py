"""``SmartLinks.Generate``: a job started by executing an upload batch. Params ``template`` and
``data`` are fileIdx of that batch; optional ``strategy``, ``max_errors``, ``callback_url``,
``notification_method``, ``callback_emails``, ``params`` (an object, like the ``param.<name>`` parts of a start) and
``batch_id`` (default: the upload batch id). The batch stays: rows may publish its files
(``"pdf": "batch:<fileIdx>"``) while the job runs.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from sqlalchemy import Connection, select

from server.config import Settings
from server.db import Database
from server.db.job_models import Job
from server.errors import DataTooLarge, Unprocessable
from server.jobs.assets import UploadFiles
from server.jobs.service import JobService, StartInput
from server.jobs.states import ACTIVE
from server.jsondoc import parse_json
from server.uploads.operations import ExecuteContext, Operation, OperationResult


def reads_upload_batch(owner: Any, batch_id: Any) -> Any:
    """Jobs that may read upload batch ``batch_id`` of ``owner`` (a value or a column): its
    owner's jobs whose upload batch it is. Upload batch ids are one namespace for every key and
    a start names its job's upload batch after its path, so another key's job on a batch id
    that happens to be the same reads nothing of it (its ``batch:`` files are looked up as its
    own key's) and holds nothing of it."""
    return (Job.upload_batch_id == batch_id) & (Job.owner == owner)


def _reading(owner: str, batch_id: str) -> Any:
    return (select(Job.job_id).where(reads_upload_batch(owner, batch_id), Job.status.in_(ACTIVE))
            .order_by(Job.created_at).limit(1))


async def reading_job(db: Database, owner: str, batch_id: str) -> str | None:
    """A job started from ``owner``'s upload batch ``batch_id`` that has not ended (it reads the
    batch's files), if any: the upload API refuses to delete them under it (409
    ``ERR_JOB_RUNNING``)."""
    async with db.read() as s:
        return await s.scalar(_reading(owner, batch_id))


def reading_job_in(conn: Connection, owner: str, batch_id: str) -> str | None:
    """``reading_job`` inside the upload group commit's transaction (its thread, its connection):
    a whole file that would replace one of the batch's files under such a job is refused."""
    return conn.execute(_reading(owner, batch_id)).scalar()


# Every param SmartLinks.Generate takes: another (a typo such as `max_error`) is refused rather
# than passed over, which would start a job without what its sender asked for.
PARAMS = ("template", "data", "strategy", "max_errors", "callback_url", "callback_emails", "notification_method",
          "params", "batch_id")


def _check_param_names(params: dict[str, Any]) -> None:
    for name in params:
        if name not in PARAMS:
            raise Unprocessable(f"{str(name)[:64]!r} is not a param of SmartLinks.Generate (they are "
                                f"{', '.join(PARAMS)})", field=str(name)[:64])


def _file_index(params: dict[str, Any], name: str) -> int:
    v = params.get(name)
    if v is None or v == "":
        raise Unprocessable(f"{name} (a fileIdx of this batch) is required", field=name)
    # ASCII digits only: int() also reads "٣", "+3", " 3" and "1_0" (as 3, 3, 3 and 10)
    if isinstance(v, bool) or not re.fullmatch(r"[0-9]{1,9}", str(v)):
        raise Unprocessable(f"{name} must be a fileIdx of this batch", field=name)
    return int(v)


def _option(params: dict[str, Any], name: str) -> str | None:
    """An option as a start's form field would carry it: a string, or a number written as one."""
    v = params.get(name)
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    kind = "a non-negative integer" if name == "max_errors" else "a string"
    raise Unprocessable(f"{name} must be {kind}, not a JSON {_json_type(v)}", field=name)


def _emails(params: dict[str, Any]) -> str | None:
    """``callback_emails``: one string of comma-separated addresses, as a start's form field."""
    v = params.get("callback_emails")
    if v is None or isinstance(v, str):
        return v
    raise Unprocessable("callback_emails must be a string of comma-separated addresses "
                        f"(\"a@example.com,b@example.com\"), not a JSON {_json_type(v)}", field="callback_emails")


def _json_type(v: Any) -> str:
    return ("list" if isinstance(v, list) else "object" if isinstance(v, dict) else
            "boolean" if isinstance(v, bool) else "number" if isinstance(v, (int, float)) else "value")


def smartlinks_generate(jobs: JobService, files: UploadFiles, settings: Settings) -> Operation:
    async def read(owner: str, batch_id: str, idx: int, limit: int, name: str) -> bytes:
        info = await files.open_file(owner, batch_id, idx)
        if info.size > limit:
            setting = "FILEDROP_FETCH_MAX_BYTES" if name == "template" else "FILEDROP_MAX_DATA_SIZE"
            raise DataTooLarge(f"{name} (file {idx}) is over the {limit}-byte limit ({setting})")

        def read_bytes() -> bytes:
            with open(info.path, "rb") as f:
                return f.read(limit + 1)

        return await asyncio.to_thread(read_bytes)  # up to FILEDROP_MAX_DATA_SIZE: not on the event loop

    async def op(ctx: ExecuteContext) -> OperationResult:
        p = ctx.params
        _check_param_names(p)
        template_idx, data_idx = _file_index(p, "template"), _file_index(p, "data")
        extra = p.get("params")
        extra = {} if extra is None else extra  # [], "", 0, false: refused below, not read as none
        if isinstance(extra, str):
            extra = parse_json(extra, "params", max_digits=settings.max_number_digits)
        if not isinstance(extra, dict):
            raise Unprocessable("params must be a JSON object", field="params")

        def opt(name: str) -> str | None:
            return _option(p, name)

        inp = StartInput(
            batch_id=opt("batch_id") or ctx.batch_id,
            document_file=await read(ctx.owner, ctx.batch_id, template_idx, settings.fetch_max_bytes, "template"),
            data=await read(ctx.owner, ctx.batch_id, data_idx, settings.max_data_size, "data"),
            data_field="data",
            strategy=opt("strategy"), max_errors=opt("max_errors"), callback_url=opt("callback_url"),
            callback_emails=_emails(p), notification_method=opt("notification_method"),
            params={k: json.dumps(v).encode() for k, v in extra.items()},
            upload_batch_id=ctx.batch_id,
        )
        started = await jobs.start(ctx.owner, inp)
        return OperationResult(202 if started.created else 200, started.job, drop_batch=False)

    return op
