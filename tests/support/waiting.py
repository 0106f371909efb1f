"""Bounded waiting: poll a predicate with a deadline, never sleep a fixed time for work."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def free_port(*avoid: int) -> int:
    """A port free on 127.0.0.1 now, none of ``avoid``: the kernel may hand out a port again as
    soon as its socket is closed, so two calls in a row can return the same one."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port
    raise AssertionError(f"no free port other than {avoid} in 50 tries")


def free_ports_in_a_row(n: int) -> int:
    """The first of ``n`` consecutive ports free on 127.0.0.1 now (FILEDROP_APP_PROCESSES's
    layout), drawn below the kernel's ephemeral range (32768-60999 here) so that outgoing
    connections of this busy machine do not take one of them before the server binds it."""
    low, high = 20000, 32000
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low_eph = int(f.read().split()[0])
        high = min(high, low_eph) - n
    except (OSError, ValueError):
        pass
    for _ in range(200):
        first = random.randrange(low, high)
        socks = []
        try:
            for p in range(first, first + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError(f"no {n} consecutive free ports in {low}-{high} after 200 tries")


def wait_until(pred: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = "condition") -> T:
    """Call ``pred`` until it returns a truthy value or the deadline passes (then AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)  # poll interval under a deadline


async def async_wait_until(pred: Callable[[], Awaitable[T]], timeout: float = 10.0, interval: float = 0.02,
                           what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = await pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)  # poll interval under a deadline
