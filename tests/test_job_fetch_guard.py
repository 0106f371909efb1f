"""The fetch guard against a real HTTP server on 127.0.0.1: internal addresses refused unless
allowed (also behind a redirect), size and time limits, non-http schemes; and a job whose asset
is refused errors those rows with the reason."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from urllib.parse import urlencode

import pytest
from aiohttp import web

from server.app import create_app
from server.jobs.assets import Assets, JobRef
from server.jobs.fetch import Fetcher, FetchError, FetchRefused
from tests.support.jobs import (
    MALFORMED_URLS,
    SEED_TEMPLATE,
    asset_server,
    get_json,
    rows,
    serve,
    start,
    start_ok,
    wait_job,
)
from tests.support.uploads import assert_error


@pytest.fixture
async def origin() -> AsyncIterator[tuple[int, asyncio.Event]]:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/ok":
            return web.Response(body=b"hello")
        if request.path == "/big":
            return web.Response(body=b"x" * 5000)
        if request.path == "/redirect":
            raise web.HTTPFound(f"http://127.0.0.1:{request.url.port}/ok")
        if request.path.startswith("/redirect-to/"):  # to a URL that may not parse (as given)
            return web.Response(status=302, headers={"Location": request.query["to"]})
        if request.path == "/hang":
            await release.wait()
        return web.Response(status=404)

    async with serve(handler) as port:
        yield port, release
        release.set()


async def fetch(allow: tuple[str, ...], url: str, timeout: float = 5.0, max_bytes: int = 1000) -> bytes:
    f = Fetcher(allow, timeout, max_bytes)
    try:
        return await f.get(url)
    finally:
        await f.close()


async def test_loopback_refused_unless_allowed(origin) -> None:
    port, _ = origin
    with pytest.raises(FetchError, match="internal address 127.0.0.1"):
        await fetch((), f"http://127.0.0.1:{port}/ok")
    with pytest.raises(FetchError, match="internal address"):
        await fetch((), f"http://localhost:{port}/ok")
    assert await fetch(("127.0.0.1",), f"http://127.0.0.1:{port}/ok") == b"hello"
    assert await fetch(("127.0.0.0/8",), f"http://127.0.0.1:{port}/ok") == b"hello"


@pytest.mark.parametrize("address", ["10.1.2.3", "192.168.0.1", "169.254.169.254", "[::1]", "0.0.0.0",
                                     "224.0.0.1", "[::ffff:127.0.0.1]", "100.100.100.200", "100.64.0.1",
                                     "[2002:7f00:1::1]", "[2002:a9fe:a9fe::1]",
                                     "[fec0::1]"])  # IPv6 site-local (deprecated, still routed inside some networks)
async def test_private_link_local_multicast_refused(address) -> None:
    with pytest.raises(FetchError, match="internal address"):
        await fetch(("127.0.0.1",), f"http://{address}/x")


async def test_redirect_to_an_internal_address_is_checked(origin) -> None:
    port, _ = origin
    # "localhost" is admitted by name, the redirect target 127.0.0.1 (a literal) is not.
    assert await fetch(("localhost",), f"http://localhost:{port}/ok") == b"hello"
    with pytest.raises(FetchError, match="internal address 127.0.0.1"):
        await fetch(("localhost",), f"http://localhost:{port}/redirect")
    assert await fetch(("127.0.0.1",), f"http://127.0.0.1:{port}/redirect") == b"hello"


async def test_size_time_and_scheme_limits(origin) -> None:
    port, _ = origin
    # each limit is a setting, and its error names it
    with pytest.raises(FetchError, match=r"over the 1000-byte limit \(FILEDROP_FETCH_MAX_BYTES\)"):
        await fetch(("127.0.0.1",), f"http://127.0.0.1:{port}/big", max_bytes=1000)
    with pytest.raises(FetchError, match=r"no answer within 0.3 s \(FILEDROP_FETCH_TIMEOUT\)"):
        await fetch(("127.0.0.1",), f"http://127.0.0.1:{port}/hang", timeout=0.3)
    with pytest.raises(FetchError, match="answered 404"):
        await fetch(("127.0.0.1",), f"http://127.0.0.1:{port}/missing")
    for url in ("file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://x"):
        with pytest.raises(FetchError, match="not an http"):
            await fetch(("127.0.0.1",), url)


async def test_job_asset_refused_errors_rows_with_reason(aiohttp_client, settings) -> None:
    client = await aiohttp_client(create_app(settings.replace(fetch_allow=())))
    async with asset_server({"/v.js": b"1;"}) as srv:
        job = await start_ok(client, "guarded", {"body": "x", "scripts": [{"src": srv.url("/v.js")}]}, rows(3),
                             strategy="original")
        done = await wait_job(client, "guarded", job["job_id"])
        assert srv.hits == {}
    assert (done["status"], done["erroredCount"]) == ("Completed with errors", 3)
    result = (await get_json(client, f"/api/batch/guarded/{job['job_id']}/result"))["rows"]
    assert all("internal address 127.0.0.1" in r["error"] for r in result)
    # tried once per job, not once per row
    log = (await get_json(client, f"/api/batch/guarded/{job['job_id']}/log"))["log"]
    assert sum("asset http://127.0.0.1" in e["message"] for e in log) == 1


async def test_document_id_fetched_from_api_url(client, settings) -> None:
    template = b'{"body": "<p>{{ data.n }}</p>"}'
    async with asset_server({"/docs/tpl-1": template}) as srv:
        job = await start_ok(client, "byid", None, rows(2), document_id="tpl-1", api_url=srv.url("/docs/"))
        assert srv.hits == {"/docs/tpl-1": 1}
    assert (await wait_job(client, "byid", job["job_id"]))["status"] == "Completed"
    assert "<p>1</p>" in (settings.smartlink_root / "byid" / "ref000001.s00000000000000000001.html").read_text()


# Malformed URLs that check_url let out as a ValueError or UnicodeError (urlsplit, `parts.port`,
# the idna codec inside getaddrinfo), not as the guard's refusal: a worker handed such a row's
# claim back uncounted and claimed it again every second, the job In progress for ever.
MALFORMED = {case: (url + "a", reason) for case, (url, reason) in MALFORMED_URLS.items()}


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_a_malformed_url_is_refused_by_the_guard(case: str) -> None:
    url, reason = MALFORMED[case]
    with pytest.raises(FetchRefused, match=re.escape(reason)):
        await fetch(("127.0.0.1",), url)


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_a_redirect_to_a_malformed_url_is_refused(origin, case: str) -> None:
    port, _ = origin
    url, reason = MALFORMED[case]
    with pytest.raises(FetchRefused, match=re.escape(reason)):
        await fetch(("127.0.0.1",), f"http://127.0.0.1:{port}/redirect-to/?" + urlencode({"to": url}))


# Control characters are in no URL (RFC 3986): urlsplit dropped tab, CR and LF without a word, so
# the URL the guard checked was not the one given; a NUL went on into the database, where
# PostgreSQL refuses it in a stored callback_url (that start was a 500 with a traceback).
CONTROL_URLS = {
    "NUL": ("https://cdn.example.com/a\x00b", "U+0000"),
    "tab in the host": ("https://cdn.exa\tmple.com/", "U+0009"),
    "CR LF": ("https://cdn.example.com/a\r\nX-Injected: 1", "U+000D"),
    "DEL": ("https://cdn.example.com/\x7f", "U+007F"),
}


@pytest.mark.parametrize("case", list(CONTROL_URLS))
async def test_a_url_with_a_control_character_is_refused_by_the_guard(case: str) -> None:
    url, char = CONTROL_URLS[case]
    with pytest.raises(FetchRefused, match=re.escape(f"holds the control character {char}")):
        await fetch(("127.0.0.1",), url)


@pytest.mark.engines
async def test_a_callback_url_with_a_control_character_is_422_on_every_engine(client) -> None:
    for url, char in CONTROL_URLS.values():
        r = await start(client, "ctlcallback", SEED_TEMPLATE, rows(1), callback_url=url)
        body = await assert_error(r, 422, "ERR_FIELD_INVALID")
        assert body["field"] == "callback_url" and f"control character {char}" in body["message"], body


@pytest.mark.parametrize("where", ["script", "pdf"])
@pytest.mark.parametrize("case", list(MALFORMED))
async def test_a_malformed_asset_url_errors_its_row_once(client, case: str, where: str) -> None:
    url, reason = MALFORMED[case]
    async with asset_server({"/ok.js": b"ok();", "/ok.pdf": b"%PDF-1.4"}) as srv:
        if where == "script":  # mixed: a script fetched and inlined, its URL the row's
            template, strategy = {"body": "x", "scripts": [{"src": "{{ data.src }}"}]}, "mixed"
            data = [{"reference_id": "bad", "data": {"src": url}},
                    {"reference_id": "good", "data": {"src": srv.url("/ok.js")}}]
        else:  # original: the row's PDF fetched and embedded
            template, strategy = {"body": "x"}, "original"
            data = [{"reference_id": "bad", "pdf": url}, {"reference_id": "good", "pdf": srv.url("/ok.pdf")}]
        job = await start_ok(client, "malformed", template, data, strategy=strategy)
        done = await wait_job(client, "malformed", job["job_id"], timeout=30)
    assert (done["status"], done["succeededCount"], done["erroredCount"]) == ("Completed with errors", 1, 1)
    result = {r["reference_id"]: r for r in (await get_json(client, f"/api/batch/malformed/{job['job_id']}/result"))["rows"]}
    assert result["good"]["status"] == "succeeded"
    assert result["bad"]["status"] == "errored"
    assert result["bad"]["error"].startswith(f"refused: {url!r}") and reason in result["bad"]["error"]
    log = (await get_json(client, f"/api/batch/malformed/{job['job_id']}/log"))["log"]
    assert sum(e["message"].startswith(f"asset {url}: refused") for e in log) == 1  # once, not per claim


async def test_a_worker_keeps_no_lock_per_asset_once_fetched(settings) -> None:
    """Its per-(job, URL) locks were never removed: a job with a PDF URL per row left a lock
    and its key per row, for every job the worker ever ran."""
    notes: list[tuple[str, str, str]] = []

    async def note(job_id: str, level: str, message: str) -> None:
        notes.append((job_id, level, message))

    fetcher = Fetcher(settings.fetch_allow, 5.0, 1000)
    assets = Assets(settings, fetcher, None, note)
    try:
        async with asset_server({f"/{i}.pdf": b"%PDF" for i in range(20)}) as srv:
            job = JobRef("a" * 32, "owner", None)
            keys = [f"url:{srv.url(f'/{i}.pdf')}" for i in range(25)]  # 5 of them 404
            # Twice at once: the second waits for the first's lock on each URL, then finds its result.
            first, second = await asyncio.gather(assets.resolve(job, keys), assets.resolve(job, keys))
            assert first == second
            assert sum(a.error is None for a in first.values()) == 20
            assert all(n == 1 for n in srv.hits.values()) and len(srv.hits) == 25
        assert assets._locks == {}
    finally:
        await fetcher.close()
