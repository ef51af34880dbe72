"""The audit chain: append events in the caller's transaction, verify the chain afterwards."""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Iterator

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.orm import Session

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
    "schedule.changed", "request.refused",
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

    Core statements, not ORM objects: an append is three statements and no flush bookkeeping.
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    # Locking the head row serialises appenders on PostgreSQL; SQLite transactions begin IMMEDIATE.
    seq, prev = session.execute(_HEAD_FOR_UPDATE).one()
    fields = {
        "seq": seq + 1, "created_at": utcnow(), "action": action, "actor": actor, "actor_name": actor_name,
        "model": model, "version": version, "request_id": request_id, "job_id": job_id, "channel": channel,
        "message_ts": message_ts, "details": canonical(details or {}), "prev_hash": prev,
    }
    fields["hash"] = event_hash({**fields, "created_at": _time_text(fields["created_at"])})
    session.execute(_INSERT_EVENT, fields)
    session.execute(_MOVE_HEAD, {"seq": fields["seq"], "hash": fields["hash"]})
    return fields


_HEAD = AuditHead.__table__
_HEAD_FOR_UPDATE = select(_HEAD.c.seq, _HEAD.c.hash).where(_HEAD.c.id == 1).with_for_update()
_INSERT_EVENT = insert(AuditEvent.__table__)
_MOVE_HEAD = update(_HEAD).where(_HEAD.c.id == 1).values(seq=bindparam("seq"), hash=bindparam("hash"))


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



_COLUMNS = AuditEvent.__table__.c


def query(
    session: Session,
    *,
    model: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    actor: str | None = None,
    action: str | None = None,
    version: str | None = None,
    limit: int = 50,
    before_seq: int | None = None,
) -> list[dict[str, Any]]:
    """Events newest first, filtered; `before_seq` pages past the last one shown."""
    if action is not None and action not in ACTIONS:
        raise ValueError(action)
    c = _COLUMNS
    q = select(c.seq, c.created_at, c.action, c.actor, c.actor_name, c.model, c.version, c.request_id, c.job_id,
               c.channel, c.message_ts, c.details)
    for column, value in ((c.model, model), (c.actor, actor), (c.action, action), (c.version, version)):
        if value is not None:
            q = q.where(column == value)
    if since is not None:
        q = q.where(c.created_at >= since)
    if until is not None:
        q = q.where(c.created_at < until)
    if before_seq is not None:
        q = q.where(c.seq < before_seq)
    rows = session.execute(q.order_by(c.created_at.desc(), c.seq.desc()).limit(limit)).all()
    return [
        {"seq": seq, "at": at.isoformat(timespec="seconds") + "Z", "action": act, "actor": who,
         "actor_name": name, "model": mdl, "version": ver, "request_id": req, "job_id": job, "channel": chan,
         "message_ts": ts, "details": _details(details)}
        for seq, at, act, who, name, mdl, ver, req, job, chan, ts, details in rows
    ]


def _details(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {"raw": text}
    return value if isinstance(value, dict) else {"value": value}


def has_actor(session: Session, actor: str) -> bool:
    return session.execute(select(AuditEvent.seq).where(AuditEvent.actor == actor).limit(1)).first() is not None


def default_event_at(session: Session, model: str, at: datetime) -> AuditEvent | None:
    """The event that made the default of `model` what it was at `at`."""
    return session.execute(
        select(AuditEvent).where(AuditEvent.model == model, AuditEvent.created_at <= at,
                                 AuditEvent.action.in_(("default.initialized", "promotion.applied")))
        .order_by(AuditEvent.created_at.desc(), AuditEvent.seq.desc()).limit(1)
    ).scalar_one_or_none()
