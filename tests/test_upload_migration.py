"""Migration 0003: the chunks table becomes bitmaps in the file row, on a database of 0001 with
uploads under way; ids keep growing (they name directories); the files go on from where they
were; downgrading gives the rows back."""

from __future__ import annotations

import os
import sqlite3

from server.app import create_app
from server.db.migrate import upgrade
from server.uploads.chunkset import ChunkSet
from tests.conftest import AUTH
from tests.support.uploads import Uploads, sha256


def test_0001_to_0003_keeps_uploads_under_way(tmp_path) -> None:
    db_path = tmp_path / "old.sqlite3"
    upgrade(db_path, "0001")
    with sqlite3.connect(db_path) as db:
        db.execute("INSERT INTO batches (id, batch_id, owner, state, created_at, updated_at) "
                   "VALUES (5, 'b', 'o', 'open', '2026-01-01', '2026-01-01')")
        for fid, idx, state in ((7, 0, "complete"), (8, 1, "receiving"), (9, 2, "receiving")):
            db.execute("INSERT INTO batch_files (id, batch_pk, file_idx, name, mimetype, size, upload_type, "
                       "chunk_count, state, sha256, created_at, updated_at) VALUES (?, 5, ?, 'n', 'm', 3000, "
                       "'chunked', 3, ?, NULL, '2026-01-01', '2026-01-01')", (fid, idx, state))
        for i in (0, 2):
            db.execute("INSERT INTO chunks VALUES (8, ?, 1000, '2026-01-01')", (i,))
        db.execute("INSERT INTO batch_files (id, batch_pk, file_idx, name, mimetype, size, upload_type, "
                   "chunk_count, state, created_at, updated_at) VALUES (12, 5, 9, 'n', 'm', 1, 'normal', 1, "
                   "'complete', '2026-01-01', '2026-01-01')")
        db.execute("DELETE FROM batch_files WHERE id = 12")  # the highest id ever handed out: 12
    upgrade(db_path)
    with sqlite3.connect(db_path) as db:
        rows = {r[0]: r[1:] for r in db.execute(
            "SELECT id, chunk_ids, loose_ids, synced_ids, received, chunk_size FROM batch_files")}
        assert db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'chunks'").fetchone() == (0,)
        assert db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'batch_files'").fetchone() == (12,)
    assert ChunkSet(rows[7][0]).ids() == [0, 1, 2] and rows[7][1] == b"" and rows[7][3] == 3000
    assert ChunkSet(rows[8][0]).ids() == [0, 2] == ChunkSet(rows[8][1]).ids() == ChunkSet(rows[8][2]).ids()
    assert rows[8][3] == 2000 and rows[8][4] is None
    assert rows[9][0] == b"" and rows[9][3] == 0


async def test_a_file_under_way_before_0003_completes_after_it(aiohttp_client, settings) -> None:
    """Chunks stored as chunks/<idx> by the old server become loose chunks; the missing one
    arrives and the file is concatenated."""
    db_path = settings.db_path
    os.remove(db_path)
    for suffix in ("-wal", "-shm"):
        if os.path.exists(f"{db_path}{suffix}"):
            os.remove(f"{db_path}{suffix}")
    upgrade(db_path, "0001")
    from server.auth import hash_key

    owner = hash_key(AUTH["X-API-Key"])
    data = os.urandom(3000)
    with sqlite3.connect(db_path) as db:
        db.execute("INSERT INTO batches (id, batch_id, owner, state, created_at, updated_at) "
                   "VALUES (1, 'old', ?, 'open', '2026-01-01', '2026-01-01')", (owner,))
        db.execute("INSERT INTO batch_files (id, batch_pk, file_idx, name, mimetype, size, upload_type, "
                   "chunk_count, state, created_at, updated_at) VALUES (1, 1, 0, 'f', 'm', 3000, 'chunked', 3, "
                   "'receiving', '2026-01-01', '2026-01-01')")
        chunks = settings.uploads_dir / "1" / "1" / "chunks"
        chunks.mkdir(parents=True)
        for i in (0, 1):
            (chunks / str(i)).write_bytes(data[i * 1000:(i + 1) * 1000])
            db.execute("INSERT INTO chunks VALUES (1, ?, 1000, '2026-01-01')", (i,))
    upgrade(db_path)
    up = Uploads(await aiohttp_client(create_app(settings)))
    info = await (await up.info("old", 0)).json()
    assert info["uploadedChunkIds"] == [0, 1] and info["uploadedSize"] == 2000
    r = await up.post("old", 0, data[2000:], chunk=(2, 3), size=3000)
    assert r.status == 201, await r.text()
    assert (await up.manifest("old"))["files"][0]["sha256"] == sha256(data)


