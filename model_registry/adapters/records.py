"""Records: the tables behind jobs, versions, promotion requests, approvals and audit events.

The invariants of DESIGN.md live in these constraints: one decision per approver per request
(unique request_id+approver), audit events are a chain numbered without gaps (seq primary key,
prev_hash unique), and the chain head is a single locked row.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from model_registry.domain import promotion as promotion_rules


class Base(DeclarativeBase):
    """The metadata every table (and Alembic) shares."""


# Job states, as Vertex AI and Cloud ML Engine name them.
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)


class Job(Base):
    __tablename__ = "jobs"

    job_id: Mapped[str] = mapped_column(String(80), primary_key=True)
    model: Mapped[str] = mapped_column(String(63), index=True)
    ts: Mapped[str] = mapped_column(String(14))
    state: Mapped[str] = mapped_column(String(16), default=QUEUED)
    module: Mapped[str] = mapped_column(String(200))
    args: Mapped[list[str]] = mapped_column(JSON, default=list)
    region: Mapped[str | None] = mapped_column(String(64))
    scale_tier: Mapped[str | None] = mapped_column(String(32))
    machine_type: Mapped[str | None] = mapped_column(String(64))
    workers: Mapped[int] = mapped_column(Integer, default=1)
    package_uris: Mapped[list[str]] = mapped_column(JSON, default=list)
    package_sha256: Mapped[str | None] = mapped_column(String(64))
    train_path: Mapped[str] = mapped_column(String(1000))
    backend: Mapped[str] = mapped_column(String(16))
    backend_ref: Mapped[str | None] = mapped_column(String(1000))
    requested_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime)
    error: Mapped[str | None] = mapped_column(Text)
    version_name: Mapped[str | None] = mapped_column(String(20))  # set when exposed

    __table_args__ = (Index("ix_jobs_model_ts", "model", "ts"),)


class Version(Base):
    __tablename__ = "versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(63))
    name: Mapped[str] = mapped_column(String(20))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.job_id"), unique=True)
    deployment_uri: Mapped[str] = mapped_column(String(1000))
    created_at: Mapped[datetime] = mapped_column(DateTime)
    trained_by: Mapped[str] = mapped_column(String(200))
    exposed_by: Mapped[str] = mapped_column(String(200))
    program: Mapped[dict[str, Any]] = mapped_column(JSON)  # module, package_uris, sha256
    args: Mapped[list[str]] = mapped_column(JSON, default=list)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    signature: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    job: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # StarChart's job block
    backend_ref: Mapped[str | None] = mapped_column(String(1000))
    digest: Mapped[str] = mapped_column(String(64))

    __table_args__ = (UniqueConstraint("model", "name", name="uq_versions_model_name"),)


class ModelRecord(Base):
    """One row per model: which version is the default (the pointer the review protects)."""

    __tablename__ = "models"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    default_version: Mapped[str | None] = mapped_column(String(20))
    updated_at: Mapped[datetime] = mapped_column(DateTime)




class PromotionRequest(Base):
    __tablename__ = "promotion_requests"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(63), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # promote | apply | rollback
    candidate_version: Mapped[str] = mapped_column(String(20))
    base_version: Mapped[str | None] = mapped_column(String(20))
    candidate_digest: Mapped[str] = mapped_column(String(64))
    card_digest: Mapped[str] = mapped_column(String(64))
    diff: Mapped[dict[str, Any]] = mapped_column(JSON)
    requested_by: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str | None] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default=promotion_rules.OPEN)
    required_approvals: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    expires_at: Mapped[datetime] = mapped_column(DateTime)
    decided_at: Mapped[datetime | None] = mapped_column(DateTime)
    apply_started_at: Mapped[datetime | None] = mapped_column(DateTime)
    apply_owner: Mapped[str | None] = mapped_column(String(200))  # the process running the apply (host:pid:random)
    apply_lease_until: Mapped[datetime | None] = mapped_column(DateTime)  # renewed by the owner while it runs
    applied_at: Mapped[datetime | None] = mapped_column(DateTime)
    error: Mapped[str | None] = mapped_column(Text)
    channel: Mapped[str | None] = mapped_column(String(40))
    message_ts: Mapped[str | None] = mapped_column(String(40))
    # the approval rules that applied when it opened (domain.approval_rules.Requirement.as_dict); None: none did
    rules: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    # a canary: its share and bake as asked, when it started and ended, by whom and why, the figures last read
    canary_percent: Mapped[int | None] = mapped_column(Integer)
    canary_bake_seconds: Mapped[int | None] = mapped_column(Integer)
    canary_started_at: Mapped[datetime | None] = mapped_column(DateTime)
    canary_ended_at: Mapped[datetime | None] = mapped_column(DateTime)
    canary_ended_by: Mapped[str | None] = mapped_column(String(200))
    canary_why: Mapped[str | None] = mapped_column(Text)
    canary_figures: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # the evaluation of candidate and base on the model's evaluation data (services.evaluations): its state, indexed
    # for the worker that follows it, and what it found (views.EvaluationView); None before 0009
    evaluation_state: Mapped[str | None] = mapped_column(String(16), index=True)
    evaluation: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Approval(Base):
    """One decision (approve or reject) by one approver on one promotion request."""

    __tablename__ = "approvals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[int] = mapped_column(ForeignKey("promotion_requests.id"))
    approver: Mapped[str] = mapped_column(String(200))
    decision: Mapped[str] = mapped_column(String(16))  # approve | reject
    reason: Mapped[str | None] = mapped_column(Text)
    card_digest: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime)

    __table_args__ = (UniqueConstraint("request_id", "approver", name="uq_approvals_request_approver"),)


class AuditEvent(Base):
    """Append-only, hash-chained: `hash` covers the canonical encoding of the row and `prev_hash`."""

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    action: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(200))
    actor_name: Mapped[str | None] = mapped_column(String(200))
    model: Mapped[str | None] = mapped_column(String(63))
    version: Mapped[str | None] = mapped_column(String(20))
    request_id: Mapped[int | None] = mapped_column(Integer)
    job_id: Mapped[str | None] = mapped_column(String(80))
    channel: Mapped[str | None] = mapped_column(String(40))
    message_ts: Mapped[str | None] = mapped_column(String(40))
    details: Mapped[str] = mapped_column(Text, default="{}")  # canonical JSON text, hashed as stored
    prev_hash: Mapped[str] = mapped_column(String(64), unique=True)
    hash: Mapped[str] = mapped_column(String(64))

    __table_args__ = (
        Index("ix_audit_model_created", "model", "created_at"),
        Index("ix_audit_created", "created_at"),
        Index("ix_audit_actor_created", "actor", "created_at"),
        Index("ix_audit_action_created", "action", "created_at"),
    )


class AuditHead(Base):
    """The single row every append locks: it serialises appenders across processes."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, default=0)
    hash: Mapped[str] = mapped_column(String(64))


