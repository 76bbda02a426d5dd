"""planning errors on studies, superseded jobs, results kept per job

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

# 0001 left the unique constraint on results.sop_instance_uid unnamed; on SQLite this names it so it can go.
_NAMING = {"uq": "uq_%(table_name)s_%(column_0_name)s"}


def upgrade() -> None:
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('planning_error', sa.Text(), nullable=True))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('superseded_by', sa.Integer(), nullable=True))
    # A re-run's results are rows of its own job: unique per job, not per SOP Instance UID.
    bind = op.get_bind()
    if bind.dialect.name == 'postgresql':
        [name] = [c['name'] for c in sa.inspect(bind).get_unique_constraints('results')
                  if c['column_names'] == ['sop_instance_uid']]
        assert name is not None  # PostgreSQL names every constraint
        op.drop_constraint(name, 'results', type_='unique')
    else:
        with op.batch_alter_table('results', naming_convention=_NAMING) as batch_op:
            batch_op.drop_constraint('uq_results_sop_instance_uid', type_='unique')
    with op.batch_alter_table('results', schema=None) as batch_op:
        batch_op.create_unique_constraint('uq_results_job_id_sop_instance_uid',
                                          ['job_id', 'sop_instance_uid'])
        batch_op.create_index(batch_op.f('ix_results_sop_instance_uid'), ['sop_instance_uid'], unique=False)


def downgrade() -> None:
    # One row per SOP Instance UID again: the first job's row keeps the object's deliveries
    # (a later job's row holds at most deliveries to other destinations), the others go.
    op.execute("""UPDATE deliveries SET result_id = (
        SELECT MIN(first.id) FROM results first
        JOIN results own ON own.sop_instance_uid = first.sop_instance_uid
        WHERE own.id = deliveries.result_id)""")
    op.execute("""DELETE FROM results
        WHERE id NOT IN (SELECT MIN(id) FROM results GROUP BY sop_instance_uid)""")
    with op.batch_alter_table('results', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_results_sop_instance_uid'))
        batch_op.drop_constraint('uq_results_job_id_sop_instance_uid', type_='unique')
        batch_op.create_unique_constraint('uq_results_sop_instance_uid', ['sop_instance_uid'])
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('superseded_by')
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_column('planning_error')
