"""Real rows and real files in the disk layout the server uses, for the admin tests.

Rows go through the ORM into the test's migrated database (SQLite file or PostgreSQL); bytes are written where the upload
store and the smartlink publisher put them. Ages are made by moving clocks back (``updated_at``,
``finished``, file mtimes), never by waiting.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from sqlalchemy import create_engine, func, select, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from server.config import Settings
from server.db import utcnow
from server.db.job_models import Job, JobLog, JobRow
from server.db.models import Batch, BatchFile
from server.uploads.chunkset import ChunkSet
from tests.support.server import REPO, server_env

HOUR = 3600.0
DAY = 86400.0


@dataclass
class FileSpec:
    state: str = "complete"
    data: bytes | None = b"d" * 1000  # written as <batch dir>/<file id>.data
    chunks: dict[int, bytes] = field(default_factory=dict)  # chunks/<idx>, recorded (stored on its own)
    chunk_rows_without_bytes: list[int] = field(default_factory=list)  # recorded, no chunk file
    temps: dict[str, bytes] = field(default_factory=dict)  # relative to the file dir
    idle: float | None = None  # age of updated_at; default: the batch's


def session(settings: Settings) -> Session:
    # NullPool: a connection closes with its session (no pool left holding a PostgreSQL backend).
    return Session(create_engine(settings.sync_db_url, poolclass=NullPool), expire_on_commit=False)


def batch_counts(settings: Settings) -> dict[str, tuple[int, int, int, int]]:
    """{batch id: (file_count, declared_bytes on its row, its file rows, the sum of their sizes)}:
    the counts the triggers keep, and what they count."""
    with session(settings) as s:
        return {r[0]: tuple(r[1:]) for r in s.execute(text(
            "SELECT b.batch_id, b.file_count, b.declared_bytes, "
            "(SELECT count(*) FROM batch_files f WHERE f.batch_pk = b.id), "
            "(SELECT coalesce(sum(f.size), 0) FROM batch_files f WHERE f.batch_pk = b.id) FROM batches b"))}


def age(path: Path, seconds: float) -> None:
    """Move the mtime of ``path`` and everything under it ``seconds`` into the past."""
    t = time.time() - seconds
    paths = [path] + (list(path.rglob("*")) if path.is_dir() else [])
    for p in sorted(paths, key=lambda p: -len(p.parts)):  # children before their directory
        os.utime(p, (t, t), follow_symlinks=False)


def add_batch(settings: Settings, batch_id: str, files: list[FileSpec], *, state: str = "open",
              idle: float = 0.0, disk_age: float | None = None) -> tuple[int, list[int]]:
    """A batch row, its file rows and bytes; returns (batch pk, file ids). ``disk_age`` (default:
    ``idle``) ages every file under the batch dir."""
    now = utcnow()
    with session(settings) as s:
        b = Batch(batch_id=batch_id, owner="o" * 64, state=state, created_at=now - timedelta(seconds=idle),
                  updated_at=now - timedelta(seconds=idle))
        s.add(b)
        s.flush()
        ids = []
        for idx, spec in enumerate(files):
            f_idle = idle if spec.idle is None else spec.idle
            recorded = sorted([*spec.chunks, *spec.chunk_rows_without_bytes])
            if spec.state == "complete":
                count = max(len(recorded), 1)
                recorded_ids, loose = ChunkSet.full(count), ChunkSet()
                received = len(spec.data or b"")
            else:  # still receiving: one chunk more than recorded is declared
                count = (max(recorded) + 2) if recorded else 1
                recorded_ids, loose = ChunkSet.of(recorded), ChunkSet.of(recorded)
                received = sum(len(c) for c in spec.chunks.values()) + len(spec.chunk_rows_without_bytes)
            size = len(spec.data) if spec.data is not None else received + 1
            f = BatchFile(batch_pk=b.id, file_idx=idx, name=f"f{idx}.bin", size=size, chunk_count=count,
                          chunk_ids=bytes(recorded_ids), loose_ids=bytes(loose), synced_ids=bytes(recorded_ids),
                          received=received,
                          state=spec.state, created_at=now - timedelta(seconds=f_idle),
                          updated_at=now - timedelta(seconds=f_idle))
            s.add(f)
            s.flush()
            ids.append(f.id)
            fdir = settings.uploads_dir / str(b.id) / str(f.id)
            fdir.mkdir(parents=True, exist_ok=True)
            if spec.data is not None:  # a complete file's bytes: <batch dir>/<file id>.data
                (fdir.parent / f"{f.id}.data").write_bytes(spec.data)
            for i, chunk in spec.chunks.items():
                (fdir / "chunks").mkdir(exist_ok=True)
                (fdir / "chunks" / str(i)).write_bytes(chunk)
            for rel, content in spec.temps.items():
                (fdir / rel).parent.mkdir(parents=True, exist_ok=True)
                (fdir / rel).write_bytes(content)
        s.commit()
        pk = b.id
    bdir = settings.uploads_dir / str(pk)
    bdir.mkdir(parents=True, exist_ok=True)
    age(bdir, idle if disk_age is None else disk_age)
    return pk, ids


def add_job(settings: Settings, job_id: str, batch_id: str, *, status: str = "Completed",
            finished_ago: float | None = None, rows: list[tuple[str, str]] = (),  # type: ignore[assignment]
            publish: bool = True, upload_batch_id: str | None = None, owner: str = "o" * 64) -> list[Path]:
    """A job row with its rows and a log line; with ``publish`` its smartlinks are written (aged
    like the job). Returns the published paths."""
    now = utcnow()
    finished = None if finished_ago is None else now - timedelta(seconds=finished_ago)
    with session(settings) as s:
        s.add(Job(job_id=job_id, batch_id=batch_id, owner=owner, status=status, strategy="smallest",
                  inputs_hash="0" * 64, template="{}", params="{}", upload_batch_id=upload_batch_id,
                  total_count=len(rows), succeeded_count=len(rows) if finished else 0, errored_count=0,
                  cancel_requested=False, created_at=finished or now, started=finished or now, finished=finished,
                  callback_state="none", email_state="none"))
        s.flush()
        for i, (ref, suffix) in enumerate(rows):
            s.add(JobRow(job_id=job_id, idx=i, reference_id=ref, suffix=suffix, data="{}",
                         status="done" if finished else "pending"))
        s.add(JobLog(job_id=job_id, at=now, level="INFO", message="made by the admin tests"))
        s.commit()
    paths = []
    if publish:
        assert settings.smartlink_root is not None
        d = settings.smartlink_root / batch_id
        d.mkdir(parents=True, exist_ok=True)
        for ref, suffix in rows:
            p = d / f"{ref}.{suffix}.html"
            p.write_text(f"<p>{ref}</p>")
            paths.append(p)
        age(d, finished_ago or 0.0)
    return paths


def chunk_ids(settings: Settings, file_id: int) -> list[int]:
    """The recorded chunk ids of a file row."""
    with session(settings) as s:
        return ChunkSet(s.scalar(select(BatchFile.chunk_ids).where(BatchFile.id == file_id))).ids()


def count(settings: Settings, model: type, *where: object) -> int:
    with session(settings) as s:
        return s.scalar(select(func.count()).select_from(model).where(*where)) or 0


def job_status(settings: Settings, job_id: str) -> str | None:
    with session(settings) as s:
        return s.scalar(select(Job.status).where(Job.job_id == job_id))


def batch_state(settings: Settings, batch_id: str) -> str | None:
    with session(settings) as s:
        return s.scalar(select(Batch.state).where(Batch.batch_id == batch_id))


def admin_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = server_env(settings.data_dir, "unused-key")
    if settings.database_url:
        env["FILEDROP_DATABASE_URL"] = settings.database_url
    env.update({f"FILEDROP_{k.upper()}": v for k, v in extra.items()})
    return env


def run_cli(settings: Settings, *args: str, timeout: float = 60, **extra: str) -> subprocess.CompletedProcess[str]:
    """``python -m server ARGS`` against the settings' data dir (and database)."""
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=REPO, env=admin_env(settings, **extra),
                          capture_output=True, text=True, timeout=timeout)


async def run_cli_async(settings: Settings, *args: str, timeout: float = 60) -> tuple[int, str, str]:
    """``run_cli`` without blocking the event loop a server under test runs on."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", *args, cwd=REPO, env=admin_env(settings),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def table(stdout: str) -> dict[str, list[list[str]]]:
    """The admin table as {kind: [[target, bytes, result, detail], ...]} (columns are separated
    by two or more spaces; values never hold two spaces in a row)."""
    lines = stdout.splitlines()
    assert lines and lines[0].split()[:4] == ["KIND", "TARGET", "BYTES", "RESULT"], stdout
    rows: dict[str, list[list[str]]] = {}
    for line in lines[1:-1]:
        parts = re.split(r" {2,}", line.strip())
        rows.setdefault(parts[0], []).append(parts[1:] + [""] * (5 - len(parts)))
    return rows


def freed(stdout: str) -> int:
    """Bytes freed (or that would be) from the table's summary line."""
    m = re.search(r"(\d+) bytes \(", stdout.strip().splitlines()[-1])
    assert m, stdout
    return int(m.group(1))
