"""Database: models, engine (WAL, busy_timeout, BEGIN IMMEDIATE writer), migrations."""

from server.db.engine import Database, utcnow

__all__ = ["Database", "utcnow"]
