"""The upload API over the production app: REST and legacy, both prefixes, execute, ownership."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import re
import threading

import pytest
from aiohttp import web
from sqlalchemy import delete, select, update

from server.app import create_app
from server.db.models import Batch, BatchFile
from server.keys import UPLOADS
from server.protocol import RECV_SIZE
from server.uploads.store import WRITE_BUFFER
from tests.conftest import AUTH, OTHER_KEY
from tests.support.database import connect
from tests.support.uploads import Uploads, assert_error, sha256, upload_headers, upload_tree

pytestmark = [pytest.mark.timeout(60), pytest.mark.engines]


async def test_an_upload_body_is_buffered_up_to_two_socket_reads(aiohttp_client, settings) -> None:
    """The body's reader pauses the socket only past two reads of RECV_SIZE (aiohttp's own
    default, 512 KiB, is under one read), and the file arrives whole."""
    seen: list[tuple[int, int]] = []

    @web.middleware
    async def limits(request: web.Request, handler):  # type: ignore[no-untyped-def]
        response = await handler(request)
        if request.method == "POST" and request.path.count("/") == 5:  # /api/v1/upload/<batch>/<idx>
            seen.append(request.content.get_read_buffer_limits())
        return response

    app = create_app(settings)
    app.middlewares.append(limits)
    up = Uploads(await aiohttp_client(app))
    batch = await up.create()
    data = os.urandom(3 << 20)
    assert (await up.post(batch, 0, data, "big.bin")).status == 201
    assert seen == [(RECV_SIZE, 2 * RECV_SIZE)]
    assert (await (await up.info(batch, 0)).json())["sha256"] == sha256(data)


@pytest.mark.parametrize("prefix", ["", "/nuxeo"])
async def test_normal_upload_info_and_manifest(client, settings, prefix) -> None:
    up = Uploads(client, prefix)
    batch = await up.create()
    assert len(batch) == 32 and int(batch, 16) >= 0
    data = os.urandom(10_000)
    r = await up.post(batch, 0, data, "résumé 1.pdf", mimetype="application/pdf")
    assert r.status == 201
    assert await r.json() == {"batchId": batch, "fileIdx": "0", "uploadType": "normal",
                              "uploadedSize": "10000", "uploaded": "true", "sha256": sha256(data)}
    info = await (await up.info(batch, 0)).json()
    assert info["name"] == "résumé 1.pdf" and info["size"] == 10000 and info["uploadType"] == "normal"
    assert info["complete"] is True and info["sha256"] == sha256(data)
    listing = await (await up.info(batch)).json()
    assert [f["fileIdx"] for f in listing] == ["0"]
    assert await up.manifest(batch) == {"batchId": batch, "files": [
        {"fileIdx": "0", "name": "résumé 1.pdf", "size": 10000, "sha256": sha256(data)}]}
    # Only the derived layout is on disk: <batch pk>/<file id>.data, nothing else.
    files = upload_tree(settings.data_dir)
    assert len(files) == 1 and re.fullmatch(r"\d+/\d+\.data", files[0]), files


async def test_chunks_out_of_order_list_all_ids_and_assemble(client) -> None:
    up = Uploads(client)
    batch = await up.create()
    data = os.urandom(5 * 1000 + 17)
    parts = [data[i:i + 1000] for i in range(0, len(data), 1000)]
    order = [3, 0, 5, 1, 4, 2]
    seen: list[int] = []
    for n, i in enumerate(order):
        r = await up.post(batch, 2, parts[i], "c.bin", chunk=(i, len(parts)), size=len(data))
        seen.append(i)
        body = await r.json()
        assert body["uploadedChunkIds"] == sorted(seen)
        assert body["chunkCount"] == "6" and body["uploadType"] == "chunked"
        assert r.status == (201 if n == len(order) - 1 else 202)
        if n == 2:
            info = await (await up.info(batch, 2)).json()
            assert info["uploadedChunkIds"] == [0, 3, 5] and info["chunkCount"] == 6
            assert info["complete"] is False and "sha256" not in info
            manifest = await up.manifest(batch)
            assert manifest["files"] == [{"fileIdx": "2", "name": "c.bin", "size": len(data), "complete": False}]
    await client.app[UPLOADS].settle(batch)  # the last chunk is answered before assembly ends
    info = await (await up.info(batch, 2)).json()
    assert info["sha256"] == sha256(data) and info["uploadedChunkIds"] == list(range(6))
    f = await client.app[UPLOADS].open_file(AUTH_OWNER(client), batch, 2)
    assert f.path.read_bytes() == data and f.size == len(data) and f.sha256 == sha256(data)
    assert not (f.path.parent / "chunks").exists()


def AUTH_OWNER(client) -> str:  # noqa: N802
    from server.auth import hash_key
    return hash_key(AUTH["X-API-Key"])


async def test_same_chunk_twice_is_idempotent(client) -> None:
    up = Uploads(client)
    batch = await up.create()
    data = os.urandom(3000)
    for _ in range(2):
        r = await up.post(batch, 0, data[:1000], chunk=(0, 3), size=3000)
        assert r.status == 202 and (await r.json())["uploadedChunkIds"] == [0]
    await up.post(batch, 0, data[1000:2000], chunk=(1, 3), size=3000)
    r = await up.post(batch, 0, data[2000:], chunk=(2, 3), size=3000)
    assert r.status == 201
    # A late repeat of a chunk of a complete file changes nothing.
    r = await up.post(batch, 0, data[1000:2000], chunk=(1, 3), size=3000)
    assert r.status == 201 and (await r.json())["uploadedChunkIds"] == [0, 1, 2]
    assert (await up.manifest(batch))["files"][0]["sha256"] == sha256(data)


async def test_last_two_chunks_at_once_assemble_exactly_once(client) -> None:
    up = Uploads(client)
    service = client.app[UPLOADS]
    rounds = 8
    for k in range(rounds):
        batch = await up.create()
        data = os.urandom(4 * 50_000)
        parts = [data[i:i + 50_000] for i in range(0, len(data), 50_000)]
        for i in (0, 1):
            await up.post(batch, 0, parts[i], chunk=(i, 4), size=len(data))
        r2, r3 = await asyncio.gather(up.post(batch, 0, parts[2], chunk=(2, 4), size=len(data)),
                                      up.post(batch, 0, parts[3], chunk=(3, 4), size=len(data)))
        assert sorted([r2.status, r3.status]) == [201, 202]
        # The one answered 201 (prepared by its request, or waiting for the assembly it claimed)
        # says the SHA-256; the other does not.
        done, other = (r2, r3) if r2.status == 201 else (r3, r2)
        assert (await done.json())["sha256"] == sha256(data) and "sha256" not in await other.json()
        await service.settle(batch)
        assert service.stats.assembled == k + 1
        assert (await up.manifest(batch))["files"][0]["sha256"] == sha256(data)
    assert service.stats.assembly_failed == 0


async def test_parallel_files_in_one_batch(client) -> None:
    up = Uploads(client)
    batch = await up.create()
    blobs = [os.urandom(20_000 + i) for i in range(6)]
    await asyncio.gather(*(up.upload(batch, i, b, f"f{i}", chunk_size=7000) for i, b in enumerate(blobs)))
    files = (await up.manifest(batch))["files"]
    assert [f["sha256"] for f in files] == [sha256(b) for b in blobs]


async def test_whole_file_upload_replaces_a_complete_file(client) -> None:
    up = Uploads(client)
    batch = await up.create()
    await up.upload(batch, 0, b"first version", "a.txt")
    await up.upload(batch, 0, b"second", "b.txt")
    files = (await up.manifest(batch))["files"]
    assert files == [{"fileIdx": "0", "name": "b.txt", "size": 6, "sha256": sha256(b"second")}]


async def test_delete_file_and_drop_batch(client, settings) -> None:
    up = Uploads(client)
    batch = await up.create()
    await up.upload(batch, 0, b"zero")
    await up.upload(batch, 1, b"one")
    r = await client.delete(up.url(f"/{batch}/0"), headers=AUTH)
    assert r.status == 204
    await assert_error(await up.info(batch, 0), 404, "ERR_FILE_NOT_FOUND")
    assert [f["fileIdx"] for f in await (await up.info(batch)).json()] == ["1"]
    r = await client.delete(up.url(f"/{batch}"), headers=AUTH)
    assert r.status == 204
    await assert_error(await up.info(batch), 404, "ERR_BATCH_NOT_FOUND")
    assert upload_tree(settings.data_dir) == []


async def test_empty_batch_lists_204(client) -> None:
    up = Uploads(client)
    batch = await up.create()
    r = await up.info(batch)
    assert r.status == 204 and await r.read() == b""


async def test_handlers_and_new_default(client) -> None:
    r = await client.get("/nuxeo/api/v1/upload/handlers", headers=AUTH)
    assert await r.json() == {"handlers": [{"name": "default"}]}
    r = await client.post("/nuxeo/api/v1/upload/new/default", headers=AUTH)
    assert r.status == 201 and len((await r.json())["batchId"]) == 32
    await assert_error(await client.post("/api/v1/upload/new/s3", headers=AUTH), 404, "ERR_HANDLER_NOT_FOUND")


async def test_another_owner_sees_404(client) -> None:
    up = Uploads(client)
    other = Uploads(client, auth={"X-API-Key": OTHER_KEY})
    batch = await up.create()
    await up.upload(batch, 0, b"mine")
    await assert_error(await other.info(batch), 404, "ERR_BATCH_NOT_FOUND")
    await assert_error(await other.info(batch, 0), 404, "ERR_BATCH_NOT_FOUND")
    await assert_error(await other.post(batch, 1, b"x"), 404, "ERR_BATCH_NOT_FOUND")
    await assert_error(await client.delete(up.url(f"/{batch}"), headers={"X-API-Key": OTHER_KEY}), 404)
    r = await client.post(up.url(f"/{batch}/execute/Batch.Manifest"), headers={"X-API-Key": OTHER_KEY})
    await assert_error(r, 404, "ERR_BATCH_NOT_FOUND")
    # Legacy upload with the same client-chosen id does not take the batch over.
    h = {**upload_headers("x", 1), "X-API-Key": OTHER_KEY, "X-Batch-Id": batch, "X-File-Idx": "5"}
    await assert_error(await client.post("/site/automation/batch/upload", data=b"x", headers=h), 404)
    assert len((await up.manifest(batch))["files"]) == 1


async def test_execute_drops_batch_unless_no_drop_and_void_is_204(client) -> None:
    up = Uploads(client)
    batch = await up.create()
    await up.upload(batch, 0, b"a")
    await up.upload(batch, 1, b"bb")
    one = await up.manifest(batch, 1)
    assert one["files"] == [{"fileIdx": "1", "name": "f.bin", "size": 2, "sha256": sha256(b"bb")}]
    r = await client.post(up.url(f"/{batch}/execute/Batch.Manifest"),
                          headers={**AUTH, "X-NXVoidOperation": "true"}, json={"params": None})
    assert r.status == 204 and await r.read() == b""
    # Executed: the batch is gone (a tombstone refuses uploads).
    await assert_error(await up.info(batch), 404, "ERR_BATCH_NOT_FOUND")
    await assert_error(await up.post(batch, 2, b"late"), 404, "ERR_BATCH_NOT_FOUND")


async def test_unknown_operation_is_404_and_keeps_batch(client) -> None:
    up = Uploads(client)
    batch = await up.create()
    await up.upload(batch, 0, b"a")
    r = await client.post(up.url(f"/{batch}/execute/No.Such.Op"), headers=AUTH, json={"params": {}})
    await assert_error(r, 404, "ERR_OPERATION_NOT_FOUND")
    assert len((await up.manifest(batch))["files"]) == 1


async def test_legacy_upload_list_execute_drop(client) -> None:
    batch = "batch-1370282334917-258"
    for idx, data in enumerate([b"hello", b"world!"]):
        h = {**upload_headers(f"n{idx}.txt", len(data)), "X-Batch-Id": batch, "X-File-Idx": str(idx),
             "Content-Type": "binary/octet-stream"}
        r = await client.post("/nuxeo/site/automation/batch/upload", data=data, headers=h)
        assert r.status == 200
        body = await r.json()
        assert body["batchId"] == batch and body["uploaded"] == "true" and body["fileIdx"] == str(idx)
    # Chunk headers are accepted on the legacy form too.
    data = os.urandom(2500)
    for i in range(3):
        h = {**upload_headers("big.bin", 2500, chunk=(i, 3)), "X-Batch-Id": batch, "X-File-Idx": "2"}
        r = await client.post("/site/automation/batch/upload", data=data[i * 1000:(i + 1) * 1000], headers=h)
        assert r.status == 200 and (await r.json())["uploadedChunkIds"] == list(range(i + 1))
    r = await client.get(f"/site/automation/batch/files/{batch}", headers=AUTH)
    assert [(f["name"], f["size"]) for f in await r.json()] == [("n0.txt", 5), ("n1.txt", 6), ("big.bin", 2500)]
    r = await client.post("/site/automation/batch/execute", headers={**AUTH, "Content-Type":
                          "application/json+nxrequest; charset=UTF-8", "X-Batch-No-Drop": "true"},
                          data=json.dumps({"params": {"operationId": "Batch.Manifest", "batchId": batch,
                                                      "fileIdx": "2"}, "context": {}}))
    assert r.status == 200
    assert (await r.json())["files"] == [{"fileIdx": "2", "name": "big.bin", "size": 2500, "sha256": sha256(data)}]
    r = await client.get(f"/site/automation/batch/drop/{batch}", headers=AUTH)
    assert r.status == 200 and await r.json() == {"batchId": batch, "dropped": "true"}
    await assert_error(await client.get(f"/site/automation/batch/files/{batch}", headers=AUTH), 404)


async def test_legacy_execute_removes_the_batch(client) -> None:
    batch = "legacy-exec-1"
    h = {**upload_headers("a", 1), "X-Batch-Id": batch, "X-File-Idx": "0"}
    assert (await client.post("/site/automation/batch/upload", data=b"a", headers=h)).status == 200
    r = await client.post("/site/automation/batch/execute", headers=AUTH,
                          json={"params": {"operationId": "Batch.Manifest", "batchId": batch}})
    assert r.status == 200 and (await r.json())["files"][0]["sha256"] == sha256(b"a")
    await assert_error(await client.post("/site/automation/batch/upload", data=b"a", headers=h), 404,
                       "ERR_BATCH_NOT_FOUND")


async def test_row_ids_and_their_directories_are_never_reused(client) -> None:
    up = Uploads(client)
    service = client.app[UPLOADS]
    batch = await up.create()
    await up.upload(batch, 0, b"one")
    first = await service.open_file(AUTH_OWNER(client), batch, 0)
    assert (await client.delete(up.url(f"/{batch}/0"), headers=AUTH)).status == 204
    await up.upload(batch, 0, b"two")
    second = await service.open_file(AUTH_OWNER(client), batch, 0)
    assert second.path != first.path and not first.path.exists()
    assert second.path.read_bytes() == b"two"


async def test_concurrent_whole_uploads_to_one_index_leave_one_file(client, settings) -> None:
    up = Uploads(client)
    batch = await up.create()
    bodies = [bytes([65 + i]) * (1000 + i) for i in range(6)]
    answers = await asyncio.gather(*(up.post(batch, 0, b, f"v{i}") for i, b in enumerate(bodies)))
    assert all(r.status == 201 for r in answers)
    files = (await up.manifest(batch))["files"]
    assert len(files) == 1
    winner = int(files[0]["name"][1:])
    assert files[0]["sha256"] == sha256(bodies[winner]) and files[0]["size"] == len(bodies[winner])
    assert [re.fullmatch(r"\d+/\d+\.data", p) is not None for p in upload_tree(settings.data_dir)] == [True]


async def test_empty_file(client) -> None:
    up = Uploads(client)
    batch = await up.create()
    r = await up.post(batch, 0, b"", "empty.txt")
    assert r.status == 201 and (await r.json())["uploadedSize"] == "0"
    assert (await up.manifest(batch))["files"] == [{"fileIdx": "0", "name": "empty.txt", "size": 0,
                                                   "sha256": sha256(b"")}]


async def test_legacy_batch_id_made_anew_after_its_rows_were_removed(client, settings) -> None:
    import shutil

    batch = "legacy-again"
    h = {**upload_headers("a", 1), "X-Batch-Id": batch, "X-File-Idx": "0"}
    h2 = {**upload_headers("b", 2), "X-Batch-Id": batch, "X-File-Idx": "1"}
    for headers, body in ((h, b"a"), (h2, b"bb")):  # the second one finds the batch (and remembers it)
        assert (await client.post("/site/automation/batch/upload", data=body, headers=headers)).status == 200
    # What the janitor does to an expired batch, from another process: rows and bytes gone.
    with connect(settings) as db:
        db.execute(delete(Batch).where(Batch.batch_id == batch))
    shutil.rmtree(settings.uploads_dir)
    r = await client.post("/site/automation/batch/upload", data=b"bb", headers=h2)
    assert r.status == 200, await r.text()  # the first upload makes the batch again
    r = await client.post("/site/automation/batch/upload", data=b"a", headers=h)
    assert r.status == 200, await r.text()  # and the next ones go to the new row
    files = (await Uploads(client).manifest(batch))["files"]
    assert [(f["fileIdx"], f["sha256"]) for f in files] == [("0", sha256(b"a")), ("1", sha256(b"bb"))]


async def test_whole_file_upload_replaces_a_file_being_assembled(aiohttp_client, settings, monkeypatch) -> None:
    """A file left ``assembling`` by a crash is assembled again at start; a whole-file upload
    meanwhile replaces it (as it replaces a complete one), and the assembly, finding its row
    gone, removes what it made."""
    from server.app import create_app
    from server.uploads import assembly

    first = await aiohttp_client(create_app(settings))
    up = Uploads(first)
    batch = await up.create()
    parts = [b"a" * 1000, b"b" * 1000, b"c" * 1000]
    for i in (0, 1):
        assert (await up.post(batch, 0, parts[i], chunk=(i, 3), size=3000)).status == 202
    await first.close()
    with connect(settings) as db:  # chunk 2 recorded, then the crash
        pk, fid = db.execute(select(BatchFile.batch_pk, BatchFile.id)).one()
        with open(settings.uploads_dir / str(pk) / str(fid) / "partial", "r+b") as f:
            os.pwrite(f.fileno(), parts[2], 2000)
        db.execute(update(BatchFile).values(state="assembling", chunk_ids=bytes([7]), received=3000))

    entered, release = threading.Event(), threading.Event()
    real = assembly.prepare

    def slow_prepare(*args):  # type: ignore[no-untyped-def]
        entered.set()
        release.wait(10)
        return real(*args)

    monkeypatch.setattr(assembly, "prepare", slow_prepare)
    client = await aiohttp_client(create_app(settings))
    service = client.app[UPLOADS]
    up = Uploads(client)
    assert await asyncio.to_thread(entered.wait, 10)
    info = await (await up.info(batch, 0)).json()
    assert info["state"] == "assembling" and info["complete"] is False
    new = os.urandom(500)
    r = await up.post(batch, 0, new, "new.bin")
    assert r.status == 201, await r.text()
    assert await r.json() == {"batchId": batch, "fileIdx": "0", "uploadType": "normal",
                              "uploadedSize": "500", "uploaded": "true", "sha256": sha256(new)}
    release.set()
    await service.idle()
    assert await up.manifest(batch) == {"batchId": batch, "files": [
        {"fileIdx": "0", "name": "new.bin", "size": 500, "sha256": sha256(new)}]}
    files = upload_tree(settings.data_dir)  # the replaced file's assembly removed its own directory
    assert len(files) == 1 and re.fullmatch(r"\d+/\d+\.data", files[0]) and files[0] != f"{pk}/{fid}.data"


async def test_legacy_batch_id_taken_by_another_key_after_its_rows_were_removed(client, settings) -> None:
    batch = "legacy-shared-name"
    h = {**upload_headers("a", 1), "X-Batch-Id": batch, "X-File-Idx": "0"}
    for idx in ("0", "1"):  # the second upload finds the batch (and remembers its owner)
        r = await client.post("/site/automation/batch/upload", data=b"a", headers={**h, "X-File-Idx": idx})
        assert r.status == 200, await r.text()
    # What the janitor does to an expired batch, from another process: its rows gone.
    with connect(settings) as db:
        db.execute(delete(Batch).where(Batch.batch_id == batch))
    other = {**h, "X-API-Key": OTHER_KEY}
    r = await client.post("/site/automation/batch/upload", data=b"a", headers=other)
    assert r.status == 200, await r.text()  # the id is free: the row decides, not a remembered owner
    r = await client.post("/site/automation/batch/upload", data=b"a", headers={**other, "X-File-Idx": "1"})
    assert r.status == 200, await r.text()
    r = await client.post("/site/automation/batch/upload", data=b"a", headers={**h, "X-File-Idx": "2"})
    assert r.status == 404  # and it is the other key's now
    files = (await Uploads(client, auth={"X-API-Key": OTHER_KEY}).manifest(batch))["files"]
    assert [f["fileIdx"] for f in files] == ["0", "1"]


async def test_a_file_removed_by_another_process_is_made_anew_when_its_chunk_is_sent_again(client, settings) -> None:
    """This process remembers a file being received (where its next chunk goes, without a read);
    another process removes it. The next chunk, written for the row that is gone, is 404 "send it
    again"; what was remembered goes with that answer, so the chunk sent again starts the file
    anew instead of meeting the same 404 for ever."""
    import shutil

    up = Uploads(client)
    batch = await up.create()
    data = os.urandom(3000)
    parts = [data[i:i + 1000] for i in range(0, 3000, 1000)]
    assert (await up.post(batch, 0, parts[0], chunk=(0, 3), size=3000)).status == 202
    # What another process's DELETE of the file does: its row, then its bytes.
    with connect(settings) as db:
        pk, fid = db.execute(select(BatchFile.batch_pk, BatchFile.id)).one()
        db.execute(delete(BatchFile).where(BatchFile.id == fid))
    shutil.rmtree(settings.uploads_dir / str(pk) / str(fid))
    body = await assert_error(await up.post(batch, 0, parts[1], chunk=(1, 3), size=3000), 404, "ERR_FILE_NOT_FOUND")
    assert "send it again" in body["message"]
    r = await up.post(batch, 0, parts[1], chunk=(1, 3), size=3000)
    assert r.status == 202, await r.text()
    assert (await r.json())["uploadedChunkIds"] == [1]
    for i in (0, 2):
        assert (await up.post(batch, 0, parts[i], chunk=(i, 3), size=3000)).status == (202, 201)[i // 2]
    assert (await up.manifest(batch))["files"][0]["sha256"] == sha256(data)
    files = upload_tree(settings.data_dir)
    assert len(files) == 1 and re.fullmatch(rf"{pk}/\d+\.data", files[0]) and files[0] != f"{pk}/{fid}.data"


async def test_a_whole_file_whose_hashing_failed_gets_its_sha256_from_disk(client, monkeypatch) -> None:
    """A body over 1 MiB is hashed in a thread while it arrives; a block that thread could not
    hash (out of memory, say) breaks the file's hash lane, and the digest must then be read back
    from disk, as the last chunk of a chunked file does. A whole file took the broken lane's."""
    import server.uploads.store as store_module

    real, calls = store_module._hash_and_write_back, []

    def fails_once(*args):  # type: ignore[no-untyped-def]
        calls.append(args[2])
        if len(calls) == 1:
            raise MemoryError
        return real(*args)

    monkeypatch.setattr(store_module, "_hash_and_write_back", fails_once)
    up = Uploads(client)
    batch = await up.create()
    data = os.urandom(5 << 20)
    r = await up.post(batch, 0, data, "big.bin")
    assert r.status == 201, await r.text()
    assert len(calls) > 1  # the first block's hashing failed, the others ran
    assert (await (await up.info(batch, 0)).json())["sha256"] == sha256(data)
    f = await client.app[UPLOADS].open_file(AUTH_OWNER(client), batch, 0)
    assert f.sha256 == sha256(data) and f.path.read_bytes() == data


