"""Records as the typed dicts the handlers render (CLI tables, Slack cards, JSON)."""

from __future__ import annotations

from typing import Any, Iterable, NotRequired, TypedDict, cast

from model_registry.adapters.records import (
    Approval,
    Job,
    PromotionRequest,
    Version,
)
from model_registry.domain.names import iso


class JobView(TypedDict):
    """A training job as every surface shows it (`train`, `state --json`, the training message)."""

    job_id: str
    model: str
    state: str
    module: str
    args: list[str]
    train_path: str
    requested_by: str
    created_at: str | None
    started_at: str | None
    ended_at: str | None
    error: str | None
    version: str | None
    package_uris: list[str]
    package_sha256: str | None
    region: str | None
    scale_tier: str | None
    workers: int


class VersionView(TypedDict):
    """A version with everything a review compares: program, parameters, metrics, signature, digest."""

    model: str
    name: str
    job_id: str
    deployment_uri: str
    created_at: str | None
    trained_by: str
    program: dict[str, Any]
    args: list[str]
    metrics: dict[str, Any]
    signature: dict[str, Any]
    job: dict[str, Any]
    digest: str


class ExposeError(TypedDict):
    job_id: str
    error: str


class Exposed(TypedDict):
    """What `expose` did: the versions it made, and the jobs it could not turn into one (and why)."""

    exposed: list[VersionView]
    errors: list[ExposeError]


class DecisionView(TypedDict):
    user: str
    decision: str
    reason: str | None
    at: str | None


class EvaluationView(TypedDict, total=False):
    """Candidate and current default on the model's evaluation data, as the card and `show --json` carry it.

    state: not_configured (no `evaluation:`; `hint` says how), pending (waiting for its job), running, done, failed
    (`error` and `hint` say what is wrong and how to fix it). Once done: rows, each version's metrics, the agreement
    of their answers and up to five rows they disagree on. `gate`: a nightly request the gate decides on once the
    evaluation ends (`{metric, min_delta, state: waiting|passed|refused, why}`)."""

    state: str
    data: str | None
    label: str | None
    output: str | None
    rows: int | None
    kind: str | None  # class | numeric: how the output is measured
    candidate: dict[str, Any] | None
    base: dict[str, Any] | None
    agreement: float | None
    disagreements: list[dict[str, Any]]
    error: str | None
    hint: str | None
    job_id: str | None
    started_at: str | None
    ended_at: str | None
    gate: dict[str, Any] | None


class RequestView(TypedDict):
    """A promotion request as its card shows it: candidate, base, state, decisions, the diff it binds to."""

    id: int
    model: str
    kind: str
    candidate: str
    base: str | None
    state: str
    requested_by: str
    reason: str | None
    required_approvals: int
    approvals: int
    decisions: list[DecisionView]
    created_at: str | None
    expires_at: str | None
    applied_at: str | None
    error: str | None
    card_digest: str
    diff: dict[str, Any]
    channel: str | None
    message_ts: str | None
    rules: list[dict[str, Any]]  # every approval rule that applies: {when, why, required_approvals, approvers, ...}
    rule: dict[str, Any] | None  # the strictest of them (the most approvals), or None
    evaluation: EvaluationView
    canary: dict[str, Any] | None  # {percent, bake_seconds, started_at, ended_at} of a request with a canary


class CanaryView(TypedDict):
    """A canary as people see it: the request it belongs to, its split, bake, figures, what the rules make of them."""

    request_id: int
    model: str
    candidate: str
    base: str | None
    state: str  # the request's: applying, canary, applied (promoted), rolled_back, failed
    running: bool
    percent: int
    bake_seconds: int
    started_at: str | None
    bake_until: str | None
    ended_at: str | None
    ended_by: str | None
    why: str | None
    split: dict[str, int]
    figures: dict[str, Any] | None
    verdict: dict[str, str] | None  # {action, why} while it runs: bake, wait, rollback, promote
    figures_unavailable: str | None  # why the backend's figures could not be read at the last look, if they could not
    limits: dict[str, Any]
    backend: str
    channel: str | None
    card_digest: str
    error: str | None


class ApplyView(RequestView):
    """apply's promotion request, with the model file(s) whose isDefault it asks for."""

    model_files: list[str]



class DefaultAt(TypedDict, total=False):
    """`audit MODEL --at T`: the default then, the event that made it so, who asked and approved, from what."""

    model: str
    at: str | None
    version: str | None
    since: str | None
    how: str
    event_seq: int
    requested_by: str | None
    approved_by: list[str]
    job_id: str
    args: list[str]
    program: dict[str, Any]
    trained_by: str
    metrics: dict[str, Any]
    split: dict[str, int]  # the default's traffic by version at that time (a canary's share included)
    canary_request: int | None  # the promotion request whose canary split it, if one did


class GateRefusal(TypedDict):
    """Why a nightly retrain was not put up for review: the gate's metric, the candidate's and the default's values
    (numbers, "NaN"/"Infinity" strings, or None when missing), their delta and the gate's min_delta."""

    metric: str
    min_delta: float
    base_version: str | None
    candidate: Any
    base: Any
    delta: float | None
    direction: str | None  # "higher" or "lower" is better
    why: str


class ScheduleView(TypedDict):
    model: str
    cron: str
    timezone: str
    args: list[str]
    enabled: bool
    last_run_at: str | None
    updated_by: str
    next_run_at: str | None


class Served(TypedDict):
    model: str
    version: str


class Side(TypedDict, total=False):
    """One version's answers in a comparison, or why it gave none."""

    version: str
    role: str  # "candidate" or "default"
    predictions: list[Any]
    error: str


