"""Disk and database faults, as the errors a client gets.

Every fault of the storage under an upload becomes a clear JSON error and leaves nothing
half-recorded (the callers remove what they wrote and record nothing), so the request can be
sent again once the cause is gone:

    ENOSPC, EDQUOT, SQLite "database or disk is full"   507 ERR_DISK_FULL
    the free-disk floor (FILEDROP_MIN_FREE_DISK)         507 ERR_DISK_FULL, naming the setting
    EMFILE, ENFILE                                       503 ERR_SERVER_BUSY (retry shortly)
    ENOENT (the file or batch was removed meanwhile)     404 ERR_FILE_NOT_FOUND
    any other OSError (EIO, EROFS...)                    500 ERR_STORAGE_FAILED, one log line
"""

from __future__ import annotations

import errno
import logging

from sqlalchemy.exc import OperationalError

from server.errors import DiskFull, FiledropError, FileNotFound, ServerBusy, StorageFailed
from server.uploads.store import BelowFloor

log = logging.getLogger("filedrop.uploads")

_FULL = (errno.ENOSPC, errno.EDQUOT)
_BUSY = (errno.EMFILE, errno.ENFILE)


def storage_error(e: BaseException, floor: int, what: str) -> FiledropError | None:
    """The client's error for a storage fault met while ``what`` (None: not a storage fault),
    logged in one line: a warning for what the operator can fix (space, open files), an error
    for the disk failing."""
    if isinstance(e, BelowFloor):
        log.warning("%s: the free-disk floor was reached (%d bytes free)", what, e.free)
        return DiskFull(f"not enough free disk space: {what} would leave {e.free} bytes free, under "
                        f"FILEDROP_MIN_FREE_DISK ({floor} bytes)")
    if isinstance(e, OperationalError) and "full" in str(e.orig):
        log.warning("%s: the database's disk is full", what)
        return DiskFull(f"the database's disk is full ({what}); nothing was recorded")
    if not isinstance(e, OSError) or isinstance(e, ConnectionError | TimeoutError):
        return None
    if e.errno in _FULL:
        log.warning("%s: %s", what, e.strerror or e)
        return DiskFull(f"no space left on the data dir's disk ({what}); nothing was recorded")
    if e.errno == errno.ENOENT:
        return FileNotFound(f"the file was removed while {what}; send it again")
    if e.errno in _BUSY:
        log.warning("%s: %s", what, e.strerror)
        return ServerBusy(f"the server is out of open files ({what}); retry shortly")
    log.error("storage error %s: %s", what, e)
    return StorageFailed(f"storage error ({what}): {e.strerror or e}; nothing was recorded, retry later")
