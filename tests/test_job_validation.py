"""Every rejected start input: the right status, the one JSON error shape naming the field,
and nothing created (no job row, no smartlink folder)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from server.app import create_app
from server.db.job_models import Job
from server.keys import JOBS
from tests.conftest import OTHER_KEY
from tests.support.database import connect
from tests.support.jobs import AUTH, SEED_ROWS, SEED_TEMPLATE, start, start_ok, wait_job
from tests.support.uploads import assert_error

pytestmark = pytest.mark.engines


def job_count(settings) -> int:
    with connect(settings) as c:
        return c.scalar(select(func.count()).select_from(Job))


def assert_nothing_created(settings) -> None:
    assert job_count(settings) == 0
    assert not settings.smartlink_root.exists() or not any(settings.smartlink_root.iterdir())


async def refused(client, settings, status: int, field: str | None, batch_id: str = "b1", template=SEED_TEMPLATE,
                  data=SEED_ROWS, **kw) -> dict:
    r = await start(client, batch_id, template, data, **kw)
    body = await assert_error(r, status)
    if field is not None:
        assert body["field"] == field, body
        assert field.split(".")[0] in body["message"], body
    assert_nothing_created(settings)
    return body


@pytest.mark.parametrize("batch_id", ["-lead", "_lead", "a" * 129, "a.b", "sp ace", "%00x", "a..b", "é", "ab%0A"])
async def test_bad_batch_id(client, settings, batch_id) -> None:
    await refused(client, settings, 422, "batch_id", batch_id=batch_id)


async def test_bad_strategy(client, settings) -> None:
    await refused(client, settings, 422, "strategy", strategy="fastest")


@pytest.mark.parametrize("data", [b"not json {", b"[]", b"", b"   \n", b"42", b'{"a": 1}\n{oops'])
async def test_data_not_json_or_empty(client, settings, data) -> None:
    await refused(client, settings, 422, "data", data=data)


async def test_data_missing(client, settings) -> None:
    await refused(client, settings, 422, "data", data=None)


async def test_data_file_not_json_names_data_file(client, settings) -> None:
    await refused(client, settings, 422, "data_file", data=b"nope", data_field="data_file")


@pytest.mark.parametrize("template, why", [
    ({"title": "no body"}, "body"),
    ({"body": "{{ data.x "}, "syntax"),
    ({"body": "ok", "scripts": [{"src": "{% if %}"}]}, "scripts[0].src"),
    ({"body": "ok", "scripts": "x.js"}, "scripts"),
    (b"{not json", "JSON"),
    (b"[1, 2]", "object"),
])
async def test_bad_template(client, settings, template, why) -> None:
    body = await refused(client, settings, 422, "document_file", template=template)
    assert why in body["message"]


async def test_template_missing(client, settings) -> None:
    await refused(client, settings, 422, "document_file", template=None)


async def test_document_id_needs_api_url(client, settings) -> None:
    await refused(client, settings, 422, "api_url", template=None, document_id="abc")


@pytest.mark.parametrize("value", ["-1", "abc", "1.5", "1e3", " ", "\u0663", "1\u0660"])  # not ASCII digits: \d took them
async def test_bad_max_errors(client, settings, value) -> None:
    if value == " ":
        job = await start_ok(client, "b1", SEED_TEMPLATE, SEED_ROWS, max_errors=value)  # blank = no limit
        await wait_job(client, "b1", job["job_id"])
        return
    await refused(client, settings, 422, "max_errors", max_errors=value)


async def test_max_errors_over_nine_digits_names_the_limit(client, settings) -> None:
    # "must be a non-negative integer" was the answer to 1234567890, which is one
    body = await refused(client, settings, 422, "max_errors", max_errors="1234567890")
    assert "at most 9 digits" in body["message"], body


@pytest.mark.parametrize("emails", ["foo@", "a@b@c.com", "ok@example.com,not-an-address", "<a@b.c>"])
async def test_bad_email(client, settings, emails) -> None:
    await refused(client, settings, 422, "callback_emails", callback_emails=emails)


@pytest.mark.parametrize("url", ["ftp://example.com/x", "example.com/hook", "https://", "javascript:alert(1)"])
async def test_bad_callback_url(client, settings, url) -> None:
    await refused(client, settings, 422, "callback_url", callback_url=url)


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999/", "http://127.0.0.1:abc/", "http://127.0.0.1:0/hook",
                                 "http://[::1/hook", "https://example.com:-1/"])
async def test_callback_url_that_cannot_be_called_is_refused_at_start(client, settings, url) -> None:
    """A port out of range or not a number was taken, then failed every attempt at the end
    (InvalidUrlClientError)."""
    r = await start(client, "b1", SEED_TEMPLATE, SEED_ROWS, callback_url=url)
    body = await assert_error(r, 422, "ERR_FIELD_INVALID")
    assert body["field"] == "callback_url" and body["message"].startswith("callback_url"), body
    assert_nothing_created(settings)


async def test_http_callback_refused_unless_configured(aiohttp_client, settings) -> None:
    strict = await aiohttp_client(create_app(settings.replace(allow_http_callbacks=False)))
    body = await refused(strict, settings, 422, "callback_url", callback_url="http://example.com/hook")
    assert "https" in body["message"]


async def test_param_part_not_json(client, settings) -> None:
    r = await client.post("/api/batch/b1/start", headers=AUTH, data=_form_with_raw_param())
    body = await assert_error(r, 422)
    assert body["field"] == "param.bad"
    assert_nothing_created(settings)


def _form_with_raw_param():  # type: ignore[no-untyped-def]
    from tests.support.jobs import start_form
    form = start_form(SEED_TEMPLATE, SEED_ROWS)
    form.add_field("param.bad", "{not json", content_type="application/json")
    return form


async def test_data_over_the_limit_is_413(aiohttp_client, settings) -> None:
    small = await aiohttp_client(create_app(settings.replace(max_data_size=2048)))
    data = [{"reference_id": f"r{i}", "data": {"pad": "x" * 100}} for i in range(30)]
    body = await refused(small, settings, 413, None, data=data)
    assert body["code"] == "ERR_DATA_TOO_LARGE"
    assert body["message"] == "data is over the 2048-byte limit (FILEDROP_MAX_DATA_SIZE)"
    body = await refused(small, settings, 413, None, data=data, data_field="data_file")
    assert body["message"] == "data_file is over the 2048-byte limit (FILEDROP_MAX_DATA_SIZE)"


async def test_form_parts_over_the_total_limit_is_413(aiohttp_client, settings) -> None:
    # each param part is under its own limit; together they are over what a start may send
    small = await aiohttp_client(create_app(settings.replace(max_data_size=2048, fetch_max_bytes=1 << 20)))
    params = {f"p{i}": "x" * 900_000 for i in range(3)}
    body = await refused(small, settings, 413, None, params=params)
    assert body["code"] == "ERR_TOO_LARGE"
    assert body["message"] == (f"the start request is over the {2048 + (1 << 20) + (1 << 20)}-byte limit "
                               "(FILEDROP_MAX_DATA_SIZE + FILEDROP_FETCH_MAX_BYTES + 1 MiB)")


async def test_a_param_part_over_its_limit_names_it(aiohttp_client, settings) -> None:
    app = await aiohttp_client(create_app(settings.replace(fetch_max_bytes=100_000)))
    body = await refused(app, settings, 413, None, params={"p": "x" * 100_000})
    assert (body["code"], body["message"]) == ("ERR_FIELD_TOO_LARGE",
                                               "param.p is over the 100000-byte limit (FILEDROP_FETCH_MAX_BYTES)")
    app = await aiohttp_client(create_app(settings.replace(fetch_max_bytes=1024)))  # under the fixed floor
    body = await refused(app, settings, 413, None, template={"body": "x"}, params={"p": "x" * 70_000})
    assert body["message"] == ("param.p is over the 65536-byte limit (a fixed floor, not a setting; "
                               "FILEDROP_FETCH_MAX_BYTES when larger)")


async def test_not_multipart(client, settings) -> None:
    r = await client.post("/api/batch/b1/start", headers=AUTH, json={"data": []})
    await assert_error(r, 422)
    assert_nothing_created(settings)


async def test_a_urlencoded_start_is_refused_as_documented(client, settings) -> None:
    """``curl --data-urlencode document_file=... --data-urlencode data=...`` made a job; the README
    and the OpenAPI document say multipart/form-data only."""
    r = await client.post("/api/batch/b1/start", headers=AUTH,
                          data={"document_file": '{"body": "x"}', "data": '[{"reference_id": "a"}]'})
    body = await assert_error(r, 422, "ERR_FIELD_INVALID")
    assert body["field"] == "content-type"
    assert body["message"] == ("send the start request as multipart/form-data (curl -F), "
                               "not application/x-www-form-urlencoded")
    assert_nothing_created(settings)


async def test_no_key_is_401_empty(client, settings) -> None:
    r = await start(client, "b1", SEED_TEMPLATE, SEED_ROWS, headers={})
    assert r.status == 401 and await r.read() == b""
    assert_nothing_created(settings)


async def test_jobs_are_private_to_their_key(client, settings) -> None:
    job = await start_ok(client, "mine", SEED_TEMPLATE, SEED_ROWS)
    await wait_job(client, "mine", job["job_id"])
    other = {"X-API-Key": OTHER_KEY}
    for what in ("status", "log", "result", "cancel"):
        r = await client.get(f"/api/batch/mine/{job['job_id']}/{what}", headers=other)
        await assert_error(r, 404, "ERR_JOB_NOT_FOUND")
    # the folder is the owner's: another key cannot start into it
    r = await start(client, "mine", SEED_TEMPLATE, SEED_ROWS, headers=other)
    await assert_error(r, 409, "ERR_BATCH_TAKEN")
    # and a job id under another batch id is not found either
    r = await client.get(f"/api/batch/other/{job['job_id']}/status", headers=AUTH)
    await assert_error(r, 404, "ERR_JOB_NOT_FOUND")
    r = await client.get("/api/batch/mine/not-a-job-id/status", headers=AUTH)
    await assert_error(r, 404, "ERR_JOB_NOT_FOUND")


async def test_pages_outliving_their_jobs_keep_the_batch_id_their_keys(client, settings) -> None:
    """Finished jobs go with the retention, their pages stay published (until drop or cleanup
    --smartlinks). Another key cannot then take the batch_id over and publish over them; the
    owner can, and once the folder is dropped anyone can."""
    from server.janitor import cleanup, drop_smartlink_batch
    from server.keys import DATABASE

    job = await start_ok(client, "kept", SEED_TEMPLATE, SEED_ROWS)
    await wait_job(client, "kept", job["job_id"])
    pages = {p.name: p.read_bytes() for p in (settings.smartlink_root / "kept").iterdir()}
    assert len(pages) == len(SEED_ROWS)
    with connect(settings) as c:  # finished 31 days ago, as far as cleanup can tell
        finished = c.execute(select(Job.finished).where(Job.job_id == job["job_id"])).scalar_one()
        c.execute(update(Job).where(Job.job_id == job["job_id"]).values(finished=finished - timedelta(days=31)))
    plan = await cleanup(client.app[DATABASE], settings)
    assert [(i.kind, i.result) for i in plan.items if i.kind == "expired-job"] == [("expired-job", "removed")]
    other = {"X-API-Key": OTHER_KEY}
    r = await start(client, "kept", SEED_TEMPLATE, SEED_ROWS, headers=other)
    body = await assert_error(r, 409, "ERR_BATCH_TAKEN")
    assert "still published" in body["message"]
    assert {p.name: p.read_bytes() for p in (settings.smartlink_root / "kept").iterdir()} == pages
    again = await start_ok(client, "kept", SEED_TEMPLATE, SEED_ROWS)  # the owner's own batch_id
    await wait_job(client, "kept", again["job_id"])
    await drop_smartlink_batch(client.app[DATABASE], settings, "kept")
    taken = await start_ok(client, "kept", SEED_TEMPLATE, SEED_ROWS, headers=other)
    await client.app[JOBS].job_finished(taken["job_id"], timeout=60)
    r = await client.get(f"/api/batch/kept/{taken['job_id']}/status", headers=other)
    assert (await r.json())["status"] == "Completed"


async def test_result_format_must_be_known(client) -> None:
    job = await start_ok(client, "fmt", SEED_TEMPLATE, SEED_ROWS)
    await wait_job(client, "fmt", job["job_id"])
    r = await client.get(f"/api/batch/fmt/{job['job_id']}/result?format=xml", headers=AUTH)
    body = await assert_error(r, 422)
    assert body["field"] == "format"


async def test_template_over_the_limit_is_413(aiohttp_client, settings) -> None:
    small = await aiohttp_client(create_app(settings.replace(fetch_max_bytes=1024)))
    body = await refused(small, settings, 413, None, template={"body": "x" * 2000})
    assert body["code"] == "ERR_TEMPLATE_TOO_LARGE"
    assert body["message"] == "document_file is over the 1024-byte limit (FILEDROP_FETCH_MAX_BYTES)"


async def test_api_url_refused_by_the_fetch_guard(aiohttp_client, settings) -> None:
    from tests.support.jobs import asset_server

    strict = await aiohttp_client(create_app(settings.replace(fetch_allow=())))
    async with asset_server({"/docs/t1": b'{"body": "x"}'}) as srv:
        body = await refused(strict, settings, 422, "api_url", template=None, document_id="t1",
                             api_url=srv.url("/docs/"))
        assert srv.hits == {}
    assert "internal address 127.0.0.1" in body["message"]


@pytest.mark.parametrize(("part", "value"), [("max_error", "0"), ("callback_emial", "a@example.com"),
                                             ("notification_URL", "https://example.com/hook"), ("template_id", "t1")])
async def test_a_part_the_start_does_not_take_is_refused_not_passed_over(client, settings, part, value) -> None:
    """A typo (`max_error=0`) or another API's name (seed 004's `notification_URL`) started a
    job without the limit or callback its sender asked for, silently."""
    body = await refused(client, settings, 422, part, **{part: value})
    assert body["message"].startswith(f"{part!r} is not a start parameter (they are document_file, data, ")
    assert body["message"].endswith(", batch_id (the path's) and param.<name> parts)"), body["message"]


async def test_the_path_batch_id_may_also_be_a_part_as_seed_000_lists_it(client, settings) -> None:
    from tests.support.jobs import start_form
    form = start_form(SEED_TEMPLATE, SEED_ROWS)
    form.add_field("batch_id", "b1")
    r = await client.post("/api/batch/b1/start", headers=AUTH, data=form)
    assert r.status == 202, await r.text()
    form = start_form(SEED_TEMPLATE, SEED_ROWS)
    form.add_field("batch_id", "")  # blank, as other options: not given
    r = await client.post("/api/batch/b3/start", headers=AUTH, data=form)
    assert r.status == 202, await r.text()
    form = start_form(SEED_TEMPLATE, SEED_ROWS)
    form.add_field("batch_id", "other")
    r = await client.post("/api/batch/b2/start", headers=AUTH, data=form)
    body = await assert_error(r, 422)
    assert body["field"] == "batch_id" and "path" in body["message"]


async def test_a_part_given_twice_or_two_sources_of_one_input_are_refused(client, settings) -> None:
    """Each was passed over silently: `data` twice (the last won), `data` and `data_file` (the
    file was ignored), `document_file` and `document_id` (the id was ignored)."""
    from tests.support.jobs import start_form
    form = start_form(SEED_TEMPLATE, SEED_ROWS)
    form.add_field("data", "[]", content_type="application/json")
    body = await assert_error(await client.post("/api/batch/b1/start", headers=AUTH, data=form), 422)
    assert (body["field"], body["message"]) == ("data", "'data' is given twice: send each part once")
    form = start_form(SEED_TEMPLATE, SEED_ROWS)
    form.add_field("data_file", b"[]", filename="d.json", content_type="application/json")
    body = await assert_error(await client.post("/api/batch/b1/start", headers=AUTH, data=form), 422)
    assert (body["field"], body["message"]) == ("data_file", "give either data or data_file, not both")
    body = await refused(client, settings, 422, "document_id", document_id="t1", api_url="https://example.com/t")
    assert body["message"] == "give either document_file or document_id with api_url, not both"
    assert_nothing_created(settings)


async def test_a_long_bad_callback_email_is_not_echoed_whole(client, settings) -> None:
    """A 70 KB value came back whole in the 422's message."""
    body = await refused(client, settings, 422, "callback_emails", callback_emails="x" * 70_000)
    assert body["message"] == f"callback_emails: {'x' * 100 + '…'!r} is not an e-mail address", body["message"][:300]


async def test_more_than_50_callback_emails_is_a_fixed_limit_said_so(client, settings) -> None:
    emails = ",".join(f"u{i}@example.com" for i in range(51))
    body = await refused(client, settings, 422, "callback_emails", callback_emails=emails)
    assert body["message"] == "callback_emails: at most 50 addresses (a fixed limit, not a setting)"
