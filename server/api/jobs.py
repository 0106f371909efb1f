"""Smartlink job endpoints (seed 000): ``POST /api/batch/<batch_id>/start``,
``/api/batch/<batch_id>/<job_id>/status|log|cancel|result`` and ``GET /api/batch/<batch_id>/jobs``.
Handlers parse into ``StartInput`` and call the job service (``app[JOBS]``).
"""

from __future__ import annotations

import json

from aiohttp import BodyPartReader, web

from server.api import signed
from server.errors import (
    BadRequest,
    DataTooLarge,
    FieldTooLarge,
    PayloadTooLarge,
    TemplateTooLarge,
    Unprocessable,
)
from server.jobs.results import csv_text
from server.jobs.service import StartInput
from server.keys import JOBS, OWNER, SETTINGS, SIGNED

OPTION_FIELDS = ("document_id", "api_url", "strategy", "max_errors", "callback_url", "callback_emails",
                 "data_upload", "expires_in", "notification_method")
# Fixed, not settings: a start's own parts are a handful; templates read any number of values from
# one param.<name> JSON part, so nobody needs 200 parts, and the limit only bounds the reading.
MAX_PARTS = 200
OPTION_LIMIT = 64 << 10  # bytes of one plain option field at least (FILEDROP_FETCH_MAX_BYTES when larger)
LOG_FORMATS = ("json", "text")
# Every part a start takes besides param.<name>: a part of another name (a typo such as
# `max_error`, another API's `notification_URL`) is refused rather than passed over, which would
# start a job without the limit or the callback its sender asked for.
START_PARTS = ("document_file", "data", "data_file", *OPTION_FIELDS)


def _check_part_names(fields: dict[str, bytes], batch_id: str) -> None:
    for name in fields:
        if name in START_PARTS or name.startswith("param."):
            continue
        if name == "batch_id" and fields[name].strip() in (b"", batch_id.encode()):
            continue  # seed 000 lists batch_id among the parameters: the path's own (or blank) is harmless
        if name == "batch_id":
            raise Unprocessable("batch_id is the path's (/api/batch/<batch_id>/start); this part names another",
                                field="batch_id")
        raise Unprocessable(f"{name[:64]!r} is not a start parameter (they are {', '.join(START_PARTS)}, "
                            "batch_id (the path's) and param.<name> parts)", field=name[:64])
    # Two sources of one input: the second was passed over.
    if "data" in fields and "data_file" in fields:
        raise Unprocessable("give either data or data_file, not both", field="data_file")
    if "document_file" in fields and "document_id" in fields:
        raise Unprocessable("give either document_file or document_id with api_url, not both", field="document_id")


def _malformed(e: Exception) -> Unprocessable:
    return Unprocessable(f"the start request is not well-formed multipart/form-data: {e}", field="body")


async def _read_multipart(request: web.Request, data_limit: int, template_limit: int,
                          total_limit: int) -> dict[str, bytes]:
    """The parts, each read with its own size limit and all of them together with NGINX's body
    limit for a start (streamed, never unbounded: without the total, 200 parts of up to
    ``template_limit`` each could be held in memory). A body that is not multipart as its
    Content-Type says (no boundary, another boundary, cut short, empty) is a 422."""
    fields: dict[str, bytes] = {}
    total = 0
    try:
        reader = await request.multipart()
        for _ in range(MAX_PARTS + 1):
            part = await reader.next()
            if part is None:
                return fields
            if not isinstance(part, BodyPartReader) or not part.name:
                continue
            name = part.name
            if name in fields:  # one would be passed over: which one the sender meant is unknown
                raise Unprocessable(f"{name[:64]!r} is given twice: send each part once", field=name[:64])
            limit, too_large, setting = _part_limit(name, data_limit, template_limit)
            buf = bytearray()
            while chunk := await part.read_chunk(1 << 16):
                buf += chunk
                total += len(chunk)
                if len(buf) > limit:
                    raise too_large(f"{name} is over the {limit}-byte limit ({setting})")
                if total > total_limit:
                    raise PayloadTooLarge(f"the start request is over the {total_limit}-byte limit "
                                          "(FILEDROP_MAX_DATA_SIZE + FILEDROP_FETCH_MAX_BYTES + 1 MiB)")
            fields[name] = bytes(buf)
    except (ValueError, AssertionError, RuntimeError) as e:  # aiohttp's multipart reader's refusals
        raise _malformed(e) from None
    raise BadRequest(f"more than {MAX_PARTS} form parts (a fixed limit, not a setting: put many values in one "
                     "param.<name> JSON part)")


