"""Schedules: retrain a model on a cron, recorded like every other change (`schedule.changed`)."""

from __future__ import annotations

from datetime import datetime, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import select, update

from model_registry.adapters import outbox
from model_registry.adapters.audit_log import AuditLog
from model_registry.adapters.db import Database, rows_changed
from model_registry.adapters.packaging import trainer_dir
from model_registry.adapters.records import SUCCEEDED, Job, Schedule
from model_registry.config import Gate, ProjectConfig
from model_registry.domain import names
from model_registry.domain.errors import InvalidInput, StarchartError
from model_registry.domain.names import iso
from model_registry.domain.policy import check_operator
from model_registry.services.catalog import Catalog
from model_registry.services.jobs import Jobs
from model_registry.services.promotions import Promotions
from model_registry.services.versions import Versions
from model_registry.services.views import GateRefusal, JobView, RequestView, ScheduleView, VersionView

CONFIGURED = "starchart.yaml"  # the actor of schedules written by the operators in the configuration


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidInput(f"unknown time zone {name!r}", "use an IANA name such as UTC or Asia/Tokyo") from None


def next_run(cron: str, tz: str, after: datetime) -> datetime:
    """The first firing of `cron` (in `tz`) strictly after `after` (naive UTC in, naive UTC out)."""
    from croniter import croniter  # here: a web process that never schedules does not load it (nor dateutil)

    local = after.replace(tzinfo=timezone.utc).astimezone(_zone(tz))
    fire = croniter(cron, local).get_next(datetime)
    return fire.astimezone(timezone.utc).replace(tzinfo=None)


def schedule_view(row: Schedule) -> ScheduleView:
    return {"model": row.model, "cron": row.cron, "timezone": row.timezone, "args": list(row.args or []),
            "enabled": row.enabled, "last_run_at": iso(row.last_run_at), "updated_by": row.updated_by,
            "next_run_at": iso(next_run(row.cron, row.timezone, row.last_run_at or row.updated_at))
            if row.enabled else None}


