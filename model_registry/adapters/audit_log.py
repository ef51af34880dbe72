"""The audit chain: append events in the caller's transaction, read them back, verify the chain afterwards."""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Iterator

from sqlalchemy import Select, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from model_registry.adapters.records import AuditEvent, AuditHead
from model_registry.domain.diffs import canonical
from model_registry.domain.names import iso, utcnow

GENESIS = "0" * 64

# Every action the core records; filters refuse names outside this list.
ACTIONS = (
    "training.requested", "training.started", "training.succeeded", "training.failed", "training.cancelled",
    "version.exposed", "default.initialized",
    "promotion.requested", "approval.granted", "approval.refused", "promotion.rejected", "promotion.approved",
    "promotion.applying", "promotion.applied", "promotion.failed", "promotion.expired", "promotion.stale",
    "promotion.reconciled", "rollback.requested",
    "schedule.changed", "request.refused", "review.skipped",
    "canary.started", "canary.promoted", "canary.rolled_back", "canary.refused",
    "evaluation.started", "evaluation.finished", "evaluation.failed",
)


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


@dataclass
class VerifyResult:
    ok: bool
    events: int
    head_hash: str
    problem: str | None = None
    first_bad_seq: int | None = None
    checkpoints: int = 0


_E = AuditEvent.__table__.c
_H = AuditHead.__table__.c
# SELECT ... FOR UPDATE on PostgreSQL; SQLite renders no FOR UPDATE: its write transaction began IMMEDIATE (db.py)
_LOCK_HEAD = select(_H.seq, _H.hash).where(_H.id == 1).with_for_update()
_INSERT_EVENT = insert(AuditEvent)
_MOVE_HEAD = update(AuditHead).where(_H.id == 1)
_EVENTS = select(_E.seq, _E.created_at, _E.action, _E.actor, _E.actor_name, _E.model, _E.version, _E.request_id,
                 _E.job_id, _E.channel, _E.message_ts, _E.details)
_DEFAULT_ACTIONS = ("default.initialized", "promotion.applied")


