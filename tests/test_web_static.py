"""The drop page as files and headers (no browser): NGINX serves web/ at ``/`` and ``/_/<asset>``
on the page's own port (the public port redirects ``/`` there and serves none of it), with the
Content-Security-Policy and hardening headers and nothing else of web/; the page has no
inline script or style and fetches nothing from outside; its ``data-testid`` hooks exist and the
README documents them; ``GET /api/limits`` and ``FILEDROP_CHUNK_SIZE``."""

from __future__ import annotations

import gzip
import re
import subprocess
import sys
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

from server import nginx as ngx_conf
from server.config import Settings
from tests.conftest import API_KEY, AUTH
from tests.support.nginx import NginxFactory, NginxProcess
from tests.support.server import REPO, server_env

WEB = REPO / "web"
CSP = "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
HOOKS = ("api-key", "file-input", "file-row", "batch-id", "template-file", "data-file", "generate",
         "job-status", "smartlink")
TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}


class PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.script_text.append(data)


def parsed_page() -> PageParser:
    p = PageParser()
    p.feed((WEB / "index.html").read_text(encoding="utf-8"))
    return p


def assets() -> list[Path]:
    """Every file the page loads: what index.html links, and what the modules import."""
    page = parsed_page()
    names = {v for _t, a in page.tags for k, v in a.items() if k in ("src", "href") and v and v.startswith("/_/")}
    files = [WEB / n.removeprefix("/_/") for n in names]
    for js in WEB.glob("*.js"):
        files += [WEB / m for m in re.findall(r"""from\s+'\./([a-z0-9-]+\.js)'""", js.read_text())]
    return sorted(set(files))


@pytest.fixture(scope="module")
def ngx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxProcess]:
    base = tmp_path_factory.mktemp("web-static")
    factory = NginxFactory(base / "nginx")
    try:
        yield factory.start(Settings(data_dir=base / "var"))  # the app is down: static files only
    finally:
        factory.stop_all()


def assert_page_headers(headers) -> None:  # type: ignore[no-untyped-def]
    assert headers["Content-Security-Policy"] == CSP
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert headers["Cache-Control"] == "no-cache"


def test_the_page_is_served_at_the_root_with_its_csp(ngx: NginxProcess) -> None:
    r = ngx.fetch_page("GET", "/")
    assert r.status == 200
    assert r.body == (WEB / "index.html").read_bytes()
    assert r.headers["Content-Type"] == "text/html; charset=utf-8"
    assert_page_headers(r.headers)
    head = ngx.fetch_page("HEAD", "/")
    assert head.status == 200 and head.body == b"" and int(head.headers["Content-Length"]) == len(r.body)
    assert ngx.fetch_page("GET", "/?from=mail").status == 200


def test_the_public_port_sends_people_to_the_page_and_serves_none_of_it(ngx: NginxProcess) -> None:
    """The smartlinks' origin runs no page script: `/` redirects to the page's port (the host
    as the browser named it), the assets are not there."""
    r = ngx.fetch("GET", "/", {"Host": f"127.0.0.1:{ngx.port}"})
    assert r.status == 302 and r.headers["Location"] == f"{ngx.page_url}/"
    named = ngx.fetch("GET", "/", {"Host": f"localhost:{ngx.port}"})
    assert named.headers["Location"] == f"http://localhost:{ngx.page_port}/"
    for f in assets():
        gone = ngx.fetch("GET", f"/_/{f.name}")
        assert gone.status == 404 and gone.json()["code"] == "ERR_NOT_FOUND", f.name


def test_every_asset_the_page_loads_is_served_with_its_type(ngx: NginxProcess) -> None:
    files = assets()
    assert {f.name for f in files} >= {"app.js", "app.css", "api.js", "upload.js", "generate.js", "icon.svg"}
    for f in files:
        r = ngx.fetch_page("GET", f"/_/{f.name}")
        assert r.status == 200, f.name
        assert r.body == f.read_bytes()
        assert r.headers["Content-Type"].split(";")[0] == TYPES[f.suffix]
        assert_page_headers(r.headers)


def test_assets_are_gzipped_and_revalidated(ngx: NginxProcess) -> None:
    r = ngx.fetch_page("GET", "/_/upload.js", {"Accept-Encoding": "gzip"})
    assert r.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(r.body) == (WEB / "upload.js").read_bytes()
    etag = ngx.fetch_page("GET", "/_/upload.js").headers["ETag"]
    again = ngx.fetch_page("GET", "/_/upload.js", {"If-None-Match": etag})
    assert again.status == 304 and again.body == b""


@pytest.mark.parametrize("path", [
    "/index.html", "/_/", "/_", "/_/index.html", "/_/nope.js", "/_/app.JS", "/_/app.js/", "/_/sub/app.js",
    "/_/.app.js", "/_/../index.html", "/_/%2e%2e/nginx.conf", "/_/..%2fnginx.conf", "/web/app.js",
    "/.filedrop/page", "/_/app.js.map", "/_/app.js%00", "/favicon.ico",
])
def test_nothing_else_of_web_is_served(ngx: NginxProcess, path: str) -> None:
    for r in (ngx.fetch_page("GET", path), ngx.fetch("GET", path)):
        assert r.status == 404, path
        assert r.json()["code"] == "ERR_NOT_FOUND"


