"""Cleanup plan/apply, used by the CLI and by the periodic in-server janitor.

(Issue 5 fills this in.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web


async def janitor_context(app: web.Application) -> AsyncIterator[None]:
    yield
