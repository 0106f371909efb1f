"""The whole path through the real NGINX in front of the real app (``python -m server serve``):
the official nuxeo client uploads a 50 MB file in chunks, a job is started and followed, every
smartlink it made is fetched with its headers; then the app is stopped and the links still answer
200 while the API answers 503 JSON."""

from __future__ import annotations

import hashlib
import json
import os
import urllib.parse
from pathlib import Path

import pytest
import requests
from nuxeo.client import Nuxeo
from nuxeo.exceptions import UploadError
from nuxeo.models import FileBlob

from server.config import Settings
from tests.conftest import API_KEY
from tests.support.waiting import free_port, wait_until

pytestmark = [
    pytest.mark.timeout(180),
    # As in tests/test_upload_nuxeo_client.py: the client leaves some streamed responses unclosed
    # (their sockets are freed by the GC only).
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings(r"ignore:Exception ignored in. <socket\.socket:pytest.PytestUnraisableExceptionWarning"),
]
AUTH = {"X-API-Key": API_KEY}
BIG = 50 << 20
CHUNK = 4 << 20
ROWS = 12
TEMPLATE = {
    "name": "Invoice smartlink",
    "title": "Invoice {{ data.num_client }}",
    "lang": "fr",
    "body": "<h1>Client {{ data.num_client }}</h1><p>Montant : {{ data.montant }} €</p>"
            "<a href=\"{{ pdf }}\">PDF</a>" + "<p>Conditions générales de vente et mentions légales.</p>" * 20,
}
PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"


