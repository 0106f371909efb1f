"""``scripts/bench.py signed``: seed 004's flow on a real server behind NGINX, against baselines
measured in the same run.

1. Data: a job created with ``data_upload=url`` (its template checked), then N rows (default
   50,000, JSON Lines) PUT to its signed ``upload_URL`` through NGINX, until the 201 (validated,
   inserted, the job Queued); baseline: the same template and rows in one ordinary start
   (multipart, with the key) until its 202. Alternating, ``--reps`` times.
2. Download: the result CSV of that job by its signed link, ``--concurrency`` clients for
   ``--seconds`` each way: through NGINX (the app checks the signature and answers
   X-Accel-Redirect; NGINX sends the file from disk) against straight to the app (the app checks
   the signature and sends the file itself, ``web.FileResponse``). The same client (aiohttp, one
   process) and the same links; besides req/s and latency, the app process's CPU time per request
   (what the API has left for everything else).

No floors: these numbers say where the time goes, they gate nothing. The machine is shared:
read them with the load average printed beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from scripts.benchproc import cpu_seconds  # noqa: E402

KEY = "bench-key-0123456789"
AUTH = {"X-API-Key": KEY}
TEMPLATE = {"title": "Invoice {{ data.num_client }}", "lang": "fr",
            "body": "<h1>Client {{ data.num_client }}</h1><p>Montant : {{ data.montant }} €</p>"}


def make_rows(n: int) -> bytes:
    return "\n".join(json.dumps({"reference_id": f"5ef3501829bf41003d{i:06d}", "suffix": f"5f1ea1e9b982f9004{i:07d}",
                                 "data": {"num_client": f"240 000 {i:06d}", "montant": f"{i % 997},{i % 100:02d}"}})
                     for i in range(n)).encode()


class Front:
    """``python -m server serve`` (the tests' ``ServerProcess``) and NGINX over the project's
    nginx.conf, on a fresh data dir. ``start`` blocks: call it in a thread."""

    def __init__(self, work: Path, max_data_size: int) -> None:
        from server.config import Settings
        from tests.support.server import ServerProcess, server_env
        from tests.support.waiting import free_port

        self.http_port = free_port()
        self.env = server_env(work / "var", KEY, log_level="WARNING", max_data_size=str(max_data_size),
                              public_url=f"http://127.0.0.1:{self.http_port}")
        self.settings = Settings.from_env(self.env)
        self.work = work
        self.server = ServerProcess(self.env, work / "server.log")
        self.nginx_proc: subprocess.Popen[bytes] | None = None

    @property
    def nginx(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def app(self) -> str:
        return self.server.url

    def start(self) -> None:
        from server.nginx import render
        from tests.support.waiting import wait_until

        subprocess.run([sys.executable, "-m", "server", "migrate"], cwd=REPO, env=self.env, check=True,
                       capture_output=True)
        self.server.start(timeout=30)
        conf = render(self.settings, self.work / "nginx", listen=f"127.0.0.1:{self.http_port}")
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.nginx_proc = proc = subprocess.Popen([nginx, "-p", str(self.work / "nginx"), "-c", str(conf),
                                                   "-g", "daemon off;"], stderr=subprocess.DEVNULL)

        def up() -> bool:
            if proc.poll() is not None:
                raise SystemExit(f"NGINX exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(self.nginx + "/healthz", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_until(up, timeout=30, what=f"NGINX on {self.nginx}")

    def stop(self) -> None:
        if self.nginx_proc is not None and self.nginx_proc.poll() is None:
            self.nginx_proc.terminate()
            self.nginx_proc.wait(timeout=20)
        self.server.stop()


async def put_rows(s: aiohttp.ClientSession, base: str, batch: str, rows: bytes) -> tuple[float, float, str]:
    """Seconds of the create (data_upload=url: the template checked) and of the signed PUT to
    its 201; the job id."""
    form = aiohttp.FormData()
    form.add_field("document_file", json.dumps(TEMPLATE), filename="t.json", content_type="application/json")
    form.add_field("data_upload", "url")
    t0 = time.perf_counter()
    async with s.post(f"{base}/api/batch/{batch}/start", data=form, headers=AUTH) as r:
        job = await r.json()
        assert r.status == 201, job
    t1 = time.perf_counter()
    async with s.put(job["upload_URL"], data=rows) as r:
        body = await r.json()
        assert r.status == 201, body
    return t1 - t0, time.perf_counter() - t1, job["job_id"]


async def start_with_rows(s: aiohttp.ClientSession, base: str, batch: str, rows: bytes) -> tuple[float, str]:
    form = aiohttp.FormData()
    form.add_field("document_file", json.dumps(TEMPLATE), filename="t.json", content_type="application/json")
    form.add_field("data", rows, filename="rows.jsonl", content_type="application/json")
    t0 = time.perf_counter()
    async with s.post(f"{base}/api/batch/{batch}/start", data=form, headers=AUTH) as r:
        body = await r.json()
        assert r.status == 202, body
    return time.perf_counter() - t0, body["job_id"]


async def wait_end(s: aiohttp.ClientSession, base: str, batch: str, job_id: str) -> None:
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        async with s.get(f"{base}/api/batch/{batch}/{job_id}/status", headers=AUTH) as r:
            if (await r.json())["status"] not in ("Waiting for data", "Queued", "In progress"):
                return
        await asyncio.sleep(0.2)  # poll interval under a deadline
    raise SystemExit(f"job {job_id} did not end within 900 s")


async def hammer(url: str, seconds: float, concurrency: int, app_pid: int) -> dict[str, Any]:
    """GET ``url`` back to back from ``concurrency`` tasks for ``seconds``: req/s, MB/s, latencies,
    and the app process's CPU time per request."""
    lat: list[float] = []
    size = errors = 0
    stop = time.monotonic() + seconds

    async def one(s: aiohttp.ClientSession) -> None:
        nonlocal size, errors
        while time.monotonic() < stop:
            t = time.perf_counter()
            async with s.get(url) as r:
                body = await r.read()
                if r.status != 200:
                    errors += 1
            lat.append(time.perf_counter() - t)
            size += len(body)

    t0, cpu0 = time.perf_counter(), cpu_seconds(app_pid)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        await asyncio.gather(*(one(s) for _ in range(concurrency)))
    took, cpu = time.perf_counter() - t0, cpu_seconds(app_pid) - cpu0
    lat.sort()
    return {"requests": len(lat), "rps": len(lat) / took, "mbps": size / took / 1e6, "errors": errors,
            "p50": lat[len(lat) // 2] * 1000, "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000,
            "app_ms": cpu / max(len(lat), 1) * 1000}


async def run(args: argparse.Namespace, work: Path) -> int:
    rows = make_rows(args.rows)
    front = Front(work, max(len(rows), 50 << 20))
    await asyncio.to_thread(front.start)
    try:
        timeout = aiohttp.ClientTimeout(total=900)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            creates, puts, starts = [], [], []
            for rep in range(args.reps):
                # Each job renders its rows once accepted (the workers take both cores): the next
                # request waits for its end, and the order alternates, so neither side is measured
                # beside the other's rendering.
                for side in (("start", "put") if rep % 2 == 0 else ("put", "start")):
                    if side == "start":
                        secs, job_id = await start_with_rows(s, front.nginx, f"bench-start-{rep}", rows)
                        starts.append(secs)
                        await wait_end(s, front.nginx, f"bench-start-{rep}", job_id)
                    else:
                        created, secs, job_id = await put_rows(s, front.nginx, f"bench-put-{rep}", rows)
                        creates.append(created)
                        puts.append(secs)
                        await wait_end(s, front.nginx, f"bench-put-{rep}", job_id)
                        last = f"{front.nginx}/api/batch/bench-put-{rep}/{job_id}"
            async with s.get(f"{last}/result?format=url&expires_in=3600", headers=AUTH) as r:
                link = (await r.json())["download_url"]
            csv_size = len(await (await s.get(link)).read())
        assert front.server.proc is not None
        app_pid = front.server.proc.pid
        via_nginx = await hammer(link, args.seconds, args.concurrency, app_pid)
        direct = await hammer(link.replace(front.nginx, front.app), args.seconds, args.concurrency, app_pid)
    finally:
        front.stop()
    load = os.getloadavg()
    mib = len(rows) / (1 << 20)
    put_med, start_med = statistics.median(puts), statistics.median(starts)
    both_med = statistics.median(c + p for c, p in zip(creates, puts, strict=True))
    print(f"### Signed URLs (`scripts/bench.py signed`), {args.rows:,} rows ({mib:.1f} MiB JSON Lines), "
          f"medians of {args.reps}; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}\n")
    print("| measurement | value | baseline (same run) | baseline / value |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| create (data_upload=url) + signed PUT of the rows through NGINX, to the PUT's 201 | {both_med:.2f} s "
          f"| start with the rows as `data`, to 202: {start_med:.2f} s | {start_med / both_med:.2f} |")
    print(f"| the signed PUT alone (rows parsed, inserted, the job Queued) | {put_med:.2f} s "
          f"({mib / put_med:.1f} MiB/s) | | |")
    for name, m in (("through NGINX (X-Accel-Redirect, sendfile)", via_nginx),
                    ("straight to the app (FileResponse)", direct)):
        print(f"| signed CSV download ({csv_size / 1e6:.2f} MB), {name}, {args.concurrency} clients | "
              f"{m['rps']:,.0f} req/s, {m['mbps']:,.0f} MB/s, p50 {m['p50']:.1f} ms, p99 {m['p99']:.1f} ms, "
              f"{m['errors']} non-200; app CPU {m['app_ms']:.2f} ms per request | | |")
    print(f"\nNGINX / app: **{via_nginx['rps'] / direct['rps']:.2f}x** requests/s, app CPU per request "
          f"{via_nginx['app_ms'] / direct['app_ms']:.2f}x (each request still goes through the app for its "
          "signature). Runs: create " + ", ".join(f"{p:.2f}" for p in creates)
          + " s; PUT " + ", ".join(f"{p:.2f}" for p in puts) + " s; start " + ", ".join(f"{p:.2f}" for p in starts)
          + " s.")
    return 1 if via_nginx["errors"] or direct["errors"] else 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench.py signed", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-signed-"))
    try:
        return asyncio.run(run(args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
