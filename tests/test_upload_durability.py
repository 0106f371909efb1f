"""Chunks become power-loss durable at chunk points: after a reboot the chunks no point covered
are forgotten (the client resends them); a process crash loses none. A failed or cancelled point
is retried; bytes of removed rows go only once that removal is durable."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
import time

import pytest
import requests

from server.app import create_app
from server.keys import UPLOADS
from server.uploads.chunkset import ChunkSet
from tests.conftest import AUTH
from tests.support.disk_state import run_cli
from tests.support.uploads import Uploads, sha256, upload_headers, upload_tree
from tests.support.waiting import async_wait_until

DATA = os.urandom(3 * 1000)
PARTS = [DATA[:1000], DATA[1000:2000], DATA[2000:]]


def synced_ids(settings, batch: str) -> list[int]:  # type: ignore[no-untyped-def]
    with sqlite3.connect(settings.db_path) as db:
        raw = db.execute("SELECT f.synced_ids FROM batch_files f JOIN batches b ON b.id = f.batch_pk "
                         "WHERE b.batch_id = ?", (batch,)).fetchone()[0]
    return ChunkSet(raw).ids()


def post_chunk(base: str, batch: str, idx: int) -> requests.Response:
    return requests.post(f"{base}/api/v1/upload/{batch}/0", data=PARTS[idx], timeout=30,
                         headers=upload_headers("d.bin", len(DATA), chunk=(idx, 3)))


def test_reboot_forgets_the_chunks_no_point_covered(server_factory, settings) -> None:
    """A power loss: chunk 1 was recorded after the last chunk point and its bytes never
    reached the disk. After the reboot the server forgets it (it cannot tell its bytes are
    there), the client sends it again, and the file is whole."""
    start = lambda: server_factory(data_dir=settings.data_dir, upload_sync_interval="1h")  # noqa: E731
    srv = start()
    batch = requests.post(srv.url + "/api/v1/upload/", headers=AUTH, timeout=10).json()["batchId"]
    assert post_chunk(srv.url, batch, 0).status_code == 202
    srv.kill9()
    srv = start()  # a start in the same boot makes what was recorded durable: chunk 0
    assert synced_ids(settings, batch) == [0]
    assert post_chunk(srv.url, batch, 1).status_code == 202
    srv.kill9()  # no chunk point since (an hour apart): chunk 1 is recorded, not known durable
    assert synced_ids(settings, batch) == [0]

    # What the power loss did: chunk 1's bytes (written in place, after chunk 0) never reached
    # the disk, and the machine booted again.
    [partial] = [settings.uploads_dir / p for p in upload_tree(settings.data_dir) if p.endswith("partial")]
    with open(partial, "r+b") as f:
        os.pwrite(f.fileno(), b"\0" * 1000, 1000)
    marker = settings.uploads_dir / ".synced"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "boot_id": "a-previous-boot"}))

    srv = start()
    info = requests.get(f"{srv.url}/api/v1/upload/{batch}/0", headers=AUTH, timeout=10).json()
    assert info["uploadedChunkIds"] == [0] and info["uploadedSize"] == 1000
    for i in (1, 2):
        assert post_chunk(srv.url, batch, i).status_code == (202 if i == 1 else 201)
    r = requests.post(f"{srv.url}/api/v1/upload/{batch}/execute/Batch.Manifest", headers=AUTH, json={}, timeout=30)
    assert r.json()["files"][0]["sha256"] == sha256(DATA)


def test_restart_in_the_same_boot_keeps_every_recorded_chunk(server_factory, settings) -> None:
    srv = server_factory(data_dir=settings.data_dir)
    batch = requests.post(srv.url + "/api/v1/upload/", headers=AUTH, timeout=10).json()["batchId"]
    for i in (0, 1):
        assert post_chunk(srv.url, batch, i).status_code == 202
    srv.kill9()
    srv = server_factory(data_dir=settings.data_dir)
    info = requests.get(f"{srv.url}/api/v1/upload/{batch}/0", headers=AUTH, timeout=10).json()
    assert info["uploadedChunkIds"] == [0, 1]
    assert synced_ids(settings, batch) == [0, 1]  # the start made them durable (the page cache had them)


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


async def test_a_cancelled_chunk_point_leaves_the_chunks_for_the_stop(client, settings) -> None:
    """Shutdown cancels the periodic chunk point; if it was waiting for the writer, the stop's
    own point must still cover its chunks (else chunks answered 202 are not durable after a
    clean stop)."""
    up = Uploads(client)
    batch = await up.create()
    r = await up.post(batch, 0, PARTS[0], chunk=(0, 3), size=len(DATA))
    assert r.status == 202
    service = client.app[UPLOADS]
    assert service.durability.unsynced and synced_ids(settings, batch) == []
    async with service.db.write():  # the single writer is busy: the point waits for it
        waiting = asyncio.ensure_future(service.sync_point())

        async def started() -> bool:  # it took the chunks, synced, and now waits for the writer
            return not service.durability.unsynced and service.durability.barrier.runs > 0
        await async_wait_until(started, timeout=5, what="the chunk point to start")
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    assert service.durability.unsynced
    await service.close()  # what the clean stop runs
    assert synced_ids(settings, batch) == [0]


async def test_a_failed_chunk_point_does_not_end_the_periodic_ones(client, settings, monkeypatch) -> None:
    service = client.app[UPLOADS]
    up = Uploads(client)
    batch = await up.create()
    calls: list[str] = []
    real = service.durability.sync_now

    def flaky() -> None:
        calls.append("call")
        if len(calls) == 1:
            raise OSError("disk hiccup")
        real()

    monkeypatch.setattr(service.durability, "sync_now", flaky)
    periodic = asyncio.ensure_future(service.sync_points(every=0.01))
    try:
        r = await up.post(batch, 0, PARTS[0], chunk=(0, 3), size=len(DATA))
        assert r.status == 202

        async def synced_after_the_failure() -> bool:
            return len(calls) >= 2 and synced_ids(settings, batch) == [0]
        await async_wait_until(synced_after_the_failure, timeout=10, what="a chunk point after the failed one")
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
    service = client.app[UPLOADS]
    events: list[str] = []
    real_sync, real_remove_tree = service.durability.sync_now, service_module.remove_tree
    real_remove_file = service.store.remove_file

    def sync() -> None:
        with sqlite3.connect(settings.db_path) as db:  # what the sync is about to make durable
            rows = db.execute("SELECT count(*) FROM batch_files").fetchone()[0]
        real_sync()
        events.append(f"synced with {rows} row(s)")

    def remove_tree(path):  # type: ignore[no-untyped-def]
        events.append("bytes removed")
        real_remove_tree(path)

    def remove_file(batch_pk, file_id):  # type: ignore[no-untyped-def]
        events.append("bytes removed")
        real_remove_file(batch_pk, file_id)

    monkeypatch.setattr(service.durability, "sync_now", sync)
    monkeypatch.setattr(service_module, "remove_tree", remove_tree)
    monkeypatch.setattr(service.store, "remove_file", remove_file)
    if how == "drop":
        r = await client.delete(up.url(f"/{batch}"), headers=up.auth)
        assert r.status == 204
    elif how == "delete":
        r = await client.delete(up.url(f"/{batch}/0"), headers=up.auth)
        assert r.status == 204
    else:
        await up.manifest(batch, keep=False)
    assert events[-2:] == ["synced with 0 row(s)", "bytes removed"], events
    assert upload_tree(settings.data_dir) == []


async def test_after_a_reboot_a_complete_file_whose_rename_was_lost_is_put_back(aiohttp_client, settings) -> None:
    """The record of a completed file reached the disk but its rename into place did not (it was
    not answered yet): a start after the reboot puts its synced bytes back from where they were
    (checked against the SHA-256); one whose bytes are nowhere is removed, to be sent again."""
    from server.app import create_app

    first = await aiohttp_client(create_app(settings))
    up = Uploads(first)
    batch = await up.create()
    whole, in_place, uneven, gone = os.urandom(3000), os.urandom(4000), os.urandom(2500), os.urandom(100)
    await up.upload(batch, 0, whole)
    await up.upload(batch, 1, in_place, chunk_size=1000)
    for i, part in enumerate((uneven[:1000], uneven[1000:])):  # 1000 + 1500: concatenated
        assert (await up.post(batch, 2, part, chunk=(i, 2), size=len(uneven))).status == (202, 201)[i]
    await up.upload(batch, 3, gone)
    await first.close()
    with sqlite3.connect(settings.db_path) as db:
        pk, *ids = [r[0] for r in db.execute("SELECT batch_pk FROM batch_files LIMIT 1")] + \
            [r[0] for r in db.execute("SELECT id FROM batch_files ORDER BY file_idx")]
    bdir = settings.uploads_dir / str(pk)
    # Where each file's bytes were before its rename (the rename "lost with the power").
    os.replace(bdir / f"{ids[0]}.data", bdir / ".0.feedface.part")
    (bdir / str(ids[1])).mkdir()
    os.replace(bdir / f"{ids[1]}.data", bdir / str(ids[1]) / "partial")
    (bdir / str(ids[2])).mkdir()
    os.replace(bdir / f"{ids[2]}.data", bdir / str(ids[2]) / ".data.feedface.part")
    os.remove(bdir / f"{ids[3]}.data")
    marker = settings.uploads_dir / ".synced"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "boot_id": "a-previous-boot"}))

    client = await aiohttp_client(create_app(settings))
    files = {f["fileIdx"]: f.get("sha256") for f in (await Uploads(client).manifest(batch))["files"]}
    assert files == {"0": sha256(whole), "1": sha256(in_place), "2": sha256(uneven)}
    assert sorted(upload_tree(settings.data_dir)) == sorted(f"{pk}/{i}.data" for i in ids[:3])


async def test_the_upload_threads_end_when_idle_and_start_again(client) -> None:
    """The writer and recorder threads end once idle for their linger; a request after that
    starts them again, and the service's close ends them at once."""
    service = client.app[UPLOADS]
    lanes = (service.recorder.writes, service.recorder.records)
    for lane in lanes:
        lane.linger = 0.05
    up = Uploads(client)
    batch = await up.create()
    whole = os.urandom(5000)
    r = await up.post(batch, 0, whole)  # a small whole file: the writer, then the recorder
    assert r.status == 201, await r.text()
    first = [lane.thread for lane in lanes]
    assert all(t is not None for t in first)

    async def ended() -> bool:
        return all(lane.thread is None for lane in lanes) and not any(t.is_alive() for t in first)
    await async_wait_until(ended, timeout=10, what="the idle threads to end")

    for lane in lanes:
        lane.linger = 60.0
    r = await up.post(batch, 1, PARTS[0], chunk=(0, 3), size=len(DATA))  # a chunk: the recorder only
    assert r.status == 202, await r.text()
    r = await up.post(batch, 2, DATA)
    assert r.status == 201, await r.text()
    again = [lane.thread for lane in lanes]
    assert all(t is not None and t.is_alive() and t not in first for t in again)
    files = {f["fileIdx"]: f for f in (await up.manifest(batch))["files"]}
    assert files["0"]["sha256"] == sha256(whole) and files["2"]["sha256"] == sha256(DATA)
    assert files["1"]["complete"] is False

    await service.recorder.close()  # what the clean stop runs: no wait for the linger
    assert not any(t.is_alive() for t in again)


