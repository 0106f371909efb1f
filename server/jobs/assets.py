"""What a job's pages embed or copy besides the template: remote assets (``mixed``: scripts;
``original``: scripts, styles, the PDF) and upload-batch files (``"pdf": "batch:<fileIdx>"``).
Workers resolve them; render processes read them.

Invariants:
* A fetched asset is streamed to ``<data_dir>/assets/<job_id>/<sha256 of the URL>``, never held
  whole in a worker's memory; render processes keep at most ``FILEDROP_JOB_ASSET_MEMORY`` bytes
  of them in memory and read the rest from disk.
* Fetched once per job and URL, however many workers render the job: the first to need it
  takes an exclusive ``flock`` on ``<sha>.lock``, fetches, renames the file into place (or
  writes ``<sha>.error`` with the reason, so a failed fetch errors the rows that need it and
  is not retried per row); the others wait for the lock and find the result.
* A fetch abandoned (the runner cancels it when the job is cancelled or the worker stops)
  leaves no asset file and no ``.error``: whoever needs the asset next fetches it.
* The job's directory goes when the job ends (``release``), and with it every asset.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from server.config import Settings
from server.errors import FiledropError
from server.jobs.fetch import Fetcher, FetchError
from server.jobs.render import Asset

log = logging.getLogger("filedrop.jobs.worker")

LOCK_POLL = 0.05  # another worker is fetching the asset: look again this often (a fetch is bounded)


class UploadFiles(Protocol):
    """What jobs need of the upload service (handed to them by whoever wires the process:
    ``app.py`` in the API, ``filedrop worker`` in a worker): a complete file's ``path`` and
    ``size``, or an error with a ``message``."""

    async def open_file(self, owner: str, batch_id: str, file_idx: int) -> Any: ...


@dataclass(frozen=True)
class JobRef:
    job_id: str
    owner: str
    upload_batch_id: str | None


Note = Callable[[str, str, str], Awaitable[None]]  # (job_id, level, message): the job's log


def job_dir(settings: Settings, job_id: str) -> Path:
    return settings.assets_dir / job_id


def release(settings: Settings, job_id: str) -> None:
    """Remove a job's fetched assets (blocking; the job has ended)."""
    shutil.rmtree(job_dir(settings, job_id), ignore_errors=True)


class Assets:
    def __init__(self, settings: Settings, fetcher: Fetcher, files: UploadFiles | None, note: Note) -> None:
        self.settings = settings
        self.fetcher = fetcher
        self.files = files
        self.note = note
        # (job_id, "url:...") -> its lock and how many resolves use it; an entry goes with its
        # last user (a job with a URL per row would otherwise leave one per row, for ever).
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}

    async def resolve(self, job: JobRef, keys: Iterable[str]) -> dict[str, Asset]:
        keys = list(dict.fromkeys(keys))
        found = await asyncio.gather(*(self._one(job, k) for k in keys))
        return dict(zip(keys, found, strict=True))

    async def _one(self, job: JobRef, key: str) -> Asset:
        if key.startswith("url:"):
            async with self._one_at_a_time((job.job_id, key)):
                return await self._fetched(job, key[4:])
        idx = int(key.split(":", 1)[1])
        if self.files is None or job.upload_batch_id is None:
            return Asset(error=f"{key}: this job has no upload batch")
        try:
            info = await self.files.open_file(job.owner, job.upload_batch_id, idx)
        except FiledropError as e:  # its message names the file and the batch
            return Asset(error=f"{key}: {e.message}")
        except Exception as e:  # not the client's doing (a database fault, a bug): said with a traceback
            log.exception("job %s: %s of upload batch %s could not be opened", job.job_id, key, job.upload_batch_id)
            return Asset(error=f"{key}: file {idx} of upload batch {job.upload_batch_id}: {e}")
        return Asset(path=str(info.path), size=int(info.size))

    @contextlib.asynccontextmanager
    async def _one_at_a_time(self, k: tuple[str, str]) -> AsyncIterator[None]:
        """One resolve of ``k`` at a time in this worker (the others then find its result
        without polling its ``flock``). ``_locks`` holds ``k`` only while someone uses it."""
        lock, users = self._locks.get(k) or (asyncio.Lock(), 0)
        self._locks[k] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[k]
            if users == 1:
                del self._locks[k]
            else:
                self._locks[k] = (lock, users - 1)

    async def _fetched(self, job: JobRef, url: str) -> Asset:
        d = job_dir(self.settings, job.job_id)
        base = d / hashlib.sha256(url.encode("utf-8")).hexdigest()
        known = _known(base)
        if known is not None:
            return known
        await asyncio.to_thread(d.mkdir, parents=True, exist_ok=True)
        fd = os.open(f"{base}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            while True:  # bounded: the holder's fetch ends within FILEDROP_FETCH_TIMEOUT
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                await asyncio.sleep(LOCK_POLL)
            known = _known(base)
            if known is not None:
                return known
            return await self._fetch(job, url, base)
        finally:
            os.close(fd)  # releases the lock

    async def _fetch(self, job: JobRef, url: str, base: Path) -> Asset:
        tmp = base.with_name(f".{base.name}.{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "wb") as out:
                size = await self.fetcher.download(url, out)
            os.replace(tmp, base)
        except FetchError as e:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            err = base.with_name(base.name + ".error")
            _write_atomic(err, str(e).encode("utf-8"))
            await self.note(job.job_id, "error", f"asset {url}: {e}")
            return Asset(error=str(e))
        except BaseException:  # cancelled (its job was, or the worker stops): no result, no temp
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        await self.note(job.job_id, "info", f"asset {url}: {size} bytes fetched")
        return Asset(path=str(base), size=size)


def _known(base: Path) -> Asset | None:
    """The asset a worker already resolved (a file, or the reason it could not be had)."""
    try:
        return Asset(path=str(base), size=base.stat().st_size)
    except FileNotFoundError:
        pass
    try:
        return Asset(error=base.with_name(base.name + ".error").read_text("utf-8"))
    except FileNotFoundError:
        return None


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
