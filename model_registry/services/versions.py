"""Expose: succeeded jobs become versions (signature, metrics, program); versions, diffs, model files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from model_registry.adapters import listings, outbox
from model_registry.adapters.audit_log import AuditLog
from model_registry.adapters.backends.base import Backend
from model_registry.adapters.db import Database, rows_changed
from model_registry.adapters.listings import VersionList
from model_registry.adapters.model_files import write_model_file
from model_registry.adapters.records import (
    SUCCEEDED,
    Job,
    ModelRecord,
    Version,
)
from model_registry.adapters.signatures import read_signature
from model_registry.config import ProjectConfig
from model_registry.domain import names
from model_registry.domain.diffs import diff_versions, version_digest
from model_registry.domain.errors import ArtifactError, InvalidInput, NotFound, StarchartError
from model_registry.domain.names import iso
from model_registry.domain.policy import check_operator
from model_registry.services.catalog import Catalog
from model_registry.services.jobs import Jobs
from model_registry.services.views import Exposed, ExposeError, VersionView, version_view


class Versions:
    """Versions of every model: made from succeeded jobs, listed, compared, written to the model files."""

    def __init__(self, db: Database, audit_log: AuditLog, catalog: Catalog, config: ProjectConfig, backend: Backend,
                 jobs: Jobs) -> None:
        self.db, self.audit_log, self.catalog = db, audit_log, catalog
        self.config, self.backend, self.jobs = config, backend, jobs

    def expose(self, model: str, user: str, message_channel: str | None = None) -> Exposed:
        """Turn every succeeded, unexposed job into a version. Returns {'exposed': [...], 'errors': [...]}.
        With `message_channel` (a nightly retrain's), each new version is announced there with its exposure."""
        names.validate_model_name(model)
        self.catalog.require_model(model)
        check_operator(self.config.policy(model), user, self.catalog.members_of, "expose", model)
        self.jobs.refresh(model)
        with self.db.unit_of_work() as s:
            jobs = s.execute(select(Job).where(Job.model == model, Job.state == SUCCEEDED,
                                               Job.version_name.is_(None)).order_by(Job.ts)).scalars().all()
        exposed: list[VersionView] = []
        errors: list[ExposeError] = []
        for job in jobs:
            try:
                view = self._expose_job(job, user, message_channel)
            except StarchartError as exc:
                errors.append({"job_id": job.job_id, "error": str(exc)})
                continue
            if view:
                exposed.append(view)
        self.write_model_file(model)
        return {"exposed": exposed, "errors": errors}

    def _read_artifacts(self, job: Job) -> tuple[dict[str, Any], dict[str, Any]]:
        store = self.backend.storage
        try:
            signature = read_signature(store.read_bytes(store.join(job.train_path, "model", "saved_model.pb")))
        except ArtifactError as exc:
            raise ArtifactError(f"{job.job_id}: {exc.message}", exc.hint or "train again") from exc
        metrics: dict[str, Any] = {}
        metrics_uri = store.join(job.train_path, "metrics.json")
        if store.exists(metrics_uri):
            try:
                raw = json.loads(store.read_bytes(metrics_uri))
            except ValueError as exc:
                raise ArtifactError(f"{job.job_id}: metrics.json is not JSON ({exc})",
                                    'the trainer must write {"name": number}') from exc
            if not isinstance(raw, dict):
                raise ArtifactError(f"{job.job_id}: metrics.json is not an object", 'write {"name": number}')
            # a diverged run writes NaN or Infinity, which PostgreSQL's json type refuses: kept as the strings
            # "NaN", "Infinity", "-Infinity" (as proto3's JSON mapping spells them), so the review shows them
            metrics = {str(k): v if math.isfinite(v) else _NON_FINITE[str(v)] for k, v in raw.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return signature, metrics

    def _expose_job(self, job: Job, user: str, message_channel: str | None = None) -> VersionView | None:
        signature, metrics = self._read_artifacts(job)
        version = Version(
            model=job.model, name=names.version_name(job.ts), job_id=job.job_id,
            deployment_uri=self.backend.storage.join(job.train_path, "model") + "/", created_at=names.utcnow(),
            trained_by=job.requested_by, exposed_by=user,
            program={"module": job.module, "package_uris": list(job.package_uris or []), "sha256": job.package_sha256},
            args=list(job.args or []), metrics=metrics, signature=signature,
            job={"state": job.state, "region": job.region, "scale_tier": job.scale_tier,
                 "created_at": iso(job.created_at), "started_at": iso(job.started_at),
                 "ended_at": iso(job.ended_at)},
            digest="",
        )
        view = version_view(version)
        version.digest = version_digest(view)
        view["digest"] = version.digest
        with self.db.unit_of_work() as s:
            first = s.execute(select(func.count()).select_from(Version).where(Version.model == job.model)).scalar() == 0
        ref = self.backend.register_version(job.model, view, first)
        initialized = False
        try:
            with self.db.unit_of_work() as s:
                if not rows_changed(s.execute(update(Job).where(Job.job_id == job.job_id, Job.version_name.is_(None))
                                              .values(version_name=version.name))):
                    return None  # another process exposed it first
                version.backend_ref = ref
                s.add(version)
                self.audit_log.append(s, "version.exposed", user, model=job.model, version=version.name, job_id=job.job_id,
                             details={"digest": version.digest, "metrics": metrics})
                outbox.record_nightly(s, outbox.EXPOSED, f"{job.model}/{version.name}", message_channel,
                                      {"model": job.model, "version": version.name})
                record = s.get(ModelRecord, job.model, with_for_update=True)
                if record is None:
                    record = ModelRecord(name=job.model, default_version=None, updated_at=names.utcnow())
                    s.add(record)
                if record.default_version is None:  # StarChart: a new model's first version is its default
                    record.default_version, record.updated_at = version.name, names.utcnow()
                    self.audit_log.append(s, "default.initialized", user, model=job.model, version=version.name,
                                 details={"why": "first version of a new model"})
                    initialized = True
        except IntegrityError:
            return None
        if initialized:
            self.backend.set_default(job.model, version.name, ref)
        record_uri = self.backend.storage.join(job.train_path, "starchart.json")
        self.backend.storage.write_bytes(record_uri, json.dumps(view, indent=2, sort_keys=True).encode())
        return view

    def of_model(self, model: str) -> VersionList:
        self.catalog.require_model(model)
        return listings.versions_of(self.db.engine, model)

    def default(self, model: str) -> str | None:
        with self.db.reads() as s:
            record = s.get(ModelRecord, model)
            return record.default_version if record else None

    def diff(self, model: str, version: str | None = None, base: str | None = None) -> dict[str, Any]:
        with self.db.reads() as s:
            self.catalog.require_model(model, s)
            record = s.get(ModelRecord, model)
            if version is None:
                newest = s.execute(select(Version.name).where(Version.model == model)
                                   .order_by(Version.name.desc()).limit(1)).scalar()
                if newest is None:
                    raise NotFound(f"{model} has no versions", f"train it, then run `expose {model}`")
                version = newest
            cand = version_view(self.catalog.version(s, model, version))
            base_name = base or (record.default_version if record else None)
            if base_name == version:
                raise InvalidInput(f"{version} is the default of {model}: there is nothing to compare it with",
                                   f"name two versions: `diff {model} VERSION BASE` (see `versions {model}`)")
            base_view = version_view(self.catalog.version(s, model, base_name)) if base_name else None
        return diff_versions(cand, base_view)

    def write_model_file(self, model: str) -> Path:
        with self.db.unit_of_work() as s:
            versions = [version_view(v) for v in s.execute(
                select(Version).where(Version.model == model).order_by(Version.name)).scalars()]
            record = s.get(ModelRecord, model)
        return write_model_file(self.config.model_files, model, versions, record.default_version if record else None)


_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