# -- the answer that completes a file carries its SHA-256 ------------------------------------------
# REST answers 201 once the file is complete (202 for a chunk of a file still incomplete); the
# legacy form answers 200 either way. Each compares with hashlib and with the file's info.
FORMS = ["rest", "legacy"]


async def _send(client, form: str, batch: str, idx: int, data: bytes, *,  # type: ignore[no-untyped-def]
                chunk: tuple[int, int] | None = None, size: int | None = None) -> tuple[int, dict]:  # type: ignore[type-arg]
    if form == "rest":
        r = await Uploads(client).post(batch, idx, data, "s.bin", chunk=chunk, size=size)
    else:
        h = {**upload_headers("s.bin", len(data) if size is None else size, chunk=chunk), "X-Batch-Id": batch,
             "X-File-Idx": str(idx)}
        r = await client.post("/site/automation/batch/upload", headers=h,
                              data=io.BytesIO(data) if len(data) > 1 << 20 else data)
    assert r.status in (200, 201, 202), await r.text()
    return r.status, await r.json()


async def _batch(client, form: str) -> str:  # type: ignore[no-untyped-def]
    """A REST batch, or a legacy id (its first upload makes it)."""
    return await Uploads(client).create() if form == "rest" else f"legacy-sha-{os.urandom(4).hex()}"


