"""The local model server under load (real TensorFlow, real HTTP): 64 concurrent keep-alive clients are all
answered, none refused or reset; concurrent requests share model calls (server-side batching) and each gets
exactly its own rows; a body over the limit is 413; the batching options come from `serving:`."""

from __future__ import annotations

import http.client
import json
import threading
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
