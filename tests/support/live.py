"""A real server (``filedrop serve`` and its workers, subprocesses) driven over HTTP, for the
job tests that kill, stop or attack it: start/read/wait helpers, and a second tenant whose
probe measures the API's latency while something else happens."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import requests

from tests.conftest import API_KEY, OTHER_KEY
from tests.support.jobs import Probe, rows
from tests.support.server import ServerProcess
from tests.support.waiting import wait_until

AUTH = {"X-API-Key": API_KEY}
OTHER = {"X-API-Key": OTHER_KEY}
FINISHED = ("Completed", "Completed with errors", "Cancelled", "Failed")


def start(srv: ServerProcess, batch_id: str, template: Any, data: Any, key: dict[str, str] = AUTH,
          **fields: str) -> requests.Response:
    files: dict[str, Any] = {"document_file": ("t.json", json.dumps(template), "application/json"),
                             "data": (None, json.dumps(data))}
    files.update({k: (None, v) for k, v in fields.items()})
    return requests.post(f"{srv.url}/api/batch/{batch_id}/start", headers=key, files=files, timeout=60)


def get(srv: ServerProcess, path: str, key: dict[str, str] = AUTH) -> Any:
    r = requests.get(srv.url + path, headers=key, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def wait_end(srv: ServerProcess, batch_id: str, job_id: str, timeout: float = 60) -> dict[str, Any]:
    return wait_until(lambda: (s := get(srv, f"/api/batch/{batch_id}/{job_id}/status"))["status"] in FINISHED and s,
                      timeout=timeout, interval=0.05, what=f"job {job_id} to end")


def server_with_bystander(server_factory: Any, tmp_path: Path, timeout: float) -> tuple[ServerProcess, Probe]:
    """A real server with two keys, two workers and a short row time limit; the other key has a
    finished job the probe reads the status of."""
    srv = server_factory(tmp_path / "srv", api_keys=f"{API_KEY},{OTHER_KEY}", render_timeout=f"{timeout}s",
                         workers="2")
    r = start(srv, "bystander", {"body": "<p>{{ data.n }}</p>"}, rows(3), key=OTHER)
    assert r.status_code == 202, r.text
    job = r.json()
    wait_until(lambda: get(srv, f"/api/batch/bystander/{job['job_id']}/status", OTHER)["status"] == "Completed",
               timeout=60, what="the bystander's job")
    return srv, Probe(srv.url, OTHER_KEY, "bystander", job["job_id"])


def attack(srv: ServerProcess, probe: Probe, batch_id: str, template: Any, data: Any, *, within: float,
           **fields: str) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
    """Start the attack with the probe running; (final status, result rows, seconds to the end)."""
    with probe:
        t0 = time.monotonic()
        r = start(srv, batch_id, template, data, **fields)
        assert r.status_code == 202, r.text
        done = wait_end(srv, batch_id, r.json()["job_id"], timeout=within + 30)
        took = time.monotonic() - t0
        # The probe covers the whole attack, and at least a second (20 calls) however fast it ended.
        wait_until(lambda: len(probe.latencies) >= 20, timeout=30, what="20 probe calls")
    probe.check()
    result = get(srv, f"/api/batch/{batch_id}/{done['job_id']}/result")["rows"]
    assert took < within, f"the attack took {took:.1f} s to end (bound {within} s)"
    return done, result, took


def published(srv: ServerProcess, batch_id: str) -> list[str]:
    d = Path(srv.env["FILEDROP_DATA_DIR"]) / "smartlinks" / batch_id
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


