"""End to end over Socket Mode: `starchart socket` (Bolt's SocketModeHandler, slack_sdk's builtin client)
against the local Slack fake: apps.connections.open hands out a ws:// URL of the fake's WebSocket server,
which pushes envelopes and records the acks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from conftest import ROOT, write_config
from fakes.slack_fake import SlackFake

CHANNEL, USER = "C0MLREVIEW", "U0ALICE"


@pytest.fixture
def slack() -> Iterator[SlackFake]:
    fake = SlackFake(channels={CHANNEL: "ml-review"})
    fake.add_user(USER, "alice", display_name="Alice")
    with fake:
        yield fake


@pytest.fixture
def socket_bot(tmp_path: Path, replay_trainers: Path, slack: SlackFake) -> Iterator[subprocess.Popen[bytes]]:
    home = tmp_path / "home"
    home.mkdir()
    config = write_config(home, replay_trainers, defaults={"channel": CHANNEL, "approvers": [USER]})
    env = {**os.environ, "SLACK_BOT_TOKEN": slack.token, "SLACK_APP_TOKEN": slack.app_token,
           "SLACK_API_URL": slack.base_url, "STARCHART_HOME": str(home), "STARCHART_CONFIG": str(config),
           "DATABASE_URL": f"sqlite:///{tmp_path / 'starchart.db'}"}
    env.pop("SLACK_SIGNING_SECRET", None)
    log = tmp_path / "socket.log"
    proc = subprocess.Popen([sys.executable, "-m", "bot.cli", "socket"], cwd=ROOT, env=env,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while not slack.socket_connections:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"starchart socket did not connect:\n{log.read_text()[-3000:]}")
            time.sleep(0.02)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def slash_envelope(slack: SlackFake, text: str) -> dict[str, Any]:
    """A slash_commands envelope shaped like Slack's Socket Mode one."""
    return {
        "envelope_id": str(uuid.uuid4()),
        "type": "slash_commands",
        "accepts_response_payload": True,
        "payload": {
            "token": "fake-verification-token", "team_id": "T0FAKE0001", "team_domain": "starchart-fake",
            "channel_id": CHANNEL, "channel_name": "ml-review", "user_id": USER, "user_name": "alice",
            "command": "/ml", "text": text, "api_app_id": "A0FAKEAPP1", "is_enterprise_install": "false",
            "response_url": slack.response_url(CHANNEL),
            "trigger_id": f"{int(time.time())}.{uuid.uuid4().int % 10**10}.{uuid.uuid4().hex}",
        },
    }


def command(slack: SlackFake, text: str) -> dict[str, Any]:
    """Push `/ml text`; assert its ack (same envelope_id) arrives within 3 s; return the ack."""
    sent = time.monotonic()
    envelope_id = slack.socket_send(slash_envelope(slack, text))
    ack = slack.wait_for(lambda: next((a for a in slack.socket_acks if a["envelope_id"] == envelope_id), None),
                         timeout=3)
    assert ack["received_at"] - sent < 3.0
    return ack


def said(slack: SlackFake, needle: str, timeout: float = 10) -> dict[str, Any]:
    """The bot's answer (a response_url post) containing `needle`."""
    def find() -> Any:
        return next((r for r in slack.responses if needle in json.dumps(r["payload"])), None)
    return slack.wait_for(find, timeout=timeout)


def test_socket_mode_slash_commands(slack: SlackFake, socket_bot: subprocess.Popen[bytes]) -> None:
    assert slack.calls_to("apps.connections.open")[0].headers["authorization"] == f"Bearer {slack.app_token}"

    command(slack, "versions iris")
    answer = said(slack, "Versions of iris")
    assert answer["status"] == 200 and answer["payload"]["response_type"] == "ephemeral"

    command(slack, "traim iris")
    said(slack, "did you mean train")
    assert socket_bot.poll() is None
    assert len(slack.socket_acks) == 2
