"""A nightly retrain's news other than its review card — a version exposed, a review the gate refused, a training
that did not start or failed — recorded with the change that causes it and posted once to the model's channel
through the Slack fake (over real HTTP), through Slack's 500s and lost replies, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta
from typing import Any, Iterator

import pytest
from conftest import replay_args
from fakes.slack_fake import SlackFake

from bot import blocks
from bot.delivery import Sender, sender_client
from bot.worker import one_pass
from handlers.results import ReviewSkipped
from model_registry.adapters import outbox
from model_registry.config import SlackSettings
from model_registry.domain.errors import BackendError

NIGHTLY = "C0NIGHTLY"


@pytest.fixture
def slack() -> Iterator[SlackFake]:
    with SlackFake(channels={NIGHTLY: "nightly"}) as fake:
        yield fake


def _sender(reg: Any, slack: SlackFake) -> Sender:
    client = sender_client(SlackSettings.from_env({"SLACK_API_URL": slack.base_url, "SLACK_BOT_TOKEN": slack.token}))
    return Sender(reg, client, backoff=0.05, poll=0.05)


def _nightly(reg: Any) -> dict[str, dict[str, Any]]:
    """The nightly messages recorded so far, by their event."""
    found = [m for m in reg.outbox.undelivered() if m["kind"] == outbox.NIGHTLY]
    return {m["payload"]["event"]: m for m in found}


def _deliver_all(reg: Any, sender: Sender, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while reg.outbox.undelivered():
        assert time.monotonic() < deadline, reg.outbox.undelivered()
        one_pass(reg, sender=sender)
        time.sleep(0.02)


def _posts_of(slack: SlackFake, outbox_id: int) -> int:
    return len([c for c in slack.calls_to("chat.postMessage")
                if (c.params.get("metadata") or {}).get("event_payload", {}).get("outbox_id") == outbox_id])


def _said(slack: SlackFake, words: str) -> list[dict[str, Any]]:
    return [m for m in slack.messages_in(NIGHTLY) if words in json.dumps(m)]


def _fire(reg: Any, args: list[str], at: datetime | None = None) -> tuple[list[Any], datetime]:
    """The schedule's next firing (after `at`, else after it was set), as the clock runs it."""
    if at is None:
        view = reg.schedules.set("iris", "0 3 * * *", "U_OPS", args)
        at = datetime.fromisoformat(view["next_run_at"][:-1]) + timedelta(seconds=1)
    else:
        at = at + timedelta(days=1)
    return reg.schedules.run_due(at), at


def test_an_exposed_retrain_and_a_refused_review_are_posted_once_through_a_500_and_a_lost_reply(
        make_registry: Any, db_url: str, trained: dict, slack: SlackFake) -> None:
    reg = make_registry(db_url, defaults={"channel": NIGHTLY}, models={"iris": {
        "auto_expose": True, "auto_review": True, "gate": {"metric": "accuracy", "min_delta": 0.5}}})
    first = reg.jobs.train("iris", "U_T", args=replay_args(trained["iris_a"]))
    reg.jobs.wait(first["job_id"])
    reg.versions.expose("iris", "U_T")
    assert not _nightly(reg), "a person's expose is no nightly news"
    (job,), _ = _fire(reg, replay_args(trained["iris_b"]))
    reg.jobs.wait(job["job_id"])
    slack.fail_next("chat.postMessage", "internal_error", status=500)  # the first message: Slack's 500
    slack.lose_reply_next("chat.postMessage")  # the second: applied, its reply lost
    # the pass records the news; they are read before any delivery (a pass delivering them could also retry
    # the 500's message within itself once its backoff is over, as on a slow machine)
    assert one_pass(reg)["reviews"] == 0, "the gate refused the review"
    (skipped_event,) = reg.audit.events(action="review.skipped")
    news = _nightly(reg)
    assert set(news) == {outbox.EXPOSED, outbox.REVIEW_SKIPPED}
    sender = _sender(reg, slack)
    _deliver_all(reg, sender)
    default, newest = reg.versions.default("iris"), max(v["name"] for v in reg.versions.of_model("iris")["versions"])
    metrics = {v["name"]: v["metrics"]["accuracy"] for v in reg.versions.of_model("iris")["versions"]}

    (exposed,) = _said(slack, "exposed")
    assert f"exposed `{newest}` from `{job['job_id']}`" in exposed["text"] and "accuracy" in json.dumps(exposed)
    assert _posts_of(slack, news[outbox.EXPOSED]["id"]) == 2, "the 500, then the post"

    (refused,) = _said(slack, "was not put up for review")
    shown = json.dumps(refused)
    assert f"`{newest}` was not put up for review" in shown
    assert f"candidate {metrics[newest]:.4g}" in shown and f"default `{default}` {metrics[default]:.4g}" in shown
    assert "gate min_delta +0.5000, higher is better" in shown and "the gate refused it: accuracy changed by" in shown
    assert _posts_of(slack, news[outbox.REVIEW_SKIPPED]["id"]) == 1, "found by its metadata, not posted again"
    assert skipped_event["details"]["gate"]["min_delta"] == 0.5
    assert len(slack.messages_in(NIGHTLY)) == 2 and not reg.promotions.of_model("iris")
    one_pass(reg, sender=sender)
    assert len(slack.messages_in(NIGHTLY)) == 2, "nothing is announced twice"


