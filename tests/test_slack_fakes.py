"""The Slack fakes, exercised with the real slack_sdk WebClient and a real Bolt app over local HTTP."""

from __future__ import annotations

import re
import time
from typing import Any, Iterator

import pytest
from fakes.slack_driver import SlackDriver, serve_wsgi
from fakes.slack_fake import SlackFake
from slack_bolt import App
from slack_bolt.adapter.wsgi import SlackRequestHandler
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_handlers import RateLimitErrorRetryHandler
from slack_sdk.signature import SignatureVerifier
from slack_sdk.webhook import WebhookClient

SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
CHANNEL, GROUP = "C0GENERAL1", "S0MLTEAM01"
TS = re.compile(r"^\d{10}\.\d{6}$")


@pytest.fixture
def fake() -> Iterator[SlackFake]:
    users = {"U0ADA00001": {"name": "ada", "real_name": "Ada Lovelace", "display_name": "ada.l"}}
    with SlackFake(users=users, usergroups={GROUP: ["U0ADA00001"]}, channels={CHANNEL: "general"}) as running:
        yield running


@pytest.fixture
def client(fake: SlackFake) -> WebClient:
    return WebClient(token=fake.token, base_url=fake.base_url, timeout=5)


def section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


def button(value: str) -> dict[str, Any]:
    return {"type": "actions", "elements": [
        {"type": "button", "action_id": "approve", "value": value, "text": {"type": "plain_text", "text": "OK"}}]}


# --------------------------------------------------------------------------- Web API with the real WebClient


def test_post_update_and_ephemeral(fake: SlackFake, client: WebClient) -> None:
    first = client.chat_postMessage(channel=CHANNEL, text="training", blocks=[section("training…")])
    second = client.chat_postMessage(channel=CHANNEL, text="reply", thread_ts=first["ts"])
    assert first["ok"] and first["channel"] == CHANNEL and first["message"]["text"] == "training"
    assert TS.match(first["ts"]) and float(second["ts"]) > float(first["ts"])
    assert fake.messages[(CHANNEL, second["ts"])]["thread_ts"] == first["ts"]

    updated = client.chat_update(channel=CHANNEL, ts=first["ts"], text="done")
    assert updated["message"]["text"] == "done"
    message = fake.messages[(CHANNEL, first["ts"])]
    assert message["text"] == "done" and message["blocks"] == [section("training…")]  # omitted blocks are kept
    with pytest.raises(SlackApiError) as missing:
        client.chat_update(channel=CHANNEL, ts="1600000000.000001", text="x")
    assert missing.value.response["error"] == "message_not_found"
    human = fake.seed_message(CHANNEL, "a person's message")
    with pytest.raises(SlackApiError, match="cant_update_message"):
        client.chat_update(channel=CHANNEL, ts=human, text="x")

    eph = client.chat_postEphemeral(channel=CHANNEL, user="U0ADA00001", text="only you")
    assert TS.match(eph["message_ts"]) and fake.ephemerals[0]["user"] == "U0ADA00001"
    # slack_sdk sends message methods as JSON, lookups as form-encoded POSTs.
    assert fake.calls_to("chat.postMessage")[0].headers["content-type"].startswith("application/json")
    assert fake.calls_to("chat.postMessage")[0].headers["authorization"] == f"Bearer {fake.token}"


def test_views_open_needs_a_fresh_valid_trigger(fake: SlackFake, client: WebClient) -> None:
    view = {"type": "modal", "callback_id": "reject", "title": {"type": "plain_text", "text": "Reject"},
            "blocks": [section("why?")]}
    opened = client.views_open(trigger_id="12345.98765.abcd2358fdea", view=view)
    assert opened["view"]["id"] in fake.views and opened["view"]["callback_id"] == "reject"
    for trigger, error in [("12345.98765.abcd2358fdea", "exchanged_trigger_id"), ("nope", "invalid_trigger_id"),
                           ("", "invalid_arguments")]:
        with pytest.raises(SlackApiError) as err:
            client.views_open(trigger_id=trigger, view=view)
        assert err.value.response["error"] == error


