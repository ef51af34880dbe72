"""The core workflow on SQLite and PostgreSQL: expose, diff, promotion requests, approvals, apply, audit."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import replay_args, train_and_wait, with_backend
from sqlalchemy import select, text, update

from model_registry.adapters.records import AuditEvent, PromotionRequest
from model_registry.domain import names
from model_registry.domain.errors import ArtifactError, InvalidInput, NotFound, Refused


def actions(reg: Any, **filters: Any) -> list[str]:
    return [e["action"] for e in reversed(reg.audit.events(limit=1000, **filters))]


def newest_and_default(reg: Any) -> tuple[str, str]:
    data = reg.versions.of_model("iris")
    return data["versions"][0]["name"], data["default"]


def test_expose_records_version_with_signature_metrics_and_program(two_versions: Any, trained: dict) -> None:
    reg = two_versions
    data = reg.versions.of_model("iris")
    names_ = [v["name"] for v in data["versions"]]
    assert all(n.startswith("v") and len(n) == 15 for n in names_)
    assert data["default"] == names_[-1], "the first version of a new model becomes the default"
    view = reg.versions.diff("iris", names_[0], names_[1])
    assert view["parameters"] == [{"name": "epochs", "base": "2", "candidate": "4"}] or any(
        p["name"] == "epochs" for p in view["parameters"])
    with reg.db.sessions() as s:
        from model_registry.adapters.records import Version

        v = s.execute(select(Version).where(Version.name == names_[0])).scalar_one()
        assert set(v.signature["inputs"]) == {"sepal_length", "sepal_width", "petal_length", "petal_width"}
        assert v.signature["inputs"]["sepal_length"] == {"dtype": "DT_FLOAT", "shape": [-1],
                                                         "tensor": "serving_default_sepal_length:0"}
        assert set(v.metrics) >= {"accuracy", "loss"}
        assert v.program["module"] == "trainer.task" and len(v.program["sha256"]) == 64
        assert v.program["package_uris"][0].endswith(".tar.gz") and "/packages/" in v.program["package_uris"][0]
        assert v.deployment_uri.endswith("/model/")
        assert v.trained_by == "U_TRAINER"
    # StarChart's model file, plus signature and metrics
    doc = yaml.safe_load((reg.config.model_files / "iris.yaml").read_text())
    assert doc["model"] == "iris"
    entries = {e["version"]["name"]: e for e in doc["versions"]}
    default_entry = entries[data["default"]]
    assert default_entry["version"]["isDefault"] is True and set(default_entry) == {"version"}  # StarChart's place
    job = default_entry["version"]["job"]
    assert job["jobId"].startswith("iris_") and job["state"] == "SUCCEEDED"
    assert set(job["trainingInput"]) == {"packageUris", "pythonModule", "args", "region", "scaleTier"}
    assert {"createTime", "deploymentUri", "signature", "metrics"} <= set(default_entry["version"])
    # a second expose finds nothing new; the job record points at its version
    assert reg.versions.expose("iris", "U_TRAINER") == {"exposed": [], "errors": []}
    assert {j["version"] for j in reg.jobs.state("iris")} == set(names_)


def test_full_promotion_flow_with_refusals_and_audit(two_versions: Any) -> None:
    reg = two_versions
    cand, base = newest_and_default(reg)
    req = reg.promotions.promote("iris", cand, "U_REQ", reason="better accuracy")
    assert req["state"] == "open" and req["base"] == base and req["candidate"] == cand
    assert "metrics" in req["diff"] and req["diff"]["program"]["candidate"]
    with pytest.raises(Refused) as self_req:
        reg.promotions.decide(req["id"], "U_REQ", True)
    assert self_req.value.reason == "self_approval"
    with pytest.raises(Refused) as self_train:
        reg.promotions.decide(req["id"], "U_TRAINER", True)
    assert self_train.value.reason == "self_approval"
    assert reg.versions.default("iris") == base
    decided = reg.promotions.decide(req["id"], "U_OK", True)
    assert decided["state"] == "approved"
    assert reg.versions.default("iris") == base, "approval alone does not switch; apply does"
    applied = reg.promotions.apply_request(req["id"], actor="U_OK")
    assert applied["state"] == "applied"
    assert reg.versions.default("iris") == cand
    assert reg.backend.current_default("iris") == cand
    doc = yaml.safe_load((reg.config.model_files / "iris.yaml").read_text())
    assert [e["version"]["name"] for e in doc["versions"] if e["version"]["isDefault"]] == [cand]
    seq = actions(reg, model="iris")
    assert seq[-6:] == ["approval.refused", "approval.refused", "approval.granted", "promotion.approved",
                        "promotion.applying", "promotion.applied"]
    assert reg.audit.verify().ok
    # one application per request: applying again changes nothing
    again = reg.promotions.apply_request(req["id"])
    assert again["state"] == "applied" and actions(reg).count("promotion.applied") == 1
    with pytest.raises(Refused) as closed:
        reg.promotions.decide(req["id"], "U_LATE", True)
    assert closed.value.reason == "closed"


def test_approvers_groups_and_required_approvals(make_registry: Any, db_url: str, trained: dict) -> None:
    reg = make_registry(db_url, defaults={"approvers": ["U_ALICE", "S0REVIEW"], "required_approvals": 2},
                        usergroups={"S0REVIEW": ["U_BOB"]})
    for src in (trained["iris_a"], trained["iris_b"]):
        train_and_wait(reg, "iris", "U_TRAINER", replay_args(src))
    reg.versions.expose("iris", "U_TRAINER")
    cand, base = newest_and_default(reg)
    req = reg.promotions.promote("iris", cand, "U_REQ")
    with pytest.raises(Refused) as outsider:
        reg.promotions.decide(req["id"], "U_MALLORY", True)
    assert outsider.value.reason == "not_approver" and "approver" in outsider.value.message
    assert reg.promotions.decide(req["id"], "U_ALICE", True)["state"] == "open"
    with pytest.raises(Refused) as twice:
        reg.promotions.decide(req["id"], "U_ALICE", True)
    assert twice.value.reason == "duplicate"
    assert reg.promotions.apply_request(req["id"])["state"] == "open"  # one of two approvals: nothing applied
    assert reg.versions.default("iris") == base
    assert reg.promotions.decide(req["id"], "U_BOB", True)["state"] == "approved"  # through the user group
    assert reg.promotions.apply_request(req["id"])["state"] == "applied"
    reasons = [e["details"].get("reason") for e in reg.audit.events(action="approval.refused")]
    assert sorted(reasons) == ["duplicate", "not_approver"]


def test_reject_needs_reason_and_closes_request(two_versions: Any) -> None:
    reg = two_versions
    cand, base = newest_and_default(reg)
    req = reg.promotions.promote("iris", cand, "U_REQ")
    with pytest.raises(InvalidInput):
        reg.promotions.decide(req["id"], "U_OK", False, reason="  ")
    rejected = reg.promotions.decide(req["id"], "U_OK", False, reason="loss went up")
    assert rejected["state"] == "rejected" and rejected["decisions"][0]["reason"] == "loss went up"
    assert reg.promotions.apply_request(req["id"])["state"] == "rejected"
    assert reg.versions.default("iris") == base
    assert reg.audit.events(action="promotion.rejected")[0]["details"] == {"reason": "loss went up"}


def test_expired_request_is_refused(two_versions: Any) -> None:
    reg = two_versions
    cand, _ = newest_and_default(reg)
    req = reg.promotions.promote("iris", cand, "U_REQ")
    with reg.db.unit_of_work() as s:
        s.execute(update(PromotionRequest).where(PromotionRequest.id == req["id"])
                  .values(expires_at=names.utcnow() - timedelta(seconds=1)))
    with pytest.raises(Refused) as exc:
        reg.promotions.decide(req["id"], "U_OK", True)
    assert exc.value.reason == "expired"
    assert reg.promotions.get(req["id"])["state"] == "expired"


def test_stale_card_is_refused_when_default_moved(two_versions: Any, trained: dict) -> None:
    reg = two_versions
    train_and_wait(reg, "iris", "U_TRAINER", replay_args(trained["iris_a"], "--epochs=9"))
    reg.versions.expose("iris", "U_TRAINER")
    versions = [v["name"] for v in reg.versions.of_model("iris")["versions"]]
    newest, middle = versions[0], versions[1]
    first = reg.promotions.promote("iris", middle, "U_REQ")
    second = reg.promotions.promote("iris", newest, "U_REQ")
    reg.promotions.decide(first["id"], "U_OK", True)
    reg.promotions.apply_request(first["id"])
    with pytest.raises(Refused) as exc:
        reg.promotions.decide(second["id"], "U_OK", True)
    assert exc.value.reason == "stale" and "default moved" in exc.value.message
    assert reg.promotions.get(second["id"])["state"] == "stale"
    assert reg.versions.default("iris") == middle
    # a click whose digest or message is not the request's own card is refused and changes nothing
    third = reg.promotions.promote("iris", newest, "U_REQ")
    reg.promotions.set_card(third["id"], "C1", "111.222")
    with pytest.raises(Refused) as digest:
        reg.promotions.decide(third["id"], "U_OK", True, card_digest="0" * 64)
    assert digest.value.reason == "card_mismatch"
    with pytest.raises(Refused) as elsewhere:
        reg.promotions.decide(third["id"], "U_OK", True, card_digest=third["card_digest"], channel="C1", message_ts="999.0")
    assert elsewhere.value.reason == "card_mismatch"
    with pytest.raises(Refused) as other_model:  # a button naming another model than the request's
        reg.promotions.decide(third["id"], "U_OK", True, card_digest=third["card_digest"], model="sentiment",
                              channel="C1", message_ts="111.222")
    assert other_model.value.reason == "model_mismatch" and "names sentiment" in other_model.value.message
    refused = reg.audit.events(action="request.refused")[0]
    assert refused["details"] == {"reason": "model_mismatch", "message": f"button names sentiment but #{third['id']} is iris"}
    assert refused["actor"] == "U_OK" and refused["model"] == "iris" and refused["request_id"] == third["id"]
    assert reg.promotions.get(third["id"])["state"] == "open"
    assert reg.promotions.decide(third["id"], "U_OK", True, card_digest=third["card_digest"], model="iris",
                                 channel="C1", message_ts="111.222")["state"] == "approved"


def test_apply_from_model_file_and_rollback(two_versions: Any) -> None:
    reg = two_versions
    cand, base = newest_and_default(reg)
    path = reg.config.model_files / "iris.yaml"
    with pytest.raises(InvalidInput):
        reg.promotions.apply("iris", "U_REQ")  # the file marks the current default: nothing to apply
    doc = yaml.safe_load(path.read_text())
    for entry in doc["versions"]:
        entry["version"]["isDefault"] = entry["version"]["name"] == cand
    path.write_text(yaml.safe_dump(doc))
    req = reg.promotions.apply("iris", "U_REQ", reason="as edited")
    assert req["kind"] == "apply" and req["candidate"] == cand
    reg.promotions.decide(req["id"], "U_OK", True)
    assert reg.promotions.apply_request(req["id"])["state"] == "applied"
    back = reg.promotions.rollback("iris", "U_REQ", reason="bad canary")
    assert back["kind"] == "rollback" and back["candidate"] == base
    reg.promotions.decide(back["id"], "U_OK", True)
    assert reg.promotions.apply_request(back["id"])["state"] == "applied"
    assert reg.versions.default("iris") == base
    with pytest.raises(InvalidInput):
        reg.promotions.rollback("iris", "U_REQ")  # back at the first default: nothing before it
    assert "rollback.requested" in actions(reg)


def test_bad_model_file_is_refused(two_versions: Any) -> None:
    reg = two_versions
    path = reg.config.model_files / "iris.yaml"
    path.write_text("versions: [unclosed")
    with pytest.raises(ArtifactError):
        reg.promotions.apply("iris", "U_REQ")
    doc = {"model": "iris", "versions": [{"version": {"name": "v1"}, "isDefault": True},
                                         {"version": {"name": "v2"}, "isDefault": True}]}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ArtifactError) as exc:
        reg.promotions.apply("iris", "U_REQ")
    assert "2 versions" in exc.value.message
    path.unlink()
    with pytest.raises(NotFound):
        reg.promotions.apply("iris", "U_REQ")


def test_starchart_json_model_file_is_read(two_versions: Any) -> None:
    reg = two_versions
    cand, _ = newest_and_default(reg)
    path = reg.config.model_files / "iris.yaml"
    path.unlink()
    (reg.config.model_files / "iris.json").write_text(
        '{"model": "iris", "versions": [{"version": {"name": "projects/p/models/iris/versions/%s", '
        '"isDefault": true}}]}' % cand)  # StarChart's files.dump: isDefault inside version
    assert reg.promotions.apply("iris", "U_REQ")["candidate"] == cand


class FailingBackend:
    """Wraps the local backend; set_default fails until told otherwise."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.fail = inner, True
        self.name, self.storage = inner.name, inner.storage

    def __getattr__(self, item: str) -> Any:
        return getattr(self.inner, item)

    def set_default(self, model: str, version: str, ref: Any) -> None:
        if self.fail:
            raise RuntimeError("503 backend unavailable")
        self.inner.set_default(model, version, ref)


