"""Smartlinks straight from disk through the real NGINX: headers, caching, gzip, and a 404 (JSON)
for everything that is not exactly ``/<batch_id>/<reference_id>.<suffix>.html|.pdf``.

The files are written here the way the renderer publishes them (temp dot-name, fsync,
os.replace), so these tests do not depend on the job engine.
"""

from __future__ import annotations

import email.utils
import gzip
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.config import Settings
from tests.support.nginx import NginxFactory, NginxProcess

SUFFIX = "5f1ea1e9b982f900468aeb5b"
HTML = ("<!doctype html><html lang=fr><title>Invoice</title><body>"
        + "<p>Client 240 000 009 425 — montant 500 €</p>" * 40 + "</body></html>").encode()
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 8
SECRET = b"RENDERER TEMP CONTENT"


def publish(path: Path, data: bytes) -> None:
    """Temp dot-name -> fsync -> os.replace, as server.jobs publishes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NginxProcess, Path]]:
    base = tmp_path_factory.mktemp("nginx-static")
    settings = Settings(data_dir=base / "var")
    root = settings.smartlink_root
    assert root is not None
    publish(root / "b1" / f"ref1.{SUFFIX}.html", HTML)
    publish(root / "b1" / f"ref1.{SUFFIX}.pdf", PDF)
    publish(root / "b1" / f"-ref_2.{SUFFIX}.html", HTML)
    publish(root / "B-9_x" / f"r.{SUFFIX}.html", HTML)
    # Things that exist on disk but must never be served.
    (root / "b1" / f".ref1.{SUFFIX}.html.1234.tmp").write_bytes(SECRET)   # renderer temp file
    (root / "b1" / f"ref1.{SUFFIX}.html.tmp").write_bytes(SECRET)
    (root / "b1" / ".htaccess").write_bytes(SECRET)
    (root / "b1" / f"ref1.{SUFFIX}.txt").write_bytes(SECRET)
    (root / "b1" / f"ref1.{SUFFIX}.HTML").write_bytes(SECRET)
    (root / "b1" / "noext").write_bytes(SECRET)
    (root / "b1" / f"dir.{SUFFIX}.html").mkdir()
    (root / "-dash" ).mkdir()
    (root / "-dash" / f"r.{SUFFIX}.html").write_bytes(SECRET)
    (root / "_under").mkdir()
    (root / "_under" / f"r.{SUFFIX}.html").write_bytes(SECRET)
    (root / ".hidden").mkdir()
    (root / ".hidden" / f"r.{SUFFIX}.html").write_bytes(SECRET)
    outside = base / "outside.html"
    outside.write_bytes(SECRET)
    (root / "b1" / f"link.{SUFFIX}.html").symlink_to(outside)
    (root / "linkdir").symlink_to(base)
    (base / f"r.{SUFFIX}.html").write_bytes(SECRET)
    factory = NginxFactory(base / "nginx")
    try:
        yield factory.start(settings), root
    finally:
        factory.stop_all()


@pytest.fixture
def ngx(tree: tuple[NginxProcess, Path]) -> NginxProcess:
    return tree[0]


def assert_hardened(headers) -> None:  # type: ignore[no-untyped-def]
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"


def test_html_smartlink_is_served_with_its_headers(ngx: NginxProcess) -> None:
    r = ngx.fetch("GET", f"/b1/ref1.{SUFFIX}.html")
    assert r.status == 200
    assert r.body == HTML
    assert r.headers["Content-Type"] == "text/html; charset=utf-8"
    assert_hardened(r.headers)
    assert r.headers["Cache-Control"] == "private, no-cache"
    assert r.headers["ETag"].startswith('"')
    assert email.utils.parsedate_to_datetime(r.headers["Last-Modified"])
    assert int(r.headers["Content-Length"]) == len(HTML)
    assert "nginx/" not in r.headers.get("Server", "")  # server_tokens off


def test_no_smartlink_is_served_on_the_drop_pages_origin(ngx: NginxProcess) -> None:
    """The page's port (its own origin, where the key lives) serves no tenant HTML."""
    for path in (f"/b1/ref1.{SUFFIX}.html", f"/b1/ref1.{SUFFIX}.pdf"):
        assert ngx.fetch("GET", path).status == 200
        r = ngx.fetch_page("GET", path)
        assert r.status == 404 and r.json()["code"] == "ERR_NOT_FOUND" and SECRET not in r.body, path
        assert HTML not in r.body and PDF not in r.body


@pytest.mark.parametrize("path", [f"/b1/-ref_2.{SUFFIX}.html", f"/B-9_x/r.{SUFFIX}.html",
                                  f"/b1/ref1.{SUFFIX}.html?utm=mail&x=1"])
