"""Evaluations: a promotion request's candidate and current default, evaluated on the model's evaluation data.

A request opens with its evaluation planned (`planned`, in the request's transaction): `not_configured` (the model
has no `evaluation:`), `failed` (what is wrong is known at once: the output is not in a signature, the data is
where the backend cannot read it) or `pending`. `follow` (the worker's pass and every process's job watch) starts
pending ones as backend jobs — never on the path of an ack or the card's first post — and finishes those whose job
ended: the result, its audit event, the card's update and the nightly gate's decision commit in one transaction.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from model_registry.adapters import evaluation_package, outbox
from model_registry.adapters.audit_log import AuditLog
from model_registry.adapters.backends.base import Backend, TrainingSpec
from model_registry.adapters.db import Database, rows_changed
from model_registry.adapters.records import FAILED, SUCCEEDED, TERMINAL, PromotionRequest
from model_registry.config import Evaluation, Gate, ModelPolicy, ProjectConfig
from model_registry.domain import evaluation as measures
from model_registry.domain import names
from model_registry.domain import promotion as rules
from model_registry.domain.errors import StarchartError
from model_registry.services.catalog import Catalog
from model_registry.services.views import GateRefusal, VersionView

log = logging.getLogger("starchart.evaluations")

NOT_CONFIGURED, PENDING, STARTING, RUNNING, DONE = "not_configured", "pending", "starting", "running", "done"
FAILED_STATE = "failed"
FOLLOWED = (PENDING, STARTING, RUNNING)
STARTING_LOST_AFTER = timedelta(minutes=10)  # a claimed start whose process died never gets its job: failed then
ISO = "%Y-%m-%dT%H:%M:%SZ"  # names.iso's format
WAITING, PASSED, REFUSED = "waiting", "passed", "refused"  # a gated request's gate, before and after it decides


def planned(policy: ModelPolicy, model: str, candidate: VersionView, base: VersionView | None, backend: str,
            gate: Gate | None = None) -> dict[str, Any]:
    """A new request's evaluation, decided from the configuration and the stored signatures (no I/O)."""
    spec = policy.evaluation
    if spec is None:
        return {"state": NOT_CONFIGURED, "hint": measures.CONFIGURE_HINT.replace("{model}", model)}
    plan: dict[str, Any] = {"state": PENDING, "data": spec.data, "label": spec.label, "output": spec.output}
    if gate is not None:
        plan["gate"] = {"metric": gate.metric, "min_delta": gate.min_delta, "state": WAITING}
    why = _known_problem(spec, candidate, base, backend)
    if why is not None:
        plan.update(state=FAILED_STATE, error=why[0], hint=why[1])
    return plan


def _known_problem(spec: Evaluation, candidate: VersionView, base: VersionView | None,
                   backend: str) -> tuple[str, str] | None:
    for view, role in ((candidate, "candidate"), (base, "current default")):
        outputs = (view["signature"] or {}).get("outputs") if view is not None else None
        if view is not None and outputs and spec.output not in outputs:
            return (f"`evaluation.output` names {spec.output!r}, which the {role} {view['name']} does not give "
                    f"(its outputs: {', '.join(sorted(outputs))})",
                    "set `evaluation.output` in starchart.yaml to the output the label is compared with")
    cloud = "://" in spec.data
    if backend == "vertex" and not cloud:
        return (f"the evaluation data {spec.data} is on this machine, which a Vertex AI job cannot read",
                "copy it to Cloud Storage and set `evaluation.data` to its gs:// URI")
    if backend == "local" and cloud:
        return (f"the evaluation data {spec.data} is in cloud storage, which the local backend does not read",
                "copy it to this machine and point `evaluation.data` at the local file")
    return None


