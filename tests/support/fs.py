"""File-system facts the tests check."""

from __future__ import annotations

import fcntl
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
