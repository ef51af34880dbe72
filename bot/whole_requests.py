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

A prediction the core can relay (bot.web.WebApp.relay: the local model server known to answer, the instances
checked against a signature already known, the body at most RELAY_BODY_MAX) takes no thread at all: the worker's
loop sends it to the model server and writes its answer, stepping both sockets as they are ready. This saves the
hand-overs between the loop and a thread and gunicorn's parsing and response, which were most of the web
process's CPU a prediction. Everything else about a prediction (its refusals, a core still loading, a model
server to start, an error after it was sent, whose check may wait for a stopping server) goes to a thread as
before; a relayed prediction holds one of the same slots.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import selectors
import socket
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Any

from gunicorn import SERVER
from gunicorn.util import http_date
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
RELAY_BODY_MAX = 64 * 1024  # a prediction with a larger body takes a thread: its JSON is read and checked there
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


@dataclass(eq=False)
class _Relayed:
    """A prediction the worker's loop relays: its connection, the core's Relay, the request as it arrived (given
    back to a thread if nothing was sent), the answer's HTTP version and whether the connection is kept, until
    when it may take (its answer, then the client's reading of it), and what of it is still to be written."""

    conn: Any
    relay: Any
    request: bytes
    version: str
    keep: bool
    until: float
    exchanging: bool = True  # until the exchange with the model server is finished
    watched: int = 0  # the events the model server's socket is watched for
    out: memoryview | None = None
    writing: bool = False  # the client's socket is watched until it takes the rest of `out`


@functools.lru_cache(maxsize=2)
def _date(second: int) -> str:
    """The Date header's value for this second (formatted once a second, not once an answer)."""
    return http_date(second)


def _request_size(data: bytes) -> int:
    """The length of the whole request at the start of `data` (verdict: WHOLE): its head and announced body."""
    end = data.find(b"\r\n\r\n")
    length = _LENGTH.search(bytes(data[:end]).lower())
    return end + 4 + (int(length[1]) if length else 0)


