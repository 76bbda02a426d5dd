"""retention: when a study's files were removed from the spool

studies.files_removed_at is when retention last removed the spool files of a finished, delivered
study (its rows stay); NULL for every study kept so far.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('files_removed_at', sa.DateTime(), nullable=True))
        batch_op.create_index(batch_op.f('ix_studies_files_removed_at'), ['files_removed_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_studies_files_removed_at'))
        batch_op.drop_column('files_removed_at')
