"""The audit trail: tampering found and located, point-in-time answers, filters and their bad input."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from conftest import expose_two_versions
from sqlalchemy import text

from model_registry.domain import names
from model_registry.domain.errors import InvalidInput, NotFound


def _unguard(reg: Any) -> None:
    """What an attacker with database access does first: switch the append-only triggers off."""
    with reg.db.engine.begin() as conn:
        if reg.db.engine.dialect.name == "postgresql":
            conn.execute(text("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only"))
        else:
            conn.execute(text("DROP TRIGGER audit_events_no_update"))
            conn.execute(text("DROP TRIGGER audit_events_no_delete"))


def _sql(reg: Any, *statements: str) -> None:
    with reg.db.engine.begin() as conn:
        for stmt in statements:
            conn.execute(text(stmt))


@pytest.fixture
def audited(make_registry: Any, db_url: str, trained: dict) -> Any:
    reg = expose_two_versions(make_registry(db_url, env={"STARCHART_AUDIT_KEY": "test-key"}), trained)
    cand = reg.versions.of_model("iris")["versions"][0]["name"]
    req = reg.promotions.promote("iris", cand, "U_REQ")
    reg.promotions.decide(req["id"], "U_OK", True)
    reg.promotions.apply_request(req["id"])
    assert reg.audit.verify().ok
    return reg


def test_deleted_row_is_found(audited: Any) -> None:
    _unguard(audited)
    _sql(audited, "DELETE FROM audit_events WHERE seq = 4")
    result = audited.audit.verify()
    assert not result.ok and result.first_bad_seq == 4 and "missing" in result.problem


def test_swapped_rows_are_found(audited: Any) -> None:
    _unguard(audited)
    _sql(audited, "UPDATE audit_events SET seq = -5 WHERE seq = 5", "UPDATE audit_events SET seq = 5 WHERE seq = 6",
         "UPDATE audit_events SET seq = 6 WHERE seq = -5")
    result = audited.audit.verify()
    assert not result.ok and result.first_bad_seq == 5


def test_forged_row_with_a_valid_looking_hash_is_caught_by_the_checkpoint(audited: Any) -> None:
    from model_registry.adapters import audit_log as audit
    from model_registry.adapters.records import AuditEvent

    cp = audited.audit.checkpoint()
    # the attacker rewrites history from event 3 on, recomputing every hash with the public algorithm
    _unguard(audited)
    with audited.db.sessions() as s:
        events = [audit.hashed_fields(e) for e in s.query(AuditEvent).order_by(AuditEvent.seq)]
    forged = dict(events[2], actor="U_MALLORY")
    _sql(audited, "DELETE FROM audit_events WHERE seq >= 3")
    with audited.db.sessions() as s:
        prev = s.get(AuditEvent, 2).hash
    rows = [forged, *events[3:]]
    with audited.db.engine.begin() as conn:
        for fields in rows:
            fields = dict(fields, prev_hash=prev)
            digest = audit.event_hash(fields)
            conn.execute(text(
                "INSERT INTO audit_events (seq, created_at, action, actor, actor_name, model, version, request_id, "
                "job_id, channel, message_ts, details, prev_hash, hash) VALUES (:seq, :created_at, :action, :actor, "
                ":actor_name, :model, :version, :request_id, :job_id, :channel, :message_ts, :details, :prev_hash, "
                ":hash)"), {**fields, "created_at": fields["created_at"].replace("T", " "), "hash": digest})
            prev = digest
        conn.execute(text("UPDATE audit_head SET hash = :h"), {"h": prev})
    assert audited.audit.verify(checkpoints=[]).ok, "without a copy of the head, a full rewrite is invisible"
    result = audited.audit.verify()
    assert not result.ok and "rewritten" in result.problem and result.first_bad_seq == cp["count"]


def test_truncated_tail_below_the_checkpoint_is_found(audited: Any) -> None:
    cp = audited.audit.checkpoint()
    _unguard(audited)
    _sql(audited, f"DELETE FROM audit_events WHERE seq > {cp['count'] - 3}",
         f"UPDATE audit_head SET seq = {cp['count'] - 3}, hash = (SELECT hash FROM audit_events WHERE seq = "
         f"{cp['count'] - 3})")
    result = audited.audit.verify()
    assert not result.ok and "removed" in result.problem


def test_forged_checkpoint_is_refused(audited: Any) -> None:
    cp = audited.audit.checkpoint()
    result = audited.audit.verify(checkpoints=[dict(cp, count=cp["count"] + 5)])
    assert not result.ok and "bad signature" in result.problem


def test_default_at_a_point_in_time(audited: Any) -> None:
    reg = audited
    versions = [v["name"] for v in reg.versions.of_model("iris")["versions"]]
    now = reg.audit.default_at("iris", names.utcnow() + timedelta(seconds=1))
    assert now["version"] == versions[0] and now["how"] == "promotion.applied"
    assert now["requested_by"] == "U_REQ" and now["approved_by"] == ["U_OK"]
    assert now["job_id"].startswith("iris_") and now["args"] and now["program"]["sha256"]
    from model_registry.adapters.records import AuditEvent

    with reg.db.sessions() as s:
        exact = {e.action: e.created_at for e in s.query(AuditEvent).filter(
            AuditEvent.action.in_(["default.initialized", "promotion.applied"]))}
    assert reg.audit.default_at("iris", exact["default.initialized"])["version"] == versions[1]
    before = reg.audit.default_at("iris", exact["promotion.applied"] - timedelta(microseconds=1))
    assert before["version"] == versions[1] and before["approved_by"] == []
    with pytest.raises(NotFound):
        reg.audit.default_at("iris", names.utcnow() - timedelta(days=365))


def test_filters_and_bad_input(audited: Any) -> None:
    reg = audited
    assert [e["action"] for e in reg.audit.events(model="iris", action="promotion.applied")] == ["promotion.applied"]
    assert all(e["actor"] == "U_REQ" for e in reg.audit.events(actor="U_REQ"))
    page1 = reg.audit.events(limit=3)
    page2 = reg.audit.events(limit=3, before_seq=page1[-1]["seq"])
    assert len(page1) == 3 and page2[0]["seq"] < page1[-1]["seq"]
    for bad in (0, -1, 10_000_000):
        with pytest.raises(InvalidInput):
            reg.audit.events(limit=bad)
    with pytest.raises(InvalidInput):
        reg.audit.events(action="promotion.done")
    with pytest.raises(NotFound):
        reg.audit.events(actor="U_NOBODY")
    with pytest.raises(InvalidInput):
        names.parse_time("last tuesday")
    with pytest.raises(InvalidInput):
        reg.audit.events(since=names.utcnow(), until=names.utcnow() - timedelta(days=1))


def test_csv_export_pages_through_everything(make_registry: Any, sqlite_url: str) -> None:

    reg = make_registry(sqlite_url)
    with reg.db.unit_of_work() as s:
        for i in range(2345):
            reg.audit_log.append(s, "schedule.changed", "U_T", details={"i": i})
    every = list(reg.audit.all_events(actor="U_T"))
    assert len(every) == 2345 and [e["seq"] for e in every] == sorted((e["seq"] for e in every), reverse=True)
    assert len(reg.audit.events(actor="U_T", limit=1000)) == 1000


def test_an_event_rolls_back_with_its_transaction_and_the_chain_stays_gapless(make_registry: Any, db_url: str
                                                                               ) -> None:
    from model_registry.adapters.audit_log import AuditLog

    reg, log = make_registry(db_url), AuditLog()
    with reg.db.unit_of_work() as s:
        first = log.append(s, "schedule.changed", "U_T", model="iris")
    with pytest.raises(LookupError):
        with reg.db.unit_of_work() as s:
            log.append(s, "schedule.changed", "U_T", model="iris")
            raise LookupError("the state change fails after its event was appended: both roll back")
    with reg.db.unit_of_work() as s:
        second = log.append(s, "schedule.changed", "U_T", model="iris", details={"n": 2})
    assert (first["seq"], second["seq"]) == (1, 2) and second["prev_hash"] == first["hash"]
    with reg.db.engine.connect() as conn:
        events = log.events(conn, model="iris")
        assert [e["seq"] for e in events] == [2, 1] and events[0]["details"] == {"n": 2}
        assert events[0]["at"].endswith("Z") and log.has_actor(conn, "U_T") and not log.has_actor(conn, "U_NOBODY")
    with reg.db.reads() as s:
        assert log.verify(s).ok and log.checkpoint(s, None)["count"] == 2


def test_an_append_outside_a_write_transaction_is_refused(make_registry: Any, db_url: str) -> None:
    from model_registry.adapters.audit_log import AuditLog

    reg = make_registry(db_url)
    with reg.db.reads() as s, pytest.raises(RuntimeError, match="write transaction"):
        AuditLog().append(s, "schedule.changed", "U_T")
    with pytest.raises(ValueError, match="unknown audit action"), reg.db.unit_of_work() as s:
        AuditLog().append(s, "schedule.deleted", "U_T")
    assert reg.audit.events(limit=5) == []
