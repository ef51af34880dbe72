"""Schedules: set, list, turn off, fire once per firing (even with two clocks), recorded in the audit trail."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from conftest import replay_args

from model_registry.domain.errors import InvalidInput, NotFound, Refused
from model_registry.services.schedules import next_run


def test_next_run_honours_the_time_zone() -> None:
    after = datetime(2026, 11, 27, 17, 0)  # 02:00 in Tokyo on the 28th
    assert next_run("0 3 * * *", "Asia/Tokyo", after) == datetime(2026, 11, 27, 18, 0)
    assert next_run("0 3 * * *", "UTC", after) == datetime(2026, 11, 28, 3, 0)


def test_schedule_lifecycle_and_firing(make_registry: Any, db_url: str, trained: dict) -> None:
    reg = make_registry(db_url)
    view = reg.schedules.set("iris", "*/5 * * * *", "U_OPS", replay_args(trained["iris_a"]))
    assert view["enabled"] and view["next_run_at"]
    assert reg.audit.events(action="schedule.changed")[0]["details"]["cron"] == "*/5 * * * *"
    later = datetime.fromisoformat(view["next_run_at"][:-1]) + timedelta(seconds=1)
    assert reg.schedules.run_due(later - timedelta(minutes=10)) == []
    first = reg.schedules.run_due(later)
    assert [j["requested_by"] for j in first] == ["schedule:iris"]
    assert reg.schedules.run_due(later) == [], "one firing starts one training"
    assert reg.jobs.wait(first[0]["job_id"])["state"] == "SUCCEEDED"
    off = reg.schedules.disable("iris", "U_OPS")
    assert not off["enabled"] and reg.schedules.run_due(later + timedelta(hours=1)) == []
    assert [e["details"]["enabled"] for e in reg.audit.events(action="schedule.changed")] == [False, True]


def test_schedule_bad_input(make_registry: Any, sqlite_url: str) -> None:
    reg = make_registry(sqlite_url, defaults={"operators": ["U_OPS"]})
    with pytest.raises(InvalidInput):
        reg.schedules.set("iris", "every night", "U_OPS")
    with pytest.raises(InvalidInput):
        reg.schedules.set("iris", "0 3 * * *", "U_OPS", tz="Mars/Olympus")
    with pytest.raises(NotFound):
        reg.schedules.set("irsi", "0 3 * * *", "U_OPS")
    with pytest.raises(Refused):
        reg.schedules.set("iris", "0 3 * * *", "U_RANDOM")
    with pytest.raises(InvalidInput):
        reg.schedules.disable("iris", "U_OPS")


def test_configured_schedules_are_synced_once(make_registry: Any, sqlite_url: str) -> None:
    reg = make_registry(sqlite_url, models={"iris": {"schedule": {"cron": "0 3 * * *", "timezone": "Asia/Tokyo",
                                                                   "args": ["--epochs=20"]}}})
    reg.schedules.sync_configured()
    reg.schedules.sync_configured()
    (row,) = reg.schedules.all()
    assert (row["cron"], row["timezone"], row["args"]) == ("0 3 * * *", "Asia/Tokyo", ["--epochs=20"])
    assert len(reg.audit.events(action="schedule.changed")) == 1


def test_schedule_from_chat_and_cli(make_registry: Any, sqlite_url: str, tmp_path: Any) -> None:
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    from bot.console import Console

    reg = make_registry(sqlite_url)
    out: list[str] = []
    console = Console(reg, "U_OPS", write=out.append)
    console.handle('/ml schedule iris “0 3 * * *” —timezone Asia/Tokyo — —epochs=20')
    assert "trains at `0 3 * * *` (Asia/Tokyo)" in "\n".join(out)
    console.handle("/ml schedule list")
    assert "Asia/Tokyo" in out[-1] and "--epochs=20" in out[-1]
    console.handle("/ml schedule iris")
    assert "needs a cron or `off`" in out[-1]
    console.handle("/ml schedule iris off")
    assert "is off" in out[-1]
    env = {**os.environ, "STARCHART_HOME": str(reg.settings.home), "DATABASE_URL": sqlite_url,
           "STARCHART_CONFIG": str(reg.settings.config_path)}
    listed = subprocess.run([sys.executable, "-m", "bot.cli", "--json", "schedule", "list"], cwd=ROOT, env=env,
                            capture_output=True, text=True, check=True)
    assert json.loads(listed.stdout)[0]["enabled"] is False
    clock = subprocess.run([sys.executable, "-m", "bot.cli", "clock", "--once"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
    assert clock.returncode == 0, clock.stderr


def test_scheduled_retrain_arrives_as_a_review_card(make_registry: Any, sqlite_url: str, trained: dict) -> None:
    from datetime import datetime, timedelta

    from fakes.slack_fake import SlackFake

    from bot.app import slack_client
    from bot.worker import one_pass
    from model_registry.config import SlackSettings

    reg = make_registry(sqlite_url, defaults={"channel": "C0NIGHTLY"}, models={"iris": {
        "auto_expose": True, "auto_review": True, "gate": {"metric": "accuracy", "min_delta": -0.5}}})
    first = reg.jobs.train("iris", "U_T", args=replay_args(trained["iris_a"]))  # today's default, trained by hand
    reg.jobs.wait(first["job_id"])
    reg.versions.expose("iris", "U_T")
    view = reg.schedules.set("iris", "0 3 * * *", "U_OPS", replay_args(trained["iris_b"]))
    (job,) = reg.schedules.run_due(datetime.fromisoformat(view["next_run_at"][:-1]) + timedelta(seconds=1))
    reg.jobs.wait(job["job_id"])
    with SlackFake(channels={"C0NIGHTLY": "nightly"}) as fake:
        client = slack_client(SlackSettings.from_env({"SLACK_API_URL": fake.base_url, "SLACK_BOT_TOKEN": fake.token}))
        assert one_pass(reg, client)["reviews"] == 1
        assert one_pass(reg, client)["reviews"] == 0, "one card per scheduled training"
        (card,) = [c for c in fake.calls_to("chat.postMessage") if "Review: iris" in c.params.get("text", "")]
        assert card.params["channel"] == "C0NIGHTLY"
    (req,) = reg.promotions.of_model("iris")
    assert req["requested_by"] == "schedule:iris" and req["message_ts"]
    assert reg.promotions.decide(req["id"], "U_HUMAN", True)["state"] == "approved", "a person approves the nightly card"


def test_gate_skips_the_review_of_a_worse_retrain(make_registry: Any, sqlite_url: str, trained: dict) -> None:
    from datetime import datetime, timedelta

    reg = make_registry(sqlite_url, models={"iris": {
        "auto_expose": True, "auto_review": True, "gate": {"metric": "accuracy", "min_delta": 0.5}}})
    first = reg.jobs.train("iris", "U_T", args=replay_args(trained["iris_a"]))
    reg.jobs.wait(first["job_id"])
    reg.versions.expose("iris", "U_T")
    view = reg.schedules.set("iris", "0 3 * * *", "U_OPS", replay_args(trained["iris_a"]))
    (job,) = reg.schedules.run_due(datetime.fromisoformat(view["next_run_at"][:-1]) + timedelta(seconds=1))
    reg.jobs.wait(job["job_id"])
    assert reg.schedules.follow_scheduled() == []
    skipped = reg.audit.events(action="review.skipped")
    assert len(skipped) == 1 and "accuracy changed by +0.0000" in skipped[0]["details"]["why"]
    assert len(reg.versions.of_model("iris")["versions"]) == 2, "exposed all the same"


def test_gate_skips_a_retrain_whose_gate_metric_diverged(make_registry: Any, sqlite_url: str, trained: dict,
                                                          tmp_path: Any) -> None:
    import shutil
    from datetime import datetime, timedelta

    diverged = tmp_path / "diverged"
    shutil.copytree(trained["iris_a"], diverged)
    (diverged / "metrics.json").write_text('{"accuracy": NaN, "loss": NaN}')
    reg = make_registry(sqlite_url, models={"iris": {
        "auto_expose": True, "auto_review": True, "gate": {"metric": "accuracy", "min_delta": -1.0}}})
    first = reg.jobs.train("iris", "U_T", args=replay_args(trained["iris_a"]))
    reg.jobs.wait(first["job_id"])
    reg.versions.expose("iris", "U_T")
    view = reg.schedules.set("iris", "0 3 * * *", "U_OPS", replay_args(diverged))
    (job,) = reg.schedules.run_due(datetime.fromisoformat(view["next_run_at"][:-1]) + timedelta(seconds=1))
    reg.jobs.wait(job["job_id"])
    assert reg.schedules.follow_scheduled() == [], "a NaN accuracy is no candidate, whatever the gate allows"
    (skipped,) = reg.audit.events(action="review.skipped")
    assert "accuracy is NaN" in skipped["details"]["why"]
