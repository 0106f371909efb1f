"""What aiohttp refuses before any middleware (a control character in a header value, broken
chunk framing) is answered in the JSON error shape, straight and through NGINX; a client that
disconnects mid-body is one INFO line; nothing of either is an ERROR or a traceback. The same
connection class reads its socket in ``RECV_SIZE`` pieces, and glibc takes the serving process's
allocator settings (one arena)."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from server.protocol import HEAP_ARENAS, HEAP_MMAP_THRESHOLD, RECV_SIZE, Runner
from tests.conftest import API_KEY
from tests.support.nginx import app_behind_nginx
from tests.support.waiting import free_port, wait_until


def exchange(port: int, raw: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw`` on a fresh connection, read until the server closes it; (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        body = out
    return int(lines[0].split()[1]), headers, body


def connections_to(port: int) -> int:
    """Established TCP connections whose local port is ``port`` (the app's side of them)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "01" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def cut_off(port: int, raw: bytes, app_port: int) -> None:
    """Send the start of a request, wait until it reached the app (through NGINX: NGINX has
    connected to it), then disconnect: a client that gives up mid-body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(raw)
        wait_until(lambda: connections_to(app_port) > 0, timeout=10, what="the request to reach the app")


def log_since(path: Path, offset: int) -> str:
    return path.read_bytes()[offset:].decode(errors="replace")


@pytest.fixture
def app_and_nginx(server_factory, nginx_factory, tmp_path: Path):  # type: ignore[no-untyped-def]
    return app_behind_nginx(server_factory, nginx_factory, tmp_path / "srv", API_KEY)


@pytest.mark.parametrize("char", [b"\x01", b"\x1b", b"\x7f"])
def test_control_character_in_a_header_value_is_a_json_400(app_and_nginx, char: bytes) -> None:
    srv, ngx = app_and_nginx
    for port in (srv.port, ngx.port):
        start = srv.log_path.stat().st_size
        status, headers, body = exchange(port, b"GET /api/v1/upload/handlers HTTP/1.1\r\nHost: x\r\n"
                                         b"X-API-Key: " + API_KEY.encode() + b"\r\nX-Note: a" + char + b"b\r\n"
                                         b"Connection: close\r\n\r\n")
        assert status == 400, body
        assert headers["content-type"].startswith("application/json")
        doc = json.loads(body)
        assert doc == {"entity-type": "exception", "status": 400, "code": "ERR_REQUEST_INVALID",
                       "message": "malformed request: Invalid header value char"}
        log = wait_until(lambda at=start: log_since(srv.log_path, at), timeout=10,
                         what="the server's log line")
        assert "ERROR" not in log and "Traceback" not in log, log
        assert log.count("\n") == 1 and " INFO filedrop.protocol: refused a malformed request" in log, log
    # The server goes on answering.
    assert exchange(srv.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")[0] == 200


def test_broken_chunk_framing_is_a_json_400(app_and_nginx) -> None:
    srv, _ngx = app_and_nginx
    start = srv.log_path.stat().st_size
    status, headers, body = exchange(srv.port, (
        b"POST /api/v1/upload/b1/0 HTTP/1.1\r\nHost: x\r\nX-API-Key: " + API_KEY.encode() +
        b"\r\nX-File-Name: a.txt\r\nX-File-Size: 3\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"))
    assert status == 400 and headers["content-type"].startswith("application/json")
    assert json.loads(body)["code"] == "ERR_REQUEST_INVALID"
    log = wait_until(lambda: log_since(srv.log_path, start), timeout=10, what="the server's log line")
    assert "ERROR" not in log and "Traceback" not in log, log


BODIES = {
    "upload": (b"POST /api/v1/upload/{batch}/0 HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\nX-File-Name: a.bin\r\n"
               b"X-File-Size: 100000\r\nContent-Length: 100000\r\n\r\n" + b"a" * 5000),
    "legacy": (b"POST /site/automation/batch/upload HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\nX-Batch-Id: l1\r\n"
               b"X-File-Idx: 0\r\nX-File-Name: a.bin\r\nX-File-Size: 100000\r\nContent-Length: 100000\r\n\r\n"
               + b"a" * 5000),
    "execute": (b"POST /api/v1/upload/{batch}/execute/Batch.Manifest HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\n"
                b"Content-Length: 1000\r\n\r\n{\"params\""),
    "start": (b"POST /api/batch/cut/start HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\nContent-Type: multipart/"
              b"form-data; boundary=XX\r\nContent-Length: 100000\r\n\r\n--XX\r\nContent-Disposition: form-data; "
              b"name=\"data\"\r\n\r\n[{\"reference_id\": \"r\""),
}


@pytest.mark.parametrize("via", ["app", "nginx"])
def test_a_client_that_disconnects_mid_body_is_one_info_line(app_and_nginx, via: str) -> None:
    srv, ngx = app_and_nginx
    port = srv.port if via == "app" else ngx.port
    status, _h, body = exchange(srv.port, b"POST /api/v1/upload HTTP/1.1\r\nHost: x\r\nX-API-Key: "
                                + API_KEY.encode() + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    assert status == 201, body
    batch = json.loads(body)["batchId"].encode()
    for name, raw in BODIES.items():
        start = srv.log_path.stat().st_size
        cut_off(port, raw.replace(b"{batch}", batch) % API_KEY.encode(), srv.port)
        log = wait_until(lambda at=start: (lambda t: t if "went away" in t else "")(log_since(srv.log_path, at)),
                         timeout=15, what=f"the log line of the {name} cut off")
        assert "ERROR" not in log and "Traceback" not in log, log
        assert log.count("\n") == 1 and " INFO filedrop.errors: client went away during POST" in log, (name, log)
    # Nothing of the cut-off uploads was kept; the server answers as before.
    status, _h, body = exchange(srv.port, b"GET /api/v1/upload/" + batch + b" HTTP/1.1\r\nHost: x\r\nX-API-Key: "
                                + API_KEY.encode() + b"\r\nConnection: close\r\n\r\n")
    assert status == 204, body


async def test_connections_read_the_socket_in_recv_size_pieces() -> None:
    """Large bodies arrive in pieces of up to RECV_SIZE (asyncio reads 256 KiB by default), and
    those pieces stay under the heap's mmap threshold (else every read maps fresh pages)."""
    assert 256 << 10 < RECV_SIZE < HEAP_MMAP_THRESHOLD
    seen: dict[str, int] = {}

    async def sink(request: web.Request) -> web.Response:
        seen["max_size"] = request.transport.max_size  # type: ignore[union-attr]
        seen["bytes"] = sum([len(piece) async for piece in request.content.iter_any()])
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/", sink)
    runner = Runner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as http, http.post(f"http://127.0.0.1:{port}/", data=io.BytesIO(b"x" * (4 << 20))) as r:
            assert r.status == 200
    finally:
        await runner.cleanup()
    assert seen == {"max_size": RECV_SIZE, "bytes": 4 << 20}


ARENAS = """
import ctypes, sys, threading
from server.protocol import tune_allocator
if sys.argv[1] == "tuned":
    assert tune_allocator()
def allocate():
    kept = [bytes(100_000) for _ in range(50)]
threads = [threading.Thread(target=allocate) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
ctypes.CDLL(None).malloc_stats()  # one "Arena N:" section per arena, on stderr
"""


@pytest.mark.parametrize("mode", ["default", "tuned"])
def test_the_serving_allocator_keeps_one_arena(mode: str) -> None:
    """glibc gives threads arenas of their own unless ``tune_allocator`` (called first thing by
    ``filedrop serve``) limits them to HEAP_ARENAS: four threads allocating, then glibc's own
    count of its arenas."""
    out = subprocess.run([sys.executable, "-c", ARENAS, mode], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    arenas = out.stderr.count("Arena ")
    assert arenas == HEAP_ARENAS if mode == "tuned" else arenas > HEAP_ARENAS, out.stderr


def _chunked_upload(batch: bytes, body: bytes, *headers: bytes) -> bytes:
    """A whole file sent with Transfer-Encoding: chunked (no Content-Length), in 64 KiB chunks."""
    framed = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 65536]), body[i:i + 65536])
                      for i in range(0, len(body), 65536))
    return (b"POST /api/v1/upload/" + batch + b"/0 HTTP/1.1\r\nHost: x\r\nX-API-Key: " + API_KEY.encode()
            + b"\r\nX-File-Name: a.txt\r\n" + b"".join(h + b"\r\n" for h in headers)
            + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + framed + b"0\r\n\r\n")


