"""Promotion requests: open, decide, apply, reconcile. The default moves only in `apply_request`,
after the required approvals are committed, with the audit event of each step in its transaction.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from model_registry import audit, names
from model_registry.audit_trail import AuditTrail
from model_registry.backends.base import Backend
from model_registry.config import ProjectConfig
from model_registry.diffs import card_digest, diff_versions
from model_registry.errors import InvalidInput, NotFound, Refused, StarchartError
from model_registry.exposing import Versions
from model_registry.model_files import marked_default, read_model_file
from model_registry.policy import check_approver, check_operator, is_listed
from model_registry.records import (
    APPLIED,
    APPLYING,
    APPROVED,
    EXPIRED,
    FAILED_APPLY,
    OPEN,
    REJECTED,
    STALE,
    Approval,
    ModelRecord,
    PromotionRequest,
)
from model_registry.service import Catalog, Database
from model_registry.views import iso, request_view, version_view

RECONCILE_AFTER = timedelta(minutes=2)  # an apply older than this with no result was interrupted


class Promotions:
    """Promotion requests of every model, from opening to the switch of the default."""

    def __init__(self, db: Database, catalog: Catalog, config: ProjectConfig, backend: Backend, versions: Versions,
                 audit_trail: AuditTrail) -> None:
        self.db, self.catalog, self.config, self.backend = db, catalog, config, backend
        self.versions, self.audit = versions, audit_trail

    def promote(self, model: str, version: str, user: str, reason: str | None = None, kind: str = "promote",
                channel: str | None = None) -> dict[str, Any]:
        names.validate_model_name(model)
        policy = self.config.policy(model)
        check_operator(policy, user, self.catalog.members_of, "request a promotion of", model)
        with self.db.unit_of_work() as s:
            self.catalog.require_model(model, s)
            cand = self.catalog.version(s, model, version)
            record = s.get(ModelRecord, model)
            base_name = record.default_version if record else None
            if base_name == version:
                raise InvalidInput(f"{version} is already the default of {model}", "nothing to review")
            existing = s.execute(select(PromotionRequest).where(
                PromotionRequest.model == model, PromotionRequest.candidate_version == version,
                PromotionRequest.base_version == base_name, PromotionRequest.state == OPEN,
                PromotionRequest.expires_at > names.utcnow())).scalar_one_or_none()
            if existing is not None:  # a retried command finds the open request instead of a twin
                return request_view(existing, self.catalog.approvals(s, existing.id))
            cand_view = version_view(cand)
            base_view = version_view(self.catalog.version(s, model, base_name)) if base_name else None
            diff = diff_versions(cand_view, base_view)
            now = names.utcnow()
            req = PromotionRequest(
                model=model, kind=kind, candidate_version=version, base_version=base_name,
                candidate_digest=cand.digest, card_digest=card_digest(cand.digest, base_view and base_view["digest"],
                                                                      diff),
                diff=diff, requested_by=user, reason=reason, state=OPEN,
                required_approvals=policy.required_approvals, created_at=now, expires_at=now + policy.request_expiry,
                channel=channel or policy.channel,
            )
            s.add(req)
            s.flush()
            audit.append(s, "rollback.requested" if kind == "rollback" else "promotion.requested", user, model=model,
                         version=version, request_id=req.id, channel=req.channel,
                         details={"kind": kind, "base": base_name, "reason": reason, "card_digest": req.card_digest,
                                  "breaking": diff["signature"]["breaking"]})
            return request_view(req)

    def apply(self, model: str, user: str, reason: str | None = None) -> dict[str, Any]:
        """StarChart's apply: request the version marked isDefault in models/<model>.yaml."""
        names.validate_model_name(model)
        self.catalog.require_model(model)
        doc = read_model_file(self.config.model_files, model)
        wanted = marked_default(doc, str(self.config.model_files / f"{model}.yaml"))
        return self.promote(model, wanted, user, reason, kind="apply")

    def rollback(self, model: str, user: str, reason: str | None = None) -> dict[str, Any]:
        names.validate_model_name(model)
        with self.db.unit_of_work() as s:
            self.catalog.require_model(model, s)
            target = self._previous_default(s, model)
        return self.promote(model, target, user, reason, kind="rollback")

    def _previous_default(self, s: Session, model: str) -> str:
        """Replay applied requests as a stack of defaults: promotions push, rollbacks pop."""
        applied = s.execute(select(PromotionRequest).where(
            PromotionRequest.model == model, PromotionRequest.state == APPLIED
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

    def get(self, request_id: int) -> dict[str, Any]:
        with self.db.reads() as s:
            req = s.get(PromotionRequest, request_id)
            if req is None:
                raise NotFound(f"no promotion request #{request_id}", "list them with `requests MODEL`")
            return request_view(req, self.catalog.approvals(s, req.id))

    def of_model(self, model: str, open_only: bool = False) -> list[dict[str, Any]]:
        with self.db.reads() as s:
            self.catalog.require_model(model, s)
            q = select(PromotionRequest).where(PromotionRequest.model == model)
            if open_only:
                q = q.where(PromotionRequest.state.in_([OPEN, APPROVED, APPLYING, FAILED_APPLY]))
            return [request_view(r, self.catalog.approvals(s, r.id)) for r in
                    s.execute(q.order_by(PromotionRequest.id.desc()).limit(50)).scalars()]

    def set_card(self, request_id: int, channel: str, message_ts: str) -> None:
        with self.db.unit_of_work() as s:
            s.execute(update(PromotionRequest).where(PromotionRequest.id == request_id)
                      .values(channel=channel, message_ts=message_ts))

    def decide(self, request_id: int, user: str, approve: bool, *, reason: str | None = None,
               card_digest: str | None = None, channel: str | None = None, message_ts: str | None = None,
               actor_name: str | None = None) -> dict[str, Any]:
        """Record one approver's decision. A refusal is recorded in the audit trail, then raised."""
        if not approve and not (reason or "").strip():
            raise InvalidInput("a rejection needs a reason", "say why, e.g. --reason 'accuracy dropped'")
        refusal: Refused | None = None
        ctx = {"channel": channel, "message_ts": message_ts, "actor_name": actor_name}
        with self.db.unit_of_work() as s:
            req = s.get(PromotionRequest, request_id, with_for_update=True)
            if req is None:
                refusal = Refused(f"no promotion request #{request_id}", "it may have been removed; open a new one",
                                  reason="not_found")
                audit.append(s, "approval.refused", user, request_id=request_id, **ctx,
                             details={"reason": "not_found"})
            else:
                refusal = self._decision_refusal(s, req, user, card_digest, channel, message_ts)
                if refusal is not None:
                    audit.append(s, "approval.refused", user, model=req.model, version=req.candidate_version,
                                 request_id=req.id, **ctx,
                                 details={"reason": refusal.reason, "message": refusal.message,
                                          "decision": "approve" if approve else "reject"})
                else:
                    self._record_decision(s, req, user, approve, reason, ctx)
        if refusal is not None:
            raise refusal
        return self.get(request_id)

    def _decision_refusal(self, s: Session, req: PromotionRequest, user: str, digest: str | None,
                          channel: str | None = None, message_ts: str | None = None) -> Refused | None:
        now = names.utcnow()
        clicked_elsewhere = message_ts is not None and req.message_ts is not None and (
            message_ts != req.message_ts or (channel is not None and channel != req.channel))
        if clicked_elsewhere or (digest is not None and digest != req.card_digest):
            # a button copied to another message, or a value edited: refuse without touching the request
            return Refused(f"that button does not belong to the card of promotion request #{req.id}",
                           "use the buttons on the request's own card", reason="card_mismatch")
        if req.state != OPEN:
            return Refused(f"promotion request #{req.id} is already {req.state}", "nothing left to decide",
                           reason="closed")
        if now > req.expires_at:
            req.state, req.decided_at = EXPIRED, now
            audit.append(s, "promotion.expired", "system", model=req.model, version=req.candidate_version,
                         request_id=req.id)
            return Refused(f"promotion request #{req.id} expired at {iso(req.expires_at)}",
                           f"open a new one: `promote {req.model} {req.candidate_version}`", reason="expired")
        cand = self.catalog.version(s, req.model, req.candidate_version)
        try:
            check_approver(self.config.policy(req.model), user, self.catalog.members_of, req.requested_by, cand.trained_by,
                           req.model)
        except Refused as exc:
            return exc
        record = s.get(ModelRecord, req.model)
        current = record.default_version if record else None
        stale_why = None
        if current != req.base_version:
            stale_why = f"the default moved from {req.base_version} to {current} since the card was posted"
        elif cand.digest != req.candidate_digest:
            stale_why = f"{req.candidate_version} changed since the card was posted"
        if stale_why:
            req.state, req.decided_at = STALE, now
            audit.append(s, "promotion.stale", "system", model=req.model, version=req.candidate_version,
                         request_id=req.id, details={"why": stale_why})
            return Refused(f"promotion request #{req.id} is stale: {stale_why}",
                           f"open a new one: `promote {req.model} {req.candidate_version}`", reason="stale")
        if s.execute(select(Approval.id).where(Approval.request_id == req.id, Approval.approver == user)).first():
            return Refused(f"{user} already decided on promotion request #{req.id}", "one decision per approver",
                           reason="duplicate")
        return None

    def _record_decision(self, s: Session, req: PromotionRequest, user: str, approve: bool, reason: str | None,
                         ctx: dict[str, Any]) -> None:
        now = names.utcnow()
        s.add(Approval(request_id=req.id, approver=user, decision="approve" if approve else "reject",
                       reason=reason, card_digest=req.card_digest, created_at=now))
        s.flush()
        common = {"model": req.model, "version": req.candidate_version, "request_id": req.id, **ctx}
        if not approve:
            req.state, req.decided_at = REJECTED, now
            audit.append(s, "promotion.rejected", user, **common, details={"reason": reason})
            return
        audit.append(s, "approval.granted", user, **common, details={"card_digest": req.card_digest})
        granted = s.execute(select(func.count()).select_from(Approval).where(
            Approval.request_id == req.id, Approval.decision == "approve")).scalar() or 0
        if granted >= req.required_approvals:
            req.state, req.decided_at = APPROVED, now
            audit.append(s, "promotion.approved", "system", model=req.model, version=req.candidate_version,
                         request_id=req.id, details={"approvals": granted, "required": req.required_approvals})

    def retry(self, request_id: int, user: str) -> dict[str, Any]:
        """Apply a failed request again; only an approver of the model may ask."""
        req = self.get(request_id)
        policy = self.config.policy(req["model"])
        if policy.approvers and not is_listed(user, policy.approvers, self.catalog.members_of):
            self.audit.record_refusal(user, "not_approver", f"{user} may not retry #{request_id}", model=req["model"],
                                request_id=request_id)
            raise Refused(f"{user} is not an approver of {req['model']}", "ask an approver to retry",
                          reason="not_approver")
        if req["state"] != FAILED_APPLY:
            raise InvalidInput(f"promotion request #{request_id} is {req['state']}, not failed",
                               "only a failed apply can be retried")
        return self.apply_request(request_id, actor=user)

    def apply_request(self, request_id: int, actor: str = "system") -> dict[str, Any]:
        """Switch the default for an approved request: audit first, then the backend, then the result.

        Only one caller wins the APPROVED/FAILED -> APPLYING transition; the others get the request as it is.
        """
        with self.db.unit_of_work() as s:
            req = s.get(PromotionRequest, request_id, with_for_update=True)
            if req is None:
                raise NotFound(f"no promotion request #{request_id}")
            if req.state not in (APPROVED, FAILED_APPLY):
                return request_view(req, self.catalog.approvals(s, req.id))
            granted = s.execute(select(func.count()).select_from(Approval).where(
                Approval.request_id == req.id, Approval.decision == "approve")).scalar() or 0
            if granted < req.required_approvals:
                raise Refused(f"promotion request #{req.id} has {granted} of {req.required_approvals} approvals",
                              "wait for more approvals", reason="not_approved")
            record = s.get(ModelRecord, req.model, with_for_update=True)
            if (record.default_version if record else None) != req.base_version:
                req.state = STALE
                audit.append(s, "promotion.stale", "system", model=req.model, version=req.candidate_version,
                             request_id=req.id, details={"why": "the default moved before the apply"})
                return request_view(req, self.catalog.approvals(s, req.id))
            busy = s.execute(select(PromotionRequest.id).where(
                PromotionRequest.model == req.model, PromotionRequest.state == APPLYING,
                PromotionRequest.id != req.id).limit(1)).scalar()
            if busy is not None:  # the model row is locked: one apply per model at a time
                raise Refused(f"promotion request #{busy} of {req.model} is being applied right now",
                              f"retry #{req.id} when it has finished", reason="busy")
            req.state, req.apply_started_at, req.error = APPLYING, names.utcnow(), None
            audit.append(s, "promotion.applying", actor, model=req.model, version=req.candidate_version,
                         request_id=req.id, channel=req.channel, message_ts=req.message_ts,
                         details={"base": req.base_version, "backend": self.backend.name})
            cand = self.catalog.version(s, req.model, req.candidate_version)
            model, version, ref = req.model, req.candidate_version, cand.backend_ref
        try:
            self.backend.set_default(model, version, ref)
        except Exception as exc:  # any backend failure leaves the request failed with the reason, nothing applied
            reason = exc.message if isinstance(exc, StarchartError) else f"{type(exc).__name__}: {exc}"
            self._apply_result(request_id, actor, error=reason)
        else:
            self._apply_result(request_id, actor)
        self.versions.write_model_file(model)
        return self.get(request_id)

    def _apply_result(self, request_id: int, actor: str, error: str | None = None) -> None:
        with self.db.unit_of_work() as s:
            req = s.get(PromotionRequest, request_id, with_for_update=True)
            late_success = error is None and req.state == FAILED_APPLY  # reconciled as failed, then it worked
            if req.state != APPLYING and not late_success:
                return  # reconciled by someone else meanwhile
            common = {"model": req.model, "version": req.candidate_version, "request_id": req.id,
                      "channel": req.channel, "message_ts": req.message_ts}
            if error is not None:
                req.state, req.error = FAILED_APPLY, error
                audit.append(s, "promotion.failed", actor, **common, details={"error": error})
                return
            base_is = (ModelRecord.default_version.is_(None) if req.base_version is None
                       else ModelRecord.default_version == req.base_version)
            moved = s.execute(update(ModelRecord).where(ModelRecord.name == req.model, base_is)
                              .values(default_version=req.candidate_version, updated_at=names.utcnow())).rowcount
            if not moved:  # cannot happen while one apply per model runs at a time; refuse rather than guess
                req.state, req.error = FAILED_APPLY, "the default moved while this request was being applied"
                audit.append(s, "promotion.failed", actor, **common, details={"error": req.error})
                return
            req.state, req.applied_at = APPLIED, names.utcnow()
            audit.append(s, "promotion.applied", actor, **common,
                         details={"base": req.base_version, "kind": req.kind})

    def reconcile(self, older_than: timedelta = RECONCILE_AFTER) -> list[dict[str, Any]]:
        """Finish applies interrupted by a crash: applied if the backend has the candidate, else failed."""
        now = names.utcnow()
        with self.db.unit_of_work() as s:
            stuck = s.execute(select(PromotionRequest.id, PromotionRequest.model, PromotionRequest.candidate_version,
                                     PromotionRequest.apply_started_at)
                              .where(PromotionRequest.state == APPLYING,
                                     PromotionRequest.apply_started_at <= now - older_than)).all()
        results = []
        apply_timeout = getattr(self.backend, "apply_timeout", lambda _model: 0.0)
        for request_id, model, version, started in stuck:
            if (now - started).total_seconds() < apply_timeout(model):
                continue  # a slow switch (an endpoint deploy) may still be running in another process
            try:
                current = self.backend.current_default(model)
            except StarchartError:
                continue
            if current == version:
                self._apply_result(request_id, "system")
            else:
                self._apply_result(request_id, "system",
                                   error="interrupted before the backend switched the default; retry to apply")
            with self.db.unit_of_work() as s:
                audit.append(s, "promotion.reconciled", "system", model=model, version=version,
                             request_id=request_id, details={"backend_default": current})
            results.append(self.get(request_id))
            self.versions.write_model_file(model)
        return results

    def expire(self) -> int:
        now = names.utcnow()
        with self.db.unit_of_work() as s:
            old = s.execute(select(PromotionRequest).where(PromotionRequest.state == OPEN,
                                                           PromotionRequest.expires_at < now)).scalars().all()
            for req in old:
                req.state, req.decided_at = EXPIRED, now
                audit.append(s, "promotion.expired", "system", model=req.model, version=req.candidate_version,
                             request_id=req.id)
            return len(old)
