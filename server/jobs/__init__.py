"""Smartlink jobs: the service the API calls, the workers that render (each with one limited
render process), the sandboxed render, atomic publishing, notifications, the fetch guard.

No ``aiohttp.web`` import here: HTTP lives in ``server.api``. User templates are compiled and
rendered only in render processes (``server.jobs.child``).
"""
