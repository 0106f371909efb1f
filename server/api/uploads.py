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
import unicodedata
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
from server.uploads.store import WRITE_BUFFER

# Legacy clients choose their batch ids: 1-128 of [A-Za-z0-9._-], not starting with a dot
# (so never ".", ".." or a dot-name) and never containing "..". Ids are only ever data, but a
# strict alphabet keeps them safe in logs, URLs and NGINX paths.
_BATCH_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_FILE_IDX = re.compile(r"[0-9]{1,9}")
_MAX_NAME = 255  # bytes of UTF-8: what common file systems allow for one name (ext4, XFS, APFS)
# Path separators and control characters: C0, DEL and C1 (U+0080-U+009F, e.g. U+0085 NEXT LINE).
_NAME_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f-\x9f/\\]")
# Characters a name shows back wrongly in listings, manifests and the drop page: Unicode format
# characters (Cf: bidi overrides such as U+202E, zero-width space, BOM, tag characters), line and
# paragraph separators (Zl, Zp). The two joiners stay: Persian and Indic names need ZWNJ
# (U+200C), emoji sequences ZWJ (U+200D).
_NAME_REFUSED_CATEGORIES = ("Cf", "Zl", "Zp")
_NAME_JOINERS = ("\u200c", "\u200d")
# RFC 9110 media type: type "/" subtype *( OWS ";" OWS [ token "=" ( token / quoted-string ) ] ),
# ASCII only (obs-text is for old senders, not for a type we store and serve back). The OpenAPI
# document gives X-File-Type this pattern (server/openapi.py).
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
MEDIA_TYPE = re.compile(rf"{_TOKEN}/{_TOKEN}(?:[ \t]*;[ \t]*(?:{_TOKEN}=(?:{_TOKEN}|"
                         r'"(?:[\t \x21\x23-\x5b\x5d-\x7e]|\\[\t \x21-\x7e])*"))?)*')
_MAX_TYPE = 255  # characters of a file's type: the width of its column (batch_files.mimetype)
_COUNT_MAX = 1 << 62
# A whole file sent without Content-Length nor X-File-Size is read into memory up to this (the
# size up to which a whole file is read whole anyway: store.WRITE_BUFFER); bigger is 400.
_UNSIZED_MAX = WRITE_BUFFER
# Content-Types a client sends for a body it did not type (curl -d, HTML forms): no file type.
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
_DEFAULT_TYPE = "application/octet-stream"


def check_batch_id(value: str) -> str:
    """Return ``value`` if it is a valid batch id, else raise 400 ERR_BATCH_ID_INVALID."""
    if not _BATCH_ID.fullmatch(value) or ".." in value:
        raise BatchIdInvalid("batch id must be 1-128 characters of A-Z a-z 0-9 . _ -, not start with '.' "
                             "nor contain '..'")
    return value


def one_header(request: web.Request, header: str, invalid: type[FiledropError]) -> str | None:
    """``header``'s value, None if absent. Sent more than once, its values must agree (a proxy or
    a client that adds its own copy must not have one of them win silently): else 400 with the
    header's own ``invalid`` code, naming it."""
    values = request.headers.getall(header, [])
    if len({v.strip() for v in values}) > 1:
        raise invalid(f"{header} is sent {len(values)} times with different values; send it once")
    return values[0] if values else None


