"""The Home tab through Bolt over real HTTP, against the Slack fake, on SQLite and PostgreSQL: app_home_opened is
answered with views.publish for the person who opened it; its Approve and Reject are the card's own buttons, decided
by the same rules; the card is updated through the outbox and the Home tab refreshed after a decision."""

from __future__ import annotations

import json
from typing import Any, Iterator

import pytest
import yaml
from conftest import ROOT, expose_two_versions, replay_args, train_and_wait
from fakes.slack_driver import SlackDriver, serve_wsgi
from fakes.slack_fake import MAX_VIEW_BLOCKS, SlackFake, block_problems

from bot.home import WAITING_SHOWN, home_view
from handlers.results import Failure, HomeTab

SECRET = "home-tab-secret"
CHANNEL = "C0HOMEREV"
APPROVER, GROUP_APPROVER, REQUESTER, MALLORY, TRAINER = "U0ERIN", "U0CAROL", "U0BOB", "U0MALLORY", "U_TRAINER"


@pytest.fixture
def slack() -> Iterator[SlackFake]:
    fake = SlackFake(channels={CHANNEL: "ml-review"})
    for user in (APPROVER, GROUP_APPROVER, REQUESTER, MALLORY, TRAINER):
        fake.add_user(user, user.lower())
    with fake:
        yield fake


@pytest.fixture
def world(make_registry: Any, db_url: str, trained: dict, slack: SlackFake) -> Iterator[dict[str, Any]]:
    """iris with a default and an open request (its card delivered by the outbox), a failed training, and the bot
    serving Slack's requests on a local port."""
    from bot.app import create_bot
    from bot.web import WebApp
    from model_registry.config import SlackSettings

    reg = expose_two_versions(make_registry(db_url, defaults={
        "channel": CHANNEL, "approvers": [APPROVER, "S0REVIEWERS"], "required_approvals": 1},
        usergroups={"S0REVIEWERS": [GROUP_APPROVER]}), trained)
    failed = train_and_wait(reg, "iris", TRAINER, replay_args(trained["iris_a"], "--crash"))
    assert failed["state"] == "FAILED"
    newest = reg.versions.of_model("iris")["versions"][0]["name"]
    req = reg.promotions.promote("iris", newest, REQUESTER, reason="better", card=True)
    settings = SlackSettings.from_env({"SLACK_BOT_TOKEN": slack.token, "SLACK_SIGNING_SECRET": SECRET,
                                       "SLACK_API_URL": slack.base_url})
    bot = create_bot(settings, build=lambda: reg)
    with serve_wsgi(WebApp(bot)) as url:
        driver = SlackDriver(url, SECRET, response_urls=slack.response_url)
        try:
            card = slack.wait_for(lambda: next((k for k, m in slack.messages.items() if "Review: iris" in
                                                json.dumps(m)), None), timeout=20)
            yield {"reg": reg, "driver": driver, "request": req, "failed": failed, "card": card}
        finally:
            driver.close()
            bot.stop()


def published(slack: SlackFake, user: str, needle: str, timeout: float = 15) -> dict[str, Any]:
    """The Home view published for `user` once it contains `needle`."""
    return slack.wait_for(lambda: (slack.homes.get(user) if needle in json.dumps(slack.homes.get(user) or {})
                                   else None), timeout=timeout)


def home_buttons(view: dict[str, Any]) -> dict[str, str]:
    return {e["action_id"]: e["value"] for b in view["blocks"] if b.get("type") == "actions" for e in b["elements"]}


