"""Records as the plain dicts every adapter renders (CLI tables, Slack cards, JSON)."""

from __future__ import annotations

from typing import Any, Iterable

from model_registry.adapters.records import (
    Approval,
    Job,
    PromotionRequest,
    Version,
)
from model_registry.domain.names import iso


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
