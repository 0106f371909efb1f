"""create_app(settings): wiring only — middlewares, cleanup contexts, routes."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from server.api import jobs as jobs_api
from server.api import limits as limits_api
from server.api import signed as signed_api
from server.api import uploads as uploads_api
from server.auth import KeyStore, auth_middleware
from server.config import Settings
from server.db import Database
from server.db.revision import check_at_head
from server.errors import ServiceUnavailable, error_middleware
from server.janitor import janitor_context
from server.jobs import queries as job_queries
from server.jobs.checker import TemplateChecker
from server.jobs.fetch import Fetcher
from server.jobs.notify import Notifier
from server.jobs.operation import reading_job, reading_job_in, smartlinks_generate
from server.jobs.pool import WorkerPool
from server.jobs.service import JobService
from server.jobs.waiting import expire_loop
from server.keys import (
    API_DOCUMENT,
    DATABASE,
    JOBS,
    KEYSTORE,
    OPERATIONS,
    SETTINGS,
    SIGNED_ROUTES,
    SIGNER,
    STOPPING,
    UPLOADS,
)
from server.openapi import build as build_api_document
from server.signing import Signer, SigningKeys
from server.uploads.operations import OperationRegistry

log = logging.getLogger("filedrop.app")

# Prefixes under which the upload API answers: bare, and as a stock Nuxeo host (`http://H/nuxeo/`).
NUXEO_PREFIXES = ("", "/nuxeo")


async def database_context(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    # Refuse to start on an unmigrated database: the message says to run `filedrop migrate`.
    await asyncio.to_thread(check_at_head, settings.database)
    db = Database(settings.database, settings.database_pool)
    app[DATABASE] = db
    app[KEYSTORE] = KeyStore(db, settings.api_keys)
    # Signed URLs: keys in the database (made on first use), cached by this process.
    app[SIGNER] = Signer(SigningKeys(db), settings.public_url)
    yield
    await db.dispose()


async def jobs_context(app: web.Application) -> AsyncIterator[None]:
    """The job service; its workers (``filedrop worker`` processes, started with the first
    job), the template checker's render process and the notification loop. Jobs reach upload
    files through the upload service handed to them here."""
    settings, db = app[SETTINGS], app[DATABASE]
    fetcher = Fetcher(settings.fetch_allow, settings.fetch_timeout, settings.fetch_max_bytes)
    checker = TemplateChecker(settings)
    pool = WorkerPool(db, settings)
    app[JOBS] = JobService(db, settings, fetcher, checker, pool)
    app[OPERATIONS].register("SmartLinks.Generate", smartlinks_generate(app[JOBS], app[UPLOADS], settings))
    app[UPLOADS].readers = functools.partial(reading_job, db)  # its files are not deleted under a job
    app[UPLOADS].recorder.ledger.readers = reading_job_in  # nor replaced by a whole-file upload
    if await job_queries.running_jobs(db):
        pool.ensure_started()
    notifier = Notifier(db, settings, fetcher, app[SIGNER])  # sends only while it holds the notifier lock
    notifying = asyncio.create_task(notifier.run(), name="job-notifications")
    # Jobs that waited for data past their upload URL's expiry end Expired (then are notified).
    expiring = asyncio.create_task(expire_loop(db, notifier.wake), name="job-data-expiry")
    try:
        yield
    finally:
        for task in (expiring, notifying):
            task.cancel()
        await asyncio.gather(expiring, notifying, return_exceptions=True)
        await pool.stop()
        await checker.close()
        await fetcher.close()


async def _mark_stopping(app: web.Application) -> None:
    app[STOPPING]["value"] = True
    if JOBS in app:
        # Workers start stopping now, while requests drain, and a template check under way ends
        # (503): SIGTERM ends the server and its workers within 10 s whatever templates do.
        app[JOBS].pool.signal_stop()
        app[JOBS].checker.stop_now()


@web.middleware
async def stopping_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if request.app[STOPPING]["value"]:
        raise ServiceUnavailable("the server is shutting down, retry shortly")
    return await handler(request)


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def running_status(_request: web.Request) -> web.Response:
    return web.Response(text="Ok")


async def cmis_info(_request: web.Request) -> web.Response:
    # The nuxeo client reads ["default"]["productVersion"] for server_version.
    return web.json_response({"default": {"productName": "filedrop", "productVersion": "filedrop-0.1.0"}})


async def api_document(request: web.Request) -> web.Response:
    return web.json_response(request.app[API_DOCUMENT])


def setup_routes(app: web.Application) -> None:
    """Every route; each is described in server/openapi.py (a test compares the two)."""
    app.router.add_get("/healthz", healthz)
    app.router.add_route("GET", "/api/openapi.json", api_document)
    for prefix in NUXEO_PREFIXES:
        app.router.add_get(prefix + "/runningstatus", running_status)
        app.router.add_get(prefix + "/json/cmis", cmis_info)
        for route in uploads_api.ROUTES:
            app.router.add_route(route.method, prefix + route.path, route.handler, **route.kwargs)
    for route in (*jobs_api.ROUTES, *limits_api.ROUTES, *signed_api.ROUTES):
        app.router.add_route(route.method, route.path, route.handler, **route.kwargs)
    app[SIGNED_ROUTES] = signed_api.SIGNED_ROUTES  # where a signed URL may stand in for a key


def create_app(settings: Settings) -> web.Application:
    # client_max_size guards only read()/json(); streamed upload bodies are limited by the
    # upload service itself (max_chunk_size). Over it: errors.BodyTooLarge, which names this sum.
    app = web.Application(
        middlewares=[error_middleware, stopping_middleware, auth_middleware],
        client_max_size=max(settings.max_data_size, 1 << 20) + (1 << 20),
    )
    app[SETTINGS] = settings
    app[STOPPING] = {"value": False}
    app[OPERATIONS] = OperationRegistry()
    app[API_DOCUMENT] = build_api_document(settings)
    app.on_shutdown.append(_mark_stopping)
    # Dependency order; aiohttp exits them in reverse, only those that started.
    app.cleanup_ctx.append(database_context)
    app.cleanup_ctx.append(uploads_api.uploads_context)
    app.cleanup_ctx.append(jobs_context)
    app.cleanup_ctx.append(janitor_context)
    setup_routes(app)
    return app
