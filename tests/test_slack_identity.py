"""Who acted, over real HTTP: identity fails closed, and a failed Slack look-up never costs a decision's record."""

from __future__ import annotations

import json
from pathlib import Path

import test_slack_http as http
from fakes.slack_driver import SlackDriver
from fakes.slack_fake import SlackFake
from test_slack_http import (
    APPROVER,
    CHANNEL,
    GROUP_APPROVER,
    SECRET,
    TRAINER,
    Server,
    acked,
    buttons,
    registry_from,
    said_to,
    train_expose_promote,
)

# the real `starchart serve` against the Slack fake, as in test_slack_http
slack, bot_env, server, driver, _registry_for = http.slack, http.bot_env, http.server, http.driver, http._registry_for


def _refusals(slack: SlackFake, reason: str) -> list[dict]:
    return [e for e in registry_from(slack).audit.events(action="request.refused", limit=1000)
            if e["details"]["reason"] == reason]


def test_a_click_without_a_user_is_refused_and_recorded(driver: SlackDriver, slack: SlackFake) -> None:
    payload = driver.block_action_payload("review.approve", json.dumps({"r": 1, "m": "iris", "d": "x"}),
                                          channel_id=CHANNEL)
    del payload["user"]
    acked(driver.send_signed(driver.payload_body(payload)))
    said_to(slack, "Slack did not say who sent this")
    slack.wait_for(lambda: _refusals(slack, "no_user"), timeout=10)
    refused = _refusals(slack, "no_user")
    assert len(refused) == 1 and refused[0]["actor"] == "unknown"
    events = registry_from(slack).audit.events(limit=1000)
    assert [e["action"] for e in events] == ["request.refused"], "nothing but the refusal was recorded"

    body = driver.command_body("train iris", user_id="", channel_id=CHANNEL)
    acked(driver.send_signed(body))
    slack.wait_for(lambda: len(_refusals(slack, "no_user")) == 2, timeout=10)
    assert registry_from(slack).audit.events(action="training.requested") == []
    assert slack.calls_to("chat.postMessage") == [], "no training was started or posted"


def test_another_workspace_is_refused_when_the_team_is_set(bot_env: dict, slack: SlackFake, tmp_path: Path) -> None:
    srv = Server({**bot_env, "SLACK_TEAM_ID": "T0FAKE0001"}, tmp_path / "serve-team.log")
    try:
        outsider = SlackDriver(srv.url, SECRET, response_urls=slack.response_url, team_id="T0ELSEWHERE")
        insider = SlackDriver(srv.url, SECRET, response_urls=slack.response_url)
        acked(outsider.command("help", user_id=TRAINER, channel_id=CHANNEL))
        said_to(slack, "not T0ELSEWHERE")
        acked(insider.command("help", user_id=TRAINER, channel_id=CHANNEL))
        said_to(slack, "train")
        slack.wait_for(lambda: _refusals(slack, "wrong_team"), timeout=10)
        refused = _refusals(slack, "wrong_team")
        assert len(refused) == 1 and refused[0]["actor"] == TRAINER
        assert refused[0]["details"]["team"] == "T0ELSEWHERE"
        outsider.close()
        insider.close()
    finally:
        srv.stop()


def test_failed_look_ups_decide_with_the_user_id_and_record_it(driver: SlackDriver, slack: SlackFake,
                                                               trained: dict) -> None:
    # Slack answers ok but without the field: not a SlackApiError, which once lost the click
    slack.register("users.info", lambda _params: {})
    slack.register("usergroups.users.list", lambda _params: {})
    (channel, ts), card = train_expose_promote(driver, slack, trained)
    reg = registry_from(slack)
    value = buttons(card)["review.approve"]
    base = reg.versions.default("iris")

    acked(driver.block_action("review.approve", value, user_id=GROUP_APPROVER, channel_id=channel, message=card))
    said_to(slack, "is not an approver")  # the group cannot be read: it grants nobody
    assert reg.versions.default("iris") == base
    refused = reg.audit.events(action="approval.refused")
    assert [(e["actor"], e["details"]["reason"]) for e in refused] == [(GROUP_APPROVER, "not_approver")]

    acked(driver.block_action("review.approve", value, user_id=APPROVER, channel_id=channel, message=card))
    slack.wait_for(lambda: ":rocket: applied" in json.dumps(slack.messages[(channel, ts)]), timeout=20)
    granted = reg.audit.events(action="approval.granted")
    assert [(e["actor"], e["actor_name"]) for e in granted] == [(APPROVER, None)]
    assert reg.versions.default("iris") != base
