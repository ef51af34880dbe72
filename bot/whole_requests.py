"""gunicorn's threaded worker, giving a request a thread only once it has fully arrived, within a time limit.

The stock gthread worker hands a connection to a thread at its first byte; the thread then blocks reading the
headers and body, so clients that send a header line every few seconds hold every thread and /healthz or
Slack's acks wait behind them. Here each readable moment reads what is there without blocking and goes back
to the poller (holding no thread) until the headers and the body are in, or the request's time limit is over
(then 408 and the connection is closed). Requests that arrive at once, as Slack's do, are served as before.

What could make a thread wait on the client is refused before any thread reads it: headers over 64 KB (431),
a chunked body (411: Slack and the prediction clients send Content-Length), an announced body over the limit
(413). `Expect: 100-continue` gets no early 100: such clients send their body after a short wait all the same.
Bytes of a keep-alive connection's next request that gunicorn read ahead go through the same path.

A connection that is not kept (`Connection: close`, an error) is closed as gunicorn closes it — its write side
shut, what the client still sends read and dropped until it closes too (RFC 9112, 9.6), so the answer is not cut
by a reset — but without waiting for the client on the worker's loop: gunicorn's close waits there, blocking, up
to two seconds per client, and three clients that read their answer and keep their socket open held every other
request (Slack's acks included) for six seconds. Here the socket goes to the poller until the client closes, the
drain cap or LINGER is reached.

Predictions take at most the worker's threads but two (RESERVED_THREADS; `starchart serve` gives a worker
WEB_THREADS and these two) at once: a model server that hangs holds the predictions' threads until its time-out
(120 s), and when they held all of them, Slack's acks and /healthz waited as long.
A prediction finding every slot taken waits in the worker's loop, holding no thread, until one is free, and after
`predict_wait` seconds is answered 503.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import selectors
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Any

from gunicorn.workers import gthread

log = logging.getLogger("starchart.web")
HEADERS_CAP = 64 * 1024  # more header bytes than this: answered 431 here, never handed to gunicorn's parser
BODY_CAP = 1024 * 1024  # bot.web's MAX_BODY: a longer announced body is answered 413 before it is read
_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]{1,12})[ \t]*(?=\r\n|$)")
LINGER = 2.0  # seconds a closed connection's client has to close its side (gunicorn's own close waits as long)
LINGER_DRAIN = 64 * 1024  # bytes read and dropped from it meanwhile, at most (gunicorn's cap)
# the same after a refusal (408, 411, 413, 431), whose client may still be sending the rest of a large request
REFUSED_DRAIN = 8 * BODY_CAP
LINGERING_MAX = 512  # connections waiting so at once; beyond, the oldest is closed at once
RESERVED_THREADS = 2  # threads of a worker that predictions never take: Slack's requests and /healthz have them
_SLOT = object()  # handle()'s answer for a prediction that must wait for a slot
WAIT, WHOLE, GONE, LATE = "wait", "whole", "gone", "late"
REFUSED = {  # what is answered at once, and why, for requests that are never handed on
    "head": (431, "Request Header Fields Too Large", f"the request's headers are over {HEADERS_CAP // 1024} KB"),
    "chunked": (411, "Length Required", "send the body with a Content-Length (chunked bodies are not accepted)"),
    "body": (413, "Payload Too Large", f"the request body is over {BODY_CAP // 1024} KB"),
}


def error_answer(status: int, reason: str, why: str, *headers: str) -> bytes:
    """A whole HTTP answer that closes the connection, its body {"error": why} as bot.web answers its errors."""
    body = json.dumps({"error": why}).encode()
    head = "".join(f"{h}\r\n" for h in ("Connection: close", *headers, "Content-Type: application/json"))
    return f"HTTP/1.1 {status} {reason}\r\n{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


@dataclass(eq=False)
class _Lingering:
    """A closed connection waiting for its client's close: until when, and how much it may still send."""

    until: float
    sock: socket.socket
    cap: int
    drained: int = 0


def verdict(data: bytes) -> str:
    """What the bytes of a request received so far call for: WAIT for more, a WHOLE request (head and announced
    body) to hand to gunicorn, or a key of REFUSED."""
    end = data.find(b"\r\n\r\n", 0, HEADERS_CAP + 4)
    if end < 0:
        return "head" if len(data) > HEADERS_CAP else WAIT
    head = data[:end].lower()
    if b"\r\ntransfer-encoding:" in head:
        return "chunked"
    length = _LENGTH.search(head)
    if length is not None and int(length[1]) > BODY_CAP:
        return "body"
    return WHOLE if length is None or len(data) - (end + 4) >= int(length[1]) else WAIT


