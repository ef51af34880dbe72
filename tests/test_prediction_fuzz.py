"""Thousands of generated prediction bodies against a real iris and sentiment model server (TensorFlow): every
one gets a JSON answer, 200 or 400, and the server is alive and answering after each; a body the core's check
accepts is one TensorFlow accepts."""

from __future__ import annotations

import json
import math
from typing import Any, Iterator

import pytest
import requests
from conftest import replay_args, train_and_wait
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_registry.adapters.signatures import read_signature_from_dir
from model_registry.domain.errors import InvalidInput
from model_registry.domain.instances import InstancesRefused, check_body

IRIS = ["petal_length", "petal_width", "sepal_length", "sepal_width"]
FUZZ = settings(max_examples=1500, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def nested(value: Any, levels: int) -> Any:
    for _ in range(levels):
        value = [value]
    return value


scalars = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.floats(-10, 10), st.integers(-(2**70), 2**70),
    st.integers(-5, 5), st.booleans(), st.none(), st.text(max_size=12),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=12)
deep = st.builds(nested, scalars, st.integers(0, 400))
anything = st.one_of(values, deep)


def instances_of(names: list[str], good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly well-formed instances, their values sometimes good, sometimes anything."""
    value = st.one_of(good, good, anything)
    whole = st.fixed_dictionaries({k: value for k in names})
    partial = st.dictionaries(st.sampled_from([*names, "colour"]), value, max_size=len(names) + 1)
    return st.one_of(whole, whole, partial, value)


def bodies(names: list[str], good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    rows = st.builds(lambda xs: {"instances": xs}, st.lists(instances_of(names, good), max_size=5))
    column = st.one_of(st.lists(good, min_size=1, max_size=5), anything, good,
                       st.builds(lambda v, n: [v] * n, good, st.sampled_from([1, 999, 1001, 5000])))
    columns = st.builds(lambda d: {"inputs": d},
                        st.one_of(st.fixed_dictionaries({k: column for k in names}),
                                  st.dictionaries(st.sampled_from([*names, "colour"]), column, max_size=5), column))
    valid_rows = st.builds(lambda xs: {"instances": xs},
                           st.lists(st.fixed_dictionaries({k: good for k in names}), min_size=1, max_size=5))
    valid_columns = st.integers(1, 5).flatmap(lambda n: st.builds(
        lambda d: {"inputs": d}, st.fixed_dictionaries({k: st.lists(good, min_size=n, max_size=n) for k in names})))
    return st.one_of(valid_rows, valid_columns, rows, rows, columns, anything,
                     st.builds(lambda r, c: {**r, **c}, rows, columns))


raw_texts = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda n: b"[" * n, st.integers(1, 200_000)),
    st.builds(lambda n: b'{"instances": ' + b"[" * n + b"1" + b"]" * n + b"}", st.integers(1, 5000)),
    st.sampled_from([b"NaN", b"Infinity", b'{"instances": [NaN]}', b'{"inputs": 1e400}', b"", b"null"]),
)


@pytest.fixture
def model_server(make_registry: Any, sqlite_url: str, trained: dict, trained_sentiment: Any) -> Iterator[Any]:
    reg = make_registry(sqlite_url)
    for model, source in (("iris", trained["iris_a"]), ("sentiment", trained_sentiment)):
        assert train_and_wait(reg, model, "U_T", replay_args(source))["state"] == "SUCCEEDED"
        reg.versions.expose(model, "U_T")
    reg.predictions.predict("iris", {k: 1.0 for k in IRIS})
    reg.predictions.predict("sentiment", ["warm up"])
    info = json.loads((reg.backend.serving / "server.json").read_text())
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {info['secret']}"
    yield reg, session, f"http://127.0.0.1:{info['port']}", info["pid"]
    session.close()
    reg.backend.stop_server()


def post(server: Any, model: str, data: bytes) -> requests.Response:
    _, session, base, pid = server
    resp = session.post(f"{base}/v1/models/{model}:predict", data=data, timeout=60,
                        headers={"Content-Type": "application/json"})
    assert resp.status_code in (200, 400), (resp.status_code, resp.text[:300], data[:300])
    assert resp.json(), "a JSON answer"
    health = session.get(f"{base}/healthz", timeout=30)
    assert health.status_code == 200 and health.json()["pid"] == pid, "the same server, alive"
    return resp


def accepted(body: Any, inputs: dict[str, Any]) -> bool:
    try:
        check_body(body, inputs)
    except InstancesRefused:
        return False
    return True


def test_fuzzed_bodies_never_end_the_model_server(model_server: Any) -> None:
    """Generated bodies straight to the model server, raw bytes, and bodies through the core."""
    reg = model_server[0]
    signatures = {m: read_signature_from_dir(reg.versions.of_model(m)["versions"][0]["deployment_uri"])["inputs"]
                  for m in ("iris", "sentiment")}
    iris_good = st.one_of(st.floats(-100, 100), st.integers(-100, 100))
    text_good = st.text(max_size=30)

    @FUZZ
    @given(st.one_of(st.tuples(st.just("iris"), bodies(IRIS, iris_good)),
                     st.tuples(st.just("sentiment"), bodies(["text"], text_good))))
    def one_body(case: tuple[str, Any]) -> None:
        model, body = case
        resp = post(model_server, model, json.dumps(body, allow_nan=True).encode())
        if accepted(body, signatures[model]):  # what the core lets through, TensorFlow answers
            assert resp.status_code == 200, (resp.text[:300], body)
            answer = resp.json()
            predictions = answer.get("predictions") or answer.get("outputs")
            assert predictions is not None
            if model == "iris" and "predictions" in answer:
                assert all(math.isclose(sum(p["probabilities"]), 1, rel_tol=1e-3) for p in predictions)
        else:
            assert resp.status_code == 400 and resp.json()["error"]

    one_body()
    raw_bytes_never_end_the_model_server(model_server)
    bodies_through_the_core_are_answered_or_refused(model_server)


def raw_bytes_never_end_the_model_server(server: Any) -> None:
    """Bytes that are not a body (binary, NaN literals, brackets 200,000 deep) get a 400 and end nothing."""
    @settings(FUZZ, max_examples=300)
    @given(model=st.sampled_from(["iris", "sentiment"]), data=raw_texts)
    def one_text(model: str, data: bytes) -> None:
        assert post(server, model, data).status_code == 400

    one_text()


def bodies_through_the_core_are_answered_or_refused(server: Any) -> None:
    """Through Predictions.predict: an answer or an InvalidInput, never another error, and the server lives."""
    reg, session, base, pid = server

    @settings(FUZZ, max_examples=300)
    @given(body=bodies(IRIS, st.floats(-100, 100)))
    def one_body(body: Any) -> None:
        try:
            answer = reg.predictions.predict("iris", json.dumps(body, allow_nan=True))
            assert answer["version"] and ("predictions" in answer or "outputs" in answer)
        except InvalidInput as exc:
            assert exc.message
        assert session.get(f"{base}/healthz", timeout=30).json()["pid"] == pid

    one_body()
