"""Engine and schema: SQLite (default) or PostgreSQL, migrated with Alembic on open."""

from __future__ import annotations

import fcntl
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, cast

from sqlalchemy import CursorResult, Result, create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from model_registry.domain.errors import InvalidInput

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
SCHEMA_HEAD = "0006"  # the newest migration's revision; tests check it against Alembic's head
_PG_MIGRATION_LOCK = 0x5354415243  # "STARC": serialises concurrent first starts
_JSON = json.JSONDecoder()
MESSAGE_RECORDED = "starchart_message_recorded"  # set in a session's info by adapters.outbox
LOCAL_SENDER = "starchart_local_sender"  # (owner, lease seconds) of this process's outbox sender, for adapters.outbox
HANDED = "starchart_handed"  # new messages leased to that sender in the transaction, as recorded


def _sqlite_json(text: str) -> Any:
    # sqlite3 hands back the text SQLAlchemy's json.dumps wrote (no surrounding whitespace): the C scanner alone,
    # without json.loads' checks and whitespace skipping (-0.4 ms of a 1,000-row `versions`, 6 ms: under 3x)
    return _JSON.raw_decode(text)[0]


def make_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise InvalidInput(f"DATABASE_URL {url!r} is not a database URL",
                           "use sqlite:///path/to.db or postgresql://user@host/db") from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise InvalidInput(f"DATABASE_URL uses {parsed.get_backend_name()}, which StarChart does not support",
                           "use SQLite (sqlite:///path/to.db) or PostgreSQL (postgresql://user@host/db)")
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False},
                               json_deserializer=_sqlite_json)
        _sqlite_serialised_writes(engine)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        url = str(parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False))
    # a pooled connection the server closed (restart, idle timeout, pg_terminate_backend) is replaced on checkout
    engine = create_engine(url, pool_pre_ping=True)
    _pg_iso_datestyle(engine)
    return engine


def _sqlite_serialised_writes(engine: Engine) -> None:
    # pysqlite's lazy BEGIN lets two writers read the same chain head; BEGIN IMMEDIATE takes
    # the write lock up front, so a transaction sees and changes a consistent database.
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _rec: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get("starchart_read") else "BEGIN IMMEDIATE")


def _pg_iso_datestyle(engine: Engine) -> None:
    # the list queries read times as text (listings._as_text): ISO whatever DateStyle the server defaults to
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _rec: Any) -> None:
        dbapi_conn.execute("SET DateStyle TO ISO")
        dbapi_conn.commit()  # a SET in a transaction rolled back later would be undone


def reader(engine: Engine) -> Engine:
    """The same database for read-only work: no write lock on SQLite, no transaction round trips on PostgreSQL."""
    if engine.dialect.name == "sqlite":
        return engine.execution_options(starchart_read=True)
    return engine.execution_options(isolation_level="AUTOCOMMIT")


def alembic_config(engine: Engine) -> Any:
    from alembic.config import Config  # Alembic loads only when a migration has to run

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def current_revision(engine: Engine) -> str | None:
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except DBAPIError:
        return None


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration; a no-op when it is already there."""
    if current_revision(engine) == SCHEMA_HEAD:
        return
    from alembic import command

    cfg = alembic_config(engine)
    if engine.dialect.name == "sqlite":
        lock_path = Path(engine.url.database or "starchart.db").with_suffix(".migrate.lock")
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            command.upgrade(cfg, "head")
        return
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        try:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            conn.commit()
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_MIGRATION_LOCK})
            conn.commit()


class Database:
    """The records' database, migrated when opened: units of work for changes, read-only sessions for reads."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        migrate(self.engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.reader = reader(self.engine)  # read-only work: no write lock on SQLite, no transaction on PostgreSQL
        self.reads = sessionmaker(self.reader, expire_on_commit=False)
        # called after a commit that recorded a message, with the new messages leased to `sender` (as recorded)
        self.after_message: list[Callable[[list[dict[str, Any]]], None]] = []
        self.sender: tuple[str, float] | None = None  # this process's outbox sender: (owner, lease seconds)

    @contextmanager
    def unit_of_work(self) -> Iterator[Session]:
        """One transaction: every state change commits with its audit event, or neither does."""
        with self.sessions.begin() as session:
            session.info[LOCAL_SENDER] = self.sender
            yield session
        handed = session.info.pop(HANDED, [])
        if session.info.pop(MESSAGE_RECORDED, False):  # the sender in this process need not wait for its poll
            for wake in list(self.after_message):
                wake(handed)

    def dispose(self) -> None:
        self.engine.dispose()


def rows_changed(result: Result[Any]) -> int:
    """How many rows an UPDATE changed: the conditional updates that make a transition happen once."""
    return cast(CursorResult[Any], result).rowcount
