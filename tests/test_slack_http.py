"""End to end over real HTTP: `starchart serve` (gunicorn, Bolt, slack_sdk) against a local fake of Slack.

Signed slash commands, clicks and modal submissions go to the running server; everything the bot says
to Slack lands in the fake, where the tests read it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
from conftest import ROOT, write_config
from fakes.slack_driver import SlackDriver
from fakes.slack_fake import SlackFake

SECRET = "test-signing-secret"
CHANNEL = "C0MLREVIEW"
TRAINER, REQUESTER, APPROVER, GROUP_APPROVER, MALLORY = "U0ALICE", "U0BOB", "U0ERIN", "U0CAROL", "U0MALLORY"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `starchart serve` process (2 gunicorn workers; `extra`: more of serve's flags)."""

    def __init__(self, env: dict[str, str], log: Path, *extra: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen(  # a session of its own: kill() takes the master and its workers at once
            [sys.executable, "-m", "bot.cli", "serve", "--port", str(self.port), "--workers", "2", *extra],
            cwd=ROOT, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException, ValueError):  # not listening yet
                if requests.get(f"{self.url}/healthz", timeout=2).json().get("core") == "ready":
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"starchart serve did not become ready:\n{log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL to every process of the server: nothing finishes, nothing is flushed."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=20)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def slack() -> Iterator[SlackFake]:
    fake = SlackFake(usergroups={"S0REVIEWERS": [GROUP_APPROVER]}, channels={CHANNEL: "ml-review"})
    for user in (TRAINER, REQUESTER, APPROVER, GROUP_APPROVER, MALLORY):
        fake.add_user(user, user.lower(), display_name=user[2:].capitalize())
    with fake:
        yield fake


@pytest.fixture
def bot_env(tmp_path: Path, replay_trainers: Path, slack: SlackFake, db_url: str) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    config = write_config(home, replay_trainers, defaults={
        "channel": CHANNEL, "approvers": [APPROVER, "S0REVIEWERS", REQUESTER, TRAINER],
        "required_approvals": 1})
    return {**os.environ, "SLACK_BOT_TOKEN": slack.token, "SLACK_SIGNING_SECRET": SECRET,
            "SLACK_API_URL": slack.base_url, "STARCHART_HOME": str(home), "STARCHART_CONFIG": str(config),
            "DATABASE_URL": db_url, "STARCHART_FOLLOW_INTERVAL": "0.1", "WEB_THREADS": "8"}


@pytest.fixture
def server(bot_env: dict[str, str], tmp_path: Path) -> Iterator[Server]:
    srv = Server(bot_env, tmp_path / "serve.log")
    yield srv
    srv.stop()


@pytest.fixture
def driver(server: Server, slack: SlackFake) -> Iterator[SlackDriver]:
    d = SlackDriver(server.url, SECRET, response_urls=slack.response_url)
    yield d
    d.close()


def registry(env: dict[str, str]) -> Any:
    from model_registry.bootstrap import bootstrap
    from model_registry.config import ProjectConfig, Settings

    settings = Settings.from_env(env)
    return bootstrap(settings, ProjectConfig.load(settings.config_path))


def said_to(slack: SlackFake, user_text: str, timeout: float = 15) -> dict[str, Any]:
    """The response_url post (ephemeral answer) whose text contains `user_text`."""
    def find() -> Any:
        for r in slack.responses:
            if user_text in json.dumps(r["payload"]):
                return r
        return None
    return slack.wait_for(find, timeout=timeout)


def message_with(slack: SlackFake, needle: str, timeout: float = 30) -> tuple[tuple[str, str], dict[str, Any]]:
    def find() -> Any:
        for key, msg in slack.messages.items():
            if needle in json.dumps(msg):
                return key, msg
        return None
    return slack.wait_for(find, timeout=timeout)


def buttons(message: dict[str, Any]) -> dict[str, str]:
    return {e["action_id"]: e["value"] for b in message.get("blocks", []) if b.get("type") == "actions"
            for e in b["elements"]}


