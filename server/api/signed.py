"""Signed URLs that expire (issue 11, seed 004's flow): the routes that take them, the handlers of
the data PUT, the presign route, and the job result's download link. Thin handlers over the job
service, the upload service and ``server.signing``.

* ``PUT /api/batch/{batch_id}/{job_id}/data``: the one PUT of the rows of a job started with
  ``data_upload=url`` (its ``upload_URL``). Streamed, at most ``FILEDROP_MAX_DATA_SIZE``.
* ``POST /api/v1/upload/{batch_id}/{file_idx}/presign`` -> ``{"upload_URL", "expires"}``: a PUT to
  that URL is the upload API's own ``upload_file`` (``server.api.uploads``, the same parsing,
  limits and checks as a POST with the key), without the key.
* ``GET /api/batch/{batch_id}/{job_id}/result?format=url`` -> ``{"download_url", "expires"}``; the
  link is the result route itself with ``format=csv``, signed. Behind NGINX (which says so with
  ``X-Filedrop-Accel``) the app answers ``X-Accel-Redirect`` to an internal location over the
  results dir and NGINX sends the file from disk; straight to the app, the app sends it.

Each of these routes also takes the key (it then acts as that key's owner).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from aiohttp import web
from sqlalchemy import select

from server.api import uploads as uploads_api
from server.db.models import Batch
from server.errors import BatchIdInvalid, BatchNotFound, DataTooLarge
from server.jobs.contract import BATCH_ID_RE
from server.jobs.results import SUFFIX
from server.jobs.states import iso
from server.keys import DATABASE, JOBS, OWNER, SETTINGS, SIGNER, OwnerLookup
from server.signing import RESULT_PATH, Link, expiry_after, parse_expires_in

ACCEL_HEADER = "X-Filedrop-Accel"  # set by nginx.conf on every proxied request (a client's is replaced)
ACCEL_RESULTS = "/.filedrop/results/"  # nginx.conf's internal location over <data_dir>/results/
DATA_PATH = "/api/batch/{batch_id}/{job_id}/data"
UPLOAD_PATH = "/api/v1/upload/{batch_id}/{file_idx}"


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=lambda o: json.dumps(o, ensure_ascii=False))


def link_body(link: Link, name: str) -> dict[str, str]:
    return {name: link.url, "expires": iso(link.expires) or ""}


async def upload_link(request: web.Request, batch_id: str, job_id: str, expires: datetime) -> dict[str, str]:
    """``upload_URL`` and ``expires`` of a job that waits for its data (the start's answer)."""
    link = await request.app[SIGNER].link("PUT", DATA_PATH.format(batch_id=batch_id, job_id=job_id),
                                          request[OWNER], expires)
    return link_body(link, "upload_URL")


async def _read_data(request: web.Request, limit: int) -> bytes:
    """The body, streamed and counted: never more than ``limit`` bytes held, whatever
    Content-Length says (or without one: chunked)."""
    too_large = f"data is over the {limit}-byte limit (FILEDROP_MAX_DATA_SIZE)"
    if request.content_length is not None and request.content_length > limit:
        raise DataTooLarge(too_large)
    buf = bytearray()
    async for chunk in request.content.iter_chunked(1 << 16):
        buf += chunk
        if len(buf) > limit:
            raise DataTooLarge(too_large)
    return bytes(buf)


async def put_job_data(request: web.Request) -> web.Response:
    m = request.match_info
    jobs = request.app[JOBS]
    # Refused before the body is read when the job takes no data (a second PUT, an expired job).
    await jobs.check_waiting(request[OWNER], m["batch_id"], m["job_id"])
    data = await _read_data(request, request.app[SETTINGS].max_data_size)
    return _json(await jobs.receive_data(request[OWNER], m["batch_id"], m["job_id"], data), 201)


async def presign_upload(request: web.Request) -> web.Response:
    batch_id = uploads_api.check_batch_id(request.match_info["batch_id"])
    file_idx = uploads_api.parse_file_idx(request.match_info["file_idx"])
    settings = request.app[SETTINGS]
    ttl = parse_expires_in(request.query.get("expires_in"), settings.upload_url_ttl, settings.max_url_ttl)
    owner = request[OWNER]
    if await _upload_batch_owner(request.app, {"batch_id": batch_id}, open_only=True) != owner:
        raise BatchNotFound(f"batch {batch_id} not found")
    link = await request.app[SIGNER].link("PUT", UPLOAD_PATH.format(batch_id=batch_id, file_idx=file_idx), owner,
                                          expiry_after(ttl))
    return _json(link_body(link, "upload_URL"))


async def result_url(request: web.Request) -> web.Response:
    """``?format=url``: a signed link to the ended job's result as CSV."""
    m = request.match_info
    settings = request.app[SETTINGS]
    ttl = parse_expires_in(request.query.get("expires_in"), settings.download_url_ttl, settings.max_url_ttl)
    await request.app[JOBS].result_file(request[OWNER], m["batch_id"], m["job_id"])  # ended? (and the file made)
    link = await request.app[SIGNER].result_link(m["batch_id"], m["job_id"], request[OWNER], expiry_after(ttl))
    return _json(link_body(link, "download_url"))


async def download_result(request: web.Request) -> web.StreamResponse:
    """A signed download of the result CSV: by NGINX from disk when it is in front, else here."""
    m = request.match_info
    path = await request.app[JOBS].result_file(request[OWNER], m["batch_id"], m["job_id"])
    headers = {"Content-Type": "text/csv; charset=utf-8", "Cache-Control": "private, no-store",
               "Content-Disposition": f'attachment; filename="{m["job_id"]}{SUFFIX}"'}
    if request.headers.get(ACCEL_HEADER) == "results":
        return web.Response(headers={**headers, "X-Accel-Redirect": ACCEL_RESULTS + path.name})
    return web.FileResponse(path, headers=headers)


# -- who a signed URL acts for -------------------------------------------------------------------
# Each lookup runs before any handler has checked the path, for requests without a key: a name
# the API would refuse is no resource's (None), and never reaches the database (PostgreSQL
# refuses a NUL in a query parameter: that was a 500).
async def _job_owner(app: web.Application, match: Mapping[str, str]) -> str | None:
    if not BATCH_ID_RE.match(match["batch_id"]):
        return None
    return await app[JOBS].owner_of(match["batch_id"], match["job_id"])


async def _upload_batch_owner(app: web.Application, match: Mapping[str, str], open_only: bool = False) -> str | None:
    """The owner of an upload batch (None: no such batch). A dropped one's too, for a signed PUT:
    the upload service then refuses it with 404 as it would a POST with the key."""
    try:
        uploads_api.check_batch_id(match["batch_id"])
    except BatchIdInvalid:
        return None
    # A read of the batch row: the upload service has no owner lookup of its own (issue 9 reworks it).
    async with app[DATABASE].read() as s:
        row = (await s.execute(select(Batch.owner, Batch.state).where(Batch.batch_id == match["batch_id"]))).first()
    if row is None or (open_only and row.state != "open"):
        return None
    return str(row.owner)


SIGNED_ROUTES: dict[tuple[str, str], OwnerLookup] = {
    ("PUT", DATA_PATH): _job_owner,
    ("PUT", UPLOAD_PATH): _upload_batch_owner,
    ("GET", RESULT_PATH): _job_owner,
}

ROUTES: list[web.RouteDef] = [
    web.put(DATA_PATH, put_job_data),
    # The upload API's own handler: a presigned PUT is an upload as a POST with the key is.
    web.put(UPLOAD_PATH, uploads_api.upload_file),
    web.post("/api/v1/upload/{batch_id}/{file_idx}/presign", presign_upload),
]
