"""outbox: the messages the bot sends to Slack on its own, recorded with the state changes that cause them

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08 10:00:00

One row per Slack message (a training message, a review card, its file, an audit checkpoint, a notice to a
person): what it is about, where it goes, the revision wanted and the one delivered, where it landed (channel and
ts), the attempts and the next one, the lease of the sender working on it, and the permanent error that stopped it.
"""
import sqlalchemy as sa
from alembic import op


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("subject", sa.String(length=100), nullable=False),
        sa.Column("channel", sa.String(length=40), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("notify", sa.String(length=200), nullable=True),
        sa.Column("wanted", sa.Integer(), nullable=False),
        sa.Column("delivered", sa.Integer(), nullable=False),
        sa.Column("posted_channel", sa.String(length=40), nullable=True),
        sa.Column("ts", sa.String(length=40), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("first_attempt_at", sa.DateTime(), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("error", sa.String(length=100), nullable=True),
        sa.Column("failed_at", sa.DateTime(), nullable=True),
        sa.Column("lease_owner", sa.String(length=100), nullable=True),
        sa.Column("lease_until", sa.DateTime(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("delivered_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("kind", "subject", name="uq_outbox_kind_subject"),
    )
    op.create_index("ix_outbox_due", "outbox", ["next_attempt_at"])


def downgrade() -> None:
    op.drop_index("ix_outbox_due", table_name="outbox")
    op.drop_table("outbox")
