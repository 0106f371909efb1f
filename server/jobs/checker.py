"""The start's template check, outside the API process.

Compiling a Jinja2 template runs code the client chose (constant folding calls operators and
filters: ``{{ 'x' | center(10 ** 9) }}``), so the API process never does it. Warm render
processes (``server.jobs.child``, limited like the workers' own) compile the master smartlink:
at most ``FILEDROP_CHECK_PROCESSES`` of them, each started when a check needs it and kept, and
killed and replaced when a check goes over ``FILEDROP_RENDER_TIMEOUT`` or dies over
``FILEDROP_RENDER_MEMORY``: the start then answers 422 naming the limit.

Fair between API keys (owners): a key has at most one check running; its other checks wait
behind that one (at most ``CHECKS_WAITING``; one more is a 503 naming the limit), and a process
that frees up goes to the next key in turn (round robin), not to the oldest check. So one key's
slow templates delay its own starts only: another key's check waits at most for one check of
each other key that is checking, and not at all while a process is free (with the default two
processes, one busy key leaves one free).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque

from server.config import Settings
from server.errors import ServerBusy, ServiceUnavailable
from server.jobs.childproc import ChildGone, RenderProcess
from server.jobs.contract import TemplateInvalid

# A key's checks waiting behind its running one. Each may take FILEDROP_RENDER_TIMEOUT (10 s):
# the last of them answers within NGINX's 300 s even while other keys take their turns.
CHECKS_WAITING = 8
SHUTTING_DOWN = "the server is shutting down, retry shortly"


class TemplateChecker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._idle: list[RenderProcess] = []  # warm, checking nothing
        self._busy: set[RenderProcess] = set()
        # Keys with a check running (or its process starting): one each, at most
        # ``check_processes`` together, so there is always a process for each of them.
        self._running: set[str] = set()
        # key -> its waiting checks, oldest first; the dict's order is whose turn comes next.
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}
        self._stopping = False

    @property
    def checks(self) -> int:
        """Checks running or waiting now."""
        return len(self._running) + sum(len(q) for q in self._waiting.values())

    @property
    def pids(self) -> list[int]:
        """Render processes kept, running a check or not."""
        return sorted(c.pid for c in (*self._idle, *self._busy))

    def stop_now(self) -> None:
        """The server is stopping: checks under way end at once (503), none starts."""
        self._stopping = True
        for child in (*self._idle, *self._busy):
            child.kill()
        for queue in self._waiting.values():
            for fut in queue:
                if not fut.done():
                    fut.set_exception(ServiceUnavailable(SHUTTING_DOWN))
        self._waiting.clear()

    async def check(self, template: str, owner: str = "") -> None:
        """Compile ``template`` (canonical master JSON) in a checker process, in ``owner``'s turn;
        raise ``TemplateInvalid`` with the reason (a syntax error, or a limit it went over), or
        ``ServerBusy`` when ``owner`` has ``CHECKS_WAITING`` checks waiting already."""
        if self._stopping:
            raise ServiceUnavailable(SHUTTING_DOWN)
        await self._turn(owner)
        try:
            await self._check(template)
        finally:
            self._running.discard(owner)
            self._next()

    async def _turn(self, owner: str) -> None:
        """Return when ``owner`` may run a check (a process is kept for it)."""
        if owner not in self._running and owner not in self._waiting and \
                len(self._running) < self.settings.check_processes:
            self._running.add(owner)
            return
        queue = self._waiting.setdefault(owner, deque())
        if len(queue) >= CHECKS_WAITING:
            t = self.settings.render_timeout
            # Retry-After: the running check has answered within one FILEDROP_RENDER_TIMEOUT (it is
            # killed then), letting the next one in; a retry after 1 s would most likely be refused again.
            raise ServerBusy(f"this API key has {len(queue)} job starts waiting for their template check behind "
                             f"the one running (at most {CHECKS_WAITING} may wait; each check takes up to "
                             f"FILEDROP_RENDER_TIMEOUT, {t:g} s): retry when one has answered",
                             headers={"Retry-After": str(max(1, math.ceil(t)))})
        turn = asyncio.get_running_loop().create_future()
        queue.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # its turn came, but the caller went away
                self._running.discard(owner)
                self._next()
            else:
                left = self._waiting.get(owner)
                if left is not None and turn in left:
                    left.remove(turn)
                    if not left:
                        del self._waiting[owner]
            raise

    def _next(self) -> None:
        """Give free processes to waiting keys, each key in turn."""
        for owner in list(self._waiting):
            if len(self._running) >= self.settings.check_processes:
                return
            if owner in self._running:
                continue
            queue = self._waiting.pop(owner)
            turn = queue.popleft()
            if queue:
                self._waiting[owner] = queue  # to the back: the other keys' turns come first
            self._running.add(owner)
            turn.set_result(None)

    async def _check(self, template: str) -> None:
        t = self.settings.render_timeout
        child = self._idle.pop() if self._idle else None
        if child is None or not child.alive:
            if child is not None:
                await child.close()
            child = await RenderProcess.start(self.settings)
        self._busy.add(child)
        keep = False
        try:
            if self._stopping:
                raise ServiceUnavailable(SHUTTING_DOWN)
            try:
                await child.send({"op": "check", "template": template})
                header, _ = await child.recv(t)
            except TimeoutError:
                raise TemplateInvalid(f"cannot be compiled within the limits: compiling took longer than "
                                      f"FILEDROP_RENDER_TIMEOUT ({t:g} s)") from None
            except ChildGone as e:
                if self._stopping:
                    raise ServiceUnavailable(SHUTTING_DOWN) from None
                raise TemplateInvalid(f"cannot be compiled within the limits: the render process died (exit "
                                      f"status {e.returncode}; FILEDROP_RENDER_MEMORY is "
                                      f"{self.settings.render_memory:,} bytes)") from None
            if header.get("status") == "limit":  # it said so, and exits
                raise TemplateInvalid(f"cannot be compiled within the limits: {header.get('error')}")
            keep = True
            if not header.get("ok"):
                raise TemplateInvalid(str(header.get("error")))
        finally:
            # A process that timed out may still be compiling (and one whose caller went away
            # mid-check may answer late): its answer must not be read as the next check's.
            self._busy.discard(child)
            if keep and not self._stopping:
                self._idle.append(child)
            else:
                child.kill()
                await child.close()

    async def close(self) -> None:
        children = [*self._idle, *self._busy]
        self._idle.clear()
        self._busy.clear()
        for child in children:
            await child.close()