def parse_file_idx(value: str | None, name: str = "fileIdx") -> int:
    """A fileIdx (path segment, ``X-File-Idx``, legacy ``params.fileIdx``: ``name``, which the
    400 names): ASCII digits, with spaces or tabs around it at most. ``str.strip`` would also
    take U+001C-U+001F, U+0085 or U+00A0 off, which ``int()`` then refuses (a 500) or reads as a
    number the client never sent."""
    if value is None:
        raise FileIdxInvalid(f"{name} is required")
    v = value.strip(" \t")
    if not _FILE_IDX.fullmatch(v):
        raise FileIdxInvalid(f"{name} must be a non-negative integer (at most 9 digits)")
    return int(v)


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

    Rejected (400 ERR_FILE_NAME_INVALID): missing, empty or only whitespace, non-UTF-8 escapes,
    control characters (C0, DEL, C1) including NUL, path separators ``/`` and ``\\``, ``.`` and
    ``..``, format characters (Cf but the joiners U+200C/U+200D), line and paragraph separators,
    noncharacters, more than 255 bytes of UTF-8. A name is one file name as every client OS
    knows it; the server never uses it as a path, but a separator or a NUL in one is always a
    confused or hostile client, and an invisible or direction-changing character shows another
    name than the one stored wherever the name is shown back.
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
    if not name.strip():
        raise FileNameInvalid("X-File-Name is required: a name of only whitespace is none")
    for c in name:
        if _noncharacter(c) or (unicodedata.category(c) in _NAME_REFUSED_CATEGORIES and c not in _NAME_JOINERS):
            kind = "a noncharacter" if _noncharacter(c) else unicodedata.name(c, "a format character")
            raise FileNameInvalid(f"X-File-Name must not contain U+{ord(c):04X} ({kind}): invisible or "
                                  "direction-changing characters, line separators and noncharacters are refused")
    size = len(name.encode("utf-8"))
    if size > _MAX_NAME:
        raise FileNameInvalid(f"X-File-Name is {size} bytes of UTF-8, over {_MAX_NAME} (what file systems "
                              "allow for one name)")
    return name


def _noncharacter(c: str) -> bool:
    """U+FDD0-U+FDEF and the last two code points of every plane (U+FFFE, U+1FFFF...)."""
    cp = ord(c)
    return 0xFDD0 <= cp <= 0xFDEF or cp & 0xFFFE == 0xFFFE


def file_type(request: web.Request, name: str) -> str:
    """X-File-Type; without it, the type the file name says (as browsers guess it), then a
    Content-Type the client chose (not a form's), then application/octet-stream.

    Only an RFC 9110 media type of at most ``_MAX_TYPE`` characters is stored: an X-File-Type
    that is not one is 400 (the client said what the file is, wrongly: telling it beats storing
    a guess it did not ask for); a Content-Type that is not one (or whose type is longer) is
    passed over as a form's is (it frames the body, and tools send one for any body)."""
    given = (one_header(request, "X-File-Type", FileTypeInvalid) or "").strip()
    if given and (len(given) > _MAX_TYPE or not MEDIA_TYPE.fullmatch(given)):
        raise FileTypeInvalid(f"X-File-Type must be a media type of at most {_MAX_TYPE} characters: type/subtype, "
                              "ASCII tokens, optional ;name=value parameters (RFC 9110)")
    if not given:
        given = mimetypes.guess_type(name, strict=False)[0] or ""
    if not given and request.content_type not in _FORM_TYPES and len(request.content_type) <= _MAX_TYPE \
            and MEDIA_TYPE.fullmatch(request.headers.get("Content-Type", "").strip()):
        given = request.content_type
    return given or _DEFAULT_TYPE


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


def _upload_request(request: web.Request, file_idx: int, length: int | None) -> UploadRequest:
    """The upload its headers declare; ``length``: the body's, when known before it is read
    (Content-Length, or a small body without one read first: see ``_upload``)."""
    kind = (one_header(request, "X-Upload-Type", UploadTypeInvalid) or "normal").strip().lower() or "normal"
    if kind not in ("normal", "chunked"):
        raise UploadTypeInvalid("X-Upload-Type must be 'normal' or 'chunked'")
    chunked = kind == "chunked"
    name = decode_file_name(one_header(request, "X-File-Name", FileNameInvalid))
    declared = one_header(request, "X-File-Size", FileSizeInvalid)
    if declared is None and not chunked and length is not None:
        size = length  # a plain POST (curl, a browser) may only say Content-Length
    elif declared is None and chunked:
        raise FileSizeMissing("X-File-Size (the whole file's size) is required with X-Upload-Type: chunked")
    elif declared is None:
        raise _unsized_too_large()
    else:
        size = parse_count(declared, "X-File-Size", FileSizeMissing, FileSizeInvalid)
    idx, count = 0, 1
    if chunked:
        count = parse_count(one_header(request, "X-Upload-Chunk-Count", ChunkCountInvalid), "X-Upload-Chunk-Count",
                            ChunkCountMissing, ChunkCountInvalid, minimum=1)
        idx = parse_count(one_header(request, "X-Upload-Chunk-Index", ChunkIndexInvalid), "X-Upload-Chunk-Index",
                          ChunkIndexMissing, ChunkIndexInvalid)
    return UploadRequest(file_idx=file_idx, name=name, size=size, mimetype=file_type(request, name),
                         chunked=chunked, chunk_idx=idx, chunk_count=count, content_length=length)


