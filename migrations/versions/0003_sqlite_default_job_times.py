"""job and version times stored as SQLAlchemy's default DateTime text on SQLite again

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 12:00:00

Every time in the database is a plain DateTime (naive UTC) again: the views format them in Python. On SQLite
this rewrites the job and version times 0002 stored as ISO UTC text ('2026-11-27T09:30:00Z') back to
SQLAlchemy's default ('2026-11-27 09:30:00.000000'), which the other tables use and their comparisons assume.
PostgreSQL needs nothing: its columns stayed `timestamp without time zone` through 0002, which only wrote text
on SQLite.
"""
from alembic import op


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

COLUMNS = {"jobs": ("created_at", "started_at", "ended_at"), "versions": ("created_at",)}


def _rewrite(separator: str, suffix: str, old_separator: str) -> None:
    """Rewrite the SQLite text of every time column whose date/time separator is `old_separator`."""
    if op.get_bind().dialect.name != "sqlite":
        return
    for table, columns in COLUMNS.items():
        for column in columns:
            op.execute(f"UPDATE {table} SET {column} = substr({column}, 1, 10) || '{separator}' || "
                       f"substr({column}, 12, 8) || '{suffix}' "
                       f"WHERE {column} IS NOT NULL AND substr({column}, 11, 1) = '{old_separator}'")


def upgrade() -> None:
    _rewrite(" ", ".000000", "T")  # '2026-11-27T09:30:00Z' -> '2026-11-27 09:30:00.000000'


def downgrade() -> None:
    _rewrite("T", "Z", " ")  # back to 0002's ISO text (to the second, as 0002 stored it)