class Schedules:
    """Retraining on a cron, and the nightly follow-up: expose, gate, open the review."""

    def __init__(self, db: Database, audit_log: AuditLog, catalog: Catalog, config: ProjectConfig, jobs: Jobs,
                 versions: Versions, promotions: Promotions) -> None:
        self.db, self.audit_log, self.catalog, self.config = db, audit_log, catalog, config
        self.jobs, self.versions, self.promotions = jobs, versions, promotions
    def set(self, model: str, cron: str, user: str, args: list[str] | None = None,
                     tz: str = "UTC") -> ScheduleView:
        """Schedule retraining; args from chat are checked like `train`'s (starchart.yaml's skip `args_allowed`)."""
        names.validate_model_name(model)
        trainer_dir(self.config.trainer_base, model)
        check_operator(self.config.policy(model), user, self.catalog.members_of, "schedule", model)
        self.jobs.check_args(model, args or [], from_person=user != CONFIGURED)
        from croniter import croniter

        if not croniter.is_valid(cron):
            raise InvalidInput(f"invalid cron expression {cron!r}",
                               'use five fields: minute hour day month weekday, e.g. "0 3 * * *"')
        _zone(tz)
        now = names.utcnow()
        with self.db.unit_of_work() as s:
            row = s.get(Schedule, model, with_for_update=True)
            if row is None:
                row = Schedule(model=model, cron=cron, timezone=tz, args=list(args or []), enabled=True,
                               updated_by=user, updated_at=now)
                s.add(row)
            else:
                row.cron, row.timezone, row.args, row.enabled = cron, tz, list(args or []), True
                row.updated_by, row.updated_at = user, now
            s.flush()
            self.audit_log.append(s, "schedule.changed", user, model=model,
                         details={"cron": cron, "timezone": tz, "args": list(args or []), "enabled": True})
            return schedule_view(row)

    def disable(self, model: str, user: str) -> ScheduleView:
        names.validate_model_name(model)
        check_operator(self.config.policy(model), user, self.catalog.members_of, "schedule", model)
        with self.db.unit_of_work() as s:
            row = s.get(Schedule, model, with_for_update=True)
            if row is None or not row.enabled:
                raise InvalidInput(f"{model} has no schedule to turn off", "see `schedule list`")
            row.enabled, row.updated_by, row.updated_at = False, user, names.utcnow()
            self.audit_log.append(s, "schedule.changed", user, model=model, details={"cron": row.cron, "enabled": False})
            return schedule_view(row)

    def sync_configured(self) -> None:
        """starchart.yaml's `schedule:` entries become schedules (once: a change from chat wins afterwards)."""
        for model in self.config.models:
            spec = self.config.policy(model).schedule
            if not spec or not spec.get("cron"):
                continue
            with self.db.unit_of_work() as s:
                if s.get(Schedule, model) is not None:
                    continue
            self.set(model, str(spec["cron"]), CONFIGURED, [str(a) for a in spec.get("args") or []],
                              str(spec.get("timezone") or "UTC"))

    def all(self) -> list[ScheduleView]:
        with self.db.reads() as s:
            return [schedule_view(row) for row in s.execute(select(Schedule).order_by(Schedule.model)).scalars()]

    def run_due(self, now: datetime | None = None) -> list[JobView]:
        """Start the trainings whose time has come. Several clocks may run: only one wins each firing."""
        now = now or names.utcnow()
        started = []
        with self.db.reads() as s:
            rows = [(r.model, r.cron, r.timezone, list(r.args or []), r.last_run_at, r.updated_at, r.updated_by)
                    for r in s.execute(select(Schedule).where(Schedule.enabled.is_(True))).scalars()]
        for model, cron, tz, args, last, updated, updated_by in rows:
            if next_run(cron, tz, last or updated) > now:
                continue
            with self.db.unit_of_work() as s:
                same = Schedule.last_run_at.is_(None) if last is None else Schedule.last_run_at == last
                if not rows_changed(s.execute(update(Schedule).where(Schedule.model == model, same)
                                              .values(last_run_at=now))):
                    continue  # another clock took this firing
            try:
                started.append(self.jobs.train(model, f"schedule:{model}", args=args or None,
                                               configured_args=updated_by == CONFIGURED))
            except StarchartError as exc:  # recorded and told to the model's channel; the next firing tries again
                with self.db.unit_of_work() as s:
                    self.audit_log.append(s, "schedule.changed", "system", model=model,
                                 details={"cron": cron, "failed_to_start": exc.message})
                    outbox.record_nightly(s, outbox.NOT_STARTED, f"{model}@{iso(now)}", self.config.policy(model).channel,
                                          {"model": model, "cron": cron, "timezone": tz, "at": iso(now),
                                           "error": exc.message, "hint": exc.hint or ""})
        return started

    def follow_scheduled(self) -> list[RequestView]:
        """Nightly retrains, continued: expose succeeded scheduled jobs (`auto_expose`) and open a review
        for them (`auto_review`) unless the `gate` metric fell. Returns the promotion requests opened."""
        self.jobs.refresh()
        with self.db.reads() as s:
            jobs = s.execute(select(Job.model, Job.job_id).where(
                Job.state == SUCCEEDED, Job.version_name.is_(None),
                Job.requested_by == "schedule:" + Job.model)).all()
        opened = []
        for model in sorted({m for m, _ in jobs}):
            policy = self.config.policy(model)
            if not policy.auto_expose:
                continue
            actor = f"schedule:{model}"
            result = self.versions.expose(model, actor, message_channel=policy.channel)
            if not policy.auto_review:
                continue
            for version in result["exposed"]:
                if version["trained_by"] != actor or self.versions.default(model) == version["name"]:
                    continue
                on_evaluation = policy.gate is not None and policy.gate.on == "evaluation"
                refused = (self._evaluation_gate_refusal(model, policy.gate) if on_evaluation and policy.gate
                           else self._gate_refusal(model, version, policy.gate))
                if refused:
                    with self.db.unit_of_work() as s:
                        self.audit_log.append(s, "review.skipped", actor, model=model, version=version["name"],
                                     details={"why": refused["why"], "gate": refused})
                        outbox.record_nightly(s, outbox.REVIEW_SKIPPED, f"{model}/{version['name']}", policy.channel,
                                              {"model": model, "version": version["name"], "gate": refused})
                    continue
                opened.append(self.promotions.promote(model, version["name"], actor, reason="scheduled retrain",
                                                      card=True, gate=policy.gate if on_evaluation else None))
        return opened

    def _evaluation_gate_refusal(self, model: str, gate: Gate) -> GateRefusal | None:
        """A gate on the evaluation needs one: without `evaluation:` it refuses at once (nothing to compare)."""
        if self.config.policy(model).evaluation is not None:
            return None  # it decides when the request's evaluation ends (services.evaluations.decide_gate)
        return {"metric": gate.metric, "min_delta": gate.min_delta, "base_version": self.versions.default(model),
                "candidate": None, "base": None, "delta": None, "direction": None,
                "why": f"the gate is on the evaluation, and {model} has no `evaluation:` in starchart.yaml"}

    def _gate_refusal(self, model: str, version: VersionView, gate: Gate | None) -> GateRefusal | None:
        """Why a scheduled candidate gets no review (its gate metric is missing, not finite, or fell too far),
        with the values the gate compared; None when it may be reviewed."""
        if gate is None:
            return None
        diff = self.versions.diff(model, version["name"])
        metric = next((m for m in diff["metrics"] if m["name"] == gate.metric), None)
        facts: GateRefusal = {
            "metric": gate.metric, "min_delta": gate.min_delta, "base_version": self.versions.default(model),
            "candidate": metric["candidate"] if metric else None, "base": metric["base"] if metric else None,
            "delta": metric["delta"] if metric else None, "direction": metric["direction"] if metric else None,
            "why": ""}
        if metric is None or metric["candidate"] is None:
            return {**facts, "why": f"{gate.metric} is missing from the candidate's metrics"}
        if isinstance(metric["candidate"], str):  # NaN or Infinity: the run diverged
            return {**facts, "why": f"{gate.metric} is {metric['candidate']} (the training diverged)"}
        if metric["delta"] is None:
            return None
        change = metric["delta"] if metric["direction"] == "higher" else -metric["delta"]
        if change < gate.min_delta:
            return {**facts, "why": f"{gate.metric} changed by {metric['delta']:+.4f} "
                                    f"(the gate allows {gate.min_delta:+.4f} in the better direction)"}
        return None
