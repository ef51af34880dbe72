"""The outbox's use cases for the senders: which messages are due, one sender at a time on each (a lease taken
by a conditional UPDATE, on SQLite and PostgreSQL alike), and what became of each attempt."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.orm import Session

from model_registry.adapters import outbox
from model_registry.adapters.db import Database, rows_changed
from model_registry.adapters.records import OutboxMessage, PromotionRequest
from model_registry.domain.errors import NotFound
from model_registry.domain.names import iso, utcnow


@dataclass(frozen=True)
class Claimed:
    """A message one sender holds the lease of: what to render, where, and how far its delivery got."""

    id: int
    kind: str
    subject: str
    channel: str
    payload: Any  # a mapping as recorded; the sender checks what it needs
    notify: str | None
    wanted: int
    delivered: int
    posted_channel: str | None
    ts: str | None
    attempts: int  # this attempt included
    first_attempt_at: datetime | None
    lease_until: datetime
    record: Any = None  # what rendering needs (Database.record_views), read with the lease; None: render reads it


class Settled(NamedTuple):
    """What an outcome did: whether the sender still held the lease (else nothing changed), and, when it was asked
    to claim the next message, whether it did (`claimed`) and which (`next`, None: none is due)."""

    held: bool
    claimed: bool
    next: Claimed | None


def _due(now: datetime) -> Any:
    return (OutboxMessage.failed_at.is_(None), OutboxMessage.delivered < OutboxMessage.wanted,
            OutboxMessage.next_attempt_at <= now,
            or_(OutboxMessage.lease_until.is_(None), OutboxMessage.lease_until < now))


_CLAIMED = outbox.CLAIMED


def message_view(row: OutboxMessage) -> dict[str, Any]:
    state = "failed" if row.failed_at else ("delivered" if row.delivered >= row.wanted else "pending")
    return {"id": row.id, "kind": row.kind, "subject": row.subject, "channel": row.channel, "state": state,
            "wanted": row.wanted, "delivered": row.delivered, "posted_channel": row.posted_channel, "ts": row.ts,
            "attempts": row.attempts, "next_attempt_at": iso(row.next_attempt_at), "last_error": row.last_error,
            "error": row.error, "failed_at": iso(row.failed_at), "notify": row.notify,
            "lease_owner": row.lease_owner, "lease_until": iso(row.lease_until), "created_at": iso(row.created_at),
            "delivered_at": iso(row.delivered_at), "payload": dict(row.payload or {})}


class Outbox:
    """Messages recorded by the other use cases, as the senders deliver them."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def next_due(self) -> datetime | None:
        """When the next undelivered message is due: its next attempt, or when the lease another sender holds on it
        ends; None when nothing waits."""
        leased = and_(OutboxMessage.lease_until.is_not(None), OutboxMessage.lease_until > OutboxMessage.next_attempt_at)
        with self.db.reads() as s:
            return s.execute(select(func.min(case((leased, OutboxMessage.lease_until),
                                                  else_=OutboxMessage.next_attempt_at))).where(
                OutboxMessage.failed_at.is_(None), OutboxMessage.delivered < OutboxMessage.wanted)).scalar()

    def claim(self, owner: str, lease_seconds: float, message_id: int | None = None, *,
              s: Session | None = None) -> Claimed | None:
        """Take the lease of the oldest due message (or of `message_id`, if due) for one attempt; None when no
        message is due or other senders hold them all. With `s`, in that transaction (an outcome's, below).

        One conditional UPDATE decides between senders, on SQLite (whose write transactions are serialised) and on
        PostgreSQL (SKIP LOCKED passes over a row another sender is taking; the due conditions are checked again
        on the row as that sender left it)."""
        if s is None:
            with self.db.unit_of_work() as s:
                return self.claim(owner, lease_seconds, message_id, s=s)
        now = utcnow()
        until = now + timedelta(seconds=lease_seconds)
        pick = select(OutboxMessage.id).where(*_due(now))
        if message_id is not None:
            pick = pick.where(OutboxMessage.id == message_id)
        pick = pick.order_by(OutboxMessage.id).limit(1).with_for_update(skip_locked=True)
        row = s.execute(update(OutboxMessage).where(OutboxMessage.id == pick.scalar_subquery(), *_due(now))
                        .values(lease_owner=owner, lease_until=until, attempts=OutboxMessage.attempts + 1,
                                first_attempt_at=func.coalesce(OutboxMessage.first_attempt_at, now))
                        .returning(*_CLAIMED)).one_or_none()
        if row is None:
            return None
        # what rendering needs, read on this connection and consistent with the revision claimed (a change
        # that wants the next one waits on this row's lock)
        return Claimed(**{column.key: getattr(row, column.key) for column in _CLAIMED},
                       lease_until=until, record=self.db.record_view(s, row.kind, row.subject))

    @staticmethod
    def _held(s: Session, message: Claimed, owner: str, **values: Any) -> bool:
        """Change a message only while this sender still holds its lease."""
        return bool(rows_changed(s.execute(update(OutboxMessage).where(
            OutboxMessage.id == message.id, OutboxMessage.lease_owner == owner).values(**values))))

    # Each outcome below, with `claim_next` (lease seconds), also claims the sender's next message in its transaction:
    # one transaction per message delivered, not two.

    def _settled(self, s: Session, held: bool, owner: str, claim_next: float | None) -> Settled:
        if claim_next is None:
            return Settled(held, False, None)
        return Settled(held, True, self.claim(owner, claim_next, s=s))

    def posted(self, message: Claimed, owner: str, channel: str, ts: str, revision: int,
               follow_up: tuple[str, dict[str, Any]] | None = None, *, claim_next: float | None = None) -> Settled:
        """A post landed (or was found in the channel): where it is, which revision it shows. A review card's place
        is recorded on its promotion request too (approvals bind to that card); `follow_up` (kind, payload) is a
        message for its thread."""
        with self.db.unit_of_work() as s:
            held = self._held(s, message, owner, posted_channel=channel, ts=ts, delivered=revision,
                              delivered_at=utcnow(), lease_owner=None, lease_until=None, last_error=None)
            if held and message.kind == outbox.REVIEW_CARD:
                s.execute(update(PromotionRequest).where(PromotionRequest.id == int(message.subject))
                          .values(channel=channel, message_ts=ts))
            if held and follow_up is not None:
                kind, payload = follow_up
                outbox.record(s, kind, message.subject, channel, notify=message.notify,
                              payload={**payload, "thread_ts": ts}, again=False)
            return self._settled(s, held, owner, claim_next)

    def delivered(self, message: Claimed, owner: str, revision: int, *, claim_next: float | None = None) -> Settled:
        with self.db.unit_of_work() as s:
            held = self._held(s, message, owner, delivered=revision, delivered_at=utcnow(), lease_owner=None,
                              lease_until=None, last_error=None)
            return self._settled(s, held, owner, claim_next)

    def retry_later(self, message: Claimed, owner: str, error: str, delay: float, *,
                    claim_next: float | None = None) -> Settled:
        """A passing failure (rate limit, Slack's 5xx, a time-out): the next attempt is kept in the row."""
        with self.db.unit_of_work() as s:
            held = self._held(s, message, owner, last_error=error[:2000], lease_owner=None, lease_until=None,
                              next_attempt_at=utcnow() + timedelta(seconds=delay))
            return self._settled(s, held, owner, claim_next)

    def fail(self, message: Claimed, owner: str, error: str, detail: str,
             notice: dict[str, Any] | None = None, *, claim_next: float | None = None) -> Settled:
        """A permanent failure: the message stops, the reason stays in the row; `notice` (what to tell, a payload)
        becomes a direct message to the person whose action produced it."""
        with self.db.unit_of_work() as s:
            held = self._held(s, message, owner, error=error[:100], last_error=detail[:2000], failed_at=utcnow(),
                              lease_owner=None, lease_until=None)
            if held and notice is not None and message.notify and message.kind != outbox.NOTICE:
                outbox.record(s, outbox.NOTICE, str(message.id), message.notify, payload=notice, again=False)
            return self._settled(s, held, owner, claim_next)

    def get(self, message_id: int) -> dict[str, Any]:
        with self.db.reads() as s:
            row = s.get(OutboxMessage, message_id)
            if row is None:
                raise NotFound(f"no outbox message #{message_id}", "list them with `starchart outbox`")
            return message_view(row)

    def about(self, kind: str, subject: str) -> dict[str, Any] | None:
        """The message about one record (e.g. a job's training message), or None."""
        with self.db.reads() as s:
            row = s.execute(select(OutboxMessage).where(OutboxMessage.kind == kind, OutboxMessage.subject == subject)
                            ).scalar_one_or_none()
            return message_view(row) if row is not None else None

    def undelivered(self, limit: int = 200) -> list[dict[str, Any]]:
        """Messages not (yet) delivered: pending ones and those stopped by a permanent error, oldest first."""
        with self.db.reads() as s:
            rows = s.execute(select(OutboxMessage).where(or_(OutboxMessage.failed_at.is_not(None),
                                                             OutboxMessage.delivered < OutboxMessage.wanted))
                             .order_by(OutboxMessage.id).limit(limit)).scalars()
            return [message_view(row) for row in rows]

    def retry_failed(self, message_id: int | None = None) -> int:
        """Deliver failed messages again (after the channel or the token was fixed); all of them without an id."""
        with self.db.unit_of_work() as s:
            q = update(OutboxMessage).where(OutboxMessage.failed_at.is_not(None))
            if message_id is not None:
                q = q.where(OutboxMessage.id == message_id)
            changed = rows_changed(s.execute(q.values(failed_at=None, error=None, next_attempt_at=utcnow())))
            if changed:
                outbox.mark_recorded(s)
            return changed