class _Head:
    """httptools' callbacks for a request's head: its target, its Authorization header, its HTTP version and
    whether its connection is kept (asked when the message ends: the parser forgets after)."""

    def __init__(self) -> None:
        self.url, self.authorization = b"", b""
        self.version, self.keep_alive = "1.1", False
        self.parser: Any = None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"authorization":
            self.authorization = value

    def on_message_complete(self) -> None:
        self.version, self.keep_alive = self.parser.get_http_version(), self.parser.should_keep_alive()


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
        self.relays: dict[_Relayed, None] = {}  # predictions the loop relays now
        self._web: Any = None  # the WebApp, once loaded, when predictions may be relayed

    def load_wsgi(self) -> None:
        super().load_wsgi()
        from bot.web import WebApp

        # relayed answers are written here, not by gunicorn: none where its access log or TLS is wanted
        relaying = isinstance(self.wsgi, WebApp) and not self.cfg.accesslog and not self.cfg.is_ssl
        self._web = self.wsgi if relaying else None

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
        self._serve_waiting()

    def _serve_waiting(self) -> None:
        while self.waiting and self._take_slot():  # taken here for it: it is not sent back to wait again
            waiting = self.waiting.popleft()[1]
            waiting.slot_held = True
            self.enqueue_req(waiting)

    def enqueue_req(self, conn: Any) -> None:
        if self._web is None or not self._relay_started(conn):
            super().enqueue_req(conn)

    def _relay_started(self, conn: Any) -> bool:
        """On the loop: a whole prediction the web app can relay is sent to the model server from here (see the
        module's docstring), or waits for a slot; False: the connection goes to a thread as gthread has it."""
        if conn.is_http2:
            return False
        self._take_read_ahead(conn)
        state = self._read_available(conn)
        if state == WAIT:  # the request (or the rest of it) is still on its way: the poller waits for it, as
            deferred: Future[Any] = Future()  # gthread has a thread's _DEFER, without the thread's round trip
            deferred.set_result(gthread._DEFER)
            super().finish_request(conn, deferred)
            return True
        if state != WHOLE or not self._is_prediction(conn.early):
            return False
        import httptools  # here, not at the top: a worker that only answers Slack never loads it

        size = _request_size(conn.early)
        request, head = bytes(conn.early[:size]), _Head()
        parser = head.parser = httptools.HttpRequestParser(head)
        try:
            parser.feed_data(request)
        except httptools.HttpParserError:
            return False  # gunicorn's parser says what is wrong with it
        body = request[request.find(b"\r\n\r\n") + 4:]
        if parser.should_upgrade() or len(body) > RELAY_BODY_MAX:
            return False
        held, conn.slot_held = getattr(conn, "slot_held", False), False
        if not held and not self._take_slot():
            self.waiting.append((time.monotonic() + self.predict_wait, conn))
            return True
        path = head.url.partition(b"?")[0].decode("latin-1")
        relay = self._web.relay(path, head.authorization.decode("latin-1"), body)
        if relay is None:
            conn.slot_held = True  # the thread uses the slot taken
            return False
        del conn.early[:size]
        conn.first_byte_at = None
        relayed = _Relayed(conn, relay, request, head.version, head.keep_alive, time.monotonic() + relay.timeout)
        self.relays[relayed] = None
        self._step_relay(relayed)
        return True

    def _step_relay(self, relayed: _Relayed, _sock: Any = None) -> None:
        """The model server's socket is ready (or the request is new): go on with the exchange."""
        exchange = relayed.relay.exchange
        try:
            answer = exchange.step()
        except OSError as exc:
            from model_registry.adapters.backends.local_client import NotSent

            self._end_exchange(relayed)
            if isinstance(exc, NotSent):  # nothing was sent: a thread's predict starts a server and sends it
                del self.relays[relayed]
                conn = relayed.conn
                conn.early[:0] = relayed.request
                conn.slot_held = True
                super().enqueue_req(conn)
            else:
                self._relay_failed(relayed, exc)
            return
        if answer is None:
            if relayed.watched != exchange.events:
                callback = partial(self._step_relay, relayed)
                if relayed.watched:
                    self.poller.modify(exchange.sock, exchange.events, callback)
                else:
                    self.poller.register(exchange.sock, exchange.events, callback)
                relayed.watched = exchange.events
            return
        self._end_exchange(relayed)
        self._answer_relayed(relayed, self._web.relayed(relayed.relay, answer))

    def _end_exchange(self, relayed: _Relayed) -> None:
        if not relayed.exchanging:
            return
        relayed.exchanging = False
        exchange = relayed.relay.exchange
        if relayed.watched:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.poller.unregister(exchange.sock)
            relayed.watched = 0
        exchange.finish()

    def _relay_failed(self, relayed: _Relayed, exc: OSError) -> None:
        """The prediction was sent and then not answered: its error is found on a thread (it may wait a few
        seconds for a model server that is stopping), then answered from here."""
        relayed.until = float("inf")  # the thread's own check has its limit
        future = self.tpool.submit(self._web.relay_failed, relayed.relay, exc)
        future.add_done_callback(lambda done: self.method_queue.defer(self._failure_found, relayed, done))

    def _failure_found(self, relayed: _Relayed, done: Any) -> None:
        if relayed not in self.relays:  # closed meanwhile (the worker stops)
            return
        try:
            answer = done.result()
        except Exception:  # the error's own check failed: the connection is closed without an answer
            log.exception("a relayed prediction's failure could not be told to its client")
            relayed.keep, relayed.out = False, memoryview(b"")
            self._relay_done(relayed)
            return
        self._answer_relayed(relayed, answer)

    def _answer_relayed(self, relayed: _Relayed, answer: tuple[str, list[tuple[str, str]], bytes]) -> None:
        status, headers, body = answer
        keep = relayed.keep = relayed.keep and self.alive
        head = "".join(f"{name}: {value}\r\n" for name, value in headers)
        relayed.out = memoryview(
            f"HTTP/{relayed.version} {status}\r\nServer: {SERVER}\r\nDate: {_date(int(time.time()))}\r\n"
            f"Connection: {'keep-alive' if keep else 'close'}\r\n{head}\r\n".encode("latin-1") + body)
        relayed.until = time.monotonic() + self.read_limit  # for the client to take its answer
        relayed.conn.sock.setblocking(False)
        self._write_relayed(relayed)

    def _write_relayed(self, relayed: _Relayed, _sock: Any = None) -> None:
        sock = relayed.conn.sock
        try:
            while relayed.out:
                relayed.out = relayed.out[sock.send(relayed.out):]
        except BlockingIOError:
            if not relayed.writing:
                self.poller.register(sock, selectors.EVENT_WRITE, partial(self._write_relayed, relayed))
                relayed.writing = True
            return
        except OSError:  # the client is gone
            relayed.keep = False
        self._relay_done(relayed)

    def _relay_done(self, relayed: _Relayed) -> None:
        """The answer is written (or the client is gone): the slot is free, the connection kept or closed."""
        if relayed not in self.relays:
            return
        del self.relays[relayed]
        conn = relayed.conn
        if relayed.writing:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.poller.unregister(conn.sock)
            relayed.writing = False
        self._give_slot()
        if not relayed.keep:
            self.nr_conns -= 1
            self._linger(conn.sock)
        elif conn.early:  # the client's next request is here already
            self.enqueue_req(conn)
        else:  # as gthread keeps a connection for its next request
            conn.set_timeout()
            self.keepalived_conns.append(conn)
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_client_socket_readable, conn))
        self._serve_waiting()

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
        for relayed in [r for r in self.relays if force or r.until <= now]:
            timed_out = relayed.exchanging and not force  # the model server did not answer in time
            self._end_exchange(relayed)
            if timed_out:
                self._relay_failed(relayed, TimeoutError(f"timed out after {relayed.relay.timeout:g}s"))
            else:  # the client did not take its answer in time, or the worker stops
                relayed.keep, relayed.out = False, memoryview(b"")
                self._relay_done(relayed)
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
        self._take_read_ahead(conn)
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

    @staticmethod
    def _take_read_ahead(conn: Any) -> None:
        if conn.parser is not None:  # a keep-alive connection: bytes of its next request may be read ahead
            ahead = conn.parser.unreader.buf
            if ahead.getvalue():
                conn.early = bytearray(ahead.getvalue()) + getattr(conn, "early", b"")
                ahead.seek(0)
                ahead.truncate()

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
