"""The local prediction API: real SavedModels served by the local model server (TensorFlow), reached from
the core, the CLI and /ml predict. The web process's HTTP routes are covered in test_slack_http."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from conftest import ROOT, replay_args, train_and_wait

from bot.console import Console
from handlers.parsing import parse
from model_registry.domain.errors import InvalidInput, NotFound

FLOWER = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}


@pytest.fixture
def served(make_registry: Any, sqlite_url: str, trained: dict, trained_sentiment: Path) -> Iterator[Any]:
    """iris with two versions (the first is the default) and sentiment with one, on a fresh home."""
    reg = make_registry(sqlite_url)
    for src in (trained["iris_a"], trained["iris_b"]):
        assert train_and_wait(reg, "iris", "U_T", replay_args(src))["state"] == "SUCCEEDED"
    assert train_and_wait(reg, "sentiment", "U_T", replay_args(trained_sentiment))["state"] == "SUCCEEDED"
    reg.versions.expose("iris", "U_T")
    reg.versions.expose("sentiment", "U_T")
    yield reg
    reg.backend.stop_server()


def _probabilities_ok(p: dict[str, Any]) -> bool:
    return p["class_ids"] in (0, 1, 2) and len(p["probabilities"]) == 3 and math.isclose(sum(p["probabilities"]), 1,
                                                                                          rel_tol=1e-4)


def test_predictions_of_default_and_named_versions(served: Any) -> None:
    reg = served
    old, new = [v["name"] for v in reversed(reg.versions.of_model("iris")["versions"])]
    answer = reg.predictions.predict("iris", json.dumps(FLOWER))
    assert answer["model"] == "iris" and answer["version"] == old == reg.versions.default("iris")
    (one,) = answer["predictions"]
    assert _probabilities_ok(one)
    many = reg.predictions.predict("iris", [FLOWER, {**FLOWER, "petal_length": 5.2, "petal_width": 2.3}], version=new)
    assert many["version"] == new and len(many["predictions"]) == 2 and all(map(_probabilities_ok, many["predictions"]))
    columnar = reg.predictions.predict("iris", {"inputs": {k: [v] for k, v in FLOWER.items()}})
    assert columnar["outputs"]["class_ids"] == [one["class_ids"]]
    assert reg.predictions.served("iris") == {"model": "iris", "version": old}
    # a string input, one per instance, given bare (the signature has one input)
    text = reg.predictions.predict("sentiment", ["a wonderful, moving film", "dull and far too long"])
    assert len(text["predictions"]) == 2


def test_bad_prediction_requests_say_what_is_wrong(served: Any) -> None:
    reg = served
    cases = {
        '{"sepal_length": 5.1': "not valid JSON",
        "": "no instances",
        "[]": "non-empty list",
        "42": "bare int",
        json.dumps({"sepal_length": 5.1}): "missing input(s) petal_length, petal_width, sepal_width",
        json.dumps({**FLOWER, "colour": "blue"}): "unknown input(s) colour",
        json.dumps({**FLOWER, "sepal_length": "long"}): "sepal_length: expected float32",
        json.dumps({"instances": [FLOWER], "inputs": {}}): "either",
    }
    for payload, expected in cases.items():
        with pytest.raises(InvalidInput) as exc:
            reg.predictions.predict("iris", payload)
        assert expected in exc.value.message, (payload, exc.value.message)
    with pytest.raises(InvalidInput) as missing:  # the inputs are named once: in the hint, with dtype and shape
        reg.predictions.predict("iris", {"sepal_length": 5.1})
    said = f"{missing.value.message} ({missing.value.hint})"
    assert said.count("sepal_width") == 2 and said.count("the signature's inputs") == 1, said
    assert "sepal_width (float32, shape [-1])" in missing.value.hint
    with pytest.raises(NotFound) as version:
        reg.predictions.predict("iris", FLOWER, version="v20990101000000")
    assert "recent versions" in version.value.hint
    with pytest.raises(NotFound):
        reg.predictions.predict("irsi", FLOWER)
    # after all of that, the server still answers
    assert _probabilities_ok(reg.predictions.predict("iris", FLOWER)["predictions"][0])


def test_the_model_server_is_started_again_when_it_went_away(served: Any) -> None:
    reg = served
    reg.predictions.predict("iris", FLOWER)
    first = json.loads((reg.backend.serving / "server.json").read_text())["pid"]
    assert reg.backend.stop_server()
    assert _probabilities_ok(reg.predictions.predict("iris", FLOWER)["predictions"][0])
    second = json.loads((reg.backend.serving / "server.json").read_text())["pid"]
    assert second != first
    import os
    import signal

    os.kill(second, signal.SIGKILL)  # dies without cleaning up: server.json still names it
    # gone: reaped (this process started it), so all its threads have ended and its sockets are closed. (Its main
    # thread turns zombie first, while the others are still ending: a request sent then is cut off, as one sent
    # just before the kill would be.)
    while os.path.exists(f"/proc/{second}"):
        time.sleep(0.05)
    assert _probabilities_ok(reg.predictions.predict("iris", FLOWER)["predictions"][0])
    assert json.loads((reg.backend.serving / "server.json").read_text())["pid"] not in (first, second)


def test_a_model_server_ended_by_sigterm_removes_its_server_json(served: Any) -> None:
    import os
    import signal

    from model_registry.adapters.backends.local_runner import proc_start_time

    reg = served
    reg.predictions.predict("iris", FLOWER)
    info = reg.backend.serving / "server.json"
    pid = json.loads(info.read_text())["pid"]
    os.kill(pid, signal.SIGTERM)  # as a machine's shutdown sends it, not through stop_server
    deadline = time.monotonic() + 30
    while proc_start_time(pid) is not None:
        assert time.monotonic() < deadline, "the model server did not end on SIGTERM"
        time.sleep(0.05)
    assert not info.exists()  # the next process starts a server without trying this one
    assert _probabilities_ok(reg.predictions.predict("iris", FLOWER)["predictions"][0])


def test_cli_and_slack_predict(served: Any) -> None:
    reg = served
    env = {"STARCHART_HOME": str(reg.settings.home), "DATABASE_URL": reg.settings.database_url,
           "STARCHART_CONFIG": str(reg.settings.config_path), "PATH": "/usr/bin:/bin"}
    run = [sys.executable, "-m", "bot.cli", "predict", "iris"]
    ok = subprocess.run([*run, "--json", json.dumps(FLOWER)], env=env, cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert _probabilities_ok(json.loads(ok.stdout)["predictions"][0])
    piped = subprocess.run([*run, "-"], input=json.dumps([FLOWER, FLOWER]), env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert piped.returncode == 0 and piped.stdout.startswith("iris v"), piped.stderr
    bad = subprocess.run([*run, "{oops"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "not valid JSON" in bad.stderr and "hint:" in bad.stderr

    out: list[str] = []
    console = Console(reg, "U_ANYONE", write=out.append)
    # as a Slack client sends it: smart quotes, and the JSON taken as typed rather than split into words
    console.handle("/ml predict iris {“sepal_length”: 5.1, “sepal_width”: 3.5, “petal_length”: 1.4, "
                   "“petal_width”: 0.2}")
    shown = "\n".join(out)
    assert "Predictions of iris v" in shown and "probabilities" in shown
    out.clear()
    console.handle("/ml predict iris")
    assert "no instances to predict" in "\n".join(out)


def test_compare_answers_a_version_and_the_default_side_by_side(served: Any) -> None:
    reg = served
    old, new = [v["name"] for v in reversed(reg.versions.of_model("iris")["versions"])]
    flowers = [FLOWER, {**FLOWER, "petal_length": 5.2, "petal_width": 2.3}]
    compared = reg.predictions.compare("iris", json.dumps(flowers), new)
    assert compared["candidate"]["version"] == new and compared["base"]["version"] == old == reg.versions.default("iris")
    assert compared["candidate"]["predictions"] == reg.predictions.predict("iris", flowers, version=new)["predictions"]
    assert compared["base"]["predictions"] == reg.predictions.predict("iris", flowers)["predictions"]
    agree = sum(a["class_ids"] == b["class_ids"] for a, b in zip(compared["candidate"]["predictions"],
                                                                 compared["base"]["predictions"]))
    assert compared["agreement"] == agree / 2 and compared["instances"] == flowers
    # the instances do not fit the candidate: that side says why, the default still answers
    bad = reg.predictions.compare("iris", json.dumps({**FLOWER, "petal_width": "wide"}), new)
    assert "expected float32" in bad["candidate"]["error"] and "expected float32" in bad["base"]["error"]
    assert bad["agreement"] is None
    with pytest.raises(InvalidInput, match="columnar"):
        reg.predictions.compare("iris", {"inputs": {k: [v] for k, v in FLOWER.items()}}, new)
    with pytest.raises(NotFound):
        reg.predictions.compare("iris", FLOWER, "v20990101000000")

    env = {"STARCHART_HOME": str(reg.settings.home), "DATABASE_URL": reg.settings.database_url,
           "STARCHART_CONFIG": str(reg.settings.config_path), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-m", "bot.cli", "predict", "iris", "--compare", new, "--json",
                          json.dumps(FLOWER)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["candidate"]["version"] == new
    both = subprocess.run([sys.executable, "-m", "bot.cli", "predict", "iris", "--compare", new, "--version", old,
                           json.dumps(FLOWER)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert both.returncode != 0 and "not allowed with argument" in both.stderr


def test_slack_text_keeps_the_json_of_predict_whole() -> None:
    args, _ = parse('predict iris --version v20260101000000 [{"a b": "c  d"}, {"e": 1}]')
    assert (args.model, args.version, json.loads(args.instances)) == ("iris", "v20260101000000",
                                                                      [{"a b": "c  d"}, {"e": 1}])
    args, _ = parse("predict iris")
    assert args.instances is None
    args, _ = parse("versions iris")  # other commands are split as before
    assert args.command == "versions"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_pull_copies_the_saved_model_for_local_use(served: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                    ) -> None:
    reg = served
    default = reg.versions.default("iris")
    source = Path(next(v for v in reg.versions.of_model("iris")["versions"] if v["name"] == default)["deployment_uri"])
    pulled = reg.copies.pull("iris", dest=tmp_path / "here")
    assert pulled["version"] == default and pulled["path"] == str(tmp_path / "here")
    got = _files(tmp_path / "here")
    info = json.loads(got.pop("starchart-version.json"))
    assert got == _files(source), "the SavedModel, byte for byte"
    assert info["name"] == default and set(info["signature"]["inputs"]) == set(FLOWER)
    # a program loads it without StarChart (here in a fresh interpreter) and gets what the server answers
    code = ("import json, sys, tensorflow as tf; fn = tf.saved_model.load(sys.argv[1]).signatures['serving_default'];"
            "out = fn(**{k: tf.constant([v], tf.float32) for k, v in json.loads(sys.argv[2]).items()});"
            "print(int(out['class_ids'].numpy()[0]))")
    local = subprocess.run([sys.executable, "-c", code, pulled["path"], json.dumps(FLOWER)], capture_output=True,
                           text=True, timeout=120)
    assert local.returncode == 0, local.stderr[-2000:]
    assert int(local.stdout.split()[-1]) == reg.predictions.predict("iris", FLOWER)["predictions"][0]["class_ids"]

    with pytest.raises(InvalidInput, match="already exists"):
        reg.copies.pull("iris", dest=tmp_path / "here")
    assert _files(tmp_path / "here") == {**got, "starchart-version.json": json.dumps(info, indent=2,
                                                                                     sort_keys=True).encode()}
    (tmp_path / "empty").mkdir()
    older = reg.versions.of_model("iris")["versions"][0]["name"]
    assert reg.copies.pull("iris", older, tmp_path / "empty")["version"] == older
    with pytest.raises(NotFound):
        reg.copies.pull("iris", "v20990101000000", tmp_path / "x")
    assert not (tmp_path / "x").exists()

    # files gone from the version's storage: a clear error, and no half-pulled folder
    (source / "saved_model.pb").rename(source / "saved_model.pb.moved")
    try:
        with pytest.raises(Exception, match="holds no SavedModel"):
            reg.copies.pull("iris", default, tmp_path / "broken")
    finally:
        (source / "saved_model.pb.moved").rename(source / "saved_model.pb")
    assert not (tmp_path / "broken").exists() and not list(tmp_path.glob(".broken.partial-*"))

    # the console (the Slack handler) hands the model over as a .tar.gz file
    monkeypatch.chdir(tmp_path)
    out: list[str] = []
    Console(reg, "U_ANYONE", write=out.append).handle("/ml pull iris")
    assert f"iris-{default}.tar.gz" in "\n".join(out) and "serving_default inputs" in "\n".join(out)
    import tarfile

    with tarfile.open(tmp_path / f"iris-{default}.tar.gz") as tar:
        assert f"iris-{default}/saved_model.pb" in tar.getnames()


def test_cli_pull(served: Any, tmp_path: Path) -> None:
    reg = served
    env = {"STARCHART_HOME": str(reg.settings.home), "DATABASE_URL": reg.settings.database_url,
           "STARCHART_CONFIG": str(reg.settings.config_path), "PATH": "/usr/bin:/bin"}
    ok = subprocess.run([sys.executable, "-m", "bot.cli", "pull", "iris", "--to", str(tmp_path / "m"), "--json"],
                        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["path"] == str(tmp_path / "m") and (tmp_path / "m" / "saved_model.pb").exists()
    again = subprocess.run([sys.executable, "-m", "bot.cli", "pull", "iris", "--to", str(tmp_path / "m")],
                           env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "already exists" in again.stderr


def test_prediction_route_statuses_follow_the_error_kind() -> None:
    """TF Serving's statuses, decided by the kind of error, so subclasses of NotFound map like NotFound."""
    from bot.web import _prediction_status
    from model_registry.domain.errors import BackendError, Refused

    class NoSuchThing(NotFound):
        """A more specific NotFound, as a backend might raise."""

    assert _prediction_status(InvalidInput("bad")) == "400 Bad Request"
    assert _prediction_status(NoSuchThing("gone")) == "404 Not Found"
    assert _prediction_status(Refused("not served from an endpoint")) == "404 Not Found"
    assert _prediction_status(BackendError("down")) == "503 Service Unavailable"


