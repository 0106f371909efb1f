"""Upload batches: store (paths, chunk files), service (receive, assemble, list, drop), operations.

No ``aiohttp.web`` import here: HTTP lives in ``server.api``.
"""
