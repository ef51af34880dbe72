"""A canary on Vertex AI, through the local fake's endpoints: the candidate deployed beside the default with its
share of the endpoint's traffic_split, then promoted (all the traffic, the alias moved, the old deployment gone)
or rolled back (all the traffic back, the candidate undeployed); its figures read from the fake's Cloud Monitoring,
built from what each deployment served, so the worker rolls a failing candidate back and promotes a clean bake, and
leaves the canary alone when Monitoring cannot be read."""

from __future__ import annotations

import socket
import time
from datetime import datetime, timedelta
from typing import Any, Callable
from unittest.mock import ANY

import pytest
import requests
import test_vertex_backend as vertex_tests
from conftest import replay_args, train_and_wait, with_backend
from fakes.vertex_fake import VertexFake, fast_backend, replay_runner, vertex_env
from test_vertex_backend import ENDPOINT, V1, V2, serving, versions_of

from bot import text as plain
from bot.worker import one_pass
from handlers.results import CanaryCard, CanaryShown
from model_registry.domain import canary as canary_rules
from model_registry.domain.errors import Refused, StarchartError
from model_registry.domain.names import utcnow

fake = vertex_tests.fake  # the Vertex tests' fixtures: a fake of Vertex AI's endpoints on a local port, and
gcs, bucket = vertex_tests.gcs, vertex_tests.bucket  # a Cloud Storage emulator with a bucket of the test's own
FLOWER = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
TRAINER, REQUESTER, APPROVER = "U_TRAINER", "U_REQ", "U_OK"


def test_a_canary_is_the_endpoints_traffic_split_and_ends_in_one_update(fake: VertexFake) -> None:
    backend = fast_backend(fake, "gs://starchart-test-ml", endpoints={"iris": ENDPOINT})
    refs = versions_of(backend, V1, V2)
    with pytest.raises(Refused, match="no endpoint serves the default of iris yet"):
        backend.start_canary("iris", V2, refs[1], 10, 0.1)
    backend.set_default("iris", V1, refs[0])

    fake.reset_requests()
    backend.start_canary("iris", V2, refs[1], 10, 0.1)
    assert serving(fake) == [("iris@1", 90), ("iris@2", 10)]
    [deploy] = fake.calls("endpoints.deployModel")
    new_share = deploy.body["trafficSplit"].pop("0")
    assert new_share == 0 and list(deploy.body["trafficSplit"].values()) == [100], \
        "deployed beside the default with no traffic first"
    [patch] = fake.calls("endpoints.patch")
    assert sorted(patch.body["trafficSplit"].values()) == [10, 90], "then the split moved in one update"
    assert backend.canary_split("iris") == {V1: 90, V2: 10}
    assert backend.current_default("iris") == V1, "the alias does not move during a canary"
    figures = backend.canary_figures("iris")
    assert figures is not None and figures["candidate_version"] == V2
    assert figures["candidate"]["requests"] == figures["base"]["requests"] == 0, "nothing served yet"
    assert figures["mirrored"] == 0

    backend.end_canary("iris")  # rollback
    assert serving(fake) == [("iris@1", 100)] and backend.canary_split("iris") == {V1: 100}
    assert fake.count("endpoints.undeployModel") == 1

    backend.start_canary("iris", V2, refs[1], 25, 0.1)
    assert backend.canary_split("iris") == {V1: 75, V2: 25}
    fake.reset_requests()
    backend.set_default("iris", V2, refs[1])  # promoted to 100%: the deployment already there takes it all
    assert fake.count("endpoints.deployModel") == 0
    assert serving(fake) == [("iris@2", 100)] and backend.current_default("iris") == V2


def test_a_vertex_canary_needs_an_endpoint_and_is_judged_by_people(fake: VertexFake) -> None:
    backend = fast_backend(fake, "gs://starchart-test-ml")  # no endpoint for iris
    refs = versions_of(backend, V1, V2)
    backend.set_default("iris", V1, refs[0])
    with pytest.raises(Refused, match="not served from an endpoint") as refused:
        backend.start_canary("iris", V2, refs[1], 10, 0.1)
    assert "endpoint" in refused.value.hint and "without --canary" in refused.value.hint
    assert backend.canary_split("iris") == {V1: 100}
    now = datetime(2026, 12, 20, 9, 0)
    verdict = canary_rules.judge(backend.canary_figures("iris"), canary_rules.CanaryPolicy(auto_promote=True),
                                 now, now + timedelta(seconds=1))
    assert verdict.action == canary_rules.WAIT, "no figures: the end of the bake waits for a click"


