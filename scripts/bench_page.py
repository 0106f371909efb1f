#!/usr/bin/env python3
"""``scripts/bench.py page``: the drop page's upload speed against a plain client, same run.

One file (default 256 MiB) goes up through the project's NGINX into a real ``filedrop serve``:

* page: headless Chromium (Debian's, through Selenium) on the drop page, from picking the file
  until its row is ``complete`` (the server assembled it and reported its SHA-256);
* baseline: a Python aiohttp client speaking the same protocol through the same NGINX to the same
  server: the same chunk size, 3 chunks in flight, then polling the file's info until complete.

For each chunk size (``FILEDROP_CHUNK_SIZE``; the server is restarted with it) the reps alternate
page and client; the table shows medians and the ratio page / client within each rep. Each
upload's batch is dropped afterwards. Needs ``FILEDROP_SETUP_TEST=1 scripts/setup`` (Chromium).
Options: ``--size-mib N`` (256), ``--chunk-sizes 4M,8M,16M`` (8M), ``--reps N`` (3).

``--small-files N``: instead, N files of 255 bytes (a folder of small documents) picked at once,
from the pick until every row is ``complete``, against the same client sending them as the page
does (3 files at a time, one chunk ``POST`` each, whose 201 carries the SHA-256; an info ``GET``
only when it does not, as from a server before that), alternated, medians.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from statistics import median

import aiohttp

REPO = Path(__file__).resolve().parents[1]
KEY = "bench-key-0123456789"
MiB = 1 << 20
IN_FLIGHT = 3  # the page's chunks in flight per file
SMALL_SIZE = 255  # bytes of each of --small-files


HEADERS = {"X-API-Key": KEY}


@contextlib.asynccontextmanager
async def new_batch(base: str) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    """A session and a new upload batch of its own, dropped at the end."""
    async with aiohttp.ClientSession(base) as s:
        async with s.post("/api/v1/upload", headers=HEADERS) as r:
            batch = (await r.json())["batchId"]
        try:
            yield s, batch
        finally:
            async with s.delete(f"/api/v1/upload/{batch}", headers=HEADERS):
                pass


def chunk_headers(name: str, size: int, index: int, count: int, content_type: str) -> dict[str, str]:
    return {**HEADERS, "X-Upload-Type": "chunked", "X-Upload-Chunk-Index": str(index),
            "X-Upload-Chunk-Count": str(count), "X-File-Size": str(size), "X-File-Name": name,
            "Content-Type": content_type}


async def client_upload(base: str, path: Path, chunk: int) -> tuple[float, str]:
    """Upload ``path`` as the page does; seconds until the server reports it complete."""
    size = path.stat().st_size
    count = max(1, -(-size // chunk))
    start = time.perf_counter()
    async with new_batch(base) as (s, batch):
        queue = list(range(count))

        async def worker() -> None:
            with open(path, "rb") as f:
                while queue:
                    i = queue.pop(0)
                    f.seek(i * chunk)
                    body = f.read(chunk)
                    h = chunk_headers(path.name, size, i, count, "application/octet-stream")
                    async with s.post(f"/api/v1/upload/{batch}/0", data=body, headers=h) as r:
                        assert r.status in (201, 202), await r.text()

        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
        for _ in range(6000):  # bounded: 10 min at 0.1 s
            async with s.get(f"/api/v1/upload/{batch}/0", headers=HEADERS) as r:
                info = await r.json()
            if info.get("complete") and info.get("sha256"):
                break
            await asyncio.sleep(0.1)  # poll interval under a bound
        elapsed = time.perf_counter() - start
    return elapsed, info["sha256"]


async def client_small_files(base: str, paths: list[Path]) -> float:
    """The small files as the page sends them: 3 at a time, each one chunk (its info asked only
    when the chunk's answer lacks the SHA-256)."""
    start = time.perf_counter()
    async with new_batch(base) as (s, batch):
        todo = list(enumerate(paths))

        async def worker() -> None:
            while todo:
                idx, path = todo.pop(0)
                body = path.read_bytes()
                h = chunk_headers(path.name, len(body), 0, 1, "text/plain")
                async with s.post(f"/api/v1/upload/{batch}/{idx}", data=body, headers=h) as r:
                    assert r.status == 201, await r.text()
                    if (await r.json()).get("sha256"):
                        continue
                async with s.get(f"/api/v1/upload/{batch}/{idx}", headers=HEADERS) as r:
                    assert (await r.json())["complete"]

        await asyncio.gather(*(worker() for _ in range(3)))
        elapsed = time.perf_counter() - start
    return elapsed


def page_small_files(page, base: str, paths: list[Path]) -> float:  # type: ignore[no-untyped-def]
    page.driver.execute_script("localStorage.clear()")  # a new batch, nothing to resume
    page.open()
    page.wait_key_accepted()
    start = time.perf_counter()
    page.add_files(paths)
    page.wait_rows({p.name: "complete" for p in paths}, timeout=900)
    elapsed = time.perf_counter() - start
    batch = page.batch_id()
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(f"{base}/api/v1/upload/{batch}", method="DELETE",
                                                  headers={"X-API-Key": KEY}), timeout=60).close()
    return elapsed