def test_downgrade_gives_the_chunk_rows_back(tmp_path) -> None:
    db_path = tmp_path / "x.sqlite3"
    upgrade(db_path)
    with sqlite3.connect(db_path) as db:
        db.execute("INSERT INTO batches (id, batch_id, owner, state, created_at, updated_at) "
                   "VALUES (1, 'b', 'o', 'open', '2026-01-01', '2026-01-01')")
        db.execute("INSERT INTO batch_files (id, batch_pk, file_idx, name, mimetype, size, upload_type, "
                   "chunk_count, chunk_size, chunk_ids, loose_ids, synced_ids, received, state, created_at, "
                   "updated_at) VALUES (3, 1, 0, 'f', 'm', 2500, 'chunked', 3, 1000, ?, X'', X'', 2000, "
                   "'receiving', '2026-01-01', '2026-01-01')", (bytes(ChunkSet.of([0, 2])),))
    from alembic import command

    from server.db.migrate import alembic_config
    command.downgrade(alembic_config(db_path), "0001")
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT file_id, chunk_idx, size FROM chunks ORDER BY chunk_idx").fetchall() == \
            [(3, 0, 1000), (3, 2, 500)]
    upgrade(db_path)  # and up again


def test_0005_counts_each_batch_once_then_its_triggers_keep_the_counts(tmp_path) -> None:
    """Migration 0005: the batches that exist get their file count and declared bytes; from then
    on the triggers keep them, whatever writes the file rows; downgrading removes both."""
    db_path = tmp_path / "x.sqlite3"
    upgrade(db_path, "0004")
    insert = ("INSERT INTO batch_files (id, batch_pk, file_idx, name, mimetype, size, upload_type, chunk_count, "
              "chunk_ids, loose_ids, synced_ids, received, state, created_at, updated_at) VALUES "
              "(?, ?, ?, 'f', 'm', ?, 'normal', 1, X'01', X'', X'01', ?, 'complete', '2026-01-01', '2026-01-01')")
    with sqlite3.connect(db_path) as db:
        for pk, name in ((1, "full"), (2, "empty")):
            db.execute("INSERT INTO batches (id, batch_id, owner, state, created_at, updated_at) "
                       "VALUES (?, ?, 'o', 'open', '2026-01-01', '2026-01-01')", (pk, name))
        db.executemany(insert, [(1, 1, 0, 100, 100), (2, 1, 1, 2000, 2000)])
    upgrade(db_path)

    def counts(db: sqlite3.Connection) -> list[tuple[str, int, int]]:
        return db.execute("SELECT batch_id, file_count, declared_bytes FROM batches ORDER BY id").fetchall()

    with sqlite3.connect(db_path) as db:
        assert counts(db) == [("full", 2, 2100), ("empty", 0, 0)]
        db.execute(insert, (3, 2, 0, 7, 7))
        db.execute("UPDATE batch_files SET size = 50 WHERE id = 1")
        db.execute("DELETE FROM batch_files WHERE id = 2")
        assert counts(db) == [("full", 1, 50), ("empty", 1, 7)]
    from alembic import command

    from server.db.migrate import alembic_config
    command.downgrade(alembic_config(db_path), "0004")
    with sqlite3.connect(db_path) as db:
        assert [r[1] for r in db.execute("PRAGMA table_info(batches)")] == \
            ["id", "batch_id", "owner", "state", "created_at", "updated_at"]
        assert db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall() == []
        assert db.execute("SELECT id, batch_pk, size FROM batch_files ORDER BY id").fetchall() == [(1, 1, 50), (3, 2, 7)]
    upgrade(db_path)  # and up again: counted again
    with sqlite3.connect(db_path) as db:
        assert counts(db) == [("full", 1, 50), ("empty", 1, 7)]
