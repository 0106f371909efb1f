"""The error catalog and the one middleware that turns errors into JSON.

    FiledropError (status, code, message)          -> {"entity-type": "exception", ...}
    ├── BadRequest            400  ERR_*_INVALID, ERR_*_MALFORMED
    ├── NotFound              404  ERR_BATCH_NOT_FOUND, ERR_FILE_NOT_FOUND, ERR_OPERATION_NOT_FOUND, ...
    ├── Conflict              409  ERR_BATCH_CLOSED, ERR_JOB_RUNNING, ...
    ├── PayloadTooLarge       413  ERR_*_TOO_LARGE
    ├── Unprocessable         422  ERR_FIELD_INVALID (message names the field)
    ├── InsufficientStorage   507  ERR_DISK_FULL
    ├── ServiceUnavailable    503  ERR_SERVER_SHUTTING_DOWN, ERR_SERVER_BUSY (retryable)
    └── StorageFailed         500  ERR_STORAGE_FAILED (the disk failed; retryable)

The upload API's codes each have a class of their own below (``BatchNotFound``, ``DiskFull``...),
raised by name.

Codes NGINX answers itself, in the same shape (nginx.conf; the app never raises them):
404 ERR_NOT_FOUND, 405 ERR_METHOD_NOT_ALLOWED, 413 ERR_TOO_LARGE, 414 ERR_URI_TOO_LONG,
431 ERR_HEADERS_TOO_LARGE, 503 ERR_APP_UNAVAILABLE (app down; Retry-After), 504 ERR_APP_TIMEOUT.

Handlers and services raise; only ``error_middleware`` builds error responses. The deliberate
exception is 401, answered with an empty body (see ``server.auth``). The shape carries
``status`` and ``message`` because that is what the ``nuxeo`` client parses.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

log = logging.getLogger("filedrop.errors")


class FiledropError(Exception):
    status = 500
    code = "ERR_INTERNAL"

    def __init__(self, message: str, *, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.extra = extra


class BadRequest(FiledropError):
    status = 400
    code = "ERR_REQUEST_INVALID"


class NotFound(FiledropError):
    status = 404
    code = "ERR_NOT_FOUND"


class Conflict(FiledropError):
    status = 409
    code = "ERR_CONFLICT"


class PayloadTooLarge(FiledropError):
    status = 413
    code = "ERR_TOO_LARGE"


class Unprocessable(FiledropError):
    status = 422
    code = "ERR_FIELD_INVALID"

    def __init__(self, message: str, *, field: str, code: str | None = None, **extra: Any) -> None:
        super().__init__(message, code=code, field=field, **extra)


class InsufficientStorage(FiledropError):
    status = 507
    code = "ERR_DISK_FULL"


class ServiceUnavailable(FiledropError):
    status = 503
    code = "ERR_SERVER_SHUTTING_DOWN"


# -- the upload API's errors, one class per code (raised by name) -----------------------------
class BatchIdInvalid(BadRequest):
    code = "ERR_BATCH_ID_INVALID"


class FileIdxInvalid(BadRequest):
    code = "ERR_FILE_IDX_INVALID"


class FileNameInvalid(BadRequest):
    code = "ERR_FILE_NAME_INVALID"


class FileTypeInvalid(BadRequest):
    code = "ERR_FILE_TYPE_INVALID"


class FileSizeMissing(BadRequest):
    code = "ERR_FILE_SIZE_MISSING"


class FileSizeInvalid(BadRequest):
    code = "ERR_FILE_SIZE_INVALID"


class FileSizeMismatch(BadRequest):
    code = "ERR_FILE_SIZE_MISMATCH"


class FileSizeChanged(BadRequest):
    code = "ERR_FILE_SIZE_CHANGED"


class UploadTypeInvalid(BadRequest):
    code = "ERR_UPLOAD_TYPE_INVALID"


class ChunkCountMissing(BadRequest):
    code = "ERR_CHUNK_COUNT_MISSING"


class ChunkCountInvalid(BadRequest):
    code = "ERR_CHUNK_COUNT_INVALID"


class ChunkCountChanged(BadRequest):
    code = "ERR_CHUNK_COUNT_CHANGED"


class ChunkIndexMissing(BadRequest):
    code = "ERR_CHUNK_INDEX_MISSING"


class ChunkIndexInvalid(BadRequest):
    code = "ERR_CHUNK_INDEX_INVALID"


class RequestMalformed(BadRequest):
    code = "ERR_REQUEST_MALFORMED"


class BatchNotFound(NotFound):
    code = "ERR_BATCH_NOT_FOUND"


class FileNotFound(NotFound):
    code = "ERR_FILE_NOT_FOUND"


class FileIncomplete(NotFound):
    code = "ERR_FILE_INCOMPLETE"


class HandlerNotFound(NotFound):
    code = "ERR_HANDLER_NOT_FOUND"


class OperationNotFound(NotFound):
    code = "ERR_OPERATION_NOT_FOUND"


class FileTooLarge(PayloadTooLarge):
    code = "ERR_FILE_TOO_LARGE"


class ChunkTooLarge(PayloadTooLarge):
    code = "ERR_CHUNK_TOO_LARGE"


class FileTooManyChunks(PayloadTooLarge):
    code = "ERR_FILE_TOO_MANY_CHUNKS"


class BatchTooManyFiles(PayloadTooLarge):
    code = "ERR_BATCH_TOO_MANY_FILES"


class BatchTooLarge(PayloadTooLarge):
    code = "ERR_BATCH_TOO_LARGE"


class DiskFull(InsufficientStorage):
    code = "ERR_DISK_FULL"


class ServerBusy(ServiceUnavailable):
    """Out of a resource for a moment (open files): retry shortly."""

    code = "ERR_SERVER_BUSY"


class StorageFailed(FiledropError):
    """The disk failed an operation (EIO and the like): nothing was recorded; retry later."""

    status = 500
    code = "ERR_STORAGE_FAILED"


def error_body(status: int, code: str, message: str, **extra: Any) -> dict[str, Any]:
    """The one JSON error shape (Nuxeo's, plus a stable ``code``)."""
    body: dict[str, Any] = {"entity-type": "exception", "status": status, "code": code, "message": message}
    body.update(extra)
    return body


def error_response(status: int, code: str, message: str, **extra: Any) -> web.Response:
    return web.json_response(
        error_body(status, code, message, **extra), status=status, dumps=lambda o: json.dumps(o, ensure_ascii=False)
    )


_HTTP_CODES = {
    400: "ERR_REQUEST_INVALID",
    404: "ERR_NOT_FOUND",
    405: "ERR_METHOD_NOT_ALLOWED",
    413: "ERR_TOO_LARGE",
}


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except FiledropError as e:
        return error_response(e.status, e.code, e.message, **e.extra)
    except web.HTTPException as e:
        if e.status < 400 or e.status == 401:
            raise
        code = _HTTP_CODES.get(e.status, f"ERR_HTTP_{e.status}")
        resp = error_response(e.status, code, e.reason if e.text is None or e.text.startswith(str(e.status)) else e.text)
        if "Allow" in e.headers:  # a 405's list of methods
            resp.headers["Allow"] = e.headers["Allow"]
        return resp
    except ConnectionError:  # the client went away: nothing to answer, nothing to log
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "ERR_INTERNAL", "internal server error")
