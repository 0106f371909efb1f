"""Templates written as an attacker would, against a real server (``filedrop serve`` and its
workers, subprocesses): each attack ends as an errored row naming its limit (or a 422) in
bounded time, while another tenant's probe (``/healthz`` and its own job's status, every 50 ms)
keeps a p99 under 100 ms, and the job goes on with its other rows."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.support.jobs import rows
from tests.support.live import (
    FINISHED,
    OTHER,
    attack,
    get,
    published,
    server_with_bystander,
    start,
    wait_end,
)
from tests.support.waiting import free_port, wait_until

TIMEOUT = 2.0  # FILEDROP_RENDER_TIMEOUT here: a real row takes milliseconds


@pytest.fixture
def attacked(server_factory, tmp_path: Path):  # type: ignore[no-untyped-def]
    return server_with_bystander(server_factory, tmp_path, TIMEOUT)


@pytest.mark.slow
def test_constant_power_is_not_folded_by_the_compiler(attacked) -> None:
    srv, probe = attacked
    t0 = time.monotonic()
    done, result, _ = attack(srv, probe, "pow-const", {"body": "{{ 10**(10**7) }}"}, rows(2), within=30)
    assert (done["status"], done["succeededCount"], done["erroredCount"]) == ("Completed with errors", 0, 2)
    assert all(r["error"].startswith("number size limit: 10 ** 10000000 would have about 10,000,001 digits, "
                                     "over FILEDROP_MAX_NUMBER_DIGITS (4300)") for r in result), result
    assert time.monotonic() - t0 < 30
    assert published(srv, "pow-const") == []


@pytest.mark.slow
def test_render_time_power_from_row_data(attacked) -> None:
    srv, probe = attacked
    data = [{"reference_id": "big", "suffix": "s" * 16, "data": {"e": 20_000_000}}, *rows(3)]
    done, result, _ = attack(srv, probe, "pow-data", {"body": "{{ (10 ** (data.e or 2)) % 7 }}"}, data, within=30)
    assert (done["status"], done["succeededCount"], done["erroredCount"]) == ("Completed with errors", 3, 1)
    assert "number size limit: 10 ** 20000000" in result[0]["error"]
    log = get(srv, f"/api/batch/pow-data/{done['job_id']}/log")["log"]
    assert any(e["message"].startswith('row 0 (reference_id "big"): number size limit') for e in log)


@pytest.mark.slow
def test_a_row_that_never_ends_is_killed_then_errored_naming_the_limit(attacked) -> None:
    srv, probe = attacked
    spin = {"body": "{% if data.spin %}{% for i in range(100000) %}{% for j in range(100000) %}"
                    "{% endfor %}{% endfor %}{% endif %}x{{ data.n }}"}
    data = [{"reference_id": "spin", "suffix": "s" * 16, "data": {"spin": True}}, *rows(3)]
    # Two attempts of TIMEOUT each, a fresh render process after each kill: bounded.
    done, result, took = attack(srv, probe, "spin", spin, data, within=6 * TIMEOUT + 15)
    assert took >= 2 * TIMEOUT  # it was given its time, twice
    assert (done["status"], done["succeededCount"], done["erroredCount"]) == ("Completed with errors", 3, 1)
    assert result[0]["error"] == (f"time limit: rendering this row took longer than FILEDROP_RENDER_TIMEOUT "
                                  f"({TIMEOUT:g} s) (on 2 attempts)")
    assert published(srv, "spin") == [f"ref{i:06d}.s{i:020d}.html" for i in range(3)]


@pytest.mark.slow
def test_rows_that_never_end_do_not_take_every_worker_for_long(attacked) -> None:
    # More never-ending jobs than workers (2 here), then another tenant's job: each spinning row
    # holds a worker at most FILEDROP_RENDER_TIMEOUT, and workers take running jobs in turn.
    srv, probe = attacked
    spin = {"body": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"}
    with probe:
        spinning = [start(srv, f"spin{k}", spin, rows(1)).json()["job_id"] for k in range(3)]
        t0 = time.monotonic()
        r = start(srv, "latecomer", {"body": "<p>{{ data.n }}</p>"}, rows(3), key=OTHER)
        assert r.status_code == 202, r.text
        late = wait_until(lambda: (s := get(srv, f"/api/batch/latecomer/{r.json()['job_id']}/status", OTHER))
                          ["status"] in FINISHED and s, timeout=60, interval=0.05, what="the latecomer's job")
        took = time.monotonic() - t0
        ends = [wait_end(srv, f"spin{k}", jid, timeout=60) for k, jid in enumerate(spinning)]
    probe.check()
    assert late["status"] == "Completed" and took < 3 * TIMEOUT + 10, (late, took)
    assert [(e["status"], e["erroredCount"]) for e in ends] == [("Completed with errors", 1)] * 3


@pytest.mark.slow
def test_string_repetition_is_refused_before_it_is_made(attacked) -> None:
    srv, probe = attacked
    done, result, _ = attack(srv, probe, "repeat", {"body": "{{ 'x' * 300000000 }}"}, rows(2), within=30)
    assert (done["succeededCount"], done["erroredCount"]) == (0, 2)
    assert all(r["error"].startswith("page size limit: a str * 300000000 would hold 300,000,000 items, over "
                                     "FILEDROP_MAX_PAGE_SIZE") for r in result), result
    assert published(srv, "repeat") == []


@pytest.mark.slow
def test_a_page_over_the_size_limit_is_not_published(attacked) -> None:
    srv, probe = attacked
    data = [{"reference_id": "huge", "suffix": "s" * 16, "data": {"w": 11 << 20}}, *rows(1)]
    done, result, _ = attack(srv, probe, "bigpage", {"body": "{{ 'x' | center(data.w or 1) }}"}, data, within=30)
    assert (done["succeededCount"], done["erroredCount"]) == (1, 1)
    assert result[0]["error"].startswith("page size limit: the page is 11,534,")
    assert "over FILEDROP_MAX_PAGE_SIZE (10,485,760 bytes)" in result[0]["error"]
    assert published(srv, "bigpage") == ["ref000000.s00000000000000000000.html"]


@pytest.mark.slow
def test_a_row_over_the_memory_limit_is_killed_then_errored_naming_the_limit(attacked) -> None:
    srv, probe = attacked
    data = [{"reference_id": "hog", "suffix": "s" * 16, "data": {"w": 600 << 20}}, *rows(2)]
    done, result, _ = attack(srv, probe, "hog", {"body": "{{ 'x' | center(data.w or 1) }}"}, data, within=40)
    assert (done["succeededCount"], done["erroredCount"]) == (2, 1), result
    assert result[0]["error"] == ("memory limit: the render process needed more than FILEDROP_RENDER_MEMORY "
                                  f"({512 << 20:,} bytes) (on 2 attempts)")


@pytest.mark.slow
def test_a_template_that_cannot_compile_within_the_limits_is_refused_at_start(attacked) -> None:
    # Jinja2 folds a filter on constants while it compiles: 2 x 400 MB, in the checker process.
    srv, probe = attacked
    bomb = {"body": "{{ 'x' | center(400000000) ~ 'y' | center(400000000) }}"}
    with probe:
        r = start(srv, "bomb", bomb, rows(1))
        wait_until(lambda: len(probe.latencies) >= 20, timeout=30, what="20 probe calls")
    probe.check()
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["field"] == "document_file", body
    # Over the memory limit, or (copying 800 MB of constants into code) the time limit first.
    assert body["message"].startswith("document_file: cannot be compiled within the limits: "), body
    assert "FILEDROP_RENDER_MEMORY" in body["message"] or "FILEDROP_RENDER_TIMEOUT" in body["message"], body
    assert get(srv, "/api/batch/bomb/jobs") == {"batch_id": "bomb", "jobs": []}
    # The checker process was replaced: the next start is checked (and runs) as usual.
    r = start(srv, "after-bomb", {"body": "<p>{{ data.n }}</p>"}, rows(2))
    assert r.status_code == 202, r.text
    assert wait_end(srv, "after-bomb", r.json()["job_id"])["status"] == "Completed"


# A real HTTP server in its own process (not a thread of this one: writing 750 MB would compete
# with the probe for this process's GIL): ``/a/<n>.js``, 5 MB of script each, one line per hit.
ASSET_SERVER = """
import http.server, sys, threading
lock = threading.Lock()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        with lock:
            print(self.path, flush=True)
        body = (("/* %s */" % self.path).encode() + b"x" * (5 << 20))[:5 << 20]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
