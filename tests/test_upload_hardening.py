"""One test per rejected upload input: the right status, a JSON error from the catalog, and the
batch intact afterwards (its good file still there, nothing half-written on disk)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import socket
import threading
from collections.abc import AsyncIterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from server.app import create_app
from server.auth import hash_key
from server.keys import UPLOADS
from tests.conftest import AUTH
from tests.support.disk_state import batch_counts
from tests.support.uploads import Uploads, assert_error, holds, sha256, upload_headers, upload_tree
from tests.support.waiting import async_wait_until

pytestmark = [pytest.mark.timeout(60), pytest.mark.engines]
GOOD = b"the good file"


@pytest.fixture
async def up(client) -> Uploads:
    return Uploads(client)


async def batch_with_good_file(up: Uploads) -> str:
    batch = await up.create()
    await up.upload(batch, 0, GOOD, "good.txt")
    return batch


async def assert_intact(up: Uploads, batch: str, data_dir: Path, extra: int = 0) -> None:
    files = (await up.manifest(batch))["files"]
    assert files[0] == {"fileIdx": "0", "name": "good.txt", "size": len(GOOD), "sha256": sha256(GOOD)}
    assert len(files) == 1 + extra
    assert not [p for p in upload_tree(data_dir) if os.path.basename(p).startswith(".")], "temp files left"


async def legacy(client, batch_id: str, data: bytes = b"x", idx: str = "0", **headers: str):  # type: ignore[no-untyped-def]
    h = {**upload_headers("l.txt", len(data)), "X-Batch-Id": batch_id, "X-File-Idx": idx, **headers}
    return await client.post("/site/automation/batch/upload", data=data, headers=h)


@pytest.mark.parametrize("bad", ["a/b", "../etc", "..", "a..b", ".hidden", "x" * 129, "sp ace", "é"])
async def test_legacy_batch_id_rejected(client, up, settings, bad) -> None:
    batch = await batch_with_good_file(up)
    r = await legacy(client, bad)
    await assert_error(r, 400, "ERR_BATCH_ID_INVALID")
    await assert_intact(up, batch, settings.data_dir)


async def test_legacy_batch_id_of_128_chars_is_fine(client) -> None:
    r = await legacy(client, "b" * 128)
    assert r.status == 200


@pytest.mark.parametrize("bad", ["a%2Fb", "a%00b", "a..b", "x" * 129, "%2E%2E"])
async def test_rest_batch_id_rejected(client, up, settings, bad) -> None:
    batch = await batch_with_good_file(up)
    for method, path in [("POST", f"/{bad}/0"), ("GET", f"/{bad}"), ("GET", f"/{bad}/0"), ("DELETE", f"/{bad}")]:
        r = await client.request(method, up.url(path), data=b"x", headers=upload_headers("n", 1))
        body = await assert_error(r, 400 if bad != "%2E%2E" else r.status)
        assert body["code"] in ("ERR_BATCH_ID_INVALID", "ERR_NOT_FOUND"), body
        if bad != "%2E%2E":
            assert body["code"] == "ERR_BATCH_ID_INVALID"
    await assert_intact(up, batch, settings.data_dir)


async def test_nul_in_execute_batch_id_rejected(client, up, settings) -> None:
    batch = await batch_with_good_file(up)
    r = await client.post("/site/automation/batch/execute", headers=AUTH,
                          json={"params": {"operationId": "Batch.Manifest", "batchId": batch + "\x00"}})
    await assert_error(r, 400, "ERR_BATCH_ID_INVALID")
    await assert_intact(up, batch, settings.data_dir)


@pytest.mark.parametrize("bad", ["-1", "abc", "1.5", "", " ", "0x1", "1e3", "99999999999"])
async def test_file_idx_rejected(client, up, settings, bad) -> None:
    batch = await batch_with_good_file(up)
    await assert_error(await legacy(client, batch, idx=bad), 400, "ERR_FILE_IDX_INVALID")
    if bad.strip():
        await assert_error(await up.post(batch, bad, b"x"), 400, "ERR_FILE_IDX_INVALID")  # type: ignore[arg-type]
    await assert_intact(up, batch, settings.data_dir)


async def test_chunk_index_not_below_count(up, settings) -> None:
    batch = await batch_with_good_file(up)
    for idx, count in [(3, 3), (4, 3), (0, 0)]:
        r = await up.post(batch, 1, b"abc", chunk=(idx, count), size=9)
        await assert_error(r, 400, "ERR_CHUNK_INDEX_INVALID" if count else "ERR_CHUNK_COUNT_INVALID")
    for headers in ({"X-Upload-Chunk-Index": "x"}, {"X-Upload-Chunk-Count": "-2"}, {"X-Upload-Type": "resumable"}):
        r = await up.post(batch, 1, b"abc", chunk=(0, 3), size=9, **headers)
        await assert_error(r, 400)
    await assert_intact(up, batch, settings.data_dir)


async def test_chunk_count_changed(up, settings) -> None:
    batch = await batch_with_good_file(up)
    assert (await up.post(batch, 1, b"abc", chunk=(0, 3), size=9)).status == 202
    await assert_error(await up.post(batch, 1, b"abc", chunk=(1, 4), size=9), 400, "ERR_CHUNK_COUNT_CHANGED")
    await assert_error(await up.post(batch, 1, b"abc", chunk=(1, 3), size=10), 400, "ERR_FILE_SIZE_CHANGED")
    # The file keeps its first declaration and completes with it.
    assert (await up.post(batch, 1, b"def", chunk=(1, 3), size=9)).status == 202
    assert (await up.post(batch, 1, b"ghi", chunk=(2, 3), size=9)).status == 201
    await assert_intact(up, batch, settings.data_dir, extra=1)
    assert (await up.manifest(batch))["files"][1]["sha256"] == sha256(b"abcdefghi")


async def _trickle(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), 4):
        yield data[i:i + 4]


async def test_body_shorter_or_longer_than_declared(client, up, settings) -> None:
    batch = await batch_with_good_file(up)
    # Content-Length disagrees with X-File-Size: refused before a byte is read.
    await assert_error(await up.post(batch, 1, b"12345", size=6), 400, "ERR_FILE_SIZE_MISMATCH")
    await assert_error(await up.post(batch, 1, b"12345", size=4), 400, "ERR_FILE_SIZE_MISMATCH")
    # No Content-Length (chunked transfer coding): found out while streaming.
    for body in (b"123", b"1234567890"):
        r = await client.post(up.url(f"/{batch}/1"), data=_trickle(body), headers=upload_headers("s", 6))
        await assert_error(r, 400, "ERR_FILE_SIZE_MISMATCH")
    # Chunks that add up to more, or (with the last one) to less, than X-File-Size.
    assert (await up.post(batch, 2, b"aaaa", chunk=(0, 3), size=10)).status == 202
    await assert_error(await up.post(batch, 2, b"bbbbbbb", chunk=(1, 3), size=10), 400, "ERR_FILE_SIZE_MISMATCH")
    assert (await up.post(batch, 2, b"bbbb", chunk=(1, 3), size=10)).status == 202
    await assert_error(await up.post(batch, 2, b"c", chunk=(2, 3), size=10), 400, "ERR_FILE_SIZE_MISMATCH")
    info = await (await up.info(batch, 2)).json()
    assert info["uploadedChunkIds"] == [0, 1] and info["complete"] is False
    assert (await up.post(batch, 2, b"cc", chunk=(2, 3), size=10)).status == 201
    await assert_intact(up, batch, settings.data_dir, extra=1)
    assert (await up.manifest(batch))["files"][1]["sha256"] == sha256(b"aaaabbbbcc")


async def test_chunks_stored_in_another_chunk_size_say_how_to_recover(client, up, settings) -> None:
    """A client resuming with another chunk size (the nuxeo client keeps the server's chunk count
    but seeks by its own size) stores chunks that cannot add up to X-File-Size; a resend of a
    stored chunk is a repeat, so only removing the file helps, and the 400 says so."""
    batch = await batch_with_good_file(up)
    assert (await up.post(batch, 1, b"aaaa", chunk=(0, 3), size=10)).status == 202
    assert (await up.post(batch, 1, b"bb", chunk=(1, 3), size=10)).status == 202  # another chunking: stored
    r = await up.post(batch, 1, b"cc", chunk=(2, 3), size=10)
    await assert_error(r, 400, "ERR_FILE_SIZE_MISMATCH")
    message = (await r.json())["message"]
    assert "add up to 8 bytes, X-File-Size is 10" in message and "remove the file (DELETE)" in message, message
    assert (await up.post(batch, 1, b"bbbb", chunk=(1, 3), size=10)).status == 202  # a repeat: changes nothing
    await assert_error(await up.post(batch, 1, b"cc", chunk=(2, 3), size=10), 400, "ERR_FILE_SIZE_MISMATCH")
    assert (await client.delete(up.url(f"/{batch}/1"), headers=up.auth)).status == 204
    for i, part in enumerate((b"aaaa", b"bbbb", b"cc")):
        assert (await up.post(batch, 1, part, chunk=(i, 3), size=10)).status == (201 if i == 2 else 202)
    await assert_intact(up, batch, settings.data_dir, extra=1)
    assert (await up.manifest(batch))["files"][1]["sha256"] == sha256(b"aaaabbbbcc")


MIB = 1 << 20


@pytest.mark.parametrize("framing", ["content-length", "chunked"], ids=["in-place", "on-its-own"])
async def test_client_disconnect_mid_chunk_records_nothing_and_retry_works(client, up, settings, framing) -> None:
    """A chunk cut off mid-body records nothing and leaves no temp; sent again, it completes
    the file. With Content-Length it is written in place (in ``partial``); without one it is
    received on its own (a ``.part`` temp, removed)."""
    batch = await batch_with_good_file(up)
    data = os.urandom(3 * MIB)
    first, second = data[:3 * MIB // 2], data[3 * MIB // 2:]
    assert (await up.post(batch, 1, first, chunk=(0, 2), size=len(data))).status == 202
    fields = [f"POST /api/v1/upload/{batch}/1 HTTP/1.1", "Host: x", f"X-API-Key: {AUTH['X-API-Key']}",
              "X-File-Name: d.bin", f"X-File-Size: {len(data)}", "X-Upload-Type: chunked",
              "X-Upload-Chunk-Index: 1", "X-Upload-Chunk-Count: 2"]
    sent = second[:MIB + 4096]  # more than one write block: some of it reaches the disk
    if framing == "content-length":
        wire = "\r\n".join([*fields, f"Content-Length: {len(second)}", "", ""]).encode() + sent
    else:
        wire = "\r\n".join([*fields, "Transfer-Encoding: chunked", "", ""]).encode() + \
            f"{len(sent):x}\r\n".encode() + sent + b"\r\n"
    loop = asyncio.get_running_loop()

    def temps() -> list[str]:
        return [p for p in upload_tree(settings.data_dir) if p.endswith(".part")]

    async def on_disk() -> bool:
        if framing == "chunked":
            return bool(temps())
        partial = [settings.uploads_dir / p for p in upload_tree(settings.data_dir) if p.endswith("/partial")]
        return bool(partial) and holds(partial[0], len(first), second[:MIB])

    async def no_temps() -> bool:
        return not temps()

    with socket.create_connection((client.server.host, client.server.port)) as sock:
        await loop.run_in_executor(None, sock.sendall, wire)
        await async_wait_until(on_disk, timeout=10, what="the first megabyte of the cut-off chunk on disk")
    await async_wait_until(no_temps, timeout=10, what="the temp file of the broken chunk removed")
    info = await (await up.info(batch, 1)).json()
    assert info["uploadedChunkIds"] == [0]
    r = await up.post(batch, 1, second, chunk=(1, 2), size=len(data))
    assert r.status == 201 and (await r.json())["uploadedChunkIds"] == [0, 1]
    await assert_intact(up, batch, settings.data_dir, extra=1)
    assert (await up.manifest(batch))["files"][1]["sha256"] == sha256(data)


@pytest.mark.parametrize("removal", ["file", "batch"])
async def test_a_chunk_whose_file_goes_while_it_arrives_leaves_nothing_on_disk(client, up, settings,
                                                                                removal) -> None:
    """A chunk of the in-place layout whose file (or batch) is deleted while its body arrives is
    answered 404 and writes nothing: its ``partial`` and folders are not made again. (A body of
    up to 1 MiB is written once it is all read: after the delete.)"""
    batch = await batch_with_good_file(up)
    data = os.urandom(8000)
    assert (await up.post(batch, 1, data[:4000], chunk=(0, 2), size=8000)).status == 202
    held = _HeldUpload(client, batch, 1, 2, len(data), data[4000:], head=2000, file_idx=1)
    sending = asyncio.create_task(held.send())
    placing = client.app[UPLOADS].placing

    async def mid_body() -> bool:  # the request holds chunk 1's place: it reads its body now
        return bool(placing._writing)

    await async_wait_until(mid_body, timeout=10, what="chunk 1 taking its place in the file")
    path = f"/{batch}/1" if removal == "file" else f"/{batch}"
    assert (await client.delete(up.url(path), headers=AUTH)).status == 204
    held.release.set()
    assert await sending == 404
    tree = upload_tree(settings.data_dir)
    assert not [p for p in tree if "partial" in p or ".part" in p], tree
    if removal == "batch":
        assert tree == []
    else:
        assert (await up.manifest(batch))["files"] == [
            {"fileIdx": "0", "name": "good.txt", "size": len(GOOD), "sha256": sha256(GOOD)}]


async def test_same_chunk_twice_is_not_an_error(up, settings) -> None:
    batch = await batch_with_good_file(up)
    for _ in range(3):
        r = await up.post(batch, 1, b"abc", chunk=(0, 2), size=6)
        assert r.status == 202 and (await r.json())["uploadedChunkIds"] == [0]
    await up.post(batch, 1, b"def", chunk=(1, 2), size=6)
    await assert_intact(up, batch, settings.data_dir, extra=1)


@pytest.mark.parametrize("name", ["a%2Fb.txt", "a/b.txt", "..%2F..%2Fetc%2Fpasswd", "a%5Cb.txt", "a\\b.txt",
                                  "a%00b.txt", "%0A", "x" * 1000, "%FF%FE.txt", "%C3%28", "", "..", ".",
                                  "a%C2%85b", "a%C2%9Fb", "a%7Fb"])
async def test_bad_file_names_rejected(client, up, settings, name) -> None:
    batch = await batch_with_good_file(up)
    h = {**upload_headers("n", 1), "X-File-Name": name}
    r = await client.post(up.url(f"/{batch}/1"), data=b"x", headers=h)
    await assert_error(r, 400, "ERR_FILE_NAME_INVALID")
    await assert_intact(up, batch, settings.data_dir)


async def test_unicode_and_odd_names_are_only_data(up, settings) -> None:
    batch = await batch_with_good_file(up)
    names = ["日本語 ファイル.pdf", "x" * 255, "100% sure?.txt", "<script>.html", "-rf ~"]
    for i, name in enumerate(names, start=1):
        await up.upload(batch, i, b"d", name)
    files = (await up.manifest(batch))["files"]
    assert [f["name"] for f in files[1:]] == names
    assert all(re.fullmatch(r"\d+/\d+\.data", p) for p in upload_tree(settings.data_dir))


@pytest.mark.parametrize(("content_type", "stored"), [
    ("a/" + "b" * 300, "application/octet-stream"),  # over 255 characters: passed over
    ("a/" + "b" * 253, "a/" + "b" * 253),  # 255: kept
])
async def test_a_content_type_too_long_to_store_is_passed_over(client, up, settings, content_type, stored) -> None:
    """Without X-File-Type, a Content-Type longer than a file's type may be (255 characters,
    as X-File-Type) is passed over as one that is no media type is: it frames the body, the
    client did not say what the file is. It reached the file row's INSERT: on PostgreSQL a
    DataError, 500 with a traceback for every request of its group."""
    batch = await batch_with_good_file(up)
    for idx, chunk in ((1, None), (2, (0, 2))):  # a whole file; a file's first chunk
        h = upload_headers("x", 2, chunk=chunk, mimetype=content_type)
        del h["X-File-Type"]
        r = await client.post(up.url(f"/{batch}/{idx}"), data=b"xy" if chunk is None else b"x", headers=h)
        assert r.status == (201 if chunk is None else 202), await r.text()
        assert (await (await up.info(batch, idx)).json())["mimetype"] == stored
    await assert_intact(up, batch, settings.data_dir, extra=2)


async def test_a_row_the_database_refuses_fails_only_its_own_request(aiohttp_client, settings, monkeypatch) -> None:
    """A request whose file row a column cannot hold (a chunk count past PostgreSQL's integer:
    FILEDROP_MAX_CHUNKS_PER_FILE set that high lets it through) fails alone: the others of its
    group are recorded (they got its 500). SQLite stores the count."""
    client = await aiohttp_client(create_app(settings.replace(max_chunks_per_file=1 << 31)))
    up = Uploads(client)
    batch = await batch_with_good_file(up)
    service = client.app[UPLOADS]
    records, real = service.recorder.records, service.db.write_sync
    gated = threading.Event()

    @contextmanager
    def write_sync():  # type: ignore[no-untyped-def]
        if not gated.is_set():  # the first group's: the next two requests queue meanwhile, as one group
            gated.set()
            with records.cv:
                records.cv.wait_for(lambda: len(records.queue) >= 2, timeout=10)
        with real() as conn:
            yield conn

    monkeypatch.setattr(service.db, "write_sync", write_sync)
    first = asyncio.create_task(up.post(batch, 1, b"first"))
    assert await asyncio.to_thread(gated.wait, 10)
    refused, other = await asyncio.wait_for(asyncio.gather(
        up.post(batch, 2, b"x", chunk=(0, 1 << 31), size=1 << 31), up.post(batch, 3, b"other")), timeout=15)
    assert (await first).status == 201
    assert other.status == 201, await other.text()
    files = {f["fileIdx"]: f for f in (await up.manifest(batch))["files"]}
    assert files["1"]["sha256"] == sha256(b"first") and files["3"]["sha256"] == sha256(b"other")
    if settings.database_url:
        await assert_error(refused, 500, "ERR_INTERNAL")
        assert "2" not in files
    else:
        assert refused.status == 202 and files["2"]["complete"] is False
    await assert_intact(up, batch, settings.data_dir, extra=len(files) - 1)


async def test_unknown_batch(client, up) -> None:
    unknown = "f" * 32
    await assert_error(await up.post(unknown, 0, b"x"), 404, "ERR_BATCH_NOT_FOUND")
    await assert_error(await up.info(unknown), 404, "ERR_BATCH_NOT_FOUND")
    await assert_error(await up.info(unknown, 0), 404, "ERR_BATCH_NOT_FOUND")
    await assert_error(await client.delete(up.url(f"/{unknown}"), headers=AUTH), 404, "ERR_BATCH_NOT_FOUND")
    await assert_error(await client.get(f"/site/automation/batch/drop/{unknown}", headers=AUTH), 404)
    r = await client.post(up.url(f"/{unknown}/execute/Batch.Manifest"), headers=AUTH)
    await assert_error(r, 404, "ERR_BATCH_NOT_FOUND")


async def test_unknown_file_is_404_not_a_resume_state(up) -> None:
    batch = await batch_with_good_file(up)
    await assert_error(await up.info(batch, 7), 404, "ERR_FILE_NOT_FOUND")


@pytest.mark.parametrize("how", ["rest-drop", "legacy-drop", "execute"])
async def test_upload_into_closed_batch(client, up, settings, how) -> None:
    batch = await batch_with_good_file(up)
    if how == "rest-drop":
        assert (await client.delete(up.url(f"/{batch}"), headers=AUTH)).status == 204
    elif how == "legacy-drop":
        assert (await client.get(f"/site/automation/batch/drop/{batch}", headers=AUTH)).status == 200
    else:
        await up.manifest(batch, keep=False)
    await assert_error(await up.post(batch, 1, b"late"), 404, "ERR_BATCH_NOT_FOUND")
    await assert_error(await legacy(client, batch), 404, "ERR_BATCH_NOT_FOUND")
    await assert_error(await up.post(batch, 1, b"late", chunk=(0, 2), size=8), 404, "ERR_BATCH_NOT_FOUND")
    assert upload_tree(settings.data_dir) == []


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'{"params": [1]}', b'{"params": {}, "context": 3}',
                                  b"\xff\xfe",
                                  # falsy non-objects were read as {}: the operation ran and dropped the batch
                                  b'{"params": []}', b'{"params": 0}', b'{"params": ""}', b'{"params": false}',
                                  b'{"context": []}'])
async def test_malformed_execute_json(client, up, settings, body) -> None:
    batch = await batch_with_good_file(up)
    h = {**AUTH, "Content-Type": "application/json"}
    r = await client.post(up.url(f"/{batch}/execute/Batch.Manifest"), data=body, headers=h)
    await assert_error(r, 400, "ERR_REQUEST_MALFORMED")
    r = await client.post("/site/automation/batch/execute", data=body, headers=h)
    await assert_error(r, 400, "ERR_REQUEST_MALFORMED")
    r = await client.post("/site/automation/batch/execute", json={"params": {"batchId": batch}}, headers=h)
    await assert_error(r, 400, "ERR_REQUEST_MALFORMED")
    await assert_intact(up, batch, settings.data_dir)


async def test_missing_headers(client, up, settings) -> None:
    batch = await batch_with_good_file(up)
    h = upload_headers("n", 3)
    del h["X-File-Name"]
    await assert_error(await client.post(up.url(f"/{batch}/1"), data=b"abc", headers=h), 400, "ERR_FILE_NAME_INVALID")
    h = upload_headers("n", 3, chunk=(0, 2))
    del h["X-File-Size"]
    await assert_error(await client.post(up.url(f"/{batch}/1"), data=b"abc", headers=h), 400, "ERR_FILE_SIZE_MISSING")
    h = upload_headers("n", 3)
    h["X-File-Size"] = "3 bytes"
    await assert_error(await client.post(up.url(f"/{batch}/1"), data=b"abc", headers=h), 400, "ERR_FILE_SIZE_INVALID")
    h = {**upload_headers("n", 3), "X-File-Idx": "1"}
    await assert_error(await client.post("/site/automation/batch/upload", data=b"abc", headers=h), 400,
                       "ERR_BATCH_ID_INVALID")
    await assert_intact(up, batch, settings.data_dir)


# -- limits -------------------------------------------------------------------------------------
@pytest.fixture
async def limited(aiohttp_client, settings):  # type: ignore[no-untyped-def]
    s = settings.replace(max_file_size=10_000, max_chunk_size=4_000, max_files_per_batch=3, max_batch_bytes=12_000)
    return Uploads(await aiohttp_client(create_app(s)))


async def test_limits_answer_413_and_leave_nothing(limited, settings) -> None:
    up = limited
    batch = await batch_with_good_file(up)
    await assert_error(await up.post(batch, 1, b"x" * 10, chunk=(0, 3), size=10_001), 413, "ERR_FILE_TOO_LARGE")
    await assert_error(await up.post(batch, 1, b"x" * 4_001), 413, "ERR_CHUNK_TOO_LARGE")
    await assert_error(await up.post(batch, 1, b"x" * 4_001, chunk=(0, 2), size=8_000), 413, "ERR_CHUNK_TOO_LARGE")
    # Over the chunk limit without a Content-Length: stopped while streaming, the partial deleted.
    r = await up.client.post(up.url(f"/{batch}/1"), data=_trickle(b"x" * 4_100),
                             headers=upload_headers("t", 9_000, chunk=(0, 3)))
    await assert_error(r, 413, "ERR_CHUNK_TOO_LARGE")
    await up.upload(batch, 1, b"y" * 3_000, "one")
    await assert_error(await up.post(batch, 2, b"z", chunk=(0, 3), size=9_001), 413, "ERR_BATCH_TOO_LARGE")
    await up.upload(batch, 2, b"z" * 10)
    await assert_error(await up.post(batch, 3, b"w"), 413, "ERR_BATCH_TOO_MANY_FILES")
    files = (await up.manifest(batch))["files"]
    assert [f["fileIdx"] for f in files] == ["0", "1", "2"]
    assert not [p for p in upload_tree(settings.data_dir) if "/chunks/" in p or p.endswith(".part")]


async def test_a_batch_counts_its_files_whatever_adds_or_removes_them(limited, settings) -> None:
    """The batch limits read the counts on the batch row (kept by triggers): whole files, chunks,
    a replaced file, a removed one, a dropped batch all keep them equal to the file rows, and a
    slot freed by a removal can be used again."""
    up = limited
    batch = await up.create()
    await up.upload(batch, 0, b"a" * 100)
    await up.upload(batch, 1, b"b" * 3_000, chunk_size=1_000)
    r = await up.post(batch, 2, b"c" * 1_000, chunk=(0, 3), size=3_000)  # a file under way
    assert r.status == 202, await r.text()
    await assert_error(await up.post(batch, 3, b"w"), 413, "ERR_BATCH_TOO_MANY_FILES")
    await up.upload(batch, 0, b"A" * 500)  # a whole file replaces a complete one
    counts = batch_counts(settings)
    assert counts[batch] == (3, 6_500, 3, 6_500), counts
    r = await up.client.delete(up.url(f"/{batch}/1"), headers=AUTH)
    assert r.status == 204, await r.text()
    assert batch_counts(settings)[batch] == (2, 3_500, 2, 3_500)
    await up.upload(batch, 3, b"d" * 8_500, chunk_size=3_000)  # the freed slot, bytes up to the limit exactly
    await assert_error(await up.post(batch, 4, b"e"), 413, "ERR_BATCH_TOO_MANY_FILES")
    other = await up.create()
    await up.upload(other, 0, b"f" * 10)
    assert batch_counts(settings)[batch] == (3, 12_000, 3, 12_000)
    r = await up.client.delete(up.url(f"/{batch}"), headers=AUTH)
    assert r.status == 204, await r.text()
    counts = batch_counts(settings)
    assert counts[batch] == (0, 0, 0, 0) and counts[other] == (1, 10, 1, 10), counts


async def test_a_refused_replacement_leaves_the_file_it_would_replace(limited, settings) -> None:
    """A whole file sent onto a complete one replaces it, as in Nuxeo; when the new one breaks a
    limit the answer is 413 and the old file stays, bytes, row and the batch's counts."""
    up = limited
    batch = await up.create()
    r = await up.post(batch, 0, b"a" * 4_000, chunk=(0, 3), size=10_000)  # 10,000 declared
    assert r.status == 202, await r.text()
    precious = os.urandom(1_500)
    await up.upload(batch, 1, precious, "precious.txt")  # 11,500 of 12,000
    before = batch_counts(settings)[batch]
    r = await up.post(batch, 1, b"r" * 2_001, "replacement.txt")  # 12,001 once it replaced the 1,500
    body = await assert_error(r, 413, "ERR_BATCH_TOO_LARGE")
    assert "FILEDROP_MAX_BATCH_BYTES" in body["message"]
    info = await (await up.info(batch, 1)).json()
    assert info["name"] == "precious.txt" and info["size"] == 1_500
    assert (await up.manifest(batch, 1))["files"][0]["sha256"] == sha256(precious)
    assert batch_counts(settings)[batch] == before
    await up.upload(batch, 1, b"r" * 2_000, "replacement.txt")  # at the limit exactly: replaced
    assert (await up.manifest(batch, 1))["files"][0] == {"fileIdx": "1", "name": "replacement.txt", "size": 2_000,
                                                           "sha256": sha256(b"r" * 2_000)}
    assert batch_counts(settings)[batch] == (2, 12_000, 2, 12_000)


