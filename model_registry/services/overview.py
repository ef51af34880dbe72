"""One person's overview (Slack's Home tab): what waits for their decision, each model's default and last training,
and what failed lately. Reads only."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func, select

from model_registry.adapters.db import Database
from model_registry.adapters.records import FAILED, Job, ModelRecord, PromotionRequest
from model_registry.domain import names
from model_registry.domain import promotion as rules
from model_registry.services.catalog import Catalog
from model_registry.services.promotions import Promotions
from model_registry.services.views import FailureView, HomeView, LastTraining, ModelSummary


class Overview:
    """What a person sees on opening the bot's Home: built from the records, with the promotion rules' own checks."""

    def __init__(self, db: Database, catalog: Catalog, promotions: Promotions) -> None:
        self.db, self.catalog, self.promotions = db, catalog, promotions

    def home(self, user: str, days: int = 7, waiting: int = 20, models: int = 40, failures: int = 20) -> HomeView:
        """`user`'s Home: up to `waiting` requests that wait for them (oldest first), up to `models` models, and up to
        `failures` failed trainings and applies of the last `days` days (newest first)."""
        since = names.utcnow() - timedelta(days=days)
        waits = self.promotions.waiting_for(user)
        return {"user": user, "waiting": waits[:waiting], "waiting_more": max(0, len(waits) - waiting),
                "models": self._models(models), "failures": self._failures(since, failures), "since": names.iso(since)}

    def _models(self, limit: int) -> list[ModelSummary]:
        with self.db.reads() as s:
            defaults = dict(s.execute(select(ModelRecord.name, ModelRecord.default_version)).all())
            trained = set(s.execute(select(Job.model).distinct()).scalars())
            shown = sorted(set(self.catalog.known_models()) | set(defaults) | trained)[:limit]
            newest = dict(s.execute(select(Job.model, func.max(Job.ts)).where(Job.model.in_(shown))
                                    .group_by(Job.model)).all())
            last = {j.model: j for j in s.execute(select(Job).where(
                Job.model.in_(list(newest)), Job.ts.in_(list(newest.values())))).scalars() if newest[j.model] == j.ts}
            out: list[ModelSummary] = []
            for model in shown:
                job = last.get(model)
                training: LastTraining | None = None if job is None else {
                    "job_id": job.job_id, "state": job.state, "created_at": names.iso(job.created_at),
                    "ended_at": names.iso(job.ended_at)}
                out.append({"model": model, "default": defaults.get(model), "last_training": training})
            return out

    def _failures(self, since: datetime, limit: int) -> list[FailureView]:
        with self.db.reads() as s:
            jobs = s.execute(select(Job).where(Job.state == FAILED, Job.created_at >= since)
                             .order_by(Job.created_at.desc()).limit(limit)).scalars().all()
            applies = s.execute(select(PromotionRequest).where(
                PromotionRequest.state == rules.FAILED, PromotionRequest.apply_started_at >= since)
                .order_by(PromotionRequest.apply_started_at.desc()).limit(limit)).scalars().all()
            found: list[FailureView] = [
                {"kind": "training", "model": j.model, "subject": j.job_id, "at": names.iso(j.ended_at or j.created_at),
                 "error": j.error} for j in jobs]
            found += [{"kind": "apply", "model": r.model, "subject": f"#{r.id}", "at": names.iso(r.apply_started_at),
                       "error": r.error} for r in applies]
        return sorted(found, key=lambda f: f["at"] or "", reverse=True)[:limit]
