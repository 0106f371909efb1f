"""Upload endpoints: legacy ``/site/automation/batch/...`` and REST ``/api/v1/upload/...``.

(Issue 2 fills this in.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

ROUTES: list[web.RouteDef] = []


async def uploads_context(app: web.Application) -> AsyncIterator[None]:
    yield
