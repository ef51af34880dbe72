"""canaries: a promotion request may run as a canary (a share of the default's traffic) before its promotion

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-20 10:00:00

The request keeps what its canary asked (percent, bake), when it started and ended, by whom and why, and the
figures last read from the backend (requests, errors, latency per side, agreement on mirrored requests).
"""
import sqlalchemy as sa
from alembic import op


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

COLUMNS = (
    ("canary_percent", sa.Integer()),
    ("canary_bake_seconds", sa.Integer()),
    ("canary_started_at", sa.DateTime()),
    ("canary_ended_at", sa.DateTime()),
    ("canary_ended_by", sa.String(length=200)),
    ("canary_why", sa.Text()),
    ("canary_figures", sa.JSON()),
)


def upgrade() -> None:
    with op.batch_alter_table("promotion_requests") as batch:
        for name, kind in COLUMNS:
            batch.add_column(sa.Column(name, kind, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("promotion_requests") as batch:
        for name, _kind in reversed(COLUMNS):
            batch.drop_column(name)
