"""The web process's client for the local model server (local_client.py), against small real socket servers:
keep-alive reuse, one write per request, a connection the server closed while idle is replaced, and each failure
named by its exception (never sent, cut off, timed out)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from model_registry.adapters.backends.local_client import CutOff, NotSent, ServerConnections

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Model-Version: v1\r\nContent-Length: 2\r\n\r\n{}"


@pytest.fixture
def server() -> Iterator[Callable[[Callable[[socket.socket, list[bytes]], None]], tuple[int, list[bytes]]]]:
    """A listening socket whose connections are handled, one thread each, by the given function; the reads of
    every connection are recorded."""
    listeners: list[socket.socket] = []

    def start(handle: Callable[[socket.socket, list[bytes]], None]) -> tuple[int, list[bytes]]:
        sock = socket.create_server(("127.0.0.1", 0))
        listeners.append(sock)
        reads: list[bytes] = []

        def accept() -> None:
            while True:
                try:
                    conn, _ = sock.accept()
                except OSError:
                    return
                threading.Thread(target=handle, args=(conn, reads), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()
        return sock.getsockname()[1], reads

    yield start
    for sock in listeners:
        sock.close()


def _requests(conn: socket.socket, reads: list[bytes], answer: bytes, most: int = 100) -> None:
    """Answer each whole request read (headers and Content-Length body) with `answer`, `most` times."""
    buffer = b""
    with conn:
        for _ in range(most):
            while b"\r\n\r\n" not in buffer:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                reads.append(chunk)
                buffer += chunk
            head, _, rest = buffer.partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            while len(rest) < length:
                chunk = conn.recv(65536)
                reads.append(chunk)
                rest += chunk
            buffer = rest[length:]
            conn.sendall(answer)


def test_requests_share_a_kept_alive_connection_and_are_sent_in_one_write(server) -> None:
    port, reads = server(lambda conn, reads: _requests(conn, reads, OK))
    connections = ServerConnections(port)
    for _ in range(3):
        answer = connections.request("POST", "/v1/models/iris:predict", b'{"instances": [1]}',
                                     {"Authorization": "Bearer s", "Content-Type": "application/json"})
        assert (answer.status, answer.reason, answer.data) == (200, "OK", b"{}")
        assert answer.headers["x-model-version"] == "v1"
    assert len(reads) == 3 and all(r.endswith(b'\r\n\r\n{"instances": [1]}') for r in reads), reads
    assert b"Authorization: Bearer s\r\n" in reads[0] and b"Content-Length: 18\r\n" in reads[0]
    assert len(connections._idle) == 1  # one connection, given back after each answer
    connections.close()


def test_a_connection_the_server_closed_while_idle_is_not_used(server) -> None:
    port, _ = server(lambda conn, reads: _requests(conn, reads, OK, most=1))  # closes after one answer
    connections = ServerConnections(port)
    assert connections.request("GET", "/healthz").status == 200
    time.sleep(0.2)  # the server's close has arrived
    assert connections.request("GET", "/healthz").status == 200  # on a new connection, not cut off


def test_an_answer_that_says_close_closes_the_connection(server) -> None:
    closing = OK.replace(b"Content-Length: 2", b"Connection: close\r\nContent-Length: 2")
    port, _ = server(lambda conn, reads: _requests(conn, reads, closing, most=1))
    connections = ServerConnections(port)
    assert connections.request("GET", "/healthz").status == 200
    assert connections._idle == []


def test_failures_are_named_by_what_happened(server) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        free = unused.getsockname()[1]
    with pytest.raises(NotSent, match="no connection"):  # nothing listens: the request was never sent
        ServerConnections(free).request("GET", "/healthz")

    def half(conn: socket.socket, reads: list[bytes]) -> None:
        reads.append(conn.recv(65536))
        conn.sendall(OK[:40])  # the status line and part of the headers, then gone
        conn.close()

    port, _ = server(half)
    with pytest.raises(CutOff, match="closed the connection before it answered"):
        ServerConnections(port).request("POST", "/v1/models/iris:predict", b"{}")

    def garbage(conn: socket.socket, reads: list[bytes]) -> None:
        reads.append(conn.recv(65536))
        conn.sendall(b"SSH-2.0-OpenSSH\r\n\r\n")

    port, _ = server(garbage)
    with pytest.raises(CutOff, match="HttpParserError"):
        ServerConnections(port).request("GET", "/healthz")

    def silent(conn: socket.socket, reads: list[bytes]) -> None:
        reads.append(conn.recv(65536))
        time.sleep(3)

    port, _ = server(silent)
    with pytest.raises(TimeoutError):
        ServerConnections(port).request("GET", "/healthz", read_timeout=0.5)
    with pytest.raises(ValueError, match="line break"):  # a header cannot smuggle another one in
        ServerConnections(port).request("GET", "/healthz", headers={"X-Request-Id": "1\r\nX-Evil: 1"})


def _driven(exchange, seconds: float = 5.0):
    """Step `exchange` as the web worker's loop does: watch its socket for its events, step it when ready;
    its answer (or what it raised), then finish it."""
    import selectors

    poller = selectors.DefaultSelector()
    deadline = time.monotonic() + seconds
    try:
        answer = exchange.step()  # at once, as the worker does: a kept connection is written to without a wait
        while answer is None:
            poller.register(exchange.sock, exchange.events)
            assert poller.select(max(0.0, deadline - time.monotonic())), "the exchange's socket never got ready"
            poller.unregister(exchange.sock)
            answer = exchange.step()
        return answer
    finally:
        poller.close()
        exchange.finish()


def test_an_exchange_is_the_same_request_without_blocking_and_shares_the_kept_connections(server) -> None:
    port, reads = server(lambda conn, reads: _requests(conn, reads, OK))
    connections = ServerConnections(port)
    first = connections.exchange("POST", "/v1/models/iris:predict", b'{"instances": [1]}',
                                 {"Authorization": "Bearer s"})
    assert first.sock.getblocking() is False
    answer = _driven(first)
    assert (answer.status, answer.data, answer.headers["x-model-version"]) == (200, b"{}", "v1")
    assert len(connections._idle) == 1, "kept for the next request once finished"
    again = connections.request("POST", "/v1/models/iris:predict", b'{"instances": [1]}',
                                {"Authorization": "Bearer s"})  # the blocking client takes the same connection
    assert again.status == 200 and len(connections._idle) == 1
    assert _driven(connections.exchange("GET", "/healthz")).status == 200
    assert reads[0] == reads[1], "the same bytes, in one write, whichever client sent them"
    assert len(reads) == 3 and len(connections._idle) == 1


def test_an_exchange_names_its_failures_as_the_blocking_client_does(server) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        free = unused.getsockname()[1]
    with pytest.raises(NotSent, match="no connection"):  # nothing listens: never sent (told at once or at its step)
        _driven(ServerConnections(free).exchange("GET", "/healthz"))

    def half(conn: socket.socket, reads: list[bytes]) -> None:
        reads.append(conn.recv(65536))
        conn.sendall(OK[:40])
        conn.close()

    port, _ = server(half)
    connections = ServerConnections(port)
    with pytest.raises(CutOff, match="closed the connection before it answered"):
        _driven(connections.exchange("POST", "/v1/models/iris:predict", b"{}"))
    assert connections._idle == [], "a connection cut off is not kept"

    def garbage(conn: socket.socket, reads: list[bytes]) -> None:
        reads.append(conn.recv(65536))
        conn.sendall(b"SSH-2.0-OpenSSH\r\n\r\n")

    port, _ = server(garbage)
    with pytest.raises(CutOff, match="HttpParserError"):
        _driven(ServerConnections(port).exchange("GET", "/healthz"))

    closing = OK.replace(b"Content-Length: 2", b"Connection: close\r\nContent-Length: 2")
    port, _ = server(lambda conn, reads: _requests(conn, reads, closing, most=1))
    connections = ServerConnections(port)
    assert _driven(connections.exchange("GET", "/healthz")).status == 200
    assert connections._idle == [], "an answer that says close closes the connection"

    def silent(conn: socket.socket, reads: list[bytes]) -> None:
        reads.append(conn.recv(65536))
        time.sleep(3)

    port, _ = server(silent)
    connections = ServerConnections(port)
    exchange = connections.exchange("GET", "/healthz")
    assert exchange.step() is None and exchange.events & 1, "sent; now it waits to read (EVENT_READ)"
    exchange.finish()  # given up (the worker's time-out): closed, not kept
    assert exchange.sock.fileno() == -1 and connections._idle == []
