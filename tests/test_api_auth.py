"""Every credential form the README lists is accepted; without one the answer is 401 with an
empty body, from the app and through NGINX: with ``WWW-Authenticate: Basic realm="filedrop"`` for
a program (the nuxeo client, urllib's HTTPBasicAuthHandler log in after it), without it for a
browser, which would open a login dialog and then send what was typed there to every page of the
origin, tenants' smartlinks included."""

from __future__ import annotations

import asyncio
import base64
import urllib.request
from pathlib import Path

import pytest

from server.auth import PUBLIC_PATHS
from tests.conftest import API_KEY
from tests.support.nginx import app_behind_nginx
from tests.support.server import REPO

FORMS = {
    "X-API-Key": {"X-API-Key": API_KEY},
    "X-Authentication-Token": {"X-Authentication-Token": API_KEY},
    "Basic": {"Authorization": "Basic " + base64.b64encode(f"anyone:{API_KEY}".encode()).decode()},
    "Bearer": {"Authorization": f"Bearer {API_KEY}"},
}
CHROME = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36"
FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
# What a smartlink's script (fetch) or markup (<img src>) sends on the public origin: Sec-Fetch-*
# go to https and localhost origins only (Chrome), so over plain http the User-Agent is what is left.
BROWSERS = {
    "fetch": {"Sec-Fetch-Mode": "cors", "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Dest": "empty"},
    "img": {"sec-fetch-dest": "image"},
    "chrome-over-http": {"User-Agent": CHROME},
    "firefox-wrong-key": {"User-Agent": FIREFOX, "X-API-Key": "wrong"},
}
PROGRAMS = {
    "nuxeo": "Nuxeo Python Client/6.1.1",
    "curl": "curl/8.5.0",
    "urllib": "Python-urllib/3.11",
    "requests": "python-requests/2.31.0",
}


@pytest.mark.parametrize("form", FORMS)
async def test_each_documented_credential_form_is_accepted(client, form: str) -> None:
    r = await client.get("/api/v1/upload/handlers", headers=FORMS[form])
    assert r.status == 200, await r.text()
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## API keys"):readme.index("## Errors")]
    assert f"`{form}" in section or f"{form} " in section, f"README's API keys section does not list {form}"


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": "Basic !!!"}, {"Authorization": "Digest x"},
                                     {"Authorization": "Basic é"}])
async def test_no_valid_key_is_401_with_an_empty_body_and_a_basic_challenge(client, headers) -> None:
    r = await client.post("/api/v1/upload", headers=headers)
    assert r.status == 401
    assert await r.read() == b""
    assert r.headers["WWW-Authenticate"] == 'Basic realm="filedrop"'


@pytest.mark.parametrize("agent", PROGRAMS)
async def test_a_program_is_challenged(client, agent: str) -> None:
    r = await client.get("/api/batch/b/jobs", headers={"User-Agent": PROGRAMS[agent]})
    assert r.status == 401 and await r.read() == b""
    assert r.headers["WWW-Authenticate"] == 'Basic realm="filedrop"'


async def test_urllibs_basic_auth_handler_logs_in_after_the_challenge(client) -> None:
    """HTTPBasicAuthHandler sends the password only in answer to a challenge (as browsers do)."""
    url = f"http://{client.server.host}:{client.server.port}/api/v1/upload/handlers"

    def get() -> int:
        passwords = urllib.request.HTTPPasswordMgrWithDefaultRealm()
        passwords.add_password(None, url, "me", API_KEY)
        opener = urllib.request.build_opener(urllib.request.HTTPBasicAuthHandler(passwords))
        with opener.open(url, timeout=10) as r:
            return int(r.status)

    assert await asyncio.to_thread(get) == 200


@pytest.mark.parametrize("browser", BROWSERS)
async def test_a_browser_is_never_asked_for_a_login(client, browser: str) -> None:
    """A login typed into the dialog a challenge opens is kept by the browser for the origin and
    sent with every later request there, those of tenants' smartlinks too (the API shares the
    public port with them): so a browser gets the 401 without the challenge."""
    for method, path in (("GET", "/api/batch/b/jobs"), ("GET", "/api/batch/b/0123/cancel"),
                         ("POST", "/api/v1/upload")):
        r = await client.request(method, path, headers=BROWSERS[browser])
        assert r.status == 401 and await r.read() == b"", (method, path)
        assert "WWW-Authenticate" not in r.headers, (method, path)


@pytest.mark.parametrize("header", [b"X-API-Key: k\xe9", b"X-Authentication-Token: \xff",
                                    b"Authorization: Bearer \xe9", b"Authorization: Basic \xe9\xe9"])
async def test_a_credential_that_is_not_utf8_is_401_not_500(client, header: bytes) -> None:
    """A browser sends a Latin-1 character of a typed key as one raw byte (the drop page's field)."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(b"GET /api/limits HTTP/1.1\r\nHost: x\r\n" + header + b"\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    assert b'WWW-Authenticate: Basic realm="filedrop"' in answer


def test_401_passes_nginx_unchanged(server_factory, nginx_factory, tmp_path: Path) -> None:
    _srv, ngx = app_behind_nginx(server_factory, nginx_factory, tmp_path / "srv", API_KEY)
    r = ngx.fetch("GET", "/api/v1/upload/handlers")
    assert r.status == 401 and r.body == b""
    assert r.headers["WWW-Authenticate"] == 'Basic realm="filedrop"'
    assert ngx.fetch("GET", "/api/v1/upload/handlers", FORMS["Bearer"]).status == 200
    # A browser's request reaches the app as it sent it: no challenge through NGINX either.
    for headers in BROWSERS.values():
        r = ngx.fetch("GET", "/api/v1/upload/handlers", headers)
        assert r.status == 401 and r.body == b"" and "WWW-Authenticate" not in r.headers, headers


def test_only_probes_and_the_api_description_are_public() -> None:
    assert PUBLIC_PATHS == {"/healthz", "/runningstatus", "/nuxeo/runningstatus", "/json/cmis",
                            "/nuxeo/json/cmis", "/api/openapi.json"}
