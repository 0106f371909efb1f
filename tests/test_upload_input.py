"""Upload input the issues found handled badly: an execute body nested too deep (was 500), a C1
control character in a file name (was accepted), a curl upload's form Content-Type taken as
the file's type, and the cap on chunks per file (was 1,000,000: answers grew with the file)."""

from __future__ import annotations

import os
import urllib.parse

import pytest
from multidict import CIMultiDict

from server.app import create_app
from server.jsondoc import MAX_DEPTH
from tests.conftest import AUTH
from tests.support.uploads import Uploads, assert_error, sha256, upload_headers, upload_tree

pytestmark = pytest.mark.timeout(60)


async def test_deep_nesting_in_an_execute_body_is_422_naming_the_body(client) -> None:
    up = Uploads(client)
    batch = await up.create()
    await up.upload(batch, 0, b"kept")
    deep = b'{"params": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    h = {**AUTH, "Content-Type": "application/json"}
    for path in (up.url(f"/{batch}/execute/Batch.Manifest"), "/site/automation/batch/execute"):
        body = await assert_error(await client.post(path, data=deep, headers=h), 422, "ERR_FIELD_INVALID")
        assert body["field"] == "body" and f"more than {MAX_DEPTH} levels" in body["message"]
    lone = b'{"params": {"x": "\\ud800"}}'
    body = await assert_error(await client.post(up.url(f"/{batch}/execute/Batch.Manifest"), data=lone, headers=h),
                              422, "ERR_FIELD_INVALID")
    assert body["field"] == "body"
    # Refused before anything ran: the batch is still there, its file too.
    assert (await up.manifest(batch))["files"][0]["sha256"] == sha256(b"kept")


@pytest.mark.parametrize(("name", "content_type", "file_type", "stored"), [
    ("report.pdf", "application/x-www-form-urlencoded", None, "application/pdf"),  # curl --data-binary
    ("notes.txt", "application/x-www-form-urlencoded", None, "text/plain"),
    ("no-extension", "application/x-www-form-urlencoded", None, "application/octet-stream"),
    ("photo", "image/png", None, "image/png"),  # a type the client chose on purpose
    ("report.pdf", "multipart/form-data; boundary=x", None, "application/pdf"),
    ("report.pdf", "application/x-www-form-urlencoded", "application/x-custom", "application/x-custom"),
])
async def test_the_file_type_comes_from_x_file_type_then_the_name(client, name, content_type, file_type,
                                                                   stored) -> None:
    up = Uploads(client)
    batch = await up.create()
    h = {**AUTH, "X-File-Name": urllib.parse.quote(name), "Content-Type": content_type}
    if file_type is not None:
        h["X-File-Type"] = file_type
    r = await client.post(up.url(f"/{batch}/0"), data=b"%PDF-1.4 ...", headers=h)
    assert r.status == 201, await r.text()
    info = await (await up.info(batch, 0)).json()
    assert info["mimetype"] == stored


async def test_chunks_per_file_are_capped_by_a_setting(aiohttp_client, settings) -> None:
    up = Uploads(await aiohttp_client(create_app(settings.replace(max_chunks_per_file=4))))
    batch = await up.create()
    body = await assert_error(await up.post(batch, 0, b"a", chunk=(0, 5), size=5), 413, "ERR_FILE_TOO_MANY_CHUNKS")
    assert "FILEDROP_MAX_CHUNKS_PER_FILE" in body["message"] and "4" in body["message"]
    data = os.urandom(4 * 100)
    answer = await up.upload(batch, 0, data, chunk_size=100)  # four chunks: at the cap, fine
    assert answer["uploadedChunkIds"] == [0, 1, 2, 3]
    assert (await up.manifest(batch))["files"][0]["sha256"] == sha256(data)


async def test_the_default_cap_is_s3s_10000(client) -> None:
    up = Uploads(client)
    batch = await up.create()
    r = await up.post(batch, 0, b"a", chunk=(0, 10_001), size=20_000)
    await assert_error(r, 413, "ERR_FILE_TOO_MANY_CHUNKS")
    r = await up.post(batch, 0, b"a", chunk=(0, 10_000), size=20_000)
    assert r.status == 202 and (await r.json())["uploadedChunkIds"] == [0]


