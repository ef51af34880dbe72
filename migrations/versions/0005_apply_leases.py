"""promotion_requests.apply_owner and apply_lease_until: an apply in progress belongs to the process running it

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08 10:00:00

The process that starts an apply writes its owner (host:pid:random) and a lease expiry with `applying`, renews
the lease while the backend call runs and clears both when the apply finishes. A request still `applying` whose
lease lapsed lost its owner: it is settled with what the backend shows. Rows from before this migration have
no owner: an apply they record as running belongs to no live process and is settled at once.
"""
import sqlalchemy as sa
from alembic import op


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("promotion_requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("apply_owner", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("apply_lease_until", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("promotion_requests", schema=None) as batch_op:
        batch_op.drop_column("apply_lease_until")
        batch_op.drop_column("apply_owner")