class Evaluations:
    """Evaluation jobs of promotion requests: started, followed, finished with the card's update."""

    def __init__(self, db: Database, audit_log: AuditLog, catalog: Catalog, config: ProjectConfig, backend: Backend,
                 bucket: str, cache_dir: Path) -> None:
        self.db, self.audit_log, self.catalog, self.config, self.backend = db, audit_log, catalog, config, backend
        self.bucket, self.cache_dir = bucket, cache_dir

    def follow(self) -> int:
        """Start the pending evaluations and finish those whose job ended; returns how many changed."""
        with self.db.reads() as s:
            rows = s.execute(select(PromotionRequest.id, PromotionRequest.evaluation_state)
                             .where(PromotionRequest.evaluation_state.in_(FOLLOWED))
                             .order_by(PromotionRequest.id)).all()
        changed = 0
        for request_id, state in rows:
            try:
                if state == PENDING:
                    changed += self._start(request_id)
                elif state == RUNNING:
                    changed += self._refresh(request_id)
                else:
                    changed += self._lost(request_id)
            except StarchartError as exc:  # the backend is away for a moment: the next pass asks again
                log.warning("evaluation of promotion request #%s: %s", request_id, exc.message)
        return changed

    # ---------------------------------------------------------------- starting

    def _start(self, request_id: int) -> bool:
        now = names.utcnow()
        with self.db.unit_of_work() as s:  # one process wins the start
            row = s.get_one(PromotionRequest, request_id)
            plan = dict(row.evaluation or {})
            if not rows_changed(s.execute(update(PromotionRequest).where(
                    PromotionRequest.id == request_id, PromotionRequest.evaluation_state == PENDING)
                    .values(evaluation_state=STARTING, evaluation={**plan, "state": STARTING,
                                                                   "claimed_at": names.iso(now)}))):
                return False
            model, ts = row.model, names.timestamp(now)
            candidate = self.catalog.version(s, model, row.candidate_version).deployment_uri
            base = self.catalog.version(s, model, row.base_version).deployment_uri if row.base_version else None
        job_id = f"{model}_eval{request_id}_{ts}"
        folder = f"{self.bucket.rstrip('/')}/{model}/evaluations/{request_id}-{ts}"
        result = f"{folder}/evaluation.json"
        policy = self.config.policy(model)
        args = [f"--candidate={candidate}", f"--data={plan['data']}", f"--label={plan['label']}",
                f"--output={plan['output']}", f"--result={result}"] + ([f"--base={base}"] if base else [])
        try:
            package = evaluation_package.build(self.cache_dir)
            spec = TrainingSpec(job_id=job_id, model=model, ts=ts, module=evaluation_package.MODULE, args=tuple(args),
                                package_uri=self.backend.stage_package(package, folder), train_path=folder,
                                region=policy.region, machine_type=policy.machine_type,
                                executor_image=policy.executor_image, labels={"kind": "evaluation"})
            ref = self.backend.submit(spec)
        except StarchartError as exc:
            self._finish(request_id, STARTING, {"state": FAILED_STATE, "job_id": job_id,
                                                "error": f"the evaluation job did not start: {exc.message}",
                                                "hint": exc.hint or "the next request tries again"})
            return True
        with self.db.unit_of_work() as s:
            row = s.get_one(PromotionRequest, request_id, with_for_update=True)
            row.evaluation_state = RUNNING
            row.evaluation = {**plan, "state": RUNNING, "job_id": job_id, "ref": ref, "result_uri": result,
                              "started_at": names.iso(names.utcnow())}
            self.audit_log.append(s, "evaluation.started", "system", model=model, version=row.candidate_version,
                                  request_id=request_id, details={"job_id": job_id, "data": plan["data"],
                                                                  "base": row.base_version})
            outbox.want_update(s, outbox.REVIEW_CARD, [str(request_id)])
        return True

    def _lost(self, request_id: int) -> bool:
        """A start claimed by a process that died before its job was submitted fails after STARTING_LOST_AFTER."""
        with self.db.reads() as s:
            row = s.get_one(PromotionRequest, request_id)
            claimed = (row.evaluation or {}).get("claimed_at")
        if claimed and names.utcnow() - datetime.strptime(claimed, ISO) < STARTING_LOST_AFTER:
            return False
        return self._finish(request_id, STARTING, {
            "state": FAILED_STATE, "error": "the evaluation job was never started (its process stopped)",
            "hint": "open the request again to evaluate it"})

    # ---------------------------------------------------------------- finishing

    def _refresh(self, request_id: int) -> bool:
        with self.db.reads() as s:
            stored = dict(s.get_one(PromotionRequest, request_id).evaluation or {})
        status = self.backend.status(stored["job_id"], stored.get("ref"))
        if status.state not in TERMINAL:
            return False
        found = self._result(stored["result_uri"])
        ended = {"ended_at": names.iso(status.ended_at or names.utcnow())}
        if found is not None and found.get("ok"):
            outcome = {"state": DONE, **{k: v for k, v in found.items() if k != "ok"}, "error": None, "hint": None}
        elif found is not None:
            outcome = {"state": FAILED_STATE, "error": found.get("error"), "hint": found.get("hint")}
        else:
            why = status.error or {SUCCEEDED: "it wrote no result", FAILED: "it failed"}.get(status.state,
                                                                                            "it was cancelled")
            outcome = {"state": FAILED_STATE, "error": f"the evaluation job {stored['job_id']} ended without a "
                                                       f"result: {why}",
                       "hint": f"see the job's log ({self._log_of(stored['job_id'])}), then open the request again"}
        return self._finish(request_id, RUNNING, {**outcome, **ended})

    def _log_of(self, job_id: str) -> str:
        if self.backend.name == "local":
            return f"$STARCHART_HOME/jobs/{job_id}/train.log"
        return f"the CustomJob {job_id} on {self.backend.name}"

    def _result(self, uri: str) -> dict[str, Any] | None:
        store = self.backend.storage
        try:
            if not store.exists(uri):
                return None
            found = json.loads(store.read_bytes(uri))
        except (StarchartError, OSError, ValueError) as exc:
            log.warning("cannot read the evaluation result %s: %s", uri, exc)
            return None
        return found if isinstance(found, dict) else None

    def _finish(self, request_id: int, was: str, outcome: dict[str, Any]) -> bool:
        """Record the evaluation's end once (from state `was`), with its audit event and the card's update; a
        gated nightly request gets its card now, or is closed with the gate's reason."""
        with self.db.unit_of_work() as s:
            row = s.get_one(PromotionRequest, request_id, with_for_update=True)
            if row.evaluation_state != was:
                return False
            result = {k: v for k, v in {**(row.evaluation or {}), **outcome}.items() if k != "claimed_at"}
            row.evaluation_state, row.evaluation = result["state"], measures.jsonable(result)
            details = ({"rows": result.get("rows"), "candidate": result.get("candidate"), "base": result.get("base"),
                        "agreement": result.get("agreement")} if result["state"] == DONE
                       else {"error": result.get("error")})
            self.audit_log.append(s, "evaluation.finished" if result["state"] == DONE else "evaluation.failed",
                                  "system", model=row.model, version=row.candidate_version, request_id=request_id,
                                  details={"job_id": result.get("job_id"), **measures.jsonable(details)})
            decide_gate(s, self.audit_log, self.config.policy(row.model), row)
            outbox.want_update(s, outbox.REVIEW_CARD, [str(request_id)])
            return True


