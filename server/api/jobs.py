"""Smartlink job endpoints (seed 000): ``POST /api/batch/<batch_id>/start``, and
``/api/batch/<batch_id>/<job_id>/status|log|cancel|result``; plus the ``SmartLinks.Generate``
operation for upload batches. Handlers parse into ``StartInput`` and call the job service.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import BodyPartReader, web

from server.errors import BadRequest, NotFound, PayloadTooLarge, Unprocessable
from server.jobs.fetch import Fetcher
from server.jobs.pool import JobEngine
from server.jobs.service import JobService, StartInput
from server.keys import DATABASE, JOBS, OPERATIONS, OWNER, SETTINGS, UPLOADS
from server.uploads.operations import ExecuteContext, OperationResult

OPTION_FIELDS = ("document_id", "api_url", "strategy", "max_errors", "callback_url", "callback_emails")
MAX_PARTS = 200
OPTION_LIMIT = 64 << 10  # bytes of one plain option field


async def _read_form(request: web.Request, data_limit: int, template_limit: int,
                     total_limit: int) -> dict[str, bytes]:
    """The start request's parts, each read with its own size limit, and all of them together
    with NGINX's body limit for a start (streamed, never unbounded: without the total, 200
    parts of up to ``template_limit`` each could be held in memory)."""
    fields: dict[str, bytes] = {}
    total = 0
    if request.content_type == "multipart/form-data":
        try:
            reader = await request.multipart()
        except ValueError:  # aiohttp: "boundary missed" (was a 500)
            raise Unprocessable("multipart/form-data without a boundary", field="content-type") from None
        for _ in range(MAX_PARTS + 1):
            part = await reader.next()
            if part is None:
                return fields
            if not isinstance(part, BodyPartReader) or not part.name:
                continue
            name = part.name
            if name in ("data", "data_file"):
                limit, code = data_limit, "ERR_DATA_TOO_LARGE"
            elif name == "document_file":
                limit, code = template_limit, "ERR_TEMPLATE_TOO_LARGE"
            else:
                limit, code = max(OPTION_LIMIT, template_limit), "ERR_FIELD_TOO_LARGE"
            buf = bytearray()
            while chunk := await part.read_chunk(1 << 16):
                buf += chunk
                total += len(chunk)
                if len(buf) > limit:
                    raise PayloadTooLarge(f"{name} is over the {limit}-byte limit", code=code)
                if total > total_limit:
                    raise PayloadTooLarge(f"the start request is over the {total_limit}-byte limit")
            fields[name] = bytes(buf)
        raise BadRequest(f"more than {MAX_PARTS} form parts")
    if request.content_type == "application/x-www-form-urlencoded":
        form = await request.post()
        for k, v in form.items():
            fields[k] = v.encode("utf-8") if isinstance(v, str) else v.file.read()
        return fields
    raise Unprocessable("send the start request as multipart/form-data", field="content-type")


def _text(fields: dict[str, bytes], name: str) -> str | None:
    raw = fields.get(name)
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Unprocessable(f"{name} is not UTF-8 text", field=name) from None


async def start_job(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    fields = await _read_form(request, settings.max_data_size, settings.fetch_max_bytes, settings.job_form_limit)
    data_field = "data" if "data" in fields else "data_file"
    inp = StartInput(
        batch_id=request.match_info["batch_id"],
        document_file=fields.get("document_file"),
        data=fields.get(data_field),
        data_field=data_field,
        params={k[6:]: v for k, v in fields.items() if k.startswith("param.")},
        upload_batch_id=request.match_info["batch_id"],
        **{k: _text(fields, k) for k in OPTION_FIELDS},
    )
    started = await request.app[JOBS].start(request[OWNER], inp)
    return web.json_response(started.job, status=202 if started.created else 200)


async def get_status(request: web.Request) -> web.Response:
    m = request.match_info
    return web.json_response(await request.app[JOBS].status(request[OWNER], m["batch_id"], m["job_id"]))


async def get_log(request: web.Request) -> web.Response:
    m = request.match_info
    log = await request.app[JOBS].log(request[OWNER], m["batch_id"], m["job_id"])
    if request.query.get("format") == "text":
        lines = [f"{e['at']} {e['level'].upper()} {e['message']}" for e in log["log"]]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")
    return web.json_response(log, dumps=lambda o: json.dumps(o, ensure_ascii=False))


async def cancel_job(request: web.Request) -> web.Response:
    m = request.match_info
    return web.json_response(await request.app[JOBS].cancel(request[OWNER], m["batch_id"], m["job_id"]))


async def get_result(request: web.Request) -> web.Response:
    m = request.match_info
    rows = await request.app[JOBS].result(request[OWNER], m["batch_id"], m["job_id"])
    fmt = request.query.get("format", "json")
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["reference_id", "suffix", "url", "status", "error"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        return web.Response(text=buf.getvalue(), content_type="text/csv",
                            headers={"Content-Disposition": f'attachment; filename="{m["job_id"]}.csv"'})
    if fmt != "json":
        raise Unprocessable("format must be json or csv", field="format")
    return web.json_response({"batch_id": m["batch_id"], "job_id": m["job_id"], "rows": rows},
                             dumps=lambda o: json.dumps(o, ensure_ascii=False))


ROUTES: list[web.RouteDef] = [
    web.post("/api/batch/{batch_id}/start", start_job),
    web.route("GET", "/api/batch/{batch_id}/{job_id}/status", get_status),
    web.route("GET", "/api/batch/{batch_id}/{job_id}/log", get_log),
    web.route("GET", "/api/batch/{batch_id}/{job_id}/cancel", cancel_job),
    web.post("/api/batch/{batch_id}/{job_id}/cancel", cancel_job),
    web.route("GET", "/api/batch/{batch_id}/{job_id}/result", get_result),
]


def _file_index(params: dict[str, Any], name: str, required: bool) -> int | None:
    v = params.get(name)
    if v is None or v == "":
        if required:
            raise Unprocessable(f"{name} (a fileIdx of this batch) is required", field=name)
        return None
    try:
        idx = int(str(v))
    except ValueError:
        idx = -1
    if idx < 0:
        raise Unprocessable(f"{name} must be a fileIdx of this batch", field=name)
    return idx


def smartlinks_operation(app: web.Application):  # type: ignore[no-untyped-def]
    """``SmartLinks.Generate``: params ``template`` and ``data`` (fileIdx of this upload batch),
    optional ``strategy``, ``max_errors``, ``callback_url``, ``callback_emails``, ``params``
    (an object, like the ``param.<name>`` parts), ``batch_id`` (default: the upload batch id)."""

    async def read(owner: str, batch_id: str, idx: int, limit: int, name: str) -> bytes:
        info = await open_upload(app)(owner, batch_id, idx)
        if info.size > limit:
            raise PayloadTooLarge(f"{name} (file {idx}) is over the {limit}-byte limit", code="ERR_DATA_TOO_LARGE")
        def read_bytes() -> bytes:
            with open(info.path, "rb") as f:
                return f.read(limit + 1)

        return await asyncio.to_thread(read_bytes)  # up to FILEDROP_MAX_DATA_SIZE: not on the event loop

    async def op(ctx: ExecuteContext) -> OperationResult:
        settings = app[SETTINGS]
        p = ctx.params
        template_idx = _file_index(p, "template", True)
        data_idx = _file_index(p, "data", True)
        assert template_idx is not None and data_idx is not None
        extra = p.get("params") or {}
        if isinstance(extra, str):
            try:
                extra = json.loads(extra)
            except ValueError:
                raise Unprocessable("params must be a JSON object", field="params") from None
        if not isinstance(extra, dict):
            raise Unprocessable("params must be a JSON object", field="params")

        def opt(name: str) -> str | None:
            v = p.get(name)
            return None if v is None else str(v)

        inp = StartInput(
            batch_id=str(p.get("batch_id") or ctx.batch_id),
            document_file=await read(ctx.owner, ctx.batch_id, template_idx, settings.fetch_max_bytes, "template"),
            data=await read(ctx.owner, ctx.batch_id, data_idx, settings.max_data_size, "data"),
            data_field="data",
            strategy=opt("strategy"), max_errors=opt("max_errors"), callback_url=opt("callback_url"),
            callback_emails=opt("callback_emails"),
            params={k: json.dumps(v).encode() for k, v in extra.items()},
            upload_batch_id=ctx.batch_id,
        )
        started = await app[JOBS].start(ctx.owner, inp)
        # The batch stays: rows may publish its files ("pdf": "batch:<fileIdx>") while the job runs.
        return OperationResult(202 if started.created else 200, started.job, drop_batch=False)

    return op


def open_upload(app: web.Application):  # type: ignore[no-untyped-def]
    """The upload service's ``open_file(owner, batch_id, file_idx)`` (a complete file)."""

    async def open_file(owner: str, batch_id: str, idx: int) -> Any:
        uploads = app.get(UPLOADS)
        if uploads is None:
            raise NotFound("uploads are not available", code="ERR_BATCH_NOT_FOUND")
        return await uploads.open_file(owner, batch_id, idx)

    return open_file


async def jobs_context(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    fetcher = Fetcher(settings.fetch_allow, settings.fetch_timeout, settings.fetch_max_bytes)
    engine = JobEngine(app[DATABASE], settings, fetcher, open_upload(app))
    app[JOBS] = JobService(app[DATABASE], settings, fetcher, engine)
    app[OPERATIONS].register("SmartLinks.Generate", smartlinks_operation(app))
    await engine.start()
    try:
        yield
    finally:
        await engine.stop()
        await fetcher.close()
