"""Start inputs that used to break the server (500s), now each a 422 naming the field with
nothing created; JSON Lines with a BOM; and the list of a batch's jobs (what the official
nuxeo client, which never learns the job id of a void execute, reads instead)."""

from __future__ import annotations

import json
import re
import sys

import aiohttp
import pytest

from server.app import create_app
from tests.conftest import OTHER_KEY
from tests.support.jobs import (
    AUTH,
    MALFORMED_URLS,
    SEED_ROWS,
    SEED_TEMPLATE,
    get_json,
    rows,
    start,
    start_form,
    start_ok,
    wait_job,
)
from tests.support.uploads import Uploads, assert_error
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


BIG = "9" * 5000
TOO_MANY_DIGITS = "holds a number of 5,000 digits, more than FILEDROP_MAX_NUMBER_DIGITS (4300) allows"


@pytest.mark.parametrize("where", ["data", "data_file", "data lines", "template"])
async def test_a_number_with_too_many_digits_is_a_422_naming_the_setting(client, settings, where: str) -> None:
    """It was 'data_file is neither a JSON array nor JSON Lines (... use sys.set_int_max_str_digits() ...)'."""
    row = '{"reference_id": "a", "data": {"n": ' + BIG + "}}"
    if where == "template":
        body = await refused(client, settings, "document_file", template=('{"body": "x", "n": ' + BIG + "}").encode())
        assert body["message"] == f"document_file: {TOO_MANY_DIGITS}"
        return
    data = f'{{"reference_id": "b"}}\n{row}\n' if where == "data lines" else f"[{row}]"
    field = "data" if where != "data_file" else "data_file"
    body = await refused(client, settings, field, data=data.encode(), data_field=field)
    assert body["message"] == (f"data line 2 {TOO_MANY_DIGITS}" if where == "data lines" else f"{field} {TOO_MANY_DIGITS}")


async def test_a_param_with_too_many_digits_is_a_422_naming_the_setting(client, settings) -> None:
    form = start_form(SEED_TEMPLATE, SEED_ROWS)
    form.add_field("param.big", BIG, content_type="application/json")
    r = await client.post("/api/batch/big/start", data=form, headers=AUTH)
    body = await assert_error(r, 422, "ERR_FIELD_INVALID")
    assert (body["field"], body["message"]) == ("param.big", f"param.big {TOO_MANY_DIGITS}")
    assert_nothing_created(settings)


async def test_the_digits_of_input_numbers_follow_the_setting(aiohttp_client, settings) -> None:
    """Below Python's 4300 the API refuses what its render processes could not read back; above
    it, the number is taken, stored and rendered."""
    small = await aiohttp_client(create_app(settings.replace(max_number_digits=640)))
    r = await start(small, "digits", SEED_TEMPLATE, ('[{"reference_id": "a", "data": {"n": ' + "1" * 641 + "}}]").encode())
    body = await assert_error(r, 422, "ERR_FIELD_INVALID")
    assert body["message"] == "data holds a number of 641 digits, more than FILEDROP_MAX_NUMBER_DIGITS (640) allows"
    before = sys.get_int_max_str_digits()
    try:
        large = await aiohttp_client(create_app(settings.replace(max_number_digits=6000)))
        data = ('[{"reference_id": "a", "suffix": "abcdefghijklmnop", "data": {"n": ' + BIG + "}}]").encode()
        job = await start_ok(large, "digits", {"body": "<p>{{ data.n }}</p>"}, data)
        assert (await wait_job(large, "digits", job["job_id"]))["succeededCount"] == 1
        assert f"<p>{BIG}</p>" in (settings.smartlink_root / "digits" / "a.abcdefghijklmnop.html").read_text()
    finally:
        sys.set_int_max_str_digits(before)


async def test_a_param_name_over_64_characters_says_so(client, settings) -> None:
    form = start_form(SEED_TEMPLATE, SEED_ROWS)
    form.add_field("param." + "p" * 65, "1", content_type="application/json")
    r = await client.post("/api/batch/pname/start", data=form, headers=AUTH)
    body = await assert_error(r, 422, "ERR_FIELD_INVALID")
    assert body["field"] == "param." + "p" * 65
    assert "letter or _ then letters, digits, _" in body["message"] and "at most 64 characters" in body["message"]
    assert_nothing_created(settings)


