"""An execute body is read whole, so aiohttp's own limit (``client_max_size``) refuses one that is
too long; NGINX lets /api/v1/ bodies through up to FILEDROP_MAX_CHUNK_SIZE (64 MiB against the
51 MiB limit by default), so the app's answer is the one a client sees: a 413 in the catalog's
shape naming the limit and its setting, the batch intact."""

from __future__ import annotations

import dataclasses
import io

import pytest

from server.app import create_app
from server.config import Settings
from tests.conftest import AUTH
from tests.support.uploads import Uploads, assert_error

pytestmark = [pytest.mark.timeout(60)]
GOOD = b"the good file"


@pytest.mark.parametrize("route", ["rest", "legacy"])
async def test_an_execute_body_over_the_limit_is_a_413_naming_it(aiohttp_client, settings: Settings,
                                                                   route: str) -> None:
    # FILEDROP_MAX_DATA_SIZE under 1 MiB: the limit is its floor, 1 MiB + 1 MiB (a short body).
    app = create_app(dataclasses.replace(settings, max_data_size=512 << 10))
    limit = 2 << 20
    client = await aiohttp_client(app)
    up = Uploads(client)
    batch = await up.create()
    await up.upload(batch, 0, GOOD, "good.txt")
    body = b'{"params": {"batchId": "' + batch.encode() + b'", "x": "' + b"y" * limit + b'"}}'
    url = up.url(f"/{batch}/execute/Batch.Manifest") if route == "rest" else "/site/automation/batch/execute"
    r = await client.post(url, data=io.BytesIO(body), headers={**AUTH, "Content-Type": "application/json"})
    err = await assert_error(r, 413, "ERR_TOO_LARGE")
    assert str(limit) in err["message"] and "FILEDROP_MAX_DATA_SIZE" in err["message"], err
    manifest = await up.manifest(batch)
    assert [f["name"] for f in manifest["files"]] == ["good.txt"]
