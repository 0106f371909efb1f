"""Upload endpoints: legacy ``/site/automation/batch/...`` and REST ``/api/v1/upload/...``.

Thin handlers: parse headers and path into typed values, make one ``UploadService`` call,
serialize. Errors are raised (``server.errors``); the error middleware answers them. Shapes
follow the nuxeo 7.1.0 client (README "Uploads", docs/api.md): upload answers carry
string values, file info numeric ones, and every chunk answer lists all chunk ids so far.
``app.py`` mounts ``ROUTES`` both bare and under ``/nuxeo``.
"""

from __future__ import annotations

import asyncio
import json
import mimetypes
import re
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from server.errors import (
    BatchIdInvalid,
    ChunkCountInvalid,
    ChunkCountMissing,
    ChunkIndexInvalid,
    ChunkIndexMissing,
    FiledropError,
    FileIdxInvalid,
    FileNameInvalid,
    FileSizeInvalid,
    FileSizeMissing,
    FileTypeInvalid,
    HandlerNotFound,
    RequestMalformed,
    Unprocessable,
    UploadTypeInvalid,
)
from server.jsondoc import parse_json
from server.keys import DATABASE, OPERATIONS, OWNER, SETTINGS, UPLOADS
from server.protocol import RECV_SIZE
from server.uploads.model import FileState, UploadOutcome, UploadRequest
from server.uploads.operations import OperationResult
from server.uploads.service import UploadService

# Legacy clients choose their batch ids: 1-128 of [A-Za-z0-9._-], not starting with a dot
# (so never ".", ".." or a dot-name) and never containing "..". Ids are only ever data, but a
# strict alphabet keeps them safe in logs, URLs and NGINX paths.
_BATCH_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_FILE_IDX = re.compile(r"[0-9]{1,9}")
_MAX_NAME = 255  # characters; what common file systems allow for one name
# Path separators and control characters: C0, DEL and C1 (U+0080-U+009F, e.g. U+0085 NEXT LINE).
_NAME_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f-\x9f/\\]")
_COUNT_MAX = 1 << 62
# Content-Types a client sends for a body it did not type (curl -d, HTML forms): no file type.
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
_DEFAULT_TYPE = "application/octet-stream"


def check_batch_id(value: str) -> str:
    """Return ``value`` if it is a valid batch id, else raise 400 ERR_BATCH_ID_INVALID."""
    if not _BATCH_ID.fullmatch(value) or ".." in value:
        raise BatchIdInvalid("batch id must be 1-128 characters of A-Z a-z 0-9 . _ -, not start with '.' "
                             "nor contain '..'")
    return value


def parse_file_idx(value: str | None) -> int:
    if value is None or not _FILE_IDX.fullmatch(value.strip()):
        raise FileIdxInvalid("fileIdx must be a non-negative integer")
    return int(value)


def parse_count(value: str | None, header: str, missing: type[FiledropError], invalid: type[FiledropError], *,
                minimum: int = 0, maximum: int = _COUNT_MAX) -> int:
    if value is None:
        raise missing(f"{header} is required")
    v = value.strip()
    if not v.isascii() or not v.isdigit() or len(v) > 19 or not minimum <= int(v) <= maximum:
        raise invalid(f"{header} must be an integer from {minimum} to {maximum}")
    return int(v)


def decode_file_name(value: str | None) -> str:
    """Percent-decode X-File-Name as strict UTF-8.

    Rejected (400 ERR_FILE_NAME_INVALID): missing or empty, non-UTF-8 escapes, control
    characters (C0, DEL, C1) including NUL, path separators ``/`` and ``\\``, ``.`` and ``..``,
    more than 255 characters. A name is one file name as every client OS knows it; the server
    never uses it as a path, but a separator or a NUL in one is always a confused or hostile client.
    """
    if value is None or not value.strip():
        raise FileNameInvalid("X-File-Name is required")
    try:
        raw = value.encode("utf-8", "surrogateescape")
        name = urllib.parse.unquote_to_bytes(raw).decode("utf-8")
    except UnicodeError:
        raise FileNameInvalid("X-File-Name is not percent-encoded UTF-8") from None
    if _NAME_FORBIDDEN.search(name) or name in (".", ".."):
        raise FileNameInvalid("X-File-Name must not contain path separators or control characters")
    if len(name) > _MAX_NAME:
        raise FileNameInvalid(f"X-File-Name is longer than {_MAX_NAME} characters")
    return name