def test_lookups(fake: SlackFake, client: WebClient) -> None:
    assert client.auth_test()["user_id"] == "U0BOTFAKE1"
    assert client.usergroups_users_list(usergroup=GROUP)["users"] == ["U0ADA00001"]
    user = client.users_info(user="U0ADA00001")["user"]
    assert (user["name"], user["real_name"], user["profile"]["display_name"]) == ("ada", "Ada Lovelace", "ada.l")
    assert client.conversations_info(channel=CHANNEL)["channel"]["name"] == "general"
    for call, error in [(lambda: client.usergroups_users_list(usergroup="S0NONE"), "no_such_subteam"),
                        (lambda: client.users_info(user="U0NOBODY"), "user_not_found"),
                        (lambda: client.conversations_info(channel="C0NONE"), "channel_not_found")]:
        with pytest.raises(SlackApiError) as err:
            call()
        assert err.value.response["error"] == error
    assert fake.calls_to("users.info")[0].headers["content-type"] == "application/x-www-form-urlencoded"


def test_files_upload_v2_to_a_thread(fake: SlackFake, client: WebClient) -> None:
    parent = client.chat_postMessage(channel=CHANNEL, text="diff")["ts"]
    result = client.files_upload_v2(channel=CHANNEL, thread_ts=parent, content="a,b\n1,2\n", filename="diff.csv",
                                    title="Full diff")
    assert [c.method for c in fake.calls][-3:] == ["files.getUploadURLExternal", "upload",
                                                   "files.completeUploadExternal"]
    [upload] = fake.uploads
    assert upload["id"] == result["file"]["id"]
    assert (upload["content"], upload["filename"], upload["title"]) == (b"a,b\n1,2\n", "diff.csv", "Full diff")
    assert (upload["channel"], upload["thread_ts"]) == (CHANNEL, parent)


@pytest.mark.parametrize("kwargs, error", [
    ({"text": "x", "blocks": [section("b")] * 51}, "invalid_blocks"),
    ({"text": "x", "blocks": [section("y" * 3001)]}, "invalid_blocks"),
    ({"text": "x", "blocks": [button("v" * 2001)]}, "invalid_blocks"),
    ({"text": "x" * 40_001}, "msg_too_long"),
    ({"text": ""}, "no_text"),
])
@pytest.mark.filterwarnings("ignore:The top-level `text` argument is missing:UserWarning")
def test_limits_are_rejected_like_slack(client: WebClient, kwargs: dict[str, Any], error: str) -> None:
    with pytest.raises(SlackApiError) as err:
        client.chat_postMessage(channel=CHANNEL, **kwargs)
    assert err.value.response["error"] == error


def test_limits_are_inclusive(fake: SlackFake, client: WebClient) -> None:
    blocks = [section("y" * 3000), button("v" * 2000)] + [section("b")] * 48
    client.chat_postMessage(channel=CHANNEL, text="x" * 40_000, blocks=blocks)
    with pytest.raises(SlackApiError) as err:
        client.chat_postMessage(channel=CHANNEL, text="x", blocks=[section("y" * 3001)])
    assert "json-pointer:/blocks/0/text/text" in err.value.response["errors"][0]


def test_bad_or_missing_token(fake: SlackFake) -> None:
    with pytest.raises(SlackApiError, match="invalid_auth"):
        WebClient(token="xoxb-not-the-token", base_url=fake.base_url).chat_postMessage(channel=CHANNEL, text="x")
    with pytest.raises(SlackApiError, match="not_authed"):
        WebClient(base_url=fake.base_url).auth_test()
    assert fake.messages == {}


