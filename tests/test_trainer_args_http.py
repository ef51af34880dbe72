"""Over real HTTP (`starchart serve` against the Slack fake): trainer arguments under policy, the trainer's clean
environment, and the capped log tails Slack receives."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest
from conftest import FIXTURES, read_json, write_config
from fakes.slack_driver import SlackDriver
from fakes.slack_fake import SlackFake
from test_slack_http import CHANNEL, SECRET, TRAINER, Server, acked, message_with, registry, said_to, slack

__all__ = ["slack"]  # the Slack fake fixture, shared with test_slack_http
SECRETS = {"SLACK_BOT_TOKEN", "SLACK_SIGNING_SECRET", "DATABASE_URL", "STARCHART_AUDIT_KEY"}


@pytest.fixture
def bot_env(tmp_path: Path, replay_trainers: Path, slack: SlackFake, sqlite_url: str) -> dict[str, str]:
    shutil.copytree(FIXTURES / "trainers" / "envprobe", replay_trainers / "probe")
    home = tmp_path / "home"
    home.mkdir()
    config = write_config(home, replay_trainers, defaults={"channel": CHANNEL}, models={
        "iris": {"args_allowed": ["--epochs", "--learning_rate", "--source"]},
        "probe": {"trainer_env": ["PROBE_LISTED"]},
    })
    return {**os.environ, "SLACK_BOT_TOKEN": slack.token, "SLACK_SIGNING_SECRET": SECRET,
            "SLACK_API_URL": slack.base_url, "STARCHART_HOME": str(home), "STARCHART_CONFIG": str(config),
            "DATABASE_URL": sqlite_url, "STARCHART_AUDIT_KEY": "audit-key-not-for-trainers",
            "STARCHART_FOLLOW_INTERVAL": "0.1", "PROBE_LISTED": "listed"}


@pytest.fixture
def driver(bot_env: dict[str, str], slack: SlackFake, tmp_path: Path) -> Iterator[SlackDriver]:
    server = Server(bot_env, tmp_path / "serve.log")
    d = SlackDriver(server.url, SECRET, response_urls=slack.response_url)
    yield d
    d.close()
    server.stop()


def test_refused_trainer_arguments_over_http_change_nothing(driver: SlackDriver, slack: SlackFake,
                                                            bot_env: dict[str, str]) -> None:
    acked(driver.command("train iris -- --job-dir=/some/dir", user_id=TRAINER, channel_id=CHANNEL))
    said_to(slack, "`--job-dir` is not a flag you may pass to iris: allowed are --epochs, --learning_rate, --source")
    acked(driver.command("train iris -- --source=/etc", user_id=TRAINER, channel_id=CHANNEL))
    said_to(slack, "outside the data roots")
    acked(driver.command("train iris -- --source=TRAIN_PATH/../../../etc", user_id=TRAINER, channel_id=CHANNEL))
    said_to(slack, "is not allowed in a path")
    acked(driver.command('schedule iris "0 3 * * *" -- --epochs=3 --hidden_units=8', user_id=TRAINER,
                         channel_id=CHANNEL))
    said_to(slack, "`--hidden_units` is not a flag you may pass to iris")
    reg = registry(bot_env)
    try:
        assert reg.audit.events(action="training.requested") == []
        assert reg.audit.events(action="schedule.changed") == []
        assert reg.schedules.all() == []
    finally:
        reg.close()
    assert slack.calls_to("chat.postMessage") == [], "no training message was posted"


def test_trainer_environment_and_log_tails_over_http(driver: SlackDriver, slack: SlackFake, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    acked(driver.command(f"train probe -- --report={report} --lines=400", user_id=TRAINER, channel_id=CHANNEL))
    key, _msg = message_with(slack, "Training *probe_")
    slack.wait_for(lambda: "*failed*" in json.dumps(slack.messages[key]), timeout=60)
    seen = read_json(report)
    for where in ("env", "parent_env"):  # the trainer, and the local runner whose environment it may read
        assert not SECRETS & set(seen[where]), (where, seen[where])
        assert "PROBE_LISTED" in seen[where]
    assert not any("xoxb" in value or value == SECRET for value in seen["values"].values())
    failed: Any = slack.messages[key]
    text = json.dumps(failed)
    assert "earlier line(s) cut" in text and "row,of,a,csv" in text, "the failed message says its tail was cut"
    assert all(len(b.get("text", {}).get("text", "")) <= 3000 for b in failed["blocks"])
    job_id = text.split("Training *", 1)[1].split("*", 1)[0]
    acked(driver.command(f"logs {job_id} --tail 1000", user_id=TRAINER, channel_id=CHANNEL))
    answer = said_to(slack, f"Log of {job_id}")
    assert "earlier line(s) cut" in json.dumps(answer["payload"])
    assert sum(len(b.get("text", {}).get("text", "")) for b in answer["payload"].get("blocks", [])) < 3000
