"""Malformed Slack requests over real HTTP: 401 or 400 with a reason, never a 500; HEAD /healthz answers."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import requests
import test_slack_http as http
from fakes.slack_driver import FORM, SlackDriver, sign
from fakes.slack_fake import SlackFake
from test_slack_http import SECRET, Server, registry_from

slack, bot_env, server, driver, _registry_for = http.slack, http.bot_env, http.server, http.driver, http._registry_for


@pytest.mark.parametrize("timestamp", ["soon", "1" * 5000, "9" * 400, "-1", "1e9", "1.5", "0x10"])
def test_a_malformed_timestamp_is_refused_with_401_and_recorded(driver: SlackDriver, slack: SlackFake,
                                                                timestamp: str) -> None:
    body = driver.command_body("help")
    resp = driver.post(body, FORM, {"X-Slack-Request-Timestamp": timestamp,
                                    "X-Slack-Signature": sign(SECRET, timestamp, body)})
    assert resp.status == 401, resp.text
    refused = registry_from(slack).audit.events(action="request.refused")
    assert [e["details"]["reason"] for e in refused] == ["bad_signature"]


def test_malformed_signed_bodies_get_400(driver: SlackDriver, slack: SlackFake) -> None:
    not_utf8 = b"text=\xff\xfe&command=%2Fml"
    resp = driver.send_signed(not_utf8)
    assert resp.status == 400 and "UTF-8" in resp.body["error"], resp.text
    for payload in (b"payload=%7Bnot+json", b"payload=%5B1%2C2%5D", b"payload="):
        resp = driver.send_signed(payload)
        assert resp.status == 400 and "payload" in resp.body["error"], (payload, resp.text)
    assert driver.command("help").status == 200, "the server still answers"
    assert slack.calls_to("chat.postMessage") == []


def test_head_healthz(server: Server) -> None:
    deadline = time.monotonic() + 30
    while (resp := requests.head(f"{server.url}/healthz", timeout=5)).status_code != 200:
        assert time.monotonic() < deadline, resp.status_code
    assert resp.content == b"" and resp.headers["Content-Type"] == "application/json"


def test_an_unsigned_flood_writes_an_event_a_minute_per_address(driver: SlackDriver, slack: SlackFake) -> None:
    minute = int(time.time() // 60)
    answers = [driver.send_unsigned().status for _ in range(300)]
    answers += [driver.send_forged().status for _ in range(50)]  # the same reason, another message
    assert answers == [401] * 350
    minutes = int(time.time() // 60) - minute + 1
    refused = registry_from(slack).audit.events(action="request.refused", limit=1000)
    # one event per address, reason and minute, whichever of the gunicorn workers took the request
    assert 1 <= len(refused) <= minutes, (len(refused), minutes)
    assert all(e["details"]["count"] >= 1 and e["details"]["remote_addr"] == "127.0.0.1" for e in refused)
    assert registry_from(slack).audit.verify().ok


def test_replicas_share_the_minute_of_a_refused_source(make_registry: Callable[..., Any], db_url: str) -> None:
    one, two = make_registry(db_url), make_registry(db_url)  # two processes' cores on one database

    def refuse(core: Any, source: str, reason: str = "bad_signature") -> bool:
        return core.audit.record_refusal("unknown", reason, "invalid signature", source=source,
                                         details={"remote_addr": source})

    minute = int(time.time() // 60)
    written = [refuse(one, "10.0.0.7"), refuse(two, "10.0.0.7"), refuse(two, "10.0.0.7"), refuse(one, "10.0.0.7"),
               refuse(two, "10.0.0.8"), refuse(one, "10.0.0.7", "no_user")]
    if int(time.time() // 60) != minute:
        pytest.skip("a minute began during the test: its second half may rightly be recorded again")
    assert written == [True, False, False, False, True, True]
    events = one.audit.events(action="request.refused")
    assert sorted((e["details"]["remote_addr"], e["details"]["reason"], e["details"]["count"]) for e in events) == [
        ("10.0.0.7", "bad_signature", 1), ("10.0.0.7", "no_user", 1), ("10.0.0.8", "bad_signature", 1)]


def test_the_limiter_counts_what_it_does_not_record() -> None:
    from model_registry.services.audit_trail import RefusalLimiter

    now = [0.0]
    limiter = RefusalLimiter(window=60.0, clock=lambda: now[0], max_sources=3)
    key = ("10.0.0.1", "bad_signature")
    assert limiter.admit(key) == 1
    assert [limiter.admit(key) for _ in range(5)] == [None] * 5
    assert limiter.admit(("10.0.0.2", key[1])) == 1, "another address is recorded"
    assert limiter.admit((key[0], "no_user")) == 1, "another reason is recorded"
    now[0] = 59.9
    assert limiter.admit(key) is None
    now[0] = 60.0
    assert limiter.admit(key) == 7, "the next record carries this one and the six counted"
    assert limiter.admit(("10.0.0.9", key[1])) == 1  # over max_sources: the quiet ones are forgotten
    assert limiter.admit(key) is None, "a recent one is kept"
