"""ORM model of the keys that sign expiring URLs (``server.signing``)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, String
from sqlalchemy.orm import Mapped, mapped_column

from server.db.models import Base


class SigningKey(Base):
    """One HMAC-SHA256 key. ``retires_at`` None: a current key (the newest signs); set: the key
    was rotated out and still verifies until then (the grace period), after which its URLs are
    expired. Kept in the database (0600, shared by every process and host of the server), never
    in a process's memory alone."""

    __tablename__ = "signing_keys"

    kid: Mapped[str] = mapped_column(String(16), primary_key=True)
    secret: Mapped[str] = mapped_column(String(64))  # 32 random bytes, hex
    created_at: Mapped[datetime] = mapped_column(DateTime)
    retires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