def test_every_allowed_character_is_served(ngx: NginxProcess, path: str) -> None:
    r = ngx.fetch("GET", path)
    assert r.status == 200 and r.body == HTML


def test_head_has_headers_and_no_body(ngx: NginxProcess) -> None:
    r = ngx.fetch("HEAD", f"/b1/ref1.{SUFFIX}.html")
    assert r.status == 200 and r.body == b""
    assert int(r.headers["Content-Length"]) == len(HTML)
    assert r.headers["Content-Type"] == "text/html; charset=utf-8"
    assert_hardened(r.headers)


def test_pdf_beside_it_is_served_uncompressed(ngx: NginxProcess) -> None:
    r = ngx.fetch("GET", f"/b1/ref1.{SUFFIX}.pdf", {"Accept-Encoding": "gzip"})
    assert r.status == 200 and r.body == PDF
    assert r.headers["Content-Type"] == "application/pdf"
    assert "Content-Encoding" not in r.headers
    assert_hardened(r.headers)


def test_html_is_gzipped_when_asked(ngx: NginxProcess) -> None:
    r = ngx.fetch("GET", f"/b1/ref1.{SUFFIX}.html", {"Accept-Encoding": "gzip, deflate"})
    assert r.status == 200
    assert r.headers["Content-Encoding"] == "gzip"
    assert "Accept-Encoding" in r.headers["Vary"]
    assert gzip.decompress(r.body) == HTML
    assert len(r.body) < len(HTML) // 4


def test_etag_and_last_modified_give_304(ngx: NginxProcess) -> None:
    first = ngx.fetch("GET", f"/b1/ref1.{SUFFIX}.html")
    etag, last_modified = first.headers["ETag"], first.headers["Last-Modified"]
    r = ngx.fetch("GET", f"/b1/ref1.{SUFFIX}.html", {"If-None-Match": etag})
    assert r.status == 304 and r.body == b""
    assert r.headers["ETag"] == etag
    r = ngx.fetch("GET", f"/b1/ref1.{SUFFIX}.html", {"If-Modified-Since": last_modified})
    assert r.status == 304 and r.body == b""
    r = ngx.fetch("GET", f"/b1/ref1.{SUFFIX}.html", {"If-None-Match": '"something-else"'})
    assert r.status == 200 and r.body == HTML


# Everything that is not exactly /<batch_id>/<reference_id>.<suffix>.html|.pdf — traversal in
# every spelling, listings, dotfiles, the renderer's temp files, symlinks, wrong characters.
# (`/` redirects to the drop page's port: tests/test_web_static.py.)
NOT_SERVED = [
    "/b1",
    "/b1/",
    "/b1/?C=M;O=A",
    "/linkdir/",
    "/b1/dir." + SUFFIX + ".html",           # a directory named like a link: no 301, no listing
    "/b1/dir." + SUFFIX + ".html/",
    "/b1/.htaccess",
    f"/b1/.ref1.{SUFFIX}.html.1234.tmp",       # the renderer's temp file
    f"/b1/ref1.{SUFFIX}.html.tmp",
    f"/b1/ref1.{SUFFIX}.txt",
    f"/b1/ref1.{SUFFIX}.HTML",
    "/b1/noext",
    f"/b1/link.{SUFFIX}.html",                 # symlink to a file outside the root
    f"/linkdir/r.{SUFFIX}.html",               # through a symlinked directory
    f"/-dash/r.{SUFFIX}.html",                 # batch_id may not start with - or _
    f"/_under/r.{SUFFIX}.html",
    f"/.hidden/r.{SUFFIX}.html",
    f"/b1/ref1.{SUFFIX}.html/",
    f"/b1/ref1.{SUFFIX}.html;.pdf",
    f"/b1/ref1.{SUFFIX}",
    f"/b1/ref1.{SUFFIX}.html.pdf",
    f"/b1/x.y.{SUFFIX}.html",
    f"/{'a' * 129}/r.{SUFFIX}.html",           # over 128 characters
    f"/b1/{'r' * 129}.{SUFFIX}.html",
    # traversal, raw and encoded
    f"/b1/../b1/ref1.{SUFFIX}.html",
    f"/b1/./ref1.{SUFFIX}.html",
    f"/b1/%2e%2e/b1/ref1.{SUFFIX}.html",
    f"/b1/%2E%2E/b1/ref1.{SUFFIX}.html",
    f"/b1/.%2e/b1/ref1.{SUFFIX}.html",
    f"/x/../b1/ref1.{SUFFIX}.html",
    "/../outside.html",
    f"/../r.{SUFFIX}.html",
    f"/%2e%2e/r.{SUFFIX}.html",
    "/b1/../../outside.html",
    "/%2e%2e/%2e%2e/etc/passwd",
    "/..%2f..%2fetc/passwd",
    f"/b1%2fref1.{SUFFIX}.html",
    f"/b1%2Fref1.{SUFFIX}.html",
    f"//b1/ref1.{SUFFIX}.html",
    f"/b1//ref1.{SUFFIX}.html",
    f"/b1\\ref1.{SUFFIX}.html",
    f"/b1%5cref1.{SUFFIX}.html",
    f"/b1/..\\..\\r.{SUFFIX}.html",
    f"/b1/ref1.{SUFFIX}.html%00",
    f"/b1/ref1.{SUFFIX}%2ehtml",
    f"/%62%31/ref1.{SUFFIX}.html",             # percent-encoded "b1"
    # the API's prefixes alone: no HTML 301 to the prefix with a slash
    "/api", "/api/v1", "/site/automation", "/nuxeo",
]