def test_a_scheduled_training_that_failed_or_did_not_start_is_posted_once(
        make_registry: Any, db_url: str, trained: dict, slack: SlackFake, monkeypatch: Any) -> None:
    reg = make_registry(db_url, defaults={"channel": NIGHTLY}, models={"iris": {"auto_expose": True}})
    (job,), at = _fire(reg, replay_args(trained["iris_a"], "--crash"))
    assert reg.jobs.wait(job["job_id"])["state"] == "FAILED"

    def refused(*_args: Any) -> str:
        raise BackendError("the local backend is out of disk", "free some space")

    monkeypatch.setattr(reg.jobs.backend, "submit", refused)
    assert _fire(reg, replay_args(trained["iris_a"]), at)[0] == [], "submitted, then refused by the backend"
    monkeypatch.undo()
    (reg.config.trainer_base / "iris" / "trainer" / "task.py").unlink()
    assert _fire(reg, replay_args(trained["iris_a"]), at + timedelta(days=1))[0] == [], "no trainer module"
    news = [m for m in reg.outbox.undelivered() if m["kind"] == outbox.NIGHTLY]
    assert [m["payload"]["event"] for m in news] == [outbox.TRAINING_FAILED, outbox.NOT_STARTED, outbox.NOT_STARTED]
    slack.fail_next("chat.postMessage", "internal_error", status=500)  # the failed training's message: a 500
    slack.lose_reply_next("chat.postMessage")  # the next post: applied, its reply lost
    sender = _sender(reg, slack)
    _deliver_all(reg, sender)

    (failed,) = _said(slack, "failed")
    assert f"Scheduled training *{job['job_id']}* of *iris* failed" in json.dumps(failed)
    tail = [b["text"]["text"] for b in failed["blocks"] if b["type"] == "section" and b["text"]["text"].startswith("```")]
    assert len(tail) == 1 and "replay trainer crashed on purpose" in tail[0] and "--- log tail ---" in tail[0]
    disk, module = _said(slack, "did not start")
    assert "the local backend is out of disk" in disk["text"] and "free some space" in json.dumps(disk)
    assert "unknown module" in module["text"] and "the next firing tries again" in json.dumps(module)
    assert [_posts_of(slack, m["id"]) for m in news] == [2, 1, 1], "the 500 and its retry; the lost reply found"
    assert slack.calls_to("conversations.history"), "the post whose reply was lost was looked for"
    assert len(slack.messages_in(NIGHTLY)) == 3, "a job that did not start is told once, not also as failed"


def test_without_a_channel_nothing_is_recorded(make_registry: Any, sqlite_url: str, trained: dict) -> None:
    reg = make_registry(sqlite_url, models={"iris": {"auto_expose": True}})
    (job,), _ = _fire(reg, replay_args(trained["iris_a"], "--crash"))
    reg.jobs.wait(job["job_id"])
    assert reg.outbox.undelivered() == [] and reg.audit.events(action="training.failed")


@pytest.mark.parametrize("candidate, said", [("NaN", "candidate NaN"), (None, "candidate missing")])
def test_a_refused_review_says_nan_or_missing(candidate: Any, said: str) -> None:
    gate = {"metric": "accuracy", "min_delta": -0.01, "base_version": "v20261201000000", "candidate": candidate,
            "base": 0.91, "delta": None, "direction": "higher", "why": "accuracy is NaN (the training diverged)"}
    shown = blocks.render(ReviewSkipped("iris", "v20261202000000", gate))
    text = json.dumps(shown.blocks)
    assert said in text and "default `v20261201000000` 0.91" in text and "gate min_delta -0.0100" in text
    assert "change" not in text, "no delta to a value that is not a number"
