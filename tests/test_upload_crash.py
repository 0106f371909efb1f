"""Crash safety: ``kill -9`` mid chunked upload, restart, resume from the server's chunk ids;
and start-up recovery of a file a crash left ``assembling``."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from server.app import create_app
from server.db.migrate import upgrade
from server.keys import UPLOADS
from tests.conftest import API_KEY, AUTH
from tests.support.server import REPO, server_env
from tests.support.uploads import Uploads, holds, sha256, split, upload_headers, upload_tree
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)
MIB = 1 << 20
CHUNK = 2 * MIB  # over one write block, so a chunk cut off mid-body has reached the disk


# `filedrop serve` that kill -9s itself right after its recording transaction renamed a body into
# place, before that transaction commits: at the rename of a completed file's `partial` to
# `<id>.data` ("completion"), or of a file's first chunk to `partial` ("first-chunk").
DIES_AT_RENAME = """
import os, signal, sys
from server.uploads import ledger
real = ledger.replace_making_dirs
def replace(src, dst):
    real(src, dst)
    if ((src.name, dst.suffix) == ("partial", ".data")) if sys.argv[1] == "completion" else dst.name == "partial":
        os.kill(os.getpid(), signal.SIGKILL)
ledger.replace_making_dirs = replace
from server.cli import main
sys.exit(main(["serve"]))
"""


@contextmanager
def dying_server(tmp_path: Path, data_dir: Path, at: str) -> Iterator[str]:
    """A real server on ``data_dir`` that dies at the rename ``at`` (DIES_AT_RENAME); its URL. The
    block must make it die."""
    env = server_env(data_dir, API_KEY)
    upgrade(data_dir / "filedrop.sqlite3")
    url = f"http://127.0.0.1:{env['FILEDROP_APP_PORT']}"
    log_path = tmp_path / f"dying-{at}.log"
    with open(log_path, "wb") as log:
        dying = subprocess.Popen([sys.executable, "-c", DIES_AT_RENAME, at], cwd=REPO, env=env, stdout=log,
                                 stderr=subprocess.STDOUT)

    def healthy() -> bool:
        assert dying.poll() is None, log_path.read_text()[-2000:]
        try:
            return requests.get(url + "/healthz", timeout=1).ok
        except requests.ConnectionError:
            return False

    try:
        wait_until(healthy, timeout=20, what=f"the server that dies at the {at} rename")
        yield url
        assert dying.wait(timeout=10) == -signal.SIGKILL
    finally:
        if dying.poll() is None:
            dying.kill()
            dying.wait(timeout=10)


def post_chunk(base: str, batch: str, idx: int, count: int, size: int, data: bytes) -> requests.Response:
    return requests.post(f"{base}/api/v1/upload/{batch}/0", data=data, timeout=30,
                         headers=upload_headers("crash.bin", size, chunk=(idx, count)))


def test_kill9_mid_chunked_upload_then_resume(server_factory, tmp_path: Path) -> None:
    data = os.urandom(6 * CHUNK + 999)
    parts = split(data, CHUNK)
    n = len(parts)
    srv = server_factory()
    batch = requests.post(srv.url + "/api/v1/upload/", headers=AUTH, timeout=10).json()["batchId"]
    for i in (0, 1, 2, 5):
        assert post_chunk(srv.url, batch, i, n, len(data), parts[i]).status_code == 202

    # Chunk 3 is on the wire, its first megabyte written in place, when the server dies.
    head = "\r\n".join([
        f"POST /api/v1/upload/{batch}/0 HTTP/1.1", f"Host: 127.0.0.1:{srv.port}", f"X-API-Key: {API_KEY}",
        "X-File-Name: crash.bin", f"X-File-Size: {len(data)}", "X-Upload-Type: chunked",
        "X-Upload-Chunk-Index: 3", f"X-Upload-Chunk-Count: {n}", f"Content-Length: {CHUNK}", "", ""]).encode()
    # And a whole file (index 1) is half sent too (into its temp in the batch dir).
    whole = "\r\n".join([
        f"POST /api/v1/upload/{batch}/1 HTTP/1.1", f"Host: 127.0.0.1:{srv.port}", f"X-API-Key: {API_KEY}",
        "X-File-Name: whole.bin", f"X-File-Size: {CHUNK}", f"Content-Length: {CHUNK}", "", ""]).encode()
    # And chunk 4 with a wrong length (stored on its own: into a temp in the file's chunks/).
    odd = head.replace(b"X-Upload-Chunk-Index: 3", b"X-Upload-Chunk-Index: 4").replace(
        f"Content-Length: {CHUNK}".encode(), f"Content-Length: {CHUNK - 1}".encode())
    data_dir = tmp_path / "srv"
    [partial] = [data_dir / "uploads" / p for p in upload_tree(data_dir) if p.endswith("/partial")]
    with socket.create_connection(("127.0.0.1", srv.port)) as sock, \
            socket.create_connection(("127.0.0.1", srv.port)) as sock2, \
            socket.create_connection(("127.0.0.1", srv.port)) as sock3:
        sock.sendall(head + parts[3][: CHUNK * 3 // 4])
        sock2.sendall(whole + b"w" * (CHUNK // 2))
        sock3.sendall(odd + b"o" * (CHUNK // 2))
        wait_until(lambda: holds(partial, 3 * CHUNK, parts[3][:MIB]) and
                   sum(p.endswith(".part") for p in upload_tree(data_dir)) == 2 and
                   any("/chunks/." in p for p in upload_tree(data_dir)), timeout=10,
                   what="chunk 3's first megabyte in place, the whole file's temp and chunk 4's")
        srv.kill9()

    srv2 = server_factory(data_dir=data_dir)
    # The temps (the whole file's in the batch dir, chunk 4's in the file's chunks/) are removed
    # at start; chunk 3's bytes are not recorded.
    assert not [p for p in upload_tree(data_dir) if p.endswith(".part")]
    info = requests.get(f"{srv2.url}/nuxeo/api/v1/upload/{batch}/0", headers=AUTH, timeout=10).json()
    assert info["uploadedChunkIds"] == [0, 1, 2, 5] and info["chunkCount"] == n
    assert info["uploadedSize"] == 4 * CHUNK and info["state"] == "receiving"
    missing = sorted(set(range(n)) - set(info["uploadedChunkIds"]))
    for i in missing:
        r = post_chunk(srv2.url, batch, i, n, len(data), parts[i])
        assert r.status_code == (201 if i == missing[-1] else 202)
    r = requests.post(f"{srv2.url}/api/v1/upload/{batch}/execute/Batch.Manifest", headers=AUTH, json={},
                      timeout=30)
    assert r.json()["files"] == [{"fileIdx": "0", "name": "crash.bin", "size": len(data),
                                  "sha256": hashlib.sha256(data).hexdigest()}]


def test_kill9_between_the_rename_of_a_completion_and_its_commit(server_factory, tmp_path: Path) -> None:
    """The last chunk's transaction renamed `partial` to `<id>.data`, then the process died: the
    row still says `receiving` with the other chunks, whose bytes are in that `.data`. A start
    puts `partial` back, so the last chunk sent again completes the file with its own bytes (it
    used to make a new `partial` of that chunk alone, holes elsewhere, answered 201 with the
    SHA-256 of the holes)."""
    data = os.urandom(3 * CHUNK + 999)
    parts = split(data, CHUNK)
    n = len(parts)
    data_dir = tmp_path / "srv"
    with dying_server(tmp_path, data_dir, "completion") as url:
        batch = requests.post(url + "/api/v1/upload/", headers=AUTH, timeout=10).json()["batchId"]
        for i in range(n - 1):
            assert post_chunk(url, batch, i, n, len(data), parts[i]).status_code == 202
        with pytest.raises(requests.ConnectionError):
            post_chunk(url, batch, n - 1, n, len(data), parts[-1])
    assert [p for p in upload_tree(data_dir) if p.endswith(".data")]  # renamed, not recorded

    srv2 = server_factory(data_dir=data_dir)
    info = requests.get(f"{srv2.url}/api/v1/upload/{batch}/0", headers=AUTH, timeout=10).json()
    assert info["uploadedChunkIds"] == list(range(n - 1)) and info["state"] == "receiving"
    r = post_chunk(srv2.url, batch, n - 1, n, len(data), parts[-1])
    assert r.status_code == 201 and r.json()["sha256"] == hashlib.sha256(data).hexdigest()
    [path] = upload_tree(data_dir)
    assert (data_dir / "uploads" / path).read_bytes() == data


def test_kill9_between_a_first_chunk_and_its_row_leaves_nothing_to_the_next_file(server_factory,
                                                                                 tmp_path: Path) -> None:
    """File 0's first chunk was renamed to `<id>/partial` and the process died before the row
    was committed. SQLite hands that row id out again, here to file 1 of the same batch: the start
    removes what no committed row owns, so file 1's chunks in place do not land in file 0's
    longer `partial` (it used to hold the file at that length: every completion refused, 400
    for good)."""
    data_dir = tmp_path / "srv"
    with dying_server(tmp_path, data_dir, "first-chunk") as url:
        batch = requests.post(url + "/api/v1/upload/", headers=AUTH, timeout=10).json()["batchId"]
        with pytest.raises(requests.ConnectionError):
            post_chunk(url, batch, 0, 2, 4 * CHUNK, os.urandom(2 * CHUNK))
    assert upload_tree(data_dir) == ["1/1/partial"]  # renamed, not recorded

    srv = server_factory(data_dir=data_dir)
    data = os.urandom(3 * MIB)
    parts = split(data, MIB)
    url = f"{srv.url}/api/v1/upload/{batch}/1"
    for i in (1, 0, 2):  # chunk 1 first: the row is made by a chunk stored on its own
        r = requests.post(url, data=parts[i], headers=upload_headers("next.bin", len(data), chunk=(i, 3)), timeout=30)
        assert r.status_code == (201 if i == 2 else 202), r.text
    assert r.json()["sha256"] == hashlib.sha256(data).hexdigest()
    [path] = upload_tree(data_dir)
    assert (data_dir / "uploads" / path).read_bytes() == data


@pytest.mark.parametrize("renamed", [False, True], ids=["before-rename", "renamed-not-committed"])
async def test_file_left_assembling_is_assembled_at_start(aiohttp_client, settings, renamed: bool) -> None:
    data = os.urandom(4 * 10_000)
    parts = split(data, 10_000)
    first = await aiohttp_client(create_app(settings))
    up = Uploads(first)
    batch = await up.create()
    for i in range(3):
        await up.post(batch, 0, parts[i], chunk=(i, 4), size=len(data))
    await first.close()

    # The crash point: the last chunk written in place and recorded, the file flipped to
    # `assembling`, and the process gone before the data file appeared.
    with sqlite3.connect(settings.db_path) as db:
        batch_pk, file_id = db.execute("SELECT f.batch_pk, f.id FROM batch_files f JOIN batches b "
                                       "ON b.id = f.batch_pk WHERE b.batch_id = ?", (batch,)).fetchone()
        partial = settings.uploads_dir / str(batch_pk) / str(file_id) / "partial"
        with open(partial, "r+b") as f:
            os.pwrite(f.fileno(), parts[3], 3 * 10_000)
        if renamed:  # the assembler's transaction renamed `partial` to `<id>.data`, then died uncommitted
            os.replace(partial, partial.parents[1] / f"{file_id}.data")
        db.execute("UPDATE batch_files SET state = 'assembling', chunk_ids = ?, received = ? WHERE id = ?",
                   (bytes([0b1111]), len(data), file_id))

    second = await aiohttp_client(create_app(settings))
    service = second.app[UPLOADS]
    assert service.stats.recovered == 1
    await service.idle()
    assert service.stats.assembled == 1
    up2 = Uploads(second)
    assert (await up2.manifest(batch))["files"][0]["sha256"] == sha256(data)
    assert [re.fullmatch(r"\d+/\d+\.data", p) is not None for p in upload_tree(settings.data_dir)] == [True]


def test_sigterm_with_an_upload_stalled_mid_body_stops_within_10_s(server_factory, tmp_path: Path) -> None:
    """A client that stops sending mid-body keeps its request open: the server waits for it for
    the shutdown's grace only, and its whole stop stays within the 10 s the README promises
    (with a grace of 10 s it took 10.2 s). The request cut off leaves no temp."""
    srv = server_factory()
    batch = requests.post(srv.url + "/api/v1/upload/", headers=AUTH, timeout=10).json()["batchId"]
    whole = "\r\n".join([
        f"POST /api/v1/upload/{batch}/0 HTTP/1.1", f"Host: 127.0.0.1:{srv.port}", f"X-API-Key: {API_KEY}",
        "X-File-Name: stalled.bin", f"X-File-Size: {CHUNK}", f"Content-Length: {CHUNK}", "", ""]).encode()
    data_dir = tmp_path / "srv"
    assert srv.proc is not None
    with socket.create_connection(("127.0.0.1", srv.port)) as sock:
        sock.sendall(whole + b"s" * (CHUNK // 2))
        wait_until(lambda: any(p.endswith(".part") for p in upload_tree(data_dir)), timeout=10,
                   what="the stalled body's temp")
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        srv.proc.wait(timeout=15)
        took = time.monotonic() - t0
    assert took < 10, f"the server took {took:.1f} s to stop"
    assert not [p for p in upload_tree(data_dir) if p.endswith(".part")]
