"""Evaluation on the same data: a promotion request's candidate and default evaluated by the backend's job (real
TensorFlow on the shipped held-out files), on the card before and after, in `show --json`, with bad input, and
the nightly gate on it."""

from __future__ import annotations

import csv
import json
import math
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, replay_args, train_and_wait

from model_registry.domain import evaluation as measures
from model_registry.domain.errors import InvalidInput, Refused

IRIS_EVAL = ROOT / "trainers" / "iris" / "trainer" / "data" / "iris_eval.csv"
SENTIMENT_EVAL = ROOT / "trainers" / "sentiment" / "trainer" / "data" / "reviews_eval.csv"
IRIS = {"data": str(IRIS_EVAL), "label": "species", "output": "class_ids"}


def evaluated(reg: Any, request_id: int, timeout: float = 300) -> dict[str, Any]:
    """Follow the request's evaluation as the worker does until it ends; its view then."""
    deadline = time.monotonic() + timeout
    while True:
        reg.evaluations.follow()
        ev = reg.promotions.get(request_id)["evaluation"]
        if ev["state"] in ("done", "failed"):
            return ev
        assert time.monotonic() < deadline, f"the evaluation is still {ev['state']}"
        time.sleep(0.2)


def answers_of(model_dir: Path, rows: list[dict[str, str]], output: str) -> list[Any]:
    """What the SavedModel answers for the rows, computed here, apart from the product's code."""
    import tensorflow as tf

    fn = tf.saved_model.load(str(model_dir)).signatures["serving_default"]
    specs = fn.structured_input_signature[1]
    tensors = {k: tf.constant([float(r[k]) if s.dtype == tf.float32 else r[k] for r in rows], dtype=s.dtype)
               for k, s in specs.items()}
    values = fn(**tensors)[output].numpy().tolist()
    return [v.decode() if isinstance(v, bytes) else v for v in values]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def two_iris(make_registry: Any, url: str, trained: dict, **config: Any) -> tuple[Any, str, str]:
    reg = make_registry(url, **config)
    for src in (trained["iris_a"], trained["iris_b"]):
        assert train_and_wait(reg, "iris", "U_T", replay_args(src))["state"] == "SUCCEEDED"
    base, cand = sorted(v["name"] for v in reg.versions.expose("iris", "U_T")["exposed"])
    return reg, base, cand


def card_of(reg: Any, request_id: int) -> str:
    from bot import text
    from handlers.results import ReviewCard

    return "\n".join(text.render(ReviewCard(reg.promotions.get(request_id))).lines)


# ---------------------------------------------------------------- the measures themselves


def test_measures_of_class_and_numeric_outputs() -> None:
    assert measures.metrics([0, 1, 1, 2], [0, 1, 2, 2], measures.CLASS) == {
        "accuracy": 0.75, "recall/0": 1.0, "recall/1": 1.0, "recall/2": 0.5}
    numeric = measures.metrics([1.0, 2.0, 4.0], [1.0, 3.0, 2.0], measures.NUMERIC)
    assert numeric["mae"] == pytest.approx(1.0) and numeric["rmse"] == pytest.approx(math.sqrt(5 / 3))
    summary = measures.summarize([{"x": i} for i in range(8)], [1] * 8, list(range(2, 10)), [1] * 8,
                                 [1, 0, 0, 0, 0, 0, 0, 1], measures.CLASS)
    assert summary["agreement"] == 0.25 and len(summary["disagreements"]) == measures.MAX_DISAGREEMENTS
    assert summary["disagreements"][0] == {"line": 3, "inputs": {"x": 1}, "label": 1, "candidate": 1, "base": 0}
    assert measures.output_kind("DT_INT64") == measures.CLASS and measures.output_kind("float32") == measures.NUMERIC