async def test_a_file_of_many_chunks_lists_every_id_in_every_answer(client) -> None:
    """The nuxeo client replaces its list of ids from every answer: each answer lists them all,
    from the bitmap the row keeps (one chunk's record does not grow with the file)."""
    up = Uploads(client)
    batch = await up.create()
    n = 600
    data = os.urandom(n)
    for i in range(n):
        r = await up.post(batch, 0, data[i:i + 1], chunk=(i, n), size=n)
        body = await r.json()
        assert r.status == (201 if i == n - 1 else 202)
        assert body["uploadedChunkIds"] == list(range(i + 1))
    assert (await up.manifest(batch))["files"][0]["sha256"] == sha256(data)


async def test_empty_uploads_one_after_another_are_each_answered(client) -> None:
    """Every Content-Length: 0 request shares aiohttp's one empty body; once any request has read
    it, it answers (b"", True) for ever. Reading that as "end of an HTTP chunk, more to come" spun
    the event loop at 100% CPU on the second empty upload (found by schemathesis): each must be
    answered, on both forms."""
    up = Uploads(client)
    batch = await up.create()
    for idx in range(3):
        assert (await up.upload(batch, idx, b"", name=f"empty{idx}"))["uploadedSize"] == "0"
    legacy = {**AUTH, "X-Batch-Id": "legacy-empty", "X-File-Idx": "0", "X-File-Name": "e", "X-File-Size": "0"}
    for _ in range(2):
        r = await client.post("/site/automation/batch/upload", data=b"", headers=legacy)
        assert r.status == 200, await r.text()
    files = (await up.manifest(batch))["files"]
    assert [f["sha256"] for f in files] == [sha256(b"")] * 3


# -- a whole file without Content-Length nor X-File-Size ----------------------------------------
async def _chunked(data: bytes):  # type: ignore[no-untyped-def]
    """A body aiohttp sends with Transfer-Encoding: chunked (its length unknown beforehand)."""
    for i in range(0, len(data), 64 << 10):
        yield data[i:i + (64 << 10)]


async def test_a_small_chunked_body_without_x_file_size_is_its_own_size(client) -> None:
    """Its size is its length: read first (up to 1 MiB, as a whole file that small is anyway),
    as NGINX does it for a small chunked body (it passes it on with a Content-Length)."""
    up = Uploads(client)
    batch = await up.create()
    h = {**AUTH, "X-File-Name": "six.txt"}
    for idx, data in enumerate([b"abcdef", b"", os.urandom(1 << 20)]):
        r = await client.post(up.url(f"/{batch}/{idx}"), data=_chunked(data), headers=h)
        assert r.status == 201, await r.text()
        assert (await r.json())["uploadedSize"] == str(len(data))
    files = (await up.manifest(batch))["files"]
    assert [f["size"] for f in files] == [6, 0, 1 << 20]
    assert files[2]["sha256"] == sha256(data)


async def test_a_big_chunked_body_without_x_file_size_is_400_naming_it(client) -> None:
    up = Uploads(client)
    batch = await up.create()
    await up.upload(batch, 0, b"kept")
    r = await client.post(up.url(f"/{batch}/1"), data=_chunked(b"x" * (2 << 20)), headers={**AUTH, "X-File-Name": "b"})
    body = await assert_error(r, 400, "ERR_FILE_SIZE_MISSING")
    assert "X-File-Size is required" in body["message"] and "Content-Length" in body["message"], body
    # A chunk's X-File-Size is the whole file's: never its own length.
    h = {**AUTH, "X-File-Name": "c", "X-Upload-Type": "chunked", "X-Upload-Chunk-Index": "0",
         "X-Upload-Chunk-Count": "2"}
    body = await assert_error(await client.post(up.url(f"/{batch}/1"), data=b"abc", headers=h), 400,
                              "ERR_FILE_SIZE_MISSING")
    assert "X-File-Size" in body["message"]
    files = (await up.manifest(batch))["files"]
    assert [(f["fileIdx"], f["sha256"]) for f in files] == [("0", sha256(b"kept"))]



