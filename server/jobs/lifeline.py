"""A child process that must not outlive its parent (Linux ``PR_SET_PDEATHSIG``): render
processes die with their worker (SIGKILL: nothing of theirs must go on), workers started by
``filedrop serve`` stop with it (SIGTERM: they hand their rows back first), and the children of
``scripts/run``'s supervisor stop with it (SIGTERM, armed between fork and exec by
``death_signal``). Light on purpose: render processes import it before anything else."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:  # not Linux: the parent's own stop still ends us
        return None


def _arm(libc: ctypes.CDLL | None, parent: int, signum: int) -> None:
    if libc is not None:
        try:
            libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
        except AttributeError:  # a libc without prctl
            pass
    if os.getppid() != parent:  # it died before the prctl
        os.kill(os.getpid(), signum)


def die_with_parent(parent: int, signum: int) -> None:
    """Get ``signum`` when the parent (pid ``parent``) dies; at once if it already has."""
    _arm(_libc(), parent, signum)


def death_signal(signum: int) -> Callable[[], None]:
    """A ``preexec_fn`` for a child of this process: ``signum`` when this process dies. libc is
    loaded here, in the parent (``find_library`` runs a program): the child only makes the call."""
    libc, parent = _libc(), os.getpid()
    return lambda: _arm(libc, parent, signum)
