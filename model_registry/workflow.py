"""The use cases: train, state, expose, versions, diff, promote/apply/rollback, decide, apply a request.

Each use case runs in one unit of work (one transaction) and records its audit event in it. The
default version moves only in `apply_request`, after the required approvals are committed.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from sqlalchemy import String, func, select, type_coerce, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from model_registry import audit, names
from model_registry.backends.base import Backend, TrainingSpec
from model_registry.config import ProjectConfig, Settings
from model_registry.db import make_engine, migrate
from model_registry.diffs import card_digest, diff_versions, version_digest
from model_registry.errors import ArtifactError, BackendError, InvalidInput, NotFound, Refused, StarchartError
from model_registry.model_files import marked_default, read_model_file, write_model_file
from model_registry.packaging import build_sdist, check_module, trainer_dir
from model_registry.policy import MembersOf, check_approver, check_operator, is_listed
from model_registry.records import (
    APPLIED,
    APPLYING,
    APPROVED,
    CANCELLED,
    EXPIRED,
    FAILED,
    FAILED_APPLY,
    OPEN,
    QUEUED,
    REJECTED,
    RUNNING,
    STALE,
    SUCCEEDED,
    TERMINAL,
    Approval,
    Job,
    ModelRecord,
    PromotionRequest,
    Version,
)
from model_registry.signatures import read_signature

RECONCILE_AFTER = timedelta(minutes=2)  # an apply older than this with no result was interrupted
LOG_TAIL_LINES = 20


def iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") + "Z" if value else None


def _text(column: Any) -> Any:
    """A timestamp column as the driver returns it, skipping SQLAlchemy's parsing (list queries)."""
    return type_coerce(column, String)


