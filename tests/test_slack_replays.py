"""Replays over real HTTP: a signed request already taken is acked and not acted on again, on any replica."""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Any

import test_slack_http as http
from fakes.slack_driver import SlackDriver
from fakes.slack_fake import SlackFake
from test_slack_http import CHANNEL, SECRET, TRAINER, Server, acked, registry_from

slack, bot_env, server, driver, _registry_for = http.slack, http.bot_env, http.server, http.driver, http._registry_for


def _trainings(slack: SlackFake) -> list[dict]:
    return registry_from(slack).audit.events(action="training.requested", limit=100)


def test_a_replayed_signed_train_does_not_start_a_second_training(driver: SlackDriver, slack: SlackFake,
                                                                  trained: dict, bot_env: dict,
                                                                  tmp_path: Path) -> None:
    body = driver.command_body(f"train iris — —source={trained['iris_a']}", user_id=TRAINER, channel_id=CHANNEL)
    headers = driver.signed_headers(body)
    acked(driver.post(body, headers=headers))
    slack.wait_for(lambda: len(_trainings(slack)) == 1, timeout=30)
    for _ in range(3):  # the same signed request again, within the five minutes
        acked(driver.post(body, headers=headers))
    second = Server(bot_env, tmp_path / "serve2.log")  # another replica shares what was taken
    try:
        other = SlackDriver(second.url, SECRET, response_urls=slack.response_url)
        acked(other.post(body, headers=headers))
        other.close()
        time.sleep(2.0)  # time enough for a second training to be requested, were it acted on
        assert len(_trainings(slack)) == 1
        assert len(registry_from(slack).jobs.state("iris")) == 1
        posted = [c for c in slack.calls_to("chat.postMessage") if "--run" in json.dumps(c.params)
                  or "iris" in json.dumps(c.params)]
        assert len(posted) == 1, "one training message"
    finally:
        second.stop()


def test_slacks_retries_are_not_acted_on_twice(driver: SlackDriver, slack: SlackFake) -> None:
    body = driver.command_body("help", user_id=TRAINER, channel_id=CHANNEL)
    retried = {**driver.signed_headers(body), "X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"}
    acked(driver.post(body, headers=retried))
    acked(driver.command("help", user_id=TRAINER, channel_id=CHANNEL))
    slack.wait_for(lambda: slack.responses, timeout=10)
    time.sleep(1.0)
    assert len(slack.responses) == 1, "the retry was acked and dropped; the fresh command was answered"


def test_a_replay_is_told_apart_without_garbage_for_the_collector(make_registry: Any, db_url: str) -> None:
    """A taken signature is a conflict the insert skips, not an IntegrityError: an error's traceback and
    SQLAlchemy's frames are reference cycles, freed only by the full collections that hold every ack up."""
    reg = make_registry(db_url)
    assert reg.audit.first_sight("v0=" + "a" * 64)
    gc.collect()
    gc.disable()
    try:
        taken = [reg.audit.first_sight("v0=" + "a" * 64) for _ in range(20)]
        freed = gc.collect()
    finally:
        gc.enable()
    assert taken == [False] * 20
    assert freed < 300, f"20 replays left {freed} objects in reference cycles"


def test_a_mark_past_its_window_is_dropped_and_the_signature_is_new_again(make_registry: Any, db_url: str) -> None:
    reg = make_registry(db_url)
    first, other = "v0=" + "b" * 64, "v0=" + "c" * 64
    assert reg.audit.first_sight(first, window=600.0)
    assert not reg.audit.first_sight(first, window=600.0)
    time.sleep(0.05)
    assert reg.audit.first_sight(other, window=0.01)  # drops the marks older than 10 ms on the way: `first`'s
    assert reg.audit.first_sight(first, window=600.0)
    assert not reg.audit.first_sight(other, window=600.0)  # a mark within its window stays