async def test_batch_dirs_are_spread_over_the_disk(client, settings) -> None:
    """The uploads folder carries ext4's top-of-hierarchy hint (``chattr +T``), so that each
    batch's files are made in a block group of their own, not where the batches just removed
    left their freed inodes."""
    from tests.support.fs import spread

    r = await client.get("/healthz")
    assert r.status == 200
    assert spread(settings.uploads_dir)


class HeldSync:
    """Wraps ``sync_now``: a sync that starts once file 0 is recorded complete (the one that makes
    that record durable) is held until ``release``; ``holding`` lists the threads held. ``busy``:
    the next sync of another kind is held too, until ``resume`` (the recorder kept in its step)."""

    def __init__(self, settings, real) -> None:  # type: ignore[no-untyped-def]
        self.settings, self.real = settings, real
        self.held, self.release = threading.Event(), threading.Event()
        self.holding: list[str] = []
        self.busy, self.busy_held, self.resume = threading.Event(), threading.Event(), threading.Event()

    def _complete(self) -> bool:
        with sqlite3.connect(self.settings.db_path) as db:
            return db.execute("SELECT count(*) FROM batch_files WHERE file_idx = 0 AND state = 'complete'"
                              ).fetchone()[0] > 0

    def __call__(self) -> None:
        if self._complete():  # what this sync makes durable: file 0's completion
            self.holding.append(threading.current_thread().name)
            self.held.set()
            self.release.wait(10)
        elif self.busy.is_set():
            self.busy.clear()
            self.busy_held.set()
            self.resume.wait(10)
        self.real()


