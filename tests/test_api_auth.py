"""Every credential form the README lists is accepted; without one the answer is 401 with an
empty body and ``WWW-Authenticate: Basic realm="filedrop"``, from the app and through NGINX."""

from __future__ import annotations

import asyncio
import base64
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


def test_only_probes_and_the_api_description_are_public() -> None:
    assert PUBLIC_PATHS == {"/healthz", "/runningstatus", "/nuxeo/runningstatus", "/json/cmis",
                            "/nuxeo/json/cmis", "/api/openapi.json"}
