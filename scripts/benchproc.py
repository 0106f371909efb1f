"""Benchmarks' view of processes (Linux ``/proc``): the CPU time of one process, or of a process
and everything it started (a server, its workers, their render processes)."""

from __future__ import annotations

import os
from pathlib import Path


def _stat(pid: int | str) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (which may hold spaces):
    ``[1]`` is the parent's pid, ``[11]`` and ``[12]`` user and system time in clock ticks."""
    return Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid``."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> tuple[float, float]:
    """(user + system, system) CPU seconds used so far by ``pid`` and its live descendants;
    (0, 0) where there is no ``/proc``."""
    procs: dict[int, tuple[int, int, int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if entry.isdigit():
            try:
                fields = _stat(entry)
            except OSError:  # ended meanwhile
                continue
            procs[int(entry)] = (int(fields[1]), int(fields[11]), int(fields[12]))
    keep, grew = {pid}, True
    while grew:
        grew = False
        for p, (ppid, _u, _s) in procs.items():
            if ppid in keep and p not in keep:
                keep.add(p)
                grew = True
    tick = os.sysconf("SC_CLK_TCK")
    user = sum(procs[p][1] for p in keep if p in procs) / tick
    system = sum(procs[p][2] for p in keep if p in procs) / tick
    return user + system, system
