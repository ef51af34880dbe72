"""A canary from Slack over real HTTP: `/ml promote … --canary`, the review card saying so, the canary card the
outbox posts once it starts, its buttons under the approvals' policy (refusals recorded), and `/ml canary`."""

from __future__ import annotations

import json
from typing import Any

import test_slack_http as http
from fakes.slack_driver import SlackDriver
from fakes.slack_fake import SlackFake
from test_slack_http import (
    APPROVER,
    CHANNEL,
    GROUP_APPROVER,
    MALLORY,
    REQUESTER,
    acked,
    buttons,
    message_with,
    registry_from,
    said_to,
    train_expose_promote,
)

# the Slack tests' fixtures, shared: the fake, the bot's environment, `starchart serve`, the driver, the registry
slack, bot_env, server, driver, _registry_for = http.slack, http.bot_env, http.server, http.driver, http._registry_for


def test_a_canary_card_with_its_buttons_through_the_outbox(driver: SlackDriver, slack: SlackFake, trained: dict,
                                                           bot_env: dict) -> None:
    (channel, ts), card = train_expose_promote(driver, slack, trained, extra="--canary 40 --bake 1h")
    assert "Canary" in json.dumps(card) and "40% of the default" in json.dumps(card)
    reg = registry_from(slack)
    base = reg.versions.default("iris")
    cand = reg.versions.of_model("iris")["versions"][0]["name"]

    acked(driver.block_action("review.approve", buttons(card)["review.approve"], user_id=GROUP_APPROVER,
                              channel_id=channel, message=card))
    slack.wait_for(lambda: "canary running" in json.dumps(slack.messages[(channel, ts)]), timeout=20)
    (canary_channel, canary_ts), canary_card = message_with(slack, "Canary: iris")
    assert canary_channel == CHANNEL
    assert set(buttons(canary_card)) == {"canary.promote", "canary.rollback"}
    shown = json.dumps(canary_card)
    assert f"{base} 60%, {cand} 40%" in shown and "baking until" in shown
    assert reg.versions.default("iris") == base and reg.backend.canary_split("iris") == {base: 60, cand: 40}

    value = buttons(canary_card)["canary.promote"]
    acked(driver.block_action("canary.promote", value, user_id=REQUESTER, channel_id=canary_channel,
                              message=canary_card))
    said_to(slack, "may not approve")  # promoting to 100% is an approval: self-approval is off
    acked(driver.block_action("canary.rollback", buttons(canary_card)["canary.rollback"], user_id=MALLORY,
                              channel_id=canary_channel, message=canary_card))
    said_to(slack, "is not an approver")
    refused = reg.audit.events(model="iris", action="canary.refused")
    assert sorted(e["details"]["reason"] for e in refused) == ["not_approver", "self_approval"]
    assert refused[0]["channel"] == canary_channel and refused[0]["message_ts"] == canary_ts

    acked(driver.command("canary iris status", user_id=APPROVER, channel_id=CHANNEL))
    said_to(slack, f"Canary: iris {base}")

    acked(driver.block_action("canary.rollback", buttons(canary_card)["canary.rollback"], user_id=APPROVER,
                              channel_id=canary_channel, message=canary_card))
    slack.wait_for(lambda: "rolled back at" in json.dumps(slack.messages[(canary_channel, canary_ts)]), timeout=20)
    updated = slack.messages[(canary_channel, canary_ts)]
    assert not buttons(updated), "a canary that ended has no buttons"
    assert f"rolled back by {APPROVER}" in json.dumps(updated)
    slack.wait_for(lambda: "canary rolled back" in json.dumps(slack.messages[(channel, ts)]), timeout=20)
    assert reg.backend.canary_split("iris") == {base: 100} and reg.versions.default("iris") == base
    event: dict[str, Any] = reg.audit.events(model="iris", action="canary.rolled_back")[0]
    assert event["actor"] == APPROVER and event["channel"] == canary_channel
