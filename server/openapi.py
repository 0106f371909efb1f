"""The API as an OpenAPI 3.1 document, served at ``/api/openapi.json`` (also through NGINX).

:data:`OPERATIONS` is the table: one :class:`Op` per route of the router (method, path, its
parameters and headers, its body, its answers). :func:`build` turns it into the document, with
the limits of the running ``Settings`` in the descriptions, the upload routes repeated under
``/nuxeo``, and the answers every operation can get (NGINX's JSON errors, 401, 503) added to
each. Adding a route is one ``Op(...)`` here; ``tests/test_api_openapi.py`` fails while a route
of the router is missing from the document or the other way round, and schemathesis checks the
live server (through NGINX) against it (``tests/test_api_schemathesis.py``).

Execute operations: the generic ``.../execute/{operation}`` route is documented as such, and each
registered operation (``Batch.Manifest``, ``SmartLinks.Generate``) again under its own literal
path, with its own parameters and answer (:data:`EXECUTE_OPERATIONS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from server.api.uploads import MEDIA_TYPE
from server.config import Settings
from server.jobs.checker import CHECKS_WAITING
from server.nginx import job_body_limit

JSON = "application/json"
Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


@dataclass(frozen=True)
class Param:
    name: str
    where: str  # path | query | header
    schema: Schema
    description: str = ""
    required: bool = False


@dataclass(frozen=True)
class Answer:
    """One response: ``schema`` None is an empty body; ``media`` its content type."""

    description: str
    schema: Schema | None = None
    media: str = JSON
    headers: dict[str, str] = field(default_factory=dict)  # name -> description


@dataclass(frozen=True)
class Link:
    """An OpenAPI link: what an answer's body lets a client call next (schemathesis follows them
    in its stateful phase). ``parameters``: name -> runtime expression or constant."""

    status: int
    operation_id: str
    parameters: dict[str, str]


@dataclass(frozen=True)
class Op:
    method: str
    path: str
    operation_id: str
    summary: str
    answers: dict[int, Answer]
    params: tuple[Param, ...] = ()
    body: dict[str, Schema] | None = None  # media type -> schema
    body_required: bool = False
    public: bool = False  # no key needed
    signed: bool = False  # a signed URL may stand in for the key (server.auth: SIGNED_ROUTES)
    nuxeo: bool = False  # also answered under /nuxeo (the upload API)
    tag: str = "uploads"
    description: str = ""
    links: tuple[Link, ...] = ()


def error(description: str, *codes: str, headers: dict[str, str] | None = None) -> Answer:
    """An error answer in the one JSON shape; ``codes`` are the ``code`` values it can carry."""
    text = description + (f" Codes: {', '.join(codes)}." if codes else "")
    return Answer(text, ref("Error"), headers=headers or {})


RETRY_AFTER = {"Retry-After": "seconds to wait before retrying (every 503 carries it)"}


# --- schemas ------------------------------------------------------------------------------------

# Not starting with '.', no '..' anywhere (server.api.uploads.check_batch_id): each '.' is followed by
# another character or ends the id. No lookahead: schemathesis (Hypothesis) generates from it.
UPLOAD_BATCH_ID: Schema = {"type": "string", "minLength": 1, "maxLength": 128,
                           "pattern": r"^[A-Za-z0-9_-](?:\.?[A-Za-z0-9_-])*\.?$",
                           "description": "1-128 of A-Z a-z 0-9 . _ -, not starting with '.', without '..'"}
JOB_BATCH_ID: Schema = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$",
                        "description": "1-128 of A-Z a-z 0-9 _ -, not starting with - or _ (a folder NGINX serves)"}
FILE_IDX: Schema = {"type": "string", "pattern": "^[0-9]{1,9}$", "description": "a non-negative integer"}
JOB_ID: Schema = {"type": "string", "pattern": "^[0-9a-f]{32}$"}
STRING_NUMBER: Schema = {"type": "string", "pattern": "^[0-9]+$"}
# The legacy execute's params.fileIdx: a fileIdx as a string (spaces or tabs around it passed over)
# or a number; null or absent: the whole batch.
LEGACY_FILE_IDX: Schema = {"anyOf": [{"type": "string", "pattern": "^[ \t]*[0-9]{1,9}[ \t]*$"},
                                     {"type": "integer", "minimum": 0, "maximum": 999_999_999}, {"type": "null"}]}
TIME: Schema = {"type": ["string", "null"], "description": "UTC, milliseconds, Z (null: not yet)"}

# What GET /api/limits answers (server/api/limits.py), all required.
LIMITS = ("chunkSize", "maxChunkSize", "maxFileSize", "maxFilesPerBatch", "maxBatchBytes", "maxDataSize",
          "maxChunksPerFile")
SCHEMAS: dict[str, Schema] = {
    "Error": {
        "type": "object",
        "description": "Every error but 401 (empty body). `status` and `message` are what the nuxeo client reads.",
        "required": ["entity-type", "status", "code", "message"],
        "properties": {
            "entity-type": {"const": "exception"},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "code": {"type": "string", "pattern": "^ERR_[A-Z0-9_]+$"},
            "message": {"type": "string"},
            "field": {"type": "string", "description": "the start field at fault (422)"},
            "job_id": {"type": "string", "description": "the running job (409 ERR_JOB_RUNNING)"},
        },
    },
    "BatchCreated": {"type": "object", "required": ["batchId"], "properties": {"batchId": {"type": "string"}}},
    "Handlers": {
        "type": "object", "required": ["handlers"],
        "properties": {"handlers": {"type": "array", "items": {
            "type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}},
    },
    "Uploaded": {
        "type": "object",
        "description": "Upload answers carry strings, as Nuxeo's do; chunked ones every chunk id stored so far.",
        "required": ["batchId", "fileIdx", "uploadType", "uploadedSize", "uploaded"],
        "properties": {
            "batchId": {"type": "string"}, "fileIdx": STRING_NUMBER,
            "uploadType": {"enum": ["normal", "chunked"]}, "uploadedSize": STRING_NUMBER,
            "uploaded": {"const": "true"},
            "uploadedChunkIds": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "chunkCount": STRING_NUMBER,
            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$",
                       "description": "The file's SHA-256, the file info's own value, when this answer says the "
                                      "file is complete (201; on the legacy form, the 200 of a complete file); "
                                      "absent while it is not (and from servers before it was added: ask the "
                                      "file's info then). Not Nuxeo's: its clients pass it over."},
        },
    },
    "FileInfo": {
        "type": "object",
        "required": ["name", "size", "uploadType", "batchId", "fileIdx", "mimetype", "uploadedSize",
                     "uploadedChunkIds", "chunkCount", "complete"],
        "properties": {
            "name": {"type": "string"}, "size": {"type": "integer", "minimum": 0},
            "uploadType": {"enum": ["normal", "chunked"]}, "batchId": {"type": "string"}, "fileIdx": STRING_NUMBER,
            "mimetype": {"type": "string"}, "uploadedSize": {"type": "integer", "minimum": 0},
            "uploadedChunkIds": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "chunkCount": {"type": "integer", "minimum": 1}, "complete": {"type": "boolean"},
            "state": {"enum": ["receiving", "assembling", "complete"],
                      "description": "assembling: every chunk is there, the file is being put together"},
            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$", "description": "once complete"},
        },
    },
    "LegacyFile": {
        "type": "object", "required": ["name", "size", "fileIdx", "complete"],
        "properties": {"name": {"type": "string"}, "size": {"type": "integer"}, "fileIdx": STRING_NUMBER,
                       "complete": {"type": "boolean"}},
    },
    "Dropped": {"type": "object", "required": ["batchId", "dropped"],
                "properties": {"batchId": {"type": "string"}, "dropped": {"const": "true"}}},
    "ExecuteBody": {
        "type": "object",
        "description": "Nuxeo's execute body; empty is no params.",
        "properties": {"params": {"type": ["object", "null"]}, "context": {"type": ["object", "null"]}},
    },
    "Manifest": {
        "type": "object", "required": ["batchId", "files"],
        "properties": {"batchId": {"type": "string"}, "files": {"type": "array", "items": {
            "type": "object", "required": ["fileIdx", "name", "size"],
            "properties": {"fileIdx": STRING_NUMBER, "name": {"type": "string"}, "size": {"type": "integer"},
                           "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                           "complete": {"const": False, "description": "only on a file not yet complete"}}}}},
    },
    "Job": {
        "type": "object",
        "required": ["batch_id", "job_id", "status", "started", "finished", "succeededCount", "erroredCount",
                     "totalCount", "strategy"],
        "properties": {
            "batch_id": {"type": "string"}, "job_id": JOB_ID,
            "status": {"enum": ["Waiting for data", "Queued", "In progress", "Completed", "Completed with errors",
                                "Cancelled", "Failed", "Expired"]},
            "started": TIME, "finished": TIME,
            "succeededCount": {"type": "integer", "minimum": 0}, "erroredCount": {"type": "integer", "minimum": 0},
            "totalCount": {"type": "integer", "minimum": 0},
            "strategy": {"enum": ["smallest", "mixed", "original"]},
            "reason": {"type": "string", "description": "why it was cancelled or failed"},
        },
    },
    "WaitingJob": {
        "allOf": [ref("Job"), {"type": "object", "required": ["upload_URL", "expires"], "properties": {
            "upload_URL": {"type": "string", "description": "a signed URL: PUT the rows there, no key needed"},
            "expires": {"type": "string", "description": "when it stops working (UTC, Z)"}}}],
    },
    "UploadLink": {
        "type": "object", "required": ["upload_URL", "expires"],
        "properties": {"upload_URL": {"type": "string", "description": "a signed URL: PUT the file there, no key needed"},
                       "expires": {"type": "string", "description": "when it stops working (UTC, Z)"}},
    },
    "DownloadLink": {
        "type": "object", "required": ["download_url", "expires"],
        "properties": {"download_url": {"type": "string", "description": "a signed URL: GET the result CSV, no key "
                                        "needed"},
                       "expires": {"type": "string", "description": "when it stops working (UTC, Z)"}},
    },
    "JobLog": {
        "allOf": [ref("Job"), {"type": "object", "required": ["log"], "properties": {"log": {
            "type": "array", "items": {"type": "object", "required": ["at", "level", "message"],
                                       "properties": {"at": {"type": "string"}, "level": {"type": "string"},
                                                      "message": {"type": "string"}}}}}}],
    },
    "JobResult": {
        "type": "object", "required": ["batch_id", "job_id", "rows"],
        "properties": {"batch_id": {"type": "string"}, "job_id": JOB_ID, "rows": {"type": "array", "items": {
            "type": "object", "required": ["reference_id", "suffix", "url", "status", "error"],
            "properties": {"reference_id": {"type": "string"}, "suffix": {"type": "string"},
                           "url": {"type": ["string", "null"], "description": "the smartlink, once published"},
                           "status": {"enum": ["pending", "succeeded", "errored", "skipped"]},
                           "error": {"type": ["string", "null"]}}}}},
    },
    "BatchJobs": {
        "type": "object", "required": ["batch_id", "jobs"],
        "properties": {"batch_id": {"type": "string"}, "jobs": {"type": "array", "items": ref("Job")}},
    },
    "Limits": {
        "type": "object",
        "required": list(LIMITS),
        "properties": {k: {"type": "integer", "minimum": 0} for k in LIMITS},
    },
    "StartForm": {
        "type": "object",
        "description": "Multipart parts. A template (`document_file`, or `document_id` + `api_url`) and rows "
                       "(`data` or `data_file`: a JSON array or JSON Lines) are required. Any number of "
                       "`param.<name>` JSON parts too (templates see `params.<name>`). A part of any other name, "
                       "a part given twice, `data` with `data_file` or `document_file` with `document_id` is a "
                       "422 naming it.",
        "properties": {
            "document_file": {"type": "string", "contentMediaType": JSON,
                              "description": "the master smartlink: {body, title, lang, styles, scripts}"},
            "document_id": {"type": "string"}, "api_url": {"type": "string", "format": "uri"},
            "data": {"type": "string", "description": "rows: a JSON array or JSON Lines"},
            "data_file": {"type": "string", "contentMediaType": JSON, "description": "rows, as a file part"},
            "strategy": {"enum": ["smallest", "mixed", "original"]},
            "max_errors": {"type": "string", "pattern": "^[0-9]{1,9}$"},
            "callback_url": {"type": "string", "format": "uri"},
            "callback_emails": {"type": "string", "description": "comma-separated addresses"},
            "notification_method": {"enum": ["POST", "GET"], "description": "how callback_url is called "
                                    "(POST: the job JSON; GET: its counts in the query), both signed"},
            "data_upload": {"const": "url", "description": "no rows now: the answer (201) holds upload_URL, a "
                            "signed URL the rows are PUT to, without a key"},
            "expires_in": {"type": "string", "pattern": "^([0-9]{1,12})?$",
                           "description": "with data_upload=url: seconds upload_URL lives (blank: the default)"},
            "batch_id": {"type": "string", "description": "optional (seed 000 lists it): the path's batch_id, or "
                         "blank; another is a 422"},
        },
        "patternProperties": {"^param\\.[A-Za-z_][A-Za-z0-9_]{0,63}$": {
            "type": "string", "contentMediaType": JSON, "description": "a JSON value templates see as params.<name>"}},
        "additionalProperties": False,
    },
    "SmartLinksParams": {
        "type": "object",
        "description": "`params` of `SmartLinks.Generate`: `template` and `data` are fileIdx of this batch.",
        "required": ["template", "data"],
        "properties": {
            "template": {"type": ["string", "integer"]}, "data": {"type": ["string", "integer"]},
            "strategy": {"enum": ["smallest", "mixed", "original"]}, "max_errors": {"type": ["string", "integer"]},
            "callback_url": {"type": "string"}, "callback_emails": {"type": "string"},
            "notification_method": {"enum": ["POST", "GET"]},
            "params": {"type": "object"}, "batch_id": JOB_BATCH_ID,
        },
        "additionalProperties": False,
    },
}


# --- parameters ---------------------------------------------------------------------------------

def path(name: str, schema: Schema, description: str = "") -> Param:
    return Param(name, "path", schema, description, required=True)


def header(name: str, schema: Schema, description: str, required: bool = False) -> Param:
    return Param(name, "header", schema, description, required)


BATCH = path("batch_id", UPLOAD_BATCH_ID, "an upload batch id (from POST /api/v1/upload, or chosen on the legacy form)")
JOB_BATCH = path("batch_id", JOB_BATCH_ID, "the smartlink batch: its links are /<batch_id>/<reference_id>.<suffix>.html")
FILE = path("file_idx", FILE_IDX, "the file's index in its batch")
JOB = path("job_id", JOB_ID)
OPERATION = path("operation", {"type": "string", "minLength": 1}, "a registered operation (see the execute/<name> paths)")

FILE_HEADERS = (
    header("X-File-Name", {"type": "string", "minLength": 1, "maxLength": 765},
           "the file name, percent-encoded UTF-8 (765 characters: 255 bytes, each as %XX); not only whitespace; "
           "no /, \\, control characters, format characters (Cf, but U+200C/U+200D), U+2028/U+2029, "
           "noncharacters, '.' or '..'; at most 255 bytes of UTF-8", required=True),
    header("X-File-Size", {"type": "integer", "minimum": 0},
           "the whole file's size; required when chunked. A whole file without it is its Content-Length, or, "
           "sent without one (Transfer-Encoding: chunked), its length up to 1 MiB (1048576 bytes); over that "
           "it is 400 ERR_FILE_SIZE_MISSING"),
    header("X-File-Type", {"type": "string", "maxLength": 255, "pattern": f"^{MEDIA_TYPE.pattern}$"},
           "its media type (RFC 9110: type/subtype, ASCII tokens, optional ;name=value parameters); another "
           "value is 400 ERR_FILE_TYPE_INVALID. Without it: guessed from the name, then Content-Type"),
    header("X-Upload-Type", {"enum": ["normal", "chunked"]}, "normal (default): the body is the whole file"),
    header("X-Upload-Chunk-Index", {"type": "integer", "minimum": 0}, "chunked: this chunk's index"),
    header("X-Upload-Chunk-Count", {"type": "integer", "minimum": 1},
           "chunked: how many chunks the file has (at most FILEDROP_MAX_CHUNKS_PER_FILE: over, 413 "
           "ERR_FILE_TOO_MANY_CHUNKS)"),
)
SIGNED_PARAMS = (
    Param("expires", "query", {"type": "string", "pattern": "^[0-9]{1,12}$"},
          "of a signed URL: the Unix time it stops working"),
    Param("kid", "query", {"type": "string", "pattern": "^[0-9a-f]{1,16}$"}, "of a signed URL: the key that signed it"),
    Param("signature", "query", {"type": "string"},
          "of a signed URL: hex HMAC-SHA256 of the method, path, query and owner; with it the request needs no key "
          "and is judged by it alone (403 when it does not match or has expired)"),
)
SIGNED_REFUSED = error("A signed URL that was changed, or whose expiry has passed.", "ERR_URL_INVALID",
                       "ERR_URL_EXPIRED")
EXPIRES_IN = Param("expires_in", "query", {"type": "string", "pattern": "^([0-9]{1,12})?$"},
                   "seconds the signed URL lives (at most FILEDROP_MAX_URL_TTL; blank or absent: the default)")

EXECUTE_HEADERS = (
    header("X-Batch-No-Drop", {"enum": ["true", "false"]}, "true: keep the batch after the operation"),
    header("X-NXVoidOperation", {"enum": ["true", "false"]},
           "true: answer 204 with no body (the nuxeo client's batch.execute sends it unless void_op=False)"),
)


# --- answers ------------------------------------------------------------------------------------

BAD_UPLOAD = error("A header or the path is malformed, or the body does not match X-File-Size.",
                   "ERR_BATCH_ID_INVALID", "ERR_FILE_IDX_INVALID", "ERR_FILE_NAME_INVALID", "ERR_FILE_SIZE_MISSING",
                   "ERR_FILE_SIZE_INVALID", "ERR_FILE_TYPE_INVALID", "ERR_UPLOAD_TYPE_INVALID",
                   "ERR_CHUNK_INDEX_INVALID", "ERR_CHUNK_COUNT_INVALID", "ERR_CHUNK_COUNT_CHANGED",
                   "ERR_FILE_SIZE_CHANGED", "ERR_FILE_SIZE_MISMATCH", "ERR_CHUNK_COUNT_MISSING",
                   "ERR_CHUNK_INDEX_MISSING", "ERR_REQUEST_INVALID")
NO_BATCH = error("No such batch for this key (unknown, another key's, dropped or executed), or no such file.",
                 "ERR_BATCH_NOT_FOUND", "ERR_FILE_NOT_FOUND", "ERR_NOT_FOUND")
NO_JOB = error("No such job in this batch for this key.", "ERR_JOB_NOT_FOUND", "ERR_NOT_FOUND")
EXECUTE_ERRORS: dict[int, Answer] = {
    400: error("A malformed execute body or path.", "ERR_REQUEST_MALFORMED", "ERR_BATCH_ID_INVALID",
               "ERR_FILE_IDX_INVALID"),
    404: error("No such batch, file or operation (or a path no route matches once normalised: a batch id "
               "`%2e%2e`).", "ERR_BATCH_NOT_FOUND", "ERR_FILE_NOT_FOUND", "ERR_FILE_INCOMPLETE",
               "ERR_OPERATION_NOT_FOUND", "ERR_NOT_FOUND"),
    409: error("The operation conflicts with a running job.", "ERR_JOB_RUNNING", "ERR_BATCH_TAKEN"),
    413: error("An input of the operation is over its limit, or the body is over FILEDROP_MAX_DATA_SIZE (at "
               "least 1 MiB) + 1 MiB.", "ERR_DATA_TOO_LARGE", "ERR_TOO_LARGE"),
    422: error("A parameter of the operation is invalid (`field` names it).", "ERR_FIELD_INVALID"),
}
VOID = Answer("X-NXVoidOperation: true: done, nothing to say.")
# A job start: its template is checked in a render process, one check per API key at a time.
START_BUSY = error(f"This API key has {CHECKS_WAITING} job starts waiting for their template check already (the "
                   "message names the limit; Retry-After: FILEDROP_RENDER_TIMEOUT, by when the running one has "
                   "answered), or the app is stopping or down, or lost its database connection: retry.",
                   "ERR_SERVER_BUSY", "ERR_SERVER_SHUTTING_DOWN", "ERR_APP_UNAVAILABLE", headers=RETRY_AFTER)


def _batch_links(status: int, batch: str) -> tuple[Link, ...]:
    """From an answer naming an upload batch (``batch``: the expression) to what uses it."""
    p = {"batch_id": batch}
    return (Link(status, "uploadFile", {**p, "file_idx": "0"}), Link(status, "getBatch", p),
            Link(status, "legacyListFiles", p), Link(status, "executeBatchManifest", p),
            Link(status, "dropBatch", p))


def _file_links(status: int) -> tuple[Link, ...]:
    p = {"batch_id": "$response.body#/batchId", "file_idx": "$response.body#/fileIdx"}
    return (Link(status, "getFile", p), Link(status, "executeBatchManifestFile", p), Link(status, "deleteFile", p))


def _job_links(status: int) -> tuple[Link, ...]:
    p = {"batch_id": "$response.body#/batch_id", "job_id": "$response.body#/job_id"}
    return tuple(Link(status, op, p) for op in ("getJobStatus", "getJobLog", "getJobResult", "cancelJobPost"))


def _upload_ops() -> list[Op]:
    created = Answer("The new batch.", ref("BatchCreated"))
    upload_answers = {
        201: Answer("A whole file, or the chunk that completed the file (or a repeat of a chunk of a complete "
                    "file): the file is complete, and `sha256` says its SHA-256.", ref("Uploaded")),
        202: Answer("A chunk stored; others are missing (no `sha256`).", ref("Uploaded")),
        400: BAD_UPLOAD, 404: NO_BATCH,
        409: error("A whole file would replace one of the batch's files while a job started from the batch "
                   "runs (its rows may publish it).", "ERR_JOB_RUNNING"),
        413: error("Over a limit (the setting is named).", "ERR_FILE_TOO_LARGE", "ERR_CHUNK_TOO_LARGE",
                   "ERR_BATCH_TOO_MANY_FILES", "ERR_BATCH_TOO_LARGE", "ERR_FILE_TOO_MANY_CHUNKS", "ERR_TOO_LARGE"),
        500: error("The disk failed (EIO): nothing was recorded; retry.", "ERR_STORAGE_FAILED"),
        503: error("Too many open files or the database is busy: nothing was recorded; retry.", "ERR_SERVER_BUSY",
                   "ERR_SERVER_SHUTTING_DOWN", "ERR_APP_UNAVAILABLE", headers=RETRY_AFTER),
        507: error("Not enough free disk space.", "ERR_DISK_FULL"),
    }
    return [
        Op("POST", "/api/v1/upload", "createBatch", "Create an upload batch", {201: created}, nuxeo=True,
           links=_batch_links(201, "$response.body#/batchId")),
        Op("POST", "/api/v1/upload/", "createBatchSlash", "Create an upload batch (trailing slash)",
           {201: created}, nuxeo=True),
        Op("GET", "/api/v1/upload/handlers", "listHandlers", "The upload handlers (one: default)",
           {200: Answer("The handlers.", ref("Handlers"))}, nuxeo=True),
        Op("POST", "/api/v1/upload/new/{handler}", "createBatchWithHandler", "Create a batch with a named handler",
           {201: created, 404: error("No such handler.", "ERR_HANDLER_NOT_FOUND")},
           (path("handler", {"type": "string", "minLength": 1}, "default"),), nuxeo=True),
        Op("POST", "/api/v1/upload/{batch_id}/{file_idx}", "uploadFile", "Upload a file, or one chunk of it",
           upload_answers, (BATCH, FILE, *FILE_HEADERS),
           body={"application/octet-stream": {"type": "string", "contentMediaType": "application/octet-stream"}},
           nuxeo=True, links=_file_links(201) + _file_links(202)),
        Op("PUT", "/api/v1/upload/{batch_id}/{file_idx}", "uploadFilePut",
           "Upload a file (or a chunk) as POST does, by a presigned URL (no key) or with the key",
           {**upload_answers, 403: SIGNED_REFUSED}, (BATCH, FILE, *FILE_HEADERS, *SIGNED_PARAMS),
           body={"application/octet-stream": {"type": "string", "contentMediaType": "application/octet-stream"}},
           signed=True, description="The URL comes from `presign`; the request is the same as a POST with the key: the same "
                       "headers, limits and checks."),
        Op("POST", "/api/v1/upload/{batch_id}/{file_idx}/presign", "presignUpload",
           "A signed URL that uploads this file of the batch without the key",
           {200: Answer("The URL and when it expires.", ref("UploadLink")), 400: BAD_UPLOAD, 404: NO_BATCH,
            422: error("expires_in is not a number of seconds, or over FILEDROP_MAX_URL_TTL.", "ERR_FIELD_INVALID")},
           (BATCH, FILE, EXPIRES_IN)),
        Op("GET", "/api/v1/upload/{batch_id}", "getBatch", "The files of a batch",
           {200: Answer("Every file with bytes.", {"type": "array", "items": ref("FileInfo")}),
            204: Answer("No file has bytes yet."), 400: BAD_UPLOAD, 404: NO_BATCH}, (BATCH,), nuxeo=True),
        Op("GET", "/api/v1/upload/{batch_id}/{file_idx}", "getFile", "One file (404 until a first chunk is stored)",
           {200: Answer("The file.", ref("FileInfo")), 400: BAD_UPLOAD, 404: NO_BATCH}, (BATCH, FILE), nuxeo=True),
        Op("DELETE", "/api/v1/upload/{batch_id}/{file_idx}", "deleteFile", "Delete a file of a batch",
           {204: Answer("Deleted."), 400: BAD_UPLOAD, 404: NO_BATCH, 409: error("In use.", "ERR_JOB_RUNNING")},
           (BATCH, FILE), nuxeo=True),
        Op("DELETE", "/api/v1/upload/{batch_id}", "dropBatch", "Drop a batch (a tombstone stays: later uploads 404)",
           {204: Answer("Dropped."), 400: BAD_UPLOAD, 404: NO_BATCH, 409: error("In use.", "ERR_JOB_RUNNING")},
           (BATCH,), nuxeo=True),
        Op("POST", "/api/v1/upload/{batch_id}/execute/{operation}", "executeBatch",
           "Run an operation on a batch (it is dropped afterwards unless X-Batch-No-Drop or the operation keeps it)",
           {200: Answer("The operation's answer.", {"anyOf": [ref("Manifest"), ref("Job")]}),
            202: Answer("The operation started a job.", ref("Job")), 204: VOID, **EXECUTE_ERRORS, 503: START_BUSY},
           (BATCH, OPERATION, *EXECUTE_HEADERS), body={JSON: ref("ExecuteBody")}, nuxeo=True),
        Op("POST", "/api/v1/upload/{batch_id}/{file_idx}/execute/{operation}", "executeFile",
           "Run an operation on one file of a batch",
           {200: Answer("The operation's answer.", {"anyOf": [ref("Manifest"), ref("Job")]}),
            202: Answer("The operation started a job.", ref("Job")), 204: VOID, **EXECUTE_ERRORS, 503: START_BUSY},
           (BATCH, FILE, OPERATION, *EXECUTE_HEADERS), body={JSON: ref("ExecuteBody")}, nuxeo=True),
        # The legacy automation form (Nuxeo's /site/automation/batch).
        Op("POST", "/site/automation/batch/upload", "legacyUpload",
           "Upload a file or chunk (legacy form; the first upload creates the batch)",
           {200: Answer("Stored (chunk answers list the chunk ids so far); `sha256` once the file is complete.",
                        ref("Uploaded")),
            400: BAD_UPLOAD, 404: NO_BATCH, 409: upload_answers[409], 413: upload_answers[413], 500: upload_answers[500],
            503: upload_answers[503], 507: upload_answers[507]},
           (header("X-Batch-Id", UPLOAD_BATCH_ID, "the batch (chosen by the client)", required=True),
            header("X-File-Idx", {"type": "integer", "minimum": 0, "maximum": 999_999_999}, "the file's index",
                   required=True), *FILE_HEADERS),
           body={"application/octet-stream": {"type": "string", "contentMediaType": "application/octet-stream"}},
           nuxeo=True, links=_file_links(200) + _batch_links(200, "$response.body#/batchId")[1:]),
        Op("GET", "/site/automation/batch/files/{batch_id}", "legacyListFiles", "The files of a batch (legacy form)",
           {200: Answer("The files.", {"type": "array", "items": ref("LegacyFile")}), 400: BAD_UPLOAD,
            404: NO_BATCH}, (BATCH,), nuxeo=True),
        *(Op(m, "/site/automation/batch/drop/{batch_id}", f"legacyDrop{m.title()}", "Drop a batch (legacy form)",
             {200: Answer("Dropped.", ref("Dropped")), 400: BAD_UPLOAD, 404: NO_BATCH,
              409: error("In use.", "ERR_JOB_RUNNING")}, (BATCH,), nuxeo=True)
          for m in ("GET", "POST", "DELETE")),
        Op("POST", "/site/automation/batch/execute", "legacyExecute",
           "Run an operation: params.operationId, params.batchId, params.fileIdx (legacy form)",
           {200: Answer("The operation's answer.", {"anyOf": [ref("Manifest"), ref("Job")]}),
            202: Answer("The operation started a job.", ref("Job")), 204: VOID, **EXECUTE_ERRORS, 503: START_BUSY},
           EXECUTE_HEADERS, body={JSON: {"type": "object", "required": ["params"], "properties": {
               "params": {"type": "object", "required": ["operationId", "batchId"], "properties": {
                   "operationId": {"type": "string", "minLength": 1}, "batchId": UPLOAD_BATCH_ID,
                   "fileIdx": LEGACY_FILE_IDX}},
               "context": {"type": ["object", "null"]}}}}, body_required=True, nuxeo=True),
    ]


# Registered operations, each documented under its literal name beside the generic route.
EXECUTE_OPERATIONS: dict[str, tuple[str, dict[int, Answer], Schema]] = {
    "Batch.Manifest": ("Name, size and SHA-256 of every file of the batch (or of one file)",
                       {200: Answer("The manifest.", ref("Manifest"))}, ref("ExecuteBody")),
    "SmartLinks.Generate": (
        "Start a smartlink job from a template and data uploaded to this batch (the batch is kept: rows may "
        "publish its files as \"pdf\": \"batch:<fileIdx>\")",
        {202: Answer("The new job.", ref("Job")),
         200: Answer("The same inputs as the batch's running job: that job.", ref("Job")), 503: START_BUSY},
        {"type": "object", "required": ["params"], "properties": {"params": ref("SmartLinksParams"),
                                                                  "context": {"type": ["object", "null"]}}}),
}


def _execute_ops() -> list[Op]:
    ops = []
    for name, (summary, answers, body) in EXECUTE_OPERATIONS.items():
        short = name.replace(".", "")
        for with_file in (False, True):
            route = "/api/v1/upload/{batch_id}" + ("/{file_idx}" if with_file else "") + f"/execute/{name}"
            params = (BATCH, FILE) if with_file else (BATCH,)
            ops.append(Op("POST", route, f"execute{short}{'File' if with_file else ''}", summary,
                          {**answers, 204: VOID, **EXECUTE_ERRORS}, (*params, *EXECUTE_HEADERS),
                          body={JSON: body}, body_required=name == "SmartLinks.Generate", nuxeo=True,
                          links=_job_links(202) if name == "SmartLinks.Generate" else ()))
    return ops


def _job_ops(settings: Settings) -> list[Op]:
    job = Answer("The job.", ref("Job"))
    result_errors = {
        403: SIGNED_REFUSED, 404: NO_JOB, 409: error("format=url: the job has not ended yet.", "ERR_JOB_NOT_FINISHED"),
        422: error("format is not json, csv or url; expires_in is not a number of seconds, over "
                   "FILEDROP_MAX_URL_TTL, or given without format=url.", "ERR_FIELD_INVALID")}
    result_params = (JOB_BATCH, JOB, Param("format", "query", {"type": "string"},
                                           "json (default), csv, or url: a signed link to the CSV, fetched without "
                                           "the key"),
                     Param("expires_in", "query", {"type": "string", "pattern": "^([0-9]{1,12})?$"},
                           "format=url: seconds the link lives (at most FILEDROP_MAX_URL_TTL; blank or absent: "
                           "FILEDROP_DOWNLOAD_URL_TTL)"), *SIGNED_PARAMS)
    return [
        Op("POST", "/api/batch/{batch_id}/start", "startJob",
           "Start a smartlink job: one HTML page per data row, published under /<batch_id>/",
           {202: Answer("The new job.", ref("Job")),
            200: Answer("Identical inputs to the batch's running job: that job (one Waiting for data with its "
                        "upload_URL and expires again).", {"anyOf": [ref("WaitingJob"), ref("Job")]}),
            400: error("A malformed request.", "ERR_REQUEST_INVALID"),
            201: Answer("data_upload=url: the new job, Waiting for data, with its upload_URL.", ref("WaitingJob")),
            409: error("The batch has a running job with other inputs, or belongs to another key.",
                       "ERR_JOB_RUNNING", "ERR_BATCH_TAKEN"),
            413: error(f"Rows over {settings.max_data_size} bytes (FILEDROP_MAX_DATA_SIZE), a template over "
                       f"{settings.fetch_max_bytes} (FILEDROP_FETCH_MAX_BYTES), or a request over "
                       f"{job_body_limit(settings)} bytes.", "ERR_DATA_TOO_LARGE", "ERR_TEMPLATE_TOO_LARGE",
                       "ERR_FIELD_TOO_LARGE", "ERR_TOO_LARGE"),
            422: error("A field is invalid; `field` names it.", "ERR_FIELD_INVALID"), 503: START_BUSY},
           (JOB_BATCH,), body={"multipart/form-data": ref("StartForm")}, body_required=True, tag="jobs",
           links=_job_links(202) + _job_links(200) + _job_links(201)
           + (Link(201, "putJobData", {"batch_id": "$response.body#/batch_id", "job_id": "$response.body#/job_id"}),)),
        Op("PUT", "/api/batch/{batch_id}/{job_id}/data", "putJobData",
           "The rows of a job waiting for its data (its upload_URL: no key needed); the job is then Queued",
           {201: Answer("The job, now Queued (or Cancelled when bad rows alone exceed max_errors).", ref("Job")),
            403: SIGNED_REFUSED, 404: NO_JOB,
            409: error("The data arrived already (one PUT per URL), or the job waits for none.",
                       "ERR_DATA_RECEIVED", "ERR_JOB_NOT_WAITING"),
            413: error(f"Rows over {settings.max_data_size} bytes (FILEDROP_MAX_DATA_SIZE).", "ERR_DATA_TOO_LARGE"),
            422: error("The rows are not a JSON array of rows nor JSON Lines (`field`: data).", "ERR_FIELD_INVALID")},
           (JOB_BATCH, JOB, *SIGNED_PARAMS), tag="jobs",
           body={JSON: {"type": "array", "items": {"type": "object"}, "description": "rows, a JSON array"},
                 "application/x-ndjson": {"type": "string", "description": "rows, JSON Lines"}},
           body_required=True, signed=True, links=_job_links(201)),
        Op("GET", "/api/batch/{batch_id}/{job_id}/status", "getJobStatus", "A job's status and counts",
           {200: job, 404: NO_JOB}, (JOB_BATCH, JOB), tag="jobs"),
        Op("GET", "/api/batch/{batch_id}/{job_id}/log", "getJobLog", "A job's log",
           {200: Answer("The job and its log (format=text: one line per entry, text/plain).", ref("JobLog")),
            404: NO_JOB, 422: error("format is not json or text (`field`: format).", "ERR_FIELD_INVALID")},
           (JOB_BATCH, JOB, Param("format", "query", {"enum": ["json", "text"]},
                                  "json (default) or text; another value: 422")),
           tag="jobs", description="With `format=text` the answer is text/plain."),
        *(Op(m, "/api/batch/{batch_id}/{job_id}/cancel", f"cancelJob{m.title()}",
             "Cancel a job (rows written stay; the rest become skipped)", {200: job, 404: NO_JOB},
             (JOB_BATCH, JOB), tag="jobs") for m in ("GET", "POST")),
        Op("GET", "/api/batch/{batch_id}/{job_id}/result", "getJobResult", "Every row's outcome and link",
           {200: Answer("The rows (format=csv: text/csv; format=url: a signed download link).",
                        {"anyOf": [ref("JobResult"), ref("DownloadLink")]}), **result_errors},
           result_params, tag="jobs", signed=True),
        # HEAD is GET without the body (a signed download link is judged as the GET it was made for).
        Op("HEAD", "/api/batch/{batch_id}/{job_id}/result", "getJobResultHead",
           "Every row's outcome and link: the headers only",
           {200: Answer("The same answer as GET, without a body."), **result_errors},
           result_params, tag="jobs", signed=True),
        Op("GET", "/api/batch/{batch_id}/jobs", "listBatchJobs", "The caller's jobs of a batch, newest first",
           {200: Answer("The jobs (none: an empty list).", ref("BatchJobs")),
            404: error("A batch id no job batch can have (see batch_id's pattern).", "ERR_BATCH_NOT_FOUND",
                       "ERR_NOT_FOUND")}, (JOB_BATCH,), tag="jobs"),
        Op("GET", "/api/limits", "getLimits", "The limits a client must respect (from the settings)",
           {200: Answer("The limits, in bytes and files.", ref("Limits"))}, tag="service"),
    ]


def _service_ops() -> list[Op]:
    head = Answer("The same answer as GET, without a body.")
    return [
        Op("GET", "/healthz", "health", "Liveness", {200: Answer("Up.", {"type": "object", "required": ["status"],
           "properties": {"status": {"const": "ok"}}})}, public=True, tag="service"),
        Op("HEAD", "/healthz", "healthHead", "Liveness", {200: head}, public=True, tag="service"),
        Op("GET", "/runningstatus", "runningStatus", "Nuxeo's reachability probe",
           {200: Answer("Ok.", {"const": "Ok"}, media="text/plain")}, public=True, nuxeo=True, tag="service"),
        Op("HEAD", "/runningstatus", "runningStatusHead", "Nuxeo's reachability probe", {200: head}, public=True,
           nuxeo=True, tag="service"),
        Op("GET", "/json/cmis", "cmisInfo", "Nuxeo's version probe (the nuxeo client reads productVersion)",
           {200: Answer("The product and version.", {"type": "object", "required": ["default"], "properties": {
               "default": {"type": "object", "required": ["productName", "productVersion"], "properties": {
                   "productName": {"type": "string"}, "productVersion": {"type": "string"}}}}})},
           public=True, nuxeo=True, tag="service"),
        Op("HEAD", "/json/cmis", "cmisInfoHead", "Nuxeo's version probe", {200: head}, public=True, nuxeo=True,
           tag="service"),
        Op("GET", "/api/openapi.json", "openapi", "This document",
           {200: Answer("OpenAPI 3.1.", {"type": "object", "required": ["openapi", "paths"]})}, public=True,
           tag="service"),
    ]


def operations(settings: Settings) -> list[Op]:
    return [*_upload_ops(), *_execute_ops(), *_job_ops(settings), *_service_ops()]


# Answers any operation can get, whatever it does: NGINX's own (JSON, the same shape) and the app's
# while it stops. Added to every operation unless it documents its own for that status.
def _common(settings: Settings, public: bool) -> dict[int, Answer]:
    out = {
        400: error("A malformed request (refused by NGINX or the app before the operation).", "ERR_REQUEST_INVALID"),
        404: error("Not found (a path NGINX does not route to the app).", "ERR_NOT_FOUND"),
        413: error(f"The body is over NGINX's limit: {settings.max_chunk_size} bytes for the upload API "
                   f"(FILEDROP_MAX_CHUNK_SIZE), {job_body_limit(settings)} for other /api/ paths.", "ERR_TOO_LARGE"),
        414: error("The request URI is too long.", "ERR_URI_TOO_LONG"),
        431: error("The request headers are too large.", "ERR_HEADERS_TOO_LARGE"),
        503: error("The app is stopping, or down (then NGINX answers), or its connection to the database was "
                   "lost: retry after Retry-After.", "ERR_SERVER_SHUTTING_DOWN", "ERR_APP_UNAVAILABLE",
                   "ERR_SERVER_BUSY", headers=RETRY_AFTER),
        504: error("The app did not answer in time (NGINX).", "ERR_APP_TIMEOUT"),
    }
    if not public:
        out[401] = Answer("No valid key: an empty body; `WWW-Authenticate` only to a program, never to a browser "
                          "(a `Sec-Fetch-*` header, or a `User-Agent` starting with `Mozilla/`).", None, headers={
            "WWW-Authenticate": 'Basic realm="filedrop"'})
    return out


# A method a path does not answer. Not listed under the operations: an operation is a method the
# path does answer, so none of them gets it; described once, in components and in info.
METHOD_NOT_ALLOWED = error("A method this path does not answer (PATCH /api/limits): the app, or NGINX on the paths "
                           "it serves itself, answers 405 with Allow listing the methods that path answers (the "
                           "operations under it).", "ERR_METHOD_NOT_ALLOWED",
                           headers={"Allow": "the methods this path answers"})


def _response(a: Answer) -> dict[str, Any]:
    r: dict[str, Any] = {"description": a.description}
    if a.schema is not None:
        r["content"] = {a.media: {"schema": a.schema}}
    if a.headers:
        r["headers"] = {h: {"description": d, "schema": {"type": "string"}} for h, d in a.headers.items()}
    return r


def _responses(op: Op, settings: Settings) -> dict[str, Any]:
    common = _common(settings, op.public)
    answers = {**common, **op.answers}
    out: dict[str, Any] = {}
    for status in sorted(answers):
        a = answers[status]
        if status not in op.answers:  # described once, in components
            out[str(status)] = {"$ref": f"#/components/responses/Common{status}"}
            continue
        r: dict[str, Any] = {"description": a.description}
        if a.schema is not None:
            r["content"] = {a.media: {"schema": a.schema}}
            if op.operation_id == "getJobLog" and status == 200:
                r["content"]["text/plain"] = {"schema": {"type": "string"}}
            if op.operation_id == "getJobResult" and status == 200:
                r["content"]["text/csv"] = {"schema": {"type": "string"}}
        if a.headers:
            r["headers"] = {h: {"description": d, "schema": {"type": "string"}} for h, d in a.headers.items()}
        out[str(status)] = r
    return out


def _operation(op: Op, settings: Settings, suffix: str, nuxeo_ids: set[str]) -> dict[str, Any]:
    doc: dict[str, Any] = {"operationId": op.operation_id + suffix, "summary": op.summary, "tags": [op.tag],
                           "responses": _responses(op, settings)}
    if op.description:
        doc["description"] = op.description
    if op.params:
        doc["parameters"] = [{"name": p.name, "in": p.where, "required": p.required, "schema": p.schema,
                              **({"description": p.description} if p.description else {})} for p in op.params]
    if op.body:
        doc["requestBody"] = {"required": op.body_required,
                              "content": {media: {"schema": s} for media, s in op.body.items()}}
    if op.public:
        doc["security"] = []
    elif op.signed:  # the key, or instead of it a signed URL (OpenAPI: any one of the list)
        doc["security"] = [*KEY_SECURITY, {"signedUrl": []}]
    for link in op.links:
        target = link.operation_id + (suffix if link.operation_id in nuxeo_ids else "")
        doc["responses"][str(link.status)].setdefault("links", {})[link.operation_id] = {
            "operationId": target, "parameters": link.parameters}
    return doc


KEY_SECURITY: list[dict[str, list[str]]] = [{"apiKey": []}, {"nuxeoToken": []}, {"basic": []}, {"bearer": []}]


def build(settings: Settings) -> dict[str, Any]:
    """The OpenAPI 3.1 document for a server running with ``settings``."""
    paths: dict[str, dict[str, Any]] = {}
    ops = operations(settings)
    nuxeo_ids = {op.operation_id for op in ops if op.nuxeo}
    for op in ops:
        for prefix in ("", "/nuxeo") if op.nuxeo else ("",):
            paths.setdefault(prefix + op.path, {})[op.method.lower()] = _operation(
                op, settings, "Nuxeo" if prefix else "", nuxeo_ids)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "filedrop",
            "version": "0.1.0",
            "description": (
                "Nuxeo-compatible batch uploads (REST /api/v1/upload and the legacy /site/automation form, "
                "both also under /nuxeo) and smartlink jobs: one HTML page per data row, served by NGINX "
                "from disk at /<batch_id>/<reference_id>.<suffix>.html. Every error is "
                "{\"entity-type\": \"exception\", \"status\", \"code\", \"message\"} except 401 (empty body). "
                f"Limits of this server: one upload body {settings.max_chunk_size} bytes "
                f"(FILEDROP_MAX_CHUNK_SIZE), one file {settings.max_file_size} (FILEDROP_MAX_FILE_SIZE), "
                f"{settings.max_files_per_batch} files and {settings.max_batch_bytes} bytes per batch "
                f"(FILEDROP_MAX_FILES_PER_BATCH, FILEDROP_MAX_BATCH_BYTES), job rows {settings.max_data_size} "
                "bytes (FILEDROP_MAX_DATA_SIZE). A method a path does not answer is 405 "
                "ERR_METHOD_NOT_ALLOWED with Allow (components/responses/MethodNotAllowed). Every 503 carries "
                "Retry-After."),
        },
        "servers": [{"url": settings.public_url.rstrip("/")}],
        "tags": [{"name": "uploads", "description": "Nuxeo batch upload API"},
                 {"name": "jobs", "description": "smartlink jobs"},
                 {"name": "service", "description": "probes and this document"}],
        "security": KEY_SECURITY,
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "responses": {**{f"Common{status}": _response(a) for status, a in _common(settings, False).items()},
                          "MethodNotAllowed": _response(METHOD_NOT_ALLOWED)},
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "nuxeoToken": {"type": "apiKey", "in": "header", "name": "X-Authentication-Token"},
                "basic": {"type": "http", "scheme": "basic", "description": "the key as the password, any user"},
                "bearer": {"type": "http", "scheme": "bearer"},
                "signedUrl": {"type": "apiKey", "in": "query", "name": "signature", "description": (
                    "A signed URL in place of the key, on the operations that list it: the URL as the server "
                    "made it (upload_URL, download_url), its `expires`, `kid` and `signature` (the operation's "
                    "query parameters) each once, sent with the method it was made for. It "
                    "allows that request alone until `expires`: 403 ERR_URL_INVALID for anything changed, "
                    "ERR_URL_EXPIRED after.")},
            },
        },
    }