class AuditLog:
    """The audit chain of one database: the one way events are appended, and the ways they are read.

    Appenders are serialised by the lock on the single audit_head row, held until the caller's transaction ends:
    the event commits (or rolls back) with the state change it records, and seq has no gaps.
    """

    def __init__(self, page: int = 5000) -> None:
        self.page = page  # events per keyset page while verifying: memory stays flat whatever the chain's length

    def append(
        self,
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
        """Add one event to the chain inside the caller's transaction; return its fields, hash included.

        Locks and reads the head, inserts the event after it and moves the head, all in `session`'s transaction.
        """
        if action not in ACTIONS:
            raise ValueError(f"unknown audit action {action!r}")
        conn = session.connection()  # begins the caller's transaction (BEGIN IMMEDIATE on SQLite)
        options = conn.get_execution_options()
        if options.get("isolation_level") == "AUTOCOMMIT" or options.get("starchart_read"):
            raise RuntimeError("audit.append needs the caller's write transaction, not a read-only session")
        head = conn.execute(_LOCK_HEAD).one_or_none()
        if head is None:
            raise RuntimeError("audit_head has no row: the schema is not migrated")
        created_at = utcnow()
        fields = {
            "seq": head.seq + 1, "created_at": _time_text(created_at), "action": action, "actor": actor,
            "actor_name": actor_name, "model": model, "version": version, "request_id": request_id,
            "job_id": job_id, "channel": channel, "message_ts": message_ts, "details": canonical(details or {}),
            "prev_hash": head.hash,
        }
        digest = event_hash(fields)
        fields["created_at"], fields["hash"] = created_at, digest
        conn.execute(_INSERT_EVENT, fields)
        conn.execute(_MOVE_HEAD, {"seq": fields["seq"], "hash": digest})
        return fields

    # ------------------------------------------------------------------ reads

    def events_query(self, *, model: str | None = None, since: datetime | None = None,
                     until: datetime | None = None, actor: str | None = None, action: str | None = None,
                     version: str | None = None, limit: int = 50, before_seq: int | None = None) -> Select[Any]:
        """The filtered SELECT of `events`, newest first (served by the model, actor, action or time index)."""
        if action is not None and action not in ACTIONS:
            raise ValueError(action)
        query = _EVENTS
        for column, value in ((_E.model, model), (_E.actor, actor), (_E.action, action), (_E.version, version)):
            if value is not None:
                query = query.where(column == value)
        if since is not None:
            query = query.where(_E.created_at >= since)
        if until is not None:
            query = query.where(_E.created_at < until)
        if before_seq is not None:
            query = query.where(_E.seq < before_seq)
        return query.order_by(_E.created_at.desc(), _E.seq.desc()).limit(limit)

    def events(self, conn: Connection, **filters: Any) -> list[dict[str, Any]]:
        """Events matching `filters` (the keywords of `events_query`), newest first, as plain dicts."""
        return [
            {"seq": seq, "at": iso(at), "action": act, "actor": who, "actor_name": name, "model": mdl,
             "version": ver, "request_id": req, "job_id": job, "channel": chan, "message_ts": ts,
             "details": _details(text)}
            for seq, at, act, who, name, mdl, ver, req, job, chan, ts, text in conn.execute(self.events_query(**filters))
        ]

    def has_actor(self, conn: Connection, actor: str) -> bool:
        """Whether `actor` ever did anything (an empty filtered answer then means "nothing matched")."""
        return conn.execute(select(_E.seq).where(_E.actor == actor).limit(1)).first() is not None

    def iter_events(self, session: Session) -> Iterator[AuditEvent]:
        """All events in chain order, fetched in keyset pages so memory stays flat."""
        last = 0
        while True:
            rows = session.execute(
                select(AuditEvent).where(AuditEvent.seq > last).order_by(AuditEvent.seq).limit(self.page)
            ).scalars().all()
            if not rows:
                return
            yield from rows
            last = rows[-1].seq
            session.expunge_all()

    def checkpoint(self, session: Session, key: bytes | None) -> dict[str, Any]:
        """The chain's head now (count, head hash, time), signed so that a copy kept elsewhere can be trusted."""
        head = session.get(AuditHead, 1)
        count, head_hash = (head.seq, head.hash) if head else (0, GENESIS)
        at = _time_text(utcnow())[:19] + "Z"
        return {"count": count, "head": head_hash, "at": at, "sig": sign_checkpoint(count, head_hash, at, key)}

    def verify(self, session: Session, checkpoints: Iterable[dict[str, Any]] = (), key: bytes | None = None
               ) -> VerifyResult:
        """Recompute the chain; name the first event that was edited, removed, reordered or forged.

        Checkpoints kept outside the database also catch a rewritten chain and a truncated tail.
        """
        checkpoints = list(checkpoints)
        wanted = {int(cp["count"]) for cp in checkpoints
                  if isinstance(cp, dict) and str(cp.get("count", "")).isdigit()}
        hashes: dict[int, str] = {}
        prev, expected, count = GENESIS, 1, 0
        for e in self.iter_events(session):
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

    def default_event_at(self, session: Session, model: str, at: datetime) -> AuditEvent | None:
        """The event that made the default of `model` what it was at `at`."""
        return session.execute(
            select(AuditEvent).where(AuditEvent.model == model, AuditEvent.created_at <= at,
                                     AuditEvent.action.in_(_DEFAULT_ACTIONS))
            .order_by(AuditEvent.created_at.desc(), AuditEvent.seq.desc()).limit(1)
        ).scalar_one_or_none()


_CANARY_ACTIONS = ("canary.started", "canary.promoted", "canary.rolled_back")


def canary_event_at(session: Session, model: str, at: datetime) -> AuditEvent | None:
    """The last canary event of `model` at or before `at` (its details name the traffic split it left)."""
    return session.execute(
        select(AuditEvent).where(AuditEvent.model == model, AuditEvent.created_at <= at,
                                 AuditEvent.action.in_(_CANARY_ACTIONS))
        .order_by(AuditEvent.created_at.desc(), AuditEvent.seq.desc()).limit(1)
    ).scalar_one_or_none()


def sign_checkpoint(count: int, head: str, at: str, key: bytes | None) -> str | None:
    if not key:
        return None
    return hmac.new(key, canonical({"count": count, "head": head, "at": at}).encode(), hashlib.sha256).hexdigest()


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


def _details(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {"raw": text}
    return value if isinstance(value, dict) else {"value": value}


def event_details(event: AuditEvent) -> dict[str, Any]:
    """An event's details as a mapping (they are stored as canonical JSON text)."""
    return _details(event.details)
