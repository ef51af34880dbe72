"""The outbox table as the use cases write it: a message recorded, or its next revision wanted, in the caller's
transaction (so it commits with the state change that causes it, or not at all)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Iterable

from sqlalchemy import case, select, update
from sqlalchemy.orm import Session

from model_registry.adapters.db import HANDED, LOCAL_SENDER, MESSAGE_RECORDED, rows_changed
from model_registry.adapters.records import OutboxMessage
from model_registry.domain.names import utcnow

# what a message is about; the sender renders each kind from its record
TRAINING, REVIEW_CARD, CARD_FILE, CHECKPOINT, NOTICE = "training", "review_card", "card_file", "checkpoint", "notice"
CANARY_CARD = "canary_card"
KINDS = (TRAINING, REVIEW_CARD, CARD_FILE, CHECKPOINT, NOTICE, CANARY_CARD)


def mark_recorded(s: Session) -> None:
    """Wake the senders of this process once the transaction commits."""
    s.info[MESSAGE_RECORDED] = True


def exists(s: Session, kind: str, subject: str) -> bool:
    """Whether a message about this record was recorded."""
    return s.execute(select(OutboxMessage.id).where(OutboxMessage.kind == kind, OutboxMessage.subject == subject)
                     ).first() is not None


def record(s: Session, kind: str, subject: str, channel: str, *, notify: str | None = None,
           payload: dict[str, Any] | None = None, again: bool = True) -> OutboxMessage:
    """A new message; if one about the same record exists already, its next revision is wanted instead (unless
    `again` is false: then it is left as it is)."""
    existing = s.execute(select(OutboxMessage).where(OutboxMessage.kind == kind, OutboxMessage.subject == subject)
                         ).scalar_one_or_none()
    if existing is not None:
        if again:
            want_update(s, kind, [subject])
        return existing
    now = utcnow()
    row = OutboxMessage(kind=kind, subject=subject, channel=channel, payload=dict(payload or {}), notify=notify,
                        wanted=1, delivered=0, attempts=0, next_attempt_at=now, created_at=now)
    sender = s.info.get(LOCAL_SENDER)
    if sender is not None:  # leased to this process's sender as it commits: its first attempt needs no claim
        owner, lease = sender
        row.lease_owner, row.lease_until = owner, now + timedelta(seconds=lease)
        row.attempts, row.first_attempt_at = 1, now  # counted now: a process that dies after posting is looked up
    s.add(row)
    s.flush()
    if sender is not None:  # handed over after the commit as it was recorded: the sender needs no read
        s.info.setdefault(HANDED, []).append({
            "id": row.id, "kind": kind, "subject": subject, "channel": channel, "payload": row.payload,
            "notify": notify, "wanted": 1, "delivered": 0, "posted_channel": None, "ts": None, "attempts": 1,
            "first_attempt_at": now, "lease_until": row.lease_until})
    mark_recorded(s)
    return row


def want_update(s: Session, kind: str, subjects: Iterable[str], *, unchanged_since: datetime | None = None) -> int:
    """The messages about these records should show them as they are now (no row: nothing to update).

    A message waiting for its backoff keeps its next attempt time; an idle one is due at once. With
    `unchanged_since`, only messages last delivered before then (the elapsed time of a running training)."""
    subjects = list(subjects)
    if not subjects:
        return 0
    now = utcnow()
    where = [OutboxMessage.kind == kind, OutboxMessage.subject.in_(subjects), OutboxMessage.failed_at.is_(None)]
    if unchanged_since is not None:
        where += [OutboxMessage.delivered >= OutboxMessage.wanted, OutboxMessage.delivered_at < unchanged_since]
    changed = rows_changed(s.execute(update(OutboxMessage).where(*where).values(
        wanted=OutboxMessage.wanted + 1,
        next_attempt_at=case((OutboxMessage.delivered >= OutboxMessage.wanted, now),
                             else_=OutboxMessage.next_attempt_at))))
    if changed:
        mark_recorded(s)
    return changed