async def test_a_repeat_read_complete_is_answered_once_the_completion_is_durable(aiohttp_client, settings,
                                                                                 monkeypatch) -> None:
    """SQLite commits with synchronous=NORMAL: the commit that completes a file survives a power
    loss only once the sync after it has run, and its 201 waits for that. A chunk sent again
    meanwhile (a client's retry) reads the row complete: its 201 must wait for a sync too."""
    client = await aiohttp_client(create_app(settings.replace(upload_sync_interval=3600)))  # no periodic point
    service = client.app[UPLOADS]
    up = Uploads(client)
    batch = await up.create()
    for i in (0, 1):
        assert (await up.post(batch, 0, PARTS[i], chunk=(i, 3), size=len(DATA))).status == 202
    sync = HeldSync(settings, service.durability.sync_now)
    monkeypatch.setattr(service.durability, "sync_now", sync)
    last = asyncio.ensure_future(up.post(batch, 0, PARTS[2], chunk=(2, 3), size=len(DATA)))
    try:
        assert await asyncio.to_thread(sync.held.wait, 10), "the completion's sync never started"
        repeat = asyncio.ensure_future(up.post(batch, 0, PARTS[0], chunk=(0, 3), size=len(DATA)))

        async def decided() -> bool:  # answered, or waiting for a sync of its own
            return repeat.done() or len(sync.holding) > 1
        await async_wait_until(decided, timeout=10, what="the repeat to be answered or to wait for a sync")
        assert not repeat.done(), "the repeat was answered before the completion was durable"
        assert not last.done()
    finally:
        sync.release.set()
    answers = await asyncio.gather(last, repeat)
    assert [r.status for r in answers] == [201, 201]
    assert [(await r.json())["uploadedChunkIds"] for r in answers] == [[0, 1, 2]] * 2
    assert (await up.manifest(batch))["files"][0]["sha256"] == sha256(DATA)


