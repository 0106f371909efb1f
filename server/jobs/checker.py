"""The start's template check, outside the API process.

Compiling a Jinja2 template runs code the client chose (constant folding calls operators and
filters: ``{{ 'x' | center(10 ** 9) }}``), so the API process never does it. A warm render
process (``server.jobs.child``, limited like the workers' own) compiles the master smartlink;
it is started on the first check and kept, and killed and replaced when a check goes over
``FILEDROP_RENDER_TIMEOUT`` or dies over ``FILEDROP_RENDER_MEMORY``: the start then answers
422 naming the limit. Checks are served one at a time.
"""

from __future__ import annotations

import asyncio
import logging

from server.config import Settings
from server.errors import ServiceUnavailable
from server.jobs.childproc import ChildGone, RenderProcess
from server.jobs.contract import TemplateInvalid

log = logging.getLogger("filedrop.jobs.checker")


class TemplateChecker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._child: RenderProcess | None = None
        self._lock = asyncio.Lock()
        self._stopping = False

    def stop_now(self) -> None:
        """The server is stopping: a check under way ends at once (503), none starts."""
        self._stopping = True
        if self._child is not None:
            self._child.kill()

    async def check(self, template: str) -> None:
        """Compile ``template`` (canonical master JSON) in the checker process; raise
        ``TemplateInvalid`` with the reason (a syntax error, or a limit it went over)."""
        t = self.settings.render_timeout
        async with self._lock:
            if self._stopping:
                raise ServiceUnavailable("the server is shutting down, retry shortly")
            if self._child is None or not self._child.alive:
                self._child = await RenderProcess.start(self.settings)
            child = self._child
            try:
                await child.send({"op": "check", "template": template})
                header, _ = await child.recv(t)
            except asyncio.CancelledError:
                # The caller went away mid-check: this process may still be compiling, and its
                # late answer must not be read as the next check's.
                self._child = None
                child.kill()
                raise
            except TimeoutError:
                await self._drop()
                raise TemplateInvalid(f"cannot be compiled within the limits: compiling took longer than "
                                      f"FILEDROP_RENDER_TIMEOUT ({t:g} s)") from None
            except ChildGone as e:
                await self._drop()
                if self._stopping:
                    raise ServiceUnavailable("the server is shutting down, retry shortly") from None
                raise TemplateInvalid(f"cannot be compiled within the limits: the render process died (exit "
                                      f"status {e.returncode}; FILEDROP_RENDER_MEMORY is "
                                      f"{self.settings.render_memory:,} bytes)") from None
            if header.get("status") == "limit":  # it said so, and exits
                await self._drop()
                raise TemplateInvalid(f"cannot be compiled within the limits: {header.get('error')}")
            if not header.get("ok"):
                raise TemplateInvalid(str(header.get("error")))

    async def _drop(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            await child.close()

    async def close(self) -> None:
        await self._drop()
