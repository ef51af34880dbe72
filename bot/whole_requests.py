"""gunicorn's threaded worker, giving a request a thread only once it has fully arrived, within a time limit.

The stock gthread worker hands a connection to a thread at its first byte; the thread then blocks reading the
headers and body, so clients that send a header line every few seconds hold every thread and /healthz or
Slack's acks wait behind them. Here each readable moment reads what is there without blocking and goes back
to the poller (holding no thread) until the headers and the body are in, or the request's time limit is over
(then 408 and the connection is closed). Requests that arrive at once, as Slack's do, are served as before.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import time
from typing import Any

from gunicorn.workers import gthread

log = logging.getLogger("starchart.web")
HEADERS_CAP = 64 * 1024  # more header bytes than this: gunicorn's parser refuses them (limit_request_*)
BODY_CAP = 1024 * 1024 + 1  # bot.web's MAX_BODY: a longer body is answered 413 without being read
_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]{1,12})[ \t]*(?=\r\n|$)")
_WAIT, _READY, _GONE, _LATE = "wait", "ready", "gone", "late"


def arrived(data: bytes) -> bool:
    """Whether `data` holds a whole HTTP/1 request head and the body it announces (or all it may send)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return len(data) > HEADERS_CAP
    head = data[:end].lower()
    if b"\r\nexpect:" in head:  # the client waits for "100 Continue" before its body: the parser sends it
        return True
    if b"\r\ntransfer-encoding:" in head:
        return data.endswith(b"0\r\n\r\n") or len(data) - end > BODY_CAP
    length = _LENGTH.search(head)
    return length is None or len(data) - (end + 4) >= min(int(length[1]), BODY_CAP)


class WholeRequestWorker(gthread.ThreadWorker):
    """gthread, reading each request without a thread until it is whole; `read_limit` seconds at most."""

    read_limit = 10.0

    def handle(self, conn: Any) -> Any:
        if self.cfg.is_ssl or conn.is_http2 or (conn.parser is not None and conn.parser.unreader.buf.getvalue()):
            return super().handle(conn)  # TLS, HTTP/2, or a request already read ahead: gunicorn's own path
        state = self._read_available(conn)
        if state == _WAIT:
            return gthread._DEFER  # back to the poller until more arrives (or its keepalive timeout)
        if state == _LATE:
            log.warning("closed a connection from %s: its request did not arrive within %gs",
                        conn.client, self.read_limit)
            self._refuse_late(conn)
        if state != _READY:
            return False
        if conn.parser is None:
            conn.init()
        conn.parser.unreader.unread(bytes(conn.early))
        conn.early, conn.first_byte_at, conn.data_ready = bytearray(), None, True
        return super().handle(conn)

    def _read_available(self, conn: Any) -> str:
        """Read what the socket holds now, without blocking, into `conn.early`; say what to do next."""
        if not hasattr(conn, "early"):
            conn.early, conn.first_byte_at = bytearray(), None
        conn.sock.setblocking(False)
        try:
            with contextlib.suppress(BlockingIOError):  # nothing more has arrived yet: decide below from what has
                while not arrived(conn.early):
                    chunk = conn.sock.recv(65536)
                    if not chunk:  # the client closed: a whole request is still served, nothing is dropped
                        return _READY if conn.early else _GONE
                    conn.early += chunk
                    if conn.first_byte_at is None:
                        conn.first_byte_at = time.monotonic()
        except OSError:
            return _GONE
        finally:
            conn.sock.setblocking(True)
        if arrived(conn.early):
            return _READY
        if conn.first_byte_at is not None and time.monotonic() - conn.first_byte_at > self.read_limit:
            return _LATE
        return _WAIT

    def _refuse_late(self, conn: Any) -> None:
        """408, then closed here in the worker thread: gunicorn's graceful close would linger on its main loop."""
        body = f"the request did not arrive within {self.read_limit:g} seconds\n".encode()
        sock = conn.sock
        try:
            # the client may be gone or still sending: it is closed either way
            with contextlib.suppress(OSError):
                sock.sendall(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Type: text/plain\r\n"
                             b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(0.5)  # a short drain, so the client reads the 408 before a reset
                drained = sock.recv(65536)
                while drained:
                    drained = sock.recv(65536)
        finally:
            sock.close()


def worker_class(read_limit: float) -> type[WholeRequestWorker]:
    """The worker class for gunicorn's `worker_class` setting, with this time limit."""
    return type("WholeRequestWorker", (WholeRequestWorker,), {"read_limit": read_limit})
