#!/usr/bin/env python3
"""``scripts/bench.py upload``: filedrop's upload path against two baselines, in one run.

Targets, each a server process of its own, driven by the same client in this process:

* **bare sink**: an aiohttp app whose handler writes each request body at its offset in the
  target file (``os.pwrite`` as the body arrives; no database, no hash, no fsync): what aiohttp
  itself can take on this machine;
* **tus-node**: ``@tus/server`` 2.4.5 with ``@tus/file-store`` (what a user would pick instead),
  installed from the npm registry into a temp dir outside the repository (reused by later runs)
  when ``node`` and ``npm`` are present; left out otherwise (its floors then read "n/a");
* **filedrop**: ``python -m server serve`` on a fresh migrated database.

Workloads: one 1 GiB file in 8 MiB chunks sent in order over one connection (the nuxeo
client's way; timed until the last chunk's answer, which for filedrop means the file is complete
and durable); 2,000 files of 16 KiB, 8 requests in flight (filedrop: whole-file uploads into one
batch; tus: creation-with-upload, one request a file; bare: one POST a file). Then the filedrop
server's peak RSS (VmHWM). The small files' reps run first, then the large file's. Every rep
runs every target back to back, each rep starting with the next target; each ratio is taken
within its rep and the table shows medians.

What one target leaves behind must not fall on the next: each timed run starts from a synced
disk (``os.sync()``, untimed; else filedrop's own syncs would write the other targets' dirty
pages, and the bare sink would run while gigabytes are written back), nothing is deleted until
the end but the large file of each run (see ``clear``), and before the first rep the bench waits
until creating a file is cheap (``scripts/benchfs.py``: a filesystem still paying for a mass
delete).

Floors (exit status 1 when one is missed): large >= 0.5 x bare and >= 2 x tus-node; small >=
0.5 x bare and >= 1.5 x tus-node; peak RSS <= 100 MB.

Options: ``--size-mib`` (1024), ``--chunk-mib`` (8), ``--files`` (2000), ``--file-kib`` (16),
``--reps`` (5), ``--no-tus``, ``--only large|small``.

**Scale-out report** (``--processes N`` and/or ``--database-url URL``; no floor, a report): the
small-file workload against filedrop on SQLite (one process: the baseline, as shipped) and on
PostgreSQL with 1, 2, ... N app processes (``FILEDROP_APP_PROCESSES``'s layout: consecutive ports,
one database; the client sends file i to process i mod N, the round-robin NGINX does, without
NGINX's own cost in the numbers). ``--database-url`` names a server on which the bench may create
and drop a database of its own (``postgresql://USER@HOST:PORT/DB``, DB being one it can connect
to); without it a throwaway cluster is started as the tests do (Debian's postgresql, see
``tests/support/postgres.py``). The client runs in this process on the same cores as the servers
and the database: on a 2-core machine more processes mostly share the same two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from statistics import median

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # also when run as a script (the bare sink's process)
from scripts.benchfs import wait_quiet  # noqa: E402

KEY = "bench-key-0123456789"
MiB = 1 << 20
TUS_VERSION = "2.4.5"
TUS_DIR = Path(tempfile.gettempdir()) / f"filedrop-bench-tus-{TUS_VERSION}"
FLOORS = {  # workload -> (min ratio to bare, min ratio to tus-node)
    "large": (0.5, 2.0),
    "small": (0.5, 1.5),
}
RSS_FLOOR_MB = 100
PARALLEL = 8

TUS_SERVER_JS = """
const {Server} = require('@tus/server');
const {FileStore} = require('@tus/file-store');
const [port, dir] = process.argv.slice(2);
const server = new Server({path: '/files', datastore: new FileStore({directory: dir})});
server.listen({host: '127.0.0.1', port: Number(port)});
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Until ``url`` answers anything over HTTP (an error status counts: the server is up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.05)  # poll interval under a deadline
    raise SystemExit(f"{url} did not come up in {timeout}s")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Proc:
    def __init__(self, argv: list[str], env: dict[str, str], health: str, log: Path,
                 cwd: Path = REPO) -> None:
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        wait_up(health, self.proc)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- the bare sink ------------------------------------------------------------------------------
def serve_bare(port: int, root: Path) -> None:
    from aiohttp import web

    async def receive(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        offset = int(request.headers.get("X-Offset", "0"))
        fd = os.open(root / name, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            async for data in request.content.iter_any():
                os.pwrite(fd, data, offset)
                offset += len(data)
        finally:
            os.close(fd)
        return web.json_response({"offset": offset}, status=201)

    app = web.Application()
    app.router.add_post("/upload/{name}", receive)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def start_bare(tmp: Path) -> tuple[Proc, str, Path]:
    port, root = free_port(), tmp / "bare"
    root.mkdir()
    url = f"http://127.0.0.1:{port}"
    proc = Proc([sys.executable, __file__, "--serve-bare", str(port), str(root)], dict(os.environ),
                url + "/", tmp / "bare.log")
    return proc, url, root


# -- tus-node -----------------------------------------------------------------------------------
def install_tus() -> Path | None:
    """``@tus/server`` into a temp dir outside the repository (reused while it is there)."""
    if not shutil.which("node") or not shutil.which("npm"):
        print("node/npm not found: tus-node left out", file=sys.stderr)
        return None
    if not (TUS_DIR / "node_modules" / "@tus" / "server").is_dir():
        TUS_DIR.mkdir(parents=True, exist_ok=True)
        (TUS_DIR / "package.json").write_text('{"name": "filedrop-bench-tus", "private": true}\n')
        r = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent",
                            f"@tus/server@{TUS_VERSION}", "@tus/file-store@2"], cwd=TUS_DIR,
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            print(f"npm install of @tus/server failed: tus-node left out\n{r.stderr[-2000:]}", file=sys.stderr)
            return None
    (TUS_DIR / "server.js").write_text(TUS_SERVER_JS)
    return TUS_DIR


def start_tus(tmp: Path, tus_dir: Path) -> tuple[Proc, str, Path]:
    port, root = free_port(), tmp / "tus"
    root.mkdir()
    url = f"http://127.0.0.1:{port}"
    proc = Proc(["node", str(tus_dir / "server.js"), str(port), str(root)], dict(os.environ), url + "/files",
                tmp / "tus.log", cwd=tus_dir)
    return proc, url, root


# -- filedrop -----------------------------------------------------------------------------------
def start_filedrop(tmp: Path) -> tuple[Proc, str, Path]:
    sys.path.insert(0, str(REPO))
    from server.db.migrate import upgrade

    data = tmp / "filedrop"
    upgrade(data / "filedrop.sqlite3")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FILEDROP_")}
    env.update({"FILEDROP_DATA_DIR": str(data), "FILEDROP_APP_PORT": str(port), "FILEDROP_API_KEYS": KEY,
                "FILEDROP_MIN_FREE_DISK": "64M", "FILEDROP_JANITOR_INTERVAL": "0", "FILEDROP_LOG_LEVEL": "WARNING"})
    url = f"http://127.0.0.1:{port}"
    return Proc([sys.executable, "-m", "server", "serve"], env, url + "/healthz", tmp / "filedrop.log"), url, data


def start_filedrop_on(tmp: Path, name: str, database_url: str, processes: int) -> tuple[list[Proc], list[str]]:
    """``processes`` app processes on one data dir and ``database_url`` ("" = SQLite), already
    migrated, on consecutive ports (``FILEDROP_APP_PROCESSES``'s layout); no workers."""
    sys.path.insert(0, str(REPO))
    from server.db.migrate import upgrade

    data = tmp / name
    upgrade(database_url or data / "filedrop.sqlite3")
    procs, urls = [], []
    for n in range(processes):
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FILEDROP_")}
        env.update({"FILEDROP_DATA_DIR": str(data), "FILEDROP_APP_PORT": str(port), "FILEDROP_API_KEYS": KEY,
                    "FILEDROP_MIN_FREE_DISK": "64M", "FILEDROP_JANITOR_INTERVAL": "0", "FILEDROP_WORKERS": "0",
                    "FILEDROP_LOG_LEVEL": "WARNING", "FILEDROP_DATABASE_URL": database_url})
        url = f"http://127.0.0.1:{port}"
        procs.append(Proc([sys.executable, "-m", "server", "serve"], env, url + "/healthz", tmp / f"{name}-{n}.log"))
        urls.append(url)
    return procs, urls


async def small_spread(urls: list[str], blob: bytes, count: int) -> float:
    """``small_filedrop`` with file i sent to ``urls[i % len(urls)]`` (one batch, shared by all)."""
    h = {"X-API-Key": KEY}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        async with s.post(urls[0] + "/api/v1/upload/", headers=h) as r:
            batch = (await r.json())["batchId"]

        async def one(i: int) -> None:
            hh = {**h, "X-File-Name": f"small-{i}.bin", "X-File-Size": str(len(blob)),
                  "Content-Type": "application/octet-stream"}
            async with s.post(f"{urls[i % len(urls)]}/api/v1/upload/{batch}/{i}", data=blob, headers=hh) as r:
                assert r.status == 201, await r.text()
        elapsed = await in_flight(one, count)
        # The batch's file list (not executing it, which would delete the files: see ``clear``).
        async with s.get(f"{urls[-1]}/api/v1/upload/{batch}", headers=h) as r:
            files = await r.json()
        assert len(files) == count and all(f["sha256"] == hashlib.sha256(blob).hexdigest() for f in files)
    return elapsed


def scale_main(args: argparse.Namespace) -> int:
    """The scale-out report (see the module docstring)."""
    sys.path.insert(0, str(REPO))
    from tests.support.postgres import PostgresCluster

    cluster = (PostgresCluster(url=args.database_url.replace("postgresql+asyncpg://", "postgresql://"), external=True)
               if args.database_url else PostgresCluster().start())
    blob = os.urandom(args.file_kib * 1024)
    tmp = Path(tempfile.mkdtemp(prefix=".bench-upload-", dir=REPO))
    print(f"before the first rep, {wait_quiet(tmp)}", file=sys.stderr)
    made: list[str] = []
    procs: list[Proc] = []
    times: dict[str, list[float]] = {}
    try:
        targets: dict[str, list[str]] = {}
        _p, targets["SQLite, 1 process"] = start_filedrop_on(tmp, "sqlite", "", 1)
        procs += _p
        for n in range(1, args.processes + 1):
            made.append(cluster.create_database())
            _p, targets[f"PostgreSQL, {n} process{'es' if n > 1 else ''}"] = start_filedrop_on(
                tmp, f"pg{n}", cluster.database_url(made[-1]), n)
            procs += _p
        names = list(targets)
        for rep in range(args.reps):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                times.setdefault(name, []).append(asyncio.run(small_spread(targets[name], blob, args.files)))
            print(f"rep {rep + 1}/{args.reps} done", file=sys.stderr)
    finally:
        for p in procs:
            p.stop()
        for name in made:
            cluster.drop_database(name)
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    base = "SQLite, 1 process"
    print(f"Upload scale-out: {args.files:,} files of {args.file_kib} KiB, {PARALLEL} in flight, medians of "
          f"{args.reps} reps; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}. A report, no floor.\n")
    print("| target | files/s | / SQLite, 1 process |")
    print("| --- | ---: | ---: |")
    for name in times:
        rates = [args.files / t for t in times[name]]
        ratio = median(args.files / t / (args.files / b) for t, b in zip(times[name], times[base], strict=True))
        print(f"| {name} | {median(rates):,.0f} | {ratio:.2f} |")
    print("\nper rep (files/s):")
    for name in times:
        print(f"- {name}: " + ", ".join(f"{args.files / t:,.0f}" for t in times[name]))
    return 0


# -- clients: one large file ----------------------------------------------------------------------
async def large_bare(url: str, block: bytes, chunks: int) -> float:
    async with aiohttp.ClientSession() as s:
        t = time.perf_counter()
        for i in range(chunks):
            async with s.post(f"{url}/upload/large.bin", data=block, headers={"X-Offset": str(i * len(block))}) as r:
                assert r.status == 201, await r.text()
        return time.perf_counter() - t


async def large_tus(url: str, block: bytes, chunks: int) -> float:
    base = {"Tus-Resumable": "1.0.0"}
    async with aiohttp.ClientSession() as s:
        t = time.perf_counter()
        async with s.post(f"{url}/files", headers={**base, "Upload-Length": str(len(block) * chunks)}) as r:
            assert r.status == 201, await r.text()
            location = r.headers["Location"]
        for i in range(chunks):
            h = {**base, "Upload-Offset": str(i * len(block)), "Content-Type": "application/offset+octet-stream"}
            async with s.patch(location, data=block, headers=h) as r:
                assert r.status == 204, await r.text()
        return time.perf_counter() - t


async def large_filedrop(url: str, block: bytes, chunks: int) -> float:
    """Seconds until the last chunk is answered 201 (the file complete and durable); then the
    manifest (not timed) must give the SHA-256 of what was sent."""
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
                assert r.status == (201 if i == chunks - 1 else 202), await r.text()
        elapsed = time.perf_counter() - t
        async with s.post(f"{url}/api/v1/upload/{batch}/execute/Batch.Manifest", headers=h) as r:
            files = (await r.json())["files"]  # executing also removes the batch
    expected = hashlib.sha256()
    for _ in range(chunks):
        expected.update(block)
    assert files[0]["sha256"] == expected.hexdigest(), "the file filedrop stored differs"
    return elapsed


# -- clients: many small files --------------------------------------------------------------------
async def in_flight(post_one: Callable[[int], Awaitable[None]], count: int) -> float:
    queue = iter(range(count))

    async def worker() -> None:
        for i in queue:
            await post_one(i)

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(PARALLEL)))
    return time.perf_counter() - t