def acked(resp: Any) -> None:
    assert resp.status == 200, (resp.status, resp.text)
    assert resp.elapsed < 3.0, f"ack took {resp.elapsed:.2f}s"


def train_expose_promote(driver: SlackDriver, slack: SlackFake, trained: dict, extra: str = ""
                         ) -> tuple[tuple[str, str], dict[str, Any]]:
    for src, tag in ((trained["iris_a"], "a"), (trained["iris_b"], "b")):
        acked(driver.command(f"train iris — —source={src} —run={tag}", user_id=TRAINER, channel_id=CHANNEL))
        (key, _msg) = message_with(slack, f"--run={tag}")
        slack.wait_for(lambda key=key: "*succeeded*" in json.dumps(slack.messages[key]), timeout=60)
    acked(driver.command("expose iris", user_id=TRAINER, channel_id=CHANNEL))
    said_to(slack, "exposed `v")
    reg = registry_from(slack)
    newest = reg.versions.of_model("iris")["versions"][0]["name"]
    acked(driver.command(f"promote iris {newest} --reason “better” {extra}".strip(), user_id=REQUESTER,
                         channel_id=CHANNEL))
    return message_with(slack, "Review: iris")


_REGISTRIES: dict[int, Any] = {}


def registry_from(slack: SlackFake) -> Any:
    return _REGISTRIES[id(slack)]


@pytest.fixture(autouse=True)
def _registry_for(request: pytest.FixtureRequest) -> Iterator[None]:
    if "bot_env" in request.fixturenames:
        env = request.getfixturevalue("bot_env")
        slack = request.getfixturevalue("slack")
        _REGISTRIES[id(slack)] = registry(env)
        yield
        _REGISTRIES.pop(id(slack)).close()
    else:
        yield


def test_review_flow_end_to_end(driver: SlackDriver, slack: SlackFake, trained: dict, bot_env: dict) -> None:
    (channel, ts), card = train_expose_promote(driver, slack, trained)
    reg = registry_from(slack)
    assert channel == CHANNEL
    value = buttons(card)["review.approve"]
    assert set(buttons(card)) == {"review.approve", "review.reject", "review.try"}
    text = json.dumps(card)
    assert "Parameters" in text and "Metrics" in text and "trained by" in text and "confirm" in text
    base = reg.versions.default("iris")

    acked(driver.block_action("review.approve", value, user_id=REQUESTER, channel_id=channel, message=card))
    said_to(slack, "may not approve")  # the requester
    acked(driver.block_action("review.approve", value, user_id=TRAINER, channel_id=channel, message=card))
    said_to(slack, "trained the candidate")
    acked(driver.block_action("review.approve", value, user_id=MALLORY, channel_id=channel, message=card))
    said_to(slack, "is not an approver")
    assert reg.versions.default("iris") == base

    acked(driver.block_action("review.approve", value, user_id=GROUP_APPROVER, channel_id=channel, message=card))
    slack.wait_for(lambda: ":rocket: applied" in json.dumps(slack.messages[(channel, ts)]), timeout=20)
    updated = slack.messages[(channel, ts)]
    assert "approved by <@U0CAROL>" in json.dumps(updated)
    assert "review.approve" not in buttons(updated), "buttons are replaced by the decision"
    cand = reg.versions.of_model("iris")["versions"][0]["name"]
    assert reg.versions.default("iris") == cand and reg.backend.current_default("iris") == cand
    granted = reg.audit.events(action="approval.granted")[0]
    assert granted["actor"] == GROUP_APPROVER and granted["actor_name"] == "Carol"
    assert granted["channel"] == channel and granted["message_ts"] == ts
    refused = reg.audit.events(action="approval.refused")
    assert sorted(e["details"]["reason"] for e in refused) == ["not_approver", "self_approval", "self_approval"]
    # the same click again (a retry or a replay) changes nothing
    acked(driver.block_action("review.approve", value, user_id=GROUP_APPROVER, channel_id=channel, message=card))
    said_to(slack, "already applied")
    assert [e["action"] for e in reg.audit.events(action="promotion.applied")] == ["promotion.applied"]


