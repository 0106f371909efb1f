#!/usr/bin/env python3
"""``scripts/bench.py deliver``: smartlink delivery, NGINX vs an aiohttp static handler.

Writes N smartlink files (default 10,000, ~4 KiB of HTML each, in batches of 1,000) into a temp
smartlink root, then fetches every one of them through

  * NGINX, from the project's own nginx.conf (rendered, ``worker_processes auto``), and
  * an aiohttp app in one process whose handler checks the same name pattern and answers with
    ``web.FileResponse`` (the static-file path aiohttp itself offers),

with the same client and the same number of concurrent connections, one after the other in the
same run. Each server gets an unmeasured warm-up, then a measured run that fetches every file at
least once (wrk: ``--seconds``, lengthened if that does not reach every file; the Python client:
``--passes`` passes). Prints req/s, p50/p99 latency and the ratio (floor: NGINX >= 5x); exits 1
below the floor or if any answer was not 200.

The client is ``wrk`` (one thread, a Lua script walking the file list) when it is installed
(``FILEDROP_SETUP_BENCH=1 scripts/setup`` installs it as root), else an aiohttp client — which
saturates a core itself and so caps what it can measure of NGINX; the table says which was used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The names nginx.conf admits (docs/smartlinks.md), checked by the baseline too.
BATCH_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}\.[A-Za-z0-9_-]{1,128}\.(?:html|pdf)$")
FLOOR = 5.0

# One wrk thread walks the file list in order, round and round: `requests >= files` means every
# file was fetched. wrk runs for a duration (its thread:stop() does not end the run early).
WRK_LUA = r"""
local paths, i = {}, 0
init = function(args)
  for line in io.lines(args[1]) do paths[#paths + 1] = line end
end
request = function()
  i = i % #paths + 1
  return wrk.format("GET", paths[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests": %d, "duration_us": %d, "errors": %d, "non200": %d, "p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""


def page(i: int) -> bytes:
    rows = "".join(f"<tr><td>Ligne {k}</td><td>{(i * 7 + k) % 1000},{k:02d} €</td></tr>" for k in range(90))
    return (f"<!doctype html><html lang=fr><head><meta charset=utf-8><title>Invoice {i}</title>"
            f'<link rel="stylesheet" href="https://cdn.example.com/smartlink.css"></head><body>'
            f"<h1>Client 240 000 {i:06d}</h1><table>{rows}</table>"
            f'<script src="https://cdn.example.com/viewer.js"></script></body></html>').encode()


def make_tree(root: Path, n: int) -> list[str]:
    paths = []
    for i in range(n):
        batch = f"batch{i // 1000:03d}"
        name = f"{os.urandom(12).hex()}.{os.urandom(12).hex()}.html"
        d = root / batch
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(page(i))
        paths.append(f"/{batch}/{name}")
    return paths


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer: it is up
        except OSError:
            time.sleep(0.05)  # poll interval under a deadline
    raise RuntimeError(f"{url} did not answer within {timeout}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def start_nginx(work: Path, root: Path, port: int) -> subprocess.Popen[bytes]:
    from server.config import Settings
    from server.nginx import render

    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    prefix = work / "nginx"
    conf = render(Settings(data_dir=work / "var", smartlink_root=root), prefix, listen=f"127.0.0.1:{port}",
                  page_listen=f"127.0.0.1:{free_port()}")
    proc = subprocess.Popen([nginx, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"])
    wait_http(f"http://127.0.0.1:{port}/", proc)
    return proc


def start_aiohttp(root: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, __file__, "_serve_aiohttp", str(root), str(port)])
    wait_http(f"http://127.0.0.1:{port}/", proc)
    return proc


def serve_aiohttp(root: str, port: int) -> None:
    """The baseline: one aiohttp process, same name check, ``web.FileResponse``."""
    from aiohttp import web

    base = Path(root)

    async def smartlink(request: web.Request) -> web.StreamResponse:
        batch, name = request.match_info["batch_id"], request.match_info["name"]
        if not (BATCH_RE.match(batch) and NAME_RE.match(name)):
            raise web.HTTPNotFound()
        path = base / batch / name
        if not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"X-Content-Type-Options": "nosniff",
                                               "Referrer-Policy": "no-referrer",
                                               "Cache-Control": "private, no-cache"})

    app = web.Application()
    app.router.add_get("/{batch_id}/{name}", smartlink)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def run_wrk(url: str, paths_file: Path, seconds: float, concurrency: int) -> dict[str, float]:
    script = paths_file.parent / "walk.lua"
    script.write_text(WRK_LUA)
    out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:.0f}s", "--timeout", "10s",
                          "-s", str(script), url, "--", str(paths_file)],
                         capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    m = re.search(r"^RESULT (\{.*\})$", out, re.M)
    if not m:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    r = json.loads(m.group(1))
    return {"requests": r["requests"], "seconds": r["duration_us"] / 1e6, "bad": r["errors"] + r["non200"],
            "p50_ms": r["p50_us"] / 1000, "p99_ms": r["p99_us"] / 1000}


def run_python(url: str, paths: list[str], count: int, concurrency: int) -> dict[str, float]:
    import aiohttp

    async def go() -> dict[str, float]:
        lat: list[float] = []
        bad = 0
        it = iter(range(count))

        async def worker(session: aiohttp.ClientSession) -> None:
            nonlocal bad
            for k in it:
                t0 = time.perf_counter()
                async with session.get(url + paths[k % len(paths)]) as r:
                    await r.read()
                    if r.status != 200:
                        bad += 1
                lat.append(time.perf_counter() - t0)

        conn = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=conn, auto_decompress=False) as session:
            t0 = time.perf_counter()
            await asyncio.gather(*(worker(session) for _ in range(concurrency)))
            seconds = time.perf_counter() - t0
        q = statistics.quantiles(lat, n=100)
        return {"requests": len(lat), "seconds": seconds, "bad": bad, "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000}

    return asyncio.run(go())


def measure(name: str, url: str, paths: list[str], paths_file: Path, args: argparse.Namespace,
            client: str) -> dict[str, float]:
    if client == "wrk":
        run_wrk(url, paths_file, args.warmup, args.concurrency)
        seconds = args.seconds
        for _ in range(3):
            r = run_wrk(url, paths_file, seconds, args.concurrency)
            if r["requests"] >= len(paths):
                break
            # Too slow to reach every file in that time: measure again, long enough.
            seconds = min(600.0, seconds * 1.5 * len(paths) / max(r["requests"], 1))
        else:
            raise RuntimeError(f"{name}: fewer than {len(paths)} requests in {seconds:.0f}s")
    else:
        run_python(url, paths, len(paths), args.concurrency)
        r = run_python(url, paths, len(paths) * args.passes, args.concurrency)
    r["rps"] = r["requests"] / r["seconds"]
    print(f"  {name}: {r['requests']:.0f} requests in {r['seconds']:.2f}s", file=sys.stderr)
    return r


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench.py deliver", description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=10_000)
    p.add_argument("--seconds", type=float, default=10, help="wrk: measured seconds per server (longer if "
                   "that does not reach every file)")
    p.add_argument("--warmup", type=float, default=2, help="wrk: unmeasured seconds per server first")
    p.add_argument("--passes", type=int, default=3, help="python client: measured passes over every file")
    p.add_argument("--concurrency", type=int, default=64, help="concurrent connections, the same for both")
    p.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    args = p.parse_args(argv)
    client = args.client
    if client == "auto":
        client = "wrk" if shutil.which("wrk") else "python"
    if client == "python":
        print("bench deliver: wrk not found, using the aiohttp client (it caps the NGINX figure; "
              "FILEDROP_SETUP_BENCH=1 scripts/setup installs wrk)", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="filedrop-bench-deliver-") as tmp:
        work = Path(tmp)
        root = work / "smartlinks"
        print(f"bench deliver: writing {args.files} smartlinks", file=sys.stderr)
        paths = make_tree(root, args.files)
        paths_file = work / "paths.txt"
        paths_file.write_text("\n".join(paths) + "\n")
        size = sum(len(page(i)) for i in range(min(args.files, 100))) / min(args.files, 100)

        results = {}
        port = free_port()
        proc = start_nginx(work, root, port)
        try:
            results["nginx"] = measure("NGINX", f"http://127.0.0.1:{port}", paths, paths_file, args, client)
        finally:
            stop(proc)
        port = free_port()
        proc = start_aiohttp(root, port)
        try:
            results["aiohttp"] = measure("aiohttp", f"http://127.0.0.1:{port}", paths, paths_file, args, client)
        finally:
            stop(proc)

    n, a = results["nginx"], results["aiohttp"]
    ratio = n["rps"] / a["rps"]
    cpus = os.cpu_count()
    how = (f"{args.seconds:.0f} s each after a {args.warmup:.0f} s warm-up, every file fetched at least once"
           if client == "wrk" else f"{args.passes} passes over every file after a warm-up pass")
    print(f"\n{args.files:,} smartlinks (~{size / 1024:.1f} KiB HTML each), {how}, {args.concurrency} "
          f"connections, client: {client}; {cpus} cores, "
          f"{platform.python_implementation()} {platform.python_version()}\n")
    print("| server | requests | req/s | p50 ms | p99 ms | non-200/errors |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print(f"| NGINX (project nginx.conf, worker_processes auto) | {n['requests']:.0f} | {n['rps']:,.0f} | "
          f"{n['p50_ms']:.2f} | {n['p99_ms']:.2f} | {n['bad']:.0f} |")
    print(f"| aiohttp FileResponse handler (1 process) | {a['requests']:.0f} | {a['rps']:,.0f} | "
          f"{a['p50_ms']:.2f} | {a['p99_ms']:.2f} | {a['bad']:.0f} |")
    verdict = "meets" if ratio >= FLOOR else "BELOW"
    print(f"\nNGINX / aiohttp: **{ratio:.1f}x** req/s ({verdict} the {FLOOR:.0f}x floor)")
    bad = n["bad"] + a["bad"]
    if bad:
        print(f"bench deliver: {bad:.0f} requests did not answer 200", file=sys.stderr)
    return 0 if ratio >= FLOOR and not bad else 1


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "_serve_aiohttp":
        serve_aiohttp(sys.argv[2], int(sys.argv[3]))
        raise SystemExit(0)
    raise SystemExit(main(sys.argv[1:]))
