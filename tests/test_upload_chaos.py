"""Copies of one chunk racing the completion of their file: every copy is answered as the first
was (a repeat of a chunk of a complete file is a 201 with its SHA-256), whatever moment the file
completes at."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest

from tests.support.uploads import Uploads, holds, sha256, split, upload_headers, upload_tree
from tests.support.waiting import async_wait_until

pytestmark = pytest.mark.timeout(60)
MIB = 1 << 20
CHUNK = 2 * MIB  # streamed (over one write block), so a copy is on disk before its body ends


async def held(data: bytes, go: asyncio.Event) -> AsyncIterator[bytes]:
    """A body whose first half is sent at once, the rest once ``go`` is set."""
    yield data[: len(data) // 2]
    await go.wait()
    yield data[len(data) // 2:]


async def test_a_copy_stored_on_its_own_while_its_file_completes_is_answered_as_a_repeat(client, settings) -> None:
    """Chunk 1 (the last) is sent twice at once: the first copy is written in place, the second
    into a temp of its own. The first completes the file, whose file dir (the second's temp in
    it) then goes. The second, ended after that, is a repeat of a chunk of a complete file: 201
    with the file's SHA-256 (it used to be 404 ERR_FILE_NOT_FOUND "the file was removed while
    receiving file 0; send it again": its request prepared the file from what it had read before
    its body, and found its own temp gone)."""
    up = Uploads(client)
    batch = await up.create()
    data = os.urandom(2 * CHUNK)
    parts = split(data, CHUNK)
    assert (await up.post(batch, 0, parts[0], chunk=(0, 2), size=len(data))).status == 202
    [partial] = [settings.uploads_dir / p for p in upload_tree(settings.data_dir) if p.endswith("/partial")]
    headers = {**upload_headers("f.bin", len(data), chunk=(1, 2)), "Content-Length": str(CHUNK)}
    url = up.url(f"/{batch}/0")
    first_go, second_go = asyncio.Event(), asyncio.Event()
    first = asyncio.ensure_future(client.post(url, data=held(parts[1], first_go), headers=headers))
    await async_wait_until(lambda: asyncio.to_thread(holds, partial, CHUNK, parts[1][:MIB]), timeout=10,
                           what="the first copy's bytes in place")
    second = asyncio.ensure_future(client.post(url, data=held(parts[1], second_go), headers=headers))
    await async_wait_until(lambda: asyncio.to_thread(
        lambda: any("/chunks/.1." in p for p in upload_tree(settings.data_dir))), timeout=10,
        what="the second copy's temp")
    first_go.set()
    r1 = await first
    assert r1.status == 201, await r1.text()
    assert (await r1.json())["sha256"] == sha256(data)
    second_go.set()
    r2 = await second
    assert r2.status == 201, await r2.text()
    assert (await r2.json())["sha256"] == sha256(data)
    assert (await up.manifest(batch))["files"][0]["sha256"] == sha256(data)
