"""Engine and schema: SQLite (default) or PostgreSQL, migrated with Alembic.

SQLite, the embedded default, is migrated when it is opened; any other database is migrated once per deploy by
`starchart db upgrade` (the Procfile's `release:`), and a process refuses to start on an older schema.
"""

from __future__ import annotations

import fcntl
import functools
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, cast

from sqlalchemy import CursorResult, Result, Table, create_engine, event, inspect, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from model_registry.domain.errors import InvalidInput, SchemaError, StarchartError

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
# The newest migration's revision, so that a start on an up-to-date database need not load Alembic (0.1 s of every
# command); tests check it against Alembic's head, and Alembic itself is asked whenever the two differ.
SCHEMA_HEAD = "0009"
UPGRADE_HINT = "run `starchart db upgrade` (the Procfile's release: step runs it on every deploy), then start again"
_PG_MIGRATION_LOCK = 0x5354415243  # "STARC": serialises concurrent first starts
_JSON = json.JSONDecoder()
MESSAGE_RECORDED = "starchart_message_recorded"  # set in a session's info by adapters.outbox
LOCAL_SENDER = "starchart_local_sender"  # (owner, lease seconds) of this process's outbox sender, for adapters.outbox
HANDED = "starchart_handed"  # new messages leased to that sender in the transaction, as recorded


def _sqlite_json(text: str) -> Any:
    # sqlite3 hands back the text SQLAlchemy's json.dumps wrote (no surrounding whitespace): the C scanner alone,
    # without json.loads' checks and whitespace skipping (-0.4 ms of a 1,000-row `versions`, 6 ms: under 3x)
    return _JSON.raw_decode(text)[0]


def insert_if_new(session: Session, model: type[Any], **values: Any) -> bool:
    """INSERT … ON CONFLICT DO NOTHING (SQLite and PostgreSQL have it): whether the row was new.

    A row that is there already is no error: no rollback, and no exception whose traceback and SQLAlchemy's frames
    make garbage only the collector's full passes free (each of which holds the GIL).
    """
    statement = _insert_ignoring(session.get_bind().dialect.name, cast(Table, model.__table__))
    return session.execute(statement, values).first() is not None


@functools.cache
def _insert_ignoring(dialect: str, table: Table) -> Any:
    # Built once per table: building the statement cost twice as much as running it (0.3 ms a Slack request).
    from sqlalchemy.dialects import postgresql, sqlite

    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    # a row comes back only when it was inserted (rowcount is -1 on psycopg)
    return insert(table).on_conflict_do_nothing().returning(*table.primary_key.columns)


def make_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise InvalidInput(f"DATABASE_URL {url!r} is not a database URL",
                           "use sqlite:///path/to.db or postgresql://user@host/db") from None
    if parsed.get_backend_name() == "postgres":  # Heroku's DATABASE_URL: postgres://user:password@host:port/db
        parsed = parsed.set(drivername=parsed.drivername.replace("postgres", "postgresql", 1))
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
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    # a pooled connection the server closed (restart, idle timeout, pg_terminate_backend) is replaced on checkout
    engine = create_engine(parsed, pool_pre_ping=True)
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


def _revision_of(conn: Any) -> str | None:
    """The revision read on a connection that must stay usable (a failed SELECT would abort PostgreSQL's transaction)."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def known_revisions(engine: Engine) -> list[str]:
    """Every revision of migrations/, oldest first, as Alembic reads them (loads Alembic: not for the fast path)."""
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(alembic_config(engine))
    return [s.revision for s in reversed(list(scripts.walk_revisions()))]


def shown(engine: Engine) -> str:
    """The database's URL as messages show it: without the password."""
    return engine.url.render_as_string(hide_password=True)


class Migrated(NamedTuple):
    """What `migrate` did: the schema revision before (None: an empty database) and after."""

    before: str | None
    after: str

    def __str__(self) -> str:
        if self.before == self.after:
            return f"the schema is at revision {self.after}, the newest: nothing to do"
        return f"migrated the schema from {f'revision {self.before}' if self.before else 'an empty database'} " \
               f"to revision {self.after}"


def migrate(engine: Engine) -> Migrated:
    """Bring the schema to the newest migration, once even when several processes start at the same moment; a no-op
    when it is already there. A database migrated by a newer release is refused, not touched."""
    current = current_revision(engine)
    if current == SCHEMA_HEAD:
        return Migrated(current, current)
    cfg = alembic_config(engine)
    if engine.dialect.name == "sqlite":
        lock_path = Path(engine.url.database or "starchart.db").with_suffix(".migrate.lock")
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            before = current_revision(engine)
            _upgrade(cfg, engine, before)
        return Migrated(before, current_revision(engine) or "")
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        try:
            before = _revision_of(conn)
            conn.commit()
            cfg.attributes["connection"] = conn
            _upgrade(cfg, engine, before)
            conn.commit()
            after = _revision_of(conn)
            conn.commit()
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_MIGRATION_LOCK})
            conn.commit()
    return Migrated(before, after or "")