def test_the_gate_compares_the_evaluations_metric_in_its_better_direction() -> None:
    done = {"state": "done", "candidate": {"accuracy": 0.8, "rmse": 2.0}, "base": {"accuracy": 0.9, "rmse": 1.0}}
    assert "changed by -0.1000" in measures.gate_why("accuracy", -0.05, done)
    assert measures.gate_why("accuracy", -0.2, done) is None
    assert "changed by +1.0000" in measures.gate_why("rmse", -0.5, done), "a larger error is worse"
    assert "not among the evaluation's metrics" in measures.gate_why("auc", 0.0, done)
    assert "the evaluation failed: no rows" in measures.gate_why("accuracy", 0.0, {"state": "failed",
                                                                                  "error": "no rows"})


def test_a_gate_with_an_unknown_on_is_refused_at_load(tmp_path: Path) -> None:
    from model_registry.config import ProjectConfig

    with pytest.raises(InvalidInput, match="gate.on"):
        ProjectConfig.from_dict({"models": {"iris": {"gate": {"metric": "accuracy", "on": "tuesday"}}}}, tmp_path)
    cfg = ProjectConfig.from_dict({"models": {"iris": {"gate": {"metric": "accuracy", "on": "evaluation"}}}}, tmp_path)
    assert cfg.policy("iris").gate.on == "evaluation"  # type: ignore[union-attr]


def test_the_example_configuration_evaluates_both_shipped_trainers_on_their_held_out_files() -> None:
    from model_registry.config import ProjectConfig

    cfg = ProjectConfig.load(ROOT / "starchart.yaml")
    for model, path in (("iris", IRIS_EVAL), ("sentiment", SENTIMENT_EVAL)):
        spec = cfg.policy(model).evaluation
        assert spec is not None and Path(spec.data) == path and path.exists()
        assert spec.label in read_rows(path)[0]


# ---------------------------------------------------------------- the card, before and after


def test_the_card_shows_both_versions_on_the_held_out_rows(make_registry: Any, db_url: str, trained: dict) -> None:
    from fakes.slack_fake import SlackFake

    from bot import cli
    from bot.app import slack_client
    from bot.delivery import Sender
    from model_registry.config import SlackSettings

    reg, base, cand = two_iris(make_registry, db_url, trained, defaults={"channel": "C0EVAL"},
                               models={"iris": {"evaluation": IRIS}})
    req = reg.promotions.promote("iris", cand, "U_REQ", card=True)
    assert req["evaluation"]["state"] == "pending" and req["evaluation"]["data"] == str(IRIS_EVAL)
    with SlackFake(channels={"C0EVAL": "evaluations"}) as fake:
        sender = Sender(reg, slack_client(SlackSettings.from_env({"SLACK_API_URL": fake.base_url,
                                                                  "SLACK_BOT_TOKEN": fake.token})))
        sender.deliver_due()  # the card goes out before any evaluation work
        (posted,) = fake.calls_to("chat.postMessage")
        assert "Evaluation" in json.dumps(posted.params["blocks"]) and "waiting to start" in json.dumps(
            posted.params["blocks"])
        ev = evaluated(reg, req["id"])
        assert ev["state"] == "done", ev
        sender.deliver_due()
        (updated,) = fake.calls_to("chat.update")
        shown = json.dumps(updated.params["blocks"], ensure_ascii=False)
        assert updated.params["channel"] == posted.params["channel"]
        assert f"Evaluation on 30 rows of {IRIS_EVAL}" in shown and "agreement" in shown

    rows = read_rows(IRIS_EVAL)
    labels = [int(r["species"]) for r in rows]
    theirs = {"candidate": answers_of(trained["iris_b"] / "model", rows, "class_ids"),
              "base": answers_of(trained["iris_a"] / "model", rows, "class_ids")}
    assert ev["rows"] == len(rows) == 30 and ev["kind"] == "class"
    for role, answers in theirs.items():
        assert ev[role]["accuracy"] == pytest.approx(sum(a == y for a, y in zip(answers, labels)) / 30)
        assert set(ev[role]) == {"accuracy", "recall/0", "recall/1", "recall/2"}
        hits = [a for a, y in zip(answers, labels) if y == 1]
        assert ev[role]["recall/1"] == pytest.approx(sum(a == 1 for a in hits) / len(hits))
    differ = [i for i in range(30) if theirs["candidate"][i] != theirs["base"][i]]
    assert ev["agreement"] == pytest.approx(1 - len(differ) / 30)
    assert [d["line"] for d in ev["disagreements"]] == [i + 2 for i in differ[:5]]
    for d in ev["disagreements"]:
        row = rows[d["line"] - 2]
        assert d["inputs"] == {k: float(row[k]) for k in d["inputs"]} and d["label"] == int(row["species"])
        assert (d["candidate"], d["base"]) == (theirs["candidate"][d["line"] - 2], theirs["base"][d["line"] - 2])

    printed: list[str] = []
    assert cli.main(["--json", "show", str(req["id"])], core=reg, out=printed.append) == 0
    shown_json = json.loads(printed[0])["evaluation"]
    for key in ("data", "rows", "candidate", "base", "agreement", "disagreements"):
        assert shown_json[key] == ev[key]
    events = [e for e in reg.audit.events(model="iris", limit=50) if e["action"].startswith("evaluation.")]
    assert [e["action"] for e in events][::-1] == ["evaluation.started", "evaluation.finished"]
    assert reg.evaluations.follow() == 0, "an ended evaluation is not followed again"


