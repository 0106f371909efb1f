"""Durability primitives shared by the upload store and the smartlink publisher.

``syncfs`` flushes a whole file system in one call (Linux); it is how both batch their
durability instead of paying an fsync per file. Elsewhere it falls back to ``os.sync``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path
from typing import Any


def _load_syncfs() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


SYNCFS = _load_syncfs()


def syncfs(path: Path) -> None:
    """Make every write to the file system holding ``path`` durable (data and metadata)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if SYNCFS is None or SYNCFS(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename/unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def boot_id() -> str:
    """This boot of the machine: a page cache survives a process crash, not a reboot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"
