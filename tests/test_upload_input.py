"""Upload input the issues found handled badly: an execute body nested too deep (was 500), a C1
control character in a file name (was accepted), a curl upload's form Content-Type taken as
the file's type, and the cap on chunks per file (was 1,000,000: answers grew with the file)."""

from __future__ import annotations

import os
import urllib.parse

import pytest

from server.app import create_app
from server.jsondoc import MAX_DEPTH
from tests.conftest import AUTH
from tests.support.uploads import Uploads, assert_error, sha256

pytestmark = pytest.mark.timeout(60)


async def test_deep_nesting_in_an_execute_body_is_422_naming_the_body(client) -> None:
    up = Uploads(client)
    batch = await up.create()
    await up.upload(batch, 0, b"kept")
    deep = b'{"params": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    h = {**AUTH, "Content-Type": "application/json"}
    for path in (up.url(f"/{batch}/execute/Batch.Manifest"), "/site/automation/batch/execute"):
        body = await assert_error(await client.post(path, data=deep, headers=h), 422, "ERR_FIELD_INVALID")
        assert body["field"] == "body" and f"more than {MAX_DEPTH} levels" in body["message"]
    lone = b'{"params": {"x": "\\ud800"}}'
    body = await assert_error(await client.post(up.url(f"/{batch}/execute/Batch.Manifest"), data=lone, headers=h),
                              422, "ERR_FIELD_INVALID")
    assert body["field"] == "body"
    # Refused before anything ran: the batch is still there, its file too.
    assert (await up.manifest(batch))["files"][0]["sha256"] == sha256(b"kept")


@pytest.mark.parametrize(("name", "content_type", "file_type", "stored"), [
    ("report.pdf", "application/x-www-form-urlencoded", None, "application/pdf"),  # curl --data-binary
    ("notes.txt", "application/x-www-form-urlencoded", None, "text/plain"),
    ("no-extension", "application/x-www-form-urlencoded", None, "application/octet-stream"),
    ("photo", "image/png", None, "image/png"),  # a type the client chose on purpose
    ("report.pdf", "multipart/form-data; boundary=x", None, "application/pdf"),
    ("report.pdf", "application/x-www-form-urlencoded", "application/x-custom", "application/x-custom"),
])
async def test_the_file_type_comes_from_x_file_type_then_the_name(client, name, content_type, file_type,
                                                                   stored) -> None:
    up = Uploads(client)
    batch = await up.create()
    h = {**AUTH, "X-File-Name": urllib.parse.quote(name), "Content-Type": content_type}
    if file_type is not None:
        h["X-File-Type"] = file_type
    r = await client.post(up.url(f"/{batch}/0"), data=b"%PDF-1.4 ...", headers=h)
    assert r.status == 201, await r.text()
    info = await (await up.info(batch, 0)).json()
    assert info["mimetype"] == stored


async def test_chunks_per_file_are_capped_by_a_setting(aiohttp_client, settings) -> None:
    up = Uploads(await aiohttp_client(create_app(settings.replace(max_chunks_per_file=4))))
    batch = await up.create()
    body = await assert_error(await up.post(batch, 0, b"a", chunk=(0, 5), size=5), 413, "ERR_FILE_TOO_MANY_CHUNKS")
    assert "FILEDROP_MAX_CHUNKS_PER_FILE" in body["message"] and "4" in body["message"]
    data = os.urandom(4 * 100)
    answer = await up.upload(batch, 0, data, chunk_size=100)  # four chunks: at the cap, fine
    assert answer["uploadedChunkIds"] == [0, 1, 2, 3]
    assert (await up.manifest(batch))["files"][0]["sha256"] == sha256(data)


async def test_the_default_cap_is_s3s_10000(client) -> None:
    up = Uploads(client)
    batch = await up.create()
    r = await up.post(batch, 0, b"a", chunk=(0, 10_001), size=20_000)
    await assert_error(r, 413, "ERR_FILE_TOO_MANY_CHUNKS")
    r = await up.post(batch, 0, b"a", chunk=(0, 10_000), size=20_000)
    assert r.status == 202 and (await r.json())["uploadedChunkIds"] == [0]


async def test_a_file_of_many_chunks_lists_every_id_in_every_answer(client) -> None:
    """The nuxeo client replaces its list of ids from every answer: each answer lists them all,
    from the bitmap the row keeps (one chunk's record does not grow with the file)."""
    up = Uploads(client)
    batch = await up.create()
    n = 600
    data = os.urandom(n)
    for i in range(n):
        r = await up.post(batch, 0, data[i:i + 1], chunk=(i, n), size=n)
        body = await r.json()
        assert r.status == (201 if i == n - 1 else 202)
        assert body["uploadedChunkIds"] == list(range(i + 1))
    assert (await up.manifest(batch))["files"][0]["sha256"] == sha256(data)


async def test_empty_uploads_one_after_another_are_each_answered(client) -> None:
    """Every Content-Length: 0 request shares aiohttp's one empty body; once any request has read
    it, it answers (b"", True) for ever. Reading that as "end of an HTTP chunk, more to come" spun
    the event loop at 100% CPU on the second empty upload (found by schemathesis): each must be
    answered, on both forms."""
    up = Uploads(client)
    batch = await up.create()
    for idx in range(3):
        assert (await up.upload(batch, idx, b"", name=f"empty{idx}"))["uploadedSize"] == "0"
    legacy = {**AUTH, "X-Batch-Id": "legacy-empty", "X-File-Idx": "0", "X-File-Name": "e", "X-File-Size": "0"}
    for _ in range(2):
        r = await client.post("/site/automation/batch/upload", data=b"", headers=legacy)
        assert r.status == 200, await r.text()
    files = (await up.manifest(batch))["files"]
    assert [f["sha256"] for f in files] == [sha256(b"")] * 3
