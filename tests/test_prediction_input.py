"""Hostile prediction input over real HTTP: `starchart serve`'s prediction routes and /ml predict refuse it with a
400 naming the input, and the local model server (which checks again, and wants its own secret) stays up."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
from conftest import replay_args, write_config
from fakes.slack_driver import SlackDriver
from fakes.slack_fake import SlackFake
from test_slack_http import CHANNEL, MALLORY, SECRET, Server, acked, registry, said_to

from model_registry.domain.errors import BackendError, InvalidInput

FLOWER = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}


def nested(value: Any, levels: int) -> Any:
    for _ in range(levels):
        value = [value]
    return value


def server_pid(home: Path) -> int:
    return int(json.loads((home / "serving" / "server.json").read_text())["pid"])


def alive(pid: int) -> bool:
    from model_registry.adapters.backends.local_runner import proc_start_time

    return proc_start_time(pid) is not None


@pytest.fixture
def http_served(tmp_path: Path, replay_trainers: Path, sqlite_url: str, trained: dict, trained_sentiment: Path
                ) -> Iterator[tuple[Server, SlackDriver, SlackFake, Any]]:
    """`starchart serve` with iris and sentiment exposed (one version each, the default), and a Slack fake."""
    fake = SlackFake(channels={CHANNEL: "ml-review"})
    fake.add_user(MALLORY, "mallory", display_name="Mallory")
    with fake:
        home = tmp_path / "home"
        home.mkdir()
        config = write_config(home, replay_trainers, defaults={"channel": CHANNEL, "approvers": [MALLORY]})
        env = {**os.environ, "SLACK_BOT_TOKEN": fake.token, "SLACK_SIGNING_SECRET": SECRET,
               "SLACK_API_URL": fake.base_url, "STARCHART_HOME": str(home), "STARCHART_CONFIG": str(config),
               "DATABASE_URL": sqlite_url, "WEB_THREADS": "8"}
        reg = registry(env)
        for model, source in (("iris", trained["iris_a"]), ("sentiment", trained_sentiment)):
            job = reg.jobs.train(model, MALLORY, args=replay_args(source))
            assert reg.jobs.wait(job["job_id"], timeout=120)["state"] == "SUCCEEDED"
            reg.versions.expose(model, MALLORY)
        srv = Server(env, tmp_path / "serve.log")
        driver = SlackDriver(srv.url, SECRET, response_urls=fake.response_url)
        try:
            yield srv, driver, fake, reg
        finally:
            driver.close()
            srv.stop()
            reg.backend.stop_server()
            reg.close()


def test_hostile_bodies_get_a_400_naming_the_input_and_the_model_server_lives(http_served: Any) -> None:
    srv, driver, slack, reg = http_served
    url = f"{srv.url}/v1/models/iris:predict"
    ok = requests.post(url, json={"instances": [FLOWER]}, timeout=120)
    assert ok.status_code == 200, ok.text
    pid = server_pid(reg.settings.home)

    def refused(body: bytes | dict[str, Any], *expected: str) -> None:
        resp = requests.post(url, data=body if isinstance(body, bytes) else json.dumps(body), timeout=60,
                             headers={"Content-Type": "application/json"})
        assert resp.status_code == 400, (resp.status_code, resp.text[:300])
        error = resp.json()["error"]  # JSON, not an HTML error page
        for text in expected:
            assert text in error, (text, error)

    # finding: values nested ~300 deep reached tf.constant and TensorFlow aborted the model server
    refused({"instances": [{**FLOWER, "sepal_length": nested(5.1, 300)}]}, "sepal_length", "nested")
    refused({"inputs": {**{k: [v] for k, v in FLOWER.items()}, "petal_width": nested(0.2, 300)}}, "petal_width")
    # finding: JSON nested 100,000 deep was a 500 HTML page (RecursionError)
    refused(b"[" * 100_000 + b"]" * 100_000, "nested more than")
    refused(b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested more than")
    # finding: 50,000 columnar rows passed the 1,000-instance limit
    refused({"inputs": {k: [v] * 50_000 for k, v in FLOWER.items()}}, "50000 instances", "at most 1000")
    refused({"inputs": {**{k: [v] * 3 for k, v in FLOWER.items()}, "sepal_width": [3.5] * 2}},
            "different numbers of instances")
    # finding: NaN, Infinity, 1e400 and true were accepted as float inputs
    for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e400", b"true"):
        refused(b'{"instances": [{"sepal_length": %s, "sepal_width": 3.5, "petal_length": 1.4, '
                b'"petal_width": 0.2}]}' % literal, "sepal_length", "float32")
    refused({"instances": [{**FLOWER, "petal_length": 1e39}]}, "petal_length", "range")
    # a string model: numbers and lists are not text
    sentiment = f"{srv.url}/v1/models/sentiment:predict"
    for body in ({"instances": [5]}, {"instances": [["a"]]}, {"instances": [{"text": None}]}):
        resp = requests.post(sentiment, json=body, timeout=60)
        assert resp.status_code == 400 and "text" in resp.json()["error"], resp.text
    assert requests.post(sentiment, json={"instances": ["a fine film"]}, timeout=120).status_code == 200

    # /ml predict, as a Slack client sends it
    acked(driver.command("predict iris " + json.dumps({**FLOWER, "sepal_width": nested(3.5, 300)}),
                         user_id=MALLORY, channel_id=CHANNEL))
    said_to(slack, "instance 0, input sepal_width: nested more than 32 levels deep", timeout=60)
    acked(driver.command("predict iris " + "[" * 100_000, user_id=MALLORY, channel_id=CHANNEL))
    said_to(slack, "nested more than", timeout=60)
    acked(driver.command('predict iris {"sepal_length": NaN, "sepal_width": 3.5, "petal_length": 1.4, '
                         '"petal_width": 0.2}', user_id=MALLORY, channel_id=CHANNEL))
    said_to(slack, "finite float32", timeout=60)

    # the model server that answered first still runs and answers
    assert server_pid(reg.settings.home) == pid and alive(pid)
    again = requests.post(url, json={"instances": [FLOWER]}, timeout=60)
    assert again.status_code == 200 and again.json() == ok.json()


def test_the_prediction_token_needs_its_bearer_scheme(bot_env_minimal: dict[str, str], tmp_path: Path) -> None:
    """Finding: `Authorization: s3cret` (no `Bearer `) was accepted; only `Bearer <token>` is."""
    srv = Server({**bot_env_minimal, "STARCHART_PREDICT_TOKEN": "s3cret"}, tmp_path / "serve-token.log")
    try:
        url = f"{srv.url}/v1/models/iris"
        for header in ("s3cret", "Bearer  s3cret", "bearer s3cret", "Basic s3cret", "Token s3cret",
                       "Bearers3cret"):
            resp = requests.get(url, headers={"Authorization": header}, timeout=30)
            assert resp.status_code == 401, header
        resp = requests.post(f"{url}:predict", headers={"Authorization": "s3cret"}, json={"instances": [1]},
                             timeout=30)
        assert resp.status_code == 401 and "Bearer" in resp.json()["error"]
        allowed = requests.get(url, headers={"Authorization": "Bearer s3cret"}, timeout=30)
        assert allowed.status_code == 404 and "no default version" in allowed.json()["error"]
    finally:
        srv.stop()


@pytest.fixture
def bot_env_minimal(tmp_path: Path, replay_trainers: Path, sqlite_url: str) -> Iterator[dict[str, str]]:
    with SlackFake() as fake:
        home = tmp_path / "home"
        home.mkdir()
        config = write_config(home, replay_trainers)
        yield {**os.environ, "SLACK_BOT_TOKEN": fake.token, "SLACK_SIGNING_SECRET": SECRET,
               "SLACK_API_URL": fake.base_url, "STARCHART_HOME": str(home), "STARCHART_CONFIG": str(config),
               "DATABASE_URL": sqlite_url}


def test_the_local_model_server_wants_its_secret_and_checks_again(make_registry: Any, sqlite_url: str,
                                                                 trained: dict) -> None:
    """Finding: the model server's port took any local user's request, around STARCHART_PREDICT_TOKEN."""
    reg = make_registry(sqlite_url, models={"iris": {"non_finite_inputs": True}})
    try:
        job = reg.jobs.train("iris", "U_T", args=replay_args(trained["iris_a"]))
        assert reg.jobs.wait(job["job_id"], timeout=120)["state"] == "SUCCEEDED"
        reg.versions.expose("iris", "U_T")
        assert reg.predictions.predict("iris", FLOWER)["predictions"]
        # this model's policy lets NaN through (the default refuses it: see the test above); other checks stay
        assert reg.predictions.predict("iris", '{"instances": [{"sepal_length": NaN, "sepal_width": 1, '
                                               '"petal_length": 1, "petal_width": 1}]}')["predictions"]
        with pytest.raises(InvalidInput, match="expected float32 numbers, not true"):
            reg.predictions.predict("iris", {**FLOWER, "sepal_width": True})
        info_file = reg.backend.serving / "server.json"
        assert info_file.stat().st_mode & 0o077 == 0, "the secret is readable by this user only"
        info = json.loads(info_file.read_text())
        base = f"http://127.0.0.1:{info['port']}"
        body = {"instances": [FLOWER]}
        assert requests.post(f"{base}/v1/models/iris:predict", json=body, timeout=30).status_code == 401
        assert requests.get(f"{base}/healthz", timeout=30).status_code == 401
        wrong = requests.post(f"{base}/v1/models/iris:predict", json=body, timeout=30,
                              headers={"Authorization": "Bearer " + "x" * len(info["secret"])})
        assert wrong.status_code == 401
        auth = {"Authorization": f"Bearer {info['secret']}"}
        assert requests.post(f"{base}/v1/models/iris:predict", json=body, headers=auth, timeout=60).status_code == 200
        # straight to the model server, past the core's check: it refuses too, and lives
        for hostile in ({"instances": [{**FLOWER, "sepal_length": nested(1.0, 300)}]},
                        {"inputs": {k: [v] * 50_000 for k, v in FLOWER.items()}}):
            resp = requests.post(f"{base}/v1/models/iris:predict", json=hostile, headers=auth, timeout=60)
            assert resp.status_code == 400, resp.text[:300]
        for raw in (b"[" * 100_000, b'{"instances": [{"sepal_length": true, "sepal_width": 1, "petal_length": 1, '
                                    b'"petal_width": 1}]}'):
            resp = requests.post(f"{base}/v1/models/iris:predict", data=raw, headers=auth, timeout=60)
            assert resp.status_code == 400, resp.text[:300]
        assert alive(info["pid"]) and requests.get(f"{base}/healthz", headers=auth, timeout=30).json()["ok"]
    finally:
        reg.backend.stop_server()


DYING_SERVER = """
import json, os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
sys.path.insert(0, sys.argv[2])
from local_runner import proc_start_time
serving = sys.argv[1]

