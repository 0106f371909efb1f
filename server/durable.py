"""Durability primitives shared by the upload store and the smartlink publisher.

``syncfs`` flushes a whole file system in one call (Linux); it is how both batch their
durability instead of paying an fsync per file. Elsewhere it falls back to ``os.sync``.
``reserve`` allocates disk blocks before they are written (``fallocate``), so that concurrent
writers see each other's space in ``statvfs`` and a full disk is found before a byte is sent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import struct
from pathlib import Path
from typing import Any


def _libc(name: str, *argtypes: Any) -> Any:
    """A libc function (Python's os module lacks these), or None where libc has none."""
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn


SYNCFS = _libc("syncfs", ctypes.c_int)
_SYNC_FILE_RANGE = _libc("sync_file_range", ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint)
_SYNC_FILE_RANGE_WRITE = 2
_FALLOCATE = _libc("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong)
_FALLOC_FL_KEEP_SIZE = 1
_FADVISE = getattr(os, "posix_fadvise", None)  # not on every platform


_MALLOPT = _libc("mallopt", ctypes.c_int, ctypes.c_int)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def keep_heap(mmap_threshold: int, trim_threshold: int, arenas: int) -> bool:
    """Ask glibc's allocator to serve blocks under ``mmap_threshold`` from its heap, to keep up
    to ``trim_threshold`` free bytes there instead of giving them back, and to use at most
    ``arenas`` arenas (False where there is no ``mallopt``, or it refused a value).

    * A server that receives bodies in pieces of a mebibyte and keeps a few megabytes of them
      for a hashing thread otherwise maps fresh pages for most pieces (page faults were a tenth
      of the CPU of a large upload).
    * glibc gives each thread that allocates an arena of its own (up to 8 per core), and each
      arena keeps its own free memory: with the event loop, the hashing, writing and database
      threads allocating in turn, the upload bench's peak RSS was 94-99 MB with the default and
      89-92 MB with one arena, at the same speed. It applies to threads that have not allocated
      yet: call this first thing in the process."""
    if _MALLOPT is None:
        return False
    return all(_MALLOPT(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold), (_M_ARENA_MAX, arenas)))


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a range of ``fd`` back to disk without waiting for it (Linux's
    ``sync_file_range``), so that a later sync finds little left to write; elsewhere nothing."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def drop_cached(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to drop a range of ``fd`` from the page cache (``POSIX_FADV_DONTNEED``): it
    starts writeback of what is still dirty and frees the pages already on disk; pages still
    being written stay cached. A hint: nothing where the platform has no ``posix_fadvise`` or
    the file system refuses it."""
    if _FADVISE is not None:
        try:
            _FADVISE(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def reserve(fd: int, offset: int, length: int) -> bool:
    """Allocate the blocks of ``[offset, offset + length)`` of ``fd`` without changing its size.
    Raises OSError(ENOSPC) when the file system cannot hold them; False where the file system
    (or the platform) cannot preallocate, so nothing was reserved."""
    if _FALLOCATE is None or length <= 0:
        return False
    if _FALLOCATE(fd, _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


# ``chattr +T``: the ioctls and flag of linux/fs.h (the flags are an int, whatever the macro says).
_FS_IOC_GETFLAGS, _FS_IOC_SETFLAGS, _FS_TOPDIR_FL = 0x80086601, 0x40086602, 0x00020000


def spread_subdirs(path: Path) -> bool:
    """Mark the directory ``path`` as the top of unrelated trees (``chattr +T``): ext4 then puts
    each new subdirectory, and the files made in it, in a block group of its own choosing
    (Orlov) instead of the one ``path`` is in. Returns False where the file system has no such
    flag (nothing changes)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        flags = struct.unpack("i", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, struct.pack("i", 0)))[0]
        if not flags & _FS_TOPDIR_FL:
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("i", flags | _FS_TOPDIR_FL))
        return True
    except OSError:  # not ext2/3/4 (ENOTTY, EOPNOTSUPP), or not the owner (EPERM)
        return False
    finally:
        os.close(fd)


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