def file_type(request: web.Request, name: str) -> str:
    """X-File-Type; without it, the type the file name says (as browsers guess it), then a
    Content-Type the client chose (not a form's), then application/octet-stream."""
    given = request.headers.get("X-File-Type", "").strip()
    if not given:
        given = mimetypes.guess_type(name, strict=False)[0] or ""
    if not given and request.content_type not in _FORM_TYPES:
        given = request.content_type
    mimetype = given or _DEFAULT_TYPE
    if len(mimetype) > 255 or not mimetype.isprintable():
        raise FileTypeInvalid("X-File-Type is not a MIME type")
    return mimetype


async def _body(request: web.Request) -> AsyncIterator[bytes]:
    """The request body as the socket delivers it: ``readchunk`` hands over each piece as it
    came (``iter_any`` joins what has piled up, a copy into fresh memory every time the
    handler was busy). The socket is paused only once two reads (``RECV_SIZE``) wait here:
    aiohttp's default pauses it past 512 KiB, so after every read, and a body written to a
    disk slower than the socket then stalled between pieces (1 GiB in 8 MiB chunks,
    alternated: 668 -> 695 and 626 -> 674 MB/s on the disk, 677 vs 676 on tmpfs; peak RSS
    89-90 -> 92-93 MB)."""
    content = request.content
    content.set_read_chunk_size(RECV_SIZE)
    while True:
        data, end_of_chunk = await content.readchunk()
        if data:
            yield data
        elif not end_of_chunk or content.at_eof():
            # (b"", True) is also what aiohttp's shared empty body (every Content-Length: 0
            # request) answers forever once it has been read by any request: not an end of
            # chunk but the end, else an empty upload spins the event loop.
            return


def _service(request: web.Request) -> UploadService:
    return request.app[UPLOADS]


def _batch_id(request: web.Request) -> str:
    return check_batch_id(request.match_info["batch_id"])


def _flag(request: web.Request, header: str) -> bool:
    return request.headers.get(header, "").strip().lower() == "true"


def _upload_request(request: web.Request, file_idx: int) -> UploadRequest:
    h = request.headers
    kind = h.get("X-Upload-Type", "normal").strip().lower() or "normal"
    if kind not in ("normal", "chunked"):
        raise UploadTypeInvalid("X-Upload-Type must be 'normal' or 'chunked'")
    chunked = kind == "chunked"
    name = decode_file_name(h.get("X-File-Name"))
    length = request.content_length
    if h.get("X-File-Size") is None and not chunked and length is not None:
        size = length  # a plain POST (curl, a browser) may only say Content-Length
    else:
        size = parse_count(h.get("X-File-Size"), "X-File-Size", FileSizeMissing, FileSizeInvalid)
    idx, count = 0, 1
    if chunked:
        count = parse_count(h.get("X-Upload-Chunk-Count"), "X-Upload-Chunk-Count", ChunkCountMissing,
                            ChunkCountInvalid, minimum=1)
        idx = parse_count(h.get("X-Upload-Chunk-Index"), "X-Upload-Chunk-Index", ChunkIndexMissing,
                          ChunkIndexInvalid)
    return UploadRequest(file_idx=file_idx, name=name, size=size, mimetype=file_type(request, name),
                         chunked=chunked, chunk_idx=idx, chunk_count=count, content_length=length)


def _upload_body(o: UploadOutcome) -> dict[str, Any]:
    body: dict[str, Any] = {"batchId": o.batch_id, "fileIdx": str(o.file_idx),
                            "uploadType": "chunked" if o.chunked else "normal",
                            "uploadedSize": str(o.uploaded_size), "uploaded": "true"}
    if o.chunked:
        body["uploadedChunkIds"] = o.chunk_ids
        body["chunkCount"] = str(o.chunk_count)
    return body


