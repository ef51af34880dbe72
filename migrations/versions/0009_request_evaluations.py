"""promotion_requests.evaluation_state and .evaluation: candidate and default evaluated on the same data

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-20 10:00:00

When a model has `evaluation: {data, label, output}`, a promotion request's candidate and current default are
evaluated on that data by a backend job. The request keeps the evaluation's state (indexed: the worker follows the
pending and running ones) and what it found, as JSON. Rows from before this migration have neither (NULL): their
cards say they were not evaluated.
"""
import sqlalchemy as sa
from alembic import op


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("promotion_requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("evaluation_state", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("evaluation", sa.JSON(), nullable=True))
        batch_op.create_index("ix_promotion_requests_evaluation_state", ["evaluation_state"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("promotion_requests", schema=None) as batch_op:
        batch_op.drop_index("ix_promotion_requests_evaluation_state")
        batch_op.drop_column("evaluation")
        batch_op.drop_column("evaluation_state")
