"""The official ``nuxeo`` 7.1.0 client, unmodified, against a real server subprocess.

The client is synchronous, so these tests are plain functions that call it in the test thread.
It is configured as for a stock Nuxeo host (``http://H:P/nuxeo/``).
"""

from __future__ import annotations

import gc
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from nuxeo.auth import TokenAuth
from nuxeo.client import Nuxeo
from nuxeo.exceptions import HTTPError, UploadError
from nuxeo.models import Batch, FileBlob

from tests.conftest import API_KEY

pytestmark = [
    pytest.mark.timeout(120),
    # The client sets `session.stream = True` and never closes some responses it does not read
    # (is_reachable, void executes, error answers); their sockets are freed by the GC only.
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings(r"ignore:Exception ignored in. <socket\.socket:pytest.PytestUnraisableExceptionWarning"),
]
MiB = 1 << 20


def make_file(path: Path, size: int) -> str:
    """Random content written in pieces; returns its SHA-256."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 4 * MiB))
            h.update(block)
            f.write(block)
            left -= len(block)
    return h.hexdigest()


@pytest.fixture
def server(server_factory):  # type: ignore[no-untyped-def]
    return server_factory()


@pytest.fixture
def nuxeo_for() -> Iterator[Callable[..., Nuxeo]]:
    """Make clients for a server (Basic auth with the key as password unless ``auth``);
    their HTTP sessions are closed at teardown."""
    made: list[Nuxeo] = []

    def make(server, auth=None) -> Nuxeo:  # type: ignore[no-untyped-def]
        nx = Nuxeo(host=server.url + "/nuxeo/", auth=auth or ("anyone", API_KEY))
        made.append(nx)
        return nx

    yield make
    for nx in made:
        nx.client.on_exit()
    # Responses the client never closed hold sockets until collected: collect them here, under
    # this module's warning filters, not in whichever test happens to run next.
    gc.collect()


def manifest(nx: Nuxeo, batch) -> dict:  # type: ignore[no-untyped-def,type-arg]
    """Batch.Manifest through the client (void_op=False to get the body; executing drops the batch)."""
    resp = nx.uploads.execute(batch, "Batch.Manifest", void_op=False)
    assert resp.status_code == 200
    return resp.json()


def test_client_create_upload_chunked_list_delete_execute(server, nuxeo_for, tmp_path: Path) -> None:
    nx = nuxeo_for(server)
    assert nx.client.is_reachable()
    assert nx.client.server_version.startswith("filedrop")
    batch = nx.uploads.batch()
    assert len(batch.uid) == 32

    small = tmp_path / "small note.txt"
    small.write_bytes(b"hello nuxeo")
    blob = batch.upload(FileBlob(str(small), mimetype="text/plain"))
    assert blob.fileIdx in (0, "0") and int(blob.uploadedSize) == 11

    big = tmp_path / "big.bin"
    big_sha = make_file(big, 20 * MiB)
    blob = batch.upload(FileBlob(str(big)), chunked=True, chunk_size=4 * MiB)
    assert int(blob.fileIdx) == 1
    info = batch.get(1)
    assert int(info.size) == 20 * MiB and info.uploadType == "chunked"
    assert [int(i) for i in info.uploadedChunkIds] == [0, 1, 2, 3, 4] and int(info.chunkCount) == 5

    listing = nx.uploads.get(batch.uid)
    assert [b.name for b in listing] == ["small note.txt", "big.bin"]

    batch.delete(0)
    assert [b.name for b in nx.uploads.get(batch.uid)] == ["big.bin"]
    with pytest.raises(HTTPError) as e:
        batch.get(0)
    assert e.value.status == 404

    body = manifest(nx, batch)
    assert body == {"batchId": batch.uid, "files": [
        {"fileIdx": "1", "name": "big.bin", "size": 20 * MiB, "sha256": big_sha}]}
    # Executing removed the batch, as Nuxeo does.
    with pytest.raises(HTTPError) as e:
        nx.uploads.get(batch.uid)
    assert e.value.status == 404


def test_client_drop_and_void_execute(server, nuxeo_for, tmp_path: Path) -> None:
    nx = nuxeo_for(server, auth=TokenAuth(API_KEY))
    f = tmp_path / "a.txt"
    f.write_bytes(b"a")
    batch = nx.uploads.batch()
    batch.upload(FileBlob(str(f)))
    uid = batch.uid
    batch.cancel()
    with pytest.raises(HTTPError) as e:
        nx.uploads.get(uid)
    assert e.value.status == 404

    batch = nx.uploads.batch()
    batch.upload(FileBlob(str(f)))
    resp = batch.execute("Batch.Manifest", params={"any": "thing"})  # the client always asks for a void op
    assert resp.status_code == 204
    resp.close()
    with pytest.raises(HTTPError):
        nx.uploads.get(batch.uid)

    batch = nx.uploads.batch()
    with pytest.raises(HTTPError) as e:
        batch.execute("No.Such.Operation")
    assert e.value.status == 404


def test_client_resumes_an_interrupted_chunked_upload(server, nuxeo_for, tmp_path: Path) -> None:
    path = tmp_path / "resume.bin"
    sha = make_file(path, 5 * MiB + 123)
    nx = nuxeo_for(server)
    batch = nx.uploads.batch()
    uploader = batch.get_uploader(FileBlob(str(path)), chunked=True, chunk_size=512 * 1024)
    assert uploader.chunk_count == 11
    steps = uploader.iter_upload()
    for _ in range(4):
        next(steps)
    steps.close()  # the connection drops: the client process goes away mid-upload

    # A new client (as after a restart) asks the server what arrived and sends only the rest.
    nx2 = nuxeo_for(server)
    batch2 = nx2.uploads.batch()
    batch2.batchId = batch.uid
    sent: list[int] = []
    resumed = batch2.get_uploader(FileBlob(str(path)), chunked=True, chunk_size=512 * 1024,
                                  callback=lambda up: sent.append(len(up.blob.uploadedChunkIds)))
    assert sorted(int(i) for i in resumed.blob.uploadedChunkIds) == [0, 1, 2, 3]
    resumed.upload()
    assert len(sent) == 7 and resumed.is_complete()
    body = manifest(nx2, batch2)
    assert body["files"] == [{"fileIdx": "0", "name": "resume.bin", "size": 5 * MiB + 123, "sha256": sha}]


def test_client_edges_zero_bytes_unicode_reused_index_blob_input_and_the_chunk_cap(server_factory, nuxeo_for,
                                                                                   tmp_path: Path) -> None:
    """What the client does that the tests above do not: a 0-byte file, a name outside ASCII,
    batch.get / uploads.get of one file, a file deleted and its index sent again (as chunks this
    time), an operation run through the operations API with a Blob as its input, and a file that
    needs more chunks than FILEDROP_MAX_CHUNKS_PER_FILE (UploadError 413, nothing kept)."""
    nx = nuxeo_for(server_factory(max_chunks_per_file="4"))
    batch = nx.uploads.batch()
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert int(batch.upload(FileBlob(str(empty))).uploadedSize) == 0
    name = "rapport été 😀 حساب.txt"
    named = tmp_path / name
    named.write_bytes(b"unicode")
    batch.upload(FileBlob(str(named)))
    info = batch.get(1)
    assert (info.name, int(info.size), info.mimetype) == (name, 7, "text/plain")
    assert nx.uploads.get(batch.uid, 0).size == 0

    # File 0 deleted, then its index sent again, in chunks: the client finds nothing to resume.
    batch.delete(0)
    big = tmp_path / "big.bin"
    big_sha = make_file(big, 3000)
    batch.upload_idx = 0
    blob = batch.upload(FileBlob(str(big)), chunked=True, chunk_size=1000)
    assert [int(i) for i in blob.uploadedChunkIds] == [0, 1, 2] and batch.upload_idx == 1
    assert [b.name for b in nx.uploads.get(batch.uid)] == ["big.bin", name]

    # More chunks than the cap: refused at the first chunk, the batch as it was.
    batch.upload_idx = 2
    with pytest.raises(UploadError) as e:
        batch.upload(FileBlob(str(big)), chunked=True, chunk_size=500)
    assert "413" in str(e.value) and "FILEDROP_MAX_CHUNKS_PER_FILE" in str(e.value)
    with pytest.raises(HTTPError) as e2:
        batch.get(2)
    assert e2.value.status == 404

    # operations.execute with a Blob as input: POST upload/{batchId}/{fileIdx}/execute/{op}.
    out = nx.operations.execute(command="Batch.Manifest", input_obj=blob)
    assert out == {"batchId": batch.uid, "files": [{"fileIdx": "0", "name": "big.bin", "size": 3000,
                                                    "sha256": big_sha}]}
    # Executed without X-Batch-No-Drop: the batch went, as in Nuxeo; a client that still holds
    # it cancels it with a 404.
    stale = Batch(batchId=batch.uid, service=nx.uploads)
    with pytest.raises(HTTPError) as e3:
        stale.cancel()
    assert e3.value.status == 404