def _file_body(f: FileState) -> dict[str, Any]:
    body: dict[str, Any] = {"name": f.name, "size": f.size, "uploadType": "chunked" if f.chunked else "normal",
                            "batchId": f.batch_id, "fileIdx": str(f.file_idx), "mimetype": f.mimetype,
                            "uploadedSize": f.received, "uploadedChunkIds": f.chunk_ids,
                            "chunkCount": f.chunk_count, "complete": f.complete, "state": f.state}
    if f.sha256:
        body["sha256"] = f.sha256
    return body


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=lambda o: json.dumps(o, ensure_ascii=False))


async def _execute_params(request: web.Request) -> tuple[dict[str, Any], dict[str, Any]]:
    """``{"params": {...} | null, "context": {...}}`` (an empty body is no params). A body that
    is not JSON is 400; one nested too deep or holding a lone surrogate is 422 naming ``body``."""
    raw = await request.read()
    if not raw.strip():
        return {}, {}
    try:
        doc = await asyncio.to_thread(parse_json, raw, "body") if len(raw) > 1 << 16 else parse_json(raw, "body")
    except Unprocessable as e:
        if e.message.startswith("body is not"):  # not JSON, not UTF-8: a malformed request
            raise RequestMalformed(f"execute {e.message}") from None
        raise
    if not isinstance(doc, dict):
        raise RequestMalformed("execute body must be a JSON object")
    params, context = doc.get("params") or {}, doc.get("context") or {}
    if not isinstance(params, dict) or not isinstance(context, dict):
        raise RequestMalformed("'params' and 'context' must be JSON objects")
    return params, context


def _operation_response(request: web.Request, result: OperationResult) -> web.Response:
    if _flag(request, "X-NXVoidOperation"):
        return web.Response(status=204)
    if result.body is None:
        return web.Response(status=result.status)
    return _json(result.body, result.status)


# -- REST /api/v1/upload ---------------------------------------------------------------------
async def create_batch(request: web.Request) -> web.Response:
    return _json({"batchId": await _service(request).create_batch(request[OWNER])}, 201)


async def list_handlers(_request: web.Request) -> web.Response:
    return _json({"handlers": [{"name": "default"}]})


async def create_batch_with_handler(request: web.Request) -> web.Response:
    if request.match_info["handler"].lower() != "default":
        raise HandlerNotFound(f"upload handler {request.match_info['handler']!r} not found")
    return await create_batch(request)


async def upload_file(request: web.Request) -> web.Response:
    batch_id = _batch_id(request)
    upload = _upload_request(request, parse_file_idx(request.match_info["file_idx"]))
    o = await _service(request).receive(request[OWNER], batch_id, upload, _body(request))
    return _json(_upload_body(o), 201 if o.complete or not o.chunked else 202)


async def get_batch(request: web.Request) -> web.Response:
    files = await _service(request).list_files(request[OWNER], _batch_id(request))
    if not files:
        return web.Response(status=204)
    return _json([_file_body(f) for f in files])


async def get_file(request: web.Request) -> web.Response:
    batch_id = _batch_id(request)
    f = await _service(request).file_state(request[OWNER], batch_id, parse_file_idx(request.match_info["file_idx"]))
    return _json(_file_body(f))


async def delete_file(request: web.Request) -> web.Response:
    batch_id = _batch_id(request)
    await _service(request).delete_file(request[OWNER], batch_id, parse_file_idx(request.match_info["file_idx"]))
    return web.Response(status=204)


async def drop_batch(request: web.Request) -> web.Response:
    await _service(request).drop_batch(request[OWNER], _batch_id(request), refuse_if_read=True)
    return web.Response(status=204)


async def execute_batch(request: web.Request) -> web.Response:
    batch_id = _batch_id(request)
    raw_idx = request.match_info.get("file_idx")
    file_idx = None if raw_idx is None else parse_file_idx(raw_idx)
    params, context = await _execute_params(request)
    result = await _service(request).execute(request[OWNER], batch_id, file_idx, request.match_info["operation"],
                                             params, context, keep=_flag(request, "X-Batch-No-Drop"))
    return _operation_response(request, result)