class Compared(TypedDict):
    """The same instances answered by a version and by the model's default, side by side."""

    model: str
    instances: list[Any]
    candidate: Side
    base: Side
    agreement: float | None


class Pulled(TypedDict):
    """A version's SavedModel copied for local use: where, how much, and what it takes and gives."""

    model: str
    version: str
    path: str
    files: int
    bytes: int
    signature: dict[str, Any]
    source: str


class PulledArchive(TypedDict):
    """A pulled version as one .tar.gz in memory, for a chat upload (no folder is left behind)."""

    model: str
    version: str
    path: None
    files: int
    bytes: int
    signature: dict[str, Any]
    source: str
    filename: str
    data: bytes

class LiteCheck(TypedDict):
    """How a TensorFlow Lite copy was checked against its SavedModel when it was made."""

    instances: int
    on: str  # the evaluation data's URI, or "test values built from the signature"
    max_abs_diff: float  # over float outputs
    tolerance: str
    outputs: dict[str, Any]  # per output: max_abs_diff (floats) or mismatches (0 for exact outputs)


class PulledLite(TypedDict):
    """A version converted to one TensorFlow Lite file and checked: in a folder (CLI) or in memory (chat)."""

    model: str
    version: str
    format: str
    path: str | None
    filename: str
    bytes: int
    signature: dict[str, Any]
    source: str
    check: LiteCheck
    data: NotRequired[bytes]


class SignedUrls(TypedDict):
    """Time-limited URLs to a version's files in Cloud Storage (the SavedModel's files, or its .tflite)."""

    model: str
    version: str
    format: str
    expires_in: int  # seconds
    expires_at: str
    urls: list[dict[str, str]]  # {"path": relative path or file name, "uri": gs://..., "url": signed}
    uploaded: bool  # tflite: converted and uploaded now (False: the copy already there was reused)
    check: NotRequired[LiteCheck]


def job_view(j: Job) -> JobView:
    return {
        "job_id": j.job_id, "model": j.model, "state": j.state, "module": j.module, "args": list(j.args or []),
        "train_path": j.train_path, "requested_by": j.requested_by, "created_at": iso(j.created_at),
        "started_at": iso(j.started_at), "ended_at": iso(j.ended_at), "error": j.error,
        "version": j.version_name, "package_uris": list(j.package_uris or []), "package_sha256": j.package_sha256,
        "region": j.region, "scale_tier": j.scale_tier, "workers": j.workers,
    }


def version_view(v: Version) -> VersionView:
    return {
        "model": v.model, "name": v.name, "job_id": v.job_id, "deployment_uri": v.deployment_uri,
        "created_at": iso(v.created_at), "trained_by": v.trained_by, "program": v.program,
        "args": list(v.args or []), "metrics": v.metrics or {}, "signature": v.signature or {}, "job": v.job or {},
        "digest": v.digest,
    }


def request_view(r: PromotionRequest, approvals: Iterable[Approval] = ()) -> RequestView:
    decisions: list[DecisionView] = [
        {"user": a.approver, "decision": a.decision, "reason": a.reason, "at": iso(a.created_at)} for a in approvals
    ]
    return {
        "id": r.id, "model": r.model, "kind": r.kind, "candidate": r.candidate_version, "base": r.base_version,
        "state": r.state, "requested_by": r.requested_by, "reason": r.reason, "required_approvals":
        r.required_approvals, "approvals": sum(1 for d in decisions if d["decision"] == "approve"),
        "decisions": decisions, "created_at": iso(r.created_at), "expires_at": iso(r.expires_at),
        "applied_at": iso(r.applied_at), "error": r.error, "card_digest": r.card_digest, "diff": r.diff,
        "channel": r.channel, "message_ts": r.message_ts, "rules": list(r.rules or []), "rule": strictest_rule(r.rules),
        "canary": None if r.canary_percent is None else {
            "percent": r.canary_percent, "bake_seconds": r.canary_bake_seconds, "started_at": iso(r.canary_started_at),
            "ended_at": iso(r.canary_ended_at), "why": r.canary_why},
        "evaluation": evaluation_view(r.evaluation),
    }


EVALUATION_KEYS = ("state", "data", "label", "output", "rows", "kind", "candidate", "base", "agreement",
                   "disagreements", "error", "hint", "job_id", "started_at", "ended_at", "gate")


def evaluation_view(stored: dict[str, Any] | None) -> EvaluationView:
    """A request's stored evaluation with every key present (a request from before evaluations: not evaluated)."""
    stored = stored or {"state": "not_configured", "hint": "this request was opened before evaluations were kept"}
    view: dict[str, Any] = {key: stored.get(key) for key in EVALUATION_KEYS}
    view["disagreements"] = list(stored.get("disagreements") or [])
    return cast(EvaluationView, view)


def strictest_rule(rules: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """The stored rule asking the most approvals (the first on a tie): what a card and `show --json` name."""
    return max(rules or [], key=lambda rule: rule["required_approvals"], default=None)


class LastTraining(TypedDict):
    job_id: str
    state: str
    created_at: str | None
    ended_at: str | None


class ModelSummary(TypedDict):
    """A model at a glance: its default version and its last training."""

    model: str
    default: str | None
    last_training: LastTraining | None


class FailureView(TypedDict):
    """A failed training or apply: what, of which model, when, why."""

    kind: str  # training | apply
    model: str
    subject: str  # the job id, or the promotion request's id (#N)
    at: str | None
    error: str | None


class HomeView(TypedDict):
    """One person's Home: the requests waiting for their decision, each model, the failures since `since`."""

    user: str
    waiting: list[RequestView]
    waiting_more: int  # waiting requests past the ones listed
    models: list[ModelSummary]
    failures: list[FailureView]
    since: str | None
