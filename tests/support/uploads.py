"""Upload helpers: a test client that speaks the upload API, and the one error-shape check."""

from __future__ import annotations

import hashlib
import io
import os
import urllib.parse
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from tests.conftest import AUTH


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split(data: bytes, chunk_size: int) -> list[bytes]:
    return [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)] or [b""]


def upload_headers(name: str, size: int, *, chunk: tuple[int, int] | None = None,
                   mimetype: str = "application/octet-stream", quote: bool = True) -> dict[str, str]:
    h = {**AUTH, "X-File-Name": urllib.parse.quote(name) if quote else name, "X-File-Size": str(size),
         "X-File-Type": mimetype, "Content-Type": mimetype}
    if chunk is not None:
        h.update({"X-Upload-Type": "chunked", "X-Upload-Chunk-Index": str(chunk[0]),
                  "X-Upload-Chunk-Count": str(chunk[1])})
    return h


async def assert_error(resp: Any, status: int, code: str | None = None) -> dict[str, Any]:
    """The one JSON error shape (Nuxeo's plus a stable code)."""
    assert resp.status == status, (resp.status, await resp.text())
    body = await resp.json()
    assert body["entity-type"] == "exception"
    assert body["status"] == status
    assert body["message"]
    assert body["code"].startswith("ERR_")
    if code is not None:
        assert body["code"] == code, body
    return body


class Uploads:
    """The upload API over an aiohttp test client (``prefix`` "" or "/nuxeo")."""

    def __init__(self, client: TestClient, prefix: str = "", auth: dict[str, str] | None = None) -> None:
        self.client = client
        self.prefix = prefix
        self.auth = auth or AUTH

    def url(self, path: str) -> str:
        return f"{self.prefix}/api/v1/upload{path}"

    async def create(self) -> str:
        r = await self.client.post(self.url("/"), headers=self.auth)
        assert r.status == 201, await r.text()
        return (await r.json())["batchId"]

    async def post(self, batch_id: str, idx: int, data: bytes, name: str = "f.bin", *,
                   chunk: tuple[int, int] | None = None, size: int | None = None, **headers: str) -> Any:
        h = {**upload_headers(name, len(data) if size is None else size, chunk=chunk), **self.auth, **headers}
        # aiohttp warns about big raw bytes bodies (they are sent in one write): a stream instead.
        body: Any = io.BytesIO(data) if isinstance(data, bytes) and len(data) > 1 << 20 else data
        return await self.client.post(self.url(f"/{batch_id}/{idx}"), data=body, headers=h)

    async def upload(self, batch_id: str, idx: int, data: bytes, name: str = "f.bin",
                     chunk_size: int | None = None) -> dict[str, Any]:
        """Whole, or in chunks of ``chunk_size`` in order; returns the last answer."""
        if chunk_size is None:
            r = await self.post(batch_id, idx, data, name)
            assert r.status == 201, await r.text()
            return await r.json()
        parts = split(data, chunk_size)
        body: dict[str, Any] = {}
        for i, part in enumerate(parts):
            r = await self.post(batch_id, idx, part, name, chunk=(i, len(parts)), size=len(data))
            assert r.status == (201 if i == len(parts) - 1 else 202), await r.text()
            body = await r.json()
        return body

    async def info(self, batch_id: str, idx: int | None = None) -> Any:
        return await self.client.get(self.url(f"/{batch_id}" + ("" if idx is None else f"/{idx}")),
                                     headers=self.auth)

    async def manifest(self, batch_id: str, idx: int | None = None, keep: bool = True) -> dict[str, Any]:
        path = f"/{batch_id}" + ("" if idx is None else f"/{idx}") + "/execute/Batch.Manifest"
        h = {**self.auth, "Content-Type": "application/json"}
        if keep:
            h["X-Batch-No-Drop"] = "true"
        r = await self.client.post(self.url(path), json={"params": {}}, headers=h)
        assert r.status == 200, await r.text()
        return await r.json()


def holds(path: Path, offset: int, data: bytes) -> bool:
    """True if ``path`` holds ``data`` at ``offset`` (a chunk written in place, say)."""
    try:
        with open(path, "rb") as f:
            return os.pread(f.fileno(), len(data), offset) == data
    except FileNotFoundError:
        return False


def upload_tree(data_dir: Path) -> list[str]:
    """Every path under ``<data_dir>/uploads``, relative (to assert what is on disk), but the
    service's own durability marker ``.synced``."""
    root = data_dir / "uploads"
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            if dirpath == str(root) and f == ".synced":
                continue
            out.append(os.path.relpath(os.path.join(dirpath, f), root))
    return sorted(out)
