"""Chunks become power-loss durable in groups: after a reboot the chunks recorded since the
last durability point are forgotten (the client resends them); a process crash loses none."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest
from aiohttp.test_utils import TestClient, TestServer

from server.app import create_app
from server.durable import boot_id
from server.keys import UPLOADS
from tests.support.disk_state import run_cli
from tests.support.uploads import Uploads, sha256, upload_tree
from tests.support.waiting import async_wait_until

DATA = os.urandom(3 * 1000)
PARTS = [DATA[:1000], DATA[1000:2000], DATA[2000:]]


async def _restart(client: TestClient, settings, before_start=None) -> TestClient:  # type: ignore[no-untyped-def]
    await client.close()
    if before_start is not None:
        before_start()
    fresh = TestClient(TestServer(create_app(settings)))
    await fresh.start_server()
    return fresh


async def _chunk_ids(up: Uploads, batch: str) -> list[int]:
    r = await up.info(batch, 0)
    assert r.status == 200, await r.text()
    return [int(i) for i in (await r.json())["uploadedChunkIds"]]


async def test_reboot_forgets_chunks_after_the_last_sync_point(client, settings) -> None:
    up = Uploads(client)
    batch = await up.create()
    r = await up.post(batch, 0, PARTS[0], chunk=(0, 3), size=len(DATA))
    assert r.status == 202
    await client.app[UPLOADS].sync_point()  # chunk 0 is durable from here on
    r = await up.post(batch, 0, PARTS[1], chunk=(1, 3), size=len(DATA))
    assert r.status == 202
    marker = settings.uploads_dir / ".synced"
    point = json.loads(marker.read_text())
    assert point["boot_id"] == boot_id()

    def power_loss() -> None:
        # The graceful stop just made chunk 1 durable too; a power loss would not have. What
        # it leaves: the last durability point (before chunk 1), taken in a previous boot.
        assert json.loads(marker.read_text())["at"] > point["at"]
        marker.write_text(json.dumps({**point, "boot_id": "a-previous-boot"}))

    client = await _restart(client, settings, power_loss)
    try:
        up = Uploads(client)
        assert await _chunk_ids(up, batch) == [0]
        assert not any(p.endswith("chunks/1") for p in upload_tree(settings.data_dir))
        assert json.loads(marker.read_text())["boot_id"] == boot_id()  # a fresh point at start
        for i in (1, 2):
            r = await up.post(batch, 0, PARTS[i], chunk=(i, 3), size=len(DATA))
            assert r.status == (202 if i == 1 else 201), await r.text()
        manifest = await up.manifest(batch)
        assert manifest["files"][0]["sha256"] == sha256(DATA)
    finally:
        await client.close()


async def test_restart_in_the_same_boot_keeps_every_recorded_chunk(client, settings) -> None:
    up = Uploads(client)
    batch = await up.create()
    for i in (0, 1):
        r = await up.post(batch, 0, PARTS[i], chunk=(i, 3), size=len(DATA))
        assert r.status == 202
    client = await _restart(client, settings)
    try:
        assert await _chunk_ids(Uploads(client), batch) == [0, 1]
    finally:
        await client.close()


async def test_cleanup_never_removes_the_durability_marker(client, settings) -> None:
    up = Uploads(client)
    batch = await up.create()
    await up.upload(batch, 0, DATA, chunk_size=1000)
    marker = settings.uploads_dir / ".synced"
    assert marker.exists()
    hour_ago = time.time() - 3600
    os.utime(marker, (hour_ago, hour_ago))
    r = run_cli(settings, "cleanup", "--older-than", "10m")
    assert r.returncode == 0, r.stderr
    assert marker.exists() and ".synced" not in r.stdout


async def test_a_cancelled_sync_point_leaves_the_chunks_unsynced_for_the_stop(client, settings) -> None:
    """Shutdown cancels the periodic sync point; if it was waiting for the writer, the stop's
    own sync point must still run (else chunks answered 202 are not durable after a clean stop)."""
    up = Uploads(client)
    batch = await up.create()
    r = await up.post(batch, 0, PARTS[0], chunk=(0, 3), size=len(DATA))
    assert r.status == 202
    service = client.app[UPLOADS]
    marker = settings.uploads_dir / ".synced"
    before = json.loads(marker.read_text())["at"]
    async with service.db.write():  # the single writer is busy: the sync point waits for it
        waiting = asyncio.ensure_future(service.sync_point())

        async def started() -> bool:  # it clears the flag, then waits for the writer we hold
            return not service._unsynced.is_set()

        await async_wait_until(started, timeout=5, what="the sync point to start")
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    await service.close()  # what the clean stop runs
    assert json.loads(marker.read_text())["at"] > before


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "one-chunk"])
async def test_a_file_answered_complete_has_a_durable_record(client, settings, monkeypatch, chunked) -> None:
    """Commits run synchronous=NORMAL (the WAL is synced at checkpoints and sync points): a
    file answered 201 complete must not wait for either, or a power loss forgets its row."""
    up = Uploads(client)
    batch = await up.create()
    wal = os.stat(f"{settings.db_path}-wal").st_ino
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        if os.fstat(fd).st_ino == wal:
            synced.append(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    r = await up.post(batch, 0, DATA, chunk=(0, 1) if chunked else None, size=len(DATA))
    assert r.status == 201, await r.text()
    assert synced


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "one-chunk"])
async def test_a_file_answered_complete_has_its_new_directories_synced(client, settings, monkeypatch,
                                                                      chunked) -> None:
    """A batch's first file makes its file dir and its batch dir: both entries must be durable
    before the 201, or a power loss takes the file (and its fsynced bytes) with them."""
    up = Uploads(client)
    batch = await up.create()
    synced: set[int] = set()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        synced.add(os.fstat(fd).st_ino)

    monkeypatch.setattr(os, "fsync", fsync)
    r = await up.post(batch, 0, DATA, chunk=(0, 1) if chunked else None, size=len(DATA))
    assert r.status == 201, await r.text()
    [data] = [settings.uploads_dir / p for p in upload_tree(settings.data_dir)]
    for d in (data.parent, data.parent.parent, data.parent.parent.parent):
        assert os.stat(d).st_ino in synced, d


async def test_a_failed_sync_point_does_not_end_the_periodic_ones(client, settings, monkeypatch) -> None:
    service = client.app[UPLOADS]
    up = Uploads(client)
    batch = await up.create()
    calls: list[str] = []
    real = service.store.sync_point

    def flaky(at):  # type: ignore[no-untyped-def]
        calls.append("call")
        if len(calls) == 1:
            raise OSError("disk hiccup")
        real(at)

    monkeypatch.setattr(service.store, "sync_point", flaky)
    periodic = asyncio.ensure_future(service.sync_points(every=0.01))
    try:
        r = await up.post(batch, 0, PARTS[0], chunk=(0, 3), size=len(DATA))
        assert r.status == 202

        async def synced_after_the_failure() -> bool:
            return len(calls) >= 2 and not service._unsynced.is_set()
        await async_wait_until(synced_after_the_failure, timeout=10, what="a sync point after the failed one")
        assert not periodic.done()
    finally:
        periodic.cancel()
        await asyncio.gather(periodic, return_exceptions=True)


@pytest.mark.parametrize("how", ["drop", "delete", "execute"])
async def test_bytes_are_removed_only_once_their_rows_removal_is_durable(client, settings, monkeypatch,
                                                                         how) -> None:
    """Commits are synced lazily (synchronous=NORMAL): removing bytes before the delete is
    durable lets a power loss bring back an open batch whose complete files have no bytes."""
    import server.uploads.service as service_module

    up = Uploads(client)
    batch = await up.create()
    await up.upload(batch, 0, DATA)
    wal = os.stat(f"{settings.db_path}-wal").st_ino
    events: list[str] = []
    real_fsync, real_remove_tree = os.fsync, service_module.remove_tree

    def fsync(fd: int) -> None:
        real_fsync(fd)
        if os.fstat(fd).st_ino == wal:
            events.append("wal synced")

    def remove_tree(path):  # type: ignore[no-untyped-def]
        events.append("bytes removed")
        real_remove_tree(path)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(service_module, "remove_tree", remove_tree)
    if how == "drop":
        r = await client.delete(up.url(f"/{batch}"), headers=up.auth)
        assert r.status == 204
    elif how == "delete":
        r = await client.delete(up.url(f"/{batch}/0"), headers=up.auth)
        assert r.status == 204
    else:
        await up.manifest(batch, keep=False)
    assert events == ["wal synced", "bytes removed"]
    assert upload_tree(settings.data_dir) == []
