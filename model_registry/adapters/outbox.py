"""The outbox table as the use cases write it: a message recorded, or its next revision wanted, in the caller's
transaction (so it commits with the state change that causes it, or not at all)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Iterable, Sequence

from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.orm import Session

from model_registry.adapters.db import HANDED, LOCAL_SENDER, MESSAGE_RECORDED, rows_changed
from model_registry.adapters.records import OutboxMessage
from model_registry.domain.names import utcnow

# what a message is about; the sender renders each kind from its record
TRAINING, REVIEW_CARD, CARD_FILE, CHECKPOINT, NOTICE = "training", "review_card", "card_file", "checkpoint", "notice"
CARD_CHARTS = "card_charts"  # a review card's charts (PNG) in its thread, once the card is posted
CANARY_CARD = "canary_card"  # a canary's figures and its Promote / Roll back buttons
NIGHTLY = "nightly"  # a scheduled retrain's news other than its review card (payload `event`: one of NIGHTLY_EVENTS)
KINDS = (TRAINING, REVIEW_CARD, CARD_FILE, CARD_CHARTS, CHECKPOINT, NOTICE, NIGHTLY, CANARY_CARD)
# a retrain not put up for review (the gate), one that did not start, one that failed, a version exposed
REVIEW_SKIPPED, NOT_STARTED, TRAINING_FAILED, EXPOSED = "review_skipped", "not_started", "training_failed", "exposed"
NIGHTLY_EVENTS = (REVIEW_SKIPPED, NOT_STARTED, TRAINING_FAILED, EXPOSED)


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


def record_nightly(s: Session, event: str, key: str, channel: str | None, payload: dict[str, Any]) -> None:
    """A nightly retrain's news for the model's channel (none without a channel), once per event and `key`."""
    if event not in NIGHTLY_EVENTS:
        raise ValueError(f"unknown nightly event {event!r}")
    if channel:
        record(s, NIGHTLY, f"{event}:{key}"[:100], channel, payload={**payload, "event": event}, again=False)


def want_update(s: Session, kind: str | tuple[str, ...], subjects: Iterable[str], *,
                unchanged_since: datetime | None = None) -> int:
    """The messages about these records should show them as they are now (no row: nothing to update); `kind` is one
    kind or several (a promotion request's review card and canary card), in one UPDATE.

    A message waiting for its backoff keeps its next attempt time; an idle one is due at once — and, in a process
    whose sender runs, leased to that sender by the same UPDATE and handed to it after the commit (no claim), as a
    new message is. With `unchanged_since`, only messages last delivered before then (a running training's elapsed
    time)."""
    subjects = list(subjects)
    if not subjects:
        return 0
    now = utcnow()
    where: list[Any] = [OutboxMessage.kind.in_((kind,) if isinstance(kind, str) else kind),
                        OutboxMessage.subject.in_(subjects), OutboxMessage.failed_at.is_(None)]
    if unchanged_since is not None:
        where += [OutboxMessage.delivered >= OutboxMessage.wanted, OutboxMessage.delivered_at < unchanged_since]
    idle = OutboxMessage.delivered >= OutboxMessage.wanted  # (SET's expressions see the row as it was)
    values: dict[str, Any] = {"wanted": OutboxMessage.wanted + 1,
                              "next_attempt_at": case((idle, now), else_=OutboxMessage.next_attempt_at)}
    sender = s.info.get(LOCAL_SENDER)
    if sender is None:
        changed = rows_changed(s.execute(update(OutboxMessage).where(*where).values(**values)))
    else:
        changed = len(_lease_idle(s, where, values, idle, now, sender))
    if changed:
        mark_recorded(s)
    return changed


# what a sender needs of a message it holds the lease of (services.outbox.Claimed, without lease_until)
CLAIMED = (OutboxMessage.id, OutboxMessage.kind, OutboxMessage.subject, OutboxMessage.channel, OutboxMessage.payload,
           OutboxMessage.notify, OutboxMessage.wanted, OutboxMessage.delivered, OutboxMessage.posted_channel,
           OutboxMessage.ts, OutboxMessage.attempts, OutboxMessage.first_attempt_at)


def _lease_idle(s: Session, where: list[Any], values: dict[str, Any], idle: Any, now: datetime,
                sender: tuple[str, float]) -> Sequence[Any]:
    """want_update's UPDATE in a process whose sender runs: the messages it selects that were delivered and held by
    no sender are also leased to that sender for their first attempt, and handed over after the commit. Returns
    every row the UPDATE changed."""
    owner, lease = sender
    until = now + timedelta(seconds=lease)
    idle = and_(idle, or_(OutboxMessage.lease_until.is_(None), OutboxMessage.lease_until < now))
    rows = s.execute(update(OutboxMessage).where(*where).values(
        **values, lease_owner=case((idle, owner), else_=OutboxMessage.lease_owner),
        lease_until=case((idle, until), else_=OutboxMessage.lease_until),
        attempts=case((idle, OutboxMessage.attempts + 1), else_=OutboxMessage.attempts),
        first_attempt_at=case((idle, func.coalesce(OutboxMessage.first_attempt_at, now)),
                              else_=OutboxMessage.first_attempt_at))
        .returning(*CLAIMED, OutboxMessage.lease_owner, OutboxMessage.lease_until)).all()
    # leased by this UPDATE: this sender's lease, ending when this UPDATE made it end
    s.info.setdefault(HANDED, []).extend({**{column.key: getattr(row, column.key) for column in CLAIMED},
                                          "lease_until": until} for row in rows
                                         if row.lease_owner == owner and row.lease_until == until)
    return rows
