"""jobs per series and model, result deliveries per destination

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('studies', schema=None) as batch_op:
        # How many of the study's completions have had their jobs planned.
        batch_op.add_column(sa.Column('planned_count', sa.Integer(), nullable=False, server_default='0'))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('series_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('rule', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('generation', sa.Integer(), nullable=False, server_default='1'))
        batch_op.create_index(batch_op.f('ix_jobs_series_id'), ['series_id'], unique=False)
        batch_op.create_foreign_key('fk_jobs_series_id', 'series', ['series_id'], ['id'], ondelete='CASCADE')
    op.create_table('deliveries',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('result_id', sa.Integer(), nullable=False),
    sa.Column('destination', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('sent_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['result_id'], ['results.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('result_id', 'destination')
    )
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_deliveries_status'), ['status'], unique=False)


def downgrade() -> None:
    op.drop_table('deliveries')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_constraint('fk_jobs_series_id', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_jobs_series_id'))
        batch_op.drop_column('generation')
        batch_op.drop_column('rule')
        batch_op.drop_column('series_id')
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_column('planned_count')
