"""Predictions relayed by the web worker's loop (bot.whole_requests): sent to the model server and answered holding
no thread, over kept, pipelined and closing connections alike, and every failure after a prediction was sent
answered as the thread's predict answers it (a model server that dies while answering, one that does not answer
within STARCHART_PREDICT_TIMEOUT), against a real `starchart serve` and a real local model server."""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
import test_slack_http as http
from fakes.slack_fake import SlackFake
from test_slack_http import TRAINER, Server

slack, bot_env, _registry_for = http.slack, http.bot_env, http._registry_for
FLOWER = {"sepal_length": 6.7, "sepal_width": 3.0, "petal_length": 5.2, "petal_width": 2.3}
BODY = json.dumps({"instances": [FLOWER]}).encode()
# the system calls of a thread waiting on a socket (poll, ppoll, select, pselect6, recvfrom, read), by machine
SOCKET_WAITS = {"x86_64": {7, 271, 23, 270, 45, 0}, "aarch64": {73, 72, 207, 63}}


def _predict_request(*headers: str, version: str = "HTTP/1.1") -> bytes:
    head = "".join(f"{h}\r\n" for h in ("Host: starchart", "Content-Type: application/json", *headers))
    return (f"POST /v1/models/iris:predict {version}\r\n{head}Content-Length: {len(BODY)}\r\n\r\n").encode() + BODY


def _answers(sock: socket.socket, count: int) -> list[tuple[str, dict[str, str], bytes]]:
    """`count` whole answers read from `sock`: (status line, headers by lower-case name, body)."""
    sock.settimeout(60)
    data, answers = b"", []
    while len(answers) < count:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            lines = data[:end].decode("latin-1").split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            size = int(headers["content-length"])
            if len(data) >= end + 4 + size:
                answers.append((lines[0], headers, data[end + 4:end + 4 + size]))
                data = data[end + 4 + size:]
                continue
        chunk = sock.recv(65536)
        assert chunk, f"closed after {len(answers)} answers of {count}"
        data += chunk
    return answers


def _closed(sock: socket.socket) -> bool:
    sock.settimeout(10)
    return sock.recv(1) == b""


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    """Relaying reads nothing from the database: these run on SQLite only (the rest of the suite on both)."""
    return sqlite_url


@pytest.fixture
def iris(slack: SlackFake, trained: dict) -> Any:
    """The registry, iris trained and exposed (its default)."""
    reg = http.registry_from(slack)
    job = reg.jobs.train("iris", TRAINER, args=[f"--source={trained['iris_a']}"])
    assert reg.jobs.wait(job["job_id"])["state"] == "SUCCEEDED"
    reg.versions.expose("iris", TRAINER)
    return reg


@pytest.fixture
def served(bot_env: dict, iris: Any, tmp_path: Path) -> Iterator[tuple[Server, dict[str, Any], str]]:
    """`starchart serve` (one worker, WEB_THREADS=1) with iris answering through it, its first predictions (the
    thread's: they start the model server and read the signature) made; server.json; and the URL of the default
    asked for by name, which is relayed from then on (a default asked for by the model's name alone is read from
    the database again once a second, on a thread)."""
    srv = Server({**bot_env, "WEB_THREADS": "1", "STARCHART_PREDICT_TIMEOUT": "3"}, tmp_path / "serve.log",
                 "--workers", "1")
    named = f"{srv.url}/v1/models/iris/versions/{iris.versions.default('iris')}:predict"
    try:
        for url in (f"{srv.url}/v1/models/iris:predict", named):
            first = requests.post(url, data=BODY, timeout=120)
            assert first.status_code == 200, first.text
        yield srv, json.loads((iris.backend.serving / "server.json").read_text()), named
    finally:
        srv.stop()


