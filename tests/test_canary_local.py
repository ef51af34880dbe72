"""Canaries on the local backend, end to end with real TensorFlow through the model server: the split observed over
many requests, the figures counted per version and mirrored requests compared, an erroring candidate rolled back
by the worker, a slow candidate rolled back on its p99 latency, a clean bake promoted, the split kept across restarts, and `audit MODEL --at T` naming it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from conftest import read_json, replay_args, train_and_wait

from bot import text as plain
from bot.worker import one_pass
from handlers.results import CanaryCard, DefaultAt
from model_registry.bootstrap import bootstrap
from model_registry.domain.errors import InvalidInput
from model_registry.domain.names import utcnow

FLOWER = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
TRAINER, REQUESTER, APPROVER = "U_TRAINER", "U_REQ", "U_OK"


def wait_for(condition: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = condition()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError("the condition did not hold in time")


def iris_registry(make_registry: Callable[..., Any], db_url: str, trained: dict, canary: dict[str, Any],
                  third: Path | None = None) -> tuple[Any, list[str]]:
    """iris with versions from iris_a (the default), iris_b and, with `third`, one more from that trained model
    (e.g. sentiment, whose signature takes text and refuses iris's instances)."""
    reg = make_registry(db_url, models={"iris": {"canary": canary}})
    sources = [trained["iris_a"], trained["iris_b"]] + ([third] if third else [])
    for src in sources:
        assert train_and_wait(reg, "iris", TRAINER, replay_args(src))["state"] == "SUCCEEDED"
        reg.versions.expose("iris", TRAINER)  # one at a time: the first becomes the default
    names = [v["name"] for v in reversed(reg.versions.of_model("iris")["versions"])]
    assert reg.versions.default("iris") == names[0]
    return reg, names


def start_canary(reg: Any, version: str, percent: str, bake: str) -> int:
    req = reg.promotions.promote("iris", version, REQUESTER, canary=percent, bake=bake)
    decided = reg.promotions.decide(req["id"], APPROVER, True)
    assert decided["state"] == "approved"
    applied = reg.promotions.apply_request(req["id"], actor=APPROVER)
    assert applied["state"] == "canary", applied
    return int(req["id"])


def predict_many(reg: Any, n: int) -> tuple[Counter[str], int]:
    """n requests to the default's route: which version answered each, and how many were refused."""
    answered: Counter[str] = Counter()
    refused = 0
    for _ in range(n):
        try:
            answered[reg.predictions.predict("iris", {"instances": [FLOWER]})["version"]] += 1
        except InvalidInput:
            refused += 1
    return answered, refused


SLOW_MICROS = 200_000  # how long the slow model's serving function waits in its graph, per call
SLOW_SCRIPT = textwrap.dedent('''
    import sys
    import tensorflow as tf
    from tensorflow.python.data.experimental.ops.testing import sleep  # a wait in the graph: no CPU spent

    source, out, micros = sys.argv[1], sys.argv[2], int(sys.argv[3])
    base = tf.saved_model.load(source)
    fn = base.signatures["serving_default"]
    specs = fn.structured_input_signature[1]
    names = sorted(specs)

    class Slow(tf.Module):
        def __init__(self):
            super().__init__()
            self.base = base

        @tf.function(input_signature=[specs[n] for n in names])
        def serve(self, *inputs):
            waited = tf.data.Dataset.from_tensors(0).apply(sleep(micros)).reduce(0, lambda a, b: a + b)
            with tf.control_dependencies([waited]):
                return fn(**{n: tf.identity(x) for n, x in zip(names, inputs)})

    slow = Slow()
    tf.saved_model.save(slow, out, signatures={"serving_default": slow.serve})
''')


@pytest.fixture(scope="session")
def trained_slow(trained: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """iris_a's model behind a serving function that first waits SLOW_MICROS: iris's signature and answers, slowly
    (a replay trainer's source: model/ and metrics.json)."""
    out = tmp_path_factory.mktemp("slow-iris")
    proc = subprocess.run([sys.executable, "-c", SLOW_SCRIPT, str(trained["iris_a"] / "model"), str(out / "model"),
                           str(SLOW_MICROS)], env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shutil.copyfile(trained["iris_a"] / "metrics.json", out / "metrics.json")
    return out


@pytest.fixture
def stop_servers() -> Iterator[list[Any]]:
    regs: list[Any] = []
    yield regs
    for reg in regs:
        reg.backend.stop_server()


def test_a_canary_splits_the_traffic_survives_restarts_and_is_promoted_after_a_clean_bake(
        make_registry: Callable[..., Any], db_url: str, trained: dict, stop_servers: list[Any]) -> None:
    reg, (v1, v2) = iris_registry(make_registry, db_url, trained, {
        # latency on a shared test machine is noise: this bake is judged on errors (the p99 rule has its own tests)
        "bake": "2s", "min_requests": 10, "auto_promote": True, "mirror": 0.5, "max_p99_ratio": 1000})
    stop_servers.append(reg)
    reg.predictions.predict("iris", {"instances": [FLOWER]})  # the model server runs: the candidate is warmed
    request_id = start_canary(reg, v2, "30", "2s")
    pointer = read_json(reg.settings.home / "serving" / "iris.json")
    assert pointer["default"] == v1 and pointer["canary"]["version"] == v2 and pointer["canary"]["percent"] == 30
    assert reg.backend.canary_split("iris") == {v1: 70, v2: 30}
    assert reg.versions.default("iris") == v1, "a canary does not move the default"
    during = utcnow()

    answered, refused = predict_many(reg, 300)
    assert refused == 0 and set(answered) == {v1, v2}
    assert 45 <= answered[v2] <= 135, answered  # 30% of 300 is 90; this band is over five standard deviations wide
    figures = wait_for(lambda: (f := reg.backend.canary_figures("iris")) and f["mirrored"] > 0 and f)
    assert figures["candidate"]["requests"] == answered[v2] and figures["base"]["requests"] == answered[v1]
    assert figures["candidate"]["errors"] == figures["base"]["errors"] == 0
    assert figures["candidate"]["p99_ms"] >= figures["candidate"]["p50_ms"] > 0
    assert 0 <= figures["agreed"] <= figures["mirrored"]

    # every process restarts: the split is in the database and the pointer file, the counts start over
    assert reg.backend.stop_server()
    again = bootstrap(reg.settings, reg.config)
    stop_servers.append(again)
    assert again.canaries.status("iris")["running"] and again.canaries.status("iris")["split"] == {v1: 70, v2: 30}
    # enough for the candidate's min_requests (10) after the counts started over: with 60 requests it had fewer
    # than 10 in 0.6% of runs (binomial, 30%), and a bake without that evidence waits for a person; with 120, 2e-9
    answered_again, _ = predict_many(again, 120)
    assert set(answered_again) == {v1, v2} and answered_again[v2] >= 10, answered_again
    assert again.backend.canary_figures("iris")["candidate"]["requests"] == answered_again[v2]

    wait_for(lambda: _bake_over(again, request_id))
    done = one_pass(again)
    assert done["canaries"] == 1
    view = again.canaries.get(request_id)
    assert view["state"] == "applied" and view["split"] == {v2: 100} and "promoted automatically" in view["why"]
    assert again.versions.default("iris") == v2 and again.backend.current_default("iris") == v2
    assert "canary" not in read_json(reg.settings.home / "serving" / "iris.json")
    assert Counter(predict_many(again, 20)[0]) == Counter({v2: 20})

    promoted = again.audit.events(model="iris", action="canary.promoted")[0]
    assert promoted["details"]["figures"]["candidate"]["requests"] == answered_again[v2]
    assert promoted["actor"] == "system" and "clean bake" in promoted["details"]["why"]
    started = again.audit.events(model="iris", action="canary.started")[0]
    assert started["details"]["split"] == {v1: 70, v2: 30} and started["request_id"] == request_id

    at_canary = again.audit.default_at("iris", during)
    assert at_canary["version"] == v1 and at_canary["split"] == {v1: 70, v2: 30}
    assert at_canary["canary_request"] == request_id
    assert f"traffic: {v1} 70%, {v2} 30% (the canary of promotion request #{request_id})" in \
        plain.render(DefaultAt(at_canary)).body
    after = again.audit.default_at("iris", utcnow())
    assert after["version"] == v2 and after["split"] == {v2: 100} and after["canary_request"] is None
    assert again.audit.verify().ok


def _bake_over(reg: Any, request_id: int) -> bool:
    until = reg.canaries.get(request_id)["bake_until"]
    return bool(until) and utcnow().strftime("%Y-%m-%dT%H:%M:%SZ") > until


def test_status_reads_the_figures_itself_when_no_worker_has(make_registry: Callable[..., Any], sqlite_url: str,
                                                            trained: dict, stop_servers: list[Any]) -> None:
    """On a laptop without `starchart worker`, `canary MODEL status` judges the figures the model server counted,
    read as it is asked (before, none had been read, and after the bake it said this backend gives none)."""
    reg, (v1, v2) = iris_registry(make_registry, sqlite_url, trained, {
        "min_requests": 5, "auto_promote": False, "max_p99_ratio": 1000})
    stop_servers.append(reg)
    reg.predictions.predict("iris", {"instances": [FLOWER]})
    request_id = start_canary(reg, v2, "50", "1s")
    answered, refused = predict_many(reg, 60)
    assert refused == 0 and answered[v2] >= 5, answered
    wait_for(lambda: _bake_over(reg, request_id))
    view = reg.canaries.status("iris")
    assert view["figures"]["candidate"]["requests"] == answered[v2]
    assert view["figures"]["base"]["requests"] == answered[v1]
    assert view["verdict"] == {"action": "wait", "why": "a clean bake; auto_promote is off, so a person decides: "
                                                        "Promote to 100% or Roll back"}
    assert reg.canaries.get(request_id)["figures"] == view["figures"], "kept on the request: its card shows them"


def test_an_erroring_candidate_is_rolled_back_by_the_worker(make_registry: Callable[..., Any], sqlite_url: str,
                                                            trained: dict, trained_sentiment: Path,
                                                            stop_servers: list[Any]) -> None:
    reg, (v1, _v2, v3) = iris_registry(make_registry, sqlite_url, trained, {"min_requests": 10},
                                       third=trained_sentiment)
    stop_servers.append(reg)
    request_id = start_canary(reg, v3, "50", "1h")
    answered, refused = predict_many(reg, 60)
    assert answered == Counter({v1: answered[v1]}) and refused > 0, "the candidate refuses iris's instances"
    assert one_pass(reg)["canaries"] == (1 if refused >= 10 else 0)
    if refused < 10:  # fewer than min_requests reached the candidate: judged once it has had them
        wait_for(lambda: predict_many(reg, 20) and one_pass(reg)["canaries"])
    view = reg.canaries.get(request_id)
    assert view["state"] == "rolled_back" and view["split"] == {v1: 100} and view["ended_by"] == "system"
    assert "rolled back automatically: the candidate's error rate 100.0%" in view["why"]
    assert reg.backend.canary_split("iris") == {v1: 100} and reg.versions.default("iris") == v1
    event = reg.audit.events(model="iris", action="canary.rolled_back")[0]
    assert event["details"]["figures"]["candidate"]["errors"] == event["details"]["figures"]["candidate"]["requests"]
    assert event["details"]["split"] == {v1: 100}
    card = plain.render(CanaryCard(view)).body
    assert "rolled back at" in card and "error rate 100.0%" in card and "requests" in card
    assert Counter(predict_many(reg, 10)[0]) == Counter({v1: 10}), "all the traffic is the default's again"


def test_a_slow_candidate_is_rolled_back_on_its_p99_by_the_worker(make_registry: Callable[..., Any],
                                                                  sqlite_url: str, trained: dict, trained_slow: Path,
                                                                  stop_servers: list[Any]) -> None:
    reg, (v1, _v2, v3) = iris_registry(make_registry, sqlite_url, trained,
                                       {"min_requests": 10, "max_p99_ratio": 2, "mirror": 0}, third=trained_slow)
    stop_servers.append(reg)
    request_id = start_canary(reg, v3, "50", "1h")
    # judged once both sides have had min_requests; every answer is a good one, from either version
    wait_for(lambda: predict_many(reg, 10)[1] == 0 and one_pass(reg)["canaries"], timeout=180)
    view = reg.canaries.get(request_id)
    assert view["state"] == "rolled_back" and view["split"] == {v1: 100} and view["ended_by"] == "system"
    assert "rolled back automatically: the candidate's p99 latency" in view["why"], view["why"]
    assert "(max_p99_ratio 2)" in view["why"]
    figures = reg.audit.events(model="iris", action="canary.rolled_back")[0]["details"]["figures"]
    cand, base = figures["candidate"], figures["base"]
    assert cand["errors"] == base["errors"] == 0 and cand["requests"] >= 10 and base["requests"] >= 10
    assert cand["p99_ms"] / base["p99_ms"] > 2, figures  # the rule it was rolled back by, on its own figures
    assert reg.backend.canary_split("iris") == {v1: 100} and reg.versions.default("iris") == v1
    assert Counter(predict_many(reg, 10)[0]) == Counter({v1: 10}), "all the traffic is the default's again"


def test_bad_canary_requests_say_what_to_do(make_registry: Callable[..., Any], sqlite_url: str, trained: dict,
                                            stop_servers: list[Any]) -> None:
    reg, (v1, v2) = iris_registry(make_registry, sqlite_url, trained, {"bake": "1h"})
    stop_servers.append(reg)
    with pytest.raises(InvalidInput, match="from 1 to 99"):
        reg.promotions.promote("iris", v2, REQUESTER, canary="0")
    with pytest.raises(InvalidInput, match="not a duration"):
        reg.promotions.promote("iris", v2, REQUESTER, canary="10", bake="a while")
    request_id = start_canary(reg, v2, "10", "1h")
    with pytest.raises(InvalidInput, match=f"a canary of iris runs already: promotion request #{request_id}") as err:
        reg.promotions.promote("iris", v2, REQUESTER, canary="20")
    assert "canary iris rollback" in err.value.hint
    with pytest.raises(Exception, match="may not approve"):  # promoting to 100% is an approval: not the requester's
        reg.canaries.promote("iris", REQUESTER)
    refused = reg.audit.events(model="iris", action="canary.refused")
    assert refused and refused[0]["details"]["reason"] == "self_approval"
    rolled = reg.canaries.rollback("iris", APPROVER, reason="not today")
    assert rolled["state"] == "rolled_back" and rolled["why"] == f"rolled back by {APPROVER}: not today"
    with pytest.raises(InvalidInput, match="no canary of iris runs"):
        reg.canaries.rollback("iris", APPROVER)
    assert reg.versions.default("iris") == v1 and reg.backend.canary_split("iris") == {v1: 100}