def test_backend_failure_half_way_leaves_request_failed_then_retry(two_versions: Any) -> None:
    reg = two_versions
    reg = with_backend(reg, FailingBackend(reg.backend))
    cand, base = newest_and_default(reg)
    req = reg.promotions.promote("iris", cand, "U_REQ")
    reg.promotions.decide(req["id"], "U_OK", True)
    failed = reg.promotions.apply_request(req["id"])
    assert failed["state"] == "failed" and "503" in failed["error"]
    assert reg.versions.default("iris") == base and reg.backend.current_default("iris") == base
    assert actions(reg)[-2:] == ["promotion.applying", "promotion.failed"]
    reg.backend.fail = False
    assert reg.promotions.apply_request(req["id"])["state"] == "applied"
    assert reg.versions.default("iris") == cand


def test_reconcile_interrupted_apply(two_versions: Any) -> None:
    reg = two_versions
    cand, base = newest_and_default(reg)
    req = reg.promotions.promote("iris", cand, "U_REQ")
    reg.promotions.decide(req["id"], "U_OK", True)
    # the process died after committing 'applying' (before / after the backend call)
    with reg.db.unit_of_work() as s:
        s.execute(update(PromotionRequest).where(PromotionRequest.id == req["id"])
                  .values(state="applying", apply_started_at=names.utcnow() - timedelta(minutes=5)))
    assert reg.promotions.reconcile()[0]["state"] == "failed"
    assert reg.versions.default("iris") == base
    assert reg.promotions.apply_request(req["id"])["state"] == "applied"  # retry
    req2 = reg.promotions.rollback("iris", "U_REQ")
    reg.promotions.decide(req2["id"], "U_OK", True)
    reg.backend.set_default("iris", base, None)  # the backend switched, then the process died
    with reg.db.unit_of_work() as s:
        s.execute(update(PromotionRequest).where(PromotionRequest.id == req2["id"])
                  .values(state="applying", apply_started_at=names.utcnow() - timedelta(minutes=5)))
    assert reg.promotions.reconcile()[0]["state"] == "applied"
    assert reg.versions.default("iris") == base
    assert reg.audit.verify().ok


