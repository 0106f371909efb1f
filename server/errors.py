"""The error catalog and the one middleware that turns errors into JSON.

    FiledropError (status, code, message)          -> {"entity-type": "exception", ...}
    ├── BadRequest            400  ERR_*_INVALID, ERR_*_MALFORMED, ERR_REQUEST_INVALID
    │   ├── RequestIncomplete      ERR_REQUEST_INCOMPLETE (the client went away mid-body)
    │   └── KeyNameInvalid         ERR_KEY_NAME_INVALID (CLI)
    ├── NotFound              404  ERR_BATCH_NOT_FOUND, ERR_FILE_NOT_FOUND, ERR_OPERATION_NOT_FOUND, ...
    │   └── BatchNotFound          ERR_BATCH_NOT_FOUND
    ├── Forbidden             403  ERR_URL_INVALID, ERR_URL_EXPIRED (signed URLs, ``server.signing``)
    ├── Conflict              409  ERR_BATCH_CLOSED, ERR_JOB_RUNNING, ERR_DATA_RECEIVED, ...
    │   └── KeyNameTaken           ERR_KEY_NAME_TAKEN (CLI)
    ├── PayloadTooLarge       413  ERR_*_TOO_LARGE
    │   └── BodyTooLarge           ERR_TOO_LARGE (a body read whole over aiohttp's client_max_size)
    ├── Unprocessable         422  ERR_FIELD_INVALID (message names the field)
    ├── InsufficientStorage   507  ERR_DISK_FULL
    ├── ServiceUnavailable    503  ERR_SERVER_SHUTTING_DOWN, ERR_SERVER_BUSY (retryable; Retry-After)
    └── StorageFailed         500  ERR_STORAGE_FAILED (the disk failed; retryable)

The upload API's codes each have a class of their own below (``BatchNotFound``, ``DiskFull``...),
raised by name.

Codes NGINX answers itself, in the same shape (nginx.conf; the app never raises them):
404 ERR_NOT_FOUND, 405 ERR_METHOD_NOT_ALLOWED, 413 ERR_TOO_LARGE, 414 ERR_URI_TOO_LONG,
431 ERR_HEADERS_TOO_LARGE, 503 ERR_APP_UNAVAILABLE (app down; Retry-After), 504 ERR_APP_TIMEOUT.
``server.protocol`` answers what aiohttp refuses before any middleware runs (a control character
in a header value, broken chunk framing) as 400 ERR_REQUEST_INVALID in the same shape.

An error's ``headers`` (a class default, or given when raised) are sent with its answer: every 503
carries ``Retry-After`` (5 s shutting down, as NGINX says while the app is down; 1 s busy, or the
wait the raiser knows).

Handlers and services raise; only ``error_middleware`` builds error responses. The deliberate
exception is 401, answered with an empty body (see ``server.auth``). The shape carries
``status`` and ``message`` because that is what the ``nuxeo`` client parses.

A client's mistake (4xx) or a client that went away is at most one INFO line in the log; a
traceback (ERROR) always means a fault of the server.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from server.db.engine import BUSY_TIMEOUT, connection_lost, database_locked, log_failure

log = logging.getLogger("filedrop.errors")


class FiledropError(Exception):
    """``headers``: sent with the answer (a class's default, or the instance's own: ``Retry-After``)."""

    status = 500
    code = "ERR_INTERNAL"
    headers: Mapping[str, str] = MappingProxyType({})

    def __init__(self, message: str, *, code: str | None = None, headers: Mapping[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        if headers is not None:
            self.headers = MappingProxyType({**self.headers, **headers})
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


class RequestIncomplete(BadRequest):
    code = "ERR_REQUEST_INCOMPLETE"  # the client went away mid-body (nobody reads the answer)


class KeyNameInvalid(BadRequest):
    code = "ERR_KEY_NAME_INVALID"


class BatchNotFound(NotFound):
    code = "ERR_BATCH_NOT_FOUND"


class KeyNameTaken(Conflict):
    code = "ERR_KEY_NAME_TAKEN"


class InsufficientStorage(FiledropError):
    status = 507
    code = "ERR_DISK_FULL"


class ServiceUnavailable(FiledropError):
    """Every 503 says when to retry, as NGINX's own 503 does (``Retry-After: 5`` while the app is
    down or restarting, which is what follows a shutdown)."""

    status = 503
    code = "ERR_SERVER_SHUTTING_DOWN"
    headers = MappingProxyType({"Retry-After": "5"})


# --- smartlink jobs (issue 8): raised by name -----------------------------------------------


class JobNotFound(NotFound):
    code = "ERR_JOB_NOT_FOUND"


class SmartlinkBatchNotFound(NotFound):
    code = "ERR_BATCH_NOT_FOUND"


class JobRunning(Conflict):
    code = "ERR_JOB_RUNNING"


class BatchTaken(Conflict):
    code = "ERR_BATCH_TAKEN"


class DataTooLarge(PayloadTooLarge):
    code = "ERR_DATA_TOO_LARGE"


class TemplateTooLarge(PayloadTooLarge):
    code = "ERR_TEMPLATE_TOO_LARGE"


class FieldTooLarge(PayloadTooLarge):
    code = "ERR_FIELD_TOO_LARGE"


class BodyTooLarge(PayloadTooLarge):
    """A body read whole (an execute's JSON) over aiohttp's ``client_max_size``, which app.py
    sets from FILEDROP_MAX_DATA_SIZE: aiohttp's own message names no setting. NGINX lets such a
    body through (up to FILEDROP_MAX_CHUNK_SIZE under /api/v1/), so this is what a client sees."""

    code = "ERR_TOO_LARGE"

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body over the {limit}-byte limit of an execute body (FILEDROP_MAX_DATA_SIZE, "
                         "at least 1 MiB, + 1 MiB)")


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
    """Out of a resource for a moment (open files, a database connection): retry shortly. A wait
    that is known is given instead (the template checker's: ``server.jobs.checker``)."""

    code = "ERR_SERVER_BUSY"
    headers = MappingProxyType({"Retry-After": "1"})


class StorageFailed(FiledropError):
    """The disk failed an operation (EIO and the like): nothing was recorded; retry later."""

    status = 500
    code = "ERR_STORAGE_FAILED"


# --- signed URLs (issue 11): raised by name -------------------------------------------------


class Forbidden(FiledropError):
    """403: a signed URL that does not allow the request; raised only as one of the two below."""

    status = 403


class UrlInvalid(Forbidden):
    """A signed URL whose path, query, expiry or signature was changed (or never signed here)."""

    code = "ERR_URL_INVALID"


class UrlExpired(Forbidden):
    """A signed URL past its expiry (or signed with a key whose grace period is over)."""

    code = "ERR_URL_EXPIRED"


class DataReceived(Conflict):
    """A job's data arrived already: its upload URL takes one PUT."""

    code = "ERR_DATA_RECEIVED"


class JobNotWaiting(Conflict):
    """A job that waits for no data (it was started with its rows, or ended without them)."""

    code = "ERR_JOB_NOT_WAITING"


class JobNotFinished(Conflict):
    """The result download URL is made once the job has ended (its rows no longer change)."""

    code = "ERR_JOB_NOT_FINISHED"


def error_body(status: int, code: str, message: str, **extra: Any) -> dict[str, Any]:
    """The one JSON error shape (Nuxeo's, plus a stable ``code``)."""
    body: dict[str, Any] = {"entity-type": "exception", "status": status, "code": code, "message": message}
    body.update(extra)
    return body


def error_response(status: int, code: str, message: str, **extra: Any) -> web.Response:
    return web.json_response(
        error_body(status, code, message, **extra), status=status, dumps=lambda o: json.dumps(o, ensure_ascii=False)
    )


def answer(e: FiledropError) -> web.Response:
    """The JSON answer of an error from the catalog, with its headers."""
    resp = error_response(e.status, e.code, e.message, **e.extra)
    resp.headers.update(e.headers)
    return resp


def first_line(e: HttpProcessingError) -> str:
    """What aiohttp's parser says went wrong, without its echo of the raw bytes."""
    return (e.message or "bad request").strip().splitlines()[0].rstrip(":")


def client_gone(request: web.BaseRequest) -> bool:
    """True when the request's connection is closed or closing (the client went away)."""
    transport = request.transport
    return transport is None or transport.is_closing()


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
        return answer(e)
    except web.HTTPRequestEntityTooLarge:
        return answer(BodyTooLarge(request.client_max_size))
    except web.HTTPException as e:
        if e.status < 400 or e.status == 401:
            raise
        code = _HTTP_CODES.get(e.status, f"ERR_HTTP_{e.status}")
        resp = error_response(e.status, code, e.reason if e.text is None or e.text.startswith(str(e.status)) else e.text)
        if "Allow" in e.headers:  # a 405's list of methods
            resp.headers["Allow"] = e.headers["Allow"]
        return resp
    except HttpProcessingError as e:
        # aiohttp's parser refused part of the request while a handler read it (e.g. the headers
        # of a multipart part): the client's malformed request, not our fault.
        log.info("malformed request %s %s: %s", request.method, request.path, first_line(e))
        return answer(BadRequest(f"malformed request: {first_line(e)}"))
    except (ConnectionError, web.RequestPayloadError) as e:
        if client_gone(request):
            # The client disconnected (or NGINX gave up on it) mid-request: one line, and an answer
            # aiohttp drops quietly (raising would make it log the disconnect with a traceback).
            log.info("client went away during %s %s: %s", request.method, request.path, e)
            return answer(RequestIncomplete("the request ended before its body did"))
        if isinstance(e, web.RequestPayloadError):  # a body the client framed wrongly
            log.info("malformed body of %s %s: %s", request.method, request.path, e)
            return answer(BadRequest(f"malformed request body: {e}"))
        return _internal_error(request)  # e.g. a connection of ours failed: our fault
    except PoolTimeout:
        # Every PostgreSQL connection of this process stayed busy for the pool's timeout.
        log.warning("no free database connection for %s %s (FILEDROP_DATABASE_POOL)", request.method, request.path)
        return answer(ServerBusy("every database connection of this process is busy (FILEDROP_DATABASE_POOL); "
                                 "retry shortly"))
    except Exception as e:
        # PostgreSQL restarted or ended this session; another process held SQLite's write lock
        # past busy_timeout (a process frozen in a transaction, say: README, More than one
        # process). Busy, not a fault of this request: one WARNING line (log_failure's) and 503.
        if connection_lost(e) is not None:
            log_failure(log, "%s %s", e, request.method, request.path)
            return answer(ServerBusy("the connection to the database was lost; retry shortly"))
        if database_locked(e):
            log_failure(log, "%s %s", e, request.method, request.path)
            return answer(ServerBusy(f"the database is locked by another process (its write lock was held for "
                                     f"{BUSY_TIMEOUT:g} s); retry shortly"))
        return _internal_error(request)


def _internal_error(request: web.Request) -> web.Response:
    log.exception("unhandled error on %s %s", request.method, request.path)
    return answer(FiledropError("internal server error"))
