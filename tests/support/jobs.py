"""Helpers for smartlink job tests: start/wait through the real API, and real peers on
127.0.0.1 (an asset server, a slow one that sees a fetch abandoned, a callback receiver that can fail, an
aiosmtpd SMTP server)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import requests
from aiohttp import web
from aiosmtpd.controller import Controller

from server.keys import JOBS
from tests.support.waiting import free_port

AUTH = {"X-API-Key": "test-key-0123456789"}

SEED_TEMPLATE: dict[str, Any] = {
    "name": "Invoice smartlink",
    "title": "Invoice {{ data.num_client }}",
    "lang": "fr",
    "body": "<h1>Client {{ data.num_client }}</h1><p>Montant : {{ data.montant }} €</p>",
}

# The seed's own two rows, verbatim.
SEED_ROWS: list[dict[str, Any]] = [
    {"pdf": "", "reference_id": "5ef3501829bf41003d6da7b4", "suffix": "5f1ea1e9b982f900468aeb5b",
     "data": {"num_client": "240 000 009 425", "montant": "500", "date": "2020-10-11"}},
    {"pdf": "", "reference_id": "5ef3501829bf41003d612345", "suffix": "5f1ea1e9b982f900468aeb77",
     "data": {"num_client": "240 000 009 738", "montant": "414,97", "date": "2021-01-12"}},
]


# URLs whose host or port the fetch guard once could not parse (urlsplit, the port, the idna codec
# inside getaddrinfo), with what its refusal says: each ends in "/", a test adds its path.
MALFORMED_URLS = {
    "port out of range": ("https://cdn.example.com:99999/", "Port out of range 0-65535"),
    "port not a number": ("https://cdn.example.com:port/", "Port could not be cast to integer"),
    "unbalanced bracket": ("http://[::1/", "Invalid IPv6 URL"),
    "empty label": ("https://cdn..example.com/", "label empty or too long"),
    "label over 63": (f"https://{'a' * 64}.example.com/", "label empty or too long"),
}


def rows(n: int, prefix: str = "ref") -> list[dict[str, Any]]:
    return [{"reference_id": f"{prefix}{i:06d}", "suffix": f"s{i:020d}", "data": {"n": i}} for i in range(n)]


def start_rows_job(base_url: str, batch_id: str, n: int, **fields: str) -> str:
    """Start a job of ``rows(n)`` with a one-line template through the real API, over plain
    blocking HTTP (tests that drive whole server processes); its job id."""
    files = {"document_file": ("t.json", json.dumps({"body": "<p>{{ data.n }}</p>"}), "application/json"),
             "data": (None, json.dumps(rows(n))), **{name: (None, value) for name, value in fields.items()}}
    r = requests.post(f"{base_url}/api/batch/{batch_id}/start", headers=AUTH, files=files, timeout=60)
    assert r.status_code == 202, r.text
    return str(r.json()["job_id"])


def start_form(template: dict[str, Any] | bytes | None, data: list[Any] | bytes | None, *,
               data_field: str = "data", params: dict[str, Any] | None = None,
               **fields: Any) -> aiohttp.FormData:
    form = aiohttp.FormData()
    if template is not None:
        raw = template if isinstance(template, bytes) else json.dumps(template).encode()
        form.add_field("document_file", raw, filename="template.json", content_type="application/json")
    if data is not None:
        raw = data if isinstance(data, bytes) else json.dumps(data).encode()
        if data_field == "data_file":
            form.add_field("data_file", raw, filename="data.json", content_type="application/json")
        else:
            form.add_field("data", raw.decode(), content_type="application/json")
    for name, value in (params or {}).items():
        form.add_field(f"param.{name}", json.dumps(value), content_type="application/json")
    for name, value in fields.items():
        if value is not None:
            form.add_field(name, str(value))
    return form


async def start(client: Any, batch_id: str, template: Any, data: Any, *, headers: dict[str, str] | None = None,
                **kw: Any) -> aiohttp.ClientResponse:
    return await client.post(f"/api/batch/{batch_id}/start", data=start_form(template, data, **kw),
                             headers=AUTH if headers is None else headers)


async def start_ok(client: Any, batch_id: str, template: Any, data: Any, **kw: Any) -> dict[str, Any]:
    r = await start(client, batch_id, template, data, **kw)
    body = await r.json()
    assert r.status == 202, body
    return body


async def add_running_job(db: Any, job_id: str, batch_id: str, n: int) -> None:
    """A job ``In progress`` with ``n`` pending rows (``r0``...), written straight to the database
    (tests of the row queries, without a start)."""
    from sqlalchemy import insert

    from server.db import utcnow
    from server.db.job_models import Job, JobRow

    async with db.write() as s:
        await s.execute(insert(Job).values(job_id=job_id, batch_id=batch_id, owner="o", status="In progress",
                                           strategy="smallest", inputs_hash="h", template="{}",
                                           created_at=utcnow(), total_count=n))
        await s.execute(insert(JobRow), [{"job_id": job_id, "idx": i, "reference_id": f"r{i}", "suffix": "s",
                                          "data": "{}"} for i in range(n)])


async def wait_job(client: Any, batch_id: str, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """Wait until the job has ended (the service polls the database), then read the status through the API."""
    await client.app[JOBS].job_finished(job_id, timeout=timeout)
    r = await client.get(f"/api/batch/{batch_id}/{job_id}/status", headers=AUTH)
    assert r.status == 200
    return await r.json()


async def get_json(client: Any, path: str) -> Any:
    r = await client.get(path, headers=AUTH)
    assert r.status == 200, await r.text()
    return await r.json()


@dataclass
class AssetServer:
    """Static bytes at paths, with a hit counter per path."""

    files: dict[str, bytes]
    hits: dict[str, int] = field(default_factory=dict)
    queries: list[str] = field(default_factory=list)  # each request's raw query string
    port: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def handle(self, request: web.Request) -> web.Response:
        self.hits[request.path] = self.hits.get(request.path, 0) + 1
        self.queries.append(request.rel_url.raw_query_string)
        if request.path not in self.files:
            return web.Response(status=404)
        return web.Response(body=self.files[request.path])


@dataclass
class CallbackReceiver:
    """Records every POST; answers 500 to the first ``fail_first`` ones."""

    fail_first: int = 0
    attempts: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    delivered: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts.append((dict(request.headers), await request.read()))
        if len(self.attempts) <= self.fail_first:
            return web.Response(status=500)
        self.delivered.set()
        return web.Response(status=204)


@asynccontextmanager
async def serve(handler: Any) -> AsyncIterator[int]:
    """Run ``handler`` for every path on 127.0.0.1:<free port>; yields the port."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield port
    finally:
        await runner.cleanup()