def test_opening_the_home_tab_publishes_what_waits_for_that_person(world: dict, slack: SlackFake) -> None:
    driver, req, failed = world["driver"], world["request"], world["failed"]
    assert driver.home_opened(APPROVER).status == 200
    view = published(slack, APPROVER, "Waiting for your approval")
    (call,) = slack.calls_to("views.publish")
    assert call.params["user_id"] == APPROVER and call.params["view"]["type"] == "home"
    said = json.dumps(view, ensure_ascii=False)
    assert f"request #{req['id']} by <@{REQUESTER}>" in said and "Waiting for your approval* (1)" in said
    assert json.loads(home_buttons(view)["review.approve"]) == {"r": req["id"], "m": "iris", "d": req["card_digest"]}
    assert set(home_buttons(view)) == {"review.approve", "review.reject"}, "the card's own action ids"
    default = world["reg"].versions.default("iris")
    assert f"*iris* default `{default}`" in said and "last training" in said and "failed" in said
    assert f"training `{failed['job_id']}` of *iris*" in said and "crashed on purpose" in said

    for user in (MALLORY, REQUESTER, TRAINER):  # not an approver; requested it; trained the candidate
        assert driver.home_opened(user).status == 200
        theirs = published(slack, user, "Nothing waits for you.")
        assert "review.approve" not in home_buttons(theirs)
    assert driver.home_opened(GROUP_APPROVER).status == 200  # through the group
    assert "review.approve" in home_buttons(published(slack, GROUP_APPROVER, "Waiting for your approval* (1)"))

    before = len(slack.calls_to("views.publish"))
    assert driver.home_opened(APPROVER, tab="messages").status == 200  # the Messages tab: nothing to publish
    for user in (APPROVER, MALLORY):  # two Home tabs opened after it, each published once
        assert driver.home_opened(user).status == 200
        slack.wait_for(lambda user=user: [c for c in slack.calls_to("views.publish")[before:]
                                          if c.params["user_id"] == user], timeout=10)
    assert [c.params["user_id"] for c in slack.calls_to("views.publish")[before:]] == [APPROVER, MALLORY]


def test_approve_on_the_home_tab_decides_updates_the_card_and_refreshes_the_tab(world: dict,
                                                                                slack: SlackFake) -> None:
    driver, reg, req = world["driver"], world["reg"], world["request"]
    channel, ts = world["card"]
    assert driver.home_opened(APPROVER).status == 200
    view = published(slack, APPROVER, "review.approve")
    assert driver.home_action("review.approve", home_buttons(view)["review.approve"], view,
                              user_id=APPROVER).status == 200
    slack.wait_for(lambda: ":rocket: applied" in json.dumps(slack.messages[(channel, ts)]), timeout=30)
    assert f"approved by <@{APPROVER}>" in json.dumps(slack.messages[(channel, ts)]), "the card, through the outbox"
    assert reg.promotions.get(req["id"])["state"] == "applied"
    assert reg.versions.default("iris") == req["candidate"]
    granted = reg.audit.events(action="approval.granted")[0]
    assert granted["actor"] == APPROVER and granted["channel"] is None, "decided on the Home tab, not on a card"
    refreshed = published(slack, APPROVER, "Nothing waits for you.")
    assert f"*iris* default `{req['candidate']}`" in json.dumps(refreshed)


def test_a_refused_click_on_the_home_tab_is_shown_there_and_recorded(world: dict, slack: SlackFake) -> None:
    driver, reg, req = world["driver"], world["reg"], world["request"]
    assert driver.home_opened(APPROVER).status == 200
    view = published(slack, APPROVER, "review.approve")
    # a view that still shows the buttons, clicked by someone who may not approve
    assert driver.home_action("review.approve", home_buttons(view)["review.approve"], view,
                              user_id=MALLORY).status == 200
    shown = published(slack, MALLORY, ":warning:")
    assert f"{MALLORY} is not an approver of iris" in json.dumps(shown)
    refused = reg.audit.events(action="approval.refused")
    assert [(e["actor"], e["details"]["reason"]) for e in refused] == [(MALLORY, "not_approver")]
    assert reg.promotions.get(req["id"])["state"] == "open"