def test_sentiment_versions_evaluated_on_the_shipped_reviews(make_registry: Any, sqlite_url: str,
                                                             trained_sentiment: Path) -> None:
    reg = make_registry(sqlite_url, models={"sentiment": {"evaluation": {
        "data": str(SENTIMENT_EVAL), "label": "sentiment", "output": "label"}}})
    for _ in range(2):
        assert train_and_wait(reg, "sentiment", "U_T", replay_args(trained_sentiment))["state"] == "SUCCEEDED"
    base, cand = sorted(v["name"] for v in reg.versions.expose("sentiment", "U_T")["exposed"])
    req = reg.promotions.promote("sentiment", cand, "U_REQ")
    ev = evaluated(reg, req["id"])
    rows = read_rows(SENTIMENT_EVAL)
    answers = answers_of(trained_sentiment / "model", rows, "label")
    accuracy = sum(a == r["sentiment"] for a, r in zip(answers, rows)) / len(rows)
    assert ev["state"] == "done" and ev["rows"] == len(rows) == 160
    assert ev["candidate"] == ev["base"] and ev["candidate"]["accuracy"] == pytest.approx(accuracy)
    assert set(ev["candidate"]) == {"accuracy", "recall/negative", "recall/positive"}
    assert ev["agreement"] == 1.0 and ev["disagreements"] == [], "the same SavedModel twice answers alike"
    assert "agreement: 100.0% (160 of 160 rows answered alike)" in card_of(reg, req["id"])


def test_a_model_without_evaluation_says_not_evaluated_and_how_to_configure_it(make_registry: Any, sqlite_url: str,
                                                                               trained: dict) -> None:
    reg, _base, cand = two_iris(make_registry, sqlite_url, trained)
    req = reg.promotions.promote("iris", cand, "U_REQ")
    assert req["evaluation"]["state"] == "not_configured"
    card = card_of(reg, req["id"])
    assert "Evaluation: not evaluated — configure `evaluation: {data: CSV_PATH_OR_GS_URI, label: COLUMN, output: " \
           "OUTPUT}` for iris in starchart.yaml" in card
    assert reg.evaluations.follow() == 0


# ---------------------------------------------------------------- bad input


def _write(path: Path, header: list[str], rows: list[list[Any]]) -> str:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


