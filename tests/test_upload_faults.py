"""Storage faults under uploads: each gives the client a clear JSON error (507 for a full disk,
503 for no open files left, 500 for an I/O error, logged in one line), records nothing half,
and the same request succeeds once the cause is gone. No file is left stuck: one whose
assembly failed keeps its chunks and is assembled again by the next request for it.

The faults are injected into the live service's store (the issue allows "a store that injects
ENOSPC/EIO"); ``test_upload_disk_full.py`` fills a real tmpfs."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import sqlite3
import threading
from contextlib import contextmanager

import pytest
from sqlalchemy.exc import OperationalError

from server.app import create_app
from server.keys import UPLOADS
from server.uploads import assembly, ledger
from tests.support.uploads import Uploads, assert_error, sha256, upload_tree

pytestmark = pytest.mark.timeout(60)


class Once:
    """Raise ``error`` from the first call, then behave as ``real``."""

    def __init__(self, real, error: BaseException) -> None:  # type: ignore[no-untyped-def]
        self.real, self.error, self.calls = real, error, 0

    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls == 1:
            raise self.error
        return self.real(*args, **kwargs)


def temps(settings) -> list[str]:  # type: ignore[no-untyped-def]
    return [p for p in upload_tree(settings.data_dir) if os.path.basename(p).startswith(".")]


async def test_no_space_while_concatenating_is_507_and_the_last_chunk_can_be_sent_again(client, settings,
                                                                                      monkeypatch) -> None:
    up = Uploads(client)
    service = client.app[UPLOADS]
    batch = await up.create()
    parts = [os.urandom(1000), os.urandom(1500), os.urandom(500)]  # not uniform: concatenated
    data = b"".join(parts)
    for i in (0, 1):
        assert (await up.post(batch, 0, parts[i], chunk=(i, 3), size=len(data))).status == 202
    monkeypatch.setattr(service.store, "concat", Once(service.store.concat, OSError(errno.ENOSPC, "No space left")))
    r = await up.post(batch, 0, parts[2], chunk=(2, 3), size=len(data))
    body = await assert_error(r, 507, "ERR_DISK_FULL")
    assert "nothing was recorded" in body["message"]
    info = await (await up.info(batch, 0)).json()
    assert info["uploadedChunkIds"] == [0, 1] and info["state"] == "receiving" and not temps(settings)
    r = await up.post(batch, 0, parts[2], chunk=(2, 3), size=len(data))  # space is back
    assert r.status == 201 and (await r.json())["uploadedChunkIds"] == [0, 1, 2]
    info = await (await up.info(batch, 0)).json()
    assert info["complete"] is True and info["sha256"] == sha256(data)


async def test_an_io_error_on_the_last_chunk_is_500_in_one_log_line(client, settings, monkeypatch, caplog) -> None:
    import server.uploads.service as service_module

    up = Uploads(client)
    batch = await up.create()
    data = os.urandom(4000)
    for i in range(3):
        assert (await up.post(batch, 0, data[i * 1000:(i + 1) * 1000], chunk=(i, 4), size=4000)).status == 202
    monkeypatch.setattr(service_module, "prepare", Once(service_module.prepare, OSError(errno.EIO, "I/O error")))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        r = await up.post(batch, 0, data[3000:], chunk=(3, 4), size=4000)
    await assert_error(r, 500, "ERR_STORAGE_FAILED")
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None and "I/O error" in errors[0].getMessage()
    assert (await (await up.info(batch, 0)).json())["uploadedChunkIds"] == [0, 1, 2]
    r = await up.post(batch, 0, data[3000:], chunk=(3, 4), size=4000)
    assert r.status == 201
    assert (await up.manifest(batch))["files"][0]["sha256"] == sha256(data)


async def test_out_of_open_files_is_503_and_retryable(client, settings, monkeypatch) -> None:
    up = Uploads(client)
    batch = await up.create()
    real_open = os.open

    def open_fails_once(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(path).endswith(".part") and not fired:  # the body's temp
            fired.append(path)
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, *args, **kwargs)

    fired: list[str] = []
    monkeypatch.setattr(os, "open", open_fails_once)
    await assert_error(await up.post(batch, 0, b"small file"), 503, "ERR_SERVER_BUSY")
    assert fired
    await assert_error(await up.info(batch, 0), 404, "ERR_FILE_NOT_FOUND")  # nothing recorded
    assert not temps(settings)
    assert (await up.post(batch, 0, b"small file")).status == 201
    assert (await up.manifest(batch))["files"][0]["sha256"] == sha256(b"small file")


@pytest.mark.parametrize(("failing", "error", "status", "code"), [
    (0, errno.ENOSPC, 507, "ERR_DISK_FULL"),  # a new file's first chunk: <id>/partial's folder cannot be made
    (2, errno.EIO, 500, "ERR_STORAGE_FAILED"),  # the last chunk: partial -> data
], ids=["first-chunk", "last-chunk"])
async def test_a_rename_that_fails_in_the_recorder_is_answered_and_the_chunk_can_be_sent_again(
        client, settings, monkeypatch, caplog, failing, error, status, code) -> None:
    """The recorder moves a request's bytes into place inside its transaction; a move that
    fails rolls the group back and fails that request. Its answer is the storage error (it was
    never sent: the request waited forever), nothing of it is recorded, and the chunk sent again
    is recorded (the last one completes the file)."""
    up = Uploads(client)
    batch = await up.create()
    data = os.urandom(3000)
    for i in range(failing):
        assert (await up.post(batch, 0, data[i * 1000:(i + 1) * 1000], chunk=(i, 3), size=3000)).status == 202
    moving = Once(ledger.replace_making_dirs, OSError(error, os.strerror(error)))
    monkeypatch.setattr(ledger, "replace_making_dirs", moving)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        r = await asyncio.wait_for(up.post(batch, 0, data[failing * 1000:(failing + 1) * 1000],
                                           chunk=(failing, 3), size=3000), timeout=15)
    await assert_error(r, status, code)
    assert moving.calls == 1
    assert not [rec for rec in caplog.records if rec.exc_info is not None]
    if failing == 0:
        await assert_error(await up.info(batch, 0), 404, "ERR_FILE_NOT_FOUND")
    else:
        info = await (await up.info(batch, 0)).json()
        assert info["uploadedChunkIds"] == [0, 1] and info["state"] == "receiving"
    assert not temps(settings)
    for i in range(failing, 3):
        r = await up.post(batch, 0, data[i * 1000:(i + 1) * 1000], chunk=(i, 3), size=3000)
        assert r.status == (201 if i == 2 else 202), await r.text()
    assert (await up.manifest(batch))["files"][0]["sha256"] == sha256(data)


async def test_a_group_whose_renames_fail_three_times_records_the_rest(client, settings, monkeypatch) -> None:
    """Four first chunks recorded as one group, the renames of three of them into place failing
    (no space): each failure rolls the group back and it is tried again without that request.
    The fourth is recorded; it was answered 202 though nothing was (the retries ran out after
    three failures), its temp left behind, its file unknown."""
    up = Uploads(client)
    records = client.app[UPLOADS].recorder.records
    batch = await up.create()
    real = ledger.replace_making_dirs
    moves: list[str] = []
    gated = threading.Event()

    def move(src, dst) -> None:  # type: ignore[no-untyped-def]
        moves.append(dst.name)
        if len(moves) == 1:  # file 0's, in the first group: files 1-4 queue meanwhile, the next group
            gated.set()
            with records.cv:
                records.cv.wait_for(lambda: len(records.queue) >= 4, timeout=10)
        elif len(moves) <= 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(ledger, "replace_making_dirs", move)
    data = {i: os.urandom(2000) for i in range(5)}
    first = asyncio.create_task(up.post(batch, 0, data[0][:1000], chunk=(0, 2), size=2000))
    assert await asyncio.to_thread(gated.wait, 10)
    answers = await asyncio.wait_for(asyncio.gather(
        *(up.post(batch, i, data[i][:1000], chunk=(0, 2), size=2000) for i in range(1, 5))), timeout=15)
    assert (await first).status == 202
    statuses = {i: r.status for i, r in enumerate(answers, 1)}
    assert sorted(statuses.values()) == [202, 507, 507, 507], statuses
    for i, r in enumerate(answers, 1):
        if r.status == 507:
            await assert_error(r, 507, "ERR_DISK_FULL")
            await assert_error(await up.info(batch, i), 404, "ERR_FILE_NOT_FOUND")
        else:
            info = await up.info(batch, i)
            assert info.status == 200, await info.text()
            assert (await info.json())["uploadedChunkIds"] == [0]
    assert not temps(settings)
    for i in range(1, 5):
        if statuses[i] == 507:
            assert (await up.post(batch, i, data[i][:1000], chunk=(0, 2), size=2000)).status == 202
    for i in range(5):
        assert (await up.post(batch, i, data[i][1000:], chunk=(1, 2), size=2000)).status == 201
    assert [f["sha256"] for f in (await up.manifest(batch))["files"]] == [sha256(data[i]) for i in range(5)]


async def test_a_full_database_is_507_and_records_nothing(client, settings, monkeypatch) -> None:
    up = Uploads(client)
    service = client.app[UPLOADS]
    batch = await up.create()
    full = OperationalError("INSERT", {}, sqlite3.OperationalError("database or disk is full"))
    monkeypatch.setattr(service.db, "write_sync", Once(service.db.write_sync, full))
    await assert_error(await up.post(batch, 0, b"whole"), 507, "ERR_DISK_FULL")
    assert upload_tree(settings.data_dir) == []  # its temp is gone, nothing was renamed into place
    assert (await up.post(batch, 0, b"whole")).status == 201


async def test_a_failed_assembly_leaves_the_file_to_the_next_request_for_it(aiohttp_client, settings,
                                                                           monkeypatch, caplog) -> None:
    """The assembler (for a file nobody prepared: a crash left it ``assembling`` here) fails
    with EIO: the file goes back to ``receiving`` with every chunk, its info says
    ``assembling``, and that very request starts the assembly again, which completes it."""
    first = await aiohttp_client(create_app(settings))
    up = Uploads(first)
    batch = await up.create()
    data = os.urandom(4000)
    for i in range(3):
        assert (await up.post(batch, 0, data[i * 1000:(i + 1) * 1000], chunk=(i, 4), size=4000)).status == 202
    await first.close()
    with sqlite3.connect(settings.db_path) as db:  # chunk 3 recorded, the file claimed, then the crash
        pk, fid = db.execute("SELECT batch_pk, id FROM batch_files").fetchone()
        with open(settings.uploads_dir / str(pk) / str(fid) / "partial", "r+b") as f:
            os.pwrite(f.fileno(), data[3000:], 3000)
        db.execute("UPDATE batch_files SET state = 'assembling', chunk_ids = ?, received = 4000", (bytes([15]),))

    failing = Once(assembly.prepare, OSError(errno.EIO, "I/O error"))
    monkeypatch.setattr(assembly, "prepare", failing)
    caplog.clear()
    client = await aiohttp_client(create_app(settings))
    service = client.app[UPLOADS]
    await service.idle()
    assert failing.calls == 1 and service.stats.assembly_failed == 1 and service.stats.assembled == 0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None and "I/O error" in errors[0].getMessage()
    with sqlite3.connect(settings.db_path) as db:
        assert db.execute("SELECT state FROM batch_files").fetchone() == ("receiving",)
    up = Uploads(client)
    info = await (await up.info(batch, 0)).json()
    assert info["state"] == "assembling" and info["uploadedChunkIds"] == [0, 1, 2, 3] and not info["complete"]
    await service.idle()  # the assembly that request started
    assert failing.calls == 2 and service.stats.assembled == 1
    info = await (await up.info(batch, 0)).json()
    assert info["state"] == "complete" and info["sha256"] == sha256(data)


def crash_while_assembling(settings, parts: list[bytes]) -> None:  # type: ignore[no-untyped-def]
    """What a crash leaves after the last chunk of an irregularly chunked file (stored on its
    own) was recorded and the file claimed, before its assembly: every chunk, ``assembling``."""
    with sqlite3.connect(settings.db_path) as db:
        pk, fid = db.execute("SELECT batch_pk, id FROM batch_files").fetchone()
        last = settings.uploads_dir / str(pk) / str(fid) / "chunks" / str(len(parts) - 1)
        last.write_bytes(parts[-1])
        ids = (1 << len(parts)) - 1
        db.execute("UPDATE batch_files SET state = 'assembling', chunk_ids = ?, loose_ids = ?, received = ?",
                   (bytes([ids]), bytes([ids & ~1]), sum(map(len, parts))))


async def test_the_free_disk_floor_met_by_an_assembly_is_507_and_the_file_waits_for_space(
        aiohttp_client, settings, caplog) -> None:
    """The assembler concatenates a file (its chunks fit no single layout) while the disk is
    under FILEDROP_MIN_FREE_DISK: the file goes back to ``receiving`` with every chunk, no
    ERROR is logged, the request that asks for it again gets 507 naming the setting, and once
    there is space it is complete. (The floor, not an OSError, was missed: an ERROR traceback,
    500 ERR_INTERNAL, the file left ``assembling``.)"""
    first = await aiohttp_client(create_app(settings))
    up = Uploads(first)
    batch = await up.create()
    parts = [os.urandom(1000), os.urandom(1500), os.urandom(500)]
    data = b"".join(parts)
    for i in (0, 1):
        assert (await up.post(batch, 0, parts[i], chunk=(i, 3), size=len(data))).status == 202
    await first.close()
    crash_while_assembling(settings, parts)
    caplog.clear()
    low = await aiohttp_client(create_app(settings.replace(min_free_disk=1 << 60)))  # the disk filled meanwhile
    service = low.app[UPLOADS]
    await service.idle()  # the start's assembly of the file
    assert service.stats.assembly_failed == 1 and service.stats.assembled == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    with sqlite3.connect(settings.db_path) as db:
        assert db.execute("SELECT state FROM batch_files").fetchone() == ("receiving",)
    r = await Uploads(low).post(batch, 0, parts[2], chunk=(2, 3), size=len(data))  # the last chunk again
    body = await assert_error(r, 507, "ERR_DISK_FULL")
    assert "FILEDROP_MIN_FREE_DISK" in body["message"]
    assert service.stats.assembly_failed == 2 and not temps(settings)
    await low.close()
    client = await aiohttp_client(create_app(settings))  # space is back
    r = await Uploads(client).post(batch, 0, parts[2], chunk=(2, 3), size=len(data))
    assert r.status == 201, await r.text()
    assert (await Uploads(client).manifest(batch))["files"][0]["sha256"] == sha256(data)


@pytest.mark.parametrize("step", ["sync", "rename"])
async def test_an_io_error_after_an_assembly_concatenated_is_500_in_one_log_line_and_the_file_waits(
        aiohttp_client, settings, monkeypatch, caplog, step) -> None:
    """The last two chunks of an irregularly chunked file arrive at once: neither request saw
    the other's chunk, so neither prepared the file, and the one recorded second waits for its
    assembly. The sync that makes the concatenation durable, or its rename into ``data`` (in the
    transaction that records it complete), fails with EIO: the file goes back to ``receiving``
    with every chunk, that request gets 500 ERR_STORAGE_FAILED in one log line, no temp is left,
    and the chunk sent again completes the file. (It was 500 ERR_INTERNAL with a traceback, the
    file left ``assembling``.)"""
    # Chunk points (which sync too) far apart: the only sync here is the assembly's.
    client = await aiohttp_client(create_app(settings.replace(upload_sync_interval=600)))
    up = Uploads(client)
    service = client.app[UPLOADS]
    batch = await up.create()
    parts = [os.urandom(1000), os.urandom(1500), os.urandom(500)]  # not uniform: concatenated
    data = b"".join(parts)
    assert (await up.post(batch, 0, parts[0], chunk=(0, 3), size=len(data))).status == 202
    fired: list[str] = []
    if step == "sync":
        real_sync = service.durability.sync_now

        def sync_now() -> None:
            if not fired:
                fired.append("sync")
                raise OSError(errno.EIO, "Input/output error")
            real_sync()

        monkeypatch.setattr(service.durability, "sync_now", sync_now)
    else:
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
            if os.path.basename(src).startswith(".data.") and not fired:  # the concatenation's
                fired.append(str(dst))
                raise OSError(errno.EIO, "Input/output error")
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", replace)
    records, real_write = service.recorder.records, service.db.write_sync
    held: list[bool] = []

    @contextmanager
    def write_sync():  # type: ignore[no-untyped-def]
        if not held:  # the first of the two chunks is recorded once the other is queued: neither saw the other
            held.append(True)
            with records.cv:
                records.cv.wait_for(lambda: len(records.queue) >= 1, timeout=10)
        with real_write() as conn:
            yield conn

    monkeypatch.setattr(service.db, "write_sync", write_sync)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        answers = await asyncio.wait_for(asyncio.gather(
            *(up.post(batch, 0, parts[i], chunk=(i, 3), size=len(data)) for i in (1, 2))), timeout=15)
    assert sorted(r.status for r in answers) == [202, 500], [r.status for r in answers]
    await assert_error(next(r for r in answers if r.status == 500), 500, "ERR_STORAGE_FAILED")
    assert len(fired) == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None and "Input/output error" in errors[0].getMessage()
    with sqlite3.connect(settings.db_path) as db:
        assert db.execute("SELECT state, chunk_ids FROM batch_files").fetchone() == ("receiving", bytes([7]))
    assert not temps(settings)
    r = await up.post(batch, 0, parts[2], chunk=(2, 3), size=len(data))
    assert r.status == 201, await r.text()
    assert (await up.manifest(batch))["files"][0]["sha256"] == sha256(data)


async def test_a_file_whose_assembly_failed_is_assembled_at_start(aiohttp_client, settings, monkeypatch) -> None:
    first = await aiohttp_client(create_app(settings))
    up = Uploads(first)
    batch = await up.create()
    data = os.urandom(3000)
    for i in range(2):
        await up.post(batch, 0, data[i * 1000:(i + 1) * 1000], chunk=(i, 3), size=3000)
    await first.close()
    with sqlite3.connect(settings.db_path) as db:  # every chunk recorded; the assembly had failed
        pk, fid = db.execute("SELECT batch_pk, id FROM batch_files").fetchone()
        with open(settings.uploads_dir / str(pk) / str(fid) / "partial", "r+b") as f:
            os.pwrite(f.fileno(), data[2000:], 2000)
        db.execute("UPDATE batch_files SET chunk_ids = ?, received = 3000", (bytes([7]),))
    client = await aiohttp_client(create_app(settings))
    service = client.app[UPLOADS]
    assert service.stats.recovered == 1
    await service.idle()
    assert (await Uploads(client).manifest(batch))["files"][0]["sha256"] == sha256(data)