def _complete(form: str) -> int:
    return 201 if form == "rest" else 200


def _incomplete(form: str) -> int:
    return 202 if form == "rest" else 200


async def _info_sha256(client, batch: str, idx: int) -> str:  # type: ignore[no-untyped-def]
    info = await (await Uploads(client).info(batch, idx)).json()
    assert info["complete"] is True
    return info["sha256"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("size", [10_000, 3 << 20], ids=["small", "streamed"])
async def test_a_whole_file_is_answered_with_its_sha256(client, form, size) -> None:
    """A small whole file (written and hashed by its group) and one over WRITE_BUFFER (streamed,
    hashed as it arrives): the answer carries the SHA-256, the file info's own value, and every
    field it carried before."""
    data = os.urandom(size)
    assert (size > WRITE_BUFFER) == (size == 3 << 20)
    batch = await _batch(client, form)
    status, body = await _send(client, form, batch, 0, data)
    assert status == _complete(form)
    expected = {"batchId": batch, "fileIdx": "0", "uploadType": "normal", "uploadedSize": str(size),
                "uploaded": "true", "sha256": hashlib.sha256(data).hexdigest()}
    assert body == expected
    assert await _info_sha256(client, batch, 0) == body["sha256"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("order", [[0, 1, 2, 3, 4, 5], [3, 0, 5, 1, 4, 2]], ids=["in-order", "out-of-order"])
async def test_the_chunk_that_completes_a_file_is_answered_with_its_sha256(client, form, order) -> None:
    """No answer says a SHA-256 while the file is incomplete (a repeat of a stored chunk
    included); the chunk that completes it does, and so does a repeat of that chunk (or of any
    other) once the file is complete."""
    data = os.urandom(5 * 1000 + 17)
    parts = [data[i:i + 1000] for i in range(0, len(data), 1000)]
    digest = hashlib.sha256(data).hexdigest()
    batch = await _batch(client, form)
    for n, i in enumerate(order):
        status, body = await _send(client, form, batch, 1, parts[i], chunk=(i, 6), size=len(data))
        if n < len(order) - 1:
            assert status == _incomplete(form) and "sha256" not in body, body
            again = await _send(client, form, batch, 1, parts[order[0]], chunk=(order[0], 6), size=len(data))
            assert again[0] == _incomplete(form) and "sha256" not in again[1], again
        else:
            assert status == _complete(form) and body["sha256"] == digest, body
            assert body["uploadedChunkIds"] == list(range(6)) and body["chunkCount"] == "6"
    assert await _info_sha256(client, batch, 1) == digest
    for i in (order[-1], order[0]):  # the completing chunk again, then another
        status, body = await _send(client, form, batch, 1, parts[i], chunk=(i, 6), size=len(data))
        assert status == _complete(form) and body["sha256"] == digest, body


@pytest.mark.parametrize("form", FORMS)
async def test_a_file_another_process_left_assembling_is_answered_with_the_sha256_of_its_assembly(
        client, settings, form) -> None:
    """Another process recorded the last chunk, claimed the file (``assembling``) and died
    before assembling it. The next chunk sent for it has this process assemble it and waits
    for that: its answer carries the SHA-256 the assembly computed."""
    data = os.urandom(3000)
    parts = [data[i:i + 1000] for i in range(0, 3000, 1000)]
    batch = await _batch(client, form)
    for i in (0, 1):
        status, body = await _send(client, form, batch, 0, parts[i], chunk=(i, 3), size=3000)
        assert status == _incomplete(form) and "sha256" not in body
    with connect(settings) as db:  # chunk 2 written in place and recorded by the other process
        pk, fid = db.execute(select(BatchFile.batch_pk, BatchFile.id)).one()
        with open(settings.uploads_dir / str(pk) / str(fid) / "partial", "r+b") as f:
            os.pwrite(f.fileno(), parts[2], 2000)
        db.execute(update(BatchFile).values(state="assembling", chunk_ids=bytes([7]), received=3000))
    assembled = client.app[UPLOADS].stats.assembled
    status, body = await _send(client, form, batch, 0, parts[0], chunk=(0, 3), size=3000)
    assert client.app[UPLOADS].stats.assembled == assembled + 1  # this request's wait was an assembly
    assert status == _complete(form) and body["sha256"] == hashlib.sha256(data).hexdigest(), body
    assert await _info_sha256(client, batch, 0) == body["sha256"]