def _worker_pid(srv: Server) -> int:
    children = Path(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def _threads_waiting_on_sockets(pid: int) -> int:
    waits = SOCKET_WAITS[platform.machine()]
    count = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with open(task / "syscall") as fh:
            call = fh.read().split()[0]
        count += call.isdigit() and int(call) in waits
    return count


def test_relayed_predictions_answer_kept_pipelined_and_closing_connections(served, iris: Any) -> None:
    srv, _, _ = served
    default = iris.versions.default("iris")
    expected = requests.post(f"{srv.url}/v1/models/iris:predict", data=BODY, timeout=30).content
    with socket.create_connection(("127.0.0.1", srv.port)) as sock:
        sock.sendall(_predict_request() * 3)  # three requests in one write: answered in order, on one connection
        answers = _answers(sock, 3)
        sock.sendall(_predict_request())
        answers += _answers(sock, 1)
        sock.sendall(_predict_request("Connection: close"))
        closing = _answers(sock, 1)[0]
        assert _closed(sock), "closed after an answer that says so"
    for status, headers, body in answers:
        assert (status, headers["connection"], headers["x-model-version"]) == ("HTTP/1.1 200 OK", "keep-alive", default)
        assert headers["content-type"] == "application/json" and body == expected
    assert (closing[0], closing[1]["connection"], closing[2]) == ("HTTP/1.1 200 OK", "close", expected)
    with socket.create_connection(("127.0.0.1", srv.port)) as sock:
        sock.sendall(_predict_request(version="HTTP/1.0"))
        status, headers, body = _answers(sock, 1)[0]
        assert (status, headers["connection"], body) == ("HTTP/1.0 200 OK", "close", expected)
        assert _closed(sock)


def test_a_client_slow_to_read_a_large_answer_gets_all_of_it_and_holds_up_nobody(served) -> None:
    """A large relayed answer to a client that waits before it reads: /healthz is answered meanwhile, and the
    client gets every byte (on loopback the kernel takes it at once: the write in parts is the next test's)."""
    srv, _, named = served
    many = json.dumps({"instances": [FLOWER] * 600}).encode()
    assert len(many) < 64 * 1024, "relayed: larger bodies take a thread"
    request = (f"POST {named.removeprefix(srv.url)} HTTP/1.1\r\nHost: starchart\r\nContent-Type: application/json"
               f"\r\nContent-Length: {len(many)}\r\n\r\n").encode() + many
    expected = requests.post(named, data=many, timeout=60)
    assert expected.status_code == 200 and len(expected.content) > 50_000  # several times the client's window
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the answer cannot all go at once
        sock.connect(("127.0.0.1", srv.port))
        sock.sendall(request)
        time.sleep(1.0)  # the worker has written what the window took and waits for the rest
        assert requests.get(f"{srv.url}/healthz", timeout=5).json()["ok"]  # the loop is not held by the reader
        status, headers, body = _answers(sock, 1)[0]
    assert status == "HTTP/1.1 200 OK" and body == expected.content


def test_an_answer_the_socket_takes_in_parts_waits_in_the_poller_and_the_connection_is_kept() -> None:
    """The worker's write of a relayed answer on a socket whose buffer takes only part of it at once: the rest
    is written as the poller finds the socket writable (the loop is never held), then the slot is given back
    and the connection kept for its next request. The worker's loop parts only, on a real socket pair."""
    import selectors
    from collections import deque
    from types import SimpleNamespace

    from bot.whole_requests import WholeRequestWorker, _Relayed

    worker = WholeRequestWorker.__new__(WholeRequestWorker)  # no arbiter, no gunicorn loop: its state only
    worker.poller = selectors.DefaultSelector()
    worker.relays, worker.waiting, worker.keepalived_conns, worker.lingering = {}, deque(), deque(), deque()
    worker.slots, worker.predicting, worker._slots_lock, worker.nr_conns = 1, 1, threading.Lock(), 1
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        ours.setblocking(False)
        conn = SimpleNamespace(sock=ours, early=bytearray(), set_timeout=lambda: None)
        relayed = _Relayed(conn, None, b"", "1.1", True, float("inf"), exchanging=False)
        answer = bytes(range(256)) * 1000
        worker.relays[relayed] = None
        relayed.out = memoryview(answer)
        worker._write_relayed(relayed)
        assert relayed.writing and relayed in worker.relays, "part written; the rest waits for the poller"
        got, turns = b"", 0
        theirs.settimeout(5)
        while len(got) < len(answer):
            got += theirs.recv(65536)  # the client reads a little
            for key, _ in worker.poller.select(0):
                key.data(key.fileobj)
            turns += 1
        assert got == answer and turns > 1
        assert relayed not in worker.relays and not relayed.writing and worker.predicting == 0
        assert list(worker.keepalived_conns) == [conn] and worker.poller.get_key(ours).events == selectors.EVENT_READ
        worker.poller.close()


@pytest.mark.skipif(platform.machine() not in SOCKET_WAITS, reason="system call numbers known for x86_64, aarch64")
def test_a_prediction_waiting_on_the_model_server_holds_no_thread(served) -> None:
    """While the model server does not answer, no thread of the web worker waits on it: the worker's loop does
    (before, a thread waited in poll() for each prediction in flight). Once it goes on, the answer arrives."""
    srv, info, named = served
    worker = _worker_pid(srv)
    answers: list[requests.Response] = []
    os.kill(info["pid"], signal.SIGSTOP)
    try:
        asking = threading.Thread(target=lambda: answers.append(requests.post(named, data=BODY, timeout=60)),
                                  daemon=True)
        asking.start()
        time.sleep(1.0)  # sent, and waiting
        # a thread waiting for the prediction would wait all along; the worker's other threads (the outbox's
        # sender posting to Slack, say) wait on a socket only now and then: some samples must find none
        samples = []
        for _ in range(20):
            samples.append(_threads_waiting_on_sockets(worker))
            time.sleep(0.05)
        assert min(samples) == 0, samples
        assert requests.get(f"{srv.url}/healthz", timeout=5).json()["ok"]
    finally:
        os.kill(info["pid"], signal.SIGCONT)
    asking.join(timeout=30)
    assert [a.status_code for a in answers] == [200], "answered once the model server goes on"


def test_a_model_server_that_does_not_answer_in_time_is_answered_503_and_the_next_prediction_works(served) -> None:
    srv, info, named = served
    os.kill(info["pid"], signal.SIGSTOP)
    try:
        started = time.monotonic()
        late = requests.post(named, data=BODY, timeout=60)
        waited = time.monotonic() - started
    finally:
        os.kill(info["pid"], signal.SIGCONT)
    assert late.status_code == 503 and "did not answer: timed out after 3s" in late.json()["error"], late.text
    assert waited >= 3.0, "not before STARCHART_PREDICT_TIMEOUT"
    again = requests.post(named, data=BODY, timeout=60)
    assert again.status_code == 200, again.text


def test_a_model_server_that_dies_while_answering_is_named_and_started_again(served) -> None:
    """Predictions in flight when the model server is killed are each answered 503, saying it stopped while
    answering (they are not sent again); the next prediction starts a new server."""
    srv, info, named = served
    answers: list[requests.Response] = []
    os.kill(info["pid"], signal.SIGSTOP)
    asking = threading.Thread(target=lambda: answers.append(requests.post(named, data=BODY, timeout=60)),
                              daemon=True)
    asking.start()
    time.sleep(1.0)
    os.kill(info["pid"], signal.SIGKILL)
    asking.join(timeout=30)
    assert [a.status_code for a in answers] == [503], [a.text for a in answers]
    assert "stopped while answering this request" in answers[0].json()["error"]
    deadline = time.monotonic() + 120
    while True:  # a new server is being started in the background meanwhile
        again = requests.post(f"{srv.url}/v1/models/iris:predict", data=BODY, timeout=120)
        if again.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert again.status_code == 200, again.text
    assert "the local model server stopped during request" in srv.log.read_text(), "logged with its request id"


def test_the_web_app_relays_only_what_it_would_answer_200_and_never_raises_on_the_loop() -> None:
    """WebApp.relay leaves every request it would refuse (and every fault) to its WSGI path, which says why;
    WebApp.relayed turns a fault into a 500 instead of raising into the worker's loop."""
    from types import SimpleNamespace

    from bot.web import WebApp
    from model_registry.config import WebSettings
    from model_registry.domain.errors import InvalidInput

    asked: list[tuple[str, bytes, str | None]] = []

    class Predictions:
        def relay(self, model: str, body: bytes, version: str | None = None) -> Any:
            asked.append((model, body, version))
            if model == "broken":
                raise RuntimeError("a fault of the core's")
            if model == "refused":
                raise InvalidInput("no such input", "send the signature's inputs")
            return SimpleNamespace(model=model)

    core = SimpleNamespace(predictions=Predictions(), ready=lambda: True)
    web = WebApp(SimpleNamespace(app=None, registry=core), WebSettings(predict_token="s3cret"))
    auth = "Bearer s3cret"
    assert web.relay("/v1/models/iris/versions/v1:predict", auth, BODY).model == "iris"
    assert asked[-1] == ("iris", BODY, "v1")
    for path, authorization, body in [
        ("/v1/models/iris:predict", "", BODY),  # no token: 401 on the WSGI path
        ("/v1/models/iris:predict", "Bearer wrong", BODY),
        ("/v1/models/iris:predict", "s3cret", BODY),  # the scheme is not optional
        ("/v1/models/ir%69s:predict", auth, BODY),  # a quoted name: WSGI's decoding names the model
        ("/v1/models/iris", auth, b""),  # the status route
        ("/v1/models/iris:predict", auth, b"x" * (1024 * 1024 + 1)),  # 413
        ("/v1/models/refused:predict", auth, BODY),  # 400, said with its hint
        ("/v1/models/broken:predict", auth, BODY),  # 500, logged
    ]:
        assert web.relay(path, authorization, body) is None, path
    core.ready = lambda: False  # a core still loading: the WSGI path waits for it
    assert web.relay("/v1/models/iris:predict", auth, BODY) is None

    def broken(answer: Any) -> Any:
        raise KeyError("x-model-version")

    status, headers, body = web.relayed(SimpleNamespace(answered=broken), None)
    assert status == "500 Internal Server Error" and "could not be read" in json.loads(body)["error"]
    status, headers, body = web.relayed(SimpleNamespace(answered=lambda a: ("v7", b'{"predictions": [1]}')), None)
    assert (status, body) == ("200 OK", b'{"predictions": [1]}') and ("X-Model-Version", "v7") in headers


def test_the_prediction_time_out_is_configured_in_seconds_and_a_bad_one_refused(tmp_path: Path) -> None:
    from model_registry.bootstrap import make_backend
    from model_registry.config import ProjectConfig, Settings
    from model_registry.domain.errors import InvalidInput

    env = {"STARCHART_HOME": str(tmp_path)}
    assert Settings.from_env(env).predict_timeout == 120.0
    settings = Settings.from_env({**env, "STARCHART_PREDICT_TIMEOUT": "2.5"})
    assert make_backend(settings, ProjectConfig.load(tmp_path / "none.yaml")).predict_timeout == 2.5
    for raw in ("0", "-3", "soon", "nan", "3601"):
        with pytest.raises(InvalidInput) as err:
            Settings.from_env({**env, "STARCHART_PREDICT_TIMEOUT": raw})
        assert err.value.message == f"STARCHART_PREDICT_TIMEOUT {raw!r} is not a number of seconds between 0 and 3600"
        assert "e.g. 120" in err.value.hint
