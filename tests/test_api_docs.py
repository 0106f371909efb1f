"""The newcomer docs work as written: docs/api.md's shell blocks and its Python example run, in
order, against a real server behind NGINX; every route is shown there; README points at the docs
and no longer outside the repository."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

from server.config import Settings
from server.openapi import build
from tests.conftest import API_KEY
from tests.support.nginx import app_behind_nginx
from tests.support.server import REPO
from tests.support.waiting import wait_until

API_DOC = REPO / "docs" / "api.md"
# curl as the blocks use it, failing on an HTTP error unless the block shows one (-i/-I).
CURL = '''curl() { case " $* " in *" -i "*|*" -I "*) command curl "$@" ;; *) command curl --fail-with-body "$@" ;; esac; }
'''


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", API_DOC.read_text(), re.S | re.M)


def route_pattern(path: str) -> str:
    """A regex for ``path`` with each ``{param}`` standing for one path segment."""
    return re.sub(r"\\\{\w+\\\}", lambda _m: r'[^/\s"?]+', re.escape(path))


def test_every_route_has_an_example() -> None:
    text = API_DOC.read_text()
    missing = []
    for path in build(Settings())["paths"]:
        if path.startswith("/nuxeo/"):
            continue  # the same routes again, said once in the doc
        if not re.search(r"\$H" + route_pattern(path) + r"[\"\s?]", text):
            missing.append(path)
    assert not missing, f"docs/api.md shows no call of {missing}"


def test_the_walkthrough_runs_as_written(server_factory, nginx_factory, tmp_path: Path) -> None:
    srv, front = app_behind_nginx(server_factory, nginx_factory, tmp_path / "srv", API_KEY)
    work = tmp_path / "work"
    (work / "var").mkdir(parents=True)
    (work / "var" / "dev-api-key").write_text(API_KEY + "\n")
    runnable = blocks("sh")
    assert len(runnable) >= 10
    script = "set -euo pipefail\n" + CURL + "\n".join(runnable)
    script = script.replace("http://127.0.0.1:8080", front.url)
    r = subprocess.run(["bash", "-c", script], cwd=work, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"stdout:\n{r.stdout[-5000:]}\nstderr:\n{r.stderr[-3000:]}"
    out = r.stdout
    assert 'WWW-Authenticate: Basic realm="filedrop"' in out
    assert "Completed\n" in out  # the job finished, all rows rendered (not "Completed with errors")
    assert "<h1>Client 240 000 009 425</h1>" in out and "(EUR)" in out  # the page, through NGINX
    # The page begins as docs/smartlinks.md shows it (its template has no styles).
    (page,) = re.findall(r"^```html\n(.*?)^```", (REPO / "docs" / "smartlinks.md").read_text(), re.S | re.M)
    head = "\n".join(page.splitlines()[:6]) + "\n"
    assert "<title>Invoice 240 000 009 425</title>" in head and head in out, head
    assert '"uploadedChunkIds": [0, 1, 2]' in out and '"status": "Queued"' in out
    # Signed URLs (issue 11): the second PUT and a changed URL refused, the CSV downloaded keyless.
    assert "Waiting for data\n" in out and '"code": "ERR_DATA_RECEIVED"' in out and '"code": "ERR_URL_INVALID"' in out
    assert "reference_id,suffix,url,status,error\n5ef3501829bf41003d6da7b4," in out
    # Every job the walkthrough starts renders all its rows: an example that leaves out a part the
    # template needs (`params.invoice`) would end "Completed with errors" where no output shows it.
    ended = _jobs_of_the_walkthrough(front.url)
    assert len(ended) >= 5, ended
    unfinished = {n: (j["status"], j["succeededCount"], j["erroredCount"]) for n, j in ended.items()
                  if j["status"] != "Completed" or j["erroredCount"]}
    assert not unfinished, f"walkthrough jobs that did not render every row: {unfinished}"
    # The Python client example, with the key and the file the blocks made.
    (python,) = blocks("python")
    code = f"KEY = {API_KEY!r}\n" + python.replace("http://127.0.0.1:8080", front.url) + \
        "\nassert manifest['files'][0]['size'] == 3000000, manifest\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    log = srv.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]


def _jobs_of_the_walkthrough(base: str, timeout: float = 30.0) -> dict[str, dict]:
    """The last job of every smartlink batch docs/api.md names, once none of them is running
    (``wait_until``'s deadline: a job still running then fails the wait, naming the jobs)."""
    text = API_DOC.read_text()
    names = set(re.findall(r"\$H/api/batch/([A-Za-z0-9][A-Za-z0-9_-]*)/", text))
    names |= set(re.findall(r'"batch_id": "([A-Za-z0-9][A-Za-z0-9_-]*)"', text))
    names -= {"my-first-batch"}  # the README's job example, not a call

    def ended() -> list[dict[str, dict]] | None:
        jobs = {}
        for name in sorted(names):
            req = urllib.request.Request(f"{base}/api/batch/{name}/jobs", headers={"X-API-Key": API_KEY})
            with urllib.request.urlopen(req, timeout=10) as r:
                listed = json.load(r)["jobs"]
            if listed:
                jobs[name] = listed[0]
        running = [j for j in jobs.values() if j["status"] in ("Queued", "In progress", "Waiting for data")]
        return None if running else [jobs]  # (in a list: no job at all is an answer too)

    return wait_until(ended, timeout=timeout, interval=0.2, what="every walkthrough job ended")[0]


def test_readme_links_the_docs_and_nothing_outside_the_repository() -> None:
    readme = (REPO / "README.md").read_text()
    assert "docs/smartlinks.md" in readme and "docs/api.md" in readme
    for doc in (readme, API_DOC.read_text(), (REPO / "docs" / "smartlinks.md").read_text()):
        assert "../shared" not in doc and "/work/shared" not in doc and "shared/SMARTLINK" not in doc
    assert 'pip install "nuxeo[oauth2]==7.1.0" packaging' in API_DOC.read_text()


def _fields_named(doc: dict, schema: dict) -> set[str]:  # type: ignore[type-arg]
    """Every property name a response schema (its refs, allOf/anyOf/oneOf) can give."""
    if "$ref" in schema:
        return _fields_named(doc, doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]])
    names = set(schema.get("properties", {}))
    for key in ("allOf", "anyOf", "oneOf"):
        for part in schema.get(key, []):
            names |= _fields_named(doc, part)
    return names


async def test_an_identical_start_of_a_waiting_job_is_the_documented_200(client, settings: Settings) -> None:
    """README (Signed URLs, Statuses): an identical start of a job `Waiting for data` answers 200
    with that job and its URL again. The served OpenAPI document must describe that answer's
    fields, or a client generated from it drops the URL."""
    from tests.support.jobs import SEED_TEMPLATE, start

    first = await start(client, "docs-waiting", SEED_TEMPLATE, None, data_upload="url")
    assert first.status == 201, await first.text()
    again = await start(client, "docs-waiting", SEED_TEMPLATE, None, data_upload="url")
    body = await again.json()
    assert again.status == 200 and body["upload_URL"] and body["expires"], body
    doc = await (await client.get("/api/openapi.json")).json()
    answer = doc["paths"]["/api/batch/{batch_id}/start"]["post"]["responses"]["200"]
    documented = _fields_named(doc, answer["content"]["application/json"]["schema"])
    assert set(body) <= documented, f"startJob's 200 does not document {set(body) - documented}"
