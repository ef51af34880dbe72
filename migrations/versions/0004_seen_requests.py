"""seen_requests: the signatures of Slack requests already taken, so a replay within the window is not acted on

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 14:00:00

One row per signed request the bot acted on (its X-Slack-Signature and when it arrived); rows older than the
replay window are deleted as new requests come in. In the database rather than in memory so that every replica
refuses a request another one already took.
"""
import sqlalchemy as sa
from alembic import op


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "seen_requests",
        sa.Column("signature", sa.String(length=100), primary_key=True),
        sa.Column("seen_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_seen_requests_seen_at", "seen_requests", ["seen_at"])


def downgrade() -> None:
    op.drop_index("ix_seen_requests_seen_at", table_name="seen_requests")
    op.drop_table("seen_requests")