def test_injected_429_is_retried_by_slack_sdk(fake: SlackFake, client: WebClient) -> None:
    fake.fail_next("chat.postMessage", "ratelimited", status=429, retry_after=1)
    with pytest.raises(SlackApiError) as err:
        client.chat_postMessage(channel=CHANNEL, text="x")
    assert err.value.response.status_code == 429 and err.value.response["error"] == "ratelimited"
    assert err.value.response.headers["Retry-After"] == "1"

    fake.fail_next("chat.postMessage", "ratelimited", status=429, retry_after=1)
    client.retry_handlers.append(RateLimitErrorRetryHandler(max_retry_count=1))
    started = time.monotonic()
    assert client.chat_postMessage(channel=CHANNEL, text="after retry")["ok"]
    assert time.monotonic() - started >= 1.0  # Retry-After was honoured
    assert len(fake.calls_to("chat.postMessage")) == 3 and len(fake.messages) == 1


def test_latency_injection(fake: SlackFake, client: WebClient) -> None:
    fake.delay_seconds = 0.3
    started = time.monotonic()
    client.auth_test()
    assert time.monotonic() - started >= 0.3


def test_response_url_semantics(fake: SlackFake, client: WebClient) -> None:
    ts = client.chat_postMessage(channel=CHANNEL, text="card", blocks=[button("v1")])["ts"]
    url = fake.response_url(channel=CHANNEL, message_ts=ts)
    hook = WebhookClient(url)
    assert hook.send(text="only you", response_type="ephemeral").status_code == 200
    assert hook.send(text="approved", replace_original=True).body == "ok"
    assert fake.messages[(CHANNEL, ts)]["text"] == "approved" and fake.messages[(CHANNEL, ts)]["blocks"] == []
    hook.send(text="everyone sees this", response_type="in_channel")
    assert len(fake.messages) == 2
    rejected = hook.send(text="x", blocks=[section("y" * 3001)])
    assert (rejected.status_code, rejected.body) == (400, "invalid_blocks")
    assert [r["status"] for r in fake.responses] == [200, 200, 200, 400]
    assert fake.responses[0]["payload"] == {"text": "only you", "response_type": "ephemeral"}
    assert WebhookClient(fake.root_url + "/response/unknown").send(text="x").status_code == 404


def test_wait_for_times_out(fake: SlackFake) -> None:
    with pytest.raises(AssertionError, match="not met"):
        fake.wait_for(lambda: fake.calls_to("chat.postMessage"), timeout=0.1)


# --------------------------------------------------------------------------- the driver against a real Bolt app


def test_driver_signatures_match_slack_sdk() -> None:
    driver = SlackDriver("http://127.0.0.1:9", SECRET)
    verifier = SignatureVerifier(SECRET)
    body = driver.command_body("train iris")
    headers = driver.signed_headers(body)
    assert verifier.is_valid(body, headers["X-Slack-Request-Timestamp"], headers["X-Slack-Signature"])
    stale = driver.signed_headers(body, timestamp=int(time.time()) - 360)
    assert not verifier.is_valid(body, stale["X-Slack-Request-Timestamp"], stale["X-Slack-Signature"])
    assert not SignatureVerifier("wrong").is_valid(body, headers["X-Slack-Request-Timestamp"],
                                                   headers["X-Slack-Signature"])