async def test_a_chunk_without_content_length_keeps_only_its_own_bytes_of_disk(client, settings) -> None:
    """A chunk sent without Content-Length reserves the most it may hold before its first byte
    (the file's size here, at most FILEDROP_MAX_CHUNK_SIZE); once its body has ended, the rest is
    given back. Stored on its own until its file completes, it held the whole reservation (the
    blocks ``fallocate`` keeps past the end of a file), and the free-disk floor counted it."""
    up = Uploads(client)
    batch = await up.create()
    size, stride = 40 << 20, 1 << 20
    parts = [os.urandom(stride) for _ in range(2)]
    assert (await up.post(batch, 0, parts[0], chunk=(0, 40), size=size)).status == 202
    r = await client.post(up.url(f"/{batch}/0"), data=_chunked(parts[1]),
                          headers=upload_headers("f.bin", size, chunk=(1, 40)))
    assert r.status == 202, await r.text()
    [stored] = [settings.uploads_dir / p for p in upload_tree(settings.data_dir) if p.endswith("chunks/1")]
    st = os.stat(stored)
    assert st.st_size == stride
    assert st.st_blocks * 512 <= stride + (64 << 10), f"{st.st_blocks * 512} bytes of disk for a {stride}-byte chunk"
    assert stored.read_bytes() == parts[1]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_an_empty_chunk_is_400_and_the_file_can_still_be_sent(client, framing) -> None:
    """Each chunk of a file sent in several holds at least one byte. An empty one was recorded
    (202): the right bytes sent again were then a repeat, passed over, and the last chunk was 400
    ERR_FILE_SIZE_MISMATCH until the file was deleted. A 0-byte file in one chunk is fine."""
    up = Uploads(client)
    batch = await up.create()
    await up.upload(batch, 1, b"kept")
    data = os.urandom(3000)
    parts = [data[i:i + 1000] for i in range(0, 3000, 1000)]
    assert (await up.post(batch, 0, parts[0], chunk=(0, 3), size=3000)).status == 202
    empty = b"" if framing == "content-length" else _chunked(b"")
    r = await client.post(up.url(f"/{batch}/0"), data=empty, headers=upload_headers("f.bin", 3000, chunk=(1, 3)))
    body = await assert_error(r, 400, "ERR_FILE_SIZE_MISMATCH")
    assert "chunk 1 of file 0 is empty" in body["message"], body
    assert (await (await up.info(batch, 0)).json())["uploadedChunkIds"] == [0]  # nothing recorded
    for i in (1, 2):
        assert (await up.post(batch, 0, parts[i], chunk=(i, 3), size=3000)).status == (202, 201)[i - 1]
    r = await up.post(batch, 2, b"", "empty.txt", chunk=(0, 1), size=0)
    assert r.status == 201, await r.text()
    files = (await up.manifest(batch))["files"]
    assert [(f["fileIdx"], f["sha256"]) for f in files] == [("0", sha256(data)), ("1", sha256(b"kept")),
                                                            ("2", sha256(b""))]

# -- a header sent twice ------------------------------------------------------------------------
@pytest.mark.parametrize(("header", "values", "code"), [
    ("X-File-Size", ("3", "5"), "ERR_FILE_SIZE_INVALID"),
    ("X-File-Name", ("a.txt", "b.txt"), "ERR_FILE_NAME_INVALID"),
    ("X-File-Type", ("text/plain", "image/png"), "ERR_FILE_TYPE_INVALID"),
    ("X-Upload-Type", ("chunked", "normal"), "ERR_UPLOAD_TYPE_INVALID"),
    ("X-Upload-Chunk-Index", ("0", "1"), "ERR_CHUNK_INDEX_INVALID"),
    ("X-Upload-Chunk-Count", ("2", "3"), "ERR_CHUNK_COUNT_INVALID"),
])
async def test_a_header_sent_twice_with_different_values_is_400_naming_it(client, header, values, code) -> None:
    up = Uploads(client)
    batch = await up.create()
    base = {**AUTH, "X-File-Name": "a.txt", "X-File-Size": "3", "X-Upload-Type": "chunked",
            "X-Upload-Chunk-Index": "0", "X-Upload-Chunk-Count": "2"}
    h = CIMultiDict((k, v) for k, v in base.items() if k != header)
    for v in values:
        h.add(header, v)
    body = await assert_error(await client.post(up.url(f"/{batch}/0"), data=b"abc", headers=h), 400, code)
    assert header in body["message"] and "different values" in body["message"], body
    await assert_error(await up.info(batch, 0), 404, "ERR_FILE_NOT_FOUND")  # nothing recorded
    # The same value twice says one thing: accepted.
    h = CIMultiDict((k, v) for k, v in base.items() if k != header)
    h.add(header, values[0])
    h.add(header, f" {values[0]}")
    r = await client.post(up.url(f"/{batch}/0"), data=b"abc" if header != "X-Upload-Type" else b"ab", headers=h)
    assert r.status in (201, 202), await r.text()


