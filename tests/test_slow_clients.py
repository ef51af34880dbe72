"""Slow clients against a real `starchart serve`: they hold no thread, /healthz and Slack's acks stay prompt, and
a request that does not arrive within WEB_READ_TIMEOUT is answered 408 and closed."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests
import test_slack_http as http
from fakes.slack_driver import SlackDriver
from fakes.slack_fake import SlackFake
from test_slack_http import CHANNEL, SECRET, TRAINER, Server, said_to

from bot.whole_requests import WAIT, WHOLE, verdict

slack, bot_env, _registry_for = http.slack, http.bot_env, http._registry_for
SLOW_CLIENTS = 20  # more than the server's threads (2 workers x 8)


@contextlib.contextmanager
def dribbling(port: int, head: bytes, line: bytes, every: float) -> Iterator[list[bytes | None]]:
    """SLOW_CLIENTS connections that send `head`, then `line` every `every` seconds; yields what each got back,
    None until the server closed it."""
    stop = threading.Event()
    answers: list[bytes | None] = [None] * SLOW_CLIENTS
    received = [b""] * SLOW_CLIENTS
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(SLOW_CLIENTS)]

    def dribble(i: int, sock: socket.socket) -> None:
        sock.settimeout(every)
        with contextlib.suppress(OSError):  # reset by the server
            sock.sendall(head)
            while not stop.is_set():
                try:
                    got = sock.recv(4096)
                except TimeoutError:
                    sock.sendall(line)
                    continue
                if not got:
                    break
                received[i] += got
        if not stop.is_set():
            answers[i] = received[i]  # closed by the server

    threads = [threading.Thread(target=dribble, args=(i, s), daemon=True) for i, s in enumerate(socks)]
    for t in threads:
        t.start()
    try:
        yield answers
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        for s in socks:
            s.close()


def test_slow_clients_leave_healthz_and_acks_prompt(bot_env: dict, slack: SlackFake, tmp_path: Path) -> None:
    srv = Server({**bot_env, "WEB_READ_TIMEOUT": "8"}, tmp_path / "serve-slow.log")
    driver = SlackDriver(srv.url, SECRET, response_urls=slack.response_url)
    try:
        # a header line a second: each is read as it comes, and the request is cut off at the limit
        with dribbling(srv.port, b"POST /slack/events HTTP/1.1\r\nHost: x\r\n", b"X-Slow: 1\r\n", 1.0) as answers:
            time.sleep(1.0)  # every slow client is connected and has sent its first line
            for _ in range(8):
                assert requests.get(f"{srv.url}/healthz", timeout=5).json()["ok"]
            acked = driver.command("help", user_id=TRAINER, channel_id=CHANNEL)
            assert acked.status == 200 and acked.elapsed < 3.0
            said_to(slack, "train")
            deadline = time.monotonic() + 30
            while not all(a is not None for a in answers):
                assert time.monotonic() < deadline, answers
                time.sleep(0.2)
        assert all(b" 408 " in a and b"did not arrive within 8 seconds" in a for a in answers if a is not None)
        with dribbling(srv.port, b"POST /slack/events HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n",
                       b"x", 2.0) as slow_bodies:  # a body byte every two seconds: closed, silent or late
            time.sleep(1.0)
            for _ in range(8):
                assert requests.get(f"{srv.url}/healthz", timeout=5).json()["ok"]
            assert driver.command("help", user_id=TRAINER, channel_id=CHANNEL).status == 200
            deadline = time.monotonic() + 30
            while not all(a is not None for a in slow_bodies):
                assert time.monotonic() < deadline, slow_bodies
                time.sleep(0.2)
    finally:
        driver.close()
        srv.stop()


def _answer(sock: socket.socket) -> bytes:
    """One whole answer (its headers and its Content-Length of body) read from `sock`."""
    data = b""
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            if len(body) >= length:
                return data
        chunk = sock.recv(65536)
        assert chunk, f"closed before the whole answer: {data!r}"
        data += chunk


def test_clients_keeping_their_socket_after_a_closing_answer_hold_up_nobody(bot_env: dict, slack: SlackFake,
                                                                            tmp_path: Path) -> None:
    """gunicorn's own close waits on the worker's loop for the client to close (two seconds each): eight clients
    that read their answer and keep their sockets open held every other request there for eight seconds."""
    srv = Server(bot_env, tmp_path / "serve-linger.log")
    driver = SlackDriver(srv.url, SECRET, response_urls=slack.response_url)
    holders = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(8)]
    try:
        for i, sock in enumerate(holders):
            sock.settimeout(20)
            # one also sends bytes after its request, which the server reads and drops: no reset cuts its answer
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" + b"x" * 5000 * (i == 0))
        assert b'"ok": true' in _answer(holders[0])
        # the others are answered or about to be; none of the eight closes its socket
        for _ in range(3):
            assert requests.get(f"{srv.url}/healthz", timeout=5).json()["ok"]
        acked = driver.command("help", user_id=TRAINER, channel_id=CHANNEL)
        assert acked.status == 200 and acked.elapsed < 3.0, "Slack's limit for an ack"
        said_to(slack, "train")
        for sock in holders[1:]:
            assert _answer(sock).startswith(b"HTTP/1.1 200 ")
        for sock in holders:
            assert sock.recv(65536) == b"", "the answer is followed by the server's FIN"
    finally:
        for sock in holders:
            sock.close()
        driver.close()
        srv.stop()


def test_a_hung_model_server_leaves_threads_for_slack_and_loses_no_prediction(bot_env: dict, slack: SlackFake,
                                                                              trained: dict, tmp_path: Path) -> None:
    """Predictions that wait on a model server which does not answer hold at most WEB_THREADS threads of a worker;
    the two more are Slack's and /healthz's. (Before, a dozen such predictions held every thread: /healthz timed
    out.) The predictions beyond the slots wait holding no thread, and are answered once the server goes on, or
    503 after WEB_PREDICT_WAIT."""
    import json
    import os
    import signal

    reg = http.registry_from(slack)
    job = reg.jobs.train("iris", TRAINER, args=[f"--source={trained['iris_a']}"])
    assert reg.jobs.wait(job["job_id"])["state"] == "SUCCEEDED"
    reg.versions.expose("iris", TRAINER)
    flower = {"sepal_length": 6.7, "sepal_width": 3.0, "petal_length": 5.2, "petal_width": 2.3}
    srv = Server({**bot_env, "WEB_THREADS": "2", "WEB_PREDICT_WAIT": "8"}, tmp_path / "serve-hung.log")
    driver = SlackDriver(srv.url, SECRET, response_urls=slack.response_url)
    model_server = None

    def predictions(n: int) -> tuple[list[threading.Thread], list[requests.Response]]:
        answers: list[requests.Response] = []

        def one() -> None:
            answers.append(requests.post(f"{srv.url}/v1/models/iris:predict", json={"instances": [flower]},
                                         timeout=90))
        threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
        for t in threads:
            t.start()
        return threads, answers

    try:
        assert requests.post(f"{srv.url}/v1/models/iris:predict", json={"instances": [flower]},
                             timeout=120).status_code == 200  # the model server runs and has the version loaded
        model_server = json.loads((reg.backend.serving / "server.json").read_text())["pid"]
        os.kill(model_server, signal.SIGSTOP)  # it answers nothing, its connections stay open
        threads, answers = predictions(12)  # 2 workers x 2 slots in flight; 8 waiting in the workers' loops
        time.sleep(1.0)
        for _ in range(4):
            assert requests.get(f"{srv.url}/healthz", timeout=5).json()["ok"]
        acked = driver.command("help", user_id=TRAINER, channel_id=CHANNEL)
        assert acked.status == 200 and acked.elapsed < 3.0, "Slack's limit for an ack"
        said_to(slack, "train")
        os.kill(model_server, signal.SIGCONT)
        for t in threads:
            t.join(timeout=60)
        assert [a.status_code for a in answers] == [200] * 12, "every prediction is answered once the server goes on"
        assert all(a.headers["X-Model-Version"] == reg.versions.default("iris") for a in answers)

        os.kill(model_server, signal.SIGSTOP)
        threads, answers = predictions(8)
        deadline = time.monotonic() + 60
        while len(answers) < 4:  # the waiting ones, after WEB_PREDICT_WAIT
            assert time.monotonic() < deadline, [a.status_code for a in answers]
            time.sleep(0.1)
        refused = list(answers)
        assert all(a.status_code == 503 and a.headers["Retry-After"] == "5" and "retry later" in a.json()["error"]
                   for a in refused), [(a.status_code, a.text) for a in refused]
        os.kill(model_server, signal.SIGCONT)
        for t in threads:
            t.join(timeout=60)
        assert sorted(a.status_code for a in answers) == [200] * (8 - len(refused)) + [503] * len(refused), \
            "those in flight are answered"
    finally:
        if model_server is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(model_server, signal.SIGCONT)
        driver.close()
        srv.stop()


def test_refused_clients_that_send_on_hold_no_thread(bot_env: dict, slack: SlackFake, tmp_path: Path) -> None:
    """A refusal (here 411) is answered, then what its client still sends is read and dropped while the connection
    lingers in the poller. The drain ran on a thread for up to a second: forty clients sending on and
    reconnecting held the three threads of one worker, and an ack waited five seconds behind them (Slack's limit: 3)."""
    srv = Server({**bot_env, "WEB_THREADS": "1"}, tmp_path / "serve-refused-flood.log", "--workers", "1")
    driver = SlackDriver(srv.url, SECRET, response_urls=slack.response_url)
    stop = threading.Event()
    answers: list[bytes] = []

    def attacker() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
                sock.sendall(b"POST /slack/events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
                sock.settimeout(0.02)
                got, until = [b""], time.monotonic() + 5.0
                try:
                    while time.monotonic() < until and not stop.is_set():
                        with contextlib.suppress(TimeoutError):
                            got[0] += sock.recv(4096)
                        sock.sendall(b"x" * 1000)  # on and on, whatever the answer says
                finally:  # until the server closes the connection, or the test ends
                    answers.append(got[0])

    attackers = [threading.Thread(target=attacker, daemon=True) for _ in range(40)]
    try:
        for t in attackers:
            t.start()
        time.sleep(2.0)
        for _ in range(3):
            assert requests.get(f"{srv.url}/healthz", timeout=5).json()["ok"]
            acked = driver.command("help", user_id=TRAINER, channel_id=CHANNEL)
            assert acked.status == 200 and acked.elapsed < 3.0, "Slack's limit for an ack"
    finally:
        stop.set()
        for t in attackers:
            t.join(timeout=10)
        driver.close()
        srv.stop()
    assert answers and all(a.startswith(b"HTTP/1.1 411 ") for a in answers if a), "each is answered first"


def test_the_worker_tells_the_arbiter_it_lives_once_a_second_not_at_every_turn(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import bot.whole_requests as whole

    beats: list[float] = []

    class Tmp:  # gunicorn's heartbeat file: the arbiter reads its time
        def notify(self) -> None:
            beats.append(now[0])

    now = [1000.0]
    monkeypatch.setattr(whole.time, "monotonic", lambda: now[0])
    worker = object.__new__(whole.worker_class(10.0))  # its loop calls notify(); nothing else of it is needed here
    worker.tmp = Tmp()
    for _ in range(500):  # turns of the loop within one moment: one request each under load
        worker.notify()
    assert beats == [1000.0]
    now[0] += 0.5
    worker.notify()
    now[0] += 0.5
    worker.notify()
    now[0] += 29.0  # a quiet spell (the loop wakes at least once a second): the next turn beats at once
    worker.notify()
    assert beats == [1000.0, 1001.0, 1030.0]


def test_what_counts_as_a_whole_request() -> None:
    assert verdict(b"GET /healthz HTTP/1.1\r\nHost: x\r\n") == WAIT
    assert verdict(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") == WHOLE
    assert verdict(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nabc") == WAIT
    assert verdict(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nabcde") == WHOLE
    assert verdict(b"POST / HTTP/1.1\r\ncontent-length: 5\r\nExpect: 100-continue\r\n\r\n") == WAIT
    assert verdict(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n") == "chunked"
    assert verdict(b"POST / HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n") == "body", "refused before it is sent"
    assert verdict(b"POST / HTTP/1.1\r\nContent-Length: 1048576\r\n\r\n" + b"x" * 1048576) == WHOLE
    assert verdict(b"X" * (64 * 1024 + 1)) == "head", "an endless head is refused here"
    assert verdict(b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 9000 + b"\r\n") == "head"


def test_what_would_hold_a_thread_is_refused_at_once(bot_env: dict, slack: SlackFake, tmp_path: Path) -> None:
    srv = Server({**bot_env, "WEB_READ_TIMEOUT": "30"}, tmp_path / "serve-refused.log")
    try:
        requests.get(f"{srv.url}/healthz", timeout=30)
        cases = {
            # headers that never end: 431 once 64 KB are in, without waiting for the read limit
            b"POST /slack/events HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: p\r\n" * 8000: b" 431 ",
            # a chunked body that never ends
            b"POST /slack/events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab": b" 411 ",
            # a body announced too large, before any of it
            b"POST /v1/models/iris:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n": b" 413 ",
        }
        for sent, status in cases.items():
            with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
                sock.sendall(sent)  # and then nothing more: the connection stays open
                answer = sock.recv(4096)
                assert status in answer.split(b"\r\n")[0], (status, answer)
        # keep-alive connections whose next request stalls half way: the stalls hold no thread either
        socks = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(SLOW_CLIENTS)]
        try:
            for sock in socks:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHo")
                assert b" 200 " in sock.recv(4096).split(b"\r\n")[0]
            for _ in range(8):
                assert requests.get(f"{srv.url}/healthz", timeout=5).json()["ok"]
        finally:
            for sock in socks:
                sock.close()
    finally:
        srv.stop()