def test_the_page_is_read_only(ngx: NginxProcess) -> None:
    r = ngx.fetch_page("POST", "/", body=b"x")
    assert r.status == 405 and r.json()["code"] == "ERR_METHOD_NOT_ALLOWED"


def test_no_inline_script_or_style_and_nothing_from_outside() -> None:
    page = parsed_page()
    scripts = [a for t, a in page.tags if t == "script"]
    assert scripts and all(a.get("src", "").startswith("/_/") for a in scripts)
    assert page.script_text == []
    assert not [t for t, _a in page.tags if t == "style"]
    assert not [(t, k) for t, a in page.tags for k in a if k == "style" or k.startswith("on")]
    for f in [WEB / "index.html", *WEB.glob("*.js"), *WEB.glob("*.css")]:
        text = f.read_text(encoding="utf-8")
        assert not re.search(r"""(?:src|href|url\()\s*=?\s*['"(]?\s*(?:https?:)?//""", text), f.name
        assert "@import" not in text, f.name
    # Names and messages are data: the scripts never parse strings as HTML.
    for js in WEB.glob("*.js"):
        assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write", js.read_text()), js.name


def test_every_hook_is_in_the_page_and_in_the_readme() -> None:
    html = (WEB / "index.html").read_text(encoding="utf-8")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for hook in HOOKS:
        assert f'data-testid="{hook}"' in html, hook
        assert f"`{hook}`" in readme, hook
    assert "docs/drop-page.png" in readme and (REPO / "docs" / "drop-page.png").is_file()


def test_the_web_root_is_rendered_into_nginx_conf(tmp_path: Path) -> None:
    text = ngx_conf.render(Settings(data_dir=tmp_path / "var"), tmp_path / "p").read_text()
    assert f"alias {WEB}/index.html;" in text and f"alias {WEB}/$1;" in text
    with pytest.raises(ValueError, match="drop page"):
        ngx_conf._web_root(Path("/srv/a dir; include /etc/passwd"))


# -- GET /api/limits and FILEDROP_CHUNK_SIZE ------------------------------------------------------
async def test_limits_answer_what_the_page_needs(client, settings: Settings) -> None:
    r = await client.get("/api/limits", headers=AUTH)
    assert r.status == 200
    assert await r.json() == {
        "chunkSize": 8 << 20, "maxChunkSize": settings.max_chunk_size, "maxFileSize": settings.max_file_size,
        "maxFilesPerBatch": settings.max_files_per_batch, "maxBatchBytes": settings.max_batch_bytes,
        "maxDataSize": settings.max_data_size, "maxChunksPerFile": settings.max_chunks_per_file,
    }


async def test_limits_need_a_key(client) -> None:
    for headers in ({}, {"X-API-Key": "wrong"}):
        r = await client.get("/api/limits", headers=headers)
        assert r.status == 401 and await r.read() == b""


async def test_limits_follow_the_settings(aiohttp_client, settings: Settings) -> None:
    from server.app import create_app

    s = settings.replace(chunk_size=3 << 20, max_chunk_size=5 << 20, max_files_per_batch=7)
    client = await aiohttp_client(create_app(s))
    body = await (await client.get("/api/limits", headers=AUTH)).json()
    assert (body["chunkSize"], body["maxChunkSize"], body["maxFilesPerBatch"]) == (3 << 20, 5 << 20, 7)


def test_chunk_size_defaults_to_8m_or_the_chunk_limit() -> None:
    assert Settings.from_env({}).upload_chunk_size == 8 << 20
    assert Settings.from_env({"FILEDROP_CHUNK_SIZE": "2M"}).upload_chunk_size == 2 << 20
    # Lowering only the limit stays valid: the default follows it down.
    assert Settings.from_env({"FILEDROP_MAX_CHUNK_SIZE": "5M"}).upload_chunk_size == 5 << 20


@pytest.mark.parametrize("env", [{"FILEDROP_CHUNK_SIZE": "16M", "FILEDROP_MAX_CHUNK_SIZE": "8M"},
                                 {"FILEDROP_CHUNK_SIZE": "65M"}, {"FILEDROP_CHUNK_SIZE": "0"}])
def test_a_chunk_size_over_the_limit_is_refused_naming_both(env: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="FILEDROP_CHUNK_SIZE .*FILEDROP_MAX_CHUNK_SIZE"):
        Settings.from_env(env)


def test_serve_refuses_to_start_with_a_chunk_size_over_the_limit(tmp_path: Path) -> None:
    env = server_env(tmp_path / "srv", API_KEY, chunk_size="16M", max_chunk_size="8M")
    r = subprocess.run([sys.executable, "-m", "server", "serve"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "FILEDROP_CHUNK_SIZE (16777216 bytes)" in r.stderr and "FILEDROP_MAX_CHUNK_SIZE (8388608 bytes)" in r.stderr


def test_a_missing_browser_fails_saying_how_to_install_it() -> None:
    from tests.support.browser import _binary

    with pytest.raises(AssertionError, match=r"FILEDROP_SETUP_TEST=1 scripts/setup` as root"):
        _binary("no-such-chromium-here", "/nonexistent/chromium")