# ---------------------------------------------------------------- figures from Cloud Monitoring


def predict_many(predict: Callable[[], Any], n: int) -> tuple[int, int]:
    """n predictions: (answered, failed)."""
    failed = 0
    for _ in range(n):
        try:
            predict()
        except StarchartError:
            failed += 1
    return n - failed, failed


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens once it is closed


def test_the_figures_are_what_each_deployment_served_as_monitoring_publishes_them(fake: VertexFake) -> None:
    backend = fast_backend(fake, "gs://starchart-test-ml", endpoints={"iris": ENDPOINT})
    refs = versions_of(backend, V1, V2)
    backend.set_default("iris", V1, refs[0])
    backend.start_canary("iris", V2, refs[1], 20, 0.1)
    fake.answer_as(V1, latency_ms=12.0)
    fake.answer_as(V2, latency_ms=80.0, error=(500, "The model server answered 500: the candidate crashed."))
    answered, failed = predict_many(lambda: backend.predict("iris", None, {"instances": [FLOWER]}), 100)
    assert (answered, failed) == (80, 20), "the fake keeps the 80/20 split exactly"

    figures = backend.canary_figures("iris")
    assert figures["candidate"]["requests"] == 20 and figures["candidate"]["errors"] == 20
    assert figures["base"]["requests"] == 80 and figures["base"]["errors"] == 0
    # exponential buckets growing by 1.25: a percentile is known to within its bucket
    assert 80 / 1.25 <= figures["candidate"]["p50_ms"] <= 80 * 1.25
    assert 12 / 1.25 <= figures["base"]["p50_ms"] <= figures["base"]["p99_ms"] <= 12 * 1.25
    assert figures["mirrored"] == figures["agreed"] == 0, "Vertex AI mirrors nothing"
    parsed = canary_rules.Figures.from_dict({**figures, "at": None})
    assert parsed is not None and parsed.agreement is None and parsed.candidate.error_rate == 1.0

    calls = fake.calls("timeSeries.list")
    assert {c.query["filter"].split('"')[1].rsplit("/", 1)[1] for c in calls} == {
        "prediction_count", "error_count", "prediction_latencies"}
    endpoint_id = fake.endpoints_of("iris")[0]["name"].rsplit("/", 1)[1]
    assert all(f'resource.labels.endpoint_id="{endpoint_id}"' in c.query["filter"] for c in calls)
    [latencies] = [c for c in calls if "prediction_latencies" in c.query["filter"]]
    assert 'metric.labels.latency_type="total"' in latencies.query["filter"], "the overhead series is left out"
    assert all(c.query["aggregation.groupByFields"] == "metric.label.deployed_model_id" for c in calls)

    fake.latency_buckets = {"explicitBuckets": {"bounds": [5, 10, 20, 50, 100, 200]}}
    again = backend.canary_figures("iris")
    assert 50 <= again["candidate"]["p50_ms"] <= 100 and 10 <= again["base"]["p99_ms"] <= 20
    assert again["candidate"]["requests"] == 20


def test_the_fakes_monitoring_refuses_what_monitoring_refuses(fake: VertexFake) -> None:
    url = f"{fake.url}/v3/projects/{fake.project}/timeSeries"
    count = 'metric.type="aiplatform.googleapis.com/prediction/online/prediction_count"'
    window = {"interval.startTime": "2026-12-20T09:00:00Z", "interval.endTime": "2026-12-20T10:00:00Z"}
    ok = requests.get(url, params={"filter": count, **window}, timeout=5)
    assert ok.status_code == 200 and ok.json() == {}, "no series: nothing was served"
    unknown = requests.get(url, params={"filter": count + ' AND metric.labels.colour="red"', **window}, timeout=5)
    assert unknown.status_code == 400 and unknown.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert requests.get(url, params={"filter": "metric.type=prediction_count", **window}, timeout=5).status_code == 400
    no_metric = requests.get(url, params={"filter": 'metric.type="aiplatform.googleapis.com/nope"', **window},
                             timeout=5)
    assert no_metric.status_code == 404
    short = requests.get(url, params={"filter": count, **window, "aggregation.perSeriesAligner": "ALIGN_DELTA",
                                      "aggregation.alignmentPeriod": "10s"}, timeout=5)
    assert short.status_code == 400 and "at least 60s" in short.json()["error"]["message"]


