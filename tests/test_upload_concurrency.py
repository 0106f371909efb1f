"""100 clients at once against the real server: whole files, chunks in place sent in parallel
and out of order (some twice), chunkings that need concatenating, all in a few shared batches.
Every file ends whole, exactly once, and nothing but the complete files is left on disk."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import random
import re
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import API_KEY
from tests.support.uploads import upload_headers, upload_tree

pytestmark = pytest.mark.timeout(180)
CLIENTS = 100
KIB = 1024


async def _post(s: aiohttp.ClientSession, url: str, batch: str, idx: int, body: bytes, size: int,
                chunk: tuple[int, int] | None = None) -> int:
    h = upload_headers(f"file-{idx}.bin", size, chunk=chunk)
    data = io.BytesIO(body) if len(body) > 1 << 20 else body
    async with s.post(f"{url}/api/v1/upload/{batch}/{idx}", data=data, headers=h) as r:
        assert r.status in (201, 202), (r.status, await r.text())
        return r.status


async def _client(s: aiohttp.ClientSession, url: str, batch: str, idx: int, rng: random.Random) -> tuple[int, str]:
    kind = idx % 4
    if kind == 0:  # a whole file
        data = rng.randbytes(rng.randrange(1, 64 * KIB))
        assert await _post(s, url, batch, idx, data, len(data)) == 201
        return idx, hashlib.sha256(data).hexdigest()
    if kind in (1, 2):  # uniform chunks, in place: in parallel (1) or shuffled one by one, one sent twice (2)
        n, size = rng.randrange(3, 9), 16 * KIB
        data = rng.randbytes(size * n - rng.randrange(1, size))
        parts = [data[i:i + size] for i in range(0, len(data), size)]
        order = list(range(len(parts)))
        rng.shuffle(order)
        if kind == 1:
            statuses = await asyncio.gather(*(_post(s, url, batch, idx, parts[i], len(data), (i, len(parts)))
                                              for i in order))
            assert statuses.count(201) >= 1
        else:
            for i in order + [order[0]]:
                await _post(s, url, batch, idx, parts[i], len(data), (i, len(parts)))
        return idx, hashlib.sha256(data).hexdigest()
    # Chunks of different sizes: stored on their own, concatenated; the last two sent together.
    cuts = sorted(rng.sample(range(1, 40 * KIB), 3))
    data = rng.randbytes(40 * KIB)
    bounds = [0, *cuts, len(data)]
    parts = [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    for i in range(len(parts) - 2):
        await _post(s, url, batch, idx, parts[i], len(data), (i, len(parts)))
    last = len(parts) - 1
    await asyncio.gather(_post(s, url, batch, idx, parts[last - 1], len(data), (last - 1, len(parts))),
                         _post(s, url, batch, idx, parts[last], len(data), (last, len(parts))))
    return idx, hashlib.sha256(data).hexdigest()


def test_a_hundred_clients_at_once(server_factory, tmp_path: Path) -> None:
    srv = server_factory()
    rng = random.Random(9)
    seeds = [rng.randrange(1 << 30) for _ in range(CLIENTS)]

    async def run() -> None:
        connector = aiohttp.TCPConnector(limit=CLIENTS * 2)
        async with aiohttp.ClientSession(connector=connector) as s:
            batches = []
            for _ in range(4):
                async with s.post(srv.url + "/api/v1/upload/", headers={"X-API-Key": API_KEY}) as r:
                    batches.append((await r.json())["batchId"])
            results = await asyncio.gather(*(_client(s, srv.url, batches[i % 4], i, random.Random(seeds[i]))
                                             for i in range(CLIENTS)))
            expected = {i: sha for i, sha in results}
            for b, batch in enumerate(batches):
                async with s.post(f"{srv.url}/api/v1/upload/{batch}/execute/Batch.Manifest",
                                  headers={"X-API-Key": API_KEY, "X-Batch-No-Drop": "true"}) as r:
                    files = (await r.json())["files"]
                assert {int(f["fileIdx"]): f.get("sha256") for f in files} == \
                    {i: sha for i, sha in expected.items() if i % 4 == b}

    asyncio.run(run())
    srv.stop()  # a clean stop: the chunk point, every assembly done
    tree = upload_tree(tmp_path / "srv")
    assert len(tree) == CLIENTS and all(re.fullmatch(r"\d+/\d+\.data", p) for p in tree), tree
    log = Path(srv.log_path).read_text()
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
    assert os.path.exists(tmp_path / "srv" / "uploads" / ".synced")
