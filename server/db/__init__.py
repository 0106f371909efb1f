"""Database: models, engine (WAL, busy_timeout, BEGIN IMMEDIATE writer), migrations."""

from server.db.engine import Database, connection_lost, log_failure, utcnow

__all__ = ["Database", "connection_lost", "log_failure", "utcnow"]