@pytest.mark.parametrize("case", ["missing", "columns", "no_label", "label_type", "many_values", "output_unknown"])
def test_bad_evaluation_input_is_said_on_the_card_and_the_request_can_still_be_decided(
        make_registry: Any, sqlite_url: str, trained: dict, tmp_path: Path, case: str) -> None:
    good = read_rows(IRIS_EVAL)
    names = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    spec, said, fix = dict(IRIS), "", ""
    if case == "missing":
        spec["data"], said, fix = str(tmp_path / "nowhere.csv"), "does not exist", "point `evaluation.data`"
    elif case == "columns":
        spec["data"] = _write(tmp_path / "e.csv", names[:3] + ["species"], [[r[n] for n in names[:3]] + [r["species"]]
                                                                             for r in good])
        said, fix = "has no column petal_width", "its columns are the signature's inputs"
    elif case == "no_label":
        spec["label"], said, fix = "kind", "has no column kind", "and the label (kind)"
    elif case == "label_type":
        spec["data"] = _write(tmp_path / "e.csv", names + ["species"], [[r[n] for n in names] + ["setosa"]
                                                                        for r in good])
        said, fix = "line 2, column species: 'setosa' is not a int64 value", "the output class_ids should give"
    elif case == "many_values":
        spec["output"], said, fix = "probabilities", "gives 3 values per row", "set `evaluation.output`"
    else:
        spec["output"], said, fix = "nope", "names 'nope', which the candidate", "set `evaluation.output`"
    reg, _base, cand = two_iris(make_registry, sqlite_url, trained, models={"iris": {"evaluation": spec}})
    req = reg.promotions.promote("iris", cand, "U_REQ")
    if case == "output_unknown":
        assert req["evaluation"]["state"] == "failed", "known from the stored signatures: no job is started"
        assert reg.evaluations.follow() == 0
    ev = evaluated(reg, req["id"])
    assert ev["state"] == "failed" and said in ev["error"] and fix in ev["hint"], ev
    card = card_of(reg, req["id"])
    assert said in card and fix in card and "(the request can still be decided)" in card
    assert reg.promotions.decide(req["id"], "U_OK", True)["state"] == "approved"


# ---------------------------------------------------------------- Vertex AI


def test_on_vertex_a_custom_job_evaluates_the_data_in_cloud_storage(make_registry: Any, db_url: str, trained: dict,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from fakes.gcs_emulator import new_bucket, shared_gcs_emulator, storage_client
    from fakes.vertex_fake import VertexFake, fast_backend, replay_runner, vertex_env

    gcs = shared_gcs_emulator()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs)
    bucket = new_bucket(gcs)
    storage_client(gcs).bucket(bucket[len("gs://"):]).blob("eval/iris.csv").upload_from_filename(str(IRIS_EVAL))
    data = f"{bucket}/eval/iris.csv"
    with VertexFake() as fake:
        fake.runner = replay_runner(gcs)
        reg = make_registry(db_url, backend=fast_backend(fake, bucket), env=vertex_env(bucket),
                            models={"iris": {"evaluation": {**IRIS, "data": data}}})
        for src in (trained["iris_a"], trained["iris_b"]):
            job = reg.jobs.train("iris", "U_T", args=replay_args(src))
            assert reg.jobs.wait(job["job_id"], timeout=30)["state"] == "SUCCEEDED"
        base, cand = sorted(v["name"] for v in reg.versions.expose("iris", "U_T")["exposed"])
        req = reg.promotions.promote("iris", cand, "U_REQ")
        ev = evaluated(reg, req["id"])
        (job,) = [j for j in fake.jobs.values() if j["displayName"] == ev["job_id"]]
    assert ev["state"] == "done", ev
    pkg = job["jobSpec"]["workerPoolSpecs"][0]["pythonPackageSpec"]
    assert pkg["pythonModule"] == "starchart_evaluation.task" and f"--data={data}" in pkg["args"]
    assert pkg["packageUris"][0].startswith(f"{bucket}/iris/evaluations/{req['id']}-")
    assert job["labels"]["kind"] == "evaluation"
    rows = read_rows(IRIS_EVAL)
    labels = [int(r["species"]) for r in rows]
    for role, src in (("candidate", trained["iris_b"]), ("base", trained["iris_a"])):
        answers = answers_of(src / "model", rows, "class_ids")
        assert ev[role]["accuracy"] == pytest.approx(sum(a == y for a, y in zip(answers, labels)) / len(rows))
    assert ev["rows"] == 30 and ev["data"] == data


def test_on_vertex_local_evaluation_data_is_refused_at_once(make_registry: Any, sqlite_url: str) -> None:
    from model_registry.config import Evaluation, ModelPolicy
    from model_registry.services.evaluations import planned

    plan = planned(ModelPolicy(evaluation=Evaluation(str(IRIS_EVAL), "species", "class_ids")), "iris",
                   {"name": "v1", "signature": {}}, None, "vertex")  # type: ignore[typeddict-item]
    assert plan["state"] == "failed" and "a Vertex AI job cannot read" in plan["error"] and "gs://" in plan["hint"]


