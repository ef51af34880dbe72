"""Invariants under concurrency, with several processes on one database (PostgreSQL and SQLite)."""

from __future__ import annotations

import multiprocessing as mp
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import update

from model_registry.adapters.records import PromotionRequest
from model_registry.config import ProjectConfig, Settings
from model_registry.domain import names
from model_registry.domain.errors import Refused


def _registry(home: str, db_url: str) -> Any:
    from model_registry.bootstrap import bootstrap

    settings = Settings.from_env({"STARCHART_HOME": home, "DATABASE_URL": db_url,
                                  "STARCHART_CONFIG": str(Path(home) / "starchart.yaml")})
    return bootstrap(settings, ProjectConfig.load(settings.config_path))


def _decide_and_apply(args: tuple[str, str, int, str, Any]) -> str:
    home, db_url, request_id, user, barrier = args
    reg = _registry(home, db_url)
    barrier.wait()
    outcome = "refused"
    try:
        req = reg.promotions.decide(request_id, user, True)
        outcome = "granted"
    except Refused as exc:
        outcome = f"refused:{exc.reason}"
        req = reg.promotions.get(request_id)
    if req["state"] in ("approved", "failed"):
        reg.promotions.apply_request(request_id, actor=user)
    reg.db.engine.dispose()
    return outcome


def _reconcile(args: tuple[str, str, Any]) -> list[int]:
    home, db_url, barrier = args
    reg = _registry(home, db_url)
    barrier.wait()
    settled = [r["id"] for r in reg.promotions.reconcile()]
    reg.db.engine.dispose()
    return settled


def _append_events(args: tuple[str, str, int]) -> None:

    home, db_url, n = args
    reg = _registry(home, db_url)
    for i in range(n):
        with reg.db.unit_of_work() as s:
            reg.audit_log.append(s, "schedule.changed", f"proc-{mp.current_process().name}", details={"i": i})
    reg.db.engine.dispose()


def test_concurrent_clicks_give_one_decision_per_approver_and_one_application(two_versions: Any) -> None:
    reg = two_versions
    cand = reg.versions.of_model("iris")["versions"][0]["name"]
    req = reg.promotions.promote("iris", cand, "U_REQ")
    home, url = str(reg.settings.home), reg.settings.database_url
    # the same approver double-clicks from 3 replicas; two other approvers click at the same time
    users = ["U_A", "U_A", "U_A", "U_B", "U_C"]
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(len(users))
        with ctx.Pool(len(users)) as pool:
            outcomes = pool.map(_decide_and_apply, [(home, url, req["id"], u, barrier) for u in users])
    final = reg.promotions.get(req["id"])
    assert final["state"] == "applied"
    assert reg.versions.default("iris") == cand
    per_user = [d["user"] for d in final["decisions"]]
    assert len(per_user) == len(set(per_user)), "one decision per approver"
    assert outcomes.count("granted") == 1, outcomes  # required_approvals is 1: the first wins, the rest are closed
    applied = [e for e in reg.audit.events(limit=1000) if e["action"] == "promotion.applied"]
    applying = [e for e in reg.audit.events(limit=1000) if e["action"] == "promotion.applying"]
    assert len(applied) == 1 and len(applying) == 1, "one application per request"
    assert reg.audit.verify().ok


def test_concurrent_appends_keep_one_chain(make_registry: Any, db_url: str) -> None:
    reg = make_registry(db_url)
    home, url = str(reg.settings.home), reg.settings.database_url
    ctx = mp.get_context("spawn")
    with ctx.Pool(4) as pool:
        pool.map(_append_events, [(home, url, 250)] * 4)
    result = reg.audit.verify()
    assert result.ok and result.events == 1000, result


def test_concurrent_reconcilers_settle_an_interrupted_apply_once(two_versions: Any) -> None:
    """The backend switched, then the process died holding a live lease: four processes reconcile at once."""
    reg = two_versions
    cand = reg.versions.of_model("iris")["versions"][0]["name"]
    req = reg.promotions.promote("iris", cand, "U_REQ")
    reg.promotions.decide(req["id"], "U_OK", True)
    reg.backend.set_default("iris", cand, None)
    with reg.db.unit_of_work() as s:
        s.execute(update(PromotionRequest).where(PromotionRequest.id == req["id"]).values(
            state="applying", apply_started_at=names.utcnow(), apply_owner="host-gone:4242:dead",
            apply_lease_until=names.utcnow() + timedelta(minutes=10)))
    home, url = str(reg.settings.home), reg.settings.database_url
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(4)
        with ctx.Pool(4) as pool:
            settled = pool.map(_reconcile, [(home, url, barrier)] * 4)
    assert sorted(settled, key=len) == [[], [], [], [req["id"]]], "one reconciler settled it, the others found it done"
    assert reg.promotions.get(req["id"])["state"] == "applied" and reg.versions.default("iris") == cand
    events = [e["action"] for e in reg.audit.events(limit=1000) if e["request_id"] == req["id"]]
    assert events.count("promotion.applied") == 1 and events.count("promotion.reconciled") == 1, events
    assert reg.audit.verify().ok