def write_big_file(path: Path) -> str:
    """50 MB, not compressible, written in 1 MiB steps; returns its SHA-256."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(BIG >> 20):
            block = os.urandom(1 << 20)
            h.update(block)
            f.write(block)
    return h.hexdigest()


def upload_through_nginx(nx: Nuxeo, big: Path, pdf: Path, digest: str, base: str) -> str:
    batch = nx.uploads.batch()
    batch.upload(FileBlob(str(big), mimetype="application/octet-stream"), chunked=True, chunk_size=CHUNK)
    batch.upload(FileBlob(str(pdf), mimetype="application/pdf"))
    batch_id = batch.uid
    r = requests.post(f"{base}/nuxeo/api/v1/upload/{batch_id}/execute/Batch.Manifest", json={"params": {}},
                      headers={**AUTH, "X-Batch-No-Drop": "true"}, timeout=30)
    assert r.status_code == 200, r.text
    files = {f["fileIdx"]: f for f in r.json()["files"]}
    assert files["0"]["size"] == BIG and files["0"]["sha256"] == digest
    assert files["1"]["sha256"] == hashlib.sha256(PDF).hexdigest()

    # The same 50 MB in one request is over the chunk limit: NGINX refuses it up front, with the
    # JSON error shape the nuxeo client parses (status + message).
    with pytest.raises(UploadError) as refused:
        nx.uploads.batch().upload(FileBlob(str(big), mimetype="application/octet-stream"), chunked=False)
    assert "HTTPError(413)" in str(refused.value)
    assert f"{8 << 20}-byte limit of one upload (FILEDROP_MAX_CHUNK_SIZE)" in str(refused.value)  # max_chunk_size="8M"
    return batch_id


@pytest.mark.slow
def test_upload_job_and_delivery_through_nginx(tmp_path: Path, server_factory, nginx_factory) -> None:
    http_port = free_port()
    # The app publishes result URLs on NGINX's port; its chunk limit (and so NGINX's) is 8 MiB.
    app = server_factory(http_port=str(http_port), max_chunk_size="8M")
    settings = Settings.from_env(app.env)
    ngx = nginx_factory(settings, app_port=app.port, http_port=http_port)
    base = ngx.url

    # 1. The nuxeo client, pointed at NGINX as at a Nuxeo server, uploads 50 MB in 4 MiB chunks.
    big = tmp_path / "big.bin"
    digest = write_big_file(big)
    (tmp_path / "doc.pdf").write_bytes(PDF)
    nx = Nuxeo(host=base + "/nuxeo/", auth=("tester", API_KEY))
    try:
        batch_id = upload_through_nginx(nx, big, tmp_path / "doc.pdf", digest, base)
    finally:
        nx.client.on_exit()

    # 2. A job on that batch, started and followed through NGINX; rows link the uploaded PDF.
    rows = [{"reference_id": f"ref{i:04d}", "suffix": f"{i:04d}5f1ea1e9b982f900468a",
             "pdf": "batch:1" if i % 2 else "",
             "data": {"num_client": f"240 000 {i:03d}", "montant": str(100 + i)}} for i in range(ROWS)]
    form = {"document_file": ("template.json", json.dumps(TEMPLATE), "application/json"),
            "data": (None, json.dumps(rows), "application/json")}
    r = requests.post(f"{base}/api/batch/{batch_id}/start", files=form, headers=AUTH, timeout=30)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]

    def finished() -> dict | None:  # type: ignore[type-arg]
        s = requests.get(f"{base}/api/batch/{batch_id}/{job_id}/status", headers=AUTH, timeout=10)
        assert s.status_code == 200, s.text
        body = s.json()
        return body if body["status"] in ("Completed", "Completed with errors", "Cancelled", "Failed") else None

    status = wait_until(finished, timeout=60, interval=0.1, what=f"job {job_id}")
    assert status["status"] == "Completed" and status["succeededCount"] == ROWS, status
    r = requests.get(f"{base}/api/batch/{batch_id}/{job_id}/result", headers=AUTH, timeout=10)
    assert r.status_code == 200
    result = r.json()["rows"]
    assert len(result) == ROWS and all(row["status"] == "succeeded" for row in result)

    # 3. Every smartlink through NGINX, with the headers; the PDFs published beside them too.
    links = []
    for i, row in enumerate(result):
        url = urllib.parse.urlsplit(row["url"])
        assert f"{url.scheme}://{url.netloc}" == base
        assert url.path == f"/{batch_id}/{row['reference_id']}.{row['suffix']}.html"
        links.append(url.path)
        page = requests.get(base + url.path, timeout=10)
        assert page.status_code == 200
        assert page.headers["Content-Type"] == "text/html; charset=utf-8"
        assert page.headers["X-Content-Type-Options"] == "nosniff"
        assert page.headers["Referrer-Policy"] == "no-referrer"
        assert page.headers["ETag"] and page.headers["Last-Modified"]
        assert page.headers["Content-Encoding"] == "gzip"  # requests asks for gzip and undoes it
        assert f"Client 240 000 {i:03d}" in page.text
        again = requests.get(base + url.path, headers={"If-None-Match": page.headers["ETag"]}, timeout=10)
        assert again.status_code == 304
        if i % 2:
            pdf_path = url.path[:-len(".html")] + ".pdf"
            assert f'href="{pdf_path.rsplit("/", 1)[1]}"' in page.text
            pdf = requests.get(base + pdf_path, timeout=10)
            assert pdf.status_code == 200 and pdf.content == PDF
            assert pdf.headers["Content-Type"] == "application/pdf"
            links.append(pdf_path)

    # 4. The app stops: the links are still served from disk, the API is 503 JSON.
    app.stop()
    assert app.proc is not None and app.proc.poll() is not None
    for path in links:
        assert requests.get(base + path, timeout=10).status_code == 200
    for path in (f"/api/batch/{batch_id}/{job_id}/status", f"/nuxeo/api/v1/upload/{batch_id}", "/healthz",
                 "/site/automation/batch/upload"):
        r = requests.get(base + path, headers=AUTH, timeout=10)
        assert r.status_code == 503
        assert r.json()["code"] == "ERR_APP_UNAVAILABLE"


def test_killed_app_gives_503_json_while_links_are_served(server_factory, nginx_factory) -> None:
    """kill -9 of the real app (a crash, no graceful 503 of its own): NGINX answers for it."""
    app = server_factory()
    settings = Settings.from_env(app.env)
    assert settings.smartlink_root is not None
    link = settings.smartlink_root / "b1" / "ref.5f1ea1e9b982f900468aeb5b.html"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.write_bytes(b"<p>served from disk</p>")
    ngx = nginx_factory(settings, app_port=app.port)
    r = requests.get(ngx.url + "/api/v1/upload/handlers", headers=AUTH, timeout=10)
    assert r.status_code == 200
    app.kill9()
    for path in ("/api/v1/upload/handlers", "/nuxeo/api/v1/upload/", "/api/batch/b1/x/status", "/healthz"):
        r = requests.get(ngx.url + path, headers=AUTH, timeout=10)
        assert r.status_code == 503 and r.headers["Retry-After"] == "5"
        assert r.json()["code"] == "ERR_APP_UNAVAILABLE"
    r = requests.get(ngx.url + "/b1/ref.5f1ea1e9b982f900468aeb5b.html", timeout=10)
    assert r.status_code == 200 and r.content == b"<p>served from disk</p>"
