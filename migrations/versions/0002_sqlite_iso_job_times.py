"""job and version times stored as ISO UTC text on SQLite

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 10:05:00

The times of jobs and versions (jobs.created_at, started_at, ended_at; versions.created_at) are shown to the
second. On SQLite they are now stored as the text the views return ('2026-11-27T09:30:00Z'; 0003 undid this)
instead of SQLAlchemy's default ('2026-11-27 09:30:00.123456'); this rewrites the rows stored before. PostgreSQL
keeps its timestamp columns: nothing changes there.
"""
from alembic import op


revision = '0002'
down_revision = '0001'
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
    _rewrite("T", "Z", " ")  # '2026-11-27 09:30:00.123456' -> '2026-11-27T09:30:00Z'


def downgrade() -> None:
    _rewrite(" ", ".000000", "T")  # back to SQLAlchemy's default text (the fraction was not kept)