async def test_a_repeat_recorded_with_the_completion_is_answered_once_it_is_durable(aiohttp_client, settings,
                                                                                    monkeypatch) -> None:
    """The same for a repeat the recorder meets in the very group that completes the file: a
    retry of chunk 1 whose body was still arriving when the first copy was recorded. The group
    answers repeats at once; one that says complete must wait for the sync after the commit."""
    client = await aiohttp_client(create_app(settings.replace(upload_sync_interval=3600)))
    service = client.app[UPLOADS]
    up = Uploads(client)
    batch = await up.create()
    assert (await up.post(batch, 0, PARTS[0], chunk=(0, 3), size=len(DATA))).status == 202
    go = asyncio.Event()

    async def late_body():  # type: ignore[no-untyped-def]
        yield PARTS[1][:1]  # aiohttp sends the headers with the first piece
        await go.wait()
        yield PARTS[1][1:]

    retry = asyncio.ensure_future(up.post(batch, 0, late_body(), chunk=(1, 3), size=len(DATA)))  # type: ignore[arg-type]

    def receiving() -> bool:  # past its early answer: its body's temp is open
        return any(os.path.basename(p).startswith(".1.") for p in upload_tree(settings.data_dir))
    sync = HeldSync(settings, service.durability.sync_now)
    monkeypatch.setattr(service.durability, "sync_now", sync)
    try:
        await async_wait_until(lambda: asyncio.to_thread(receiving), timeout=10, what="the retry's temp")
        assert (await up.post(batch, 0, PARTS[1], chunk=(1, 3), size=len(DATA))).status == 202
        # Keep the recorder in a step (another file's sync) while the last chunk and the retry
        # queue up behind it: they are recorded in one group.
        sync.busy.set()
        other = asyncio.ensure_future(up.post(batch, 1, b"other"))
        assert await asyncio.to_thread(sync.busy_held.wait, 10)
        last = asyncio.ensure_future(up.post(batch, 0, PARTS[2], chunk=(2, 3), size=len(DATA)))
        records = service.recorder.records

        async def queued(n: int) -> bool:
            return len(records.queue) == n
        await async_wait_until(lambda: queued(1), timeout=10, what="the last chunk queued")
        go.set()
        await async_wait_until(lambda: queued(2), timeout=10, what="the retry queued")
        sync.resume.set()
        assert await asyncio.to_thread(sync.held.wait, 10), "the completion's sync never started"

        async def decided() -> bool:
            return retry.done() or len(sync.holding) > 1
        await async_wait_until(decided, timeout=10, what="the retry to be answered or to wait for a sync")
        assert not retry.done(), "the retry was answered complete before the completion was durable"
        assert not last.done()
    finally:
        go.set()
        sync.resume.set()
        sync.release.set()
    answers = await asyncio.gather(last, retry, other)
    assert [r.status for r in answers] == [201, 201, 201]
    assert (await answers[1].json())["uploadedChunkIds"] == [0, 1, 2]
    assert (await up.manifest(batch, 0))["files"][0]["sha256"] == sha256(DATA)