def _upgrade(cfg: Any, engine: Engine, before: str | None) -> None:
    from alembic import command

    known = known_revisions(engine)
    if before is not None and before not in known:
        raise _newer(engine, before, known)
    if before != known[-1]:
        command.upgrade(cfg, "head")


def _newer(engine: Engine, revision: str, known: list[str]) -> SchemaError:
    return SchemaError(
        f"the database {shown(engine)} is at schema revision {revision}, which this release does not know "
        f"(its newest is {known[-1]}): a newer release migrated it",
        "run the release that migrated it, or downgrade the database with that release's migrations")


def require_schema(engine: Engine) -> None:
    """Refuse a database whose schema is not this release's newest: empty, older, or migrated by a newer release."""
    current = current_revision(engine)
    if current == SCHEMA_HEAD:
        return
    known = known_revisions(engine)
    if current == known[-1]:
        return
    if current is None:
        raise SchemaError(f"the database {shown(engine)} has no StarChart schema yet "
                          f"(this release needs revision {known[-1]})", UPGRADE_HINT)
    if current not in known:
        raise _newer(engine, current, known)
    raise SchemaError(f"the database {shown(engine)} is at schema revision {current}; this release needs "
                      f"revision {known[-1]}", UPGRADE_HINT)


def open_schema(engine: Engine) -> None:
    """What a starting process does: SQLite (one machine, the default) is migrated on the spot; any other database
    must have been migrated by `starchart db upgrade`, once per deploy, and is refused until it has."""
    if engine.dialect.name == "sqlite":
        migrate(engine)
    else:
        require_schema(engine)


def check_database(url: str) -> None:
    """open_schema for a process that opens the database later (the web process's master, Socket Mode)."""
    engine = make_engine(url)
    try:
        open_schema(engine)
    finally:
        engine.dispose()


def upgrade_database(url: str) -> tuple[str, Migrated]:
    """`starchart db upgrade`: the database as shown, and what the migrations did."""
    engine = make_engine(url)
    try:
        return shown(engine), migrate(engine)
    finally:
        engine.dispose()


class Database:
    """The records' database, its schema checked when opened (SQLite: migrated): units of work for changes,
    read-only sessions for reads."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        try:
            open_schema(self.engine)
        except BaseException:
            self.engine.dispose()
            raise
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.reader = reader(self.engine)  # read-only work: no write lock on SQLite, no transaction on PostgreSQL
        self.reads = sessionmaker(self.reader, expire_on_commit=False)
        # called after a commit that recorded a message, with the new messages leased to `sender` (as recorded)
        self.after_message: list[Callable[[list[dict[str, Any]]], None]] = []
        self.sender: tuple[str, float] | None = None  # this process's outbox sender: (owner, lease seconds)
        # per message kind, the record its sender renders (a review card's promotion request), read in the transaction
        # that leases it a message: its first attempt needs no read of its own (bootstrap fills it)
        self.record_views: dict[str, Callable[[Session, str], Any]] = {}

    @contextmanager
    def unit_of_work(self) -> Iterator[Session]:
        """One transaction: every state change commits with its audit event, or neither does."""
        with self.sessions.begin() as session:
            session.info[LOCAL_SENDER] = self.sender
            yield session
            for message in session.info.get(HANDED, ()):  # as this transaction leaves them, once it has changed all
                message["record"] = self.record_view(session, message["kind"], message["subject"])
        handed = session.info.pop(HANDED, [])
        if session.info.pop(MESSAGE_RECORDED, False):  # the sender in this process need not wait for its poll
            for wake in list(self.after_message):
                wake(handed)

    def record_view(self, s: Session, kind: str, subject: str) -> Any:
        """What the sender renders of a message about `subject`, read in `s`; None when it reads it itself (a kind
        without a view, a record gone or malformed: its attempt finds out and records why)."""
        view = self.record_views.get(kind)
        if view is None:
            return None
        try:
            return view(s, subject)
        except (StarchartError, ValueError):
            return None

    def dispose(self) -> None:
        self.engine.dispose()


def rows_changed(result: Result[Any]) -> int:
    """How many rows an UPDATE changed: the conditional updates that make a transition happen once."""
    return cast(CursorResult[Any], result).rowcount
