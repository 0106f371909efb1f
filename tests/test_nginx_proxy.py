"""The API through the real NGINX, in front of a real HTTP receiver on 127.0.0.1 standing in for the
app: prefixes, forwarded client address, bodies streamed (not spooled), the body limit, the app's
own answers passed through untouched, and 503 JSON when nothing answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from server.config import Settings
from server.nginx import job_body_limit
from tests.support.nginx import NginxProcess
from tests.support.waiting import free_port

SUFFIX = "0123456789abcdef01234567"
LIMIT = 256 << 10  # max_chunk_size for these tests


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: dict[str, str]
    size: int = 0
    sha256: str = ""


@dataclass
class Receiver:
    """A stand-in app that records what reaches it. ``first_bytes`` is set as soon as the first
    body bytes of a request arrive, before the body is complete."""
    seen: list[Seen] = field(default_factory=list)
    first_bytes: asyncio.Event = field(default_factory=asyncio.Event)
    status: int = 201
    reply: dict[str, object] = field(default_factory=lambda: {"ok": True})

    async def handle(self, request: web.Request) -> web.Response:
        s = Seen(request.method, request.path_qs, dict(request.headers))
        h = hashlib.sha256()
        async for data in request.content.iter_any():
            if data:
                self.first_bytes.set()
            h.update(data)
            s.size += len(data)
        s.sha256 = h.hexdigest()
        self.seen.append(s)
        return web.json_response(self.reply, status=self.status, headers={"X-From-App": "yes"})


@pytest.fixture
async def receiver(aiohttp_server) -> tuple[Receiver, int]:  # type: ignore[no-untyped-def]
    rec = Receiver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec.handle)
    server = await aiohttp_server(app)
    return rec, server.port


@pytest.fixture
def proxy_settings(tmp_path) -> Settings:  # type: ignore[no-untyped-def]
    return Settings(data_dir=tmp_path / "var", max_chunk_size=LIMIT, max_data_size=LIMIT,
                    fetch_max_bytes=LIMIT)


@pytest.fixture
async def front(nginx_factory, proxy_settings, receiver) -> tuple[NginxProcess, Receiver]:  # type: ignore[no-untyped-def]
    rec, port = receiver
    return nginx_factory(proxy_settings, app_port=port), rec


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


API_PATHS = [
    "/api/v1/upload/b7/0?x=1&y=%20z",
    "/api/batch/b7/start",
    "/site/automation/batch/upload",
    "/nuxeo/api/v1/upload/b7/1",
    "/nuxeo/site/automation/batch/execute",
    "/healthz",
    "/json/cmis",
    "/runningstatus",
]


@pytest.mark.parametrize("path", API_PATHS)
async def test_api_reaches_the_app_with_the_real_client_address(front, http, path: str) -> None:
    ngx, rec = front
    spoofed = {"X-Forwarded-For": "6.6.6.6", "X-Real-IP": "6.6.6.6", "X-API-Key": "k"}
    async with http.post(ngx.url + path, data=b"hello", headers=spoofed) as r:
        assert r.status == 201
        assert await r.json() == {"ok": True}
        assert r.headers["X-From-App"] == "yes"
    (seen,) = rec.seen
    assert seen.path_qs == path and seen.method == "POST" and seen.size == 5
    assert seen.headers["X-Forwarded-For"] == "127.0.0.1"
    assert seen.headers["X-Real-IP"] == "127.0.0.1"
    assert seen.headers["X-Forwarded-Proto"] == "http"
    assert seen.headers["Host"] == f"127.0.0.1:{ngx.port}"
    assert seen.headers["X-API-Key"] == "k"


@pytest.mark.parametrize("status,code", [(404, "ERR_BATCH_NOT_FOUND"), (503, "ERR_SERVER_SHUTTING_DOWN"),
                                         (413, "ERR_CHUNK_TOO_LARGE")])
async def test_the_apps_own_errors_pass_through_untouched(front, http, status: int, code: str) -> None:
    ngx, rec = front
    rec.status, rec.reply = status, {"entity-type": "exception", "status": status, "code": code, "message": "m"}
    async with http.get(ngx.url + "/api/v1/upload/nope") as r:
        assert r.status == status
        assert (await r.json())["code"] == code
        assert r.headers["X-From-App"] == "yes"


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_upload_body_streams_to_the_app_before_it_is_complete(front, http, framing: str) -> None:
    ngx, rec = front
    first, rest = os.urandom(64 << 10), os.urandom(128 << 10)

    async def body() -> AsyncIterator[bytes]:
        yield first
        # NGINX must pass the first part on now: were it buffering the request, the app would
        # see nothing until the whole body was in, and this wait would time out.
        await asyncio.wait_for(rec.first_bytes.wait(), timeout=10)
        yield rest

    headers = {} if framing == "chunked" else {"Content-Length": str(len(first) + len(rest))}
    async with http.post(ngx.url + "/api/v1/upload/b1/0", data=body(), headers=headers) as r:
        assert r.status == 201, await r.text()
    (seen,) = rec.seen
    assert seen.size == len(first) + len(rest)
    assert seen.sha256 == hashlib.sha256(first + rest).hexdigest()
    if framing == "chunked":
        assert seen.headers.get("Transfer-Encoding") == "chunked"


@pytest.mark.parametrize("path", ["/api/v1/upload/b1/0", "/site/automation/batch/upload",
                                  "/nuxeo/api/v1/upload/b1/0"])
async def test_body_limit_is_max_chunk_size(front, http, path: str) -> None:
    ngx, rec = front
    async with http.post(ngx.url + path, data=os.urandom(LIMIT)) as r:
        assert r.status == 201
    assert rec.seen[-1].size == LIMIT
    async with http.post(ngx.url + path, data=os.urandom(LIMIT + 1)) as r:
        assert r.status == 413
        body = await r.json()
        assert body["code"] == "ERR_TOO_LARGE" and body["status"] == 413
        # The limit and the setting behind it, as the app's own 413s name theirs.
        assert body["message"] == (f"request body over the {LIMIT}-byte limit of one upload "
                                   "(FILEDROP_MAX_CHUNK_SIZE)")
    assert len(rec.seen) == 1  # refused before anything reached the app


async def test_chunked_body_over_the_limit_is_413(front, http) -> None:
    ngx, rec = front

    async def body() -> AsyncIterator[bytes]:
        for _ in range(LIMIT // (32 << 10) + 2):
            yield os.urandom(32 << 10)

    async with http.post(ngx.url + "/api/v1/upload/b1/0", data=body()) as r:
        assert r.status == 413
        assert (await r.json())["code"] == "ERR_TOO_LARGE"
    assert all(s.size <= LIMIT for s in rec.seen)


async def test_job_start_takes_the_data_limit(front, http, proxy_settings) -> None:
    ngx, rec = front
    size = job_body_limit(proxy_settings)
    assert size > LIMIT
    async with http.post(ngx.url + "/api/batch/b1/start", data=io.BytesIO(os.urandom(size))) as r:
        assert r.status == 201
    assert rec.seen[-1].size == size
    async with http.post(ngx.url + "/api/batch/b1/start", data=io.BytesIO(os.urandom(size + 1))) as r:
        assert r.status == 413
        assert (await r.json())["message"] == (
            f"request body over the {size}-byte limit of a job start "
            "(FILEDROP_MAX_DATA_SIZE + FILEDROP_FETCH_MAX_BYTES + 1 MiB)")


def exchange(port: int, request: bytes) -> bytes:
    """``request`` as raw bytes on a fresh connection; everything NGINX answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


