"""schemathesis against the live server behind NGINX (a real ``filedrop serve`` and the project's
nginx.conf), from the document NGINX serves: every operation, a bounded number of generated
requests each (positive and negative data; its coverage, fuzzing and stateful phases, the last
following the document's links), checked for no 5xx, documented statuses, documented content
types and answers that match their schemas, and a 405 with Allow for each method a path does not
answer. 0 failures, and nothing logged at ERROR.

schemathesis runs as its own command (``schemathesis run``, its canonical runner): its pytest
plugin does not work with this pytest (it sets ``Function._nodeid``, which pytest 9 dropped).
A few real batches (a template and rows uploaded) and a job are made first and offered as path
parameters half of the time, so that generated requests also reach existing resources."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.conftest import API_KEY, AUTH
from tests.support.nginx import app_behind_nginx

EXAMPLES = 25  # generated requests per operation in the fuzzing phase (about 4,000 in all)
# unsupported_method: a method the document lists for no operation of a path is a 405 with Allow
# (the document's MethodNotAllowed, described once rather than under each operation).
CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "unsupported_method"]
TEMPLATE = {"title": "t {{ data.n }}", "body": "<p>{{ data.n }}</p>"}
ROWS = [{"reference_id": "r1", "suffix": "s" * 16, "data": {"n": 1}}]


def seed_data(base: str) -> dict[str, list[str]]:
    """Upload batches holding a template (file 0) and rows (file 1), and a job over the first."""
    batches = [requests.post(f"{base}/api/v1/upload", headers=AUTH, timeout=10).json()["batchId"] for _ in range(4)]
    for b in batches:
        for idx, doc in enumerate((TEMPLATE, ROWS)):
            r = requests.post(f"{base}/api/v1/upload/{b}/{idx}", data=json.dumps(doc), timeout=10,
                              headers={**AUTH, "X-File-Name": f"{idx}.json"})
            assert r.status_code == 201, r.text
    files = {"document_file": ("t.json", json.dumps(TEMPLATE), "application/json"), "data": (None, json.dumps(ROWS))}
    r = requests.post(f"{base}/api/batch/{batches[0]}/start", headers=AUTH, files=files, timeout=30)
    assert r.status_code == 202, r.text
    return {"batches": batches, "files": ["0", "1"], "jobs": [r.json()["job_id"]]}


def config(data: dict[str, list[str]]) -> str:
    # No made-up credentials for the security schemes: every request carries the key (--header),
    # and a made-up `signature` (the signedUrl scheme) would turn each request to a route that
    # takes one into a 403; the declared signature parameter is still generated, optional.
    lines = ["[generation]\nwith-security-parameters = false"]
    lines += [f"[dictionaries.{name}]\nvalues = {json.dumps(values)}" for name, values in data.items()]
    lines.append("[parameters]")
    for param, name in (("batch_id", "batches"), ("file_idx", "files"), ("job_id", "jobs")):
        lines.append(f'"path.{param}" = {{ dictionary = "{name}", probability = 0.5 }}')
    return "\n".join(lines) + "\n"


# About a minute on an idle 2-core machine; the machine is shared, so headroom well past the
# suite's default 300 s.
@pytest.mark.timeout(900)
def test_the_live_api_keeps_its_contract(server_factory, nginx_factory, tmp_path: Path) -> None:
    srv, front = app_behind_nginx(server_factory, nginx_factory, tmp_path / "srv", API_KEY)
    cfg = tmp_path / "schemathesis.toml"
    cfg.write_text(config(seed_data(front.url)))
    cmd = [str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(cfg), "--no-color",
           "run", f"{front.url}/api/openapi.json",
           "--checks", ",".join(CHECKS), "--max-examples", str(EXAMPLES), "--seed", "13",
           "--header", f"X-API-Key: {API_KEY}", "--request-timeout", "30",
           # One worker: with two, Hypothesis's lambda descriptions (ast.parse) in threads hit a
           # CPython 3.11 bug (SystemError: AST constructor recursion depth mismatch).
           "--workers", "1", "--suppress-health-check", "all"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=840)
    report = r.stdout[-20000:] + r.stderr[-5000:]
    assert r.returncode == 0, report
    # Every operation selected, and each of them tested.
    selected, total = map(int, re.search(r"Selected: (\d+)/(\d+)", r.stdout).groups())  # type: ignore[union-attr]
    assert total == selected and f"Tested: {selected}\n" in r.stdout, report
    log = srv.log_path.read_text(errors="replace")
    assert "Traceback" not in log and " ERROR " not in log, log[-5000:]
