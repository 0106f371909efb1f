"""The start's template check (``server.jobs.checker``) in real render processes: fair between
API keys (one key's slow templates do not hold up another key's start), and bounded per key."""

from __future__ import annotations

import asyncio
import time

from server.app import create_app
from server.jobs.checker import CHECKS_WAITING
from server.keys import JOBS
from tests.conftest import OTHER_KEY
from tests.support.jobs import SEED_ROWS, start
from tests.support.waiting import async_wait_until

# Folding this while compiling takes far longer than any FILEDROP_RENDER_TIMEOUT below.
SLOW = {"body": '{{ "ab "|center(600000)|wordwrap(2) }}'}
TRIVIAL = {"body": "<p>{{ data.n }}</p>"}
OTHER = {"X-API-Key": OTHER_KEY}


async def checks_queued(client, n: int) -> None:  # type: ignore[no-untyped-def]
    checker = client.app[JOBS].checker

    async def queued() -> bool:
        return checker.checks >= n

    await async_wait_until(queued, timeout=30, what=f"{n} template checks running or waiting")


async def test_one_keys_slow_checks_do_not_hold_up_another_keys_start(aiohttp_client, settings) -> None:
    timeout = 3.0
    client = await aiohttp_client(create_app(settings.replace(render_timeout=timeout)))
    slow = [asyncio.create_task(start(client, f"slow{i}", SLOW, SEED_ROWS, headers=OTHER)) for i in range(3)]
    await checks_queued(client, 3)
    # One at a time for everyone, the trivial start answered after the three slow ones: 9 s.
    t0 = time.monotonic()
    r = await start(client, "trivial", TRIVIAL, SEED_ROWS)
    took = time.monotonic() - t0
    assert r.status == 202, await r.text()
    assert took < timeout, f"the other key's start took {took:.1f} s"
    for resp in await asyncio.gather(*slow):
        body = await resp.json()
        assert resp.status == 422, body
        assert body["message"] == ("document_file: cannot be compiled within the limits: compiling took longer "
                                   f"than FILEDROP_RENDER_TIMEOUT ({timeout:g} s)"), body


async def test_a_key_with_too_many_checks_waiting_is_told_the_limit(aiohttp_client, settings) -> None:
    client = await aiohttp_client(create_app(settings.replace(render_timeout=0.5)))
    slow = [asyncio.create_task(start(client, f"slow{i}", SLOW, SEED_ROWS, headers=OTHER))
            for i in range(1 + CHECKS_WAITING)]
    await checks_queued(client, 1 + CHECKS_WAITING)
    r = await start(client, "one-more", SLOW, SEED_ROWS, headers=OTHER)
    body = await r.json()
    assert (r.status, body["code"]) == (503, "ERR_SERVER_BUSY"), body
    assert f"at most {CHECKS_WAITING} may wait" in body["message"], body
    assert "FILEDROP_RENDER_TIMEOUT" in body["message"], body
    # Another key is not counted with it.
    r = await start(client, "trivial", TRIVIAL, SEED_ROWS)
    assert r.status == 202, await r.text()
    statuses = [resp.status for resp in await asyncio.gather(*slow)]
    assert statuses == [422] * (1 + CHECKS_WAITING)