def iso_text(value: Any) -> str | None:
    """A stored timestamp (SQLite text 'YYYY-mm-dd HH:MM:SS.ffffff' or a driver datetime) as ISO UTC."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return iso(value)
    return f"{value[:10]}T{value[11:19]}Z"


def job_view(j: Job) -> dict[str, Any]:
    return {
        "job_id": j.job_id, "model": j.model, "state": j.state, "module": j.module, "args": list(j.args or []),
        "train_path": j.train_path, "requested_by": j.requested_by, "created_at": iso(j.created_at),
        "started_at": iso(j.started_at), "ended_at": iso(j.ended_at), "error": j.error,
        "version": j.version_name, "package_uris": list(j.package_uris or []), "package_sha256": j.package_sha256,
        "region": j.region, "scale_tier": j.scale_tier, "workers": j.workers,
    }


def version_view(v: Version) -> dict[str, Any]:
    return {
        "model": v.model, "name": v.name, "job_id": v.job_id, "deployment_uri": v.deployment_uri,
        "created_at": iso(v.created_at), "trained_by": v.trained_by, "program": v.program,
        "args": list(v.args or []), "metrics": v.metrics or {}, "signature": v.signature or {}, "job": v.job or {},
        "digest": v.digest,
    }


def request_view(r: PromotionRequest, approvals: Iterable[Approval] = ()) -> dict[str, Any]:
    decisions = [
        {"user": a.approver, "decision": a.decision, "reason": a.reason, "at": iso(a.created_at)} for a in approvals
    ]
    return {
        "id": r.id, "model": r.model, "kind": r.kind, "candidate": r.candidate_version, "base": r.base_version,
        "state": r.state, "requested_by": r.requested_by, "reason": r.reason, "required_approvals":
        r.required_approvals, "approvals": sum(1 for d in decisions if d["decision"] == "approve"),
        "decisions": decisions, "created_at": iso(r.created_at), "expires_at": iso(r.expires_at),
        "applied_at": iso(r.applied_at), "error": r.error, "card_digest": r.card_digest, "diff": r.diff,
        "channel": r.channel, "message_ts": r.message_ts,
    }


def substitute_train_path(args: Iterable[str], train_path: str) -> tuple[str, ...]:
    return tuple(a.replace("TRAIN_PATH", train_path) for a in args)


class Registry:
    """The service layer: one instance per process, shared by CLI, console, Slack handlers and worker."""

    def __init__(
        self,
        settings: Settings,
        config: ProjectConfig,
        backend: Backend | None = None,
        members_of: MembersOf | None = None,
    ) -> None:
        self.settings = settings
        self.config = config
        self.engine = make_engine(settings.database_url)
        migrate(self.engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.backend = backend or self._make_backend()
        self._members_of = members_of

    @classmethod
    def from_env(cls, **kwargs: Any) -> "Registry":
        settings = Settings.from_env()
        return cls(settings, ProjectConfig.load(settings.config_path), **kwargs)

    def _make_backend(self) -> Backend:
        if self.settings.backend == "vertex":
            from model_registry.backends.vertex import VertexBackend  # google.cloud only when chosen

            return VertexBackend.from_settings(self.settings)
        from model_registry.backends.local import LocalBackend

        return LocalBackend(self.settings.home)

    def members_of(self, group: str) -> list[str]:
        if self._members_of is not None:
            return list(self._members_of(group))
        return list(self.config.usergroups.get(group, ()))

    @contextmanager
    def unit_of_work(self) -> Iterator[Session]:
        with self.sessions.begin() as session:
            yield session

    # ---------------------------------------------------------------- models and names

    def known_models(self) -> list[str]:
        base = self.config.trainer_base
        on_disk = {p.name for p in base.iterdir() if p.is_dir()} if base.is_dir() else set()
        return sorted(on_disk | set(self.config.models))

    def _require_model(self, model: str, session: Session | None = None) -> None:
        names.validate_model_name(model)
        if model in self.known_models():
            return
        if session is not None and session.get(ModelRecord, model) is not None:
            return
        hint = names.suggest(model, self.known_models()) or f"known models: {', '.join(self.known_models()) or 'none'}"
        raise NotFound(f"unknown model {model!r}", hint)

    # ---------------------------------------------------------------- training

    def train(
        self,
        model: str,
        user: str,
        *,
        module: str | None = None,
        args: Iterable[str] | None = None,
        scale_tier: str | None = None,
        region: str | None = None,
        machine_type: str | None = None,
        workers: int = 1,
        accelerator: str | None = None,
    ) -> dict[str, Any]:
        names.validate_model_name(model)
        source = trainer_dir(self.config.trainer_base, model)
        policy = self.config.policy(model)
        check_operator(policy, user, self.members_of, "train", model)
        module = module or policy.module
        check_module(source, module)
        if workers < 1 or workers > 64:
            raise InvalidInput(f"invalid worker count {workers}", "use --workers between 1 and 64")
        raw_args = tuple(args) if args is not None else policy.args
        package = build_sdist(source, self.settings.home / "cache" / "sdist", model)

        ts = names.timestamp()
        for _ in range(60):  # two trainings in the same second get consecutive timestamps
            try:
                with self.unit_of_work() as s:
                    job = self._new_job(s, model, ts, module, raw_args, user, package.sha256,
                                        scale_tier or policy.scale_tier, region or policy.region,
                                        machine_type or policy.machine_type, workers)
                break
            except IntegrityError:
                ts = names.next_timestamp(ts)
        else:
            raise BackendError(f"could not allocate a job id for {model}", "try again in a minute")

        try:
            package_uri = self.backend.stage_package(package, job.train_path)
            spec = TrainingSpec(
                job_id=job.job_id, model=model, ts=ts, module=module, args=tuple(job.args),
                package_uri=package_uri, train_path=job.train_path, region=job.region, scale_tier=job.scale_tier,
                machine_type=job.machine_type, workers=workers, accelerator=accelerator,
                executor_image=policy.executor_image, labels={"model": model, "ts": ts},
            )
            ref = self.backend.submit(spec)
        except StarchartError as exc:
            self._finish_job(job.job_id, FAILED, error=f"could not start: {exc}", actor=user)
            raise
        except Exception as exc:
            self._finish_job(job.job_id, FAILED, error=f"could not start: {exc!r}", actor=user)
            raise BackendError(f"the {self.backend.name} backend could not start {job.job_id}: {exc}",
                               "see the job's error with `state`; fix the backend and train again") from exc
        with self.unit_of_work() as s:
            s.execute(update(Job).where(Job.job_id == job.job_id).values(package_uris=[package_uri], backend_ref=ref))
            job = s.get(Job, job.job_id)
            return job_view(job)

    def _new_job(self, s: Session, model: str, ts: str, module: str, raw_args: tuple[str, ...], user: str,
                 sha256: str, scale_tier: str | None, region: str | None, machine_type: str | None,
                 workers: int) -> Job:
        train_path = names.train_path(self.settings.bucket, model, ts)
        job = Job(
            job_id=names.job_id(model, ts), model=model, ts=ts, state=QUEUED, module=module,
            args=list(substitute_train_path(raw_args, train_path)), region=region, scale_tier=scale_tier,
            machine_type=machine_type, workers=workers, package_uris=[], package_sha256=sha256,
            train_path=train_path, backend=self.backend.name, requested_by=user, created_at=names.utcnow(),
        )
        s.add(job)
        s.flush()
        if s.get(ModelRecord, model) is None:
            s.add(ModelRecord(name=model, default_version=None, updated_at=names.utcnow()))
        audit.append(s, "training.requested", user, model=model, job_id=job.job_id,
                     details={"module": module, "args": job.args, "package_sha256": sha256, "workers": workers})
        return job

    def _finish_job(self, job_id: str, state: str, *, error: str | None = None, actor: str = "system",
                    expected: Iterable[str] = (QUEUED, RUNNING), started: datetime | None = None,
                    ended: datetime | None = None) -> bool:
        with self.unit_of_work() as s:
            values: dict[str, Any] = {"state": state, "error": error, "ended_at": ended or names.utcnow()}
            if started:
                values["started_at"] = started
            done = s.execute(
                update(Job).where(Job.job_id == job_id, Job.state.in_(list(expected))).values(**values)
            ).rowcount
            if done:
                job = s.get(Job, job_id)
                audit.append(s, f"training.{state.lower()}", actor, model=job.model, job_id=job_id,
                             details={"error": (error or "")[-500:]} if error else {})
            return bool(done)

    def refresh_jobs(self, model: str | None = None) -> int:
        """Ask the backend about every unfinished job; record what changed. Returns how many changed."""
        with self.unit_of_work() as s:
            q = select(Job.job_id, Job.state, Job.backend_ref, Job.train_path, Job.model).where(
                Job.state.in_([QUEUED, RUNNING]))
            if model:
                q = q.where(Job.model == model)
            pending = s.execute(q).all()
        changed = 0
        for job_id, state, ref, train_path, job_model in pending:
            try:
                st = self.backend.status(job_id, ref)
            except StarchartError:
                continue  # the backend is unreachable now; the job stays as it was, asked again later
            if st.state == state or (st.state == QUEUED):
                continue
            if st.state == RUNNING:
                with self.unit_of_work() as s:
                    if s.execute(update(Job).where(Job.job_id == job_id, Job.state == QUEUED)
                                 .values(state=RUNNING, started_at=st.started_at or names.utcnow())).rowcount:
                        audit.append(s, "training.started", "system", model=job_model, job_id=job_id)
                        changed += 1
                continue
            error = st.error
            final = st.state
            if final == SUCCEEDED:
                saved_model = self.backend.storage.join(train_path, "model", "saved_model.pb")
                if not self.backend.storage.exists(saved_model):
                    final, error = FAILED, f"the trainer exited 0 but wrote no SavedModel at {train_path}/model/"
            if final == FAILED:
                tail = self._log_tail(job_id, ref)
                error = f"{error or 'failed'}" + (f"\n--- log tail ---\n{tail}" if tail else "")
            if self._finish_job(job_id, final, error=error, started=st.started_at, ended=st.ended_at):
                changed += 1
        return changed

    def _log_tail(self, job_id: str, ref: str | None) -> str:
        try:
            return self.backend.logs(job_id, ref, tail=LOG_TAIL_LINES)
        except StarchartError:
            return ""

    def state(self, model: str, limit: int | None = None) -> list[dict[str, Any]]:
        cols = Job.__table__.c
        q = select(cols.job_id, cols.state, _text(cols.created_at), _text(cols.started_at), _text(cols.ended_at),
                   cols.requested_by, cols.version_name, cols.args, cols.error).where(cols.model == model)
        q = q.order_by(cols.ts.desc()).limit(limit) if limit else q.order_by(cols.ts.desc())
        for attempt in (1, 2):
            with self.unit_of_work() as s:
                self._require_model(model, s)
                pending = attempt == 1 and s.execute(select(cols.job_id).where(
                    cols.model == model, cols.state.in_([QUEUED, RUNNING])).limit(1)).first() is not None
                if not pending:
                    rows = s.execute(q).all()
                    break
            self.refresh_jobs(model)  # only unfinished jobs cost a backend call
        return [
            {"job_id": job_id, "state": state, "created_at": iso_text(created), "started_at": iso_text(started),
             "ended_at": iso_text(ended), "requested_by": by, "version": version, "args": args, "error": error}
            for job_id, state, created, started, ended, by, version, args, error in rows
        ]

    def job(self, job_id: str) -> dict[str, Any]:
        names.split_job_id(job_id)
        with self.unit_of_work() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise NotFound(f"no job {job_id!r}", "list jobs with `state MODEL`")
            return job_view(job)

    def job_metrics(self, job_id: str) -> dict[str, Any]:
        """metrics.json of a finished job ({} when the trainer wrote none or it is unreadable)."""
        job = self.job(job_id)
        store = self.backend.storage
        uri = store.join(job["train_path"], "metrics.json")
        try:
            raw = json.loads(store.read_bytes(uri)) if store.exists(uri) else {}
        except (StarchartError, ValueError):
            return {}
        return {k: v for k, v in raw.items() if isinstance(v, (int, float))} if isinstance(raw, dict) else {}

    def logs(self, job_id: str, tail: int = 40) -> str:
        job = self.job(job_id)
        with self.unit_of_work() as s:
            ref = s.get(Job, job_id).backend_ref
        return self.backend.logs(job_id, ref, tail=tail) or (job["error"] or "(no log yet)")

    def cancel(self, job_id: str, user: str) -> dict[str, Any]:
        job = self.job(job_id)
        check_operator(self.config.policy(job["model"]), user, self.members_of, "cancel jobs of", job["model"])
        if job["state"] in TERMINAL:
            raise InvalidInput(f"{job_id} already ended ({job['state']})", "only QUEUED or RUNNING jobs can be cancelled")
        with self.unit_of_work() as s:
            ref = s.get(Job, job_id).backend_ref
        self.backend.cancel(job_id, ref)
        self._finish_job(job_id, CANCELLED, actor=user)
        return self.job(job_id)

    def wait(self, job_id: str, timeout: float = 3600.0, on_change: Callable[[dict[str, Any]], None] | None = None
             ) -> dict[str, Any]:
        """Poll a job until it ends, backing off between the backend's shortest and longest interval."""
        delay, longest = self.backend.poll_interval
        deadline, last = time.monotonic() + timeout, None
        while True:
            self.refresh_jobs(self.job(job_id)["model"])
            job = self.job(job_id)
            if on_change and job["state"] != last:
                on_change(job)
            last = job["state"]
            if job["state"] in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise BackendError(f"{job_id} is still {job['state']} after {timeout:.0f}s",
                                   f"follow it with `state {job['model']}`")
            time.sleep(delay)
            delay = min(delay * 1.5, longest)

    # ---------------------------------------------------------------- versions

    def expose(self, model: str, user: str) -> dict[str, Any]:
        """Turn every succeeded, unexposed job into a version. Returns {'exposed': [...], 'errors': [...]}."""
        names.validate_model_name(model)
        self._require_model(model)
        check_operator(self.config.policy(model), user, self.members_of, "expose", model)
        self.refresh_jobs(model)
        with self.unit_of_work() as s:
            jobs = s.execute(select(Job).where(Job.model == model, Job.state == SUCCEEDED,
                                               Job.version_name.is_(None)).order_by(Job.ts)).scalars().all()
        exposed, errors = [], []
        for job in jobs:
            try:
                view = self._expose_job(job, user)
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
            metrics = {str(k): v for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return signature, metrics

    def _expose_job(self, job: Job, user: str) -> dict[str, Any] | None:
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
        with self.unit_of_work() as s:
            first = s.execute(select(func.count()).select_from(Version).where(Version.model == job.model)).scalar() == 0
        ref = self.backend.register_version(job.model, view, first)
        initialized = False
        try:
            with self.unit_of_work() as s:
                if not s.execute(update(Job).where(Job.job_id == job.job_id, Job.version_name.is_(None))
                                 .values(version_name=version.name)).rowcount:
                    return None  # another process exposed it first
                version.backend_ref = ref
                s.add(version)
                audit.append(s, "version.exposed", user, model=job.model, version=version.name, job_id=job.job_id,
                             details={"digest": version.digest, "metrics": metrics})
                record = s.get(ModelRecord, job.model, with_for_update=True)
                if record is None:
                    record = ModelRecord(name=job.model, default_version=None, updated_at=names.utcnow())
                    s.add(record)
                if record.default_version is None:  # StarChart: a new model's first version is its default
                    record.default_version, record.updated_at = version.name, names.utcnow()
                    audit.append(s, "default.initialized", user, model=job.model, version=version.name,
                                 details={"why": "first version of a new model"})
                    initialized = True
        except IntegrityError:
            return None
        if initialized:
            self.backend.set_default(job.model, version.name, ref)
        record_uri = self.backend.storage.join(job.train_path, "starchart.json")
        self.backend.storage.write_bytes(record_uri, json.dumps(view, indent=2, sort_keys=True).encode())
        return view

    def versions(self, model: str) -> dict[str, Any]:
        cols = Version.__table__.c
        with self.unit_of_work() as s:
            self._require_model(model, s)
            default = s.execute(select(ModelRecord.default_version).where(ModelRecord.name == model)).scalar()
            rows = s.execute(
                select(cols.name, cols.job_id, _text(cols.created_at), cols.trained_by, cols.metrics,
                       cols.deployment_uri).where(cols.model == model).order_by(cols.name.desc())
            ).all()
        return {
            "model": model, "default": default,
            "versions": [
                {"name": name, "job_id": job_id, "created_at": iso_text(created), "trained_by": by,
                 "metrics": metrics, "deployment_uri": uri, "is_default": name == default}
                for name, job_id, created, by, metrics, uri in rows
            ],
        }

    def _version(self, s: Session, model: str, name: str) -> Version:
        v = s.execute(select(Version).where(Version.model == model, Version.name == name)).scalar_one_or_none()
        if v is None:
            recent = s.execute(select(Version.name).where(Version.model == model)
                               .order_by(Version.name.desc()).limit(5)).scalars().all()
            hint = names.suggest(name, list(recent)) or (
                f"recent versions: {', '.join(recent)}" if recent else f"run `expose {model}` after a training")
            raise NotFound(f"{model} has no version {name!r}", hint)
        return v

    def default_version(self, model: str) -> str | None:
        with self.unit_of_work() as s:
            record = s.get(ModelRecord, model)
            return record.default_version if record else None

    def diff(self, model: str, version: str | None = None, base: str | None = None) -> dict[str, Any]:
        with self.unit_of_work() as s:
            self._require_model(model, s)
            record = s.get(ModelRecord, model)
            if version is None:
                newest = s.execute(select(Version.name).where(Version.model == model)
                                   .order_by(Version.name.desc()).limit(1)).scalar()
                if newest is None:
                    raise NotFound(f"{model} has no versions", f"train it, then run `expose {model}`")
                version = newest
            cand = version_view(self._version(s, model, version))
            base_name = base or (record.default_version if record else None)
            base_view = version_view(self._version(s, model, base_name)) if base_name else None
        return diff_versions(cand, base_view)

    def write_model_file(self, model: str) -> Path:
        with self.unit_of_work() as s:
            versions = [version_view(v) for v in s.execute(
                select(Version).where(Version.model == model).order_by(Version.name)).scalars()]
            record = s.get(ModelRecord, model)
        return write_model_file(self.config.model_files, model, versions, record.default_version if record else None)

    # ---------------------------------------------------------------- promotion requests

    def promote(self, model: str, version: str, user: str, reason: str | None = None, kind: str = "promote",
                channel: str | None = None) -> dict[str, Any]:
        names.validate_model_name(model)
        policy = self.config.policy(model)
        check_operator(policy, user, self.members_of, "request a promotion of", model)
        with self.unit_of_work() as s:
            self._require_model(model, s)
            cand = self._version(s, model, version)
            record = s.get(ModelRecord, model)
            base_name = record.default_version if record else None
            if base_name == version:
                raise InvalidInput(f"{version} is already the default of {model}", "nothing to review")
            existing = s.execute(select(PromotionRequest).where(
                PromotionRequest.model == model, PromotionRequest.candidate_version == version,
                PromotionRequest.base_version == base_name, PromotionRequest.state == OPEN,
                PromotionRequest.expires_at > names.utcnow())).scalar_one_or_none()
            if existing is not None:  # a retried command finds the open request instead of a twin
                return request_view(existing, self._approvals(s, existing.id))
            cand_view = version_view(cand)
            base_view = version_view(self._version(s, model, base_name)) if base_name else None
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
        self._require_model(model)
        doc = read_model_file(self.config.model_files, model)
        wanted = marked_default(doc, str(self.config.model_files / f"{model}.yaml"))
        return self.promote(model, wanted, user, reason, kind="apply")

    def rollback(self, model: str, user: str, reason: str | None = None) -> dict[str, Any]:
        names.validate_model_name(model)
        with self.unit_of_work() as s:
            self._require_model(model, s)
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

    def _approvals(self, s: Session, request_id: int) -> list[Approval]:
        return list(s.execute(select(Approval).where(Approval.request_id == request_id)
                              .order_by(Approval.id)).scalars())

    def request(self, request_id: int) -> dict[str, Any]:
        with self.unit_of_work() as s:
            req = s.get(PromotionRequest, request_id)
            if req is None:
                raise NotFound(f"no promotion request #{request_id}", "list them with `requests MODEL`")
            return request_view(req, self._approvals(s, req.id))

    def requests(self, model: str, open_only: bool = False) -> list[dict[str, Any]]:
        with self.unit_of_work() as s:
            self._require_model(model, s)
            q = select(PromotionRequest).where(PromotionRequest.model == model)
            if open_only:
                q = q.where(PromotionRequest.state.in_([OPEN, APPROVED, APPLYING, FAILED_APPLY]))
            return [request_view(r, self._approvals(s, r.id)) for r in
                    s.execute(q.order_by(PromotionRequest.id.desc()).limit(50)).scalars()]

    def set_card(self, request_id: int, channel: str, message_ts: str) -> None:
        with self.unit_of_work() as s:
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
        with self.unit_of_work() as s:
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
        return self.request(request_id)

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
        cand = self._version(s, req.model, req.candidate_version)
        try:
            check_approver(self.config.policy(req.model), user, self.members_of, req.requested_by, cand.trained_by,
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

    def record_refusal(self, actor: str, reason: str, message: str, *, model: str | None = None,
                       request_id: int | None = None, channel: str | None = None, message_ts: str | None = None,
                       details: dict[str, Any] | None = None) -> None:
        """Record a refused request that changed nothing (forged, tampered, unauthorised)."""
        with self.unit_of_work() as s:
            audit.append(s, "request.refused", actor, model=model, request_id=request_id, channel=channel,
                         message_ts=message_ts, details={"reason": reason, "message": message[:500],
                                                         **(details or {})})

    def retry_apply(self, request_id: int, user: str) -> dict[str, Any]:
        """Apply a failed request again; only an approver of the model may ask."""
        req = self.request(request_id)
        policy = self.config.policy(req["model"])
        if policy.approvers and not is_listed(user, policy.approvers, self.members_of):
            self.record_refusal(user, "not_approver", f"{user} may not retry #{request_id}", model=req["model"],
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
        with self.unit_of_work() as s:
            req = s.get(PromotionRequest, request_id, with_for_update=True)
            if req is None:
                raise NotFound(f"no promotion request #{request_id}")
            if req.state not in (APPROVED, FAILED_APPLY):
                return request_view(req, self._approvals(s, req.id))
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
                return request_view(req, self._approvals(s, req.id))
            req.state, req.apply_started_at, req.error = APPLYING, names.utcnow(), None
            audit.append(s, "promotion.applying", actor, model=req.model, version=req.candidate_version,
                         request_id=req.id, channel=req.channel, message_ts=req.message_ts,
                         details={"base": req.base_version, "backend": self.backend.name})
            cand = self._version(s, req.model, req.candidate_version)
            model, version, ref = req.model, req.candidate_version, cand.backend_ref
        try:
            self.backend.set_default(model, version, ref)
        except Exception as exc:  # any backend failure leaves the request failed with the reason, nothing applied
            reason = exc.message if isinstance(exc, StarchartError) else repr(exc)
            self._apply_result(request_id, actor, error=reason)
        else:
            self._apply_result(request_id, actor)
        self.write_model_file(model)
        return self.request(request_id)

    def _apply_result(self, request_id: int, actor: str, error: str | None = None) -> None:
        with self.unit_of_work() as s:
            req = s.get(PromotionRequest, request_id, with_for_update=True)
            if req.state != APPLYING:
                return  # reconciled by someone else meanwhile
            common = {"model": req.model, "version": req.candidate_version, "request_id": req.id,
                      "channel": req.channel, "message_ts": req.message_ts}
            if error is not None:
                req.state, req.error = FAILED_APPLY, error
                audit.append(s, "promotion.failed", actor, **common, details={"error": error})
                return
            s.execute(update(ModelRecord).where(ModelRecord.name == req.model)
                      .values(default_version=req.candidate_version, updated_at=names.utcnow()))
            req.state, req.applied_at = APPLIED, names.utcnow()
            audit.append(s, "promotion.applied", actor, **common,
                         details={"base": req.base_version, "kind": req.kind})

    def reconcile(self, older_than: timedelta = RECONCILE_AFTER) -> list[dict[str, Any]]:
        """Finish applies interrupted by a crash: applied if the backend has the candidate, else failed."""
        cutoff = names.utcnow() - older_than
        with self.unit_of_work() as s:
            stuck = s.execute(select(PromotionRequest.id, PromotionRequest.model, PromotionRequest.candidate_version)
                              .where(PromotionRequest.state == APPLYING,
                                     PromotionRequest.apply_started_at <= cutoff)).all()
        results = []
        for request_id, model, version in stuck:
            try:
                current = self.backend.current_default(model)
            except StarchartError:
                continue
            if current == version:
                self._apply_result(request_id, "system")
            else:
                self._apply_result(request_id, "system",
                                   error="interrupted before the backend switched the default; retry to apply")
            with self.unit_of_work() as s:
                audit.append(s, "promotion.reconciled", "system", model=model, version=version,
                             request_id=request_id, details={"backend_default": current})
            results.append(self.request(request_id))
            self.write_model_file(model)
        return results

    def expire_requests(self) -> int:
        now = names.utcnow()
        with self.unit_of_work() as s:
            old = s.execute(select(PromotionRequest).where(PromotionRequest.state == OPEN,
                                                           PromotionRequest.expires_at < now)).scalars().all()
            for req in old:
                req.state, req.decided_at = EXPIRED, now
                audit.append(s, "promotion.expired", "system", model=req.model, version=req.candidate_version,
                             request_id=req.id)
            return len(old)

    # ---------------------------------------------------------------- audit

    @property
    def _checkpoint_file(self) -> Path:
        return self.settings.home / "audit" / "checkpoints.jsonl"

    def _audit_key(self) -> bytes | None:
        key = os.environ.get("STARCHART_AUDIT_KEY") or os.environ.get("SLACK_SIGNING_SECRET")
        return key.encode() if key else None

    def audit_checkpoints(self) -> list[dict[str, Any]]:
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

    def audit_checkpoint(self) -> dict[str, Any]:
        """Record the chain's head outside the database; the caller may also post it (e.g. to Slack)."""
        with self.sessions() as s:
            cp = audit.checkpoint(s, self._audit_key())
        self._checkpoint_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self._checkpoint_file, "a") as fh:
            fh.write(json.dumps(cp, sort_keys=True) + "\n")
        return cp

    def verify_audit(self, checkpoints: Iterable[dict[str, Any]] | None = None) -> audit.VerifyResult:
        cps = self.audit_checkpoints() if checkpoints is None else list(checkpoints)
        with self.sessions() as s:
            return audit.verify(s, cps, self._audit_key())

    def audit_events(self, *, model: str | None = None, since: datetime | None = None,
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
        with self.sessions() as s:
            rows = audit.query(s, model=model, since=since, until=until, actor=actor, action=action,
                               version=version, limit=limit, before_seq=before_seq)
            if not rows and actor is not None and not audit.has_actor(s, actor):
                raise NotFound(f"no audit events by {actor!r}", "check the user id (in Slack, @mention the person)")
            return rows

    def default_at(self, model: str, at: datetime) -> dict[str, Any]:
        """Which version was the default of `model` at `at`, who requested and approved it, from what."""
        names.validate_model_name(model)
        with self.sessions() as s:
            self._require_model(model, s)
            event = audit.default_event_at(s, model, at)
            if event is None:
                raise NotFound(f"{model} had no default version at {iso(at)}",
                               f"its first version became the default later; see `audit {model}`")
            answer: dict[str, Any] = {"model": model, "at": iso(at), "version": event.version,
                                      "since": iso(event.created_at), "how": event.action, "event_seq": event.seq}
            if event.request_id is not None:
                req = s.get(PromotionRequest, event.request_id)
                answer["request"] = request_view(req, self._approvals(s, req.id)) if req else None
                answer["requested_by"] = req.requested_by if req else None
                answer["approved_by"] = [a.approver for a in self._approvals(s, event.request_id)
                                         if a.decision == "approve"]
            else:
                answer["requested_by"], answer["approved_by"] = event.actor, []
            version = s.execute(select(Version).where(Version.model == model, Version.name == event.version)
                                ).scalar_one_or_none()
            if version is not None:
                answer.update(job_id=version.job_id, args=list(version.args or []), program=version.program,
                              trained_by=version.trained_by, metrics=version.metrics)
            answer.pop("request", None)
            return answer
