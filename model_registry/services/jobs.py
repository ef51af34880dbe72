"""Training jobs: start, follow, read logs, cancel. Each state change commits with its audit event."""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timedelta
from typing import Any, Callable, Iterable

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from model_registry.adapters import event_files, listings, outbox
from model_registry.adapters.audit_log import AuditLog
from model_registry.adapters.backends.base import Backend, TrainingSpec
from model_registry.adapters.db import Database, rows_changed
from model_registry.adapters.listings import JobRow
from model_registry.adapters.packaging import build_sdist, check_module, trainer_dir
from model_registry.adapters.records import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    Job,
    ModelRecord,
)
from model_registry.adapters.trainer_flags import declared_flags
from model_registry.config import ProjectConfig, Settings
from model_registry.domain import names
from model_registry.domain.errors import BackendError, InvalidInput, NotFound, StarchartError
from model_registry.domain.policy import check_operator
from model_registry.domain.progress import ProgressView, TrainingCurves
from model_registry.domain.trainer_args import check_trainer_args, substitute_train_path
from model_registry.services.catalog import Catalog
from model_registry.services.views import JobView, job_view

log = logging.getLogger("starchart.jobs")
LOG_TAIL_LINES = 20
RUNNING_MESSAGE_EVERY = timedelta(seconds=15)  # a running training's message shows its elapsed time and progress this often
SUBMIT_TAKES_AT_MOST = timedelta(minutes=10)  # staging a package and submitting it
LOG_TAIL_CHARS = 2300  # with its note, within the failed-training message's 2500-character tail (a section is 3000)


def cap_log_tail(text: str, limit: int = LOG_TAIL_CHARS) -> str:
    """The end of a log within `limit` characters, cut on a line boundary, saying how much was cut."""
    if len(text) <= limit:
        return text
    kept = text[-limit:]
    if "\n" in kept:
        kept = kept.split("\n", 1)[1]
    cut = text[: len(text) - len(kept)].count("\n") or 1
    return f"… {cut} earlier line(s) cut; the whole log stays with the backend\n{kept}"