def test_state_change_and_audit_event_commit_together(two_versions: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = two_versions
    cand, _ = newest_and_default(reg)
    req = reg.promotions.promote("iris", cand, "U_REQ")
    real = reg.audit_log.append

    def broken(session: Any, action: str, *a: Any, **k: Any) -> Any:
        if action == "approval.granted":
            raise RuntimeError("disk full")
        return real(session, action, *a, **k)

    monkeypatch.setattr(reg.audit_log, "append", broken)  # the one audit log every use case was handed
    with pytest.raises(RuntimeError):
        reg.promotions.decide(req["id"], "U_OK", True)
    monkeypatch.setattr(reg.audit_log, "append", real)
    after = reg.promotions.get(req["id"])
    assert after["decisions"] == [] and after["state"] == "open", "no approval without its audit event"


def test_expose_refuses_corrupt_saved_model_and_keeps_good_ones(make_registry: Any, db_url: str,
                                                                 trained: dict) -> None:
    reg = make_registry(db_url)
    good = train_and_wait(reg, "iris", "U_T", replay_args(trained["iris_a"]))
    bad = train_and_wait(reg, "iris", "U_T", ["--corrupt-model"])
    assert good["state"] == bad["state"] == "SUCCEEDED"
    result = reg.versions.expose("iris", "U_T")
    assert [v["job_id"] for v in result["exposed"]] == [good["job_id"]]
    assert result["errors"][0]["job_id"] == bad["job_id"] and "SavedModel" in result["errors"][0]["error"]
    assert len(reg.versions.of_model("iris")["versions"]) == 1


def test_unknown_names_get_suggestions(two_versions: Any) -> None:
    reg = two_versions
    with pytest.raises(NotFound) as model:
        reg.versions.of_model("irs")
    assert "did you mean iris" in model.value.hint
    with pytest.raises(NotFound) as version:
        reg.promotions.promote("iris", "v20990101000000", "U_REQ")
    assert "versions" in version.value.hint
    names = [v["name"] for v in reg.versions.of_model("iris")["versions"]]
    newest = names[0]
    # one digit off the newest, and no version's name (two versions made a second apart can be one digit off)
    typo_name = next(newest[:-1] + d for d in "0123456789" if newest[:-1] + d not in names)
    with pytest.raises(NotFound) as typo:  # a close name is suggested, and the recent ones are listed all the same
        reg.promotions.promote("iris", typo_name, "U_REQ")
    assert f"did you mean {newest}?" in typo.value.hint or "did you mean v" in typo.value.hint
    assert "recent versions:" in typo.value.hint
    for bad in ("Iris", "../iris", "a" * 64, "1iris", ""):
        with pytest.raises(InvalidInput):
            reg.versions.of_model(bad)


def test_audit_rows_are_append_only(two_versions: Any) -> None:
    reg = two_versions
    with pytest.raises(PermissionError):
        with reg.db.unit_of_work() as s:
            s.execute(update(AuditEvent).where(AuditEvent.seq == 1).values(actor="mallory"))
    with pytest.raises(PermissionError):
        with reg.db.unit_of_work() as s:
            event = s.get(AuditEvent, 1)
            event.actor = "mallory"
    with pytest.raises(PermissionError):
        with reg.db.unit_of_work() as s:
            s.delete(s.get(AuditEvent, 1))
    # below the ORM, the database itself refuses (trigger)
    from sqlalchemy.exc import DBAPIError

    for stmt in ("UPDATE audit_events SET actor = 'mallory' WHERE seq = 1", "DELETE FROM audit_events"):
        with pytest.raises(DBAPIError):
            with reg.db.engine.begin() as conn:
                conn.execute(text(stmt))
    assert reg.audit.verify().ok


def test_audit_verify_finds_edits(two_versions: Any) -> None:
    reg = two_versions
    assert reg.audit.verify().ok
    with reg.db.engine.begin() as conn:  # an attacker with database access drops the guard first
        if reg.db.engine.dialect.name == "postgresql":
            conn.execute(text("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only"))
        else:
            conn.execute(text("DROP TRIGGER audit_events_no_update"))
        conn.execute(text("UPDATE audit_events SET details = :d WHERE seq = 3"), {"d": '{"forged":1}'})
    result = reg.audit.verify()
    assert not result.ok and result.first_bad_seq == 3 and "altered" in result.problem


def test_same_second_trainings_do_not_collide(make_registry: Any, sqlite_url: str, trained: dict,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    reg = make_registry(sqlite_url)
    monkeypatch.setattr(names, "timestamp", lambda at=None: "20261127120000")
    first = reg.jobs.train("iris", "U_T", args=replay_args(trained["iris_a"]))
    second = reg.jobs.train("iris", "U_T", args=replay_args(trained["iris_a"]))
    assert first["job_id"] == "iris_20261127120000" and second["job_id"] == "iris_20261127120001"
    assert first["train_path"] != second["train_path"]
    for job in (first, second):
        assert reg.jobs.wait(job["job_id"])["state"] == "SUCCEEDED"


def test_operators_policy(make_registry: Any, sqlite_url: str, trained: dict) -> None:
    reg = make_registry(sqlite_url, defaults={"operators": ["U_OPS"]})
    with pytest.raises(Refused) as exc:
        reg.jobs.train("iris", "U_RANDOM", args=replay_args(trained["iris_a"]))
    assert exc.value.reason == "not_operator"
    assert reg.jobs.state("iris") == []


def test_train_path_substitution_and_defaults_from_config(make_registry: Any, sqlite_url: str,
                                                          trained: dict, tmp_path: Path) -> None:
    reg = make_registry(sqlite_url, models={"iris": {"args": [f"--source={trained['iris_a']}",
                                                              "--job-dir=TRAIN_PATH"]}})
    job = reg.jobs.train("iris", "U_T")
    assert job["args"][1] == f"--job-dir={job['train_path']}"
    assert reg.jobs.wait(job["job_id"])["state"] == "SUCCEEDED"


def test_one_apply_per_model_at_a_time(two_versions: Any, trained: dict) -> None:
    """Two approved requests on the same base: the second waits for the first, then is stale."""
    reg = two_versions
    train_and_wait(reg, "iris", "U_TRAINER", replay_args(trained["iris_a"], "--epochs=9"))
    reg.versions.expose("iris", "U_TRAINER")
    newest, middle = [v["name"] for v in reg.versions.of_model("iris")["versions"]][:2]
    first, second = reg.promotions.promote("iris", middle, "U_REQ"), reg.promotions.promote("iris", newest, "U_REQ")
    reg.promotions.decide(first["id"], "U_OK", True)
    reg.promotions.decide(second["id"], "U_OK", True)
    with reg.db.unit_of_work() as s:  # the first is in the middle of its backend call, in another process
        s.execute(update(PromotionRequest).where(PromotionRequest.id == first["id"])
                  .values(state="applying", apply_started_at=names.utcnow(), apply_owner="host-b:202:bb22",
                          apply_lease_until=names.utcnow() + timedelta(minutes=1)))
    with pytest.raises(Refused) as busy:
        reg.promotions.apply_request(second["id"])
    assert busy.value.reason == "busy" and reg.promotions.get(second["id"])["state"] == "approved"
    assert reg.promotions.reconcile() == [], "an apply whose owner holds its lease is not settled"
    with reg.db.unit_of_work() as s:  # that process stopped: its lease lapses
        s.execute(update(PromotionRequest).where(PromotionRequest.id == first["id"])
                  .values(apply_lease_until=names.utcnow() - timedelta(seconds=1)))
    [settled] = reg.promotions.reconcile()
    assert settled["state"] == "failed" and "host-b:202:bb22" in settled["error"]  # it never reached the backend
    assert reg.promotions.apply_request(first["id"])["state"] == "applied"
    assert reg.promotions.apply_request(second["id"])["state"] == "stale"
    assert reg.versions.default("iris") == middle


def test_diverged_training_with_nan_metrics_is_exposed_and_listed(make_registry: Any, db_url: str, trained: dict,
                                                                   tmp_path: Path) -> None:
    """A run whose loss went to NaN still becomes a version: PostgreSQL's json type refuses NaN, so it is kept as
    the string "NaN" (proto3's JSON spelling), and the review shows it with no delta."""
    import shutil

    diverged = tmp_path / "diverged"
    shutil.copytree(trained["iris_a"], diverged)
    # what json.dump writes for a diverged Keras run (Python emits the non-standard NaN/Infinity tokens)
    (diverged / "metrics.json").write_text('{"accuracy": 0.33, "loss": NaN, "val_loss": Infinity}')
    reg = make_registry(db_url)
    good = train_and_wait(reg, "iris", "U_T", replay_args(trained["iris_a"]))
    bad = train_and_wait(reg, "iris", "U_T", replay_args(diverged))
    assert good["state"] == bad["state"] == "SUCCEEDED"
    from bot.console import Console

    shown: list[str] = []
    Console(reg, "U_T", write=shown.append).handle("/ml expose iris")  # what the trainer sees in Slack
    assert "loss=NaN" in "\n".join(shown) and ":warning:" not in "\n".join(shown)
    listed = {v["job_id"]: v for v in reg.versions.of_model("iris")["versions"]}
    assert listed[bad["job_id"]]["metrics"] == {"accuracy": 0.33, "loss": "NaN", "val_loss": "Infinity"}
    request = reg.promotions.promote("iris", listed[bad["job_id"]]["name"], "U_REQ")
    loss = next(m for m in request["diff"]["metrics"] if m["name"] == "loss")
    assert loss["candidate"] == "NaN" and loss["delta"] is None and loss["better"] is None
    assert reg.audit.verify().ok


def test_metrics_stored_with_nan_before_the_fix_still_list(two_versions: Any) -> None:
    """Rows written before expose turned NaN into a string hold Python's NaN token: the listing reads it as the json
    module does instead of failing (SQLite only: PostgreSQL never accepted such rows)."""
    reg = two_versions
    if reg.db.engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL's json type never stored NaN")
    newest = reg.versions.of_model("iris")["versions"][0]["name"]
    with reg.db.engine.begin() as conn:
        conn.execute(text("UPDATE versions SET metrics = '{\"loss\": NaN}' WHERE name = :n"), {"n": newest})
    listed = reg.versions.of_model("iris")["versions"]
    assert listed[0]["name"] == newest and listed[0]["metrics"]["loss"] != listed[0]["metrics"]["loss"]  # NaN
    assert all(isinstance(v["metrics"], dict) for v in listed)


def test_lists_show_times_to_the_second_as_the_views_do(two_versions: Any) -> None:
    """`state` and `versions` read times as the database's text and cut it; `get` formats datetimes: same text."""
    from datetime import datetime

    from model_registry.adapters.records import Job, Version

    reg = two_versions
    job_id = reg.jobs.state("iris")[0]["job_id"]
    with reg.db.unit_of_work() as s:
        s.execute(update(Job).where(Job.job_id == job_id).values(
            created_at=datetime(2026, 11, 27, 9, 30, 0, 999999), started_at=datetime(2026, 1, 2, 3, 4, 5),
            ended_at=None))
        s.execute(update(Version).where(Version.job_id == job_id).values(
            created_at=datetime(2026, 12, 31, 23, 59, 59, 500000)))
    listed = next(j for j in reg.jobs.state("iris") if j["job_id"] == job_id)
    assert (listed["created_at"], listed["started_at"], listed["ended_at"]) == (
        "2026-11-27T09:30:00Z", "2026-01-02T03:04:05Z", None)
    got = reg.jobs.get(job_id)
    assert {k: got[k] for k in ("created_at", "started_at", "ended_at")} == {
        k: listed[k] for k in ("created_at", "started_at", "ended_at")}
    version = next(v for v in reg.versions.of_model("iris")["versions"] if v["job_id"] == job_id)
    assert version["created_at"] == "2026-12-31T23:59:59Z"


def test_lists_show_iso_times_whatever_the_servers_datestyle(two_versions: Any) -> None:
    """PostgreSQL writes a timestamp as text in its DateStyle: the engine pins ISO, which the lists cut."""
    reg = two_versions
    if reg.db.engine.dialect.name != "postgresql":
        pytest.skip("DateStyle is PostgreSQL's")
    before = reg.jobs.state("iris")
    with reg.db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'ALTER DATABASE "{reg.db.engine.url.database}" SET DateStyle TO \'SQL, DMY\''))
    reg.db.engine.dispose()  # new connections start with the database's DateStyle
    with reg.db.engine.connect() as conn:
        assert conn.execute(text("SHOW DateStyle")).scalar() == "ISO, DMY", "the engine sets ISO on connect"
    assert reg.jobs.state("iris") == before and before[0]["created_at"].endswith("Z")