@pytest.mark.parametrize("path", NOT_SERVED)
def test_anything_else_is_404_json(ngx: NginxProcess, path: str) -> None:
    r = ngx.fetch("GET", path)
    assert r.status == 404, (path, r.status, r.headers.get("Location"))
    assert r.headers["Content-Type"] == "application/json"
    body = r.json()
    assert body["status"] == 404 and body["code"] == "ERR_NOT_FOUND" and body["entity-type"] == "exception"
    assert SECRET not in r.body and HTML not in r.body
    assert_hardened(r.headers)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_smartlinks_are_read_only(ngx: NginxProcess, method: str) -> None:
    r = ngx.fetch(method, f"/b1/ref1.{SUFFIX}.html", body=b"x")
    assert r.status == 405
    assert r.json()["code"] == "ERR_METHOD_NOT_ALLOWED"
    assert "GET" in r.headers["Allow"]
    assert ngx.fetch("GET", f"/b1/ref1.{SUFFIX}.html").body == HTML


def test_a_link_published_after_a_miss_is_served_at_once(tree: tuple[NginxProcess, Path]) -> None:
    ngx, root = tree
    path = f"/late/ref.{SUFFIX}.html"
    assert ngx.fetch("GET", path).status == 404
    publish(root / "late" / f"ref.{SUFFIX}.html", b"<p>late</p>")
    # No descriptor cache: a miss is not remembered.
    r = ngx.fetch("GET", path)
    assert r.status == 200 and r.body == b"<p>late</p>"


def test_a_replaced_link_is_served_new_at_once(tree: tuple[NginxProcess, Path]) -> None:
    ngx, root = tree
    path = f"/again/ref.{SUFFIX}.html"
    publish(root / "again" / f"ref.{SUFFIX}.html", b"<p>first</p>")
    first = ngx.fetch("GET", path)
    assert first.body == b"<p>first</p>"
    assert ngx.fetch("GET", path).body == b"<p>first</p>"  # fetched twice: a cache would hold it now
    publish(root / "again" / f"ref.{SUFFIX}.html", b"<p>second version</p>")
    r = ngx.fetch("GET", path)  # no descriptor cache: the next request opens the new file
    assert r.status == 200 and r.body == b"<p>second version</p>"
    assert r.headers["ETag"] != first.headers["ETag"]


def test_a_deleted_link_is_404_at_once(tree: tuple[NginxProcess, Path]) -> None:
    ngx, root = tree
    path = f"/gone/ref.{SUFFIX}.html"
    publish(root / "gone" / f"ref.{SUFFIX}.html", b"<p>soon gone</p>")
    assert ngx.fetch("GET", path).status == 200
    assert ngx.fetch("GET", path).status == 200
    (root / "gone" / f"ref.{SUFFIX}.html").unlink()
    assert ngx.fetch("GET", path).status == 404


@pytest.mark.parametrize("path,headers,status,code", [
    ("/b1/" + "a" * 9000, {}, 414, "ERR_URI_TOO_LONG"),
    (f"/b1/ref1.{SUFFIX}.html", {"X-Big": "a" * 9000}, 431, "ERR_HEADERS_TOO_LARGE"),
    ("/api/v1/upload/x", {"X-Big": "a" * 9000}, 431, "ERR_HEADERS_TOO_LARGE"),
])
def test_oversized_requests_are_refused_as_json(ngx: NginxProcess, path: str, headers: dict[str, str],
                                                status: int, code: str) -> None:
    r = ngx.fetch("GET", path, headers)
    assert r.status == status
    assert r.headers["Content-Type"] == "application/json"
    assert r.json()["code"] == code