def test_reject_on_the_home_tab_asks_why_then_refreshes_the_tab(world: dict, slack: SlackFake) -> None:
    driver, reg, req = world["driver"], world["reg"], world["request"]
    channel, ts = world["card"]
    assert driver.home_opened(APPROVER).status == 200
    view = published(slack, APPROVER, "review.reject")
    assert driver.home_action("review.reject", home_buttons(view)["review.reject"], view, user_id=APPROVER,
                              trigger_id=driver.trigger_id()).status == 200
    form = slack.wait_for(lambda: slack.calls_to("views.open"), timeout=10)[0].params["view"]
    assert driver.view_submission(form["callback_id"], form["private_metadata"],
                                  {"reason": {"reason": {"type": "plain_text_input", "value": "loss went up"}}},
                                  user_id=APPROVER).status == 200
    slack.wait_for(lambda: "rejected" in json.dumps(slack.messages[(channel, ts)]), timeout=20)
    assert reg.promotions.get(req["id"])["state"] == "rejected"
    published(slack, APPROVER, "Nothing waits for you.")


# ---------------------------------------------------------------- the view's budget, the manifest

def _request(i: int) -> dict[str, Any]:
    return {"id": i, "model": "iris", "kind": "promote", "candidate": f"v{i}", "base": "v0", "state": "open",
            "requested_by": "U0REQ", "reason": "x" * 400, "required_approvals": 1, "approvals": 0, "decisions": [],
            "expires_at": "2026-12-18T09:00:00Z", "card_digest": "d" * 64, "channel": CHANNEL,
            "diff": {"signature": {"breaking": []}}, "rules": [], "rule": None}


def test_a_crowded_home_stays_within_slacks_limits() -> None:
    home = {"user": APPROVER, "waiting": [_request(i) for i in range(60)], "waiting_more": 5,
            "models": [{"model": f"m{i:03d}", "default": "v20261215090000",
                        "last_training": {"job_id": f"m{i:03d}_20261215090000", "state": "SUCCEEDED",
                                          "created_at": "2026-12-15T09:00:00Z", "ended_at": "2026-12-15T09:05:00Z"}}
                       for i in range(300)],
            "failures": [{"kind": "training", "model": "iris", "subject": f"iris_{i}", "at": "2026-12-15T09:00:00Z",
                          "error": "Traceback\n" + "E" * 5000} for i in range(100)],
            "since": "2026-12-08T09:00:00Z"}
    view = home_view(HomeTab(home, Failure("something went wrong", "try again")))
    assert not block_problems(view["blocks"], MAX_VIEW_BLOCKS, base="/view/blocks")
    assert len([b for b in view["blocks"] if b["type"] == "actions"]) == WAITING_SHOWN
    said = json.dumps(view)
    assert "and 50 more: `/ml requests MODEL`" in said and "(65)" in said
    assert "and 260 more" in said and "and 60 more" in said and ":warning: something went wrong" in said


def test_the_manifest_turns_on_the_home_tab_and_its_event() -> None:
    manifest = yaml.safe_load((ROOT / "manifest.yml").read_text())
    assert manifest["features"]["app_home"]["home_tab_enabled"] is True
    events = manifest["settings"]["event_subscriptions"]
    assert "app_home_opened" in events["bot_events"]
    assert events["request_url"] == manifest["settings"]["interactivity"]["request_url"]


def test_the_fake_answers_views_publish_as_slack_does(slack: SlackFake) -> None:
    from slack_sdk import WebClient
    from slack_sdk.errors import SlackApiError

    client = WebClient(token=slack.token, base_url=slack.base_url)
    first = client.views_publish(user_id=APPROVER, view={"type": "home", "blocks": []})["view"]
    again = client.views_publish(user_id=APPROVER, view={"type": "home", "blocks": []}, hash=first["hash"])
    assert again["view"]["id"] == first["id"] and first["type"] == "home"
    for kwargs, error in (({"user_id": "U0NOBODY", "view": {"type": "home"}}, "user_not_found"),
                          ({"user_id": APPROVER, "view": {"type": "modal"}}, "invalid_arguments"),
                          ({"user_id": APPROVER, "view": {"type": "home"}, "hash": first["hash"]}, "hash_conflict"),
                          ({"user_id": APPROVER, "view": {"type": "home", "blocks": [{"type": "divider"}] * 101}},
                           "invalid_arguments")):
        with pytest.raises(SlackApiError) as info:
            client.views_publish(**kwargs)
        assert info.value.response["error"] == error

