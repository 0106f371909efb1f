"""Smartlink jobs end to end over the real app: the seed's example, each strategy, param parts,
generated suffixes, JSON Lines, the result listing, and SmartLinks.Generate on an upload batch."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import time
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import select

from server.app import create_app
from server.config import Settings
from server.db.job_models import JobRow
from server.jobs.publish import Item, stage
from tests.conftest import OTHER_KEY
from tests.support.disk_state import session
from tests.support.jobs import (
    AUTH,
    SEED_ROWS,
    SEED_TEMPLATE,
    asset_server,
    get_json,
    rows,
    start,
    start_ok,
    wait_job,
)
from tests.support.uploads import Uploads, assert_error

ISO_MS_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def no_temps(d: Path) -> bool:
    return not [p for p in d.iterdir() if p.name.startswith(".")]


def attempts(settings: Settings, job_id: str) -> list[int]:
    """Each row's renders a limit (or a crash of its render process) killed, in row order."""
    with session(settings) as s:
        return list(s.scalars(select(JobRow.attempts).where(JobRow.job_id == job_id).order_by(JobRow.idx)))


async def test_seed_example_end_to_end(client, settings) -> None:
    job = await start_ok(client, "my-first-batch", SEED_TEMPLATE, SEED_ROWS)
    assert set(job) == {"batch_id", "job_id", "status", "started", "finished", "succeededCount", "erroredCount",
                        "totalCount", "strategy"}
    assert job["batch_id"] == "my-first-batch" and re.fullmatch(r"[0-9a-f]{32}", job["job_id"])
    assert job["status"] in ("Queued", "In progress") and job["finished"] is None
    assert job["totalCount"] == 2 and job["strategy"] == "smallest"

    done = await wait_job(client, "my-first-batch", job["job_id"])
    assert done["status"] == "Completed", done
    assert (done["succeededCount"], done["erroredCount"]) == (2, 0)
    assert ISO_MS_Z.match(done["started"]) and ISO_MS_Z.match(done["finished"])

    d = settings.smartlink_root / "my-first-batch"
    assert sorted(p.name for p in d.iterdir()) == [
        "5ef3501829bf41003d612345.5f1ea1e9b982f900468aeb77.html",
        "5ef3501829bf41003d6da7b4.5f1ea1e9b982f900468aeb5b.html",
    ]
    page = (d / "5ef3501829bf41003d6da7b4.5f1ea1e9b982f900468aeb5b.html").read_text()
    assert "<h1>Client 240 000 009 425</h1><p>Montant : 500 €</p>" in page
    assert "<title>Invoice 240 000 009 425</title>" in page and '<html lang="fr">' in page
    assert "414,97" in (d / "5ef3501829bf41003d612345.5f1ea1e9b982f900468aeb77.html").read_text()

    result = await get_json(client, f"/api/batch/my-first-batch/{job['job_id']}/result")
    assert [r["url"] for r in result["rows"]] == [
        f"{settings.public_url}/my-first-batch/5ef3501829bf41003d6da7b4.5f1ea1e9b982f900468aeb5b.html",
        f"{settings.public_url}/my-first-batch/5ef3501829bf41003d612345.5f1ea1e9b982f900468aeb77.html",
    ]
    assert {r["status"] for r in result["rows"]} == {"succeeded"}
    r = await client.get(f"/api/batch/my-first-batch/{job['job_id']}/result?format=csv", headers=AUTH)
    assert r.headers["Content-Type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(await r.text())))
    assert table[1]["reference_id"] == "5ef3501829bf41003d612345" and table[1]["status"] == "succeeded"
    log = await get_json(client, f"/api/batch/my-first-batch/{job['job_id']}/log")
    assert any("Completed" in e["message"] for e in log["log"])


async def test_smartlink_batch_folders_are_spread_over_the_disk(client, settings) -> None:
    """The smartlinks root carries ext4's top-of-hierarchy hint (``chattr +T``) once a job has
    made its batch folder: each batch's pages are made in a block group ext4 picks for it, not
    where the batches removed last left their freed inodes."""
    from tests.support.fs import spread

    job = await start_ok(client, "spread-batch", SEED_TEMPLATE, SEED_ROWS)
    assert (await wait_job(client, "spread-batch", job["job_id"]))["status"] == "Completed"
    assert len(list((settings.smartlink_root / "spread-batch").iterdir())) == 2
    assert spread(settings.smartlink_root)


async def test_data_is_html_escaped_and_sandboxed(client, settings) -> None:
    template = {"body": "<p>{{ data.name }}</p><i>{{ data.name.__class__ }}</i>", "title": "{{ data.name }}"}
    data = [{"reference_id": "x1", "suffix": "abcdefghijklmnop1", "data": {"name": "<script>alert('x')</script>&"}}]
    job = await start_ok(client, "esc", template, data)
    assert (await wait_job(client, "esc", job["job_id"]))["status"] == "Completed"
    page = (settings.smartlink_root / "esc" / "x1.abcdefghijklmnop1.html").read_text()
    assert "<script>alert" not in page
    assert "<p>&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;</p>" in page
    assert "<title>&lt;script&gt;" in page


SMALL_JS = b"window.small = 1;"
BIG_JS = b"/* big */" + b"x" * (20 * 1024)
MARKED_JS = b"/* marked inline */" + b"y" * (20 * 1024)
CSS = b"body { color: red; }"
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 40


@pytest.mark.parametrize("strategy", ["smallest", "mixed", "original"])
async def test_each_strategy(client, settings, strategy) -> None:
    files = {"/small.js": SMALL_JS, "/big.js": BIG_JS, "/marked.js": MARKED_JS, "/s.css": CSS, "/doc.pdf": PDF}
    async with asset_server(files) as srv:
        template = {
            "body": "<p>{{ data.n }}</p>",
            "styles": [{"href": srv.url("/s.css")}, {"content": "p { margin: 0 }"}],
            "scripts": [{"src": srv.url("/small.js")}, {"src": srv.url("/big.js")},
                        {"src": srv.url("/marked.js"), "inline": True}, {"content": "window.READY = true;"}],
            "pdf": srv.url("/doc.pdf"),
        }
        job = await start_ok(client, f"strat-{strategy}", template, rows(5), strategy=strategy)
        done = await wait_job(client, f"strat-{strategy}", job["job_id"])
        assert done["status"] == "Completed" and done["strategy"] == strategy, done
        hits = dict(srv.hits)
    d = settings.smartlink_root / f"strat-{strategy}"
    page = (d / "ref000003.s00000000000000000003.html").read_text()
    assert "<p>3</p>" in page and "<script>window.READY = true;</script>" in page
    assert "<style>p { margin: 0 }</style>" in page
    linked = {name: f'<script src="{srv.url(name)}"></script>' in page for name in ("/small.js", "/big.js", "/marked.js")}
    inlined = {name: files[name].decode() in page for name in ("/small.js", "/big.js", "/marked.js")}
    if strategy == "smallest":
        assert linked == {"/small.js": True, "/big.js": True, "/marked.js": True}
        assert not any(inlined.values())
        assert f'<link rel="stylesheet" href="{srv.url("/s.css")}">' in page
        assert f'data="{srv.url("/doc.pdf")}"' in page
        assert hits == {}  # nothing needs fetching
    elif strategy == "mixed":
        assert linked == {"/small.js": False, "/big.js": True, "/marked.js": False}
        assert inlined == {"/small.js": True, "/big.js": False, "/marked.js": True}
        assert f'<link rel="stylesheet" href="{srv.url("/s.css")}">' in page
        assert f'data="{srv.url("/doc.pdf")}"' in page
        assert hits == {"/small.js": 1, "/big.js": 1, "/marked.js": 1}  # once per job, not per row
    else:
        assert not any(linked.values()) and all(inlined.values())
        assert f"<style>{CSS.decode()}</style>" in page and "<link" not in page
        assert 'data="data:application/pdf;base64,' + base64.b64encode(PDF).decode() + '"' in page
        assert hits == {"/small.js": 1, "/big.js": 1, "/marked.js": 1, "/s.css": 1, "/doc.pdf": 1}
    assert no_temps(d) and len(list(d.iterdir())) == 5


async def test_param_parts_and_parametrised_assets(client, settings) -> None:
    async with asset_server({"/acme/v.js": b"window.brand='acme';"}) as srv:
        template = {"body": "<b>{{ params.customer.name }}</b> {{ params.rate }}",
                    "scripts": [{"src": srv.url("/{{ params.customer.brand }}/v.js")}]}
        job = await start_ok(client, "params", template, rows(3), strategy="original",
                             params={"customer": {"name": "Ma <Société>", "brand": "acme"}, "rate": 1.5})
        assert (await wait_job(client, "params", job["job_id"]))["status"] == "Completed"
        assert srv.hits == {"/acme/v.js": 1}
    page = (settings.smartlink_root / "params" / "ref000000.s00000000000000000000.html").read_text()
    assert "<b>Ma &lt;Société&gt;</b> 1.5" in page and "<script>window.brand='acme';</script>" in page


async def test_asset_urls_keep_their_queries_as_written(client, settings) -> None:
    """`&region=`, `&times=`, `&not=`, `&copy=` are HTML's legacy entity names without their `;`:
    a URL is fetched and linked with them as written, never as `®ion=`, `×=`."""
    query = "a=1&region=eu&times=5&section=2&not=3&copy=4"
    async with asset_server({"/acme/v.js": b"window.x=1;", "/s.css": b"b{}"}) as srv:
        template = {"body": "x", "styles": [{"href": srv.url(f"/s.css?{query}")}],
                    "scripts": [{"src": srv.url(f"/{{{{ params.brand }}}}/v.js?{query}&amp;amp=1")}]}
        job = await start_ok(client, "queries", template, rows(1), strategy="original", params={"brand": "acme"})
        assert (await wait_job(client, "queries", job["job_id"]))["status"] == "Completed"
        assert sorted(srv.queries) == sorted([query, query + "&amp=1"])  # `&amp;` is the one `&` escaped
        template["pdf"] = f"https://files.example.com/doc.pdf?{query}"  # linked, not fetched, by `smallest`
        job = await start_ok(client, "querylinks", template, rows(1), strategy="smallest", params={"brand": "acme"})
        assert (await wait_job(client, "querylinks", job["job_id"]))["status"] == "Completed"
    page = (settings.smartlink_root / "querylinks" / "ref000000.s00000000000000000000.html").read_text()
    escaped = query.replace("&", "&amp;")
    assert f'href="{srv.url("/s.css?" + escaped)}"' in page
    assert f'src="{srv.url("/acme/v.js?" + escaped)}&amp;amp=1"' in page
    assert f'data="https://files.example.com/doc.pdf?{escaped}"' in page


async def test_a_page_name_fits_one_file_name(client, settings) -> None:
    """`<reference_id>.<suffix>.html` is one name of at most 255 bytes: 249 characters of
    reference_id and suffix publish; 250 are an errored row that says why."""
    fits = {"reference_id": "r" * 128, "suffix": "s" * 121}
    over = {"reference_id": "q" * 128, "suffix": "s" * 122}
    job = await start_ok(client, "longnames", {"body": "x"}, [fits, over])
    done = await wait_job(client, "longnames", job["job_id"])
    assert (done["succeededCount"], done["erroredCount"]) == (1, 1), done
    result = (await get_json(client, f"/api/batch/longnames/{job['job_id']}/result"))["rows"]
    assert "at most 249 characters" in result[1]["error"] and "255 bytes" in result[1]["error"], result[1]
    assert [p.name for p in (settings.smartlink_root / "longnames").iterdir()] == ["r" * 128 + "." + "s" * 121 + ".html"]


async def test_generated_suffixes_and_json_lines(client, settings) -> None:
    lines = b"\n".join(b'{"reference_id": "gen%d", "data": {"i": %d}}' % (i, i) for i in range(4)) + b"\n"
    job = await start_ok(client, "gen", {"body": "{{ suffix }}"}, lines, data_field="data_file")
    assert (await wait_job(client, "gen", job["job_id"]))["status"] == "Completed"
    result = (await get_json(client, f"/api/batch/gen/{job['job_id']}/result"))["rows"]
    assert [r["reference_id"] for r in result] == ["gen0", "gen1", "gen2", "gen3"]
    suffixes = [r["suffix"] for r in result]
    assert all(re.fullmatch(r"[0-9a-f]{24}", s) for s in suffixes) and len(set(suffixes)) == 4
    for r in result:
        f = settings.smartlink_root / "gen" / f"{r['reference_id']}.{r['suffix']}.html"
        assert r["suffix"] in f.read_text()


async def test_bad_rows_are_errored_and_the_rest_go_on(client, settings) -> None:
    data = [*rows(3), {"reference_id": "../etc", "data": {}}, {"reference_id": "ok", "suffix": "short"},
            {"reference_id": "ref000001", "suffix": "s00000000000000000001", "data": {}},  # duplicate
            {"reference_id": "p", "pdf": "file:///etc/passwd"}, "not an object",
            {"reference_id": 'x"\n\x1b[31m' + "y" * 300}]  # a log line must not carry it raw
    job = await start_ok(client, "badrows", {"body": "x"}, data)
    done = await wait_job(client, "badrows", job["job_id"])
    assert done["status"] == "Completed with errors"
    assert (done["succeededCount"], done["erroredCount"], done["totalCount"]) == (3, 6, 9)
    result = (await get_json(client, f"/api/batch/badrows/{job['job_id']}/result"))["rows"]
    errors = [r["error"] for r in result if r["status"] == "errored"]
    assert any("reference_id" in e for e in errors) and any("duplicate" in e for e in errors)
    # the limit is a setting, and the row's error names it
    assert "suffix must be at least 16 characters long (FILEDROP_MIN_SUFFIX_LENGTH)" in errors
    assert any("pdf" in e for e in errors)
    assert sorted(p.name for p in (settings.smartlink_root / "badrows").iterdir()) == [
        f"ref00000{i}.s0000000000000000000{i}.html" for i in range(3)]
    log = (await get_json(client, f"/api/batch/badrows/{job['job_id']}/log"))["log"]
    assert any(e["level"] == "error" and 'row 5 (reference_id "ref000001"): duplicate' in e["message"] for e in log)
    assert any('row 3 (reference_id "../etc"): reference_id must be' in e["message"] for e in log)
    assert any("row 7 (no reference_id): a row must be a JSON object" in e["message"] for e in log)
    ref8 = next(e["message"] for e in log if e["message"].startswith("row 8 "))
    assert ref8 == 'row 8 (reference_id "x\\"\\n\\u001b[31m' + "y" * 120 + '"): reference_id must be 1-128 of A-Z a-z 0-9 _ -'
    assert "\x1b" not in ref8 and "\n" not in ref8


async def test_a_template_cannot_carry_one_rows_data_into_another(client, settings) -> None:
    # params is shared by every row of the job: a page must not show what earlier rows put there
    template = {"body": "{{ params.seen.append(data.n) or '' }}{{ params.seen | join(',') }}"}
    job = await start_ok(client, "leak", template, rows(3), params={"seen": []})
    done = await wait_job(client, "leak", job["job_id"])
    assert (done["succeededCount"], done["erroredCount"]) == (0, 3)
    result = (await get_json(client, f"/api/batch/leak/{job['job_id']}/result"))["rows"]
    assert all("unsafe" in r["error"] for r in result)
    # a namespace() still carries state within one render
    template = {"body": "{% set ns = namespace(t=0) %}{% for i in [1, 2, data.n] %}{% set ns.t = ns.t + i %}"
                        "{% endfor %}<i>{{ ns.t }}</i>"}
    job = await start_ok(client, "ns", template, rows(3))
    assert (await wait_job(client, "ns", job["job_id"]))["status"] == "Completed"
    assert "<i>5</i>" in (settings.smartlink_root / "ns" / "ref000002.s00000000000000000002.html").read_text()


async def test_the_api_process_never_compiles_or_renders_a_template(client, settings, monkeypatch) -> None:
    # Compiling runs the client's code (constant folding); rendering too: both happen in render
    # processes only. Any Jinja2 compile or render in this (the API's) process is recorded.
    import jinja2

    calls: list[str] = []
    real_compile, real_render = jinja2.Environment.compile, jinja2.Template.render

    def compile_spy(self, *a, **kw):  # type: ignore[no-untyped-def]
        calls.append("compile")
        return real_compile(self, *a, **kw)

    def render_spy(self, *a, **kw):  # type: ignore[no-untyped-def]
        calls.append("render")
        return real_render(self, *a, **kw)

    monkeypatch.setattr(jinja2.Environment, "compile", compile_spy)
    monkeypatch.setattr(jinja2.Template, "render", render_spy)
    job = await start_ok(client, "once", SEED_TEMPLATE, SEED_ROWS)
    assert (await wait_job(client, "once", job["job_id"]))["status"] == "Completed"
    r = await start(client, "bad", {"body": "{{ data.x "}, SEED_ROWS)  # the syntax check is elsewhere too
    assert r.status == 422 and "syntax error in `body` line 1" in (await r.json())["message"]
    assert calls == []
    page = (settings.smartlink_root / "once" / "5ef3501829bf41003d6da7b4.5f1ea1e9b982f900468aeb5b.html").read_text()
    assert "<h1>Client 240 000 009 425</h1>" in page


async def test_a_trailing_newline_in_a_name_is_errored(client, settings) -> None:
    data = [*rows(1), {"reference_id": "ref\n", "suffix": "s00000000000000000009"},
            {"reference_id": "ref9", "suffix": "s00000000000000000009\n"}, {"reference_id": "p", "pdf": "batch:1\n"}]
    job = await start_ok(client, "newline", {"body": "x"}, data)
    done = await wait_job(client, "newline", job["job_id"])
    assert (done["succeededCount"], done["erroredCount"]) == (1, 3)
    assert [p.name for p in (settings.smartlink_root / "newline").iterdir()] == ["ref000000.s00000000000000000000.html"]


async def test_execute_smartlinks_generate_publishes_batch_pdf(client, settings) -> None:
    up = Uploads(client)
    batch = await up.create()
    import json
    await up.upload(batch, 0, json.dumps({"body": "<a href='{{ pdf }}'>{{ data.n }}</a>"}).encode(), "t.json")
    await up.upload(batch, 1, json.dumps([
        {"reference_id": "withpdf", "suffix": "abcdefghijklmnopq", "pdf": "batch:2", "data": {"n": 1}},
        {"reference_id": "missing", "suffix": "abcdefghijklmnopq", "pdf": "batch:9", "data": {"n": 2}},
    ]).encode(), "d.json")
    await up.upload(batch, 2, PDF, "doc.pdf")
    r = await client.post(f"/api/v1/upload/{batch}/execute/SmartLinks.Generate", headers=AUTH,
                          json={"params": {"template": 0, "data": "1", "max_errors": "5"}})
    job = await r.json()
    assert r.status == 202, job
    assert job["batch_id"] == batch
    done = await wait_job(client, batch, job["job_id"])
    assert (done["status"], done["succeededCount"], done["erroredCount"]) == ("Completed with errors", 1, 1)
    d = settings.smartlink_root / batch
    assert (d / "withpdf.abcdefghijklmnopq.pdf").read_bytes() == PDF
    assert "href='withpdf.abcdefghijklmnopq.pdf'" in (d / "withpdf.abcdefghijklmnopq.html").read_text()
    result = (await get_json(client, f"/api/batch/{batch}/{job['job_id']}/result"))["rows"]
    assert result[1]["status"] == "errored"
    assert result[1]["error"] == f"batch:9: file 9 of batch {batch} not found", result[1]["error"]
    # the upload batch was kept for the job (not dropped by execute)
    r = await client.get(f"/api/v1/upload/{batch}", headers=AUTH)
    assert r.status == 200


async def test_an_upload_batch_is_not_deleted_under_the_job_started_from_it(client, settings) -> None:
    """Its rows may publish the batch's files (`batch:<fileIdx>`) until the job ends: the API's
    deletes answer 409 ERR_JOB_RUNNING meanwhile (as `filedrop drop` refuses), and work after."""
    import json
    up = Uploads(client)
    batch = await up.create()
    forever = "{% for i in range(10**6) %}{% for j in range(10**6) %}{% endfor %}{% endfor %}x"
    await up.upload(batch, 0, json.dumps({"body": forever}).encode(), "t.json")
    await up.upload(batch, 1, json.dumps([{"reference_id": "r", "pdf": "batch:2"}]).encode(), "d.json")
    await up.upload(batch, 2, PDF, "doc.pdf")
    r = await client.post(f"/api/v1/upload/{batch}/execute/SmartLinks.Generate", headers=AUTH,
                          json={"params": {"template": 0, "data": 1}})
    job = await r.json()
    assert r.status == 202, job
    for method, path in (("DELETE", f"/api/v1/upload/{batch}/2"), ("DELETE", f"/api/v1/upload/{batch}"),
                         ("POST", f"/site/automation/batch/drop/{batch}")):
        body = await assert_error(await client.request(method, path, headers=AUTH), 409, "ERR_JOB_RUNNING")
        assert job["job_id"] in body["message"], body
        other = await client.request(method, path, headers={"X-API-Key": OTHER_KEY})
        assert other.status == 404  # another key learns nothing of the batch
    # Executing an operation removes the batch (Nuxeo): refused the same way, REST and legacy; with
    # X-Batch-No-Drop the operation runs and the batch stays.
    legacy = {"params": {"operationId": "Batch.Manifest", "batchId": batch}}
    for path, body in ((f"/api/v1/upload/{batch}/execute/Batch.Manifest", None),
                       (f"/api/v1/upload/{batch}/2/execute/Batch.Manifest", None),
                       ("/site/automation/batch/execute", legacy)):
        r = await client.post(path, headers=AUTH, json=body)
        err = await assert_error(r, 409, "ERR_JOB_RUNNING")
        assert job["job_id"] in err["message"] and "X-Batch-No-Drop" in err["message"], err
        r = await client.post(path, headers={**AUTH, "X-Batch-No-Drop": "true"}, json=body)
        assert r.status == 200, await r.text()
    # A whole file sent onto one of the batch's files would replace (remove) it: refused the same way,
    # small and streamed, REST and legacy; a new file is welcome.
    for body in (b"%PDF-1.4 other", b"%PDF-1.4 " + bytes(2 << 20)):
        err = await assert_error(await up.post(batch, 2, body, "new.pdf"), 409, "ERR_JOB_RUNNING")
        assert job["job_id"] in err["message"], err
    r = await client.post("/site/automation/batch/upload", data=b"{}", headers={
        **AUTH, "X-Batch-Id": batch, "X-File-Idx": "0", "X-File-Name": "t.json", "X-File-Size": "2"})
    await assert_error(r, 409, "ERR_JOB_RUNNING")
    assert (await up.post(batch, 3, b"new file")).status == 201
    assert [f["fileIdx"] for f in (await up.manifest(batch))["files"]] == ["0", "1", "2", "3"]
    assert (await up.manifest(batch, 2))["files"][0]["size"] == len(PDF)
    r = await client.post(f"/api/batch/{batch}/{job['job_id']}/cancel", headers=AUTH)
    assert r.status == 200, await r.text()
    assert (await wait_job(client, batch, job["job_id"]))["status"] == "Cancelled"
    r = await client.post(f"/api/v1/upload/{batch}/2", data=b"%PDF-1.4 other", headers={**AUTH, "X-File-Name": "n.pdf"})
    assert r.status == 201, await r.text()  # the job ended: a whole file replaces a file again
    assert (await client.delete(f"/api/v1/upload/{batch}/2", headers=AUTH)).status == 204
    r = await client.post(f"/api/v1/upload/{batch}/execute/Batch.Manifest", headers=AUTH)
    assert r.status == 200, await r.text()  # the job ended: executing removes the batch again
    assert (await client.get(f"/api/v1/upload/{batch}", headers=AUTH)).status == 404


async def test_another_keys_job_on_the_same_batch_id_holds_nothing_of_an_upload_batch(client, settings) -> None:
    """Upload batch ids are one namespace for every key (a legacy client names its own), and a
    start names its job's upload batch after its path. Another key's job on the same id read
    nothing of the batch, yet its owner's deletes answered 409 naming that key's job, and a
    whole file could not replace one of its files, until the other key's job ended."""
    from tests.support.jobs import start
    owner, other = {"X-API-Key": settings.api_keys[0]}, {"X-API-Key": OTHER_KEY}
    r = await client.post("/site/automation/batch/upload", data=b"hello", headers={
        **owner, "X-Batch-Id": "shared-id", "X-File-Idx": "0", "X-File-Name": "a.txt", "X-File-Size": "5"})
    assert r.status == 200, await r.text()
    r = await start(client, "shared-id", SEED_TEMPLATE, None, headers=other, data_upload="url")
    job = await r.json()
    assert r.status == 201 and job["status"] == "Waiting for data", job  # running, as far as batches go
    r = await client.post("/site/automation/batch/upload", data=b"howdy", headers={
        **owner, "X-Batch-Id": "shared-id", "X-File-Idx": "0", "X-File-Name": "b.txt", "X-File-Size": "5"})
    assert r.status == 200, await r.text()  # replaced: no job of this key reads the batch
    r = await client.delete("/api/v1/upload/shared-id", headers=owner)
    assert r.status == 204, await r.text()
    status = await client.get(f"/api/batch/shared-id/{job['job_id']}/status", headers=other)
    assert (await status.json())["status"] == "Waiting for data"  # the other key's job is untouched


async def test_pages_under_the_size_limit_publish_however_many_travel_together(aiohttp_client, settings) -> None:
    """FILEDROP_MAX_PAGE_SIZE bounds each page, not the group of answers a render process sends
    at once: 60 pages of 50 KB under a 1 MiB limit all publish, first time (a group of them over
    1 MiB had the render process killed and a row blamed for it, again and again)."""
    settings = replace(settings, max_page_size=1 << 20)
    client = await aiohttp_client(create_app(settings))
    job = await start_ok(client, "group", {"body": "<p>{{ data.n }}</p>{{ 'x' * 50000 }}"}, rows(60))
    done = await wait_job(client, "group", job["job_id"], timeout=120)
    assert (done["status"], done["succeededCount"], done["erroredCount"]) == ("Completed", 60, 0), done
    assert attempts(settings, job["job_id"]) == [0] * 60
    d = settings.smartlink_root / "group"
    assert no_temps(d) and len(list(d.iterdir())) == 60
    assert (d / "ref000059.s00000000000000000059.html").stat().st_size > 50000


async def test_a_page_near_the_size_limit_publishes_after_a_big_one(client, settings) -> None:
    """With the default 10 MiB limit, a 3 MiB page then an 8 MiB one (11 MiB together) both
    publish, first time."""
    data = [{"reference_id": f"w{i}", "suffix": "s" * 16, "data": {"w": w}} for i, w in enumerate([1, 3 << 20, 8 << 20])]
    job = await start_ok(client, "bigpages", {"body": "{{ 'x' | center(data.w) }}"}, data)
    done = await wait_job(client, "bigpages", job["job_id"], timeout=120)
    assert (done["status"], done["succeededCount"], done["erroredCount"]) == ("Completed", 3, 0), done
    assert attempts(settings, job["job_id"]) == [0, 0, 0]
    assert (settings.smartlink_root / "bigpages" / f"w2.{'s' * 16}.html").stat().st_size > 8 << 20


async def test_long_error_messages_of_many_rows_reach_their_rows(client, settings) -> None:
    """A hundred rows whose errors are long and not ASCII (each character escaped to 12 bytes on
    the way from the render process: 18 KB a message) get their own error, first time (together
    they passed the 1 MiB a message header may take: the process was killed, a row blamed)."""
    data = [{"reference_id": f"e{i}", "suffix": "s" * 16, "data": {"p": "\U0001d4b3" * 1500}} for i in range(100)]
    raw = json.dumps(data, ensure_ascii=False).encode()  # 600 KB: under aiohttp's 1 MB for a body in one piece
    job = await start_ok(client, "longerrors", {"body": "x", "pdf": "{{ data.p }}"}, raw)
    done = await wait_job(client, "longerrors", job["job_id"], timeout=120)
    assert (done["status"], done["succeededCount"], done["erroredCount"]) == ("Completed with errors", 0, 100), done
    result = (await get_json(client, f"/api/batch/longerrors/{job['job_id']}/result"))["rows"]
    assert all(r["error"].startswith("pdf '\U0001d4b3") for r in result), {r["error"][:80] for r in result}
    assert attempts(settings, job["job_id"]) == [0] * 100


async def test_a_row_whose_pdf_cannot_be_copied_publishes_no_page(client, settings) -> None:
    """A row's page and its `batch:` PDF copy are one: when the PDF cannot be written (its
    upload's bytes are gone from the disk), the row errors naming it and its page is not
    published either (it was: NGINX served a page whose <object> was broken while /result said
    errored, url null). The job's other rows go on."""
    up = Uploads(client)
    batch = await up.create()
    await up.upload(batch, 0, json.dumps({"body": "<object data='{{ pdf }}'></object>"}).encode(), "t.json")
    await up.upload(batch, 1, json.dumps([{"reference_id": "withpdf", "suffix": "s" * 16, "pdf": "batch:2"},
                                          {"reference_id": "plain", "suffix": "s" * 16}]).encode(), "d.json")
    await up.upload(batch, 2, PDF, "doc.pdf")
    (stored,) = [p for p in settings.uploads_dir.rglob("*.data") if p.read_bytes() == PDF]
    stored.unlink()  # a disk fault: the file's row says complete, its bytes are gone
    r = await client.post(f"/api/v1/upload/{batch}/execute/SmartLinks.Generate", headers=AUTH,
                          json={"params": {"template": 0, "data": "1"}})
    job = await r.json()
    assert r.status == 202, job
    done = await wait_job(client, batch, job["job_id"])
    assert (done["status"], done["succeededCount"], done["erroredCount"]) == ("Completed with errors", 1, 1), done
    result = (await get_json(client, f"/api/batch/{batch}/{job['job_id']}/result"))["rows"]
    assert (result[0]["status"], result[0]["url"]) == ("errored", None), result[0]
    assert result[0]["error"] == f"cannot write withpdf.{'s' * 16}.pdf: No such file or directory", result[0]
    assert sorted(p.name for p in (settings.smartlink_root / batch).iterdir()) == [f"plain.{'s' * 16}.html"]


def test_a_rows_files_are_staged_all_or_none(tmp_path: Path) -> None:
    """Items of one unit (a row's page and its PDF) are published all or none, whichever of them
    cannot be written; other units go on."""
    source = tmp_path / "doc.pdf"
    source.write_bytes(PDF)
    out = tmp_path / "batch"
    out.mkdir()
    missing = str(tmp_path / "gone.pdf")
    staged = stage(out, [Item("a.html", b"A", unit=0), Item("a.pdf", source=missing, unit=0),  # its PDF fails
                         Item("b.pdf", source=str(source), unit=1), Item("b.html", source=missing, unit=1),  # its page
                         Item("c.html", b"C", unit=2), Item("c.pdf", source=str(source), unit=2)], tag="w1")
    errors = staged.commit(time.monotonic() + 60)
    assert errors == {"a.html": "cannot write a.pdf: No such file or directory",
                      "a.pdf": "cannot write a.pdf: No such file or directory",
                      "b.pdf": "cannot write b.html: No such file or directory",
                      "b.html": "cannot write b.html: No such file or directory"}
    assert sorted(p.name for p in out.iterdir()) == ["c.html", "c.pdf"]  # and no temp


def test_a_row_whose_pdf_cannot_be_renamed_into_place_leaves_no_page(tmp_path: Path) -> None:
    """A unit whose last rename fails (a directory holds the PDF's name) takes back the renames
    it made: the row's page is not left published beside an errored row."""
    (tmp_path / "a.pdf").mkdir()
    staged = stage(tmp_path, [Item("a.html", b"A", unit=0), Item("a.pdf", b"%PDF", unit=0), Item("b.html", b"B", unit=1)],
                   tag="w1")
    errors = staged.commit(time.monotonic() + 60)
    assert set(errors) == {"a.html", "a.pdf"} and errors["a.html"] == errors["a.pdf"], errors
    assert errors["a.pdf"].startswith("cannot publish a.pdf: Is a directory"), errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pdf", "b.html"]  # a.pdf: the directory, as it was
    assert (tmp_path / "a.pdf").is_dir() and not list((tmp_path / "a.pdf").iterdir())