@asynccontextmanager
async def asset_server(files: dict[str, bytes]) -> AsyncIterator[AssetServer]:
    srv = AssetServer(files)
    async with serve(srv.handle) as port:
        srv.port = port
        yield srv


@asynccontextmanager
async def callback_receiver(fail_first: int = 0) -> AsyncIterator[CallbackReceiver]:
    rcv = CallbackReceiver(fail_first)
    async with serve(rcv.handle) as port:
        rcv.port = port
        yield rcv


class _Collect:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.received = asyncio.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 (aiosmtpd API)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        self.loop.call_soon_threadsafe(self.received.set)
        return "250 Message accepted for delivery"


@asynccontextmanager
async def smtp_server(handler: Any = None) -> AsyncIterator[tuple[int, Any]]:
    """A real aiosmtpd server (its own thread) on 127.0.0.1:<free port>, answering with
    ``handler`` (default: one that collects every message)."""
    handler = handler or _Collect(asyncio.get_running_loop())
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    await asyncio.to_thread(controller.start)
    try:
        yield port, handler
    finally:
        await asyncio.to_thread(controller.stop)


class Probe:
    """Another tenant, while an attack runs: a thread that calls ``/healthz`` and the status of
    a job of a second key every ``every`` s, recording each call's latency (bounded: it stops
    on ``stop()`` or after ``limit`` calls)."""

    def __init__(self, base_url: str, key: str, batch_id: str, job_id: str, every: float = 0.05,
                 limit: int = 20_000) -> None:
        import threading

        self.urls = [f"{base_url}/healthz", f"{base_url}/api/batch/{batch_id}/{job_id}/status"]
        self.headers = {"X-API-Key": key}
        self.every, self.limit = every, limit
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="probe", daemon=True)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        import time

        import requests

        with requests.Session() as s:
            for n in range(self.limit):
                url = self.urls[n % 2]
                t0 = time.perf_counter()
                try:
                    r = s.get(url, headers=self.headers, timeout=10)
                    if r.status_code != 200:
                        self.failures.append(f"{url}: {r.status_code}")
                except requests.RequestException as e:
                    self.failures.append(f"{url}: {e}")
                self.latencies.append(time.perf_counter() - t0)
                if self._stop.wait(self.every):  # the probe's own pace (the measured load), not a wait for work
                    return

    def p99(self) -> float:
        s = sorted(self.latencies)
        return s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]

    def check(self, limit: float = 0.100, calls: int = 5) -> None:
        """The other tenant was served throughout: every call 200, p99 under ``limit``."""
        assert not self.failures, self.failures[:5]
        assert len(self.latencies) >= calls, f"only {len(self.latencies)} probe calls"
        assert self.p99() < limit, (f"p99 {self.p99() * 1000:.0f} ms over {len(self.latencies)} calls "
                                    f"(max {max(self.latencies) * 1000:.0f} ms)")


@dataclass
class SlowAssetServer:
    """A remote asset that answers late: every request is held until ``release()`` (or ``hold``
    s: bounded), then answered ``body``. Records each request (path and query) as it arrives,
    as it is answered, and when its client went away first: the server cancels a handler whose
    peer closed the connection (aiohttp's ``handler_cancellation``), which is how a fetch that
    was abandoned shows here."""

    body: bytes
    hold: float = 30.0
    arrived: list[str] = field(default_factory=list)
    answered: list[str] = field(default_factory=list)
    abandoned: list[str] = field(default_factory=list)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def release(self) -> None:
        self.released.set()

    async def handle(self, request: web.Request) -> web.Response:
        what = request.path_qs
        self.arrived.append(what)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.released.wait(), self.hold)  # the asset's lateness, bounded
        except asyncio.CancelledError:
            self.abandoned.append(what)
            raise
        self.answered.append(what)
        return web.Response(body=self.body, content_type="application/javascript")


@asynccontextmanager
async def slow_asset_server(body: bytes, hold: float = 30.0) -> AsyncIterator[SlowAssetServer]:
    """A ``SlowAssetServer`` on 127.0.0.1:<free port>; held requests are released on exit."""
    srv = SlowAssetServer(body, hold)
    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", srv.handle)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=5.0)
    await runner.setup()
    srv.port = free_port()
    await web.TCPSite(runner, "127.0.0.1", srv.port).start()
    try:
        yield srv
    finally:
        srv.release()
        await runner.cleanup()