MONITORED = {"min_requests": 10, "max_p99_ratio": 1000}  # latency is judged in its own test below


def vertex_canary(make_registry: Callable[..., Any], url: str, fake: VertexFake, bucket: str, gcs: str,
                  trained: dict, canary: dict[str, Any], bake: str,
                  **backend_options: Any) -> tuple[Any, str, str, int]:
    """A registry on the fake whose iris is served from an endpoint: two versions, the first the default, and a
    canary of the second at 20% started (approved and applied)."""
    fake.runner = replay_runner(gcs)
    backend = fast_backend(fake, bucket, endpoints={"iris": ENDPOINT}, **backend_options)
    reg = make_registry(url, backend=backend, env=vertex_env(bucket), models={"iris": {"canary": canary}})
    for source in (trained["iris_a"], trained["iris_b"]):
        assert train_and_wait(reg, "iris", TRAINER, replay_args(source))["state"] == "SUCCEEDED"
    exposed = reg.versions.expose("iris", TRAINER)
    assert len(exposed["exposed"]) == 2 and not exposed["errors"], exposed
    base, cand = sorted(v["name"] for v in exposed["exposed"])
    req = reg.promotions.promote("iris", cand, REQUESTER, canary="20", bake=bake)
    assert reg.promotions.decide(req["id"], APPROVER, True)["state"] == "approved"
    assert reg.promotions.apply_request(req["id"], actor=APPROVER)["state"] == "canary"
    assert reg.backend.canary_split("iris") == {base: 80, cand: 20}
    return reg, base, cand, int(req["id"])


def predict_through(reg: Any, n: int) -> tuple[int, int]:
    return predict_many(lambda: reg.predictions.predict("iris", {"instances": [FLOWER]}), n)


def bake_over(reg: Any, request_id: int) -> bool:
    until = reg.canaries.get(request_id)["bake_until"]
    return bool(until) and utcnow().strftime("%Y-%m-%dT%H:%M:%SZ") > until


