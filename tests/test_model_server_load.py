"""The local model server under load (real TensorFlow, real HTTP): 64 concurrent keep-alive clients are all
answered, none refused or reset; concurrent requests share model calls (server-side batching) and each gets
exactly its own rows; a body over the limit is 413; the batching options come from `serving:`."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from typing import Any, Iterator

import pytest
from conftest import replay_args, train_and_wait

FLOWERS = [{"sepal_length": 4.3 + 0.05 * i, "sepal_width": 2.0 + 0.03 * i, "petal_length": 1.0 + 0.09 * i,
            "petal_width": 0.1 + 0.04 * i} for i in range(64)]


@pytest.fixture
def iris(make_registry: Any, sqlite_url: str, trained: dict) -> Iterator[Any]:
    reg = make_registry(sqlite_url, models={"iris": {"serving": {"max_batch_size": 16}}})
    assert train_and_wait(reg, "iris", "U_T", replay_args(trained["iris_a"]))["state"] == "SUCCEEDED"
    reg.versions.expose("iris", "U_T")
    reg.predictions.predict("iris", [FLOWERS[0]])  # started and loaded
    yield reg
    reg.backend.stop_server()


def _server(reg: Any) -> tuple[int, str]:
    info = json.loads((reg.settings.home / "serving" / "server.json").read_text())
    return int(info["port"]), str(info["secret"])


def _post(conn: http.client.HTTPConnection, secret: str, body: bytes, path: str = "/v1/models/iris:predict"
          ) -> tuple[int, dict[str, Any], str | None]:
    conn.request("POST", path, body=body, headers={"Authorization": f"Bearer {secret}",
                                                   "Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read() or b"null"), resp.getheader("X-Model-Version")


def test_64_concurrent_keep_alive_clients_are_answered_and_batched(iris: Any) -> None:
    reg = iris
    port, secret = _server(reg)
    version = reg.versions.default("iris")
    alone = {i: reg.predictions.predict("iris", [f])["predictions"][0] for i, f in enumerate(FLOWERS)}
    calls_before = _model_calls(port, secret)
    failures: list[str] = []
    answered = [0] * len(FLOWERS)
    start = threading.Barrier(len(FLOWERS))

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)  # one connection, kept alive
        body = json.dumps({"instances": [FLOWERS[i]]}).encode()
        try:
            start.wait()
            for _ in range(8):
                status, answer, answered_by = _post(conn, secret, body)
                if status != 200 or answered_by != version:
                    failures.append(f"{i}: {status} {answer} {answered_by}")
                elif answer["predictions"][0]["class_ids"] != alone[i]["class_ids"] or \
                        any(abs(a - b) > 1e-5 for a, b in zip(answer["predictions"][0]["probabilities"],
                                                               alone[i]["probabilities"])):
                    failures.append(f"{i}: got another instance's answer {answer} (alone: {alone[i]})")
                answered[i] += 1
        except OSError as exc:  # refused or reset
            failures.append(f"{i}: {type(exc).__name__}: {exc}")
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(FLOWERS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert failures == [] and answered == [8] * len(FLOWERS), failures[:5]
    calls = _model_calls(port, secret) - calls_before
    requests = 8 * len(FLOWERS)
    assert 0 < calls < requests, f"{requests} concurrent requests made {calls} model calls: they were not batched"


def _model_calls(port: int, secret: str) -> int:
    return sum(_calls_by_version(port, secret).values())


def _calls_by_version(port: int, secret: str) -> dict[str, int]:
    """/healthz's loaded versions of iris, with their model calls."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/healthz", headers={"Authorization": f"Bearer {secret}"})
        return {k.split("/")[1]: v for k, v in json.loads(conn.getresponse().read())["model_calls"].items()}
    finally:
        conn.close()


def test_a_bad_instance_in_a_batch_fails_alone_and_big_bodies_get_413(iris: Any) -> None:
    reg = iris
    port, secret = _server(reg)
    results: dict[int, int] = {}
    start = threading.Barrier(17)

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        # instance 0 has the right inputs but a row of the wrong width for its input: refused by the checks
        inst = {**FLOWERS[i], "sepal_length": [1.0, 2.0]} if i == 0 else FLOWERS[i]
        start.wait()
        results[i] = _post(conn, secret, json.dumps({"instances": [inst]}).encode())[0]
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(17)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results[0] == 400 and all(results[i] == 200 for i in range(1, 17)), results

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    status, answer, _ = _post(conn, secret, b'{"instances": [' + b"1.0," * (3 * 1024 * 1024) + b"1.0]}")
    assert status == 413 and "over" in answer["error"]
    conn.close()