async def test_malformed_api_request_is_400_json(front) -> None:
    ngx, rec = front
    raw = await asyncio.to_thread(exchange, ngx.port,
                                  b"POST /api/v1/upload/b1/0 HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert b"application/json" in head
    assert b'"code": "ERR_REQUEST_INVALID"' in body
    assert rec.seen == []


@pytest.mark.parametrize(("version", "coding", "status", "code"), [
    ("1.1", "gzip, chunked", 501, "ERR_NOT_IMPLEMENTED"),
    ("1.1", "chunked, identity", 501, "ERR_NOT_IMPLEMENTED"),
    ("1.1", "identity", 501, "ERR_NOT_IMPLEMENTED"),
    ("2.0", "chunked", 505, "ERR_HTTP_VERSION_NOT_SUPPORTED"),
])
async def test_what_nginx_does_not_implement_is_json(front, version: str, coding: str, status: int,
                                                     code: str) -> None:
    ngx, rec = front
    raw = await asyncio.to_thread(exchange, ngx.port, (
        f"POST /api/v1/upload/b1/0 HTTP/{version}\r\nHost: x\r\nTransfer-Encoding: {coding}\r\n"
        "Connection: close\r\n\r\n0\r\n\r\n").encode())
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status}".encode()), raw
    assert b"application/json" in head
    assert json.loads(body)["code"] == code
    assert rec.seen == []


@pytest.mark.parametrize("path", API_PATHS)
def test_app_down_is_503_json_and_links_still_served(nginx_factory, tmp_path, path: str) -> None:
    settings = Settings(data_dir=tmp_path / "var")
    assert settings.smartlink_root is not None
    link = settings.smartlink_root / "b1" / f"ref.{SUFFIX}.html"
    link.parent.mkdir(parents=True)
    link.write_bytes(b"<p>still here</p>")
    ngx = nginx_factory(settings)  # app_port: a free port, nothing listens there
    for method in ("GET", "POST"):
        r = ngx.fetch(method, path, body=b"x" * 10 if method == "POST" else None)
        assert r.status == 503
        assert r.headers["Content-Type"] == "application/json"
        assert r.headers["Retry-After"] == "5"
        body = r.json()
        assert body == {"entity-type": "exception", "status": 503, "code": "ERR_APP_UNAVAILABLE",
                        "message": body["message"]}
        assert len(r.body) < 200
    r = ngx.fetch("GET", f"/b1/ref.{SUFFIX}.html")
    assert r.status == 200 and r.body == b"<p>still here</p>"


async def test_app_that_goes_away_gives_503_then_comes_back(nginx_factory, proxy_settings) -> None:
    rec = Receiver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    ngx = nginx_factory(proxy_settings, app_port=port)
    async with aiohttp.ClientSession() as http:
        try:
            async with http.get(ngx.url + "/healthz") as r:
                assert r.status == 201
            await runner.cleanup()
            async with http.get(ngx.url + "/healthz") as r:
                assert r.status == 503
                assert (await r.json())["code"] == "ERR_APP_UNAVAILABLE"
            # Same port again: NGINX needs no restart.
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
            async with http.get(ngx.url + "/healthz") as r:
                assert r.status == 201
        finally:
            await runner.cleanup()