# ---------------------------------------------------------------- the nightly gate on the evaluation


@pytest.mark.parametrize("min_delta, passes", [(-0.5, True), (0.5, False)])
def test_the_nightly_gate_decides_on_the_evaluation(make_registry: Any, sqlite_url: str, trained: dict,
                                                    min_delta: float, passes: bool) -> None:
    from sqlalchemy import select

    from model_registry.adapters import outbox
    from model_registry.adapters.records import OutboxMessage

    reg = make_registry(sqlite_url, defaults={"channel": "C0NIGHTLY"}, models={"iris": {
        "auto_expose": True, "auto_review": True, "evaluation": IRIS,
        "gate": {"metric": "accuracy", "min_delta": min_delta, "on": "evaluation"}}})
    first = reg.jobs.train("iris", "U_T", args=replay_args(trained["iris_a"]))
    reg.jobs.wait(first["job_id"])
    reg.versions.expose("iris", "U_T")
    view = reg.schedules.set("iris", "0 3 * * *", "U_OPS", replay_args(trained["iris_b"]))
    (job,) = reg.schedules.run_due(datetime.fromisoformat(view["next_run_at"][:-1]) + timedelta(seconds=1))
    reg.jobs.wait(job["job_id"])

    def messages(kind: str) -> list[Any]:
        with reg.db.reads() as s:
            return list(s.execute(select(OutboxMessage).where(OutboxMessage.kind == kind)).scalars())

    (req,) = reg.schedules.follow_scheduled()
    assert req["evaluation"]["gate"]["state"] == "waiting" and messages(outbox.REVIEW_CARD) == [], "not posted yet"
    with pytest.raises(Refused, match="waits for its evaluation"):
        reg.promotions.decide(req["id"], "U_HUMAN", True)
    ev = evaluated(reg, req["id"])
    assert ev["state"] == "done"
    after = reg.promotions.get(req["id"])
    gate = after["evaluation"]["gate"]
    if passes:
        assert gate["state"] == "passed" and after["state"] == "open"
        (card,) = messages(outbox.REVIEW_CARD)
        assert card.channel == "C0NIGHTLY" and card.subject == str(req["id"])
        assert reg.promotions.decide(req["id"], "U_HUMAN", True)["state"] == "approved"
    else:
        delta = ev["candidate"]["accuracy"] - ev["base"]["accuracy"]
        assert gate["state"] == "refused" and f"changed by {delta:+.4f}" in gate["why"]
        assert after["state"] == "rejected" and messages(outbox.REVIEW_CARD) == []
        (skipped,) = [m for m in messages(outbox.NIGHTLY) if m.payload["event"] == outbox.REVIEW_SKIPPED]
        assert skipped.payload["gate"]["metric"] == "accuracy" and skipped.payload["gate"]["delta"] == \
            pytest.approx(delta)
        (event,) = reg.audit.events(action="review.skipped")
        assert event["details"]["on"] == "evaluation"


def test_a_gate_on_the_evaluation_without_evaluation_data_skips_the_review(make_registry: Any, sqlite_url: str,
                                                                         trained: dict) -> None:
    reg = make_registry(sqlite_url, models={"iris": {
        "auto_expose": True, "auto_review": True, "gate": {"metric": "accuracy", "min_delta": -1, "on": "evaluation"}}})
    first = reg.jobs.train("iris", "U_T", args=replay_args(trained["iris_a"]))
    reg.jobs.wait(first["job_id"])
    reg.versions.expose("iris", "U_T")
    view = reg.schedules.set("iris", "0 3 * * *", "U_OPS", replay_args(trained["iris_b"]))
    (job,) = reg.schedules.run_due(datetime.fromisoformat(view["next_run_at"][:-1]) + timedelta(seconds=1))
    reg.jobs.wait(job["job_id"])
    assert reg.schedules.follow_scheduled() == []
    (skipped,) = reg.audit.events(action="review.skipped")
    assert "has no `evaluation:`" in skipped["details"]["why"]
