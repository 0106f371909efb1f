"""Smartlink job endpoints: ``/api/batch/<batch_id>/start`` and friends.

(Issue 3 fills this in.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

ROUTES: list[web.RouteDef] = []


async def jobs_context(app: web.Application) -> AsyncIterator[None]:
    yield