print("ready", flush=True)
s.serve_forever()
"""


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")


@pytest.mark.slow
def test_many_big_assets_are_not_held_in_memory(attacked) -> None:
    # strategy=mixed, a parametrised script URL: 150 distinct 5 MB scripts (750 MB). Each is
    # fetched once, to a file under the data dir, never held whole; the files go with the job.
    from tests.test_job_resume import descendants

    srv, probe = attacked
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", ASSET_SERVER, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        url = f"http://127.0.0.1:{port}/a/{{{{ data.n }}}}.js"
        template = {"body": "<p>{{ data.n }}</p>", "scripts": [{"src": url}]}
        done, result, _ = attack(srv, probe, "assets", template, rows(150), within=120, strategy="mixed")
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=10)
    hits = Counter(line for line in out.splitlines() if line.startswith("/a/"))
    assert (done["status"], done["succeededCount"]) == ("Completed", 150), result[:2]
    assert sorted(hits.values()) == [1] * 150  # each fetched once for the whole job
    page = (Path(srv.env["FILEDROP_DATA_DIR"]) / "smartlinks" / "assets" / "ref000007.s00000000000000000007.html")
    assert f'<script src="{url.replace("{{ data.n }}", "7")}"></script>' in page.read_text()  # over 16 KB: linked
    assert srv.proc is not None
    peaks = {pid: peak_rss_mb(pid) for pid in [srv.proc.pid, *descendants(srv.proc.pid)]}
    assert max(peaks.values()) < 200, peaks  # was 976 MB in the server alone
    fetched = Path(srv.env["FILEDROP_DATA_DIR"]) / "assets" / done["job_id"]
    wait_until(lambda: not fetched.exists(), timeout=10, what="the job's fetched assets to be removed (it ended)")