async def test_legacy_headers_sent_twice_with_different_values_are_400(client) -> None:
    base = [*AUTH.items(), ("X-File-Name", "a"), ("X-File-Size", "1")]
    for header, values, code in [("X-Batch-Id", ("one", "two"), "ERR_BATCH_ID_INVALID"),
                                 ("X-File-Idx", ("0", "1"), "ERR_FILE_IDX_INVALID")]:
        h = CIMultiDict([*base, ("X-Batch-Id", "one"), ("X-File-Idx", "0")])
        h.popall(header)
        for v in values:
            h.add(header, v)
        r = await client.post("/site/automation/batch/upload", data=b"x", headers=h)
        body = await assert_error(r, 400, code)
        assert header in body["message"], body


# -- file names shown back ----------------------------------------------------------------------
@pytest.mark.parametrize(("name", "says"), [
    ("%20", "required"), ("%20%20%09", "control"), ("%E3%80%80", "required"),  # U+3000 IDEOGRAPHIC SPACE
    ("invoice%E2%80%AEfdp.exe", "U+202E"),  # RIGHT-TO-LEFT OVERRIDE: shows as invoiceexe.pdf
    ("a%E2%80%A8b", "U+2028"), ("a%E2%80%A9b", "U+2029"), ("a%E2%80%8Bb", "U+200B"), ("%EF%BB%BFa.txt", "U+FEFF"),
    ("a%C2%ADb", "U+00AD"), ("a%F3%A0%80%81b", "U+E0001"),  # SOFT HYPHEN, LANGUAGE TAG
    ("a%EF%BF%BEb", "U+FFFE"), ("a%EF%B7%90b", "U+FDD0"), ("a%F0%9F%BF%BFb", "U+1FFFF"),  # noncharacters
    ("%F0%9F%98%80" * 64, "256 bytes"),  # 64 emoji: 256 bytes of UTF-8
    ("%C3%A9" * 128, "256 bytes"),
])
async def test_names_that_show_back_wrongly_are_400_saying_why(client, name, says) -> None:
    up = Uploads(client)
    batch = await up.create()
    r = await client.post(up.url(f"/{batch}/0"), data=b"x", headers={**AUTH, "X-File-Name": name})
    body = await assert_error(r, 400, "ERR_FILE_NAME_INVALID")
    assert says in body["message"], body
    assert (await up.info(batch)).status == 204  # nothing recorded


async def test_names_up_to_255_bytes_and_the_joiners_are_kept(client) -> None:
    up = Uploads(client)
    batch = await up.create()
    names = ["\U0001F600" * 63 + "abc",  # 255 bytes
             "é" * 127 + "x",  # 255 bytes
             "می\u200cخواهم.txt",  # Persian: ZERO WIDTH NON-JOINER is part of the spelling
             "\U0001F468\u200d\U0001F469\u200d\U0001F467.png",  # an emoji family: ZERO WIDTH JOINERs
             "a b.txt"]
    for idx, name in enumerate(names):
        await up.upload(batch, idx, b"d", name)
    assert [f["name"] for f in (await up.manifest(batch))["files"]] == names


# -- media types ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["täxt/plain", "é/x", "not a type", "text", "text/", "/plain", "text/plain;;x",
                                 "text/plain; charset", "text/pl ain", 'text/plain; a="b'])
async def test_an_x_file_type_that_is_no_media_type_is_400(client, bad) -> None:
    up = Uploads(client)
    batch = await up.create()
    h = {**AUTH, "X-File-Name": "a.txt", "X-File-Type": bad}
    body = await assert_error(await client.post(up.url(f"/{batch}/0"), data=b"x", headers=h), 400,
                              "ERR_FILE_TYPE_INVALID")
    assert "media type" in body["message"]
    assert (await up.info(batch)).status == 204


