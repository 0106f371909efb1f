"""Start inputs that used to break the server (500s), now each a 422 naming the field with
nothing created; JSON Lines with a BOM; and the list of a batch's jobs (what the official
nuxeo client, which never learns the job id of a void execute, reads instead)."""

from __future__ import annotations

import re

import aiohttp
import pytest

from tests.conftest import OTHER_KEY
from tests.support.jobs import (
    AUTH,
    SEED_ROWS,
    SEED_TEMPLATE,
    get_json,
    rows,
    start,
    start_ok,
    wait_job,
)
from tests.support.uploads import assert_error
from tests.test_job_validation import assert_nothing_created

DEEP = b"[" * 100_000 + b"]" * 100_000


async def refused(client, settings, field: str, **kw) -> dict:  # type: ignore[no-untyped-def]
    r = await start(client, "deep", kw.pop("template", SEED_TEMPLATE), kw.pop("data", SEED_ROWS), **kw)
    body = await assert_error(r, 422, "ERR_FIELD_INVALID")
    assert body["field"] == field and body["message"].startswith(field), body
    assert_nothing_created(settings)
    return body


async def test_deep_nesting_in_data_is_422(client, settings) -> None:
    body = await refused(client, settings, "data", data=DEEP)
    assert "nested more than 64 levels" in body["message"]
    await refused(client, settings, "data_file", data=DEEP, data_field="data_file")


async def test_deep_nesting_in_a_rows_data_is_422(client, settings) -> None:
    data = b'[{"reference_id": "a", "data": {"x": ' + DEEP + b"}}]"
    body = await refused(client, settings, "data", data=data)
    assert "nested more than 64 levels" in body["message"]
    lines = b'{"reference_id": "a"}\n{"reference_id": "b", "data": {"x": ' + DEEP + b"}}\n"
    body = await refused(client, settings, "data", data=lines)
    assert "line 2" in body["message"] and "nested" in body["message"]


async def test_deep_nesting_in_document_file_and_param_is_422(client, settings) -> None:
    body = await refused(client, settings, "document_file", template=b'{"body": "x", "deep": ' + DEEP + b"}")
    assert "nested more than 64 levels" in body["message"]
    form = aiohttp.FormData()
    form.add_field("document_file", b'{"body": "x"}', filename="t.json", content_type="application/json")
    form.add_field("data", '[{"reference_id": "a"}]')
    form.add_field("param.deep", DEEP.decode(), content_type="application/json")
    r = await client.post("/api/batch/deep/start", data=form, headers=AUTH)
    body = await assert_error(r, 422, "ERR_FIELD_INVALID")
    assert body["field"] == "param.deep" and "nested" in body["message"]
    assert_nothing_created(settings)


@pytest.mark.parametrize("data", [b'[{"reference_id": "a", "data": {"x": "\\ud800"}}]',
                                  b'{"reference_id": "\\udfff"}\n',
                                  b'[{"reference_id": "a", "data": {"\\ud800": 1}}]'])
async def test_lone_surrogate_in_data_is_422(client, settings, data: bytes) -> None:
    body = await refused(client, settings, "data", data=data)
    assert "lone surrogate" in body["message"]


def _multipart(boundary: str, body: bytes, content_type: str | None = None) -> dict:  # type: ignore[type-arg]
    return {"data": body, "headers": {**AUTH, "Content-Type": content_type or f"multipart/form-data; boundary={boundary}"}}


GOOD = (b'--xyz\r\nContent-Disposition: form-data; name="document_file"; filename="t.json"\r\n'
        b'Content-Type: application/json\r\n\r\n{"body": "x"}\r\n'
        b'--xyz\r\nContent-Disposition: form-data; name="data"\r\n\r\n[{"reference_id": "a"}]\r\n--xyz--\r\n')


@pytest.mark.parametrize("case", ["empty", "no boundary", "wrong boundary", "truncated", "garbage"])
async def test_malformed_multipart_start_is_422(client, settings, case: str) -> None:
    kw = {
        "empty": _multipart("xyz", b""),
        "no boundary": _multipart("", GOOD, "multipart/form-data"),
        "wrong boundary": _multipart("abc", GOOD),
        "truncated": _multipart("xyz", GOOD[:120]),
        "garbage": _multipart("xyz", b"\x00\xff" * 50),
    }[case]
    r = await client.post("/api/batch/mp/start", **kw)
    body = await assert_error(r, 422)
    assert body["field"] == "body" and "not well-formed multipart/form-data" in body["message"], body
    assert_nothing_created(settings)


async def test_the_well_formed_multipart_of_the_above_is_accepted(client) -> None:
    r = await client.post("/api/batch/mp/start", **_multipart("xyz", GOOD))
    assert r.status == 202, await r.text()


async def test_json_lines_with_a_bom_is_accepted(client, settings) -> None:
    lines = "\ufeff" + '{"reference_id": "bom1", "suffix": "abcdefghijklmnop"}\n{"reference_id": "bom2", "suffix": "abcdefghijklmnop"}\n'
    job = await start_ok(client, "bom", {"body": "<p>{{ reference_id }}</p>"}, lines.encode(), data_field="data_file")
    assert (await wait_job(client, "bom", job["job_id"]))["succeededCount"] == 2
    array = "\ufeff" + '[{"reference_id": "bom3", "suffix": "abcdefghijklmnop"}]'
    job = await start_ok(client, "bom2", {"body": "x"}, array.encode())
    assert (await wait_job(client, "bom2", job["job_id"]))["succeededCount"] == 1


async def test_a_batchs_jobs_newest_first_for_their_owner_only(client) -> None:
    first = await start_ok(client, "listed", SEED_TEMPLATE, SEED_ROWS)
    await wait_job(client, "listed", first["job_id"])
    second = await start_ok(client, "listed", {"body": "other"}, rows(2))
    await wait_job(client, "listed", second["job_id"])
    listing = await get_json(client, "/api/batch/listed/jobs")
    assert listing["batch_id"] == "listed"
    assert [j["job_id"] for j in listing["jobs"]] == [second["job_id"], first["job_id"]]
    status = await get_json(client, f"/api/batch/listed/{second['job_id']}/status")
    assert listing["jobs"][0] == status  # each as /status shows it
    assert (await get_json(client, "/api/batch/nothing-here/jobs")) == {"batch_id": "nothing-here", "jobs": []}
    r = await client.get("/api/batch/listed/jobs", headers={"X-API-Key": OTHER_KEY})
    assert r.status == 200 and (await r.json())["jobs"] == []  # another key's jobs are not its own
    r = await client.get("/api/batch/-bad/jobs", headers=AUTH)
    body = await assert_error(r, 404, "ERR_BATCH_NOT_FOUND")
    assert re.search("not a batch id", body["message"])
