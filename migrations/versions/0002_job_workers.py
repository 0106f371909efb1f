"""job workers: claims name their worker, rows count limit kills, a claim cursor per job,
notification indexes

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 09:00:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('job_workers',
    sa.Column('worker_id', sa.String(length=32), nullable=False),
    sa.Column('host', sa.String(length=300), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=False),
    sa.Column('seen_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('worker_id', name=op.f('pk_job_workers'))
    )
    with op.batch_alter_table('job_rows', schema=None) as batch_op:
        batch_op.add_column(sa.Column('claimed_by', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('attempts', sa.Integer(), server_default='0', nullable=False))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('claim_from', sa.Integer(), server_default='0', nullable=False))
        batch_op.create_index(batch_op.f('ix_jobs_callback_state'), ['callback_state'], unique=False)
        batch_op.create_index(batch_op.f('ix_jobs_email_state'), ['email_state'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_jobs_email_state'))
        batch_op.drop_index(batch_op.f('ix_jobs_callback_state'))
        batch_op.drop_column('claim_from')
    with op.batch_alter_table('job_rows', schema=None) as batch_op:
        batch_op.drop_column('attempts')
        batch_op.drop_column('claimed_by')
    op.drop_table('job_workers')