def decide_gate(s: Session, audit_log: AuditLog, policy: ModelPolicy, row: PromotionRequest) -> None:
    """A nightly request whose gate waits for its evaluation (now ended): its card is recorded when the gate lets
    it through; otherwise it is closed with the gate's reason, recorded as review.skipped and told to the channel."""
    result = dict(row.evaluation or {})
    gate = result.get("gate")
    if not gate or gate.get("state") != WAITING or result.get("state") not in (DONE, FAILED_STATE):
        return
    why = measures.gate_why(gate["metric"], float(gate["min_delta"]), result)
    row.evaluation = {**result, "gate": {**gate, "state": REFUSED if why else PASSED, "why": why}}
    if why is None:
        if row.state == rules.OPEN and row.channel:
            outbox.record(s, outbox.REVIEW_CARD, str(row.id), row.channel)
            outbox.record(s, outbox.CARD_CHARTS, str(row.id), row.channel, again=False)
        return
    facts = measures.gate_facts(gate["metric"], result)
    refusal: GateRefusal = {"metric": gate["metric"], "min_delta": float(gate["min_delta"]),
                            "base_version": row.base_version, "candidate": facts["candidate"],
                            "base": facts["base"], "delta": facts["delta"], "direction": facts["direction"],
                            "why": why}
    if row.state == rules.OPEN:
        row.state, row.decided_at, row.error = rules.REJECTED, names.utcnow(), f"the gate: {why}"
    audit_log.append(s, "review.skipped", row.requested_by, model=row.model, version=row.candidate_version,
                     request_id=row.id, details={"why": why, "gate": dict(refusal), "on": "evaluation"})
    outbox.record_nightly(s, outbox.REVIEW_SKIPPED, f"{row.model}/{row.candidate_version}", policy.channel,
                          {"model": row.model, "version": row.candidate_version, "gate": dict(refusal)})


def gate_waits(row: PromotionRequest) -> bool:
    """Whether the request is a nightly one whose gate has not decided yet (no one may decide on it before)."""
    gate = (row.evaluation or {}).get("gate") or {}
    return gate.get("state") == WAITING