@pytest.fixture
def bolt(fake: SlackFake) -> Iterator[SlackDriver]:
    """A tiny Bolt app served by Bolt's own WSGI handler; its WebClient talks to the fake."""
    # token= as well as client= mirrors bot/app.py; Bolt then uses the client's token.
    app = App(token=fake.token, signing_secret=SECRET, client=WebClient(token=fake.token, base_url=fake.base_url))

    @app.command("/ml")
    def ml(ack: Any, body: dict[str, Any], client: WebClient, respond: Any) -> None:
        ack(f"on it: {body['text']}")
        client.chat_postMessage(channel=body["channel_id"], text=f"<@{body['user_id']}> asked: {body['text']}",
                                blocks=[section(body["text"]), button("v1")])
        respond(text="queued", response_type="ephemeral")

    @app.action("approve")
    def approve(ack: Any, body: dict[str, Any], action: dict[str, Any], client: WebClient) -> None:
        ack()
        client.chat_update(channel=body["channel"]["id"], ts=body["message"]["ts"], text=f"approved {action['value']}",
                           blocks=[section(f"approved by <@{body['user']['id']}>")])

    @app.view("reject")
    def reject(ack: Any, view: dict[str, Any], body: dict[str, Any], client: WebClient) -> None:
        ack()
        reason = view["state"]["values"]["reason"]["text"]["value"]
        client.chat_postMessage(channel=view["private_metadata"], text=f"rejected: {reason}")

    with serve_wsgi(SlackRequestHandler(app)) as url:
        driver = SlackDriver(url, SECRET, response_urls=fake.response_url)
        yield driver
        driver.close()


def test_bolt_slash_command_is_acked_and_posts(fake: SlackFake, bolt: SlackDriver) -> None:
    answer = bolt.command("train iris", user_id="U0ADA00001", channel_id=CHANNEL)
    # Bolt answers a slash command's ack("...") as text/plain, not JSON.
    assert (answer.status, answer.body) == (200, "on it: train iris") and answer.elapsed < 5
    [posted] = fake.wait_for(lambda: fake.calls_to("chat.postMessage"))
    assert posted.params["text"] == "<@U0ADA00001> asked: train iris"
    fake.wait_for(lambda: fake.responses)
    assert fake.responses[0]["payload"]["text"] == "queued"


@pytest.mark.parametrize("send", ["send_forged", "send_unsigned", "send_stale"])
def test_bolt_refuses_unverified_requests(fake: SlackFake, bolt: SlackDriver, send: str) -> None:
    answer = getattr(bolt, send)()
    assert answer.status == 401
    time.sleep(0.1)  # a listener run by mistake would have posted by now
    assert fake.calls_to("chat.postMessage") == []


def test_bolt_block_action_updates_the_card(fake: SlackFake, bolt: SlackDriver) -> None:
    bolt.command("train iris", channel_id=CHANNEL)
    [(key, card)] = fake.wait_for(lambda: list(fake.messages.items()))
    answer = bolt.block_action("approve", "v1", user_id="U0ADA00001", channel_id=CHANNEL, message=card)
    assert answer.status == 200
    fake.wait_for(lambda: fake.messages[key]["text"] == "approved v1")
    assert fake.messages[key]["blocks"] == [section("approved by <@U0ADA00001>")]


def test_bolt_view_submission(fake: SlackFake, bolt: SlackDriver) -> None:
    state = {"reason": {"text": {"type": "plain_text_input", "value": "overfits"}}}
    assert bolt.view_submission("reject", CHANNEL, state).status == 200
    [posted] = fake.wait_for(lambda: fake.calls_to("chat.postMessage"))
    # Bolt's per-request WebClient adds the payload's team_id to every call.
    assert posted.params == {"channel": CHANNEL, "text": "rejected: overfits", "team_id": "T0FAKE0001"}


def test_a_failed_name_look_up_is_kept_a_minute_and_a_failed_group_one_is_not(fake: SlackFake,
                                                                                client: WebClient) -> None:
    from bot.app import display_names, group_members

    fake.register("users.info", lambda _params: {})  # ok, without the field (a missing scope answers likewise)
    fake.register("usergroups.users.list", lambda _params: {})
    name_of, members_of = display_names(client), group_members(client)
    assert [name_of("U0ADA00001") for _ in range(3)] == [None, None, None]
    assert len(fake.calls_to("users.info")) == 1
    assert [members_of(GROUP) for _ in range(2)] == [[], []]  # who may approve is asked again each time
    assert len(fake.calls_to("usergroups.users.list")) == 2
