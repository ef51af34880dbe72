"""Slow clients against a real `starchart serve`: they hold no thread, /healthz and Slack's acks stay prompt, and
a request that does not arrive within WEB_READ_TIMEOUT is answered 408 and closed."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import requests
import test_slack_http as http
from fakes.slack_driver import SlackDriver
from fakes.slack_fake import SlackFake
from test_slack_http import CHANNEL, SECRET, TRAINER, Server, said_to

from bot.whole_requests import arrived

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


def test_what_counts_as_a_whole_request() -> None:
    assert not arrived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    assert arrived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert not arrived(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nabc")
    assert arrived(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nabcde")
    assert arrived(b"POST / HTTP/1.1\r\ncontent-length: 5\r\nExpect: 100-continue\r\n\r\n")
    assert not arrived(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    assert arrived(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert arrived(b"POST / HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n" + b"x" * (1024 * 1024 + 1))
    assert arrived(b"X" * (64 * 1024 + 1)), "an endless head is handed to the parser, which refuses it"
