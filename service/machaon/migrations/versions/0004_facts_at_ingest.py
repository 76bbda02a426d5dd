"""header facts recorded at ingest, destinations recorded on jobs

The rules' facts (series: protocol name, body part, image type; instances: frames, rows, columns)
are recorded when an instance is received, so planning reads no file. This revision only adds the
columns: rows already there get their facts from the headers of their spool files in the step
`machaon db upgrade` runs next (scp.record_missing_facts; the spool path is in the configuration,
which a migration does not know). A row whose file cannot be read keeps NULL facts, and planning
names it on its study.

jobs.destinations stays NULL for jobs planned before (the rules are in the configuration too): such
a job delivers to what its rule, looked up by name when the job runs, says, as before this revision.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.add_column(sa.Column('protocol_name', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('body_part', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('image_type', sa.String(length=256), nullable=True))
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('frames', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('rows', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('columns', sa.Integer(), nullable=True))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('destinations', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('destinations')
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_column('columns')
        batch_op.drop_column('rows')
        batch_op.drop_column('frames')
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_column('image_type')
        batch_op.drop_column('body_part')
        batch_op.drop_column('protocol_name')
