"""A power loss right after grouped 201s loses nothing answered complete.

A sync makes durable what was written before it started, nothing more (whatever else the disk
happens to hold is luck). So at the start of every sync of the upload service the test copies
the data dir -- the database's committed state (SQLite's backup API) and every file under
``uploads/`` -- as an image: once that sync has returned, its image is what a power loss is
sure to leave. Then:

* every file answered 201 is complete, with its bytes, in the image of the last sync that had
  returned before its answer (the answer waited for a sync that covered its record);
* at every moment, each file the database says complete has its bytes in the image of the last
  sync that had returned (the bytes were synced before the record that says complete: the
  worst a power loss can do is keep a late record and lose late bytes);
* a server started on the image of the sync before the last 201, as after a reboot, serves
  every file answered complete until then, whole.

Many whole files and chunked ones (in place and concatenated) complete at about the same moment,
so the 201s are grouped: they share syncs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from server.app import create_app
from server.keys import UPLOADS
from tests.support.uploads import Uploads, sha256

pytestmark = pytest.mark.timeout(120)


class Images:
    """Copies of the data dir taken when each sync starts; ``done`` counts the syncs returned."""

    def __init__(self, settings, root: Path) -> None:  # type: ignore[no-untyped-def]
        self.settings, self.root = settings, root
        self.lock = threading.Lock()
        self.taken = 0
        self.done: list[int] = []  # image numbers of the syncs that returned, in order
        self.violations: list[str] = []

    def wrap(self, sync):  # type: ignore[no-untyped-def]
        def sync_with_image() -> None:
            with self.lock:
                n = self.taken
                self.taken += 1
            image = self.take(n)
            self.check(image)
            sync()
            with self.lock:
                self.done.append(n)
        return sync_with_image

    def take(self, n: int) -> Path:
        image = self.root / str(n)
        image.mkdir(parents=True)
        with sqlite3.connect(self.settings.db_path) as src, sqlite3.connect(image / "filedrop.sqlite3") as dst:
            src.backup(dst)  # the committed state, consistent
        uploads = self.settings.uploads_dir
        for dirpath, _dirs, files in os.walk(uploads):
            for name in files:
                path = Path(dirpath) / name
                target = image / "uploads" / path.relative_to(uploads)
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    shutil.copyfile(path, target)
                except FileNotFoundError:
                    pass  # renamed or removed meanwhile: not durable anyway
        return image

    def check(self, image: Path) -> None:
        """The database now (this image's) with the bytes of the last image whose sync returned:
        each complete file's bytes are there, in place or where they were before their rename
        (which a start after a reboot puts back, checking their SHA-256)."""
        with self.lock:
            last = self.done[-1] if self.done else None
        if last is None:
            return
        durable = self.root / str(last) / "uploads"
        with sqlite3.connect(image / "filedrop.sqlite3") as db:
            for pk, fid, idx, sha in db.execute(
                    "SELECT batch_pk, id, file_idx, sha256 FROM batch_files WHERE state = 'complete'"):
                places = [durable / str(pk) / f"{fid}.data", durable / str(pk) / str(fid) / "partial",
                          *(durable / str(pk) / str(fid)).glob(".data.*.part"), *(durable / str(pk)).glob(f".{idx}.*.part")]
                if not any(p.exists() and hashlib.sha256(p.read_bytes()).hexdigest() == sha for p in places):
                    self.violations.append(f"file {fid} is complete in the database before its bytes are durable")

    def complete_in(self, n: int) -> dict[tuple[str, int], str]:
        """{(batch id, fileIdx): sha256} of the files complete, with their bytes, in image ``n``."""
        image = self.root / str(n)
        out = {}
        with sqlite3.connect(image / "filedrop.sqlite3") as db:
            for batch, pk, idx, fid, sha in db.execute(
                    "SELECT b.batch_id, f.batch_pk, f.file_idx, f.id, f.sha256 FROM batch_files f "
                    "JOIN batches b ON b.id = f.batch_pk WHERE f.state = 'complete'"):
                data = image / "uploads" / str(pk) / f"{fid}.data"
                if data.exists() and hashlib.sha256(data.read_bytes()).hexdigest() == sha:
                    out[(batch, idx)] = sha
        return out


async def test_a_power_loss_right_after_grouped_201s_loses_nothing_answered_complete(client, settings, tmp_path,
                                                                                      monkeypatch) -> None:
    service = client.app[UPLOADS]
    images = Images(settings, tmp_path / "images")
    monkeypatch.setattr(service.durability, "sync_now", images.wrap(service.durability.sync_now))
    up = Uploads(client)
    batch = await up.create()
    whole = {i: os.urandom(2000 + i) for i in range(24)}
    uniform = {100 + i: os.urandom(4 * 3000) for i in range(4)}  # written in place
    uneven = {200 + i: os.urandom(5000) for i in range(2)}  # 2000 + 3000: concatenated
    answered: dict[int, tuple[int, str]] = {}  # fileIdx -> (syncs returned when answered, sha256)

    async def send_whole(idx: int, data: bytes) -> None:
        r = await up.post(batch, idx, data, f"w{idx}")
        assert r.status == 201, await r.text()
        answered[idx] = (len(images.done), sha256(data))

    async def send_chunks(idx: int, data: bytes, cuts: list[int]) -> None:
        bounds = [0, *cuts, len(data)]
        parts = [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
        for i, part in enumerate(parts):
            r = await up.post(batch, idx, part, f"c{idx}", chunk=(i, len(parts)), size=len(data))
            assert r.status == (201 if i == len(parts) - 1 else 202), await r.text()
        answered[idx] = (len(images.done), sha256(data))

    await asyncio.gather(*(send_whole(i, d) for i, d in whole.items()),
                         *(send_chunks(i, d, [3000, 6000, 9000]) for i, d in uniform.items()),
                         *(send_chunks(i, d, [2000]) for i, d in uneven.items()))
    assert service.recorder.groups < len(answered), "the 201s were not grouped"
    assert images.violations == []
    for idx, (returned, sha) in answered.items():
        n = images.done[returned - 1]  # the last sync that had returned: its image is durable
        assert images.complete_in(n).get((batch, idx)) == sha, f"file {idx} answered 201 but not durable"

    # The power loss: a server started on the image of the sync before the last 201, rebooted.
    last = images.done[max(r for r, _ in answered.values()) - 1]
    restored = tmp_path / "restored"
    shutil.copytree(images.root / str(last), restored)
    marker = restored / "uploads" / ".synced"
    marker.write_text(json.dumps({"boot_id": "a-previous-boot", "at": "2026-01-01T00:00:00"}))
    after = settings.replace(data_dir=restored, db_path=None, smartlink_root=None)
    fresh = TestClient(TestServer(create_app(after)))
    await fresh.start_server()
    try:
        up2 = Uploads(fresh)
        files = {int(f["fileIdx"]): f.get("sha256") for f in (await up2.manifest(batch))["files"]}
        for idx, (_returned, sha) in answered.items():
            assert files.get(idx) == sha, f"file {idx} lost or damaged by the power loss"
    finally:
        await fresh.close()
