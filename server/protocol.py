"""Running the app: what aiohttp answers before any middleware, in the app's JSON error shape.

aiohttp refuses some requests in its protocol layer, before routing and middlewares: a control
character in a header value (``X-A: a\\x01b``, which NGINX passes on), broken chunk framing, an
over-long request line. Its ``RequestHandler.handle_error`` then answers a plain-text 400 and
logs an ERROR traceback, and it does the same (a 500 nobody receives, an ERROR traceback) for a
client that disconnects mid-body. Neither is a fault of the server. aiohttp 3.x has no
application hook for this (aio-libs/aiohttp#3287): the connection handler class is the only
place, so :class:`Runner` serves the app with :class:`ProtocolHandler` connections:

* a protocol error (``HttpProcessingError``) -> 400 ``ERR_REQUEST_INVALID`` JSON, one INFO line;
* a client that went away -> one INFO line (nothing can be answered);
* anything else -> aiohttp's own handling (an ERROR traceback: our fault), with a JSON 500 body.

The same class sets how much a connection reads from its socket at a time (:data:`RECV_SIZE`);
:func:`tune_allocator` sets the serving process's allocator up for pieces of that size.

:func:`serve` is ``web.run_app`` with that runner: the same start-up, signal handling (SIGINT and
SIGTERM stop it gracefully) and shutdown order. It reports a port it cannot bind as
:class:`BindError`, and calls ``on_listening`` only once every socket is bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from server.durable import keep_heap
from server.errors import (
    BadRequest,
    FiledropError,
    RequestIncomplete,
    answer,
    client_gone,
    error_response,
    first_line,
)

log = logging.getLogger("filedrop.protocol")

# Bytes a connection asks of its socket per read (asyncio's selector transport: 256 KiB). A large
# upload's body then arrives in 1 MiB pieces, not 256 KiB: a quarter of the per-piece work on the
# event loop (aiohttp's parser, the body's reader, our write and hash hand-off). Measured on 1 GiB
# in 8 MiB chunks, alternated: 685 -> 708-733 MB/s (medians); 4 MiB: 529. Keep it under the
# allocator's mmap threshold (HEAP_MMAP_THRESHOLD), or every read maps and unmaps fresh pages.
RECV_SIZE = 1 << 20

# The serving process's allocator (glibc; see server.durable.keep_heap): body pieces and the
# blocks a file keeps for its hash come from the heap, which keeps what is freed, in one arena.
HEAP_MMAP_THRESHOLD = 2 << 20
HEAP_TRIM_THRESHOLD = 32 << 20
HEAP_ARENAS = 1


def tune_allocator() -> bool:
    """Set the allocator up for serving (first thing in the process: before any thread starts)."""
    return keep_heap(HEAP_MMAP_THRESHOLD, HEAP_TRIM_THRESHOLD, HEAP_ARENAS)


class ProtocolHandler(web.RequestHandler):
    """aiohttp's connection handler, with protocol-level errors answered in the JSON shape."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if hasattr(transport, "max_size"):  # asyncio's selector transport (not uvloop's)
            transport.max_size = RECV_SIZE  # type: ignore[attr-defined]

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if isinstance(exc, HttpProcessingError) and status < 500:
            log.info("refused a malformed request from %s: %s", request.remote, first_line(exc))
            resp = answer(BadRequest(f"malformed request: {first_line(exc)}"))
        elif isinstance(exc, ConnectionError) and client_gone(request):
            log.info("client %s went away during %s %s", request.remote, request.method, request.path)
            resp = answer(RequestIncomplete("the request ended before its body did"))
        else:
            super().handle_error(request, status, exc, message)  # logs the traceback
            err = FiledropError("internal server error") if status >= 500 else BadRequest(message or "bad request")
            resp = error_response(status, err.code, err.message)
        resp.force_close()
        return resp


class _Server(web.Server):
    def __call__(self) -> web.RequestHandler:
        return ProtocolHandler(self, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
    """``web.AppRunner`` whose connections are :class:`ProtocolHandler`."""

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()  # the app started and frozen, as aiohttp does it
        server = _Server(made.request_handler, request_factory=made.request_factory,
                         handler_cancellation=made.handler_cancellation, loop=asyncio.get_running_loop(),
                         **made._kwargs)
        return server


class BindError(OSError):
    """The app could not listen on ``host:port``."""

    def __init__(self, host: str, port: int, cause: OSError) -> None:
        # A host name that does not resolve is a gaierror, whose (negative) errno os.strerror
        # does not know ("unknown error -2"): its own text says it.
        reason = (os.strerror(cause.errno).lower() if cause.errno and cause.errno > 0
                  else getattr(cause, "strerror", None) or str(cause))
        super().__init__(cause.errno, f"cannot listen on {host}:{port}: {reason}")
        self.host, self.port, self.cause = host, port, cause


async def _serve(app: web.Application, host: str, port: int, shutdown_timeout: float,
                 on_listening: Callable[[], None] | None) -> None:
    runner = Runner(app, handle_signals=True, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as e:
            raise BindError(host, port, e) from e
        if on_listening is not None:
            on_listening()
        while True:  # until SIGINT/SIGTERM (GracefulExit) or cancellation
            await asyncio.sleep(3600)
    finally:
        await runner.cleanup()


def serve(app: web.Application, host: str, port: int, *, shutdown_timeout: float = 10.0,
          on_listening: Callable[[], None] | None = None) -> None:
    """Run ``app`` on ``host:port`` until SIGINT/SIGTERM; shut it down gracefully (as
    ``web.run_app``: the main task's cleanup first, then whatever tasks are left)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    main = loop.create_task(_serve(app, host, port, shutdown_timeout, on_listening))
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main.done():
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            rest = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in rest:
                t.cancel()
            if rest:
                loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            asyncio.set_event_loop(None)
            loop.close()
