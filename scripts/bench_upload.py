#!/usr/bin/env python3
"""``scripts/bench.py upload``: filedrop's upload path against a bare aiohttp handler, same run.

* large: one 1 GiB file in 8 MiB chunks, sent in order over one connection (as the nuxeo
  client does), through the real server (``python -m server serve`` subprocess) until the last
  chunk's answer, which comes after assembly (concatenate + SHA-256 + fsync + rename);
* small: 2,000 files of 16 KiB, 8 requests in flight, each a normal (one-chunk) upload;
* baselines: a bare aiohttp app in its own process whose handler streams each request body to
  a new file, once with aiofiles and once with writes in a thread (``--fsync`` adds the fsync
  that filedrop does for every chunk, so both sides are durable);
* the server's peak RSS (VmHWM from /proc/<pid>/status) after all runs.

Everything is written under a temp dir on the repository's disk and removed at the end.
Options: ``--size-mib N`` (default 1024), ``--files N`` (default 2000), ``--reps N`` (default 3;
the table shows medians, and ratios are taken within each rep).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from statistics import median

import aiohttp

REPO = Path(__file__).resolve().parents[1]
KEY = "bench-key-0123456789"
MiB = 1 << 20
RSS_FLOOR_MB = 150
RATIO_FLOOR = 0.7


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)  # poll interval under a deadline
    raise SystemExit(f"{url} did not come up in {timeout}s")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# -- the baseline: a bare aiohttp handler streaming a body to a file ---------------------------
def serve_baseline(port: int, root: Path, mode: str, fsync: bool) -> None:
    import aiofiles
    from aiohttp import web

    counter = itertools.count()

    async def receive(request: web.Request) -> web.Response:
        path = root / f"{next(counter)}.bin"
        size = 0
        if mode == "aiofiles":
            async with aiofiles.open(path, "wb") as f:
                async for data in request.content.iter_chunked(1 << 20):
                    await f.write(data)
                    size += len(data)
                if fsync:
                    await f.flush()
                    await asyncio.to_thread(os.fsync, f.fileno())
        else:
            with open(path, "wb") as f:
                async for data in request.content.iter_chunked(1 << 20):
                    await asyncio.to_thread(f.write, data)
                    size += len(data)
                if fsync:
                    await asyncio.to_thread(lambda: (f.flush(), os.fsync(f.fileno())))
        return web.json_response({"size": size}, status=201)

    async def healthz(_r: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/upload", receive)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


class Proc:
    def __init__(self, argv: list[str], env: dict[str, str], health: str, log: Path) -> None:
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        wait_healthy(health, self.proc)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_baseline(tmp: Path, mode: str, fsync: bool) -> tuple[Proc, str, Path]:
    port = free_port()
    root = tmp / f"bare-{mode}{'-fsync' if fsync else ''}"
    root.mkdir()
    argv = [sys.executable, __file__, "--serve-baseline", str(port), str(root), mode] + (["--fsync"] if fsync else [])
    return Proc(argv, dict(os.environ), f"http://127.0.0.1:{port}/healthz", tmp / "bare.log"), \
        f"http://127.0.0.1:{port}/upload", root


def start_server(tmp: Path) -> tuple[Proc, str]:
    sys.path.insert(0, str(REPO))
    from server.db.migrate import upgrade

    data = tmp / "srv"
    upgrade(data / "filedrop.sqlite3")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FILEDROP_")}
    env.update({"FILEDROP_DATA_DIR": str(data), "FILEDROP_APP_PORT": str(port), "FILEDROP_API_KEYS": KEY,
                "FILEDROP_MIN_FREE_DISK": "64M", "FILEDROP_JANITOR_INTERVAL": "0", "FILEDROP_LOG_LEVEL": "WARNING"})
    url = f"http://127.0.0.1:{port}"
    return Proc([sys.executable, "-m", "server", "serve"], env, url + "/healthz", tmp / "server.log"), url


# -- clients ------------------------------------------------------------------------------------
async def large_bare(url: str, block: bytes, chunks: int) -> float:
    async with aiohttp.ClientSession() as s:
        t = time.perf_counter()
        for _ in range(chunks):
            async with s.post(url, data=block) as r:
                assert r.status == 201, await r.text()
        return time.perf_counter() - t


async def large_filedrop(url: str, block: bytes, chunks: int) -> tuple[float, float]:
    """Seconds until the last chunk is answered, and until the file is assembled (the
    manifest, which waits for assembly, has its SHA-256)."""
    h = {"X-API-Key": KEY}
    size = len(block) * chunks
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/api/v1/upload/", headers=h) as r:
            batch = (await r.json())["batchId"]
        t = time.perf_counter()
        for i in range(chunks):
            hh = {**h, "X-File-Name": "large.bin", "X-File-Size": str(size), "X-Upload-Type": "chunked",
                  "X-Upload-Chunk-Index": str(i), "X-Upload-Chunk-Count": str(chunks),
                  "Content-Type": "application/octet-stream"}
            async with s.post(f"{url}/api/v1/upload/{batch}/0", data=block, headers=hh) as r:
                assert r.status in (201, 202), await r.text()
        answered = time.perf_counter() - t
        async with s.post(f"{url}/api/v1/upload/{batch}/execute/Batch.Manifest", headers=h) as r:
            files = (await r.json())["files"]  # executing also removes the batch
        assembled = time.perf_counter() - t
    expected = hashlib.sha256()
    for _ in range(chunks):
        expected.update(block)
    assert files[0]["sha256"] == expected.hexdigest(), "assembled file differs"
    return answered, assembled


async def small_run(post_one, count: int, parallel: int = 8) -> float:  # type: ignore[no-untyped-def]
    queue = iter(range(count))

    async def worker() -> None:
        for i in queue:
            await post_one(i)

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(parallel)))
    return time.perf_counter() - t


async def small_bare(url: str, blob: bytes, count: int) -> float:
    async with aiohttp.ClientSession() as s:
        async def one(_i: int) -> None:
            async with s.post(url, data=blob) as r:
                assert r.status == 201
        return await small_run(one, count)


async def small_filedrop(url: str, blob: bytes, count: int) -> float:
    h = {"X-API-Key": KEY}
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/api/v1/upload/", headers=h) as r:
            batch = (await r.json())["batchId"]

        async def one(i: int) -> None:
            hh = {**h, "X-File-Name": f"small-{i}.bin", "X-File-Size": str(len(blob)),
                  "Content-Type": "application/octet-stream"}
            async with s.post(f"{url}/api/v1/upload/{batch}/{i}", data=blob, headers=hh) as r:
                assert r.status == 201, await r.text()
        elapsed = await small_run(one, count)
        async with s.post(f"{url}/api/v1/upload/{batch}/execute/Batch.Manifest", headers=h) as r:
            assert len((await r.json())["files"]) == count
    return elapsed


def clear(root: Path) -> None:
    for p in root.iterdir():
        p.unlink()


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--serve-baseline":
        serve_baseline(int(argv[1]), Path(argv[2]), argv[3], "--fsync" in argv)
        return 0
    ap = argparse.ArgumentParser(prog="scripts/bench.py upload")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--chunk-mib", type=int, default=8)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--file-kib", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    block = os.urandom(args.chunk_mib * MiB)
    chunks = args.size_mib // args.chunk_mib
    blob = os.urandom(args.file_kib * 1024)
    tmp = Path(tempfile.mkdtemp(prefix=".bench-upload-", dir=REPO))
    results: dict[str, list[float]] = {}
    procs: list[Proc] = []
    try:
        server, url = start_server(tmp)
        procs.append(server)
        bares = {}
        for mode, fsync in (("aiofiles", False), ("thread", False), ("thread", True)):
            proc, burl, root = start_baseline(tmp, mode, fsync)
            procs.append(proc)
            bares[f"bare {mode}{' + fsync' if fsync else ''}"] = (burl, root)
        for _ in range(args.reps):
            for name, (burl, root) in bares.items():
                results.setdefault(f"large {name}", []).append(asyncio.run(large_bare(burl, block, chunks)))
                clear(root)
            answered, assembled = asyncio.run(large_filedrop(url, block, chunks))
            results.setdefault("large filedrop", []).append(answered)
            results.setdefault("large filedrop assembled", []).append(assembled)
            for name, (burl, root) in bares.items():
                results.setdefault(f"small {name}", []).append(asyncio.run(small_bare(burl, blob, args.files)))
                clear(root)
            results.setdefault("small filedrop", []).append(asyncio.run(small_filedrop(url, blob, args.files)))
        rss = peak_rss_mb(server.proc.pid)
    finally:
        for p in procs:
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    # The machine is shared: every rep runs all variants back to back, each ratio is taken
    # within its rep, and the table shows medians (rates and ratios).
    mb = args.size_mib * MiB / 1e6
    reps = range(args.reps)

    def rate(key: str, amount: float) -> list[float]:
        return [amount / t for t in results[key]]

    def ratio_row(label: str, key: str, amount: float, prefix: str, digits: int = 0) -> float:
        fd = rate(key, amount)
        bare = {k: rate(f"{prefix} {k}", amount) for k in bares}
        best_bare = [max(bare["bare aiofiles"][i], bare["bare thread"][i]) for i in reps]
        to_best = median([fd[i] / best_bare[i] for i in reps])
        to_durable = median([fd[i] / bare["bare thread + fsync"][i] for i in reps])
        cells = " | ".join(f"{median(bare[k]):.{digits}f}" for k in bares)
        print(f"| {label} | {median(fd):.{digits}f} | {cells} | {to_best:.2f} | {to_durable:.2f} |")
        return to_best

    print(f"Upload benchmark: {args.size_mib} MiB in {args.chunk_mib} MiB chunks (in order, one connection); "
          f"{args.files} files of {args.file_kib} KiB (8 in flight); medians of {args.reps} reps; "
          f"{os.cpu_count()} cores.\n")
    print("| measurement | filedrop | bare aiohttp, aiofiles | bare aiohttp, thread | bare, thread + fsync "
          "| ratio to best bare | ratio to bare + fsync |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    ratio = ratio_row(f"{args.size_mib} MiB file, MB/s, last chunk answered", "large filedrop", mb, "large")
    ratio_row(f"{args.size_mib} MiB file, MB/s, assembled (SHA-256 known)", "large filedrop assembled", mb, "large")
    ratio_row(f"{args.files} files of {args.file_kib} KiB, files/s", "small filedrop", args.files, "small")
    print(f"| server peak RSS (VmHWM), MB | {rss:.0f} | | | | | |")
    ok = ratio >= RATIO_FLOOR and rss <= RSS_FLOOR_MB
    print(f"\nfloors: large-file ratio (last chunk answered, to the best bare handler) >= {RATIO_FLOOR}: "
          f"{ratio:.2f} {'met' if ratio >= RATIO_FLOOR else 'MISSED'}; peak RSS <= {RSS_FLOOR_MB} MB: "
          f"{rss:.0f} {'met' if rss <= RSS_FLOOR_MB else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