def _part_limit(name: str, data_limit: int, template_limit: int) -> tuple[int, type[PayloadTooLarge], str]:
    """The size limit of the part ``name``, its error, and the setting the limit comes from."""
    if name in ("data", "data_file"):
        return data_limit, DataTooLarge, "FILEDROP_MAX_DATA_SIZE"
    if name == "document_file":
        return template_limit, TemplateTooLarge, "FILEDROP_FETCH_MAX_BYTES"
    if template_limit >= OPTION_LIMIT:
        return template_limit, FieldTooLarge, "FILEDROP_FETCH_MAX_BYTES"
    return OPTION_LIMIT, FieldTooLarge, "a fixed floor, not a setting; FILEDROP_FETCH_MAX_BYTES when larger"


async def _read_form(request: web.Request, data_limit: int, template_limit: int,
                     total_limit: int) -> dict[str, bytes]:
    """Multipart only, as documented (README, OpenAPI): a start carries a file and up to
    FILEDROP_MAX_DATA_SIZE of rows, read part by part under each part's limit. A urlencoded
    body (``curl --data-urlencode``) would be read whole, without those limits."""
    if request.content_type == "multipart/form-data":
        return await _read_multipart(request, data_limit, template_limit, total_limit)
    sent = request.content_type if request.body_exists else "no body"
    raise Unprocessable(f"send the start request as multipart/form-data (curl -F), not {sent}", field="content-type")


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
    _check_part_names(fields, request.match_info["batch_id"])
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
    if started.data_expires is not None:  # data_upload=url: the rows come by a PUT to upload_URL
        link = await signed.upload_link(request, inp.batch_id, started.job["job_id"], started.data_expires)
        return web.json_response({**started.job, **link}, status=201 if started.created else 200)
    return web.json_response(started.job, status=202 if started.created else 200)


async def get_status(request: web.Request) -> web.Response:
    m = request.match_info
    return web.json_response(await request.app[JOBS].status(request[OWNER], m["batch_id"], m["job_id"]))


async def get_log(request: web.Request) -> web.Response:
    m = request.match_info
    fmt = request.query.get("format", "json")
    if fmt not in LOG_FORMATS:
        raise Unprocessable(f"format must be {' or '.join(LOG_FORMATS)}", field="format")
    log = await request.app[JOBS].log(request[OWNER], m["batch_id"], m["job_id"])
    if fmt == "text":
        lines = [f"{e['at']} {e['level'].upper()} {e['message']}" for e in log["log"]]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")
    return web.json_response(log, dumps=lambda o: json.dumps(o, ensure_ascii=False))


async def cancel_job(request: web.Request) -> web.Response:
    m = request.match_info
    return web.json_response(await request.app[JOBS].cancel(request[OWNER], m["batch_id"], m["job_id"]))


async def get_result(request: web.Request) -> web.StreamResponse:
    m = request.match_info
    fmt = request.query.get("format", "json")
    if request.get(SIGNED):  # a signed download link (format=csv is part of what was signed)
        return await signed.download_result(request)
    if fmt == "url":
        return await signed.result_url(request)
    if request.query.get("expires_in", "").strip():  # it would be passed over: the answer is no link
        raise Unprocessable("expires_in applies to format=url only", field="expires_in")
    rows = await request.app[JOBS].result(request[OWNER], m["batch_id"], m["job_id"])
    if fmt == "csv":
        return web.Response(text=csv_text(rows), content_type="text/csv",
                            headers={"Content-Disposition": f'attachment; filename="{m["job_id"]}.csv"'})
    if fmt != "json":
        raise Unprocessable("format must be json, csv or url", field="format")
    return web.json_response({"batch_id": m["batch_id"], "job_id": m["job_id"], "rows": rows},
                             dumps=lambda o: json.dumps(o, ensure_ascii=False))


async def list_batch_jobs(request: web.Request) -> web.Response:
    return web.json_response(await request.app[JOBS].batch_jobs(request[OWNER], request.match_info["batch_id"]))


ROUTES: list[web.RouteDef] = [
    web.post("/api/batch/{batch_id}/start", start_job),
    web.route("GET", "/api/batch/{batch_id}/jobs", list_batch_jobs),
    web.route("GET", "/api/batch/{batch_id}/{job_id}/status", get_status),
    web.route("GET", "/api/batch/{batch_id}/{job_id}/log", get_log),
    web.route("GET", "/api/batch/{batch_id}/{job_id}/cancel", cancel_job),
    web.post("/api/batch/{batch_id}/{job_id}/cancel", cancel_job),
    web.route("GET", "/api/batch/{batch_id}/{job_id}/result", get_result),
    web.route("HEAD", "/api/batch/{batch_id}/{job_id}/result", get_result),  # a download link's headers
]