def page_upload(page, base: str, path: Path) -> tuple[float, str]:  # type: ignore[no-untyped-def]
    page.driver.execute_script("localStorage.clear()")  # a new batch, nothing to resume
    page.open()
    page.wait_key_accepted()
    start = time.perf_counter()
    page.add_files([path])
    rows = page.wait_rows({path.name: "complete"}, timeout=600)
    elapsed = time.perf_counter() - start
    batch = page.batch_id()
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(f"{base}/api/v1/upload/{batch}", method="DELETE",
                                                  headers={"X-API-Key": KEY}), timeout=60).close()
    return elapsed, rows[0]["sha256"]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench.py page")
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--chunk-sizes", default="8M")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--small-files", type=int, default=0, help="N small files instead of one large one")
    args = ap.parse_args(argv)

    from server.config import Settings, parse_size
    from server.db.migrate import upgrade
    from tests.support.browser import DropPage, start_browser
    from tests.support.nginx import NginxFactory
    from tests.support.server import ServerProcess, server_env
    from tests.support.waiting import free_port

    work = Path(tempfile.mkdtemp(prefix="bench-page-", dir=REPO / "var" if (REPO / "var").is_dir() else None))
    data = work / "srv"
    upgrade(data / "filedrop.sqlite3")
    path = work / "upload.bin"
    small = [work / "docs" / f"doc-{i:05d}.txt" for i in range(args.small_files)]
    if small:
        small[0].parent.mkdir()
        for i, p in enumerate(small):
            p.write_bytes(f"document {i:05d}\n".encode() * 17)  # SMALL_SIZE bytes
        args.chunk_sizes = args.chunk_sizes.split(",")[0]
    else:
        with open(path, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MiB))
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if not small else ""
    driver = start_browser(work / "profile", work / "downloads")
    factory = NginxFactory(work / "nginx")
    rows: list[tuple[str, float, float, float]] = []
    try:
        for text in args.chunk_sizes.split(","):
            chunk = parse_size(text)
            http_port = free_port()
            env = server_env(data, KEY, http_port=str(http_port), chunk_size=text, max_chunk_size="64M")
            app = ServerProcess(env, work / f"server-{text}.log").start()
            try:
                ngx = factory.start(Settings.from_env(env), app_port=app.port, http_port=http_port)
                page = DropPage(driver, ngx.page_url, "bench").open()
                page.enter_key(KEY)
                page.wait_key_accepted()
                page_s, client_s = [], []
                for _ in range(args.reps):
                    if small:
                        page_s.append(page_small_files(page, ngx.url, small))
                        client_s.append(asyncio.run(client_small_files(ngx.url, small)))
                        continue
                    t, sha = page_upload(page, ngx.url, path)
                    assert sha == digest, "the page's upload has the wrong SHA-256"
                    page_s.append(t)
                    t, sha = asyncio.run(client_upload(ngx.url, path, chunk))
                    assert sha == digest, "the client's upload has the wrong SHA-256"
                    client_s.append(t)
                ratios = [c / p for p, c in zip(page_s, client_s, strict=True)]
                rows.append((text, median(page_s), median(client_s), median(ratios)))
                ngx.stop()
            finally:
                app.stop()
    finally:
        driver.quit()
        factory.stop_all()
        import shutil

        shutil.rmtree(work, ignore_errors=True)

    if small:
        n = len(small)
        print(f"{n:,} files of {SMALL_SIZE} bytes through NGINX into filedrop, "
              f"picked at once; median of {args.reps}; until every row is complete.\n")
        head, client = "files", "Python client (as the page sends)"

        def label(_text: str) -> str:
            return f"{n:,}"

        def cell(secs: float) -> str:
            return f"{secs:.1f} s ({n / secs:,.0f} files/s)"
    else:
        mb = args.size_mib * MiB / 1e6
        print(f"One {args.size_mib} MiB file through NGINX into filedrop, {IN_FLIGHT} chunks in flight, "
              f"median of {args.reps}; until the server reports the file complete with its SHA-256.\n")
        head, client = "chunk size", "Python client"

        def label(text: str) -> str:
            return text

        def cell(secs: float) -> str:
            return f"{secs:.2f} s ({mb / secs:,.0f} MB/s)"
    print(f"| {head} | drop page (headless Chromium) | {client} | page speed / client speed |")
    print("| --- | ---: | ---: | ---: |")
    for text, p, c, r in rows:
        print(f"| {label(text)} | {cell(p)} | {cell(c)} | {r:.2f} |")
    return 0

if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main(sys.argv[1:]))