class Jobs:
    """Training jobs of every model, on the configured backend."""

    def __init__(self, db: Database, audit_log: AuditLog, catalog: Catalog, config: ProjectConfig, settings: Settings,
                 backend: Backend) -> None:
        self.db, self.audit_log, self.catalog = db, audit_log, catalog
        self.config, self.settings, self.backend = config, settings, backend

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
        configured_args: bool = False,
        message_channel: str | None = None,
    ) -> JobView:
        """Start a training. `args` are a person's (checked against `args_allowed`) unless `configured_args`
        says they come from starchart.yaml; None takes the model's configured `args`. Paths are checked always.
        With `message_channel`, the training message is recorded with the job: the outbox posts it there and
        updates it as the job goes queued → running → succeeded / failed."""
        names.validate_model_name(model)
        source = trainer_dir(self.config.trainer_base, model)
        policy = self.config.policy(model)
        check_operator(policy, user, self.catalog.members_of, "train", model)
        module = module or policy.module
        check_module(source, module)
        if workers < 1 or workers > 64:
            raise InvalidInput(f"invalid worker count {workers}", "use --workers between 1 and 64")
        raw_args = tuple(args) if args is not None else policy.args
        self.check_args(model, raw_args, from_person=args is not None and not configured_args, module=module)
        package = build_sdist(source, self.settings.home / "cache" / "sdist", model)

        ts = names.timestamp()
        for _ in range(60):  # two trainings in the same second get consecutive timestamps
            try:
                with self.db.unit_of_work() as s:
                    job = self._new_job(s, model, ts, module, raw_args, user, package.sha256,
                                        scale_tier or policy.scale_tier, region or policy.region,
                                        machine_type or policy.machine_type, workers)
                    if message_channel:
                        outbox.record(s, outbox.TRAINING, job.job_id, message_channel, notify=user)
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
                trainer_env=policy.trainer_env,
            )
            ref = self.backend.submit(spec)
        except StarchartError as exc:  # a schedule's caller tells the channel it did not start (no announcement)
            self._finish_job(job.job_id, FAILED, error=f"could not start: {exc}", actor=user, announce=False)
            raise
        except Exception as exc:
            self._finish_job(job.job_id, FAILED, error=f"could not start: {exc!r}", actor=user, announce=False)
            raise BackendError(f"the {self.backend.name} backend could not start {job.job_id}: {exc}",
                               "see the job's error with `state`; fix the backend and train again") from exc
        with self.db.unit_of_work() as s:
            s.execute(update(Job).where(Job.job_id == job.job_id).values(package_uris=[package_uri], backend_ref=ref))
            return job_view(s.get_one(Job, job.job_id))

    def check_args(self, model: str, args: Iterable[str], *, from_person: bool, module: str | None = None) -> None:
        """Refuse trainer arguments the policy forbids, before anything is recorded (TRAIN_PATH stands for the
        job's train path: a provisional one, the same bucket and model, is checked)."""
        policy = self.config.policy(model)
        allowed = policy.args_allowed
        if from_person and policy.args_declared:
            allowed = declared_flags(trainer_dir(self.config.trainer_base, model), module or policy.module)
        train_path = names.train_path(self.settings.bucket, model, names.timestamp())
        check_trainer_args(model, substitute_train_path(args, train_path),
                           allowed=allowed if from_person else None,
                           data_roots=policy.data_roots, train_path=train_path)

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
        self.audit_log.append(s, "training.requested", user, model=model, job_id=job.job_id,
                     details={"module": module, "args": job.args, "package_sha256": sha256, "workers": workers})
        return job

    def _finish_job(self, job_id: str, state: str, *, error: str | None = None, actor: str = "system",
                    expected: Iterable[str] = (QUEUED, RUNNING), started: datetime | None = None,
                    ended: datetime | None = None, announce: bool = True) -> bool:
        """Record a job's end once. A scheduled training that failed is announced in its model's channel (with
        `announce`), in the same transaction."""
        with self.db.unit_of_work() as s:
            values: dict[str, Any] = {"state": state, "error": error, "ended_at": ended or names.utcnow()}
            if started:
                values["started_at"] = started
            done = rows_changed(s.execute(
                update(Job).where(Job.job_id == job_id, Job.state.in_(list(expected))).values(**values)))
            if done:
                job = s.get_one(Job, job_id)
                self.audit_log.append(s, f"training.{state.lower()}", actor, model=job.model, job_id=job_id,
                             details={"error": (error or "")[-500:]} if error else {})
                outbox.want_update(s, outbox.TRAINING, [job_id])
                if announce and state == FAILED and job.requested_by == f"schedule:{job.model}":
                    outbox.record_nightly(s, outbox.TRAINING_FAILED, job_id, self.config.policy(job.model).channel,
                                          {"model": job.model, "job_id": job_id})
            return bool(done)

    def refresh(self, model: str | None = None) -> int:
        """Ask the backend about every unfinished job; record what changed. Returns how many changed."""
        with self.db.unit_of_work() as s:
            # a job whose submission is still under way (no backend_ref yet) is not asked about: the backend may not
            # know it yet; one left so for long was lost with the process that submitted it, and is asked
            submitted = or_(Job.backend_ref.is_not(None), Job.created_at < names.utcnow() - SUBMIT_TAKES_AT_MOST)
            q = select(Job.job_id, Job.state, Job.backend_ref, Job.train_path, Job.model).where(
                Job.state.in_([QUEUED, RUNNING]), submitted)
            if model:
                q = q.where(Job.model == model)
            pending = s.execute(q).all()
        changed = 0
        running = [job_id for job_id, state, *_ in pending if state == RUNNING]
        if running:  # the messages of running trainings show their elapsed time, refreshed now and then
            with self.db.unit_of_work() as s:
                outbox.want_update(s, outbox.TRAINING, running, unchanged_since=names.utcnow() - RUNNING_MESSAGE_EVERY)
        for job_id, state, ref, train_path, job_model in pending:
            try:
                st = self.backend.status(job_id, ref)
            except StarchartError:
                continue  # the backend is unreachable now; the job stays as it was, asked again later
            if st.state == state or (st.state == QUEUED):
                continue
            if st.state == RUNNING:
                with self.db.unit_of_work() as s:
                    if rows_changed(s.execute(update(Job).where(Job.job_id == job_id, Job.state == QUEUED)
                                              .values(state=RUNNING, started_at=st.started_at or names.utcnow()))):
                        self.audit_log.append(s, "training.started", "system", model=job_model, job_id=job_id)
                        outbox.want_update(s, outbox.TRAINING, [job_id])
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
            return cap_log_tail(self.backend.logs(job_id, ref, tail=LOG_TAIL_LINES))
        except StarchartError:
            return ""

    def state(self, model: str, limit: int | None = None) -> list[JobRow]:
        self.catalog.require_model(model)
        jobs = listings.jobs_of(self.db.engine, model, limit)
        if any(job["state"] in (QUEUED, RUNNING) for job in jobs) and self.refresh(model):
            jobs = listings.jobs_of(self.db.engine, model, limit)  # only unfinished jobs are asked
        return jobs

    def get(self, job_id: str) -> JobView:
        names.split_job_id(job_id)
        with self.db.reads() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise NotFound(f"no job {job_id!r}", "list jobs with `state MODEL`")
            return job_view(job)

    def metrics(self, job_id: str) -> dict[str, Any]:
        """metrics.json of a finished job ({} when the trainer wrote none or it is unreadable)."""
        job = self.get(job_id)
        store = self.backend.storage
        uri = store.join(job["train_path"], "metrics.json")
        try:
            raw = json.loads(store.read_bytes(uri)) if store.exists(uri) else {}
        except (StarchartError, ValueError):
            return {}
        return {k: v for k, v in raw.items() if isinstance(v, (int, float))} if isinstance(raw, dict) else {}

    def curves(self, job_id: str) -> TrainingCurves | None:
        """The per-epoch metrics in the job's TensorBoard event files (<train path>/logs/); None when there are none
        or they cannot be read: a damaged file costs the progress and the charts, nothing else."""
        job = self.get(job_id)
        store = self.backend.storage
        try:
            return event_files.read_log_dir(store, store.join(job["train_path"], "logs"))
        except StarchartError as exc:
            log.warning("event files of %s not read: %s", job_id, exc)
            return None

    def progress(self, job_id: str) -> ProgressView | None:
        """Epochs done of the planned ones and the last loss, as the event files say (None: nothing to show)."""
        curves = self.curves(job_id)
        return curves.progress() if curves is not None else None

    def logs(self, job_id: str, tail: int = 40) -> str:
        job = self.get(job_id)
        with self.db.unit_of_work() as s:
            ref = s.get_one(Job, job_id).backend_ref
        return cap_log_tail(self.backend.logs(job_id, ref, tail=tail) or (job["error"] or "(no log yet)"))

    def cancel(self, job_id: str, user: str) -> JobView:
        job = self.get(job_id)
        check_operator(self.config.policy(job["model"]), user, self.catalog.members_of, "cancel jobs of", job["model"])
        if job["state"] in TERMINAL:
            raise InvalidInput(f"{job_id} already ended ({job['state']})", "only QUEUED or RUNNING jobs can be cancelled")
        with self.db.unit_of_work() as s:
            ref = s.get_one(Job, job_id).backend_ref
        self.backend.cancel(job_id, ref)
        self._finish_job(job_id, CANCELLED, actor=user)
        return self.get(job_id)

    def wait(self, job_id: str, timeout: float = 3600.0, on_change: Callable[[JobView], None] | None = None
             ) -> JobView:
        """Poll a job until it ends, backing off between the backend's shortest and longest interval."""
        delay, longest = self.backend.poll_interval
        deadline, last = time.monotonic() + timeout, None
        while True:
            self.refresh(self.get(job_id)["model"])
            job = self.get(job_id)
            if on_change and job["state"] != last:
                on_change(job)
            last = job["state"]
            if job["state"] in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise BackendError(f"{job_id} is still {job['state']} after {timeout:.0f}s",
                                   f"follow it with `state {job['model']}`")
            self.backend.wait_for_change(job_id, delay)
            delay = min(delay * 1.5, longest)