def _raw(port: int, data: bytes, dribble: bytes = b"", every: float = 0.0, timeout: float = 30.0) -> bytes:
    """What the model server answers on one connection to `data` (then `dribble`, a byte every `every` seconds,
    until it answers or closes), read until it closes the connection or `timeout` passes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    answer = b""
    try:
        sock.sendall(data)
        deadline = time.monotonic() + timeout
        sock.settimeout(every or timeout)
        sent = 0
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:  # nothing yet: one more byte of the body
                if sent < len(dribble):
                    with contextlib.suppress(OSError):
                        sock.sendall(dribble[sent:sent + 1])
                    sent += 1
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
    finally:
        sock.close()
    return answer


def test_slow_chunked_and_huge_bodies_are_refused_and_the_connection_closed(make_registry: Any, sqlite_url: str,
                                                                            trained: dict, monkeypatch: Any) -> None:
    monkeypatch.setenv("STARCHART_SERVING_BODY_TIMEOUT", "2")  # read by the server the backend starts
    reg = make_registry(sqlite_url)
    assert train_and_wait(reg, "iris", "U_T", replay_args(trained["iris_a"]))["state"] == "SUCCEEDED"
    reg.versions.expose("iris", "U_T")
    try:
        reg.predictions.predict("iris", [FLOWERS[0]])
        port, secret = _server(reg)
        head = f"POST /v1/models/iris:predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\n"
        body = json.dumps({"instances": [FLOWERS[1]]}).encode()
        # a body that arrives a byte a second: 408 once BODY_TIMEOUT has passed, and the connection closed
        t0 = time.monotonic()
        answer = _raw(port, f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body[:3], body[3:], every=1.0)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"within 2 seconds" in answer, answer
        assert b"connection: close" in answer.lower() and 1.5 < time.monotonic() - t0 < 20
        # a chunked body over the limit: 413 as soon as it is, and closed (the rest is not read)
        chunk = b"x" * 1024 * 1024
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(9))
        answer = _raw(port, f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + chunks)
        assert answer.startswith(b"HTTP/1.1 413 ") and b"connection: close" in answer.lower(), answer[:300]
        # a Content-Length far over the limit: 413 before the body is read, closed
        answer = _raw(port, f"{head}Content-Length: {40 * 1024 * 1024}\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 413 ") and b"over 8388608 bytes" in answer, answer
        # a chunked body within the limit is a request like any other, answered on a connection kept alive
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/models/iris:predict", body=iter([body[:10], body[10:]]),
                     headers={"Authorization": f"Bearer {secret}", "Transfer-Encoding": "chunked"}, encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 200 and "predictions" in json.loads(resp.read())
        assert _post(conn, secret, body)[0] == 200
        conn.close()
    finally:
        reg.backend.stop_server()


def test_batching_options_reach_the_model_server_and_are_checked(iris: Any, make_registry: Any,
                                                                  sqlite_url: str) -> None:
    pointer = json.loads((iris.settings.home / "serving" / "iris.json").read_text())
    assert pointer["serving"] == {"max_batch_size": 16}
    from model_registry.config import ProjectConfig
    from model_registry.domain.errors import InvalidInput

    for bad, words in [({"max_batch_size": 0}, "from 1 to 4096"), ({"batch_timeout_micros": "2ms"}, "whole number"),
                       ({"max_batch": 8}, "no key max_batch"), ([8], "must be a mapping")]:
        path = iris.settings.home / "bad.yaml"
        path.write_text(json.dumps({"models": {"iris": {"serving": bad}}}))
        with pytest.raises(InvalidInput, match=words):
            ProjectConfig.load(path)


def test_a_switch_under_load_drops_no_request_and_warms_the_new_version_first(iris: Any, trained: dict) -> None:
    from model_registry.domain.errors import BackendError

    reg = iris
    assert train_and_wait(reg, "iris", "U_T", replay_args(trained["iris_b"]))["state"] == "SUCCEEDED"
    reg.versions.expose("iris", "U_T")
    old = reg.versions.default("iris")
    [new] = [v["name"] for v in reg.versions.of_model("iris")["versions"] if v["name"] != old]
    port, secret = _server(reg)
    stop = threading.Event()
    seen: list[list[str]] = [[] for _ in range(16)]
    failures: list[str] = []

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        body = json.dumps({"instances": [FLOWERS[i]]}).encode()
        try:
            while not stop.is_set():
                status, answer, version = _post(conn, secret, body)
                if status != 200:
                    failures.append(f"{i}: {status} {answer}")
                seen[i].append(version or "")
        except OSError as exc:
            failures.append(f"{i}: {type(exc).__name__}: {exc}")
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    try:
        _wait_until(lambda: all(len(s) >= 5 for s in seen))
        with pytest.raises(BackendError, match="did not load"):  # a version the server cannot load: no switch
            reg.backend.register_version("iris", {"name": "v20990101000000", "deployment_uri": "/nonexistent/"},
                                         first=False)
            reg.backend.set_default("iris", "v20990101000000", None)
        assert reg.backend.current_default("iris") == old
        reg.backend.set_default("iris", new, None)  # what an approved apply calls
        marks = [len(s) for s in seen]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)  # sent after the switch: the new one
        assert _post(conn, secret, json.dumps({"instances": [FLOWERS[0]]}).encode())[2] == new
        conn.close()
        _wait_until(lambda: all(len(s) >= m + 5 for s, m in zip(seen, marks)))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert failures == [], failures[:5]
    for versions in seen:  # each client: the old version, then the new one, never back
        switched = versions.index(new)
        assert set(versions[:switched]) == {old} and set(versions[switched:]) == {new}, versions
    log = (reg.settings.home / "serving" / "server.log").read_text()
    assert f"warmed iris {new} with batches of 1 and 2 instances" in log
    _wait_until(lambda: set(_calls_by_version(port, secret)) == {new})  # the old one unloaded, once idle
    assert f"unloaded iris {old}: neither the default nor a canary's candidate" in \
        (reg.settings.home / "serving" / "server.log").read_text()


def _wait_until(condition: Any, timeout: float = 120.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
