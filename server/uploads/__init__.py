"""Upload batches: the service (``service``), group commit (``recorder``, ``ledger``), bytes on disk
(``store``), completing files (``assembly``), durability (``durability``), and the execute
registry (``operations``).

No ``aiohttp.web`` import here: HTTP lives in ``server.api``.
"""
