"""Presigned uploads (POST /api/v1/upload/{batchId}/{fileIdx}/presign): a PUT of the file to the
URL, without the key, lands in that batch and index as a POST with the key would, with the same
limits and checks. Through NGINX in front of a real `filedrop serve`, plus the presign route's
own refusals in process."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import requests
from sqlalchemy import select

from server.auth import hash_key
from server.db.models import Batch, BatchFile
from server.keys import DATABASE, KEYSTORE
from tests.conftest import API_KEY, AUTH, OTHER_KEY
from tests.support.server import REPO
from tests.support.signed import app_and_front, path_of
from tests.support.uploads import assert_error
from tests.support.waiting import async_wait_until


def presign(base: str, batch: str, idx: int, query: str = "", key: dict[str, str] = AUTH) -> requests.Response:
    return requests.post(f"{base}/api/v1/upload/{batch}/{idx}/presign{query}", headers=key, timeout=30)


def error_of(r: requests.Response, status: int, code: str) -> dict:  # type: ignore[type-arg]
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["entity-type"] == "exception" and body["code"] == code and body["message"], body
    return body


def test_a_presigned_put_lands_as_an_upload_with_the_key(server_factory, nginx_factory, tmp_path: Path) -> None:
    srv, front = app_and_front(server_factory, nginx_factory, tmp_path / "srv", API_KEY, max_chunk_size="1M")
    batch = requests.post(f"{front.url}/api/v1/upload", headers=AUTH, timeout=30).json()["batchId"]
    r = presign(front.url, batch, 0, "?expires_in=600")
    assert r.status_code == 200, r.text
    link = r.json()
    assert set(link) == {"upload_URL", "expires"}
    assert link["upload_URL"].startswith(f"{front.url}/api/v1/upload/{batch}/0?")
    data = bytes(range(256)) * 1000  # 256,000 bytes
    r = requests.put(link["upload_URL"], data=data, headers={"X-File-Name": "rows%20%C3%A9t%C3%A9.bin"}, timeout=30)
    assert r.status_code == 201, r.text
    assert r.json() == {"batchId": batch, "fileIdx": "0", "uploadType": "normal", "uploadedSize": "256000",
                        "uploaded": "true", "sha256": hashlib.sha256(data).hexdigest()}
    info = requests.get(f"{front.url}/api/v1/upload/{batch}/0", headers=AUTH, timeout=30).json()
    assert info["complete"] and info["name"] == "rows été.bin" and info["size"] == 256000
    assert info["sha256"] == hashlib.sha256(data).hexdigest()
    # The same checks as a POST with the key: a name is required, the size must match, and a
    # body over FILEDROP_MAX_CHUNK_SIZE is 413 (NGINX's limit for the upload API, and the app's).
    error_of(requests.put(link["upload_URL"], data=b"x", timeout=30), 400, "ERR_FILE_NAME_INVALID")
    error_of(requests.put(link["upload_URL"], data=b"abc", headers={"X-File-Name": "a", "X-File-Size": "4"},
                          timeout=30), 400, "ERR_FILE_SIZE_MISMATCH")
    big = b"x" * ((1 << 20) + 1)
    body = error_of(requests.put(link["upload_URL"], data=big, headers={"X-File-Name": "big"}, timeout=30), 413,
                    "ERR_TOO_LARGE")  # NGINX's own answer
    assert body["message"].endswith("limit of one upload (FILEDROP_MAX_CHUNK_SIZE)")
    error_of(requests.put(srv.url + path_of(link["upload_URL"]), data=big, headers={"X-File-Name": "big"},
                          timeout=30), 413, "ERR_CHUNK_TOO_LARGE")
    # Chunks of a bigger file, as the upload API takes them, to the same URL.
    r = presign(front.url, batch, 1)
    url1 = r.json()["upload_URL"]
    whole = b"0123456789" * 150_000  # 1.5 MB: two chunks of at most 1 MiB
    parts = [whole[:1 << 20], whole[1 << 20:]]
    answers = []
    for i, part in enumerate(parts):
        r = requests.put(url1, data=part, timeout=30, headers={
            "X-File-Name": "big.bin", "X-File-Size": str(len(whole)), "X-Upload-Type": "chunked",
            "X-Upload-Chunk-Index": str(i), "X-Upload-Chunk-Count": "2"})
        answers.append((r.status_code, r.json().get("uploadedChunkIds")))
    assert answers == [(202, [0]), (201, [0, 1])], answers
    manifest = requests.post(f"{front.url}/api/v1/upload/{batch}/execute/Batch.Manifest", timeout=30,
                             headers={**AUTH, "X-Batch-No-Drop": "true"}).json()
    assert [(f["name"], f["size"], f["sha256"]) for f in manifest["files"]] == [
        ("rows été.bin", 256000, hashlib.sha256(data).hexdigest()),
        ("big.bin", len(whole), hashlib.sha256(whole).hexdigest())]
    # The URL of file 0 is not one of file 1, nor a POST (a POST needs the key).
    r = requests.put(link["upload_URL"].replace(f"/{batch}/0?", f"/{batch}/1?"), data=b"x",
                     headers={"X-File-Name": "x"}, timeout=30)
    error_of(r, 403, "ERR_URL_INVALID")
    r = requests.post(link["upload_URL"], data=b"x", headers={"X-File-Name": "x"}, timeout=30)
    assert r.status_code == 401 and r.content == b""
    # Dropped: the URL still verifies, and the upload is refused as a POST with the key would be.
    assert requests.delete(f"{front.url}/api/v1/upload/{batch}", headers=AUTH, timeout=30).status_code == 204
    error_of(requests.put(link["upload_URL"], data=b"x", headers={"X-File-Name": "x"}, timeout=30), 404,
             "ERR_BATCH_NOT_FOUND")
    error_of(presign(front.url, batch, 0), 404, "ERR_BATCH_NOT_FOUND")
    log = srv.log_path.read_text(errors="replace")
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


async def test_presign_refusals(client, settings) -> None:
    batch = (await (await client.post("/api/v1/upload", headers=AUTH)).json())["batchId"]
    assert (await client.post(f"/api/v1/upload/{batch}/0/presign")).status == 401
    other = {"X-API-Key": OTHER_KEY}
    await assert_error(await client.post(f"/api/v1/upload/{batch}/0/presign", headers=other), 404,
                       "ERR_BATCH_NOT_FOUND")
    await assert_error(await client.post("/api/v1/upload/nosuch/0/presign", headers=AUTH), 404, "ERR_BATCH_NOT_FOUND")
    await assert_error(await client.post("/api/v1/upload/..x/0/presign", headers=AUTH), 400, "ERR_BATCH_ID_INVALID")
    await assert_error(await client.post(f"/api/v1/upload/{batch}/-1/presign", headers=AUTH), 400,
                       "ERR_FILE_IDX_INVALID")
    for bad in ("0", "abc", "1e3", str(7 * 86400 + 1)):
        r = await client.post(f"/api/v1/upload/{batch}/0/presign?expires_in={bad}", headers=AUTH)
        assert (await assert_error(r, 422, "ERR_FIELD_INVALID"))["field"] == "expires_in"
    r = await client.post(f"/api/v1/upload/{batch}/0/presign", headers=AUTH)
    link = await r.json()
    # Another key's batch id in the URL: the signature was made for the batch's own owner only.
    other_batch = (await (await client.post("/api/v1/upload", headers=other)).json())["batchId"]
    forged = path_of(link["upload_URL"]).replace(batch, other_batch)
    await assert_error(await client.put(forged, data=b"x", headers={"X-File-Name": "x"}), 403, "ERR_URL_INVALID")
    # The PUT with the key works as a POST does (a client may use either).
    r = await client.put(f"/api/v1/upload/{batch}/3", data=json.dumps([1]).encode(),
                         headers={**AUTH, "X-File-Name": "k.json"})
    assert r.status == 201, await r.text()


async def test_a_revoked_keys_urls_stop_with_it(client, settings) -> None:
    """A signed URL acts for the key that asked for it: revoked (`filedrop keys revoke`, another
    process), its URLs are refused as its own requests are, within the 5 s a lookup is trusted."""
    key = await client.app[KEYSTORE].create("carol")
    h = {"X-API-Key": key}
    batch = (await (await client.post("/api/v1/upload", headers=h)).json())["batchId"]
    links = [path_of((await (await client.post(f"/api/v1/upload/{batch}/{i}/presign", headers=h)).json())["upload_URL"])
             for i in (0, 1)]
    r = await client.put(links[0], data=b"before", headers={"X-File-Name": "a.txt"})
    assert r.status == 201, await r.text()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FILEDROP_")}
    env["FILEDROP_DATA_DIR"] = str(settings.data_dir)
    revoked = subprocess.run([sys.executable, "-m", "server", "keys", "revoke", "carol"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=60)
    assert revoked.returncode == 0, revoked.stderr

    async def key_refused() -> bool:
        return (await client.get("/api/limits", headers=h)).status == 401

    await async_wait_until(key_refused, timeout=15, interval=0.2, what="the revoked key refused")
    r = await client.put(links[1], data=b"after", headers={"X-File-Name": "b.txt"})
    body = await assert_error(r, 403, "ERR_URL_INVALID")
    assert "revoked" in body["message"]
    # Nothing landed: the batch holds the file sent before the revocation only.
    async with client.app[DATABASE].read() as s:
        idxs = (await s.scalars(select(BatchFile.file_idx).join(Batch).where(Batch.batch_id == batch))).all()
    assert idxs == [0]


def test_the_debug_log_holds_no_signing_secret_nor_key_hash(server_factory, tmp_path: Path) -> None:
    """FILEDROP_LOG_LEVEL=DEBUG (the README's way to see more) also showed aiosqlite's DEBUG
    lines: every statement with its parameters, so the secret of each URL-signing key and the
    SHA-256 of each API key that called (a URL's owner). With both, whoever reads the log could
    sign a URL for any owner, and a weak key's hash can be brute-forced."""
    srv = server_factory(log_level="DEBUG", workers="0")
    batch = requests.post(f"{srv.url}/api/v1/upload", headers=AUTH, timeout=30).json()["batchId"]
    r = presign(srv.url, batch, 0)
    assert r.status_code == 200, r.text
    r = requests.put(srv.url + path_of(r.json()["upload_URL"]), data=b"x", headers={"X-File-Name": "a"}, timeout=30)
    assert r.status_code == 201, r.text
    with sqlite3.connect(tmp_path / "srv" / "filedrop.sqlite3") as db:
        [(secret,)] = db.execute("SELECT secret FROM signing_keys").fetchall()
    log = srv.log_path.read_text()
    assert " DEBUG " in log  # the level took effect
    assert secret not in log
    assert hash_key(API_KEY) not in log
