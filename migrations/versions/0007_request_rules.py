"""promotion_requests.rules: the approval rules that applied to a request when it opened

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-15 10:00:00

`rules:` in starchart.yaml raise or change the approvals a request needs by what changes (a breaking signature
change, a metric drop, a rollback, a canary). Which rules applied, why, how many approvals each needs from whom
and who has approved for each are decided when the request opens and kept with it, as JSON. Rows from before
this migration have none (NULL): the model's policy decides them, as it did.
"""
import sqlalchemy as sa
from alembic import op


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("promotion_requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rules", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("promotion_requests", schema=None) as batch_op:
        batch_op.drop_column("rules")