class Schedule(Base):
    __tablename__ = "schedules"

    model: Mapped[str] = mapped_column(String(63), primary_key=True)
    cron: Mapped[str] = mapped_column(String(120))
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    args: Mapped[list[str]] = mapped_column(JSON, default=list)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    last_run_at: Mapped[datetime | None] = mapped_column(DateTime)
    updated_by: Mapped[str] = mapped_column(String(200))
    updated_at: Mapped[datetime] = mapped_column(DateTime)


class SeenRequest(Base):
    """A signed Slack request already taken, by its signature: a replay of it within the window is not acted on.

    In the database so that every replica sees what the others took; rows older than the window are dropped.
    """

    __tablename__ = "seen_requests"

    signature: Mapped[str] = mapped_column(String(100), primary_key=True)
    seen_at: Mapped[datetime] = mapped_column(DateTime, index=True)


class OutboxMessage(Base):
    """A message the bot sends to Slack on its own, recorded with the state change that causes it.

    The row names what the message is about (`kind`: training, review_card, card_file, checkpoint, notice; `subject`:
    the job id, the request id, ...) and where it goes; the sender renders the record as it is at delivery. One row
    is one Slack message: each state change raises `wanted`, a delivery sets `delivered` to the revision it showed,
    so pending updates collapse into one and an update never overtakes its post. A lease (`lease_owner`,
    `lease_until`) lets one sender at a time work on a row; a permanent Slack error sets `failed_at` and `error`.
    """

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(20))
    subject: Mapped[str] = mapped_column(String(100))
    channel: Mapped[str] = mapped_column(String(40))  # where it goes (a user id for a direct message)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    notify: Mapped[str | None] = mapped_column(String(200))  # who is told when it cannot be delivered
    wanted: Mapped[int] = mapped_column(Integer, default=1)
    delivered: Mapped[int] = mapped_column(Integer, default=0)
    posted_channel: Mapped[str | None] = mapped_column(String(40))
    ts: Mapped[str | None] = mapped_column(String(40))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    first_attempt_at: Mapped[datetime | None] = mapped_column(DateTime)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(String(100))  # the permanent error that stopped it
    failed_at: Mapped[datetime | None] = mapped_column(DateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(100))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime)

    __table_args__ = (
        UniqueConstraint("kind", "subject", name="uq_outbox_kind_subject"),
        Index("ix_outbox_due", "next_attempt_at"),
    )


@event.listens_for(Session, "before_flush")
def _audit_is_append_only(session: Session, _ctx: Any, _instances: Any) -> None:
    for obj in list(session.dirty) + list(session.deleted):
        if isinstance(obj, AuditEvent) and (obj in session.deleted or session.is_modified(obj)):
            raise PermissionError("audit events are append-only: updates and deletes are refused")


@event.listens_for(Session, "do_orm_execute")
def _no_bulk_audit_changes(state: Any) -> None:
    if (state.is_update or state.is_delete) and any(
        getattr(m, "class_", None) is AuditEvent for m in state.all_mappers
    ):
        raise PermissionError("audit events are append-only: updates and deletes are refused")