def wait_for(condition: Callable[[], Any], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        time.sleep(0.05)


def test_a_failing_candidate_on_vertex_is_rolled_back_by_the_worker(
        make_registry: Callable[..., Any], sqlite_url: str, fake: VertexFake, bucket: str, gcs: str,
        trained: dict) -> None:
    reg, base, cand, request_id = vertex_canary(make_registry, sqlite_url, fake, bucket, gcs, trained, MONITORED,
                                                "1h")
    fake.answer_as(cand, error=(500, "The model server answered 500: the candidate crashed."))
    assert predict_through(reg, 50) == (40, 10)
    assert one_pass(reg)["canaries"] == 1

    view = reg.canaries.get(request_id)
    assert view["state"] == "rolled_back" and view["ended_by"] == "system" and view["split"] == {base: 100}
    assert "rolled back automatically: the candidate's error rate 100.0% (10 of 10 requests)" in view["why"]
    assert reg.backend.canary_split("iris") == {base: 100} and reg.versions.default("iris") == base
    assert serving(fake) == [("iris@1", 100)], "the candidate was undeployed"
    event = reg.audit.events(model="iris", action="canary.rolled_back")[0]
    figures = event["details"]["figures"]
    assert figures["candidate"]["requests"] == figures["candidate"]["errors"] == 10
    assert figures["base"]["requests"] == 40 and figures["base"]["errors"] == 0
    card = plain.render(CanaryCard(view)).body
    assert "error rate 100.0%" in card and "requests" in card
    assert "agreement: not measured on Vertex AI" in card
    assert predict_through(reg, 10) == (10, 0), "all the traffic is the default's again"


def test_a_slow_candidate_on_vertex_is_rolled_back_on_its_p99(
        make_registry: Callable[..., Any], sqlite_url: str, fake: VertexFake, bucket: str, gcs: str,
        trained: dict) -> None:
    reg, base, cand, request_id = vertex_canary(make_registry, sqlite_url, fake, bucket, gcs, trained,
                                                {"min_requests": 10, "max_p99_ratio": 2.0}, "1h")
    fake.answer_as(base, latency_ms=10.0)
    fake.answer_as(cand, latency_ms=100.0)
    assert predict_through(reg, 100) == (100, 0)
    assert one_pass(reg)["canaries"] == 1
    view = reg.canaries.get(request_id)
    assert view["state"] == "rolled_back" and "p99 latency" in view["why"] and "max_p99_ratio 2" in view["why"]


def test_a_clean_bake_on_vertex_is_promoted_with_auto_promote(
        make_registry: Callable[..., Any], sqlite_url: str, fake: VertexFake, bucket: str, gcs: str,
        trained: dict) -> None:
    reg, base, cand, request_id = vertex_canary(make_registry, sqlite_url, fake, bucket, gcs, trained,
                                                {**MONITORED, "auto_promote": True}, "1s")
    assert predict_through(reg, 100) == (100, 0)
    wait_for(lambda: bake_over(reg, request_id))
    assert one_pass(reg)["canaries"] == 1

    view = reg.canaries.get(request_id)
    assert view["state"] == "applied" and view["split"] == {cand: 100} and "promoted automatically" in view["why"]
    assert reg.versions.default("iris") == cand and reg.backend.current_default("iris") == cand
    assert serving(fake) == [("iris@2", 100)]
    promoted = reg.audit.events(model="iris", action="canary.promoted")[0]
    assert promoted["actor"] == "system" and "clean bake: 20 requests" in promoted["details"]["why"]
    assert promoted["details"]["figures"]["candidate"] == {"requests": 20, "errors": 0, "error_rate": 0.0,
                                                           "p50_ms": ANY, "p99_ms": ANY}


def test_missing_figures_on_vertex_decide_nothing_and_the_status_says_why(
        make_registry: Callable[..., Any], sqlite_url: str, fake: VertexFake, bucket: str, gcs: str,
        trained: dict) -> None:
    reg, base, cand, request_id = vertex_canary(make_registry, sqlite_url, fake, bucket, gcs, trained,
                                                {**MONITORED, "auto_promote": True}, "1s")
    fake.answer_as(cand, error=(500, "The model server answered 500: the candidate crashed."))
    assert predict_through(reg, 50) == (40, 10)
    wait_for(lambda: bake_over(reg, request_id))

    # Monitoring refuses the account: a failing candidate after its bake is neither rolled back nor promoted (the
    # worker's pass reads the figures, and so does the status a person asks for: both are refused)
    fake.fail_next("timeSeries.list", 403, times=2, message="Permission monitoring.timeSeries.list denied (or the "
                                                            "resource may not exist).")
    assert one_pass(reg)["canaries"] == 0
    status = reg.canaries.status("iris")
    assert status["running"] and status["state"] == "canary" and reg.backend.canary_split("iris") == {base: 80,
                                                                                                      cand: 20}
    assert "roles/monitoring.viewer" in status["figures_unavailable"]
    assert status["verdict"]["action"] == "wait" and "nothing is rolled back or promoted" in status["verdict"]["why"]
    shown = plain.render(CanaryShown(status)).body
    assert "figures unavailable: could not read" in shown and "permission denied" in shown

    # Monitoring cannot be reached at all (the same records, served by a backend pointed elsewhere for it)
    unreachable = with_backend(reg, fast_backend(fake, bucket, endpoints={"iris": ENDPOINT},
                                                 monitoring_endpoint=closed_port_url()))
    try:
        assert one_pass(unreachable)["canaries"] == 0
        status = unreachable.canaries.status("iris")
        assert status["running"] and "cannot reach Cloud Monitoring" in status["figures_unavailable"]
        assert "nothing is rolled back or promoted" in status["verdict"]["why"]
        assert unreachable.audit.events(model="iris", action="canary.rolled_back") == []
        assert unreachable.audit.events(model="iris", action="canary.promoted") == []
    finally:
        unreachable.close()

    # Monitoring answers again: the next pass judges the figures it reads
    assert one_pass(reg)["canaries"] == 1
    view = reg.canaries.get(request_id)
    assert view["state"] == "rolled_back" and "error rate 100.0%" in view["why"]
    assert view["figures_unavailable"] is None