async def test_low_disk_answers_507(aiohttp_client, settings) -> None:
    up = Uploads(await aiohttp_client(create_app(settings)))
    batch = await batch_with_good_file(up)
    full = Uploads(await aiohttp_client(create_app(settings.replace(min_free_disk=1 << 60))))
    await assert_error(await full.post(batch, 1, b"x"), 507, "ERR_DISK_FULL")
    await assert_intact(up, batch, settings.data_dir)


async def test_client_disconnect_mid_whole_file_records_nothing(client, up, settings) -> None:
    batch = await batch_with_good_file(up)
    size = 3 * MIB  # declared over one write block: its temp exists from the start
    head = "\r\n".join([
        f"POST /api/v1/upload/{batch}/1 HTTP/1.1", "Host: x", f"X-API-Key: {AUTH['X-API-Key']}",
        "X-File-Name: w.bin", f"X-File-Size: {size}", f"Content-Length: {size}", "", ""]).encode()
    loop = asyncio.get_running_loop()

    def temps() -> list[str]:
        return [p for p in upload_tree(settings.data_dir) if p.endswith(".part")]

    async def temp_present() -> bool:
        return bool(temps())

    async def temp_gone() -> bool:
        return not temps()

    with socket.create_connection((client.server.host, client.server.port)) as sock:
        await loop.run_in_executor(None, sock.sendall, head + b"w" * (size // 2))
        await async_wait_until(temp_present, timeout=10, what="the whole file's temp")
    await async_wait_until(temp_gone, timeout=10, what="the temp of the broken upload removed")
    await assert_error(await up.info(batch, 1), 404, "ERR_FILE_NOT_FOUND")
    await up.upload(batch, 1, b"w" * size, "w.bin")
    await assert_intact(up, batch, settings.data_dir, extra=1)


# -- one chunk sent twice at once, with different bytes -----------------------------------------
class _HeldUpload:
    """One chunk's request over a raw socket: the headers and the body's first ``head`` bytes
    at once, the rest only when ``release`` is set (a client stalled mid-body)."""

    def __init__(self, client, batch: str, idx: int, count: int, size: int, body: bytes, head: int,  # type: ignore[no-untyped-def]
                 file_idx: int = 0) -> None:
        self.client, self.body, self.head = client, body, head
        h = {**upload_headers("dup.bin", size, chunk=(idx, count)), "Content-Length": str(len(body))}
        self.request = (f"POST /api/v1/upload/{batch}/{file_idx} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                        + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n").encode()
        self.release = asyncio.Event()

    async def send(self) -> int:
        reader, writer = await asyncio.open_connection(self.client.server.host, self.client.server.port)
        try:
            writer.write(self.request + self.body[:self.head])
            await writer.drain()
            await asyncio.wait_for(self.release.wait(), timeout=30)
            writer.write(self.body[self.head:])
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), timeout=30)
        finally:
            writer.close()
        return int(answer.split(b" ", 2)[1])