# -- legacy /site/automation/batch -----------------------------------------------------------
async def legacy_upload(request: web.Request) -> web.Response:
    h = request.headers
    if h.get("X-Batch-Id") is None:
        raise BatchIdInvalid("X-Batch-Id is required")
    batch_id = check_batch_id(h["X-Batch-Id"].strip())
    upload = _upload_request(request, parse_file_idx(h.get("X-File-Idx")))
    o = await _service(request).receive(request[OWNER], batch_id, upload, _body(request), create=True)
    return _json(_upload_body(o))


async def legacy_list_files(request: web.Request) -> web.Response:
    files = await _service(request).list_files(request[OWNER], _batch_id(request))
    return _json([{"name": f.name, "size": f.size, "fileIdx": str(f.file_idx), "complete": f.complete}
                  for f in files])


async def legacy_drop(request: web.Request) -> web.Response:
    batch_id = _batch_id(request)
    await _service(request).drop_batch(request[OWNER], batch_id, refuse_if_read=True)
    return _json({"batchId": batch_id, "dropped": "true"})


async def legacy_execute(request: web.Request) -> web.Response:
    params, context = await _execute_params(request)
    operation, batch_id, raw_idx = params.pop("operationId", None), params.pop("batchId", None), params.pop(
        "fileIdx", None)
    if not isinstance(operation, str) or not operation:
        raise RequestMalformed("params.operationId is required")
    if not isinstance(batch_id, str):
        raise BatchIdInvalid("params.batchId is required")
    check_batch_id(batch_id)
    file_idx = None if raw_idx is None else parse_file_idx(str(raw_idx))
    result = await _service(request).execute(request[OWNER], batch_id, file_idx, operation, params, context,
                                             keep=_flag(request, "X-Batch-No-Drop"))
    return _operation_response(request, result)


ROUTES: list[web.RouteDef] = [
    web.post("/api/v1/upload", create_batch),
    web.post("/api/v1/upload/", create_batch),
    web.route("GET", "/api/v1/upload/handlers", list_handlers),
    web.post("/api/v1/upload/new/{handler}", create_batch_with_handler),
    web.post("/api/v1/upload/{batch_id}/execute/{operation}", execute_batch),
    web.post("/api/v1/upload/{batch_id}/{file_idx}/execute/{operation}", execute_batch),
    web.post("/api/v1/upload/{batch_id}/{file_idx}", upload_file),
    web.route("GET", "/api/v1/upload/{batch_id}", get_batch),
    web.route("GET", "/api/v1/upload/{batch_id}/{file_idx}", get_file),
    web.delete("/api/v1/upload/{batch_id}/{file_idx}", delete_file),
    web.delete("/api/v1/upload/{batch_id}", drop_batch),
    web.post("/site/automation/batch/upload", legacy_upload),
    web.route("GET", "/site/automation/batch/files/{batch_id}", legacy_list_files),
    web.route("GET", "/site/automation/batch/drop/{batch_id}", legacy_drop),
    web.post("/site/automation/batch/drop/{batch_id}", legacy_drop),
    web.delete("/site/automation/batch/drop/{batch_id}", legacy_drop),
    web.post("/site/automation/batch/execute", legacy_execute),
]


async def uploads_context(app: web.Application) -> AsyncIterator[None]:
    """The upload service on ``app[UPLOADS]``, ``Batch.Manifest`` registered, and its start
    (what a reboot lost forgotten, what a crash left synced and assembled) before the first
    request."""
    service = UploadService(app[DATABASE], app[SETTINGS], app[OPERATIONS])
    app[OPERATIONS].register("Batch.Manifest", service.manifest)
    app[UPLOADS] = service
    await service.recover()
    # Chunks become power-loss durable in groups: one sync a second at most while they arrive.
    syncing = asyncio.create_task(service.sync_points(every=app[SETTINGS].upload_sync_interval))
    yield
    syncing.cancel()
    await asyncio.gather(syncing, return_exceptions=True)
    await service.close()