class WholeRequestWorker(gthread.ThreadWorker):
    """gthread, reading each request without a thread until it is whole; `read_limit` seconds at most."""

    read_limit = 10.0
    predict_wait = 30.0  # seconds a prediction may wait for a slot
    # seconds between heartbeats to the arbiter: gthread writes one (a utime of its file) at every turn of its loop,
    # which is once a request under load; the arbiter's limit is `timeout` (30 s)
    heartbeat = 1.0
    _beat_at = float("-inf")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lingering: deque[_Lingering] = deque()  # closed connections waiting for their client's close, oldest first
        from bot.web import PREDICT_ROUTE  # here, in the worker: the arbiter does not load the app's modules

        self._predict_route = PREDICT_ROUTE
        self.slots = max(1, self.cfg.threads - RESERVED_THREADS)  # predictions in threads at once, at most
        self.predicting = 0  # of those, running now (taken and given back on the threads, under the lock)
        self._slots_lock = threading.Lock()
        self.waiting: deque[tuple[float, Any]] = deque()  # predictions waiting for a slot: (until when, conn)

    def notify(self) -> None:
        now = time.monotonic()
        if now - self._beat_at >= self.heartbeat:
            self._beat_at = now
            super().notify()

    def finish_request(self, conn: Any, fs: Any) -> None:
        """On the worker's loop, once a thread is done with a connection: a prediction that found no slot waits;
        one that is not kept lingers in the poller (see the module's docstring); the others go on as gthread has
        them. Then the predictions waiting take the slots that are free."""
        result = None if fs.cancelled() or fs.exception() is not None else fs.result()
        if result is _SLOT:
            self.waiting.append((time.monotonic() + self.predict_wait, conn))
        elif result is False or fs.cancelled():
            self.nr_conns -= 1
            self._linger(conn.sock, REFUSED_DRAIN if getattr(conn, "refused", False) else LINGER_DRAIN)
        else:
            super().finish_request(conn, fs)
        while self.waiting and self._take_slot():  # taken here for it: it is not sent back to wait again
            waiting = self.waiting.popleft()[1]
            waiting.slot_held = True
            self.enqueue_req(waiting)

    def _linger(self, sock: socket.socket, cap: int = LINGER_DRAIN) -> None:
        try:
            sock.shutdown(socket.SHUT_WR)  # the answer is followed by a FIN, not a reset
            sock.setblocking(False)
        except OSError:  # the client is gone already
            sock.close()
            return
        if len(self.lingering) >= LINGERING_MAX:
            self._end_linger(self.lingering[0])
        entry = _Lingering(time.monotonic() + LINGER, sock, cap)
        self.lingering.append(entry)
        self.poller.register(sock, selectors.EVENT_READ, partial(self._lingering_readable, entry))

    def _lingering_readable(self, entry: _Lingering, _sock: Any) -> None:
        """Read and drop what the client sent; closed once it closes its side, resets, or sent `cap` bytes."""
        for _ in range(16):  # at most 1 MB a turn of the loop: a client sending fast does not hold it
            try:
                chunk = entry.sock.recv(65536)
            except BlockingIOError:
                return  # read all there was: more later, or the client's close
            except OSError:  # reset by the client
                break
            entry.drained += len(chunk)
            if not chunk or entry.drained >= entry.cap:  # closed by the client, or it sends on and on: enough
                break
        else:
            return  # more later
        self._end_linger(entry)

    def _end_linger(self, entry: _Lingering) -> None:
        with contextlib.suppress(ValueError):
            self.lingering.remove(entry)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.poller.unregister(entry.sock)
        entry.sock.close()

    def murder_keepalived(self, force: bool = False) -> None:
        """gthread's sweep of idle keep-alive connections, then of lingering ones past LINGER and of predictions
        that waited `predict_wait` for a slot (each turn of the worker's loop, at least once a second)."""
        super().murder_keepalived(force)
        now = time.monotonic()
        while self.lingering and (force or self.lingering[0].until <= now):
            self._end_linger(self.lingering[0])
        while self.waiting and (force or self.waiting[0][0] <= now):
            conn = self.waiting.popleft()[1]
            answer = error_answer(503, "Service Unavailable", f"every prediction slot of this web worker "
                                  f"({self.slots}) has been busy for {self.predict_wait:g}s: the model server answers "
                                  "slowly or not at all; retry later", "Retry-After: 5")
            with contextlib.suppress(OSError):  # a few hundred bytes: they fit the socket's buffer
                conn.sock.setblocking(False)
                conn.sock.send(answer)
            self.nr_conns -= 1
            self._linger(conn.sock)

    def _is_prediction(self, data: bytes) -> bool:
        """Whether the request in `data` (whole) is a POST to the prediction route (bot.web.PREDICT_ROUTE)."""
        method, _, rest = bytes(data[:data.find(b"\r\n")]).partition(b" ")
        if method != b"POST":
            return False
        route = self._predict_route.match(rest.rpartition(b" ")[0].partition(b"?")[0].decode("latin-1"))
        return route is not None and bool(route["verb"])

    def _take_slot(self) -> bool:
        with self._slots_lock:
            if self.predicting >= self.slots:
                return False
            self.predicting += 1
            return True

    def _give_slot(self) -> None:
        with self._slots_lock:
            self.predicting -= 1

    def handle(self, conn: Any) -> Any:
        held, conn.slot_held = getattr(conn, "slot_held", False), False  # a slot taken for it by the loop
        try:
            return self._handle(conn, held)
        finally:
            if held:
                self._give_slot()

    def _handle(self, conn: Any, held: bool) -> Any:
        if self.cfg.is_ssl or conn.is_http2:
            return super().handle(conn)  # TLS or HTTP/2 (serve configures neither: a router terminates TLS)
        if conn.parser is not None:  # a keep-alive connection: bytes of its next request may be read ahead
            ahead = conn.parser.unreader.buf
            if ahead.getvalue():
                conn.early = bytearray(ahead.getvalue()) + getattr(conn, "early", b"")
                ahead.seek(0)
                ahead.truncate()
        state = self._read_available(conn)
        if state == WAIT:
            return gthread._DEFER  # back to the poller until more arrives (or its keepalive timeout)
        if state == LATE:
            log.warning("closed a connection from %s: its request did not arrive within %gs",
                        conn.client, self.read_limit)
            self._refuse(conn, 408, "Request Timeout", f"the request did not arrive within {self.read_limit:g} seconds")
        elif state in REFUSED:
            self._refuse(conn, *REFUSED[state])
        if state != WHOLE:
            return False
        prediction = not held and self._is_prediction(conn.early)
        if prediction and not self._take_slot():
            return _SLOT  # it waits in the loop, its request whole in conn.early
        try:
            if conn.parser is None:
                conn.init()
            conn.parser.unreader.unread(bytes(conn.early))
            conn.early, conn.first_byte_at, conn.data_ready = bytearray(), None, True
            return super().handle(conn)
        finally:
            if prediction:
                self._give_slot()

    def _read_available(self, conn: Any) -> str:
        """Read what the socket holds now, without blocking, into `conn.early`; say what to do next."""
        if not hasattr(conn, "early"):
            conn.early, conn.first_byte_at = bytearray(), None
        state = verdict(conn.early)
        conn.sock.setblocking(False)
        try:
            with contextlib.suppress(BlockingIOError):  # nothing more has arrived yet: decide below from what has
                while state == WAIT:
                    chunk = conn.sock.recv(65536)
                    if not chunk:  # the client closed: a whole request is still served, nothing is dropped
                        return WHOLE if conn.early else GONE
                    conn.early += chunk
                    if conn.first_byte_at is None:
                        conn.first_byte_at = time.monotonic()
                    state = verdict(conn.early)
        except OSError:
            return GONE
        finally:
            conn.sock.setblocking(True)
        if state == WAIT and conn.first_byte_at is not None and time.monotonic() - conn.first_byte_at > self.read_limit:
            return LATE
        return state

    def _refuse(self, conn: Any, status: int, reason: str, why: str) -> None:
        """An error answer; then the connection lingers in the poller (finish_request), holding no thread, while
        what the client still sends is read and dropped (up to REFUSED_DRAIN), so that it reads the answer before
        a reset."""
        conn.refused = True
        with contextlib.suppress(OSError):  # the client may be gone or still sending: it is closed either way
            conn.sock.settimeout(1.0)  # a few hundred bytes: they fit the socket's buffer unless the client is gone
            conn.sock.sendall(error_answer(status, reason, why))


def worker_class(read_limit: float, predict_wait: float = WholeRequestWorker.predict_wait) -> type[WholeRequestWorker]:
    """The worker class for gunicorn's `worker_class` setting, with these time limits."""
    return type("WholeRequestWorker", (WholeRequestWorker,), {"read_limit": read_limit, "predict_wait": predict_wait})
