"""The two databases every benchmark measures: a fresh SQLite file and a temporary PostgreSQL database."""

from __future__ import annotations

import sqlite3
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

PG_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/{name}"

# (SQLAlchemy URL, a raw DB-API connection factory for the baseline, the driver's placeholder)
Database = tuple[str, Callable[[], Any], str]


def pg_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_DSN, connect_timeout=3):
            return True
    except Exception:
        return False


@contextmanager
def sqlite_db(work: Path, name: str = "sqlite") -> Iterator[Database]:
    path = work / name / "starchart.db"
    path.parent.mkdir(parents=True)
    yield f"sqlite:///{path}", lambda: sqlite3.connect(str(path)), "?"


@contextmanager
def pg_db() -> Iterator[Database]:
    """A temporary PostgreSQL database at the newest schema, always dropped."""
    import psycopg

    name = f"starchart_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        from model_registry.adapters.db import upgrade_database

        url = PG_URL.format(name=name)
        upgrade_database(url)  # as the release step leaves it: processes on PostgreSQL do not migrate
        dsn = f"host=127.0.0.1 port=5432 user=postgres dbname={name}"
        yield url, lambda: psycopg.connect(dsn, autocommit=True), "%s"
    finally:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        print(f"dropped temporary database {name}", file=sys.stderr, flush=True)
