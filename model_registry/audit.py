"""The audit chain: append events in the caller's transaction, verify the chain afterwards."""

from __future__ import annotations

import hashlib
import hmac
import json
import weakref
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Iterator

from sqlalchemy import DateTime, select
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.orm import Session

from model_registry.db import dbapi_error, read_raw
from model_registry.names import utcnow
from model_registry.records import AuditEvent, AuditHead

GENESIS = "0" * 64

# Every action the core records; filters refuse names outside this list.
ACTIONS = (
    "training.requested", "training.started", "training.succeeded", "training.failed", "training.cancelled",
    "version.exposed", "default.initialized",
    "promotion.requested", "approval.granted", "approval.refused", "promotion.rejected", "promotion.approved",
    "promotion.applying", "promotion.applied", "promotion.failed", "promotion.expired", "promotion.stale",
    "promotion.reconciled", "rollback.requested",
    "schedule.changed", "request.refused", "review.skipped",
)


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _time_text(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.%f")


def event_hash(fields: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(fields).encode("utf-8")).hexdigest()


def hashed_fields(e: AuditEvent) -> dict[str, Any]:
    return {
        "seq": e.seq, "created_at": _time_text(e.created_at), "action": e.action, "actor": e.actor,
        "actor_name": e.actor_name, "model": e.model, "version": e.version, "request_id": e.request_id,
        "job_id": e.job_id, "channel": e.channel, "message_ts": e.message_ts, "details": e.details,
        "prev_hash": e.prev_hash,
    }


def append(
    session: Session,
    action: str,
    actor: str,
    *,
    model: str | None = None,
    version: str | None = None,
    request_id: int | None = None,
    job_id: str | None = None,
    channel: str | None = None,
    message_ts: str | None = None,
    actor_name: str | None = None,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Add one event to the chain inside the caller's transaction (it commits with the state change).

    The statements go straight to the DB-API connection of the session's transaction (SQL strings built once
    per dialect), not through SQLAlchemy's per-statement machinery.

    SQLite: write transactions begin IMMEDIATE (model_registry.db), which serialises appenders across processes;
    read the head, insert the event, move the head.

    PostgreSQL: the head row's lock serialises appenders across processes; whoever holds it appends, and keeps it
    until the caller's transaction ends. First try, in one statement, the head this process saw last: an UPDATE
    that moves the head only if it still is that one (compare-and-set, which takes the row lock) with the INSERT
    of the event riding on it. When another process appended since (or a transaction of ours rolled back, or this
    process has not appended yet), nothing is written and the usual way follows: lock and read the head
    (SELECT ... FOR UPDATE), then insert the event and move the head in one statement.
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    conn = session.connection()  # the caller's transaction (begins it, with BEGIN IMMEDIATE on SQLite)
    dialect = conn.dialect
    sql = _append_sql(dialect)
    dbapi = conn.connection.driver_connection
    if sql.postgresql:
        if dbapi.autocommit:
            raise RuntimeError("audit.append needs the caller's transaction, not an autocommit connection")
    elif not dbapi.in_transaction:
        raise RuntimeError("audit.append needs the caller's write transaction")
    event = (action, actor, actor_name, model, version, request_id, job_id, channel, message_ts,
             canonical(details or {}))
    statement, params = sql.head, ()
    cur = dbapi.cursor()
    try:
        if sql.postgresql:
            last_seen = _HEADS.get(conn.engine.pool)
            if last_seen is not None:
                seq, prev = last_seen
                fields, params = _event(sql, seq, prev, event)
                statement, params = sql.insert_if_head, (seq + 1, fields["hash"], seq, prev, *params)
                cur.execute(statement, params)
                if cur.rowcount == 1:
                    _HEADS[conn.engine.pool] = (seq + 1, fields["hash"])
                    return fields
            statement, params = sql.head, ()
        cur.execute(statement, params)
        head = cur.fetchone()
        if head is None:
            raise RuntimeError("audit_head has no row: the schema is not migrated")
        seq, prev = head
        fields, params = _event(sql, seq, prev, event)
        statement = sql.insert_and_move
        if sql.postgresql:  # one round trip: the INSERT rides in a CTE of the head's UPDATE
            params = (*params, seq + 1, fields["hash"])
            cur.execute(statement, params)
            _HEADS[conn.engine.pool] = (seq + 1, fields["hash"])
        else:
            cur.execute(statement, params)
            statement, params = sql.move_head, (seq + 1, fields["hash"])
            cur.execute(statement, params)
    except dialect.loaded_dbapi.Error as exc:
        raise dbapi_error(exc, statement, params, dialect, dbapi) from exc
    finally:
        cur.close()
    return fields


def _event(sql: _AppendSQL, seq: int, prev: str, event: tuple[Any, ...]) -> tuple[dict[str, Any], tuple[Any, ...]]:
    """The event after head (seq, prev): its fields with the hash (as `append` returns them), and its row."""
    action, actor, actor_name, model, version, request_id, job_id, channel, message_ts, details_text = event
    created_at = utcnow()
    fields = {
        "seq": seq + 1, "created_at": _time_text(created_at), "action": action, "actor": actor,
        "actor_name": actor_name, "model": model, "version": version, "request_id": request_id, "job_id": job_id,
        "channel": channel, "message_ts": message_ts, "details": details_text, "prev_hash": prev,
    }
    digest = event_hash(fields)
    fields["created_at"], fields["hash"] = created_at, digest
    stored_at = sql.store_time(created_at) if sql.store_time else created_at
    return fields, (seq + 1, stored_at, *event, prev, digest)


@dataclass(frozen=True)
class _AppendSQL:
    postgresql: bool
    head: str
    insert_and_move: str
    move_head: str
    insert_if_head: str
    store_time: Any  # the dialect's own DateTime bind processor (SQLite stores text), or None


_EVENT_COLUMNS = ("seq", "created_at", "action", "actor", "actor_name", "model", "version", "request_id", "job_id",
                  "channel", "message_ts", "details", "prev_hash", "hash")
_APPEND_SQL: dict[str, _AppendSQL] = {}
# PostgreSQL: per engine (pool), the head as this process last moved or read it; only ever a guess (see append)
_HEADS: weakref.WeakKeyDictionary[Any, tuple[int, str]] = weakref.WeakKeyDictionary()


def _append_sql(dialect: Dialect) -> _AppendSQL:
    sql = _APPEND_SQL.get(dialect.name)
    if sql is None:
        cols = ", ".join(_EVENT_COLUMNS)
        if dialect.name == "postgresql":
            values = ", ".join(["%s"] * len(_EVENT_COLUMNS))
            # INSERT ... SELECT types its values from the select list: spell out the non-text ones
            typed = ", ".join({"seq": "%s::integer", "created_at": "%s::timestamp", "request_id": "%s::integer"}
                              .get(c, "%s") for c in _EVENT_COLUMNS)
            sql = _AppendSQL(
                True, "SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE",
                f"WITH event AS (INSERT INTO audit_events ({cols}) VALUES ({values})) "
                "UPDATE audit_head SET seq = %s, hash = %s WHERE id = 1",
                "",
                "WITH head AS (UPDATE audit_head SET seq = %s, hash = %s WHERE id = 1 AND seq = %s AND hash = %s "
                f"RETURNING id) INSERT INTO audit_events ({cols}) SELECT {typed} FROM head",
                None)
        elif dialect.name == "sqlite":
            values = ", ".join(["?"] * len(_EVENT_COLUMNS))
            sql = _AppendSQL(
                False, "SELECT seq, hash FROM audit_head WHERE id = 1",
                f"INSERT INTO audit_events ({cols}) VALUES ({values})",
                "UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1",
                "",
                DateTime().dialect_impl(dialect).bind_processor(dialect))
        else:
            raise ValueError(f"no audit chain for {dialect.name}: StarChart runs on SQLite or PostgreSQL")
        _APPEND_SQL[dialect.name] = sql
    return sql


@dataclass
class VerifyResult:
    ok: bool
    events: int
    head_hash: str
    problem: str | None = None
    first_bad_seq: int | None = None
    checkpoints: int = 0


def iter_events(session: Session, batch: int = 5000) -> Iterator[AuditEvent]:
    """All events in chain order, fetched in keyset pages so memory stays flat."""
    last = 0
    while True:
        rows = session.execute(
            select(AuditEvent).where(AuditEvent.seq > last).order_by(AuditEvent.seq).limit(batch)
        ).scalars().all()
        if not rows:
            return
        for row in rows:
            yield row
        last = rows[-1].seq
        session.expunge_all()


def sign_checkpoint(count: int, head: str, at: str, key: bytes | None) -> str | None:
    if not key:
        return None
    return hmac.new(key, canonical({"count": count, "head": head, "at": at}).encode(), hashlib.sha256).hexdigest()


def checkpoint(session: Session, key: bytes | None) -> dict[str, Any]:
    """The chain's head now (count, head hash, time), signed so that a copy kept elsewhere can be trusted."""
    head = session.get(AuditHead, 1)
    count, head_hash = (head.seq, head.hash) if head else (0, GENESIS)
    at = _time_text(utcnow())[:19] + "Z"
    return {"count": count, "head": head_hash, "at": at, "sig": sign_checkpoint(count, head_hash, at, key)}


def _checkpoint_problem(cp: dict[str, Any], count: int, hashes: dict[int, str], key: bytes | None) -> str | None:
    try:
        n, head, at = int(cp["count"]), str(cp["head"]), str(cp["at"])
    except (KeyError, TypeError, ValueError):
        return f"checkpoint {cp!r} is malformed"
    if key and not hmac.compare_digest(str(cp.get("sig") or ""), sign_checkpoint(n, head, at, key) or ""):
        return f"the checkpoint of {at} has a bad signature (forged, or signed with another key)"
    if n > count:
        return f"the chain ends at event #{count} but the checkpoint of {at} saw #{n}: events were removed"
    if n and hashes.get(n) != head:
        return f"event #{n} differs from the checkpoint of {at}: the chain was rewritten"
    return None


def verify(session: Session, checkpoints: Iterable[dict[str, Any]] = (), key: bytes | None = None) -> VerifyResult:
    """Recompute the chain; name the first event that was edited, removed, reordered or forged.

    Checkpoints kept outside the database also catch a rewritten chain and a truncated tail.
    """
    checkpoints = list(checkpoints)
    wanted = {int(cp["count"]) for cp in checkpoints if isinstance(cp, dict) and str(cp.get("count", "")).isdigit()}
    hashes: dict[int, str] = {}
    prev, expected, count = GENESIS, 1, 0
    for e in iter_events(session):
        if e.seq != expected:
            return VerifyResult(False, count, prev, f"event #{expected} is missing (next is #{e.seq})", expected)
        if e.prev_hash != prev:
            return VerifyResult(False, count, prev, f"event #{e.seq} does not follow event #{e.seq - 1}", e.seq)
        if event_hash(hashed_fields(e)) != e.hash:
            return VerifyResult(False, count, prev, f"event #{e.seq} was altered after it was written", e.seq)
        if e.seq in wanted:
            hashes[e.seq] = e.hash
        prev, expected, count = e.hash, expected + 1, count + 1
    for cp in sorted(checkpoints, key=lambda c: str(c.get("at", "")) if isinstance(c, dict) else ""):
        problem = _checkpoint_problem(cp, count, hashes, key) if isinstance(cp, dict) else "malformed checkpoint"
        if problem:
            return VerifyResult(False, count, prev, problem, min(int(cp.get("count", 0) or 0), count + 1) or None)
    head = session.get(AuditHead, 1)
    if head is not None and (head.seq != count or head.hash != prev):
        return VerifyResult(
            False, count, prev, f"the chain ends at event #{count} but its head says #{head.seq}", count + 1
        )
    return VerifyResult(True, count, prev, checkpoints=len(checkpoints))



def query_engine(
    engine: Engine,
    *,
    model: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    actor: str | None = None,
    action: str | None = None,
    version: str | None = None,
    limit: int = 50,
    before_seq: int | None = None,
    actor_must_exist: bool = False,
) -> list[dict[str, Any]] | None:
    """Filtered events, newest first, on a pooled connection without a transaction: one indexed SELECT.

    With `actor_must_exist`, returns None when nothing matched and `actor` never did anything.
    """
    dialect = engine.dialect

    def work(dbapi: Any) -> list[dict[str, Any]] | None:
        rows = _fetch(dbapi, dialect, model, since, until, actor, action, version, limit, before_seq)
        if not rows and actor_must_exist and actor is not None and not _has_actor(dbapi, dialect, actor):
            return None
        return rows

    return read_raw(engine, work)


def events_statement(dialect: Dialect, *, model: str | None = None, since: datetime | None = None,
                     until: datetime | None = None, actor: str | None = None, action: str | None = None,
                     version: str | None = None, limit: int = 50, before_seq: int | None = None
                     ) -> tuple[str, tuple[Any, ...]]:
    """The SQL and DB-API parameters `query_engine` sends for these filters (benchmarks explain it)."""
    return _statement(_query_sql(dialect), model, since, until, actor, action, version, limit, before_seq)


def _statement(sql: _QuerySQL, model: str | None, since: datetime | None, until: datetime | None,
               actor: str | None, action: str | None, version: str | None, limit: int, before_seq: int | None
               ) -> tuple[str, tuple[Any, ...]]:
    key = (model is not None, actor is not None, action is not None, version is not None, since is not None,
           until is not None, before_seq is not None)
    statement = sql.statements.get(key) or sql.build(key)
    params: list[Any] = []
    if model is not None:
        params.append(model)
    if actor is not None:
        params.append(actor)
    if action is not None:
        params.append(action)
    if version is not None:
        params.append(version)
    if since is not None:
        params.append(sql.store_time(since) if sql.store_time else since)
    if until is not None:
        params.append(sql.store_time(until) if sql.store_time else until)
    if before_seq is not None:
        params.append(before_seq)
    params.append(limit)
    return statement, tuple(params)


def _fetch(dbapi: Any, dialect: Dialect, model: str | None, since: datetime | None, until: datetime | None,
           actor: str | None, action: str | None, version: str | None, limit: int, before_seq: int | None
           ) -> list[dict[str, Any]]:
    if action is not None and action not in ACTIONS:
        raise ValueError(action)
    sql = _query_sql(dialect)
    statement, params = _statement(sql, model, since, until, actor, action, version, limit, before_seq)
    try:
        rows = dbapi.execute(statement, params).fetchall()
    except dialect.loaded_dbapi.Error as exc:
        raise dbapi_error(exc, statement, params, dialect, dbapi) from exc
    details = _details
    if sql.odd_at is None:  # PostgreSQL: `at` comes ready ("YYYY-MM-DDTHH:MM:SSZ") from to_char
        return [
            {"seq": seq, "at": at, "action": act, "actor": who, "actor_name": name, "model": mdl, "version": ver,
             "request_id": req, "job_id": job, "channel": chan, "message_ts": ts, "details": details(text)}
            for seq, at, act, who, name, mdl, ver, req, job, chan, ts, text in rows
        ]
    odd_at = sql.odd_at  # SQLite: what SQLAlchemy stores, "YYYY-MM-DD HH:MM:SS.ffffff", is sliced
    return [
        {"seq": seq, "at": f"{at[:10]}T{at[11:19]}Z" if len(at) == 26 and at[10] == " " and at[19] == "."
         and at[20:].isdigit() else odd_at(at), "action": act, "actor": who, "actor_name": name, "model": mdl,
         "version": ver, "request_id": req, "job_id": job, "channel": chan, "message_ts": ts,
         "details": details(text)}
        for seq, at, act, who, name, mdl, ver, req, job, chan, ts, text in rows
    ]


def _has_actor(dbapi: Any, dialect: Dialect, actor: str) -> bool:
    statement = "SELECT 1 FROM audit_events WHERE actor = %s LIMIT 1"
    if dialect.name == "sqlite":
        statement = statement.replace("%s", "?")
    try:
        return dbapi.execute(statement, (actor,)).fetchone() is not None
    except dialect.loaded_dbapi.Error as exc:
        raise dbapi_error(exc, statement, (actor,), dialect, dbapi) from exc


class _QuerySQL:
    """The filtered SELECT per combination of filters, in the dialect's paramstyle, built on first use.

    PostgreSQL writes `at` as the answer shows it: to_char gives what `isoformat(timespec="seconds") + "Z"` gave,
    without a datetime per row in Python. SQLite stores text; `_fetch` slices what SQLAlchemy writes and sends
    anything else through SQLAlchemy's own parser, as when SQLAlchemy read the rows.
    """

    _SELECT = ("SELECT seq, {at}, action, actor, actor_name, model, version, request_id, job_id, channel, "
               "message_ts, details FROM audit_events")
    _FILTERS = ("model = {p}", "actor = {p}", "action = {p}", "version = {p}", "created_at >= {t}",
                "created_at < {t}", "seq < {p}")

    def __init__(self, dialect: Dialect) -> None:
        self.statements: dict[tuple[bool, ...], str] = {}
        self.store_time: Any = None
        self.odd_at: Any = None
        if dialect.name == "sqlite":  # times are stored as text; bind and read them as SQLAlchemy does
            self.placeholder, self.time_placeholder, at = "?", "?", "created_at"
            self.store_time = DateTime().dialect_impl(dialect).bind_processor(dialect)
            parse = DateTime().dialect_impl(dialect).result_processor(dialect, None)
            self.odd_at = lambda stored: parse(stored).isoformat(timespec="seconds") + "Z"
        elif dialect.name == "postgresql":
            # a time binds as SQLAlchemy binds DateTime (an aware one is converted, not compared as timestamptz)
            self.placeholder, self.time_placeholder = "%s", "%s::timestamp"
            at = """to_char(created_at, 'YYYY-MM-DD"T"HH24:MI:SS"Z"')"""
        else:
            raise ValueError(f"no audit queries for {dialect.name}: StarChart runs on SQLite or PostgreSQL")
        self.select = self._SELECT.format(at=at)

    def build(self, key: tuple[bool, ...]) -> str:
        where = [f.format(p=self.placeholder, t=self.time_placeholder) for f, on in zip(self._FILTERS, key) if on]
        statement = (self.select + (" WHERE " + " AND ".join(where) if where else "")
                     + f" ORDER BY created_at DESC, seq DESC LIMIT {self.placeholder}")
        self.statements[key] = statement
        return statement


_QUERY_SQL: dict[str, _QuerySQL] = {}


def _query_sql(dialect: Dialect) -> _QuerySQL:
    sql = _QUERY_SQL.get(dialect.name)
    if sql is None:
        sql = _QUERY_SQL[dialect.name] = _QuerySQL(dialect)
    return sql


def _details(text: str | None) -> dict[str, Any]:
    # json.loads(text) without its Python layers when text is exactly one JSON object (as append stores it)
    if text.__class__ is str:
        try:
            value, end = _scan_json(text, 0)
        except (StopIteration, ValueError):
            end = -1
        if end == len(text) and value.__class__ is dict:
            return value
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {"raw": text}
    return value if isinstance(value, dict) else {"value": value}


_scan_json = json.JSONDecoder().scan_once


def default_event_at(session: Session, model: str, at: datetime) -> AuditEvent | None:
    """The event that made the default of `model` what it was at `at`."""
    return session.execute(
        select(AuditEvent).where(AuditEvent.model == model, AuditEvent.created_at <= at,
                                 AuditEvent.action.in_(("default.initialized", "promotion.applied")))
        .order_by(AuditEvent.created_at.desc(), AuditEvent.seq.desc()).limit(1)
    ).scalar_one_or_none()