async def small_bare(url: str, blob: bytes, count: int) -> float:
    run = os.urandom(4).hex()  # new files every rep, as the others make (the small files are kept)
    async with aiohttp.ClientSession() as s:
        async def one(i: int) -> None:
            async with s.post(f"{url}/upload/small-{run}-{i}.bin", data=blob) as r:
                assert r.status == 201
        return await in_flight(one, count)


async def small_tus(url: str, blob: bytes, count: int) -> float:
    h = {"Tus-Resumable": "1.0.0", "Upload-Length": str(len(blob)), "Content-Type": "application/offset+octet-stream"}
    async with aiohttp.ClientSession() as s:
        async def one(_i: int) -> None:
            async with s.post(f"{url}/files", data=blob, headers=h) as r:
                assert r.status == 201 and r.headers.get("Upload-Offset") == str(len(blob)), \
                    (r.status, dict(r.headers), await r.text())
        return await in_flight(one, count)


async def small_filedrop(url: str, blob: bytes, count: int) -> float:
    return await small_spread([url], blob, count)


def clear(root: Path) -> None:
    """Remove a target's files after the large workload (one big file each). The small files
    stay until the end: 2,000 just deleted would make the next target's creates several times
    dearer (``scripts/benchfs.py`` says why)."""
    for p in root.iterdir():
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def warm_pages(tmp: Path, block: bytes, chunks: int) -> None:
    """Write a file of the large workload's size and delete it (untimed), so that every target
    starts with as many recently freed pages as it will fill. On a virtual machine, page-cache
    pages the kernel takes from memory not touched lately cost 2-4 times the CPU to fill
    (docs/benchmarks.md, "Growing the page cache"): without this, whichever target ran just
    before (and how much of its file it kept cached) would set the next one's speed."""
    path = tmp / "warm.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for i in range(chunks):
            os.pwrite(fd, block, i * len(block))
    finally:
        os.close(fd)
        path.unlink()


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--serve-bare":
        serve_bare(int(argv[1]), Path(argv[2]))
        return 0
    ap = argparse.ArgumentParser(prog="scripts/bench.py upload")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--chunk-mib", type=int, default=8)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--file-kib", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-tus", action="store_true", help="leave tus-node out")
    ap.add_argument("--only", choices=("large", "small"), help="run one workload")
    ap.add_argument("--database-url", default="", help="scale-out report: a PostgreSQL server to create a "
                    "database on (default: a throwaway cluster)")
    ap.add_argument("--processes", type=int, default=0, help="scale-out report: PostgreSQL with 1..N app processes")
    args = ap.parse_args(argv)
    if args.processes or args.database_url:
        args.processes = max(args.processes, 1)
        if "--reps" not in argv:
            args.reps = 3
        return scale_main(args)
    block = os.urandom(args.chunk_mib * MiB)
    chunks = args.size_mib // args.chunk_mib
    blob = os.urandom(args.file_kib * 1024)
    # Every rep of the small files first: after a big file is deleted, creating small ones in the
    # same directory is slower for a while (the bare sink: 3,700-4,000 -> 1,650-2,700 files/s).
    workloads = [args.only] if args.only else ["small", "large"]
    tus_dir = None if args.no_tus else install_tus()
    tmp = Path(tempfile.mkdtemp(prefix=".bench-upload-", dir=REPO))
    times: dict[tuple[str, str], list[float]] = {}
    procs: list[Proc] = []
    try:
        fs_line = wait_quiet(tmp)
        fd_proc, fd_url, _ = start_filedrop(tmp)
        procs.append(fd_proc)
        bare_proc, bare_url, bare_root = start_bare(tmp)
        procs.append(bare_proc)
        targets: dict[str, tuple[str, Path | None]] = {"bare": (bare_url, bare_root)}
        if tus_dir is not None:
            tus_proc, tus_url, tus_root = start_tus(tmp, tus_dir)
            procs.append(tus_proc)
            targets["tus-node"] = (tus_url, tus_root)
        targets["filedrop"] = (fd_url, None)
        clients = {"large": {"bare": large_bare, "tus-node": large_tus, "filedrop": large_filedrop},
                   "small": {"bare": small_bare, "tus-node": small_tus, "filedrop": small_filedrop}}
        names = list(targets)
        for w in workloads:
            for rep in range(args.reps):
                # Each rep starts with another target: what one leaves behind (a big file just
                # deleted) falls on each in turn, not always on the one after it.
                order = names[rep % len(names):] + names[:rep % len(names)]
                for name in order:
                    url, root = targets[name]
                    if w == "large":
                        warm_pages(tmp, block, chunks)
                    os.sync()  # untimed: start from a clean page cache (see the docstring)
                    if w == "large":
                        t = asyncio.run(clients[w][name](url, block, chunks))  # type: ignore[operator]
                    else:
                        t = asyncio.run(clients[w][name](url, blob, args.files))  # type: ignore[operator]
                    times.setdefault((w, name), []).append(t)
                    if root is not None and w == "large":
                        clear(root)
                print(f"{w}: rep {rep + 1}/{args.reps} done", file=sys.stderr)
        rss = peak_rss_mb(fd_proc.proc.pid)
    finally:
        for p in procs:
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    amounts = {"large": args.size_mib * MiB / 1e6, "small": args.files}
    units = {"large": "MB/s", "small": "files/s"}
    labels = {"large": f"{args.size_mib} MiB in {args.chunk_mib} MiB chunks, in order, one connection",
              "small": f"{args.files:,} files of {args.file_kib} KiB, {PARALLEL} in flight"}
    has_tus = tus_dir is not None
    print(f"Upload benchmark: medians of {args.reps} reps; {os.cpu_count()} cores; load average before the "
          f"table {os.getloadavg()[0]:.1f}; before the first rep, {fs_line}.\n")
    print("| workload | bare sink | tus-node | filedrop | filedrop / bare | filedrop / tus-node |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    verdicts: list[str] = []
    ok = True
    for w in workloads:
        rate = {name: [amounts[w] / t for t in times[(w, name)]] for name in targets}
        reps = range(args.reps)
        to_bare = median(rate["filedrop"][i] / rate["bare"][i] for i in reps)
        to_tus = median(rate["filedrop"][i] / rate["tus-node"][i] for i in reps) if has_tus else None
        cell = {name: f"{median(rate[name]):,.0f} {units[w]}" for name in rate}
        print(f"| {labels[w]} | {cell['bare']} | {cell.get('tus-node', 'n/a')} | {cell['filedrop']} | "
              f"{to_bare:.2f} | {f'{to_tus:.2f}' if to_tus is not None else 'n/a'} |")
        floor_bare, floor_tus = FLOORS[w]
        met = to_bare >= floor_bare
        ok &= met
        verdicts.append(f"{w}: filedrop / bare {to_bare:.2f} >= {floor_bare}: {'met' if met else 'MISSED'}")
        if to_tus is None:
            verdicts.append(f"{w}: filedrop / tus-node >= {floor_tus}: n/a (no tus-node)")
        else:
            met = to_tus >= floor_tus
            ok &= met
            verdicts.append(f"{w}: filedrop / tus-node {to_tus:.2f} >= {floor_tus}: {'met' if met else 'MISSED'}")
    print(f"| filedrop server peak RSS (VmHWM) | | | {rss:.0f} MB | | |")
    print("\nper rep (" + ", ".join(units[w] for w in workloads) + "):")
    for w in workloads:
        for name in targets:
            print(f"- {w} {name}: " + ", ".join(f"{amounts[w] / t:,.0f}" for t in times[(w, name)]))
    met = rss <= RSS_FLOOR_MB
    ok &= met
    verdicts.append(f"peak RSS {rss:.0f} MB <= {RSS_FLOOR_MB} MB: {'met' if met else 'MISSED'}")
    print("\nfloors:\n" + "\n".join(f"- {v}" for v in verdicts))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
