"""ORM models for smartlink jobs: the job, one row per data row, the job log, and the workers
that render them (``filedrop worker`` processes, on this host or others)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, DateTime, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from server.db.models import Base


class Job(Base):
    __tablename__ = "jobs"

    job_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    batch_id: Mapped[str] = mapped_column(String(128), index=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(32), index=True)
    strategy: Mapped[str] = mapped_column(String(16))
    inputs_hash: Mapped[str] = mapped_column(String(64))
    template: Mapped[str] = mapped_column(Text)  # the master smartlink JSON, as validated
    params: Mapped[str] = mapped_column(Text, default="{}")  # JSON of param.<name> parts
    upload_batch_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    max_errors: Mapped[int | None] = mapped_column(Integer, nullable=True)
    callback_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    callback_emails: Mapped[str | None] = mapped_column(Text, nullable=True)
    total_count: Mapped[int] = mapped_column(Integer, default=0)
    succeeded_count: Mapped[int] = mapped_column(Integer, default=0)
    errored_count: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    started: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished: Mapped[datetime | None] = mapped_column(DateTime, nullable=True, index=True)
    callback_state: Mapped[str] = mapped_column(String(16), default="none", index=True)  # none|pending|sending|sent|failed
    email_state: Mapped[str] = mapped_column(String(16), default="none", index=True)
    # A hint for claims: every row below it was claimed once already. Claims scan the primary key
    # from here (not from 0); anything that hands rows back to the queue resets it to 0.
    claim_from: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # A job started with data_upload=url waits for its rows until then (its upload_URL's expiry).
    data_expires: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    notification_method: Mapped[str] = mapped_column(String(8), default="POST", server_default="POST")  # callback


class JobRow(Base):
    """One data row. ``status``: pending -> claimed -> done | error (| skipped on cancel).

    ``claimed_by`` is the worker holding a claimed row; ``attempts`` counts renders of this row
    that a limit (time, memory) killed: the first goes back to the queue, the second errors.
    No index on status: claims scan the primary key (job_id, idx) from a cursor, and every
    status change would otherwise also rewrite an index entry (measured: marks cost 2x)."""

    __tablename__ = "job_rows"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.job_id", ondelete="CASCADE"), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    reference_id: Mapped[str] = mapped_column(Text)
    suffix: Mapped[str] = mapped_column(Text)
    pdf: Mapped[str | None] = mapped_column(Text, nullable=True)
    data: Mapped[str] = mapped_column(Text)  # the row's JSON
    status: Mapped[str] = mapped_column(String(16), default="pending")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    claimed_by: Mapped[str | None] = mapped_column(String(32), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class JobLog(Base):
    __tablename__ = "job_logs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.job_id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(DateTime)
    level: Mapped[str] = mapped_column(String(8))
    message: Mapped[str] = mapped_column(Text)


class JobWorker(Base):
    """A live ``filedrop worker``: registered at start, ``seen_at`` refreshed every second,
    removed at a clean stop. One whose heartbeat is stale (or, on this host, whose process is
    gone) is dead: its claimed rows go back to the queue."""

    __tablename__ = "job_workers"

    worker_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    host: Mapped[str] = mapped_column(String(300))  # host name + boot id: a reboot ends every worker
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime)
    seen_at: Mapped[datetime] = mapped_column(DateTime)
