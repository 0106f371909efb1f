"""``GET /api/limits``: what a client must know before it uploads (the drop page asks first).

It needs a key like every API call, so the page also uses it to check the key it was given
(401: the key was refused). Values come from Settings; ``chunkSize`` is the size the page cuts
files into (``FILEDROP_CHUNK_SIZE``, never above ``maxChunkSize``), unless a file would then need
more than ``maxChunksPerFile`` chunks (the page then cuts it into bigger ones).
"""

from __future__ import annotations

from aiohttp import web

from server.keys import SETTINGS


async def get_limits(request: web.Request) -> web.Response:
    s = request.app[SETTINGS]
    return web.json_response({
        "chunkSize": s.upload_chunk_size,
        "maxChunkSize": s.max_chunk_size,
        "maxFileSize": s.max_file_size,
        "maxFilesPerBatch": s.max_files_per_batch,
        "maxBatchBytes": s.max_batch_bytes,
        "maxDataSize": s.max_data_size,
        "maxChunksPerFile": s.max_chunks_per_file,
    })


ROUTES: list[web.RouteDef] = [web.route("GET", "/api/limits", get_limits)]