def test_reject_opens_a_form_and_records_the_reason(driver: SlackDriver, slack: SlackFake, trained: dict) -> None:
    (channel, ts), card = train_expose_promote(driver, slack, trained)
    reg = registry_from(slack)
    acked(driver.block_action("review.reject", buttons(card)["review.reject"], user_id=APPROVER,
                              channel_id=channel, message=card, trigger_id=driver.trigger_id()))
    view = slack.wait_for(lambda: [c for c in slack.calls_to("views.open")], timeout=10)[0].params["view"]
    assert view["callback_id"] == "review.reject_reason"
    empty = driver.view_submission(view["callback_id"], view["private_metadata"],
                                   {"reason": {"reason": {"type": "plain_text_input", "value": " "}}},
                                   user_id=APPROVER)
    assert empty.status == 200 and empty.body["response_action"] == "errors"
    acked(driver.view_submission(view["callback_id"], view["private_metadata"],
                                 {"reason": {"reason": {"type": "plain_text_input", "value": "loss went up"}}},
                                 user_id=APPROVER))
    slack.wait_for(lambda: "rejected" in json.dumps(slack.messages[(channel, ts)]), timeout=10)
    assert "loss went up" in json.dumps(slack.messages[(channel, ts)])
    req = reg.promotions.of_model("iris")[0]
    assert req["state"] == "rejected" and req["decisions"][0]["reason"] == "loss went up"


def test_try_opens_a_filled_form_and_shows_both_answers_to_the_person(driver: SlackDriver, slack: SlackFake,
                                                                       trained: dict) -> None:
    (channel, ts), card = train_expose_promote(driver, slack, trained)
    reg = registry_from(slack)
    req = reg.promotions.of_model("iris")[0]
    try:
        acked(driver.block_action("review.try", buttons(card)["review.try"], user_id=MALLORY, channel_id=channel,
                                  message=card, trigger_id=driver.trigger_id()))
        view = slack.wait_for(lambda: [c for c in slack.calls_to("views.open")], timeout=10)[0].params["view"]
        assert view["callback_id"] == "review.try_instance"
        fields = {b["block_id"]: b["element"]["initial_value"] for b in view["blocks"] if b["type"] == "input"}
        assert fields == {"petal_length": "0.0", "petal_width": "0.0", "sepal_length": "0.0", "sepal_width": "0.0"}

        def values(**typed: str) -> dict[str, Any]:
            return {name: {"value": {"type": "plain_text_input", "value": typed.get(name, first)}}
                    for name, first in fields.items()}

        wrong = driver.view_submission(view["callback_id"], view["private_metadata"],
                                       values(petal_width="wide", sepal_length="1e400"), user_id=MALLORY)
        assert wrong.status == 200 and wrong.body["response_action"] == "errors"
        assert set(wrong.body["errors"]) == {"petal_width", "sepal_length"}, wrong.body
        assert "type a number (float32), not 'wide'" in wrong.body["errors"]["petal_width"]
        assert slack.ephemerals == [], "nothing ran for a refused form"
        acked(driver.view_submission(view["callback_id"], view["private_metadata"],
                                     values(sepal_length="6.7", sepal_width="3.0", petal_length="5.2",
                                            petal_width="2.3"), user_id=MALLORY))
        shown = slack.wait_for(lambda: [e for e in slack.ephemerals if "vs the default" in json.dumps(e)],
                               timeout=60)[0]
        assert shown["user"] == MALLORY and shown["channel"] == channel
        text = json.dumps(shown)
        assert f"{req['candidate']} vs the default {req['base']}" in text and "agreement: " in text
        assert reg.promotions.get(req["id"])["state"] == "open", "trying decides nothing"
    finally:
        reg.backend.stop_server()


