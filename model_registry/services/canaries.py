"""Canaries: a promotion request's candidate taking a share of the default's traffic before it becomes the default.

A canary starts as the apply of its approved request (services/promotions.py); from then on this group watches it
(`check`, every worker pass: the backend's figures stored, judged by domain/canary.py, rolled back or promoted),
and people promote it to 100% or roll it back (`promote`, `rollback`: the Slack card's buttons, `canary MODEL
promote|rollback`). Promoting is the request's apply from `canary` (the backend's set_default ends the split); a
rollback removes the split on the backend while the request's row is locked, and commits `rolled_back` with its
event in the same transaction.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from model_registry.adapters.audit_log import AuditLog
from model_registry.adapters.backends.base import Backend
from model_registry.adapters.db import Database
from model_registry.adapters.records import PromotionRequest
from model_registry.config import ProjectConfig
from model_registry.domain import canary as canary_rules
from model_registry.domain import names
from model_registry.domain import promotion as rules
from model_registry.domain.errors import InvalidInput, NotFound, Refused, StarchartError
from model_registry.domain.names import iso
from model_registry.services.catalog import Catalog
from model_registry.services.promotions import Promotions
from model_registry.services.views import CanaryView

log = logging.getLogger("starchart.canaries")
ACTIVE = (rules.APPLYING, rules.CANARY)


class Canaries:
    """The canaries of every model: their status, promotion, rollback, and the worker's look at them."""

    def __init__(self, db: Database, audit_log: AuditLog, catalog: Catalog, config: ProjectConfig, backend: Backend,
                 promotions: Promotions) -> None:
        self.db, self.audit_log, self.catalog, self.config, self.backend = db, audit_log, catalog, config, backend
        self.promotions = promotions

    # ---------------------------------------------------------------- reading

    def status(self, model: str) -> CanaryView:
        """The model's running canary, with the backend's figures read now (a person asks, as for promote and
        rollback: without a worker running, none would have been read), else its last one."""
        names.validate_model_name(model)
        with self.db.reads() as s:
            self.catalog.require_model(model, s)
            running = self.promotions.running_canary(s, model)
            running_id = running.id if running is not None else None
        if running_id is not None:
            self._refresh_figures_for_a_person(running_id)
        with self.db.reads() as s:
            row = self.promotions.running_canary(s, model) or s.execute(
                select(PromotionRequest).where(PromotionRequest.model == model,
                                               PromotionRequest.canary_started_at.is_not(None))
                .order_by(PromotionRequest.id.desc()).limit(1)).scalar_one_or_none()
            if row is None:
                raise NotFound(f"{model} has had no canary", f"start one: `promote {model} VERSION --canary 10 "
                                                             f"--bake 30m`")
            return self._view(s, row)

    def get(self, request_id: int) -> CanaryView:
        with self.db.reads() as s:
            row = s.get(PromotionRequest, request_id)
            if row is None or row.canary_percent is None:
                raise NotFound(f"promotion request #{request_id} has no canary", "see `requests MODEL`")
            return self._view(s, row)

    def _view(self, s: Session, row: PromotionRequest) -> CanaryView:
        req = self.promotions.rules_of(s, row)
        policy = self.config.policy(row.model).canary
        figures = canary_rules.Figures.from_dict(row.canary_figures)
        running = row.state == rules.CANARY
        unavailable = (row.canary_figures or {}).get("unavailable") if running else None
        verdict = None
        if running and req.bake_until is not None:
            judged = (canary_rules.unread(unavailable, req.bake_until, names.utcnow()) if unavailable
                      else canary_rules.judge(figures, policy, req.bake_until, names.utcnow()))
            verdict = {"action": judged.action, "why": judged.why}
        percent = row.canary_percent or 0
        if row.state == rules.APPLIED:
            split = {row.candidate_version: 100}
        elif running or (row.state == rules.APPLYING and row.canary_started_at is not None):
            split = canary_rules.split(row.base_version, row.candidate_version, percent)
        else:
            split = {row.base_version: 100} if row.base_version else {}
        return {
            "request_id": row.id, "model": row.model, "candidate": row.candidate_version, "base": row.base_version,
            "state": row.state, "running": running, "percent": percent, "bake_seconds": row.canary_bake_seconds or 0,
            "started_at": iso(row.canary_started_at), "bake_until": iso(req.bake_until),
            "ended_at": iso(row.canary_ended_at), "ended_by": row.canary_ended_by, "why": row.canary_why,
            "split": split, "figures": figures.as_dict() if figures else None, "verdict": verdict,
            "figures_unavailable": unavailable,
            "limits": {"max_error_rate": policy.max_error_rate, "max_p99_ratio": policy.max_p99_ratio,
                       "min_requests": policy.min_requests, "auto_promote": policy.auto_promote,
                       "mirror": policy.mirror},
            "backend": self.backend.name, "channel": row.channel, "card_digest": row.card_digest, "error": row.error,
        }

    def _request_of(self, s: Session, model: str, request_id: int | None) -> PromotionRequest:
        if request_id is not None:
            row = s.get(PromotionRequest, request_id)
            if row is None or row.canary_percent is None or row.model != model:
                raise NotFound(f"promotion request #{request_id} is no canary of {model}",
                               f"see `canary {model} status`")
            return row
        row = self.promotions.running_canary(s, model)
        if row is None:
            raise InvalidInput(f"no canary of {model} runs", f"start one: `promote {model} VERSION --canary 10`")
        return row

    # ---------------------------------------------------------------- people

    def promote(self, model: str, user: str, *, request_id: int | None = None, channel: str | None = None,
                message_ts: str | None = None) -> CanaryView:
        """Promote the running canary to 100% (an approver, under the approvals' policy); a refusal is recorded."""
        names.validate_model_name(model)
        row_id = self._allowed(model, user, True, request_id, channel, message_ts)
        self._refresh_figures_for_a_person(row_id)
        self.promotions.apply_request(row_id, actor=user, why=f"promoted to 100% by {user}")
        return self.get(row_id)

    def rollback(self, model: str, user: str, *, request_id: int | None = None, reason: str | None = None,
                 channel: str | None = None, message_ts: str | None = None) -> CanaryView:
        """Roll the running canary back (an approver); the default keeps all its traffic."""
        names.validate_model_name(model)
        row_id = self._allowed(model, user, False, request_id, channel, message_ts)
        self._refresh_figures_for_a_person(row_id)
        why = f"rolled back by {user}" + (f": {reason.strip()}" if reason and reason.strip() else "")
        self._roll_back(row_id, user, why, {"channel": channel, "message_ts": message_ts})
        return self.get(row_id)

    def _allowed(self, model: str, user: str, promote: bool, request_id: int | None, channel: str | None,
                 message_ts: str | None) -> int:
        """The request of the canary `user` may act on; else the refusal, recorded as canary.refused, raised."""
        with self.db.unit_of_work() as s:
            self.catalog.require_model(model, s)
            row = self._request_of(s, model, request_id)
            req = self.promotions.rules_of(s, row)
            trained_by = self.catalog.version(s, model, row.candidate_version).trained_by
            refusal = req.canary_refusal(user, promote, self.config.policy(model), self.catalog.members_of,
                                         trained_by)
            if refusal is None:
                return row.id
            self.audit_log.append(s, "canary.refused", user.strip() or "unknown", model=model,
                                  version=row.candidate_version, request_id=row.id, channel=channel,
                                  message_ts=message_ts, details={
                                      "reason": refusal.reason, "message": refusal.message,
                                      "action": "promote" if promote else "rollback"})
        raise refusal

    def _roll_back(self, request_id: int, actor: str, why: str, person: dict[str, Any] | None = None) -> bool:
        """Remove the split on the backend with the row locked, then commit rolled_back and its event."""
        with self.db.unit_of_work() as s:
            row = s.get_one(PromotionRequest, request_id, with_for_update=True)
            if row.state != rules.CANARY:
                if person is not None:
                    raise Refused(f"promotion request #{request_id} is {row.state}, not a running canary",
                                  "nothing to roll back", reason="closed")
                return False  # promoted or rolled back meanwhile by someone else
            req = self.promotions.rules_of(s, row)
            self.backend.end_canary(row.model)
            outcome = req.roll_back(actor, names.utcnow(), why)
            self.promotions.store(s, row, req, outcome, person)
            return True

    # ---------------------------------------------------------------- the worker

    def _refresh_figures_for_a_person(self, request_id: int) -> None:
        """A person promotes or rolls back with the freshest figures there are; figures that cannot be read do not
        stop them (the card says why they are missing)."""
        try:
            self._refresh_figures(request_id)
        except StarchartError as exc:
            log.warning("promotion request #%s: the canary's figures could not be read: %s", request_id, exc.message)

    def _refresh_figures(self, request_id: int) -> canary_rules.Figures | None:
        """Read the backend's figures of the request's canary and keep them on the request (its card shows them).

        A backend that cannot give them raises; the reason is kept on the request first (beside the last figures
        read), so its card and status say why nothing is decided, until a later read succeeds."""
        with self.db.reads() as s:
            row = s.get_one(PromotionRequest, request_id)
            model, state = row.model, row.state
        if state != rules.CANARY:
            return None
        try:
            raw = self.backend.canary_figures(model)
        except StarchartError as exc:
            self._note_unavailable(request_id, f"{exc.message}; {exc.hint}" if exc.hint else exc.message)
            raise
        if raw is None:
            return None
        figures = canary_rules.Figures(canary_rules.Side.from_dict(raw.get("candidate")),
                                       canary_rules.Side.from_dict(raw.get("base")), int(raw.get("mirrored") or 0),
                                       int(raw.get("agreed") or 0), iso(names.utcnow()))
        with self.db.unit_of_work() as s:
            row = s.get_one(PromotionRequest, request_id, with_for_update=True)
            if row.state != rules.CANARY:
                return figures
            kept = dict(row.canary_figures or {})
            after = {**figures.as_dict(), "verdict": kept.get("verdict")}
            if _shown(kept) != _shown(after):  # the card shows the change
                self._keep(s, row, after)
        return figures

    def _note_unavailable(self, request_id: int, reason: str) -> None:
        with self.db.unit_of_work() as s:
            row = s.get_one(PromotionRequest, request_id, with_for_update=True)
            kept = dict(row.canary_figures or {})
            if row.state == rules.CANARY and kept.get("unavailable") != reason:
                self._keep(s, row, {**kept, "unavailable": reason})

    def _note_verdict(self, request_id: int, action: str) -> None:
        """Keep what the rules made of the canary, so that its card changes when that does (the bake ended)."""
        with self.db.unit_of_work() as s:
            row = s.get_one(PromotionRequest, request_id, with_for_update=True)
            kept = dict(row.canary_figures or {})
            if row.state == rules.CANARY and kept.get("verdict") != action:
                self._keep(s, row, {**kept, "verdict": action})

    def _keep(self, s: Session, row: PromotionRequest, figures: dict[str, Any]) -> None:
        req = self.promotions.rules_of(s, row)
        req.canary_figures = figures
        self.promotions.store(s, row, req, rules.Outcome())

    def check(self) -> list[CanaryView]:
        """Every running canary, once: figures read and kept, then rolled back, promoted or left to bake/wait."""
        with self.db.reads() as s:
            running = s.execute(select(PromotionRequest.id, PromotionRequest.model, PromotionRequest.candidate_version,
                                       PromotionRequest.canary_started_at, PromotionRequest.canary_bake_seconds)
                                .where(PromotionRequest.state == rules.CANARY)
                                .order_by(PromotionRequest.id)).all()
        acted = []
        for request_id, model, candidate, started_at, bake_seconds in running:
            if started_at is None:  # not reached: a request in `canary` has started one
                continue
            try:
                if self._check_one(request_id, model, candidate, started_at + timedelta(seconds=bake_seconds or 0)):
                    acted.append(self.get(request_id))
            except StarchartError as exc:  # the next pass looks again
                log.warning("the canary of %s (promotion request #%s) was not checked: %s", model, request_id,
                            exc.message)
        return acted

    def _check_one(self, request_id: int, model: str, candidate: str, bake_until: Any) -> bool:
        if not self.backend.canary_split(model).get(candidate):
            why = (f"the backend no longer sends {candidate} any of the traffic (the split was removed outside "
                   f"StarChart, or a rollback stopped before it was recorded)")
            return self._roll_back(request_id, "system", why)
        figures = self._refresh_figures(request_id)
        verdict = canary_rules.judge(figures, self.config.policy(model).canary, bake_until, names.utcnow())
        if verdict.action == canary_rules.ROLLBACK:
            log.warning("rolling back the canary of %s (promotion request #%s): %s", model, request_id, verdict.why)
            return self._roll_back(request_id, "system", f"rolled back automatically: {verdict.why}")
        if verdict.action == canary_rules.PROMOTE:
            log.info("promoting the canary of %s (promotion request #%s): %s", model, request_id, verdict.why)
            self.promotions.apply_request(request_id, actor="system", why=f"promoted automatically: {verdict.why}")
            return True
        self._note_verdict(request_id, verdict.action)
        return False


def _shown(figures: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in figures.items() if k != "at"}