async def test_a_pdf_of_the_batch_is_named_in_ascii_digits(client) -> None:
    """``\\d`` took "batch:٣" as file 3."""
    data = [{"reference_id": "arabic", "suffix": "abcdefghijklmnop", "pdf": "batch:\u0663"}]
    job = await start_ok(client, "digitpdf", {"body": "x"}, data)
    await wait_job(client, "digitpdf", job["job_id"])
    result = (await get_json(client, f"/api/batch/digitpdf/{job['job_id']}/result"))["rows"]
    assert (result[0]["status"], result[0]["error"]) == ("errored", "pdf must be empty, an http(s) URL or batch:<fileIdx>")


async def _generate(client, params: dict) -> aiohttp.ClientResponse:  # type: ignore[type-arg]
    up = Uploads(client)
    batch = await up.create()
    await up.upload(batch, 0, json.dumps({"body": "x"}).encode(), "t.json")
    await up.upload(batch, 1, json.dumps(SEED_ROWS).encode(), "d.json")
    return await client.post(f"/api/v1/upload/{batch}/execute/SmartLinks.Generate", headers=AUTH,
                             json={"params": {"template": 0, "data": 1, **params}})


async def test_generate_callback_emails_as_a_list_is_a_clear_422(client, settings) -> None:
    """It answered "callback_emails: "['a@b.c']" is not an e-mail address" (a Python repr)."""
    body = await assert_error(await _generate(client, {"callback_emails": ["a@example.com"]}), 422, "ERR_FIELD_INVALID")
    assert body["field"] == "callback_emails"
    assert body["message"] == ('callback_emails must be a string of comma-separated addresses '
                               '("a@example.com,b@example.com"), not a JSON list')
    body = await assert_error(await _generate(client, {"strategy": {"x": 1}}), 422, "ERR_FIELD_INVALID")
    assert body["message"] == "strategy must be a string, not a JSON object"
    assert_nothing_created(settings)


@pytest.mark.parametrize("idx", ["\u0661", "+1", " 1", "0_1"])
async def test_generate_file_index_is_ascii_digits(client, settings, idx: str) -> None:
    body = await assert_error(await _generate(client, {"data": idx}), 422, "ERR_FIELD_INVALID")
    assert body["field"] == "data" and body["message"] == "data must be a fileIdx of this batch"
    assert_nothing_created(settings)


@pytest.mark.parametrize("name", ["max_error", "templateIdx", "callback"])
async def test_generate_refuses_a_param_it_does_not_take(client, settings, name: str) -> None:
    """A typo such as `max_error` started the job without the limit its sender asked for."""
    body = await assert_error(await _generate(client, {name: "0"}), 422, "ERR_FIELD_INVALID")
    assert body["field"] == name
    assert body["message"].startswith(f"{name!r} is not a param of SmartLinks.Generate (they are template, data, ")
    assert_nothing_created(settings)


@pytest.mark.parametrize("value", [[], 0, False, [1]])
async def test_generate_params_not_an_object_is_a_422(client, settings, value) -> None:
    """A falsy `params` ([], 0, false) was read as no params, and the job started without them."""
    body = await assert_error(await _generate(client, {"params": value}), 422, "ERR_FIELD_INVALID")
    assert body["field"] == "params" and body["message"] == "params must be a JSON object"
    assert_nothing_created(settings)


# URLs whose host or port the fetch guard could not parse: its ValueError/UnicodeError escaped as
# a 500 with a traceback (callback_url's port and brackets were already checked with the options).


@pytest.mark.parametrize("case", list(MALFORMED_URLS))
async def test_a_malformed_callback_url_is_422(client, settings, case: str) -> None:
    url, reason = MALFORMED_URLS[case]
    body = await refused(client, settings, "callback_url", callback_url=url + "hook")
    assert reason in body["message"], body


@pytest.mark.parametrize("case", list(MALFORMED_URLS))
async def test_a_malformed_api_url_is_422(client, settings, case: str) -> None:
    url, reason = MALFORMED_URLS[case]
    body = await refused(client, settings, "api_url", template=None, document_id="tpl-1", api_url=url + "docs/")
    assert body["message"].startswith("api_url: cannot fetch the master smartlink: refused:"), body
    assert reason in body["message"], body
