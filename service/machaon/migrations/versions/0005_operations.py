"""operations: job retries with backoff, cancelled jobs, API tokens, indexes for operators' queries

jobs.not_before holds a job queued again after a failure that may pass until its backoff has run
out; jobs.timings keeps the seconds each stage of its last run took; jobs.stops counts the attempts
its worker did not survive; studies.delivered_at, when a result of the study was last delivered
(the latency from its last image), is filled in from the deliveries already sent. api_tokens keeps the SHA-256
of each bearer token (never the token). The indexes serve the queue, the lists of failed jobs and
deliveries, the study search and the summary's last hour.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'api_tokens',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('role', sa.String(length=16), nullable=False),
        sa.Column('token_sha256', sa.String(length=64), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('created_by', sa.String(length=128), nullable=False),
        sa.Column('last_used_at', sa.DateTime(), nullable=True),
        sa.Column('revoked_at', sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('name'),
        sa.UniqueConstraint('token_sha256'),
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('not_before', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('timings', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('stops', sa.Integer(), server_default='0', nullable=False))
        batch_op.create_index('ix_jobs_queue', ['status', sa.text('priority DESC'), 'created_at', 'id'],
                              unique=False)
        batch_op.create_index('ix_jobs_status_finished', ['status', 'finished_at'], unique=False)
        batch_op.create_index('ix_jobs_status_model', ['status', 'model'], unique=False)
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.create_index('ix_deliveries_destination_status', ['destination', 'status'], unique=False)
        batch_op.create_index(batch_op.f('ix_deliveries_sent_at'), ['sent_at'], unique=False)
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_studies_patient_id'), ['patient_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_studies_accession_number'), ['accession_number'], unique=False)
        batch_op.create_index(batch_op.f('ix_studies_completed_at'), ['completed_at'], unique=False)
        batch_op.add_column(sa.Column('delivered_at', sa.DateTime(), nullable=True))
        batch_op.create_index(batch_op.f('ix_studies_delivered_at'), ['delivered_at'], unique=False)
    # What was delivered before: each study's latest send (one aggregate; UPDATE ... FROM is in
    # PostgreSQL and in SQLite since 3.33).
    op.execute(
        "UPDATE studies SET delivered_at = latest.sent_at FROM (SELECT jobs.study_id AS study_id,"
        " max(deliveries.sent_at) AS sent_at FROM deliveries"
        " JOIN results ON results.id = deliveries.result_id JOIN jobs ON jobs.id = results.job_id"
        " GROUP BY jobs.study_id) AS latest"
        " WHERE latest.study_id = studies.id"
    )


def downgrade() -> None:
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_studies_delivered_at'))
        batch_op.drop_column('delivered_at')
        batch_op.drop_index(batch_op.f('ix_studies_completed_at'))
        batch_op.drop_index(batch_op.f('ix_studies_accession_number'))
        batch_op.drop_index(batch_op.f('ix_studies_patient_id'))
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_deliveries_sent_at'))
        batch_op.drop_index('ix_deliveries_destination_status')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_status_model')
        batch_op.drop_index('ix_jobs_status_finished')
        batch_op.drop_index('ix_jobs_queue')
        batch_op.drop_column('stops')
        batch_op.drop_column('timings')
        batch_op.drop_column('not_before')
    op.drop_table('api_tokens')
