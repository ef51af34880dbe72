"""Promotion requests: open, decide, apply, reconcile. The default moves only in `apply_request`,
after the required approvals are committed, with the audit event of each step in its transaction.

An apply belongs to the process running it: `applying` is committed with its owner and a lease, which a thread
renews while the backend switches the default, and which the result clears. `reconcile` (every worker pass, and
when a process starts) settles an apply the backend already shows the outcome of, and one whose lease lapsed.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from model_registry.adapters import outbox
from model_registry.adapters.audit_log import AuditLog
from model_registry.adapters.backends.base import Backend
from model_registry.adapters.db import Database, rows_changed
from model_registry.adapters.model_files import marked_default
from model_registry.adapters.records import Approval, ModelRecord, PromotionRequest
from model_registry.config import Gate, ProjectConfig
from model_registry.domain import approval_rules, names
from model_registry.domain import canary as canary_rules
from model_registry.domain import promotion as rules
from model_registry.domain.diffs import card_digest, diff_versions
from model_registry.domain.errors import InvalidInput, NotFound, Refused, StarchartError
from model_registry.domain.policy import check_operator
from model_registry.services import evaluations
from model_registry.services.audit_trail import AuditTrail
from model_registry.services.catalog import Catalog
from model_registry.services.versions import Versions
from model_registry.services.views import ApplyView, RequestView, request_view, version_view

log = logging.getLogger("starchart.promotions")


def apply_owner() -> str:
    """Who runs an apply: this host and process, and a random part of its own (host:pid:random)."""
    return f"{socket.gethostname()[:150]}:{os.getpid()}:{secrets.token_hex(4)}"


class Promotions:
    """Promotion requests of every model, from opening to the switch of the default."""

    def __init__(self, db: Database, audit_log: AuditLog, catalog: Catalog, config: ProjectConfig, backend: Backend,
                 versions: Versions, audit_trail: AuditTrail, apply_lease: timedelta = timedelta(seconds=60),
                 project: str | None = None) -> None:
        self.db, self.audit_log, self.catalog, self.config, self.backend = db, audit_log, catalog, config, backend
        self.versions, self.audit = versions, audit_trail
        self.apply_lease = apply_lease  # how long an apply's owner holds it between renewals (STARCHART_APPLY_LEASE)
        self.project = project  # GCP_PROJECT_ID: the project a model file's long version names must name

    def promote(self, model: str, version: str, user: str, reason: str | None = None, kind: str = "promote",
                channel: str | None = None, card: bool = False, canary: str | None = None,
                bake: str | None = None, gate: Gate | None = None) -> RequestView:
        """Open a promotion request (or find its open twin). With `card`, its review card is recorded with it, for
        the model's channel (else `channel`): the outbox posts it and updates it after each decision. With
        `canary` (a percent as typed; '' for the configured one) and `bake`, its apply starts a canary. Its
        evaluation is planned with it (`evaluations.planned`) and run later by the worker. With a nightly `gate` on
        the evaluation, the card waits for the gate, which decides once the evaluation ends."""
        names.validate_model_name(model)
        policy = self.config.policy(model)
        plan = canary_rules.plan(canary, bake, policy.canary)
        check_operator(policy, user, self.catalog.members_of, "request a promotion of", model)
        with self.db.unit_of_work() as s:
            self.catalog.require_model(model, s)
            cand = self.catalog.version(s, model, version)
            record = s.get(ModelRecord, model)
            base_name = record.default_version if record else None
            if base_name == version:
                raise InvalidInput(f"{version} is already the default of {model}", "nothing to review")
            if plan is not None:
                self._check_canary_possible(s, model, base_name)
            existing = s.execute(select(PromotionRequest).where(
                PromotionRequest.model == model, PromotionRequest.candidate_version == version,
                PromotionRequest.base_version == base_name, PromotionRequest.state == rules.OPEN,
                (PromotionRequest.canary_percent.is_(None) if plan is None
                 else PromotionRequest.canary_percent == plan.percent),
                PromotionRequest.expires_at > names.utcnow())).scalar_one_or_none()
            if existing is not None:  # a retried command finds the open request instead of a twin
                self._card(s, existing, card, user, channel)  # its card is brought up to date (or posted, if it had none)
                return request_view(existing, self.catalog.approvals(s, existing.id))
            cand_view = version_view(cand)
            base_view = version_view(self.catalog.version(s, model, base_name)) if base_name else None
            diff = diff_versions(cand_view, base_view)
            if plan is not None:  # shown on the card, so part of what an approval binds to
                diff["canary"] = {"percent": plan.percent, "bake_seconds": int(plan.bake.total_seconds())}
            applying_rules = approval_rules.requirements(policy, approval_rules.Opening(kind, diff, canary=plan is not None))
            now = names.utcnow()
            req = PromotionRequest(
                model=model, kind=kind, candidate_version=version, base_version=base_name,
                candidate_digest=cand.digest, card_digest=card_digest(cand.digest, base_view["digest"] if base_view else None,
                                                                      diff),
                diff=diff, requested_by=user, reason=reason, state=rules.OPEN,
                required_approvals=approval_rules.required_approvals(applying_rules, policy.required_approvals),
                created_at=now, expires_at=now + policy.request_expiry, channel=policy.channel or channel,
                rules=[r.as_dict() for r in applying_rules] or None,
                canary_percent=plan.percent if plan else None,
                canary_bake_seconds=int(plan.bake.total_seconds()) if plan else None,
            )
            evaluation = evaluations.planned(policy, model, cand_view, base_view, self.backend.name, gate)
            req.evaluation_state, req.evaluation = evaluation["state"], evaluation
            s.add(req)
            s.flush()
            if gate is None:
                self._card(s, req, card, user, channel)
            self.audit_log.append(s, "rollback.requested" if kind == "rollback" else "promotion.requested", user, model=model,
                         version=version, request_id=req.id, channel=req.channel,
                         details={"kind": kind, "base": base_name, "reason": reason, "card_digest": req.card_digest,
                                  "breaking": diff["signature"]["breaking"],
                                  "rules": [{k: v for k, v in r.as_dict().items() if k != "approved_by"}
                                            for r in applying_rules], **({"canary": diff["canary"]} if plan else {})})
            if gate is not None:  # a problem known at once ended the evaluation: the gate decides now
                evaluations.decide_gate(s, self.audit_log, policy, req)
            return request_view(req)

    def _check_canary_possible(self, s: Session, model: str, base: str | None) -> None:
        """A canary splits the default's traffic: the model needs a default, and one canary runs at a time."""
        if base is None:
            raise InvalidInput(f"{model} has no default version yet, and a canary splits the default's traffic",
                               f"promote a first version without --canary: `promote {model} VERSION`")
        running = self.running_canary(s, model)
        if running is not None:
            raise InvalidInput(f"a canary of {model} runs already: promotion request #{running.id} "
                               f"({running.candidate_version}, {running.canary_percent}% of the traffic)",
                               f"promote it to 100% or roll it back first: `canary {model} promote` or "
                               f"`canary {model} rollback`")

    @staticmethod
    def running_canary(s: Session, model: str) -> PromotionRequest | None:
        """The model's request whose canary runs (or is being started or promoted), if any."""
        return s.execute(select(PromotionRequest).where(
            PromotionRequest.model == model, PromotionRequest.canary_percent.is_not(None),
            PromotionRequest.canary_ended_at.is_(None),
            PromotionRequest.state.in_([rules.CANARY, rules.APPLYING]))
            .order_by(PromotionRequest.id.desc()).limit(1)).scalar_one_or_none()

    def apply(self, model: str, user: str, reason: str | None = None, channel: str | None = None,
              card: bool = False) -> ApplyView:
        """StarChart's apply: request the version marked isDefault in models/<model>.yaml (or StarChart's
        models/<model>.json); the answer names the file(s) read."""
        names.validate_model_name(model)
        self.catalog.require_model(model)
        marked = marked_default(self.config.model_files, model, self.project)
        files = " and ".join(str(p) for p in marked.files)
        with self.db.reads() as s:
            try:
                self.catalog.version(s, model, marked.version)
            except NotFound as exc:
                raise NotFound(f"{files} marks {marked.version} isDefault, but {model} has no version "
                               f"{marked.version}", f"mark one of {model}'s versions there ({exc.hint})") from None
        request = self.promote(model, marked.version, user, reason, kind="apply", channel=channel, card=card)
        return ApplyView(**request, model_files=[str(p) for p in marked.files])

    def rollback(self, model: str, user: str, reason: str | None = None, channel: str | None = None,
                 card: bool = False) -> RequestView:
        names.validate_model_name(model)
        with self.db.unit_of_work() as s:
            self.catalog.require_model(model, s)
            target = self._previous_default(s, model)
        return self.promote(model, target, user, reason, kind="rollback", channel=channel, card=card)

    @staticmethod
    def _card(s: Session, req: PromotionRequest, card: bool, user: str, channel: str | None) -> None:
        if card and not req.channel:
            req.channel = channel
        if card and req.channel:
            outbox.record(s, outbox.REVIEW_CARD, str(req.id), req.channel, notify=user)
            outbox.record(s, outbox.CARD_CHARTS, str(req.id), req.channel, notify=user, again=False)

    def _previous_default(self, s: Session, model: str) -> str:
        """Replay applied requests as a stack of defaults: promotions push, rollbacks pop."""
        applied = s.execute(select(PromotionRequest).where(
            PromotionRequest.model == model, PromotionRequest.state == rules.APPLIED
        ).order_by(PromotionRequest.applied_at, PromotionRequest.id)).scalars().all()
        stack: list[str] = []
        for req in applied:
            if not stack and req.base_version:
                stack.append(req.base_version)
            if req.kind == "rollback" and len(stack) > 1 and stack[-2] == req.candidate_version:
                stack.pop()
            else:
                stack.append(req.candidate_version)
        if len(stack) < 2:
            raise InvalidInput(f"{model} has no previous default to roll back to",
                               f"promote a version instead: `promote {model} VERSION`")
        return stack[-2]

    def get(self, request_id: int) -> RequestView:
        with self.db.reads() as s:
            return self.read(s, request_id)

    def read(self, s: Session, request_id: int) -> RequestView:
        """A request as the caller's transaction sees it (e.g. the sender's claim of its card)."""
        req = s.get(PromotionRequest, request_id)
        if req is None:
            raise NotFound(f"no promotion request #{request_id}", "list them with `requests MODEL`")
        return request_view(req, self.catalog.approvals(s, req.id))

    def of_model(self, model: str, open_only: bool = False) -> list[RequestView]:
        with self.db.reads() as s:
            self.catalog.require_model(model, s)
            q = select(PromotionRequest).where(PromotionRequest.model == model)
            if open_only:
                q = q.where(PromotionRequest.state.in_([rules.OPEN, rules.APPROVED, rules.APPLYING, rules.FAILED,
                                                        rules.CANARY]))
            return [request_view(r, self.catalog.approvals(s, r.id)) for r in
                    s.execute(q.order_by(PromotionRequest.id.desc()).limit(50)).scalars()]

    def waiting_for(self, user: str) -> list[RequestView]:
        """Open requests that wait for `user`'s decision, oldest first: they may decide on them (the approvers, the
        rules, self-approval) and have not yet."""
        now = names.utcnow()
        with self.db.reads() as s:
            rows = s.execute(select(PromotionRequest).where(
                PromotionRequest.state == rules.OPEN, PromotionRequest.expires_at > now)
                .order_by(PromotionRequest.id)).scalars().all()
            waiting = []
            for row in rows:
                req = self._domain(s, row)
                trained_by = self.catalog.version(s, row.model, row.candidate_version).trained_by
                if req.awaits(user, rules.Facts(now=now, trained_by=trained_by), self.config.policy(row.model),
                              self.catalog.members_of):
                    waiting.append(request_view(row, self.catalog.approvals(s, row.id)))
            return waiting

    def set_card(self, request_id: int, channel: str, message_ts: str) -> None:
        with self.db.unit_of_work() as s:
            s.execute(update(PromotionRequest).where(PromotionRequest.id == request_id)
                      .values(channel=channel, message_ts=message_ts))

    def decide(self, request_id: int, user: str, approve: bool, *, reason: str | None = None,
               card_digest: str | None = None, model: str | None = None, channel: str | None = None,
               message_ts: str | None = None, actor_name: str | None = None) -> RequestView:
        """Record one approver's decision. A refusal is recorded in the audit trail, then raised.

        `model`: the one a card's button names, refused unless it is the request's."""
        rules.require_reason(approve, reason)
        person = {"channel": channel, "message_ts": message_ts, "actor_name": actor_name}
        with self.db.unit_of_work() as s:
            row = s.get(PromotionRequest, request_id, with_for_update=True)
            refusal: Refused | None
            if row is None:
                refusal = Refused(f"no promotion request #{request_id}", "it may have been removed; open a new one",
                                  reason="not_found")
                self.audit_log.append(s, "approval.refused", user, request_id=request_id, **person,
                             details={"reason": "not_found"})
            elif model is not None and model != row.model:
                refusal, recorded = rules.model_mismatch(model, request_id, row.model)
                self.audit.append_refusal(s, user, "model_mismatch", recorded, model=row.model,
                                          request_id=request_id, channel=channel, message_ts=message_ts)
            elif evaluations.gate_waits(row):
                refusal = Refused(f"promotion request #{request_id} waits for its evaluation: the nightly gate "
                                  "decides whether it is put up for review", "decide once its card is posted",
                                  reason="waiting_for_evaluation")
                self.audit_log.append(s, "approval.refused", user, model=row.model, request_id=request_id, **person,
                                      details={"reason": "waiting_for_evaluation"})
            else:
                req = self._domain(s, row)
                cand = self.catalog.version(s, row.model, row.candidate_version)
                facts = rules.Facts(now=names.utcnow(), current_default=self._default_of(s, row.model),
                                    candidate_digest=cand.digest, trained_by=cand.trained_by)
                outcome = req.decide(user, approve, facts, self.config.policy(row.model), self.catalog.members_of,
                                     reason=reason, click=rules.Click(card_digest, channel, message_ts))
                self._store(s, row, req, outcome, person)
                refusal = outcome.refusal
        if refusal is not None:
            raise refusal
        return self.get(request_id)

    def retry(self, request_id: int, user: str) -> RequestView:
        """Apply a failed request again; only an approver of the model may ask."""
        with self.db.reads() as s:
            row = s.get(PromotionRequest, request_id)
            if row is None:
                raise NotFound(f"no promotion request #{request_id}", "list them with `requests MODEL`")
            req = self._domain(s, row)
        refusal = req.retry_refusal(user, self.config.policy(req.model), self.catalog.members_of)
        if isinstance(refusal, Refused):
            self.audit.record_refusal(user, refusal.reason, f"{user} may not retry #{request_id}", model=req.model,
                                      request_id=request_id)
        if refusal is not None:
            raise refusal
        return self.apply_request(request_id, actor=user)

    def apply_request(self, request_id: int, actor: str = "system", why: str | None = None) -> RequestView:
        """Switch the default for an approved request: audit first, then the backend, then the result.

        Only one caller wins the approved/failed -> applying transition, with its lease; the others get the request
        as it is. The lease is renewed while the backend works and ends with the result.
        """
        lease = rules.Lease(apply_owner(), self.apply_lease)
        with self.db.unit_of_work() as s:
            row = s.get(PromotionRequest, request_id, with_for_update=True)
            if row is None:
                raise NotFound(f"no promotion request #{request_id}")
            req = self._domain(s, row)
            if row.state in rules.APPLICABLE:
                s.get(ModelRecord, row.model, with_for_update=True)  # one apply per model: the model row is locked
            busy = s.execute(select(PromotionRequest.id).where(
                PromotionRequest.model == row.model, PromotionRequest.state == rules.APPLYING,
                PromotionRequest.id != row.id).limit(1)).scalar()
            canary_of = s.execute(select(PromotionRequest.id).where(
                PromotionRequest.model == row.model, PromotionRequest.state == rules.CANARY,
                PromotionRequest.id != row.id).limit(1)).scalar()
            starting_canary = req.starting_canary
            outcome = req.start_apply(actor, rules.Facts(now=names.utcnow(),
                                                         current_default=self._default_of(s, row.model)),
                                      self.backend.name, lease, busy_with=busy, canary_of=canary_of, why=why)
            self._store(s, row, req, outcome)
            if outcome.refusal is not None:
                raise outcome.refusal
            if not outcome.started:
                return request_view(row, self.catalog.approvals(s, row.id))
            model, version = row.model, row.candidate_version
            ref = self.catalog.version(s, model, version).backend_ref
        try:
            with self._renewing(request_id, lease, self.backend.apply_timeout(model)):
                if starting_canary:  # the candidate takes its share of the default's traffic; the default stays
                    self.backend.start_canary(model, version, ref, req.canary_percent or 0,
                                              self.config.policy(model).canary.mirror)
                else:
                    self.backend.set_default(model, version, ref)
        except Exception as exc:  # any backend failure leaves the request failed with the reason, nothing applied
            reason = exc.message if isinstance(exc, StarchartError) else f"{type(exc).__name__}: {exc}"
            self._apply_result(request_id, actor, lease.owner, error=reason)
        else:
            self._apply_result(request_id, actor, lease.owner)
        self.versions.write_model_file(model)
        return self.get(request_id)

    @contextmanager
    def _renewing(self, request_id: int, lease: rules.Lease, longest: float) -> Iterator[None]:
        """Renew the apply's lease every third of its length while the body runs, for at most `longest` seconds
        (the backend's bound on a switch: a call hung past it no longer holds the request, which is then settled)."""
        stop = threading.Event()
        every = lease.length.total_seconds() / 3
        deadline = time.monotonic() + longest

        def renew() -> None:
            while not stop.wait(every):
                if time.monotonic() >= deadline:
                    log.warning("promotion request #%s: the backend is still switching after %.0fs, longer than it "
                                "should take; its lease is no longer renewed", request_id, longest)
                    return
                try:
                    if not self._renew(request_id, lease):
                        log.warning("promotion request #%s was settled by another process while %s was applying it",
                                    request_id, lease.owner)
                        return
                except Exception:  # the next renewal tries again; the lease may lapse meanwhile
                    log.exception("promotion request #%s: could not renew the lease of %s", request_id, lease.owner)

        thread = threading.Thread(target=renew, name=f"starchart-lease-{request_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=lease.length.total_seconds())  # a renewal after the result changes nothing

    def _renew(self, request_id: int, lease: rules.Lease) -> bool:
        with self.db.unit_of_work() as s:
            row = s.get(PromotionRequest, request_id, with_for_update=True)
            if row is None:
                return False
            req = self._domain(s, row)
            renewed = req.renew(lease.owner, names.utcnow(), lease.length)
            self._store(s, row, req, rules.Outcome())
            return renewed

    def _apply_result(self, request_id: int, actor: str, owner: str, error: str | None = None) -> None:
        with self.db.unit_of_work() as s:
            row = s.get_one(PromotionRequest, request_id, with_for_update=True)
            req = self._domain(s, row)
            events = req.finish_apply(actor, names.utcnow(), error, self._switch_default(s, row), owner=owner)
            self._store(s, row, req, rules.Outcome(events))

    def reconcile(self) -> list[RequestView]:
        """Settle applies in progress whose outcome is known, at once: applied when the backend has the candidate as
        its default, failed (and retryable) when the owner's lease lapsed before the backend was asked. An apply
        whose owner still renews its lease and whose backend shows no switch yet is left to its owner."""
        with self.db.reads() as s:
            applying = s.execute(select(PromotionRequest.id, PromotionRequest.model)
                                 .where(PromotionRequest.state == rules.APPLYING)
                                 .order_by(PromotionRequest.id)).all()
        results = []
        for request_id, model in applying:
            asked_at = names.utcnow()  # before the backend answers: a lease lapsed by now lapsed before it spoke
            try:
                split = self.backend.canary_split(model)
                default = self.backend.current_default(model)
                others = [v for v, share in split.items() if v != default and share]
                seen = rules.Seen(default, asked_at, canary=others[0] if others else None)
            except StarchartError as exc:
                log.warning("promotion request #%s stays applying: could not read the default of %s from the "
                            "backend (%s); the next pass asks again", request_id, model, exc.message)
                continue
            if self._settle(request_id, seen):
                results.append(self.get(request_id))
                self.versions.write_model_file(model)
        return results

    def _settle(self, request_id: int, seen: rules.Seen) -> bool:
        """One reconciler settles a request, once: the row is locked and the rules see it as it is now."""
        with self.db.unit_of_work() as s:
            row = s.get_one(PromotionRequest, request_id, with_for_update=True)
            req = self._domain(s, row)
            events = req.settle(seen, names.utcnow(), self._switch_default(s, row))
            self._store(s, row, req, rules.Outcome(events))
            return bool(events)

    def expire(self) -> int:
        """Close open requests past their expiry (the worker calls this)."""
        now = names.utcnow()
        with self.db.unit_of_work() as s:
            rows = s.execute(select(PromotionRequest).where(PromotionRequest.state == rules.OPEN,
                                                            PromotionRequest.expires_at < now)).scalars().all()
            for row in rows:
                req = self._domain(s, row)
                self._store(s, row, req, rules.Outcome(req.expire(now)))
            return len(rows)

    # ---------------------------------------------------------------- between records and rules

    @staticmethod
    def _switch_default(s: Session, row: PromotionRequest) -> Callable[[], bool]:
        """Move the model's default from the request's base to its candidate if it still is the base."""
        def switch() -> bool:
            base_is = (ModelRecord.default_version.is_(None) if row.base_version is None
                       else ModelRecord.default_version == row.base_version)
            return bool(rows_changed(s.execute(
                update(ModelRecord).where(ModelRecord.name == row.model, base_is)
                .values(default_version=row.candidate_version, updated_at=names.utcnow()))))

        return switch

    @staticmethod
    def _default_of(s: Session, model: str) -> str | None:
        record = s.get(ModelRecord, model)
        return record.default_version if record else None

    def _domain(self, s: Session, row: PromotionRequest) -> rules.PromotionRequest:
        return rules.PromotionRequest(
            id=row.id, model=row.model, kind=row.kind, candidate=row.candidate_version, base=row.base_version,
            candidate_digest=row.candidate_digest, card_digest=row.card_digest, requested_by=row.requested_by,
            required_approvals=row.required_approvals, expires_at=row.expires_at, state=row.state,
            decisions=[rules.Decision(a.approver, a.decision, a.reason, a.created_at, a.card_digest)
                       for a in self.catalog.approvals(s, row.id)],
            decided_at=row.decided_at, apply_started_at=row.apply_started_at, apply_owner=row.apply_owner,
            lease_until=row.apply_lease_until, applied_at=row.applied_at,
            error=row.error, channel=row.channel, message_ts=row.message_ts,
            rules=[approval_rules.Requirement.from_dict(r) for r in row.rules or []], canary_percent=row.canary_percent,
            canary_bake=timedelta(seconds=row.canary_bake_seconds) if row.canary_bake_seconds is not None else None,
            canary_started_at=row.canary_started_at, canary_ended_at=row.canary_ended_at,
            canary_ended_by=row.canary_ended_by, canary_why=row.canary_why, canary_figures=row.canary_figures)

    def _store(self, s: Session, row: PromotionRequest, req: rules.PromotionRequest, outcome: rules.Outcome,
               person: dict[str, Any] | None = None) -> None:
        """Persist what a rule did, in the caller's transaction: the request, a new decision, its audit events."""
        row.state, row.decided_at, row.error = req.state, req.decided_at, req.error
        row.apply_started_at, row.applied_at = req.apply_started_at, req.applied_at
        row.apply_owner, row.apply_lease_until = req.apply_owner, req.lease_until
        if req.rules:  # who has approved for each rule changes with the decisions
            row.rules = [r.as_dict() for r in req.rules]
        row.canary_started_at, row.canary_ended_at = req.canary_started_at, req.canary_ended_at
        row.canary_ended_by, row.canary_why = req.canary_ended_by, req.canary_why
        if req.canary_figures != row.canary_figures:
            row.canary_figures = req.canary_figures
        if outcome.decision is not None:
            d = outcome.decision
            s.add(Approval(request_id=row.id, approver=d.approver, decision=d.decision, reason=d.reason,
                           card_digest=d.card_digest, created_at=d.at))
            s.flush()  # the unique (request, approver) constraint speaks before any event is written
        for event in outcome.events:
            where: dict[str, Any] = {}
            if event.by_person:
                where = dict(person or {})
            elif event.on_card:
                where = {"channel": row.channel, "message_ts": row.message_ts}
            self.audit_log.append(s, event.action, event.actor, model=row.model, version=row.candidate_version,
                         request_id=row.id, **where, details=event.details)
        # a request reviewed in Slack gets its canary card there as its canary starts
        canary_card = any(e.action == "canary.started" for e in outcome.events) and bool(row.channel) and \
            outbox.exists(s, outbox.REVIEW_CARD, str(row.id))
        # its cards (those it has) show the change: one UPDATE for both
        outbox.want_update(s, outbox.REVIEW_CARD if canary_card else (outbox.REVIEW_CARD, outbox.CANARY_CARD),
                           [str(row.id)])
        if canary_card and row.channel:
            outbox.record(s, outbox.CANARY_CARD, str(row.id), row.channel, notify=row.requested_by)

    # the canaries' use cases (services/canaries.py) persist through the same two steps
    def rules_of(self, s: Session, row: PromotionRequest) -> rules.PromotionRequest:
        return self._domain(s, row)

    def store(self, s: Session, row: PromotionRequest, req: rules.PromotionRequest, outcome: rules.Outcome,
              person: dict[str, Any] | None = None) -> None:
        self._store(s, row, req, outcome, person)
