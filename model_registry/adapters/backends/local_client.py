"""The web process's connections to the local model server (local_serving.py): HTTP/1.1 on keep-alive
connections, each request sent in one write, each answer parsed by httptools (the parser uvicorn reads the
requests with on the other side).

It replaced urllib3 for this hop, which cost the web process 0.30 ms of CPU a request (http.client's header
parsing, the pool's bookkeeping) and wrote a request's headers and its body separately, so the server woke twice
for one request: a prediction's round trip to the model server was 1.26 ms through urllib3 and 0.75 ms through
this (iris, one instance, measured on 2 cores). It speaks to this project's own server only: no proxies, TLS,
redirects, chunked requests or retries; what went wrong is said by the exception raised (NotSent, CutOff,
TimeoutError).

`ServerConnections.exchange` is the same request for a caller that does its own waiting (the web worker's loop,
bot.whole_requests): an `Exchange` never blocks; its caller watches its socket and steps it.
"""

from __future__ import annotations

import errno
import select
import selectors
import socket
import threading
from collections.abc import Mapping
from typing import Any, NamedTuple

import httptools


class NotSent(OSError):
    """No connection could be made (nothing listens on the port): the request was never sent."""


class CutOff(OSError):
    """The connection ended or failed after the request was sent, before the whole answer arrived."""


class Answer(NamedTuple):
    status: int
    reason: str
    headers: dict[str, str]  # names in lower case
    data: bytes


def request_bytes(method: str, path: str, port: int, body: bytes, headers: Mapping[str, str] | None) -> bytes:
    """A whole HTTP/1.1 request, for one write."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Length: {len(body)}"]
    for name, value in (headers or {}).items():
        if any(c in name or c in value for c in "\r\n"):
            raise ValueError(f"header {name!r} holds a line break")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Reading:
    """httptools' callbacks for one answer."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.reason = ""
        self.complete = self.keep_alive = False
        self.parser: Any = None

    def on_status(self, reason: bytes) -> None:
        self.reason += reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()  # asked here: the parser forgets once the message ended


class ServerConnections:
    """Keep-alive connections to one port on 127.0.0.1, shared by threads (each request takes one for itself)."""

    def __init__(self, port: int, keep: int = 64) -> None:
        self.port, self.keep = port, keep
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False

    def request(self, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None,
                connect_timeout: float = 5.0, read_timeout: float = 60.0) -> Answer:
        data = request_bytes(method, path, self.port, body, headers)
        sock = self._take() or self._connect(connect_timeout)
        reading = Reading()
        parser = reading.parser = httptools.HttpResponseParser(reading)
        try:
            sock.settimeout(read_timeout)
            sock.sendall(data)
            while not reading.complete:
                chunk = sock.recv(65536)
                if not chunk:
                    raise CutOff("the model server closed the connection before it answered")
                parser.feed_data(chunk)
        except (TimeoutError, CutOff):
            sock.close()
            raise
        except (OSError, httptools.HttpParserError) as exc:
            sock.close()
            raise CutOff(f"{type(exc).__name__}: {exc}") from exc
        if reading.keep_alive:
            self._give_back(sock)
        else:
            sock.close()
        return Answer(parser.get_status_code(), reading.reason, reading.headers, b"".join(reading.body))

    def exchange(self, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None) -> Exchange:
        """The same request as `request`, for a caller that waits for its socket itself (see Exchange)."""
        data = request_bytes(method, path, self.port, body, headers)
        sock = self._take()
        connecting = sock is None
        if sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            failed = sock.connect_ex(("127.0.0.1", self.port))
            if failed not in (0, errno.EINPROGRESS):
                sock.close()
                raise NotSent(f"no connection to 127.0.0.1:{self.port}: {errno.errorcode.get(failed, failed)}")
        else:
            sock.setblocking(False)
        return Exchange(self, sock, data, connecting)

    def _connect(self, timeout: float) -> socket.socket:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        except OSError as exc:
            raise NotSent(f"no connection to 127.0.0.1:{self.port}: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the answer's wait is not Nagle's
        return sock

    def _take(self) -> socket.socket | None:
        """An idle connection the server has not closed meanwhile (readable while idle: closed, or junk)."""
        while True:
            with self._lock:
                if not self._idle:
                    return None
                sock = self._idle.pop()
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            if not poller.poll(0):
                return sock
            sock.close()

    def _give_back(self, sock: socket.socket) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self.keep:
                self._idle.append(sock)
                return
        sock.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()


class Exchange:
    """One request to the model server that never blocks: its caller watches `sock` for `events` (a selectors
    mask: writable while connecting or sending, readable after) and calls `step()` when the socket is ready,
    which gives the Answer once it is whole, else None (watch again). NotSent: nothing listened, the request was
    never sent; CutOff: the connection ended or failed after it was sent. Whatever the outcome (an answer, an
    error, a time-out), `finish()` once the socket is no longer watched: a connection to keep goes back to the
    pool, any other is closed (never before: a closed socket's number is soon another's)."""

    def __init__(self, pool: ServerConnections, sock: socket.socket, data: bytes, connecting: bool) -> None:
        self.pool, self.sock, self.connecting = pool, sock, connecting
        self.events = selectors.EVENT_WRITE
        self._out = memoryview(data)
        self._reading = Reading()
        self._parser = self._reading.parser = httptools.HttpResponseParser(self._reading)

    def step(self) -> Answer | None:
        try:
            if self.connecting:
                failed = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if failed:
                    raise NotSent(f"no connection to 127.0.0.1:{self.pool.port}: {errno.errorcode.get(failed, failed)}")
            while self._out:
                sent = self.sock.send(self._out)
                self.connecting = False  # connected: a failure from here on is after (part of) the request was sent
                self._out = self._out[sent:]
            self.events = selectors.EVENT_READ
            while not self._reading.complete:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise CutOff("the model server closed the connection before it answered")
                self._parser.feed_data(chunk)
        except BlockingIOError:
            return None
        except (NotSent, CutOff):
            raise
        except (OSError, httptools.HttpParserError) as exc:
            if self.connecting:
                raise NotSent(f"no connection to 127.0.0.1:{self.pool.port}: {exc}") from exc
            raise CutOff(f"{type(exc).__name__}: {exc}") from exc
        return Answer(self._parser.get_status_code(), self._reading.reason, self._reading.headers,
                      b"".join(self._reading.body))

    def finish(self) -> None:
        if self._reading.complete and self._reading.keep_alive:
            self.pool._give_back(self.sock)
        else:
            self.sock.close()
