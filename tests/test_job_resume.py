"""A real server and its workers killed with SIGKILL mid-job (a crash of the host's processes):
the render processes die with their workers, and the next server resumes the job: the dead
workers' claimed rows go back to the queue, their temp files go, every row ends with exactly
one final file and the counts are right."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from pathlib import Path

import pytest
import requests

from tests.conftest import AUTH
from tests.support.jobs import rows
from tests.support.waiting import wait_until

ROWS = 3000
# ~1-2 ms of sandboxed work per row: the job runs for seconds, so the kill lands mid-job.
TEMPLATE = {"title": "{{ reference_id }}", "body": "{% for i in range(20000) %}{% endfor %}<p>{{ data.n }}</p>"}


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def descendants(pid: int) -> list[int]:
    found, todo = [], children(pid)
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children(p)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def status(url: str, job_id: str) -> dict:
    r = requests.get(f"{url}/api/batch/crash/{job_id}/status", headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.slow
def test_kill_9_mid_job_then_resume(server_factory, tmp_path) -> None:
    data_dir = tmp_path / "srv"
    first = server_factory(data_dir)
    files = {"document_file": ("t.json", json.dumps(TEMPLATE), "application/json"),
             "data": (None, json.dumps(rows(ROWS)))}
    r = requests.post(f"{first.url}/api/batch/crash/start", headers=AUTH, files=files, timeout=30)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]

    mid = wait_until(lambda: (s := status(first.url, job_id))["succeededCount"] >= 200 and s,
                     timeout=60, what="some rows rendered")
    with sqlite3.connect(data_dir / "filedrop.sqlite3") as c:
        workers = dict(c.execute("SELECT worker_id, pid FROM job_workers"))
    procs = descendants(first.proc.pid)  # its workers and their render processes
    assert set(workers.values()) < set(procs) and len(procs) > len(workers), (workers, procs)
    for pid in workers.values():  # the workers get no chance to hand their rows back
        os.kill(pid, signal.SIGKILL)
    first.kill9()
    wait_until(lambda: not any(alive(p) for p in procs), timeout=10,
               what="render processes to die with their workers")
    assert mid["succeededCount"] < ROWS, "the job finished before the kill; make it longer"

    out = data_dir / "smartlinks" / "crash"
    dead = next(iter(workers))
    leftover = out / f".ref000000.s00000000000000000000.html.{dead}.0badc0de.tmp"
    leftover.write_text("half a page")  # a publish the kill cut short
    with sqlite3.connect(data_dir / "filedrop.sqlite3") as c:
        killed = dict(c.execute("SELECT status, count(*) FROM job_rows WHERE job_id=? GROUP BY status", (job_id,)))
        assert c.execute("SELECT status FROM jobs WHERE job_id=?", (job_id,)).fetchone()[0] == "In progress"
    assert killed.get("claimed", 0) > 0, killed  # the dead workers' rows, to hand back
    assert killed.get("pending", 0) + killed.get("claimed", 0) > 0, killed  # unfinished rows to resume

    second = server_factory(data_dir)
    done = wait_until(lambda: (s := status(second.url, job_id))["status"] not in ("Queued", "In progress") and s,
                      timeout=120, what="the resumed job to finish")
    assert done["status"] == "Completed", done
    assert (done["succeededCount"], done["erroredCount"], done["totalCount"]) == (ROWS, 0, ROWS)

    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"ref{i:06d}.s{i:020d}.html" for i in range(ROWS))  # one file per row, no temps
    for i in (0, 1, ROWS // 2, ROWS - 1):
        page = (out / f"ref{i:06d}.s{i:020d}.html").read_text()
        assert page.count("<p>") == 1 and f"<p>{i}</p>" in page and page.endswith("</html>\n")
    with sqlite3.connect(data_dir / "filedrop.sqlite3") as c:
        assert dict(c.execute("SELECT status, count(*) FROM job_rows WHERE job_id=? GROUP BY status",
                              (job_id,))) == {"done": ROWS}
    result = requests.get(f"{second.url}/api/batch/crash/{job_id}/result", headers=AUTH, timeout=30).json()
    assert sum(r["status"] == "succeeded" for r in result["rows"]) == ROWS
