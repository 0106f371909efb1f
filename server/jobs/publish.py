"""Atomic publishing into NGINX's tree.

A file reaches ``<smartlink_root>/<batch_id>/`` only as: a dot-named temp file in the same
directory (``.<worker id>.<serial>.tmp``: nginx.conf refuses dotfiles; the workers remove
a dead worker's leftovers, the janitor any old ones) -> data made durable -> ``os.replace`` onto
the final name -> the directory fsynced. A reader (NGINX) therefore sees either the previous
complete file or the new complete file, never a partial one, also after a crash or power loss.

Publishing never creates the batch directory (a job's first load does): once ``drop`` has
renamed it away, a late publish fails (ENOENT) instead of writing into a folder NGINX serves.

Durability is batched: a batch of temp files is written, then one ``syncfs()`` on the
directory's filesystem makes all of them durable at once (Linux; elsewhere each temp file is
fsynced) (``stage``), then all are renamed and the directory is fsynced once
(``Staged.commit``). Between the two the worker checks that its rows are still its own: a
worker wrongly declared dead publishes nothing after someone else ended the job. On this machine a per-file
fsync costs 0.2-1 ms, which alone would be slower than the whole render of a row.

The files of one unit (a row's page and its PDF) are published all or none: a page must not be
served beside a row that errored, nor a PDF without its page.
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from server.durable import SYNCFS

TMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class Item:
    """One file to publish: ``data`` bytes, or a copy of the file at ``source``. Items of the
    same ``unit`` are published all or none (None: a unit of its own)."""

    name: str
    data: bytes | None = None
    source: str | None = None
    unit: int | None = None


def _units(items: Sequence[Item]) -> list[list[Item]]:
    units: dict[object, list[Item]] = {}
    for i, it in enumerate(items):
        units.setdefault(("own", i) if it.unit is None else it.unit, []).append(it)
    return list(units.values())


_serial = itertools.count()


def temp_name(tag: str) -> str:
    """Unique without a random draw per file: ``tag`` is unique per worker, the serial per
    process (a worker has one publishing thread at a time, and ``next`` is atomic anyway). Not
    made from the final name: a name of up to 255 bytes must have a temp that fits as well."""
    return f".{tag}.{next(_serial)}{TMP_SUFFIX}"


@dataclass
class Staged:
    """A batch written to its temp files and made durable, not yet renamed into place."""

    directory: Path
    units: list[list[tuple[str, str]]] = field(default_factory=list)  # each unit's (temp path, final path)
    errors: dict[str, str] = field(default_factory=dict)

    def commit(self, until: float | None = None) -> dict[str, str]:
        """Rename every unit's temps onto their names, then fsync the directory; {name: error}
        of what failed, every name of a unit that failed. A unit is renamed whole or not at all:
        when one of its renames fails, the names it renamed just before are removed again.
        ``until`` (``time.monotonic()``): a unit not begun by then is not done (its temps go,
        its names get an error): a worker's lease on its rows ends then. A unit begun is
        finished: a few renames, well within the second ``worker.PUBLISH_BY`` leaves."""
        errors = dict(self.errors)
        if not self.units:
            return errors
        try:
            dfd = os.open(self.directory, os.O_RDONLY)
        except OSError as e:  # dropped meanwhile
            for unit in self.units:
                _fail(unit, errors, f"cannot publish {os.path.basename(unit[0][1])}: {e.strerror or e}")
            return errors
        try:
            for unit in self.units:
                if until is not None and time.monotonic() >= until:
                    _fail(unit, errors, f"cannot publish {os.path.basename(unit[0][1])}: the worker's claim on it "
                                        "ran out")
                    continue
                for k, (tmp, final) in enumerate(unit):
                    try:
                        os.replace(tmp, final)
                    except OSError as e:
                        _fail(unit, errors, f"cannot publish {os.path.basename(final)}: {e.strerror or e}", k)
                        break
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return errors

    def discard(self) -> None:
        for unit in self.units:
            for tmp, _final in unit:
                _unlink(tmp)
        self.units = []


def _fail(unit: list[tuple[str, str]], errors: dict[str, str], error: str, renamed: int = 0) -> None:
    """A unit failed with ``error``: its first ``renamed`` files, renamed into place a moment
    ago, go again; its other temps go; every name of it gets the error."""
    for i, (tmp, final) in enumerate(unit):
        _unlink(final if i < renamed else tmp)
        errors[os.path.basename(final)] = error


def stage(directory: Path, items: Sequence[Item], tag: str = "w") -> Staged:
    """Write ``items`` to temp files in ``directory`` (which must exist) and make them durable
    (one ``syncfs``); nothing is visible yet (``Staged.commit``). A unit one of whose files cannot
    be written is not staged: every name of it gets that error. ``tag`` (the worker's id) goes
    into temp names, so that a dead worker's leftovers can be told from a live one's work."""
    out = Staged(directory)
    per_file_sync = SYNCFS is None
    base = os.fspath(directory) + os.sep
    for unit in _units(items):
        temps: list[tuple[str, str]] = []
        for it in unit:
            tmp = base + temp_name(tag)
            try:
                _write(tmp, it, per_file_sync)
            except OSError as e:
                _unlink(tmp)
                for other in unit:  # the unit's other files are not published without this one
                    out.errors[other.name] = f"cannot write {it.name}: {e.strerror or e}"
                for written, _final in temps:
                    _unlink(written)
                break
            temps.append((tmp, base + it.name))
        else:
            out.units.append(temps)
    if out.units and not per_file_sync:
        try:
            dfd = os.open(directory, os.O_RDONLY)
        except OSError:
            return out  # dropped meanwhile: commit reports it
        try:
            if SYNCFS is not None and SYNCFS(dfd) != 0:
                # syncfs failed: fall back to fsyncing each temp file.
                for unit in out.units:
                    for tmp, _final in unit:
                        with open(tmp, "rb") as f:
                            os.fsync(f.fileno())
        finally:
            os.close(dfd)
    return out


def _write(tmp: str, it: Item, fsync: bool) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        if it.data is not None:
            view = memoryview(it.data)
            while view:
                view = view[os.write(fd, view):]
        else:
            assert it.source is not None
            with open(it.source, "rb") as src, os.fdopen(os.dup(fd), "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def publish_batch(directory: Path, items: Sequence[Item], tag: str = "w") -> dict[str, str]:
    """Publish ``items`` atomically into ``directory`` (which must exist); returns {name: error}
    for failed items. Idempotent: publishing the same bytes again replaces a file with an
    identical one."""
    return stage(directory, items, tag).commit()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# Who owns a smartlink folder, kept beside it as ``<root>/.owners/<batch_id>`` (a dot name:
# NGINX serves nothing under it) for as long as the folder is there: job rows go with the
# retention while their pages stay published, and another key must not then take the batch_id
# over and publish into (or over) them (``JobService.start``: 409 ERR_BATCH_TAKEN).
OWNERS_DIR = ".owners"


def write_owner(root: Path, batch_id: str, owner: str) -> None:
    """Record ``owner`` as the owner of ``<root>/<batch_id>/`` (its job's load makes the folder;
    blocking). Atomic: a reader sees the old owner or the new one."""
    owners = root / OWNERS_DIR
    path = owners / batch_id
    try:
        if path.read_text(encoding="ascii") == owner:
            return
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    owners.mkdir(mode=0o700, exist_ok=True)
    tmp = owners / temp_name(f"owner-{os.getpid()}")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="ascii") as f:
        f.write(owner)
    os.replace(tmp, path)


def folder_owner(root: Path, batch_id: str) -> str | None:
    """The owner recorded for ``<root>/<batch_id>/`` while that folder exists, else None (no
    folder, or one made before owners were recorded). Blocking."""
    if not (root / batch_id).is_dir():
        return None
    try:
        return (root / OWNERS_DIR / batch_id).read_text(encoding="ascii") or None
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def forget_owner(root: Path, batch_id: str) -> None:
    """The folder went (drop, cleanup): so does its owner. Blocking."""
    _unlink(str(root / OWNERS_DIR / batch_id))


def remove_stale_temps(directory: Path, tag: str) -> int:
    """Remove the temp files worker ``tag`` left in ``directory`` (it died mid-publish); how
    many were removed."""
    n = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for e in entries:
        if e.name.startswith(".") and e.name.endswith(TMP_SUFFIX) and f".{tag}." in e.name \
                and e.is_file(follow_symlinks=False):
            _unlink(e.path)
            n += 1
    return n