@pytest.mark.parametrize("stalled_first", [True, False])
async def test_a_chunk_sent_twice_at_once_with_other_bytes_leaves_a_file_that_matches_its_hash(
        client, settings, stalled_first: bool) -> None:
    """A buggy client sends chunk 1 twice at once, each copy with other bytes, one copy stalled
    mid-body while the other and the last chunk complete the file. One copy is kept whole: the
    complete file's bytes are what its SHA-256 says, and nothing writes into it afterwards."""
    up = Uploads(client)
    batch = await up.create()
    stride, count = 4 * MIB, 3  # bodies are read 1 MiB at a time: a stalled copy has 2 MiB written
    first, last = os.urandom(stride), os.urandom(stride // 2)
    a, b = b"A" * stride, b"B" * stride
    size = 2 * stride + len(last)
    assert (await up.post(batch, 0, first, chunk=(0, count), size=size)).status == 202
    stalled = _HeldUpload(client, batch, 1, count, size, b, head=2 * MIB)
    other = _HeldUpload(client, batch, 1, count, size, a, head=2 * MIB)
    order = (stalled, other) if stalled_first else (other, stalled)
    tasks = []
    for held in order:
        tasks.append(asyncio.create_task(held.send()))
        head = held.body[:MIB]

        async def written(head: bytes = head) -> bool:  # its first bytes are on disk, in place or on their own
            return any(holds(settings.uploads_dir / p, 0, head) or holds(settings.uploads_dir / p, stride, head)
                       for p in upload_tree(settings.data_dir))

        await async_wait_until(written, timeout=10, what="the copy's first bytes written")
    other.release.set()
    assert await tasks[order.index(other)] == 202
    # The last chunk, then the stalled copy goes on: a copy written in place is waited for by the
    # file's completion; one stored on its own is a repeat once the file is complete.
    completing = asyncio.create_task(up.post(batch, 0, last, chunk=(2, count), size=size))
    stalled.release.set()
    r = await completing
    assert r.status == 201, await r.text()
    assert await tasks[order.index(stalled)] in (201, 202)
    await client.app[UPLOADS].settle(batch)
    info = await client.app[UPLOADS].open_file(hash_key(AUTH["X-API-Key"]), batch, 0)
    on_disk = info.path.read_bytes()
    assert hashlib.sha256(on_disk).hexdigest() == info.sha256
    assert on_disk in (first + a + last, first + b + last)


# -- a repeat under low disk; a batch dropped under a streaming chunk ---------------------------
async def test_a_stored_chunk_sent_again_under_low_disk_is_answered_as_a_repeat(aiohttp_client, settings) -> None:
    """A retry of a chunk already stored writes nothing: it gets the repeat's answer (202 and
    its ids), not 507, however little disk is left; a chunk not stored yet still gets 507
    before a byte is written."""
    up = Uploads(await aiohttp_client(create_app(settings)))
    batch = await batch_with_good_file(up)
    assert (await up.post(batch, 1, b"abc", chunk=(0, 2), size=6)).status == 202
    full = Uploads(await aiohttp_client(create_app(settings.replace(min_free_disk=1 << 60))))
    r = await full.post(batch, 1, b"abc", chunk=(0, 2), size=6)
    assert r.status == 202, await r.text()
    assert (await r.json())["uploadedChunkIds"] == [0]
    await assert_error(await full.post(batch, 1, b"def", chunk=(1, 2), size=6), 507, "ERR_DISK_FULL")
    assert (await (await up.info(batch, 1)).json())["uploadedChunkIds"] == [0]
    assert (await up.post(batch, 1, b"def", chunk=(1, 2), size=6)).status == 201
    await assert_intact(up, batch, settings.data_dir, extra=1)


@pytest.mark.parametrize("chunk", [0, 1, 2])
async def test_a_chunk_streaming_while_its_batch_is_dropped_gets_batch_not_found(client, settings, chunk) -> None:
    """The batch, not the file, is gone: the chunk's answer says so at once (it said "the file
    was removed ...; send it again" for the last chunk, whose send again then got 404 batch)."""
    up = Uploads(client)
    batch = await up.create()
    stride, count = 4 * MIB, 3
    size = count * stride
    for idx in range(count):
        if idx != chunk and (idx, chunk) != (2, 1):  # 0 and 2 stream as the last chunk, 1 as another
            assert (await up.post(batch, 0, b"s" * stride, chunk=(idx, count), size=size)).status == 202
    body = b"b" * stride
    h = {**upload_headers("d.bin", size, chunk=(chunk, count)), "Content-Length": str(len(body))}
    head = (f"POST /api/v1/upload/{batch}/0 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n").encode()
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(head + body[:2 * MIB])
        await writer.drain()

        async def streaming() -> bool:  # its first bytes are on disk, in place or on their own
            return any(holds(settings.uploads_dir / p, off, body[:MIB]) for p in upload_tree(settings.data_dir)
                       for off in (0, chunk * stride))

        await async_wait_until(streaming, timeout=10, what="the chunk's first bytes written")
        assert (await client.delete(up.url(f"/{batch}"), headers=AUTH)).status == 204
        writer.write(body[2 * MIB:])
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout=30)
    finally:
        writer.close()
    doc = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert (int(answer.split(b" ", 2)[1]), doc["code"]) == (404, "ERR_BATCH_NOT_FOUND"), doc
    assert doc["message"] == f"batch {batch} was dropped"
    assert upload_tree(settings.data_dir) == []
