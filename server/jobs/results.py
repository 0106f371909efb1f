"""A job's result as CSV: the text ``?format=csv`` answers, and the file signed download URLs
serve (by NGINX through an internal location, or by the app).

Invariants: both come from ``csv_text``, so the download and ``?format=csv`` are the same bytes.
The file is ``<data_dir>/results/<job_id>.csv`` (a name made of the job id, 32 hex digits, never
of anything a client sent), written only for an ended job (its rows no longer change), and it
reaches its name by temp file (a dot name) -> fsync -> ``os.replace``: a reader sees the whole
file or none. Cleanup removes it once its job is gone.
"""

from __future__ import annotations

import csv
import io
import os
import secrets
from pathlib import Path
from typing import Any

from server.config import Settings
from server.durable import fsync_dir

FIELDS = ["reference_id", "suffix", "url", "status", "error"]
SUFFIX = ".csv"


def csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def path_of(settings: Settings, job_id: str) -> Path:
    return settings.results_dir / f"{job_id}{SUFFIX}"


def write(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write the CSV of ``rows`` at ``path`` atomically (blocking: call it in a thread). Two
    writers at once both write the same bytes; the last rename wins."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with open(fd, "w", encoding="utf-8", newline="") as f:
            f.write(csv_text(rows))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
