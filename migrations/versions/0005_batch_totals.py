"""uploads: a batch's file count and declared bytes kept on its row, by triggers

The batch limits (``FILEDROP_MAX_FILES_PER_BATCH``, ``FILEDROP_MAX_BATCH_BYTES``) were checked by
counting the batch's file rows in every group commit that adds a file: O(files in the batch) per
group (0.2 ms at 1,000 files, 0.8 at 4,000 on SQLite). ``batches.file_count`` and
``batches.declared_bytes`` now hold them, read with the batch row, and triggers on
``batch_files`` keep them right whatever writes the rows (the group commit, a file's removal, a
drop, the janitor, a cascade). Existing batches are counted once here.

A later migration that copies ``batch_files`` (Alembic's batch mode on SQLite) drops its
triggers: it must create them again (``_create_triggers``).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 19:00:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

_ADD = "UPDATE batches SET file_count = file_count + 1, declared_bytes = declared_bytes + NEW.size " \
       "WHERE id = NEW.batch_pk"
_SUB = "UPDATE batches SET file_count = file_count - 1, declared_bytes = declared_bytes - OLD.size " \
       "WHERE id = OLD.batch_pk"


def _create_triggers() -> None:
    if op.get_bind().dialect.name == 'sqlite':
        op.execute(f"CREATE TRIGGER batch_files_totals_insert AFTER INSERT ON batch_files BEGIN {_ADD}; END")
        op.execute(f"CREATE TRIGGER batch_files_totals_delete AFTER DELETE ON batch_files BEGIN {_SUB}; END")
        op.execute("CREATE TRIGGER batch_files_totals_update AFTER UPDATE OF size, batch_pk ON batch_files "
                   f"BEGIN {_SUB}; {_ADD}; END")
        return
    op.execute(f"""
        CREATE FUNCTION batch_files_totals() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP IN ('DELETE', 'UPDATE') THEN {_SUB}; END IF;
            IF TG_OP IN ('INSERT', 'UPDATE') THEN {_ADD}; END IF;
            RETURN NULL;
        END $$""")
    op.execute("CREATE TRIGGER batch_files_totals AFTER INSERT OR DELETE OR UPDATE OF size, batch_pk "
               "ON batch_files FOR EACH ROW EXECUTE FUNCTION batch_files_totals()")


def _drop_triggers() -> None:
    if op.get_bind().dialect.name == 'sqlite':
        for name in ('insert', 'delete', 'update'):
            op.execute(f"DROP TRIGGER IF EXISTS batch_files_totals_{name}")
        return
    op.execute("DROP TRIGGER IF EXISTS batch_files_totals ON batch_files")
    op.execute("DROP FUNCTION IF EXISTS batch_files_totals()")


def upgrade() -> None:
    # Plain ALTER TABLE ... ADD COLUMN on both engines (no table copy: SQLite keeps AUTOINCREMENT).
    op.add_column('batches', sa.Column('file_count', sa.Integer(), server_default='0', nullable=False))
    op.add_column('batches', sa.Column('declared_bytes', sa.BigInteger(), server_default='0', nullable=False))
    op.execute("UPDATE batches SET "
               "file_count = (SELECT count(*) FROM batch_files f WHERE f.batch_pk = batches.id), "
               "declared_bytes = (SELECT coalesce(sum(f.size), 0) FROM batch_files f WHERE f.batch_pk = batches.id)")
    _create_triggers()


def downgrade() -> None:
    _drop_triggers()
    # ALTER TABLE ... DROP COLUMN (SQLite 3.35+): no copy of ``batches``, whose removal would
    # cascade to its files.
    op.execute("ALTER TABLE batches DROP COLUMN declared_bytes")
    op.execute("ALTER TABLE batches DROP COLUMN file_count")
