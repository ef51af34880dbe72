"""The outbox: messages recorded with their state changes and delivered to the Slack fake over real HTTP, through
rate limits, Slack's 5xx, lost replies, concurrent senders and permanent errors, on SQLite and PostgreSQL."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Iterator

import pytest
from conftest import ROOT, replay_args
from fakes.slack_fake import SlackFake
from sqlalchemy import delete, event, select, update

from bot.cli import main
from bot.delivery import OUTBOX_EVENT, JobWatch, Sender, sender_client
from model_registry.adapters import outbox
from model_registry.adapters.records import OutboxMessage, PromotionRequest
from model_registry.config import SlackSettings
from model_registry.domain.names import utcnow

CHANNEL, PERSON = "C0MLOUT", "U0ADA"


@pytest.fixture
def slack() -> Iterator[SlackFake]:
    fake = SlackFake(channels={CHANNEL: "ml", "C0NIGHTLY": "nightly"})
    fake.add_user(PERSON, "ada")
    with fake:
        yield fake


def _client(slack: SlackFake) -> Any:
    return sender_client(SlackSettings.from_env({"SLACK_API_URL": slack.base_url, "SLACK_BOT_TOKEN": slack.token}))


def _sender(reg: Any, slack: SlackFake, **kw: Any) -> Sender:
    return Sender(reg, _client(slack), **{"backoff": 0.05, "poll": 0.05, **kw})


def _row(reg: Any, kind: str, subject: str) -> dict[str, Any]:
    found = reg.outbox.about(kind, subject)
    assert found is not None, (kind, subject)
    return found


def _posts_of(slack: SlackFake, outbox_id: int) -> list[Any]:
    """The chat.postMessage calls that carried this outbox id in their metadata."""
    return [c for c in slack.calls_to("chat.postMessage")
            if (c.params.get("metadata") or {}).get("event_payload", {}).get("outbox_id") == outbox_id]


_SUBJECTS = itertools.count()


def _checkpoints(reg: Any, n: int, channel: str = CHANNEL, notify: str | None = PERSON) -> list[int]:
    """`n` checkpoint messages recorded as the core records them (each about a checkpoint of its own)."""
    ids = []
    with reg.db.unit_of_work() as s:
        for _ in range(n):
            i = next(_SUBJECTS)
            cp = {"count": i, "head": f"{i:064x}", "at": "2026-12-08T10:00:00Z", "sig": None}
            ids.append(outbox.record(s, outbox.CHECKPOINT, f"cp#{i}", channel, notify=notify,
                                     payload={"checkpoint": cp}).id)
    return ids


def _run_until(step: Any, done: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "not done in time"
        step()
        time.sleep(0.02)


def test_training_message_ends_succeeded_through_429_and_500s(make_registry: Any, db_url: str, trained: dict,
                                                              slack: SlackFake) -> None:
    reg = make_registry(db_url)
    slack.fail_next("chat.postMessage", "ratelimited", status=429, retry_after=1)
    slack.fail_next("chat.postMessage", "internal_error", status=500)
    slack.fail_next("chat.update", "service_unavailable", status=503, times=2)
    job = reg.jobs.train("iris", PERSON, args=replay_args(trained["iris_a"]), message_channel=CHANNEL)
    sender = _sender(reg, slack)
    sender.deliver_due()  # the 429: the next attempt waits as long as Slack said, kept in the row
    row = _row(reg, "training", job["job_id"])
    assert row["state"] == "pending" and row["last_error"] == "ratelimited" and row["attempts"] == 1
    with reg.db.reads() as s:
        tried, following = s.execute(select(OutboxMessage.first_attempt_at, OutboxMessage.next_attempt_at)
                                     .where(OutboxMessage.id == row["id"])).one()
    assert following - tried >= timedelta(seconds=1), "Retry-After honoured"
    sender.start()
    watch = JobWatch(reg, interval=0.05).start()
    try:
        key = slack.wait_for(lambda: next((k for k, m in slack.messages.items() if "*succeeded*" in json.dumps(m)),
                                          None), timeout=60)
    finally:
        sender.stop()
        watch.stop()
    assert reg.jobs.get(job["job_id"])["state"] == "SUCCEEDED"
    assert len(_posts_of(slack, row["id"])) == 3, "429, 500, then the post"
    assert len([m for m in slack.messages.values() if job["job_id"] in json.dumps(m)]) == 1, "one message"
    assert "accuracy" in json.dumps(slack.messages[key])
    done = _row(reg, "training", job["job_id"])
    assert (done["posted_channel"], done["ts"], done["state"]) == (key[0], key[1], "delivered")


def test_a_post_whose_reply_was_lost_is_found_and_not_posted_again(make_registry: Any, db_url: str,
                                                                   slack: SlackFake) -> None:
    reg = make_registry(db_url)
    (message_id,) = _checkpoints(reg, 1)
    slack.lose_reply_next("chat.postMessage")
    sender = _sender(reg, slack)
    sender.deliver_due()  # Slack applied the post; its answer never came
    assert len(slack.messages_in(CHANNEL)) == 1
    assert reg.outbox.get(message_id)["state"] == "pending"
    _run_until(sender.deliver_due, lambda: reg.outbox.get(message_id)["state"] == "delivered")
    assert len(_posts_of(slack, message_id)) == 1, "looked up, not posted again"
    (history,) = slack.calls_to("conversations.history")
    assert history.params["channel"] == CHANNEL and history.params["include_all_metadata"] in ("true", "1", True)
    (posted,) = slack.messages_in(CHANNEL)
    assert posted["metadata"] == {"event_type": OUTBOX_EVENT, "event_payload": {"outbox_id": message_id}}
    assert reg.outbox.get(message_id)["ts"] == posted["ts"]


def test_an_update_wanted_where_a_sender_runs_is_handed_to_it_without_a_claim(make_registry: Any, db_url: str,
                                                                               slack: SlackFake) -> None:
    reg = make_registry(db_url)
    idle, busy = _checkpoints(reg, 2)
    _run_until(_sender(reg, slack).deliver_due, lambda: not reg.outbox.undelivered())
    with reg.db.unit_of_work() as s:  # another sender holds `busy` (a live lease of its own)
        s.execute(update(OutboxMessage).where(OutboxMessage.id == busy).values(
            lease_owner="elsewhere:2", lease_until=utcnow() + timedelta(minutes=5)))
    sender = _sender(reg, slack, owner="here:1")
    handed: list[dict[str, Any]] = []
    reg.db.after_message.append(handed.extend)
    reg.db.sender = (sender.owner, 60.0)  # as Sender.start() sets it, without its thread
    subjects = [reg.outbox.get(i)["subject"] for i in (idle, busy)]
    with reg.db.unit_of_work() as s:
        assert outbox.want_update(s, outbox.CHECKPOINT, subjects) == 2
    assert [(m["id"], m["wanted"], m["delivered"], m["attempts"]) for m in handed] == [(idle, 2, 1, 2)]
    with reg.db.reads() as s:
        owners = dict(s.execute(select(OutboxMessage.id, OutboxMessage.lease_owner)).all())
    assert owners == {idle: "here:1", busy: "elsewhere:2"}, "leased in the transaction that wanted the update"
    sender.wake(handed)
    claims = []
    original = reg.outbox.claim
    reg.outbox.claim = lambda *a, **kw: claims.append(a) or original(*a, **kw)
    sender.deliver_due()
    assert reg.outbox.get(idle)["state"] == "delivered" and len(slack.calls_to("chat.update")) == 1
    assert len(claims) == 1, "the handed update needed no claim (the one claim found nothing due)"
    assert reg.outbox.get(busy)["state"] == "pending", "left to the sender that holds it"


def test_two_senders_deliver_each_message_exactly_once(make_registry: Any, db_url: str, slack: SlackFake,
                                                       tmp_path: Path) -> None:
    first = make_registry(db_url)
    second = make_registry(db_url, home=tmp_path / "home")  # another process's core: its own engine and pool
    ids = _checkpoints(first, 24)
    slack.delay_seconds = 0.01  # each call takes a moment: the senders overlap
    senders = [_sender(first, slack), _sender(second, slack)]
    threads = [threading.Thread(target=s.deliver_due) for s in senders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(first.outbox.get(i)["state"] == "delivered" for i in ids)
    assert [len(_posts_of(slack, i)) for i in ids] == [1] * len(ids)
    assert len(slack.messages_in(CHANNEL)) == len(ids)


def test_permanent_errors_stop_one_message_tell_the_person_and_others_go_on(
        make_registry: Any, db_url: str, slack: SlackFake, capsys: Any, monkeypatch: Any) -> None:
    reg = make_registry(db_url)
    slack.add_channel("C0NOTIN", "secret-ml", is_member=False)
    stuck, fine = _checkpoints(reg, 1, channel="C0NOTIN")[0], _checkpoints(reg, 1, channel="C0NIGHTLY")[0]
    _run_until(_sender(reg, slack).deliver_due, lambda: not [m for m in reg.outbox.undelivered()
                                                              if m["state"] == "pending"])
    failed = reg.outbox.get(stuck)
    assert (failed["state"], failed["error"], failed["attempts"]) == ("failed", "not_in_channel", 1)
    assert "invite the bot" in failed["last_error"]
    assert reg.outbox.get(fine)["state"] == "delivered" and len(slack.messages_in("C0NIGHTLY")) == 1
    (told,) = slack.messages_in(PERSON)  # a direct message to the person, with what to do
    assert "could not post the audit checkpoint in <#C0NOTIN>: not_in_channel" in json.dumps(told)
    assert "invite the bot to the channel" in json.dumps(told)
    monkeypatch.setenv("STARCHART_HOME", str(reg.settings.home))
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("STARCHART_CONFIG", str(reg.settings.config_path))
    monkeypatch.setenv("SLACK_BOT_TOKEN", slack.token)
    assert main(["outbox"]) == 1
    listed = capsys.readouterr().out
    assert f"#{stuck} checkpoint {failed['subject']} → C0NOTIN: failed (not_in_channel)" in listed
    assert "invite the bot to the channel" in listed and "starchart outbox --retry" in listed
    slack.add_channel("C0NOTIN", "secret-ml")  # the bot was invited
    assert main(["outbox", "--retry", str(stuck)]) == 0
    _run_until(_sender(reg, slack).deliver_due, lambda: reg.outbox.get(stuck)["state"] == "delivered")
    assert main(["outbox"]) == 0 and "Every message has been delivered" in capsys.readouterr().out


def test_a_revoked_token_is_recorded_and_delivery_resumes_with_a_good_one(make_registry: Any, db_url: str,
                                                                         slack: SlackFake) -> None:
    reg = make_registry(db_url)
    (message_id,) = _checkpoints(reg, 1)
    slack.revoke(slack.token)
    _sender(reg, slack).deliver_due()
    failed = reg.outbox.get(message_id)
    assert (failed["state"], failed["error"]) == ("failed", "token_revoked")
    assert "SLACK_BOT_TOKEN was revoked" in failed["last_error"]
    assert reg.outbox.about("notice", str(message_id)) is None, "a direct message could not go either"
    slack.restore(slack.token)
    (later,) = _checkpoints(reg, 1)
    reg.outbox.retry_failed()
    _run_until(_sender(reg, slack).deliver_due, lambda: reg.outbox.undelivered() == [])
    assert len(_posts_of(slack, message_id)) == 2 and len(_posts_of(slack, later)) == 1


def test_a_card_whose_request_was_deleted_and_a_malformed_message_are_recorded(
        make_registry: Any, db_url: str, slack: SlackFake, two_versions_of: Any) -> None:
    reg = two_versions_of(make_registry(db_url, defaults={"channel": CHANNEL}))
    cand = reg.versions.of_model("iris")["versions"][0]["name"]
    req = reg.promotions.promote("iris", cand, PERSON, card=True)
    with reg.db.unit_of_work() as s:
        s.execute(delete(PromotionRequest).where(PromotionRequest.id == req["id"]))
        broken = outbox.record(s, outbox.CHECKPOINT, "broken", CHANNEL, notify=PERSON, payload={"checkpoint": 7}).id
    (good,) = _checkpoints(reg, 1)
    _run_until(_sender(reg, slack).deliver_due, lambda: not [m for m in reg.outbox.undelivered()
                                                              if m["state"] == "pending"])
    gone = _row(reg, "review_card", str(req["id"]))
    assert (gone["state"], gone["error"]) == ("failed", "record_not_found")
    assert f"no promotion request #{req['id']}" in gone["last_error"]
    charts = _row(reg, "card_charts", str(req["id"]))
    assert (charts["state"], charts["error"]) == ("failed", "card_failed"), "stopped with its card"
    assert reg.outbox.get(broken)["error"] == "malformed_payload"
    assert reg.outbox.get(good)["state"] == "delivered"
    told = json.dumps(slack.messages_in(PERSON))
    assert f"review card of promotion request #{req['id']}" in told and "record it was about is gone" in told
    assert "charts" not in told, "the card's failure was told once"


def test_a_scheduled_retrain_card_arrives_once_through_faults(make_registry: Any, db_url: str, trained: dict,
                                                              slack: SlackFake) -> None:
    from bot.worker import one_pass

    reg = make_registry(db_url, defaults={"channel": "C0NIGHTLY"}, models={"iris": {
        "auto_expose": True, "auto_review": True, "gate": {"metric": "accuracy", "min_delta": -0.5}}})
    first = reg.jobs.train("iris", "U_T", args=replay_args(trained["iris_a"]))
    reg.jobs.wait(first["job_id"])
    reg.versions.expose("iris", "U_T")
    view = reg.schedules.set("iris", "0 3 * * *", "U_OPS", replay_args(trained["iris_b"]))
    (job,) = reg.schedules.run_due(datetime.fromisoformat(view["next_run_at"][:-1]) + timedelta(seconds=1))
    reg.jobs.wait(job["job_id"])
    slack.fail_next("chat.postMessage", "internal_error", status=500)
    slack.lose_reply_next("chat.postMessage")  # then applied, with its reply lost
    slack.fail_next("chat.update", "ratelimited", status=429, retry_after=0)
    sender = _sender(reg, slack)
    assert one_pass(reg, sender=sender)["reviews"] == 1
    (req,) = reg.promotions.of_model("iris")
    card = _row(reg, "review_card", str(req["id"]))
    exposed = _row(reg, "nightly", f"exposed:iris/{req['candidate']}")  # recorded first, posted first
    _run_until(lambda: one_pass(reg, sender=sender), lambda: not reg.outbox.undelivered())
    (posted,) = [m for m in slack.messages_in("C0NIGHTLY") if "Review: iris" in m["text"]]
    assert len(slack.messages_in("C0NIGHTLY")) == 2, "the exposed version's message and the card, once each"
    assert len(_posts_of(slack, exposed["id"])) + len(_posts_of(slack, card["id"])) == 3, \
        "the 500 and its retry, the post whose reply was lost; none after it"
    assert slack.calls_to("conversations.history")
    req = reg.promotions.get(req["id"])
    assert (req["channel"], req["message_ts"]) == ("C0NIGHTLY", posted["ts"]), "approvals bind to this card"
    reg.promotions.decide(req["id"], "U_HUMAN", True)
    _run_until(sender.deliver_due, lambda: reg.outbox.get(card["id"])["state"] == "delivered")
    assert "approved" in json.dumps(slack.messages[("C0NIGHTLY", posted["ts"])])


@pytest.mark.parametrize("lost", ["files.completeUploadExternal", "upload"])
def test_a_cards_file_whose_reply_was_lost_is_uploaded_once(make_registry: Any, db_url: str, trained: dict,
                                                            slack: SlackFake, lost: str) -> None:
    """The full diff for a card's thread: a completed upload whose answer was lost is found by files.list (its name
    carries the outbox id) and not uploaded again; bytes whose answer was lost were never shared: uploaded once."""
    from conftest import train_and_wait

    reg = make_registry(db_url, defaults={"channel": CHANNEL})
    for src, extra in ((trained["iris_a"], []), (trained["iris_b"], [f"--p{i:02d}={i}" for i in range(12)])):
        assert train_and_wait(reg, "iris", "U_TRAINER", replay_args(src, *extra))["state"] == "SUCCEEDED"
    reg.versions.expose("iris", "U_TRAINER")
    req = reg.promotions.promote("iris", reg.versions.of_model("iris")["versions"][0]["name"], PERSON, card=True)
    slack.lose_reply_next(lost, when=lambda about: "diff" in str(about).lower())  # the diff's, not the charts'
    _run_until(_sender(reg, slack).deliver_due, lambda: not reg.outbox.undelivered())
    card, diff = _row(reg, "review_card", str(req["id"])), _row(reg, "card_file", str(req["id"]))
    assert (diff["state"], diff["attempts"]) == ("delivered", 2)
    (upload,) = [u for u in slack.uploads if "-diff." in u["filename"]]
    assert upload["filename"] == f"iris-request-{req['id']}-diff.outbox-{diff['id']}.txt"
    assert upload["thread_ts"] == card["ts"] and b"p11" in upload["content"]
    (listed,) = slack.calls_to("files.list")
    assert listed.params["channel"] == CHANNEL and float(listed.params["ts_from"]) < time.time()
    diff_uploads = [c for c in slack.calls_to("files.getUploadURLExternal") if "-diff." in c.params["filename"]]
    assert len(diff_uploads) == (2 if lost == "upload" else 1)


def test_a_sender_killed_while_slack_applies_its_post_does_not_post_twice(
        make_registry: Any, sqlite_url: str, slack: SlackFake, tmp_path: Path) -> None:
    """`starchart worker` is SIGKILLed while its post is applied and unanswered; the next worker finds the post."""
    reg = make_registry(sqlite_url)
    (message_id,) = _checkpoints(reg, 1)
    env = {**os.environ, "STARCHART_HOME": str(reg.settings.home), "DATABASE_URL": sqlite_url,
           "STARCHART_CONFIG": str(reg.settings.config_path), "SLACK_BOT_TOKEN": slack.token,
           "SLACK_API_URL": slack.base_url, "STARCHART_OUTBOX_LEASE": "8"}
    slack.lose_reply_next("chat.postMessage", after=60)
    log = open(tmp_path / "worker.log", "ab")
    worker = subprocess.Popen([sys.executable, "-m", "bot.cli", "worker"], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        slack.wait_for(lambda: slack.messages_in(CHANNEL), timeout=60)  # applied; the worker waits for the answer
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=20)
        assert reg.outbox.get(message_id)["state"] == "pending"
        worker = subprocess.Popen([sys.executable, "-m", "bot.cli", "worker"], cwd=ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
        slack.wait_for(lambda: reg.outbox.get(message_id)["state"] == "delivered", timeout=60)
    finally:
        worker.kill()
        worker.wait(timeout=20)
    assert len(_posts_of(slack, message_id)) == 1 and len(slack.messages_in(CHANNEL)) == 1
    assert slack.calls_to("conversations.history"), "found by its metadata"
    assert reg.outbox.get(message_id)["ts"] == slack.messages_in(CHANNEL)[0]["ts"]


@pytest.fixture
def two_versions_of(trained: dict) -> Any:
    from conftest import expose_two_versions

    return lambda reg: expose_two_versions(reg, trained)


def test_a_decision_hands_its_card_update_with_the_request_read_in_its_transaction(
        make_registry: Any, db_url: str, slack: SlackFake, two_versions_of: Any) -> None:
    reg = two_versions_of(make_registry(db_url, defaults={"channel": CHANNEL}))
    cand = reg.versions.of_model("iris")["versions"][0]["name"]
    req = reg.promotions.promote("iris", cand, "U0REQ", card=True)
    _run_until(_sender(reg, slack).deliver_due, lambda: not reg.outbox.undelivered())
    sender = _sender(reg, slack, owner="here:1")
    handed: list[dict[str, Any]] = []
    reg.db.after_message.append(handed.extend)
    reg.db.sender = (sender.owner, 60.0)  # as Sender.start() sets it, without its thread
    statements: list[str] = []

    def listen(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        statements.append(" ".join(statement.split()[:2]))

    event.listen(reg.db.engine, "before_cursor_execute", listen)
    try:
        reg.promotions.decide(req["id"], PERSON, False, reason="loss is not good enough yet")
    finally:
        event.remove(reg.db.engine, "before_cursor_execute", listen)
    assert statements.count("UPDATE outbox") == 1, "the review card and the canary card wanted in one UPDATE"
    (card,) = handed
    assert card["record"] == reg.promotions.get(req["id"]) and card["record"]["state"] == "rejected"
    reads: list[int] = []
    original = reg.promotions.get
    reg.promotions.get = lambda *a, **kw: reads.append(1) or original(*a, **kw)
    sender.wake(handed)
    sender.deliver_due()
    assert reads == [], "the sender rendered the request as the decision's transaction read it"
    assert reg.outbox.get(card["id"])["state"] == "delivered"
    assert "loss is not good enough yet" in json.dumps(slack.calls_to("chat.update")[-1].params)


def test_each_outcome_claims_the_next_message_in_its_own_transaction(make_registry: Any, db_url: str,
                                                                    slack: SlackFake) -> None:
    reg = make_registry(db_url)
    ids = _checkpoints(reg, 3)
    transactions: list[int] = []
    original = reg.db.unit_of_work
    reg.db.unit_of_work = lambda: transactions.append(1) or original()
    assert _sender(reg, slack).deliver_due() is None
    assert [reg.outbox.get(i)["state"] for i in ids] == ["delivered"] * 3
    assert [len(_posts_of(slack, i)) for i in ids] == [1] * 3
    assert len(transactions) == 1 + len(ids), "one claim, then each post's outcome claimed the next (the last: none)"
