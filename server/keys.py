"""Every typed key of the application state (``web.AppKey``) and request (``web.RequestKey``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from server.config import Settings
from server.db import Database

if TYPE_CHECKING:
    from server.auth import KeyStore
    from server.jobs.service import JobService
    from server.signing import Signer
    from server.uploads.operations import OperationRegistry
    from server.uploads.service import UploadService

SETTINGS = web.AppKey("settings", Settings)
DATABASE = web.AppKey("database", Database)
KEYSTORE: web.AppKey[KeyStore] = web.AppKey("keystore")
OPERATIONS: web.AppKey[OperationRegistry] = web.AppKey("operations")
STOPPING = web.AppKey("stopping", dict)  # {"value": bool}: set when shutdown begins
UPLOADS: web.AppKey[UploadService] = web.AppKey("uploads")  # server.uploads service (issue 2)
JOBS: web.AppKey[JobService] = web.AppKey("jobs")  # server.jobs service (issues 3, 8)
JANITOR: web.AppKey[Any] = web.AppKey("janitor")  # server.janitor periodic task (issue 5)
API_DOCUMENT: web.AppKey[dict[str, Any]] = web.AppKey("api_document")  # the OpenAPI document (server.openapi)
SIGNER: web.AppKey[Signer] = web.AppKey("signer")  # signed URLs (issue 11)
# (method, route) -> the owner a signed URL of that route acts for, found from its path's
# resource (None: no such resource). Only these routes take a signature in place of a key.
OwnerLookup = Callable[[web.Application, Mapping[str, str]], Awaitable[str | None]]
SIGNED_ROUTES: web.AppKey[dict[tuple[str, str], OwnerLookup]] = web.AppKey("signed_routes")

OWNER = web.RequestKey("owner", str)  # sha256 of the caller's API key: what batches/jobs belong to
SIGNED = web.RequestKey("signed", bool)  # set (True) when a signed URL, not a key, authorised the request