def test_a_chunked_body_without_x_file_size_is_answered_alike_by_the_app_and_through_nginx(app_and_nginx) -> None:
    """NGINX passes a small chunked body on with a Content-Length and a big one chunked; the
    app reads a small one without either header first. Either way: up to 1 MiB its length is
    its size (201), over it X-File-Size is required (400), and a wrong X-File-Size is said of
    "the body's length" (no Content-Length was sent)."""
    srv, ngx = app_and_nginx
    for port in (srv.port, ngx.port):
        status, _h, body = exchange(port, b"POST /api/v1/upload HTTP/1.1\r\nHost: x\r\nX-API-Key: "
                                    + API_KEY.encode() + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        batch = json.loads(body)["batchId"].encode()
        status, _h, body = exchange(port, _chunked_upload(batch, b"abcdef"))
        assert (status, json.loads(body)["uploadedSize"]) == (201, "6"), (port, body)
        status, _h, body = exchange(port, _chunked_upload(batch, b"x" * (2 << 20)))
        doc = json.loads(body)
        assert (status, doc["code"]) == (400, "ERR_FILE_SIZE_MISSING"), (port, doc)
        assert "X-File-Size is required" in doc["message"] and "without Content-Length" in doc["message"], doc
        status, _h, body = exchange(port, _chunked_upload(batch, b"abc", b"X-File-Size: 5"))
        doc = json.loads(body)
        assert (status, doc["code"]) == (400, "ERR_FILE_SIZE_MISMATCH"), (port, doc)
        assert "Content-Length" not in doc["message"] and "X-File-Size 5" in doc["message"], (port, doc)
        status, _h, body = exchange(port, b"GET /api/v1/upload/" + batch + b"/0 HTTP/1.1\r\nHost: x\r\nX-API-Key: "
                                    + API_KEY.encode() + b"\r\nConnection: close\r\n\r\n")
        assert (status, json.loads(body)["size"]) == (200, 6), body
