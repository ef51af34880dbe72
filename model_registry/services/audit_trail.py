"""The audit trail's use cases: filtered events, the default at a point in time, checkpoints, verify."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, cast

from sqlalchemy import Table, bindparam, delete, select

from model_registry.adapters import audit_log as audit
from model_registry.adapters import outbox
from model_registry.adapters.audit_log import AuditLog
from model_registry.adapters.db import Database, insert_if_new
from model_registry.adapters.records import (
    PromotionRequest,
    SeenRequest,
    Version,
)
from model_registry.config import Settings
from model_registry.domain import names
from model_registry.domain.errors import InvalidInput, NotFound
from model_registry.domain.names import iso, utcnow
from model_registry.services.catalog import Catalog
from model_registry.services.views import DefaultAt

# Built once, on the table (not through the ORM): each Slack request drops the marks past their window, and building
# the statement cost more than running it.
_SEEN = cast(Table, SeenRequest.__table__)
_DROP_SEEN = delete(_SEEN).where(_SEEN.c.seen_at < bindparam("before"))

log = logging.getLogger("starchart.audit")
REFUSAL_WINDOW = 60.0  # seconds: one recorded refusal per source and reason in each such window


def _refusal_mark(source: str, reason: str, minute: int) -> str:
    """The shared mark of one source's refusals for one reason in one window (it fits seen_requests' key)."""
    digest = hashlib.sha256(f"{source}\0{reason}".encode()).hexdigest()[:40]
    return f"refused:{minute}:{digest}"


class RefusalLimiter:
    """At most one recorded refusal per source and reason every `window` seconds in this process; the rest are
    only counted.

    `admit` answers None for a refusal to count but not record, else how many refusals of that kind the record
    stands for (this one and those this process counted since its last record). The first filter, in memory;
    `AuditTrail.record_refusal` then takes the minute's mark in the database, shared by every replica.
    """

    def __init__(self, window: float = REFUSAL_WINDOW, clock: Callable[[], float] = time.monotonic,
                 max_sources: int = 10_000) -> None:
        self.window, self.clock, self.max_sources = window, clock, max_sources
        self._seen: dict[tuple[str, ...], tuple[float, int]] = {}  # key -> (last recorded at, counted since)
        self._lock = threading.Lock()

    def admit(self, key: tuple[str, ...]) -> int | None:
        now = self.clock()
        with self._lock:
            recorded_at, counted = self._seen.get(key, (None, 0))
            if recorded_at is not None and now - recorded_at < self.window:
                self._seen[key] = (recorded_at, counted + 1)
                return None
            if len(self._seen) >= self.max_sources:  # a flood of sources: forget the quiet ones
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.window}
            self._seen[key] = (now, 0)
            return counted + 1


class AuditTrail:
    """The audit chain as people ask about it, and the refusals recorded outside any other change."""

    def __init__(self, db: Database, audit_log: AuditLog, catalog: Catalog, settings: Settings) -> None:
        self.db, self.audit_log, self.catalog, self.settings = db, audit_log, catalog, settings
        self.limiter = RefusalLimiter()

    @property
    def _checkpoint_file(self) -> Path:
        return self.settings.home / "audit" / "checkpoints.jsonl"

    def _audit_key(self) -> bytes | None:
        key = self.settings.audit_key
        return key.encode() if key else None

    def record_refusal(self, actor: str, reason: str, message: str, *, model: str | None = None,
                       request_id: int | None = None, channel: str | None = None, message_ts: str | None = None,
                       details: dict[str, Any] | None = None, source: str | None = None) -> bool:
        """Record a refused request that changed nothing (forged, tampered, unauthorised).

        With `source` (the address of an unauthenticated request), refusals are bounded: one event per source and
        reason a minute across every process (the minute's mark is a row only one replica can insert), carrying
        in details.count how many refusals it stands for; the others are only counted in a log line. Answers
        whether an event was written.
        """
        if source is not None:
            count = self.limiter.admit((source, reason))
            minute = int(time.time() // REFUSAL_WINDOW)
            if count is None or not self._take_mark(_refusal_mark(source, reason, minute), 2 * REFUSAL_WINDOW):
                log.warning("refused again, not recorded this minute: %s from %s (%s)", reason, source, message[:200])
                return False
            details = {**(details or {}), "count": count}
        with self.db.unit_of_work() as s:
            self.append_refusal(s, actor, reason, message, model=model, request_id=request_id, channel=channel,
                                message_ts=message_ts, details=details)
        return True

    def append_refusal(self, s: Any, actor: str, reason: str, message: str, *, model: str | None = None,
                       request_id: int | None = None, channel: str | None = None, message_ts: str | None = None,
                       details: dict[str, Any] | None = None) -> None:
        """A `request.refused` event in the caller's transaction (record_refusal opens its own)."""
        self.audit_log.append(s, "request.refused", actor, model=model, request_id=request_id, channel=channel,
                              message_ts=message_ts, details={"reason": reason, "message": message[:500],
                                                              **(details or {})})

    def first_sight(self, signature: str, window: float = 600.0) -> bool:
        """Whether a signed request is new: False when its signature was already taken within `window` seconds.

        The insert decides across replicas (the signature is the primary key); older signatures are dropped,
        since Slack's timestamp check already refuses their requests.
        """
        return self._take_mark(signature, window)

    def _take_mark(self, key: str, window: float) -> bool:
        """Insert `key` into the marks shared by every replica; False when it is there already. Marks older than
        `window` seconds are dropped on the way."""
        now = utcnow()
        with self.db.unit_of_work() as s:
            s.execute(_DROP_SEEN, {"before": now - timedelta(seconds=window)})
            return insert_if_new(s, SeenRequest, signature=key, seen_at=now)

    def checkpoints(self) -> list[dict[str, Any]]:
        """Checkpoints kept outside the database (one JSON object per line)."""
        try:
            lines = self._checkpoint_file.read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"malformed": line[:100]})
        return out

    def checkpoint(self, channel: str | None = None, user: str | None = None) -> dict[str, Any]:
        """Record the chain's head outside the database; with `channel`, a copy is recorded for the outbox to post
        there (`user`: who is told if it cannot be)."""
        if not channel:
            with self.db.reads() as s:
                cp = self.audit_log.checkpoint(s, self._audit_key())
            self._keep(cp)
            return cp
        with self.db.unit_of_work() as s:  # the head and its message in one transaction; the file before the commit
            cp = self.audit_log.checkpoint(s, self._audit_key())
            outbox.record(s, outbox.CHECKPOINT, f"{cp.get('at')}#{cp.get('count')}", channel, notify=user,
                          payload={"checkpoint": cp})
            self._keep(cp)
        return cp

    def _keep(self, cp: dict[str, Any]) -> None:
        self._checkpoint_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self._checkpoint_file, "a") as fh:
            fh.write(json.dumps(cp, sort_keys=True) + "\n")

    def verify(self, checkpoints: Iterable[dict[str, Any]] | None = None) -> audit.VerifyResult:
        cps = self.checkpoints() if checkpoints is None else list(checkpoints)
        with self.db.reads() as s:
            return self.audit_log.verify(s, cps, self._audit_key())

    def events(self, *, model: str | None = None, since: datetime | None = None,
                     until: datetime | None = None, actor: str | None = None, action: str | None = None,
                     version: str | None = None, limit: int = 50, before_seq: int | None = None
                     ) -> list[dict[str, Any]]:
        if model is not None:
            names.validate_model_name(model)
        if action is not None and action not in audit.ACTIONS:
            hint = names.suggest(action, list(audit.ACTIONS)) or "actions: " + ", ".join(audit.ACTIONS)
            raise InvalidInput(f"unknown audit action {action!r}", hint)
        if not 1 <= limit <= 1000:
            raise InvalidInput(f"invalid --limit {limit}", "use a number from 1 to 1000 (or --csv for everything)")
        if since is not None and until is not None and since >= until:
            raise InvalidInput("--since is not before --until", "swap them, or drop one")
        # one indexed SELECT on the read-only engine (no write lock on SQLite, no transaction on PostgreSQL)
        with self.db.reader.connect() as conn:
            rows = self.audit_log.events(conn, model=model, since=since, until=until, actor=actor, action=action,
                                         version=version, limit=limit, before_seq=before_seq)
            if not rows and actor is not None and not self.audit_log.has_actor(conn, actor):
                raise NotFound(f"no audit events by {actor!r}", "check the user id (in Slack, @mention the person)")
        return rows

    def all_events(self, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every event matching the filters, newest first, a page of 1,000 at a time (CSV exports)."""
        before: int | None = None
        while True:
            page = self.events(limit=1000, before_seq=before, **filters)
            yield from page
            if len(page) < 1000:
                return
            before = page[-1]["seq"]

    def default_at(self, model: str, at: datetime) -> DefaultAt:
        """Which version was the default of `model` at `at`, who requested and approved it, from what."""
        names.validate_model_name(model)
        with self.db.reads() as s:
            self.catalog.require_model(model, s)
            event = self.audit_log.default_event_at(s, model, at)
            if event is None:
                raise NotFound(f"{model} had no default version at {iso(at)}",
                               f"its first version became the default later; see `audit {model}`")
            answer: DefaultAt = {"model": model, "at": iso(at), "version": event.version,
                                 "since": iso(event.created_at), "how": event.action, "event_seq": event.seq,
                                 "requested_by": event.actor, "approved_by": []}
            if event.request_id is not None:
                req = s.get(PromotionRequest, event.request_id)
                answer["requested_by"] = req.requested_by if req else None
                answer["approved_by"] = [a.approver for a in self.catalog.approvals(s, event.request_id)
                                         if a.decision == "approve"]
            answer["split"], answer["canary_request"] = {str(event.version): 100}, None
            canary = audit.canary_event_at(s, model, at)
            if canary is not None and canary.action == "canary.started" and canary.seq > event.seq:
                split = audit.event_details(canary).get("split") or {}
                answer["split"] = {str(k): int(v) for k, v in split.items()}
                answer["canary_request"] = canary.request_id
            version = s.execute(select(Version).where(Version.model == model, Version.name == event.version)
                                ).scalar_one_or_none()
            if version is not None:
                answer["job_id"], answer["trained_by"] = version.job_id, version.trained_by
                answer["args"], answer["program"], answer["metrics"] = list(version.args or []), version.program, version.metrics
            return answer