def test_a_serving_python_without_tensorflow_is_reported(tmp_path: Path) -> None:
    """STARCHART_TRAINER_PYTHON without TensorFlow: the model server refuses to start and says why."""
    from model_registry.adapters.backends.local import LocalBackend
    from model_registry.domain.errors import BackendError

    no_tf = tmp_path / "python-without-site"
    no_tf.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')  # -S: no site-packages, so no TensorFlow
    no_tf.chmod(0o755)
    backend = LocalBackend(tmp_path / "home", python=str(no_tf))
    with pytest.raises(BackendError) as exc:
        backend.predict("iris", None, {"instances": [FLOWER]})
    assert "TensorFlow is not importable" in exc.value.message and "STARCHART_TRAINER_PYTHON" in exc.value.message
    assert "server.log" in exc.value.hint


def test_the_try_example_is_the_first_evaluation_row_when_there_is_one(make_registry: Any, sqlite_url: str,
                                                                       trained: dict, tmp_path: Path) -> None:
    data = ROOT / "trainers" / "iris" / "trainer" / "data" / "iris_eval.csv"
    reg = make_registry(sqlite_url, models={"iris": {"evaluation": {"data": str(data), "label": "species",
                                                                      "output": "class_ids"}}})
    assert train_and_wait(reg, "iris", "U_T", replay_args(trained["iris_a"]))["state"] == "SUCCEEDED"
    reg.versions.expose("iris", "U_T")
    version = reg.versions.default("iris")
    assert reg.predictions.example("iris", version) == {"sepal_length": 4.9, "sepal_width": 3.1,
                                                        "petal_length": 1.5, "petal_width": 0.1}
    broken = tmp_path / "broken.csv"
    broken.write_text("sepal_length,species\n1.0,0\n")  # the other inputs are missing: built from the signature
    reg = make_registry(sqlite_url, models={"iris": {"evaluation": {"data": str(broken), "label": "species",
                                                                      "output": "class_ids"}}})
    assert reg.predictions.example("iris", version) == {
        "sepal_length": 0.0, "sepal_width": 0.0, "petal_length": 0.0, "petal_width": 0.0}