class H(BaseHTTPRequestHandler):
    def do_GET(self):
        data = json.dumps({"ok": True, "pid": os.getpid()}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(data))); self.end_headers()
        self.wfile.write(data)
    def do_POST(self):
        with open(os.path.join(serving, "posts"), "a") as fh:
            fh.write(self.headers.get("X-Request-Id", "-") + "\\n")
        sys.stderr.write("F tensorflow/core/framework/tensor_shape.cc] Check failed: Too many dimensions\\n")
        sys.stderr.flush()
        os._exit(134)

srv = HTTPServer(("127.0.0.1", 0), H)
info = {"pid": os.getpid(), "pid_start": proc_start_time(os.getpid()), "port": srv.server_address[1],
        "secret": "s"}
with open(os.path.join(serving, "server.json"), "w") as fh:
    json.dump(info, fh)
srv.serve_forever()
"""


def test_a_request_that_ends_the_model_server_is_not_retried_but_logged(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Finding: the web process sent a request that killed the model server a second time. Now it is sent once,
    logged with its request id and the server's last words, and a new model server is started."""
    from model_registry.adapters.backends import local_runner
    from model_registry.adapters.backends.local import LocalBackend

    backend = LocalBackend(tmp_path / "home")
    serving = backend.serving
    serving.mkdir(parents=True)
    script = tmp_path / "dying_server.py"
    script.write_text(DYING_SERVER)
    with open(serving / "server.log", "ab") as log:
        dying = subprocess.Popen([sys.executable, str(script), str(serving), str(Path(local_runner.__file__).parent)],
                                 stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while not (serving / "server.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        with caplog.at_level(logging.ERROR, logger="starchart.local"):
            with pytest.raises(BackendError) as exc:
                backend.predict("iris", None, {"instances": [FLOWER]})
        assert dying.wait(timeout=30) == 134
        posts = (serving / "posts").read_text().split()
        assert len(posts) == 1, "sent once, not again to a new server"
        assert posts[0] in exc.value.message and "stopped while answering" in exc.value.message
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert posts[0] in logged and "Too many dimensions" in logged
        # a new (real) model server is started for the next request
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            info = backend._server_info()
            if info and info["pid"] != dying.pid and backend._server_port() is not None:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("no new model server: " + (serving / "server.log").read_text()[-2000:])
    finally:
        if dying.poll() is None:
            dying.kill()
        backend.stop_server()