def test_large_diff_goes_to_thread_and_file(driver: SlackDriver, slack: SlackFake, trained: dict) -> None:
    src = trained["iris_a"]
    many = " ".join(f"—p{i:02d}={i}" for i in range(12))
    acked(driver.command(f"train iris — —source={src} {many}", user_id=TRAINER, channel_id=CHANNEL))
    (key, _m) = message_with(slack, "--p11=11")
    slack.wait_for(lambda: "*succeeded*" in json.dumps(slack.messages[key]), timeout=60)
    acked(driver.command(f"train iris — —source={src}", user_id=TRAINER, channel_id=CHANNEL))
    slack.wait_for(lambda: len([m for m in slack.messages.values() if "*succeeded*" in json.dumps(m)]) == 2,
                   timeout=60)
    acked(driver.command("expose iris", user_id=TRAINER, channel_id=CHANNEL))
    said_to(slack, "exposed `v")
    reg = registry_from(slack)
    newest = reg.versions.of_model("iris")["versions"][0]["name"]
    acked(driver.command(f"promote iris {newest}", user_id=REQUESTER, channel_id=CHANNEL))
    (channel, ts), card = message_with(slack, "Review: iris")
    assert "and 4 more" in json.dumps(card)
    upload = slack.wait_for(lambda: [u for u in slack.uploads if "-diff." in u["filename"] and u["filename"].endswith(".txt")], timeout=10)[0]
    assert upload["thread_ts"] == ts and b"p11" in upload["content"]


def test_bad_requests_are_refused_and_recorded(driver: SlackDriver, slack: SlackFake, trained: dict,
                                               server: Server) -> None:
    reg = registry_from(slack)
    for resp in (driver.send_forged(), driver.send_unsigned(), driver.send_stale()):
        assert resp.status == 401
    # one source, one reason: one event a minute (the other two only counted in the log), unless a minute began
    refused = reg.audit.events(action="request.refused")
    assert {e["details"]["reason"] for e in refused} == {"bad_signature"} and 1 <= len(refused) <= 2
    assert slack.calls_to("chat.postMessage") == []

    acked(driver.command("traim iris", user_id=TRAINER, channel_id=CHANNEL))
    said_to(slack, "did you mean train")
    acked(driver.command("train irs", user_id=TRAINER, channel_id=CHANNEL))
    said_to(slack, "did you mean iris")
    acked(driver.command("train iris -- " + "x" * 40_000, user_id=TRAINER, channel_id=CHANNEL))
    said_to(slack, "characters long")
    acked(driver.command("promote iris v1 --reason \"unclosed", user_id=TRAINER, channel_id=CHANNEL))
    said_to(slack, "close every quote")

    (channel, ts), card = train_expose_promote(driver, slack, trained)
    value = json.loads(buttons(card)["review.approve"])
    before = len(reg.audit.events(limit=1000))
    acked(driver.block_action("review.approve", "{not json", user_id=APPROVER, channel_id=channel, message=card))
    said_to(slack, "malformed")
    acked(driver.block_action("review.approve", json.dumps({**value, "m": "sentiment"}), user_id=APPROVER,
                              channel_id=channel, message=card))
    said_to(slack, "that button names sentiment")
    acked(driver.block_action("review.approve", json.dumps({**value, "r": 424242}), user_id=APPROVER,
                              channel_id=channel, message=card))
    said_to(slack, "no promotion request #424242")
    acked(driver.block_action("review.approve", json.dumps({**value, "d": "f" * 64}), user_id=APPROVER,
                              channel_id=channel, message=card))
    said_to(slack, "does not belong to the card")
    acked(driver.block_action("review.nuke", "{}", user_id=APPROVER, channel_id=channel, message=card))
    said_to(slack, "not one this bot knows")
    slack.wait_for(lambda: len(reg.audit.events(limit=1000)) >= before + 5, timeout=10)
    reasons = sorted(e["details"].get("reason") for e in reg.audit.events(limit=1000)[: len(
        reg.audit.events(limit=1000)) - before])
    assert reasons == ["card_mismatch", "malformed_value", "model_mismatch", "not_found", "unknown_action"]
    assert reg.promotions.of_model("iris")[0]["state"] == "open", "nothing changed"


