"""ORM models for API keys and upload batches.

Bytes never live in the database: a file's bytes are under ``<data_dir>/uploads/<batch pk>/``
at paths the server derives from row ids (see ``server.uploads.store``). Client-supplied names
are only ever data in these rows.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Alembic's batch mode on SQLite needs named constraints to alter them later.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ApiKey(Base):
    """A key made by ``filedrop keys create NAME``; only its SHA-256 is stored."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class Batch(Base):
    """An upload batch. ``state``: open -> executed | dropped (rows of closed batches are kept
    as tombstones so a late upload into them is refused instead of recreating them).

    ``file_count`` and ``declared_bytes`` are the number of its file rows and the sum of their
    sizes (the batch limits), kept by triggers on ``batch_files`` (migration 0005): whatever
    adds or removes a file row keeps them right, and checking a limit reads one row."""

    __tablename__ = "batches"
    # Row ids name directories on disk: AUTOINCREMENT so an id is never handed out twice
    # (plain rowids reuse the highest id after a delete, while its directory may still exist).
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    batch_id: Mapped[str] = mapped_column(String(128), unique=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(16), default="open")
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    file_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    declared_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")

    files: Mapped[list[BatchFile]] = relationship(back_populates="batch", cascade="all, delete-orphan")


class BatchFile(Base):
    """One file of a batch. ``state``: receiving -> assembling -> complete.

    Its chunks are three bitmaps (``server.uploads.chunkset``; bit i = chunk i), so recording one
    is O(1) whatever the file holds: ``chunk_ids`` recorded (bytes written before the record),
    ``loose_ids`` those stored as ``chunks/<i>`` (the others are in ``partial`` at
    ``i * chunk_size``), ``synced_ids`` those known to survive a power loss (a chunk sync point
    ran after they were recorded). ``received`` is the bytes of the recorded chunks.
    ``chunk_size`` is the stride of the uniform layout (None: every chunk is stored on its own).
    """

    __tablename__ = "batch_files"
    __table_args__ = (UniqueConstraint("batch_pk", "file_idx"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    batch_pk: Mapped[int] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    file_idx: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(Text)
    mimetype: Mapped[str] = mapped_column(String(255), default="application/octet-stream")
    size: Mapped[int] = mapped_column(BigInteger)
    upload_type: Mapped[str] = mapped_column(String(16), default="normal")
    chunk_count: Mapped[int] = mapped_column(Integer, default=1)
    chunk_size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    chunk_ids: Mapped[bytes] = mapped_column(LargeBinary, default=b"")
    loose_ids: Mapped[bytes] = mapped_column(LargeBinary, default=b"")
    synced_ids: Mapped[bytes] = mapped_column(LargeBinary, default=b"")
    received: Mapped[int] = mapped_column(BigInteger, default=0)
    state: Mapped[str] = mapped_column(String(16), default="receiving")
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)

    batch: Mapped[Batch] = relationship(back_populates="files")