@pytest.mark.parametrize(("name", "file_type", "content_type", "stored"), [
    ("a.bin", "text/plain; charset=utf-8", None, "text/plain; charset=utf-8"),
    ("a.bin", 'application/x-thing; a="b c"; d=e', None, 'application/x-thing; a="b c"; d=e'),
    ("a.bin", "application/vnd.ms-excel", None, "application/vnd.ms-excel"),
    ("noext", None, "not a type", "application/octet-stream"),  # passed over, as a form's type is
    ("noext", None, "täxt/plain", "application/octet-stream"),
    ("noext", None, "é/x", "application/octet-stream"),
    ("a.txt", None, "not a type", "text/plain"),
    ("noext", None, "image/png; q=1", "image/png"),
])
async def test_only_media_types_are_stored(client, name, file_type, content_type, stored) -> None:
    up = Uploads(client)
    batch = await up.create()
    h = {**AUTH, "X-File-Name": name}
    if file_type is not None:
        h["X-File-Type"] = file_type
    if content_type is not None:
        h["Content-Type"] = content_type
    r = await client.post(up.url(f"/{batch}/0"), data=b"x", headers=h)
    assert r.status == 201, await r.text()
    assert (await (await up.info(batch, 0)).json())["mimetype"] == stored


# -- fileIdx ------------------------------------------------------------------------------------
@pytest.mark.parametrize("idx", ["1%1F", "1%1C", "%1E1", "1%0A", "%C2%A01", "1%C2%85", "%E2%80%831"])
async def test_a_file_idx_with_a_control_or_unicode_space_is_400(client, idx) -> None:
    up = Uploads(client)
    batch = await up.create()
    await up.upload(batch, 1, b"kept")
    h = {**AUTH, "X-File-Name": "a", "X-File-Size": "3"}
    for method, path in [("POST", f"/{batch}/{idx}"), ("GET", f"/{batch}/{idx}"), ("DELETE", f"/{batch}/{idx}"),
                         ("POST", f"/{batch}/{idx}/execute/Batch.Manifest")]:
        r = await client.request(method, up.url(path), data=b"abc", headers=h)
        await assert_error(r, 400, "ERR_FILE_IDX_INVALID")
    legacy = {**AUTH, "Content-Type": "application/json"}
    params = {"operationId": "Batch.Manifest", "batchId": batch, "fileIdx": urllib.parse.unquote(idx)}
    await assert_error(await client.post("/site/automation/batch/execute", json={"params": params}, headers=legacy),
                       400, "ERR_FILE_IDX_INVALID")
    assert (await up.manifest(batch))["files"] == [{"fileIdx": "1", "name": "f.bin", "size": 4,
                                                    "sha256": sha256(b"kept")}]


async def test_a_file_idx_with_spaces_around_it_is_that_index(client) -> None:
    up = Uploads(client)
    batch = await up.create()
    r = await client.post(up.url(f"/{batch}/%201%09"), data=b"abc", headers={**AUTH, "X-File-Name": "a"})
    assert r.status == 201 and (await r.json())["fileIdx"] == "1"


async def test_a_legacy_x_file_idx_missing_or_malformed_is_400_naming_the_header(client) -> None:
    """The legacy form's file index is a header: its 400 names it, as X-Batch-Id's does (it
    said "fileIdx must be a non-negative integer", a name the request did not carry); nothing
    is made (the first upload would have created the batch)."""
    base = {**AUTH, **upload_headers("a.txt", 3), "X-Batch-Id": "legacy-idx"}
    for value in (None, "x", "-1", "1234567890"):
        h = base if value is None else {**base, "X-File-Idx": value}
        body = await assert_error(await client.post("/site/automation/batch/upload", data=b"abc", headers=h),
                                  400, "ERR_FILE_IDX_INVALID")
        assert "X-File-Idx" in body["message"], body
        assert ("required" in body["message"]) == (value is None), body
    await assert_error(await client.get("/site/automation/batch/files/legacy-idx", headers=AUTH), 404,
                       "ERR_BATCH_NOT_FOUND")
    # The legacy execute's params.fileIdx is named as its params.batchId is.
    r = await client.post("/api/v1/upload", headers=AUTH)
    batch = (await r.json())["batchId"]
    params = {"operationId": "Batch.Manifest", "batchId": batch, "fileIdx": "x"}
    body = await assert_error(await client.post("/site/automation/batch/execute", json={"params": params},
                                                headers=AUTH), 400, "ERR_FILE_IDX_INVALID")
    assert "params.fileIdx" in body["message"], body