def test_several_bot_processes_apply_once(bot_env: dict, slack: SlackFake, trained: dict, tmp_path: Path,
                                          server: Server, driver: SlackDriver) -> None:
    second = Server(bot_env, tmp_path / "serve2.log")
    try:
        (channel, ts), card = train_expose_promote(driver, slack, trained)
        value = buttons(card)["review.approve"]
        other = SlackDriver(second.url, SECRET, response_urls=slack.response_url)
        clicks = [(d, u) for u in (APPROVER, GROUP_APPROVER, APPROVER) for d in (driver, other)]
        with ThreadPoolExecutor(len(clicks)) as pool:
            results = list(pool.map(lambda du: du[0].block_action("review.approve", value, user_id=du[1],
                                                                  channel_id=channel, message=card), clicks))
        assert all(r.status == 200 and r.elapsed < 3 for r in results)
        reg = registry_from(slack)
        slack.wait_for(lambda: reg.promotions.of_model("iris")[0]["state"] == "applied", timeout=20)
        time.sleep(1.0)  # let every replica finish its background work
        req = reg.promotions.of_model("iris")[0]
        assert len(req["decisions"]) == 1
        assert len(reg.audit.events(action="promotion.applying")) == 1
        assert len(reg.audit.events(action="promotion.applied")) == 1
        assert reg.audit.verify().ok
        other.close()
    finally:
        second.stop()


def test_healthz_and_unknown_routes(server: Server) -> None:
    answers = [requests.get(f"{server.url}/healthz", timeout=5).json() for _ in range(20)]
    assert all(a["ok"] and a["core"] in ("ready", "loading") for a in answers)  # a worker may still be loading
    deadline = time.monotonic() + 30
    while requests.get(f"{server.url}/healthz", timeout=5).json() != {"ok": True, "core": "ready"}:
        assert time.monotonic() < deadline
    assert requests.get(f"{server.url}/nope", timeout=5).status_code == 404


def test_unknown_channel_is_reported_and_nothing_is_lost(driver: SlackDriver, slack: SlackFake,
                                                        trained: dict) -> None:
    slack.strict_channels = True
    reg = registry_from(slack)
    acked(driver.command(f"train iris — —source={trained['iris_a']}", user_id=TRAINER, channel_id="C0GHOST"))
    # the training message goes through the outbox: the person who trained is told in a direct message
    told = slack.wait_for(lambda: [m for m in slack.messages_in(TRAINER) if "channel_not_found" in json.dumps(m)],
                          timeout=15)
    assert "the channel does not exist" in json.dumps(told)
    job = reg.jobs.state("iris")[0]
    assert job["state"] in ("QUEUED", "RUNNING", "SUCCEEDED"), "the job itself was started and is recorded"
    def only_the_failed() -> list[dict[str, Any]] | None:  # the direct message's row is marked delivered once
        rows = reg.outbox.undelivered()                      # Slack's answer is in, a moment after Slack has it
        return rows if rows and all(r["state"] == "failed" for r in rows) else None

    (stopped,) = slack.wait_for(only_the_failed, timeout=30)
    assert (stopped["kind"], stopped["subject"], stopped["state"], stopped["error"]) == (
        "training", job["job_id"], "failed", "channel_not_found")


