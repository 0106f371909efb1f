"""A child process that must not outlive its parent (Linux ``PR_SET_PDEATHSIG``): render
processes die with their worker (SIGKILL: nothing of theirs must go on), workers started by
``filedrop serve`` stop with it (SIGTERM: they hand their rows back first). Light on purpose:
render processes import it before anything else."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int, signum: int) -> None:
    """Get ``signum`` when the parent (pid ``parent``) dies; at once if it already has."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the parent's own stop still ends us
        pass
    if os.getppid() != parent:  # it died before the prctl
        os.kill(os.getpid(), signum)
