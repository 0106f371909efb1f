"""File-system facts the tests check."""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
from pathlib import Path

import pytest

from server.durable import _FS_IOC_GETFLAGS, _FS_TOPDIR_FL


def spread(path: Path) -> bool:
    """Whether ``path`` carries ext4's top-of-hierarchy flag (``chattr +T``); skips the test on
    a file system that keeps no inode flags (tmpfs)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags = struct.unpack("i", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, struct.pack("i", 0)))[0]
    except OSError as e:
        pytest.skip(f"this file system keeps no inode flags ({e.strerror})")
    finally:
        os.close(fd)
    return bool(flags & _FS_TOPDIR_FL)


def cached_bytes(path: Path) -> int:
    """How many bytes of ``path`` are in the page cache now (``mincore`` over a mapping of it)."""
    size = path.stat().st_size
    if size == 0:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    page = mmap.PAGESIZE
    pages = (size + page - 1) // page
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_WRITE) as m:
        address = ctypes.addressof(ctypes.c_char.from_buffer(m))  # the mapping's start
        vec = (ctypes.c_ubyte * pages)()
        if libc.mincore(ctypes.c_void_p(address), size, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return sum(v & 1 for v in vec) * page