def test_prediction_api_and_slash_predict_over_http(driver: SlackDriver, slack: SlackFake, trained: dict,
                                                    server: Server) -> None:
    """TF Serving's REST shape on `starchart serve` (which never imports TensorFlow: the local model server
    answers), and /ml predict as a Slack client sends it."""
    reg = registry_from(slack)
    job = reg.jobs.train("iris", TRAINER, args=[f"--source={trained['iris_a']}"])
    assert reg.jobs.wait(job["job_id"])["state"] == "SUCCEEDED"
    reg.versions.expose("iris", TRAINER)
    version = reg.versions.default("iris")
    flower = {"sepal_length": 6.7, "sepal_width": 3.0, "petal_length": 5.2, "petal_width": 2.3}
    try:
        ok = requests.post(f"{server.url}/v1/models/iris:predict", json={"instances": [flower, flower]}, timeout=120)
        assert ok.status_code == 200, ok.text
        preds = ok.json()["predictions"]
        assert len(preds) == 2 and preds[0]["class_ids"] in (0, 1, 2) and len(preds[0]["probabilities"]) == 3
        assert ok.headers["X-Model-Version"] == version, "the version that answered, through starchart serve"
        named = requests.post(f"{server.url}/v1/models/iris/versions/{version}:predict", json={"instances": [flower]},
                              timeout=60)
        # the same instance alone and in a batch of two: the same class, probabilities equal to float32's rounding
        # (the kernels TensorFlow picks for one row and for two do not add up in the same order)
        alone = named.json()["predictions"]
        assert [p["class_ids"] for p in alone] == [preds[0]["class_ids"]] and named.headers["X-Model-Version"] == version
        assert alone[0]["probabilities"] == pytest.approx(preds[0]["probabilities"], rel=1e-5, abs=1e-7)
        status = requests.get(f"{server.url}/v1/models/iris", timeout=30)
        assert status.json()["model_version_status"][0]["version"] == version == status.headers["X-Model-Version"]
        bad = requests.post(f"{server.url}/v1/models/iris:predict", data=b'{"instances": [', timeout=30)
        assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]
        missing = requests.post(f"{server.url}/v1/models/iris:predict", json={"instances": [{"sepal_length": 1}]},
                                timeout=30)
        assert missing.status_code == 400 and "missing input(s)" in missing.json()["error"]
        assert requests.post(f"{server.url}/v1/models/nosuch:predict", json={"instances": [1]},
                             timeout=30).status_code == 404
        assert requests.post(f"{server.url}/v1/models/iris/versions/v20990101000000:predict",
                             json={"instances": [flower]}, timeout=30).status_code == 404

        acked(driver.command("predict iris {“sepal_length”: 6.7, “sepal_width”: 3.0, “petal_length”: 5.2, "
                             "“petal_width”: 2.3}", user_id=MALLORY, channel_id=CHANNEL))
        answer = said_to(slack, f"Predictions of iris {version}", timeout=60)
        assert answer["payload"].get("response_type", "ephemeral") == "ephemeral"
        assert "probabilities" in json.dumps(answer["payload"])

        acked(driver.command("pull iris", user_id=MALLORY, channel_id=CHANNEL))
        upload = slack.wait_for(lambda: [u for u in slack.uploads if u["filename"].endswith(".tar.gz")], timeout=60)[0]
        assert upload["filename"] == f"iris-{version}.tar.gz" and upload["channel"] == CHANNEL
        import io
        import tarfile

        with tarfile.open(fileobj=io.BytesIO(upload["content"])) as tar:
            assert f"iris-{version}/saved_model.pb" in tar.getnames()
    finally:
        reg.backend.stop_server()


