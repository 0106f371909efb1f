"""Crash safety: ``kill -9`` mid chunked upload, restart, resume from the server's chunk ids;
and start-up recovery of a file a crash left ``assembling``."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import sqlite3
from pathlib import Path

import pytest
import requests

from server.app import create_app
from server.keys import UPLOADS
from tests.conftest import API_KEY, AUTH
from tests.support.uploads import Uploads, holds, sha256, split, upload_headers, upload_tree
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)
MIB = 1 << 20
CHUNK = 2 * MIB  # over one write block, so a chunk cut off mid-body has reached the disk


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
    data_dir = tmp_path / "srv"
    [partial] = [data_dir / "uploads" / p for p in upload_tree(data_dir) if p.endswith("/partial")]
    with socket.create_connection(("127.0.0.1", srv.port)) as sock, \
            socket.create_connection(("127.0.0.1", srv.port)) as sock2:
        sock.sendall(head + parts[3][: CHUNK * 3 // 4])
        sock2.sendall(whole + b"w" * (CHUNK // 2))
        wait_until(lambda: holds(partial, 3 * CHUNK, parts[3][:MIB]) and
                   sum(p.endswith(".part") for p in upload_tree(data_dir)) == 1, timeout=10,
                   what="chunk 3's first megabyte in place and the whole file's temp")
        srv.kill9()

    srv2 = server_factory(data_dir=data_dir)
    # The whole file's temp (batch dir) is removed at start; chunk 3's bytes are not recorded.
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


async def test_file_left_assembling_is_assembled_at_start(aiohttp_client, settings) -> None:
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
