"""Smartlink jobs: service, worker pool, sandboxed render, atomic publish, notify, fetch guard.

No ``aiohttp.web`` import here: HTTP lives in ``server.api``.
"""