def test_slash_pull_tflite_posts_the_checked_file(driver: SlackDriver, slack: SlackFake, trained: dict,
                                                  tmp_path: Path) -> None:
    """/ml pull MODEL --format tflite (as a Slack client sends it): the .tflite goes to the channel, with what was
    checked; a model the converter cannot handle is refused in a message of its own."""
    reg = registry_from(slack)
    job = reg.jobs.train("iris", TRAINER, args=[f"--source={trained['iris_a']}"])
    assert reg.jobs.wait(job["job_id"])["state"] == "SUCCEEDED"
    reg.versions.expose("iris", TRAINER)
    version = reg.versions.default("iris")
    acked(driver.command("pull iris —format tflite", user_id=MALLORY, channel_id=CHANNEL))
    upload = slack.wait_for(lambda: [u for u in slack.uploads if u["filename"].endswith(".tflite")], timeout=120)[0]
    assert upload["filename"] == f"iris-{version}.tflite" and upload["channel"] == CHANNEL
    comment = upload["initial_comment"]
    assert comment.startswith(f"iris-{version}.tflite: iris {version} as TensorFlow Lite, {len(upload['content']):,} "
                              "bytes, checked against the SavedModel on 16 instances of test values built from the "
                              "signature: max abs difference "), comment
    assert "(tolerance: max abs difference 1e-4 for float outputs, equal for integer" in comment
    path = tmp_path / "posted.tflite"
    path.write_bytes(upload["content"])
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(path)).get_signature_runner("serving_default")
    flower = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
    out = runner(**{k: np.array([v], np.float32) for k, v in flower.items()})
    assert int(out["class_ids"][0]) in (0, 1, 2) and out["probabilities"].shape == (1, 3)

    acked(driver.command("pull iris —format onnx", user_id=MALLORY, channel_id=CHANNEL))
    refused = said_to(slack, "onnx", timeout=30)
    assert "tflite" in json.dumps(refused["payload"]), "the formats there are"


def test_prediction_api_token(bot_env: dict, tmp_path: Path) -> None:
    """With STARCHART_PREDICT_TOKEN set, the prediction routes want it (checked before any work)."""
    srv = Server({**bot_env, "STARCHART_PREDICT_TOKEN": "s3cret"}, tmp_path / "serve-token.log")
    try:
        refused = requests.get(f"{srv.url}/v1/models/iris", timeout=30)
        assert refused.status_code == 401 and "Bearer" in refused.json()["error"]
        wrong = requests.get(f"{srv.url}/v1/models/iris", headers={"Authorization": "Bearer nope"}, timeout=30)
        assert wrong.status_code == 401
        allowed = requests.get(f"{srv.url}/v1/models/iris", headers={"Authorization": "Bearer s3cret"}, timeout=30)
        assert allowed.status_code == 404 and "no default version" in allowed.json()["error"]
    finally:
        srv.stop()


def test_serve_killed_during_a_training_loses_no_update(bot_env: dict, slack: SlackFake, trained: dict,
                                                         tmp_path: Path, server: Server, driver: SlackDriver) -> None:
    """SIGKILL to `starchart serve` while a training runs: a restarted serve finishes its message."""
    reg = registry_from(slack)
    acked(driver.command(f"train iris — —source={trained['iris_a']} —sleep=3", user_id=TRAINER, channel_id=CHANNEL))
    key, _posted = message_with(slack, "--sleep=3")
    job_id = reg.jobs.state("iris")[0]["job_id"]
    status = reg.settings.home / "jobs" / job_id / "status.json"
    slack.wait_for(lambda: status.exists() and '"RUNNING"' in status.read_text(), timeout=30)  # submitted, training
    server.kill()
    slack.wait_for(lambda: status.exists() and '"SUCCEEDED"' in status.read_text(), timeout=60)
    time.sleep(0.5)  # nobody is left to notice: the message still says what it said before the kill
    assert "*succeeded*" not in json.dumps(slack.messages[key])
    again = Server(bot_env, tmp_path / "serve-again.log")
    try:
        slack.wait_for(lambda: "*succeeded*" in json.dumps(slack.messages[key]), timeout=60)
        # Slack has the update; its row is marked delivered once Slack's answer is in
        slack.wait_for(lambda: reg.outbox.undelivered() == [], timeout=30)
    finally:
        again.stop()
    assert len([m for m in slack.messages.values() if "--sleep=3" in json.dumps(m)]) == 1, "updated, not reposted"
