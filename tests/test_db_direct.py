"""``server.db.direct``: the recorder's statements run on SQLite's own cursor give what
SQLAlchemy's execution of the same statements gives (the same rows, the same types, the same
errors), on a real migrated database; on PostgreSQL they go through SQLAlchemy itself."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import Connection, String, cast, insert, select
from sqlalchemy.exc import IntegrityError

from server.config import Settings
from server.db import Database
from server.db.direct import Direct
from server.db.models import Batch, BatchFile
from server.uploads import ledger

pytestmark = pytest.mark.parametrize("database", ["sqlite", "postgresql"], indirect=True)

WHEN = datetime(2026, 12, 1, 20, 15, 7, 123456)


def _file(batch_pk: int, idx: int, **changes: Any) -> dict[str, Any]:
    row = {"batch_pk": batch_pk, "file_idx": idx, "name": f"f{idx}.bin", "mimetype": "text/plain", "size": 10 + idx,
           "upload_type": "normal", "chunk_count": 2, "chunk_size": 8, "chunk_ids": b"\x01", "loose_ids": b"",
           "synced_ids": b"", "received": 8, "state": "receiving", "sha256": None, "created_at": WHEN,
           "updated_at": WHEN}
    return {**row, **changes}


def _batches(conn: Connection) -> dict[str, int]:
    rows = [{"batch_id": b, "owner": "o", "state": "open", "created_at": WHEN, "updated_at": WHEN}
            for b in ("b1", "b2")]
    ids = conn.execute(insert(Batch).returning(Batch.id, sort_by_parameter_order=True), rows).scalars().all()
    return dict(zip(("b1", "b2"), ids, strict=True))


def _rows_both_ways(conn: Connection, keys: dict[str, list[Any]]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    def key(r: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(-1 if v is None else v for v in r[:7])
    direct = sorted((tuple(r) for r in ledger._ROWS.all(conn, keys)), key=key)
    plain = sorted((tuple(r) for r in conn.execute(ledger._ROWS.stmt, keys)), key=key)
    return direct, plain


async def test_reads_give_the_rows_and_types_sqlalchemy_gives(settings: Settings) -> None:
    db = Database(settings.database)
    try:
        with db.write_sync() as conn:
            pk = _batches(conn)
            ids = ledger._INSERT.one_each(conn, [_file(pk["b1"], i) for i in range(3)]
                                          + [_file(pk["b2"], 0, sha256="ab" * 32, state="complete", chunk_size=None)])
            assert len(set(ids)) == 4 and ids == sorted(ids)  # the ids, in the order of the rows given
            stored = dict(conn.execute(select(BatchFile.id, BatchFile.file_idx).where(BatchFile.id.in_(ids))).all())
            assert [stored[i] for i in ids] == [0, 1, 2, 0]
            # Lists of several lengths (each its own compiled form), an empty one, a batch unknown.
            for keys in ({"batch_ids": ["b1"], "idxs": [1]}, {"batch_ids": ["b1", "b2"], "idxs": [0, 2, 5]},
                         {"batch_ids": ["b2", "nope"], "idxs": []}, {"batch_ids": ["b1"], "idxs": [2, 0, 1]}):
                direct, plain = _rows_both_ways(conn, keys)
                assert direct == plain and direct, keys
            direct, _ = _rows_both_ways(conn, {"batch_ids": ["b2"], "idxs": [0]})
            row = ledger._ROWS.all(conn, {"batch_ids": ["b2"], "idxs": [0]})[0]
            assert (row.b_batch_id, row.file_idx, row.sha256, row.chunk_size) == ("b2", 0, "ab" * 32, None)
            assert row.created_at == WHEN and isinstance(row.created_at, datetime)  # microseconds kept
            assert bytes(row.chunk_ids) == b"\x01"
            assert (row.b_files, row.b_bytes) == (1, 10)  # the batch's counts, kept by the triggers
    finally:
        await db.dispose()


async def test_writes_land_as_sqlalchemy_reads_them(settings: Settings) -> None:
    db = Database(settings.database)
    try:
        with db.write_sync() as conn:
            pk = _batches(conn)
            ids = ledger._INSERT.one_each(conn, [_file(pk["b1"], i) for i in range(4)])
            later = datetime(2026, 12, 2, 1, 2, 3, 4)
            ledger._UPDATE.run(conn, [{"b_id": ids[i], "b_chunk_ids": b"\x03", "b_loose_ids": b"\x02",
                                       "b_synced_ids": b"\x01", "b_received": 10 + i, "b_state": "complete",
                                       "b_sha256": f"{i}" * 64, "b_updated_at": later} for i in (1, 3)])
            ledger._DELETE.run(conn, {"ids": [ids[0], ids[2]]})
            rows = conn.execute(select(ledger._F).where(BatchFile.batch_pk == pk["b1"]).order_by(BatchFile.id)).all()
            got = [(r.file_idx, r.state, r.received, bytes(r.chunk_ids), r.sha256, r.updated_at, r.created_at)
                   for r in rows]
            assert got == [(1, "complete", 11, b"\x03", "1" * 64, later, WHEN),
                           (3, "complete", 13, b"\x03", "3" * 64, later, WHEN)]
            counts = conn.execute(select(Batch.file_count, Batch.declared_bytes).where(Batch.id == pk["b1"])).one()
            assert tuple(counts) == (2, 11 + 13)
            ledger._UPDATE.run(conn, [])  # nothing to do: no statement
            # Stored as SQLAlchemy stores them (SQLite keeps a DateTime as text, compared as text):
            # a time on the second, written both ways, reads back the same from the column itself.
            even = datetime(2026, 12, 3, 4, 5, 6)
            mine = ledger._INSERT.one_each(conn, [_file(pk["b2"], 7, created_at=even)])[0]
            theirs = conn.execute(insert(ledger._F).returning(BatchFile.id), _file(pk["b2"], 8, created_at=even)).scalar()
            stored = dict(conn.execute(select(BatchFile.id, cast(BatchFile.created_at, String))
                                       .where(BatchFile.id.in_([mine, theirs]))).all())
            assert stored[mine] == stored[theirs]
    finally:
        await db.dispose()


async def test_errors_are_sqlalchemys_and_columns_are_not_guessed(settings: Settings) -> None:
    db = Database(settings.database)
    try:
        with pytest.raises(IntegrityError) as raised, db.write_sync() as conn:
            pk = _batches(conn)
            ledger._INSERT.one_each(conn, [_file(pk["b1"], 0), _file(pk["b1"], 0)])  # (batch, idx) is unique
        assert "unique" in str(raised.value.orig).lower() or "duplicate" in str(raised.value.orig).lower()
        with db.write_sync() as conn:  # rolled back: nothing of it stayed
            assert conn.execute(select(Batch.id)).all() == []
            if Direct.direct(conn):
                partial = {k: v for k, v in _file(1, 0).items() if k != "mimetype"}
                with pytest.raises(ValueError, match="'mimetype' is missing"):
                    ledger._INSERT.one_each(conn, [partial])
    finally:
        await db.dispose()