def _unsized(request: web.Request) -> bool:
    """A whole file sent without Content-Length (Transfer-Encoding: chunked) nor X-File-Size."""
    h = request.headers
    return request.content_length is None and "X-File-Size" not in h and \
        h.get("X-Upload-Type", "").strip().lower() in ("", "normal")


async def _upload(request: web.Request, file_idx: int) -> tuple[UploadRequest, AsyncIterator[bytes]]:
    """The upload and its body. Its size must be known before a byte is written (the free-disk
    reservation, the batch's limits, where chunks go), so a whole file sent without
    Content-Length nor X-File-Size is read first, up to ``_UNSIZED_MAX`` bytes (as a whole file
    of that size is anyway): its length is its size. One bigger is 400 ERR_FILE_SIZE_MISSING.
    NGINX passes a small chunked body on with a Content-Length; a bigger one chunked: either
    way the same answer."""
    if not _unsized(request):
        return _upload_request(request, file_idx, request.content_length), _body(request)
    _upload_request(request, file_idx, 0)  # every other header checked before the body is read
    pieces, length = [], 0
    async for data in _body(request):
        length += len(data)
        if length > _UNSIZED_MAX:
            raise _unsized_too_large()
        pieces.append(data)
    return _upload_request(request, file_idx, length), _whole(b"".join(pieces))


def _unsized_too_large() -> FileSizeMissing:
    return FileSizeMissing(f"X-File-Size is required for a body over {_UNSIZED_MAX} bytes sent without "
                           "Content-Length (Transfer-Encoding: chunked)")


async def _whole(data: bytes) -> AsyncIterator[bytes]:
    if data:
        yield data


def _upload_body(o: UploadOutcome) -> dict[str, Any]:
    body: dict[str, Any] = {"batchId": o.batch_id, "fileIdx": str(o.file_idx),
                            "uploadType": "chunked" if o.chunked else "normal",
                            "uploadedSize": str(o.uploaded_size), "uploaded": "true"}
    if o.chunked:
        body["uploadedChunkIds"] = o.chunk_ids
        body["chunkCount"] = str(o.chunk_count)
    if o.complete and o.sha256:  # the file info's own value; never while the file is incomplete
        body["sha256"] = o.sha256
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
    # null or absent is no params; any other non-object ([], 0, "", false) is refused, not read
    # as {} (which ran the operation, and dropped the batch, on a malformed request)
    params, context = doc.get("params"), doc.get("context")
    params, context = {} if params is None else params, {} if context is None else context
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
    upload, body = await _upload(request, parse_file_idx(request.match_info["file_idx"]))
    o = await _service(request).receive(request[OWNER], batch_id, upload, body)
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
    given = one_header(request, "X-Batch-Id", BatchIdInvalid)
    if given is None:
        raise BatchIdInvalid("X-Batch-Id is required")
    batch_id = check_batch_id(given.strip())
    upload, body = await _upload(request, parse_file_idx(one_header(request, "X-File-Idx", FileIdxInvalid),
                                                         "X-File-Idx"))
    o = await _service(request).receive(request[OWNER], batch_id, upload, body, create=True)
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
    file_idx = None if raw_idx is None else parse_file_idx(str(raw_idx), "params.fileIdx")
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
