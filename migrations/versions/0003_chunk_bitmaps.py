"""uploads: chunk ids as bitmaps in the file row (chunks table dropped), chunk layout, bytes received

A chunk costs O(1) to record whatever the file holds: the file row carries bitmaps of its recorded,
loose and synced chunk ids, the uniform chunk size of its in-place layout and the bytes received.
Existing rows are converted: their chunks become recorded, loose (they are files in chunks/) and
synced; complete files get every id.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 10:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


# Batch mode copies the table, and reflection does not see AUTOINCREMENT: without this, row ids
# (which name directories on disk) could be handed out again.
_KEEP = {'sqlite_autoincrement': True}


def _bitmap(ids):
    out = bytearray()
    for i in ids:
        byte = i >> 3
        if byte >= len(out):
            out.extend(bytes(byte + 1 - len(out)))
        out[byte] |= 1 << (i & 7)
    return bytes(out.rstrip(b"\0"))


def _ids(raw):
    return [byte * 8 + b for byte, v in enumerate(raw or b"") for b in range(8) if v >> b & 1]


files = sa.table('batch_files', sa.column('id', sa.Integer), sa.column('size', sa.BigInteger),
                 sa.column('chunk_count', sa.Integer), sa.column('state', sa.String),
                 sa.column('chunk_size', sa.BigInteger), sa.column('chunk_ids', sa.LargeBinary),
                 sa.column('loose_ids', sa.LargeBinary), sa.column('synced_ids', sa.LargeBinary),
                 sa.column('received', sa.BigInteger))
chunks = sa.table('chunks', sa.column('file_id', sa.Integer), sa.column('chunk_idx', sa.Integer),
                  sa.column('size', sa.BigInteger), sa.column('received_at', sa.DateTime))


def _sequence():
    """SQLite's AUTOINCREMENT high-water mark of batch_files (a copied table restarts it at the
    highest id left, so ids of deleted rows could come again)."""
    conn = op.get_bind()
    if conn.dialect.name != 'sqlite':
        return None
    return conn.exec_driver_sql("SELECT seq FROM sqlite_sequence WHERE name = 'batch_files'").scalar()


def _restore_sequence(seq):
    if seq is not None:
        op.get_bind().exec_driver_sql(
            "UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'batch_files'", (seq,))


def upgrade() -> None:
    seq = _sequence()
    with op.batch_alter_table('batch_files', schema=None, table_kwargs=_KEEP) as batch_op:
        batch_op.add_column(sa.Column('chunk_size', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('chunk_ids', sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column('loose_ids', sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column('synced_ids', sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column('received', sa.BigInteger(), nullable=True))

    conn = op.get_bind()
    got: dict[int, list[tuple[int, int]]] = {}
    for file_id, idx, size in conn.execute(sa.select(chunks.c.file_id, chunks.c.chunk_idx, chunks.c.size)):
        got.setdefault(file_id, []).append((idx, size))
    for file_id, size, count, state in conn.execute(
            sa.select(files.c.id, files.c.size, files.c.chunk_count, files.c.state)).all():
        if state == 'complete':
            ids, loose, received = _bitmap(range(count)), b"", size
        else:
            rows = got.get(file_id, [])
            ids = loose = _bitmap(i for i, _ in rows)
            received = sum(n for _, n in rows)
        conn.execute(sa.update(files).where(files.c.id == file_id).values(
            chunk_ids=ids, loose_ids=loose, synced_ids=ids, received=received))

    with op.batch_alter_table('batch_files', schema=None, table_kwargs=_KEEP) as batch_op:
        for name in ('chunk_ids', 'loose_ids', 'synced_ids'):
            batch_op.alter_column(name, existing_type=sa.LargeBinary(), nullable=False)
        batch_op.alter_column('received', existing_type=sa.BigInteger(), nullable=False)
    _restore_sequence(seq)
    op.drop_table('chunks')


def downgrade() -> None:
    # Best effort: one chunks row per recorded id, sized by the uniform layout where there is one
    # (a file stored on its own chunks gets the bytes received spread over its first row).
    op.create_table('chunks',
    sa.Column('file_id', sa.Integer(), nullable=False),
    sa.Column('chunk_idx', sa.Integer(), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('received_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['file_id'], ['batch_files.id'], name=op.f('fk_chunks_file_id_batch_files'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('file_id', 'chunk_idx', name=op.f('pk_chunks'))
    )
    seq = _sequence()
    conn = op.get_bind()
    now = sa.func.current_timestamp()
    for file_id, size, count, stride, raw, received in conn.execute(sa.select(
            files.c.id, files.c.size, files.c.chunk_count, files.c.chunk_size, files.c.chunk_ids,
            files.c.received)).all():
        for n, idx in enumerate(_ids(raw)):
            if stride:
                length = stride if idx < count - 1 else size - stride * (count - 1)
            else:
                length = received if n == 0 else 0
            conn.execute(sa.insert(chunks).values(file_id=file_id, chunk_idx=idx, size=length, received_at=now))
    with op.batch_alter_table('batch_files', schema=None, table_kwargs=_KEEP) as batch_op:
        for name in ('received', 'synced_ids', 'loose_ids', 'chunk_ids', 'chunk_size'):
            batch_op.drop_column(name)
    _restore_sequence(seq)
