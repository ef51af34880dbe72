"""Copies for devices: `pull --format tflite` converts a real SavedModel in a TensorFlow process and checks the file
with the LiteRT interpreter; the check's rule (model_registry/domain/lite_check.py) on its own; signed URLs."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
from conftest import ROOT, replay_args, train_and_wait

from bot.console import Console
from model_registry.adapters.tflite import Conversion, TfliteConverter, UnsupportedModel
from model_registry.domain import lite_check
from model_registry.domain.errors import InvalidInput, Refused

FLOWER = {"sepal_length": 6.7, "sepal_width": 3.0, "petal_length": 5.2, "petal_width": 2.3}
IRIS_CSV = ROOT / "trainers" / "iris" / "trainer" / "data" / "iris.csv"
IRIS_INPUTS = {k: {"dtype": "DT_FLOAT", "shape": [-1]} for k in FLOWER}
IRIS_OUTPUTS = {"class_ids": {"dtype": "DT_INT64", "shape": [-1]}, "probabilities": {"dtype": "DT_FLOAT",
                                                                                     "shape": [-1, 3]}}


# ---------------------------------------------------------------- the check's rule, without TensorFlow

def test_outputs_within_the_tolerance_pass_and_the_largest_difference_is_reported() -> None:
    saved = {"class_ids": [0, 2], "probabilities": [[0.9, 0.05, 0.05], [0.1, 0.2, 0.7]]}
    lite = {"class_ids": [0, 2], "probabilities": [[0.90003, 0.05, 0.05], [0.1, 0.2, 0.7]]}
    result = lite_check.compare(saved, lite, IRIS_OUTPUTS)
    assert result["ok"] and result["instances"] == 2 and "worst" not in result
    assert math.isclose(result["max_abs_diff"], 3e-5, rel_tol=1e-3)
    assert result["outputs"] == {"class_ids": {"mismatches": 0}, "probabilities": {"max_abs_diff": result["max_abs_diff"]}}


def test_a_float_output_beyond_the_tolerance_is_named_with_its_difference() -> None:
    saved = {"class_ids": [0, 2], "probabilities": [[0.9, 0.05, 0.05], [0.1, 0.2, 0.7]]}
    lite = {"class_ids": [0, 2], "probabilities": [[0.9, 0.05, 0.05], [0.1, 0.2003, 0.6997]]}
    result = lite_check.compare(saved, lite, IRIS_OUTPUTS)
    assert not result["ok"] and result["worst"]["output"] == "probabilities"
    assert "by up to 0.0003" in result["worst"]["why"] and "instance 1" in result["worst"]["why"]


def test_integer_outputs_must_be_equal_and_a_class_change_outranks_a_float_difference() -> None:
    saved = {"class_ids": [0, 1, 2], "probabilities": [[0.5, 0.5, 0.0]] * 3}
    lite = {"class_ids": [0, 2, 2], "probabilities": [[0.4, 0.6, 0.0]] * 3}
    result = lite_check.compare(saved, lite, IRIS_OUTPUTS)
    assert result["worst"]["output"] == "class_ids"
    assert result["worst"]["why"] == "output class_ids (int64) differs in 1 of 3 instances (first: instance 1)"
    assert result["outputs"]["class_ids"] == {"mismatches": 1}


def test_shapes_missing_outputs_and_nan_are_differences() -> None:
    shape = lite_check.compare({"p": [[1.0, 2.0]]}, {"p": [[1.0]]}, {"p": {"dtype": "DT_FLOAT"}})
    assert not shape["ok"] and "shape [1, 1] in the copy and [1, 2]" in shape["worst"]["why"]
    missing = lite_check.compare({"p": [1.0], "q": [1]}, {"p": [1.0]}, {})
    assert not missing["ok"] and missing["worst"]["output"] == "q"
    nan = lite_check.compare({"p": [float("nan"), 1.0]}, {"p": [1.0, 1.0]}, {"p": {"dtype": "DT_FLOAT"}})
    assert not nan["ok"] and "not a number" in nan["worst"]["why"]
    both = lite_check.compare({"p": [float("nan")]}, {"p": [float("nan")]}, {"p": {"dtype": "DT_FLOAT"}})
    assert both["ok"], "NaN where the SavedModel gives NaN is the same answer"


def test_probe_instances_are_deterministic_typed_and_shaped() -> None:
    inputs = {"x": {"dtype": "DT_FLOAT", "shape": [-1]}, "n": {"dtype": "DT_INT32", "shape": [-1]},
              "img": {"dtype": "DT_UINT8", "shape": [-1, 2, 3]}, "flag": {"dtype": "DT_BOOL", "shape": [-1]},
              "text": {"dtype": "DT_STRING", "shape": [-1]}, "v": {"dtype": "float32", "shape": [-1, -1]}}
    first, again = lite_check.probe_instances(inputs), lite_check.probe_instances(inputs)
    assert first == again and len(first) == lite_check.PROBES
    assert all(isinstance(i["x"], float) and -1 <= i["x"] < 8 for i in first)
    assert len({i["x"] for i in first}) == len(first), "the instances differ from one another"
    assert all(isinstance(i["n"], int) and 0 <= i["n"] < 10 for i in first)
    assert all(len(i["img"]) == 2 and len(i["img"][0]) == 3 and all(0 <= p < 256 for p in i["img"][1]) for i in first)
    assert {i["flag"] for i in first} == {True, False} and all(isinstance(i["text"], str) for i in first)
    assert all(len(i["v"]) == 1 for i in first), "an unknown size is taken as 1"
    with pytest.raises(InvalidInput, match="no inputs"):
        lite_check.probe_instances({})


def test_evaluation_rows_become_instances_and_bad_data_is_refused_clearly() -> None:
    rows = lite_check.csv_instances(IRIS_CSV.read_text(), IRIS_INPUTS, "species", "iris.csv")
    assert len(rows) == 150 and rows[0] == {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4,
                                            "petal_width": 0.2}
    assert len(lite_check.csv_instances(IRIS_CSV.read_text(), IRIS_INPUTS, "species", "iris.csv", limit=10)) == 10
    with pytest.raises(InvalidInput) as no_label:
        lite_check.csv_instances("sepal_length,sepal_width,petal_length,petal_width\n1,2,3,4\n", IRIS_INPUTS,
                                 "species", "eval.csv")
    assert "has no column species" in no_label.value.message and "the label (species)" in no_label.value.hint
    with pytest.raises(InvalidInput) as bad:
        lite_check.csv_instances("sepal_length,sepal_width,petal_length,petal_width,species\n1,2,wide,4,0\n",
                                 IRIS_INPUTS, "species", "eval.csv")
    assert bad.value.message == "eval.csv line 2, column petal_length: 'wide' is not a float32 value"
    with pytest.raises(InvalidInput, match="has no rows"):
        lite_check.csv_instances("sepal_length,sepal_width,petal_length,petal_width,species\n", IRIS_INPUTS,
                                 "species", "eval.csv")


# ---------------------------------------------------------------- real models, converted and checked

@pytest.fixture
def registry(make_registry: Any, sqlite_url: str, trained: dict, trained_sentiment: Path) -> Iterator[Any]:
    """iris (two versions, the first the default; its evaluation data is the shipped iris.csv) and sentiment."""
    reg = make_registry(sqlite_url, models={"iris": {"evaluation": {"data": str(IRIS_CSV), "label": "species",
                                                                    "output": "class_ids"}}})
    for src in (trained["iris_a"], trained["iris_b"]):
        assert train_and_wait(reg, "iris", "U_T", replay_args(src))["state"] == "SUCCEEDED"
    assert train_and_wait(reg, "sentiment", "U_T", replay_args(trained_sentiment))["state"] == "SUCCEEDED"
    reg.versions.expose("iris", "U_T")
    reg.versions.expose("sentiment", "U_T")
    yield reg
    reg.backend.stop_server()


def _litert_class(path: str, flower: dict[str, float]) -> tuple[int, list[float]]:
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=path).get_signature_runner("serving_default")
    out = runner(**{k: np.array([v], np.float32) for k, v in flower.items()})
    return int(out["class_ids"][0]), [float(p) for p in out["probabilities"][0]]


def test_a_tflite_pull_is_checked_on_the_evaluation_rows_and_answers_as_the_model_server(registry: Any,
                                                                                          tmp_path: Path) -> None:
    reg = registry
    default = reg.versions.default("iris")
    pulled = reg.copies.pull("iris", dest=tmp_path / "lite", format="tflite")
    path = tmp_path / "lite" / f"iris-{default}.tflite"
    assert pulled["path"] == str(path) and pulled["bytes"] == path.stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "lite").iterdir()) == [f"iris-{default}.tflite",
                                                                      "starchart-version.json"]
    check = pulled["check"]
    assert check["on"] == str(IRIS_CSV) and check["instances"] == 150, "every row of the evaluation data"
    assert check["outputs"]["class_ids"] == {"mismatches": 0} and check["max_abs_diff"] <= lite_check.TOLERANCE
    assert json.loads((tmp_path / "lite" / "starchart-version.json").read_text())["tflite_check"] == check
    served = reg.predictions.predict("iris", FLOWER)["predictions"][0]  # the local model server (TensorFlow)
    cls, probabilities = _litert_class(str(path), FLOWER)
    assert cls == served["class_ids"]
    assert max(abs(a - b) for a, b in zip(probabilities, served["probabilities"])) <= lite_check.TOLERANCE

    with pytest.raises(InvalidInput, match="already exists"):
        reg.copies.pull("iris", dest=tmp_path / "lite", format="tflite")
    with pytest.raises(InvalidInput, match="unknown format 'onnx'"):
        reg.copies.pull("iris", dest=tmp_path / "onnx", format="onnx")


class _AgainstAnotherSavedModel(TfliteConverter):
    """Converts as usual, but hands back the SavedModel outputs of another version for the same instances: the
    copy is then compared with a model it was not made from."""

    def __init__(self, other: Path) -> None:
        super().__init__()
        self.other = other

    def convert(self, saved_model: Path, out: Path, instances: list[dict[str, Any]], what: str) -> Conversion:
        made = super().convert(saved_model, out, instances, what)
        other = super().convert(self.other, out.with_name("other.tflite"), instances, what)
        return dataclasses.replace(made, saved=other.saved)


def test_a_copy_that_answers_otherwise_is_refused_and_nothing_is_written(registry: Any, tmp_path: Path,
                                                                         trained: dict) -> None:
    reg = registry
    default = reg.versions.default("iris")
    reg.copies.converter = _AgainstAnotherSavedModel(trained["iris_b"] / "model")  # the default is iris_a
    with pytest.raises(Refused) as refused:
        reg.copies.pull("iris", dest=tmp_path / "lite", format="tflite")
    message = refused.value.message
    assert message.startswith(f"the TensorFlow Lite copy of iris {default} does not answer as its SavedModel: output ")
    assert "over 150 instances of" in message and lite_check.TOLERANCE_TEXT in message
    assert "by up to" in message or "differs in" in message, "which output, and by how much"
    assert "nothing was written" in refused.value.hint and "--format savedmodel" in refused.value.hint
    assert not (tmp_path / "lite").exists() and not list(tmp_path.glob(".lite.partial-*"))


def test_a_model_with_text_processing_is_refused_with_why_and_what_to_do(registry: Any, tmp_path: Path) -> None:
    reg = registry
    version = reg.versions.default("sentiment")
    with pytest.raises(UnsupportedModel) as refused:
        reg.copies.pull("sentiment", dest=tmp_path / "lite", format="tflite")
    message = refused.value.message
    assert message.startswith(f"sentiment {version} cannot be converted to TensorFlow Lite: its graph uses TensorFlow "
                              "operations that LiteRT's built-in operators lack: ")
    assert "StringLower" in message and "TextVectorization" in message
    assert f"pull sentiment {version} --format savedmodel" in refused.value.hint
    assert not (tmp_path / "lite").exists()
    out: list[str] = []  # the same refusal in the conversation, not a traceback
    Console(reg, "U_ANYONE", write=out.append).handle("/ml pull sentiment --format tflite")
    shown = "\n".join(out)
    assert "cannot be converted to TensorFlow Lite" in shown and "Traceback" not in shown


def test_evaluation_that_names_no_output_of_the_signature_is_refused(make_registry: Any, sqlite_url: str,
                                                                    trained: dict, tmp_path: Path) -> None:
    reg = make_registry(sqlite_url, models={"iris": {"evaluation": {"data": str(IRIS_CSV), "label": "species",
                                                                    "output": "species_id"}}})
    assert train_and_wait(reg, "iris", "U_T", replay_args(trained["iris_a"]))["state"] == "SUCCEEDED"
    reg.versions.expose("iris", "U_T")
    with pytest.raises(InvalidInput) as refused:
        reg.copies.pull("iris", dest=tmp_path / "lite", format="tflite")
    assert "names 'species_id'" in refused.value.message and "class_ids, probabilities" in refused.value.message
    with pytest.raises(InvalidInput, match="keys data, label and output"):
        make_registry(sqlite_url, models={"iris": {"evaluation": {"data": "eval.csv"}}})


def test_cli_pull_tflite_and_url_on_the_local_backend(registry: Any, tmp_path: Path) -> None:
    reg = registry
    env = {"STARCHART_HOME": str(reg.settings.home), "DATABASE_URL": reg.settings.database_url,
           "STARCHART_CONFIG": str(reg.settings.config_path), "PATH": "/usr/bin:/bin"}
    run = [sys.executable, "-m", "bot.cli", "pull", "iris"]
    ok = subprocess.run([*run, "--format", "tflite", "--to", str(tmp_path / "m")], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "as TensorFlow Lite into" in ok.stdout and "checked against the SavedModel on 150 instances" in ok.stdout
    assert "max abs difference" in ok.stdout and "tolerance: max abs difference 1e-4" in ok.stdout
    url = subprocess.run([*run, "--url"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert url.returncode == 1 and "signed URLs are for models kept in Cloud Storage" in url.stderr
    both = subprocess.run([*run, "--url", "--to", str(tmp_path / "x")], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert both.returncode != 0 and "not allowed with argument" in both.stderr


# ---------------------------------------------------------------- signed URLs from Cloud Storage (vertex backend)

def _service_account(email: str = "starchart-signer@starchart-test.iam.gserviceaccount.com") -> Any:
    """Service account credentials with a throwaway RSA key made here: they sign locally, nothing is sent."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from google.oauth2 import service_account

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    creds = service_account.Credentials.from_service_account_info({
        "type": "service_account", "project_id": "starchart-test", "private_key_id": "test-key", "private_key": pem,
        "client_email": email, "token_uri": "http://127.0.0.1:9/token"})
    return creds, key.public_key()


def _verify_v4(url: str, public_key: Any) -> dict[str, str]:
    """Check a V4 signed URL's signature with the public key, as Cloud Storage checks it; its query parameters."""
    import hashlib
    from urllib.parse import parse_qsl, urlsplit

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    parts = urlsplit(url)
    query, _, signature = parts.query.rpartition("&X-Goog-Signature=")
    params = dict(parse_qsl(query))
    assert params["X-Goog-SignedHeaders"] == "host"
    canonical = "\n".join(["GET", parts.path, query, f"host:{parts.netloc}\n", "host", "UNSIGNED-PAYLOAD"])
    scope = params["X-Goog-Credential"].split("/", 1)[1]
    to_sign = "\n".join(["GOOG4-RSA-SHA256", params["X-Goog-Date"], scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    public_key.verify(bytes.fromhex(signature), to_sign.encode(), padding.PKCS1v15(), hashes.SHA256())  # raises if not
    return params


@pytest.fixture
def on_vertex(make_registry: Any, sqlite_url: str, trained: dict, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A vertex-backed registry whose iris version lives in the Cloud Storage emulator; URLs signed with a key
    made in the test."""
    from fakes.gcs_emulator import new_bucket, shared_gcs_emulator
    from fakes.vertex_fake import VertexFake, fast_backend, replay_runner, vertex_env

    from model_registry.adapters.gcs import GcsStorage

    gcs = shared_gcs_emulator()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs)
    bucket = new_bucket(gcs)
    creds, public_key = _service_account()
    with VertexFake() as fake:
        fake.runner = replay_runner(gcs)
        storage = GcsStorage(project=fake.project, emulator_host=gcs, signing_credentials=creds)
        reg = make_registry(sqlite_url, backend=fast_backend(fake, bucket, storage=storage), env=vertex_env(bucket))
        job = reg.jobs.train("iris", "U_T", args=replay_args(trained["iris_a"]))
        reg.jobs.refresh("iris")  # the fake runs the job as it is polled
        reg.jobs.refresh("iris")
        assert reg.jobs.get(job["job_id"])["state"] == "SUCCEEDED"
        reg.versions.expose("iris", "U_T")
        yield reg, public_key, creds


def test_signed_urls_to_the_saved_model_files(on_vertex: Any) -> None:
    import requests

    reg, public_key, creds = on_vertex
    version = reg.versions.default("iris")
    signed = reg.copies.signed_urls("iris")
    assert (signed["version"], signed["format"], signed["expires_in"], signed["uploaded"]) == (version, "savedmodel",
                                                                                              3600, False)
    paths = [u["path"] for u in signed["urls"]]
    assert "saved_model.pb" in paths and any(p.startswith("variables/") for p in paths)
    store = reg.backend.storage
    for u in signed["urls"]:
        params = _verify_v4(u["url"], public_key)
        assert params["X-Goog-Expires"] == "3600" and params["X-Goog-Credential"].startswith(creds.signer_email + "/")
        assert params["X-Goog-Algorithm"] == "GOOG4-RSA-SHA256"
        got = requests.get(u["url"], timeout=30)  # the emulator serves the object the URL names
        assert got.status_code == 200 and got.content == store.read_bytes(u["uri"]), u["path"]


def test_a_signed_url_to_a_tflite_copy_uploads_it_once_then_reuses_it(on_vertex: Any) -> None:
    import requests

    reg, public_key, _creds = on_vertex
    version = reg.versions.default("iris")
    first = reg.copies.signed_urls("iris", format="tflite")
    assert first["uploaded"] and first["check"]["instances"] == lite_check.PROBES
    assert first["check"]["on"] == "test values built from the signature"
    (entry,) = first["urls"]
    train_path = reg.versions.of_model("iris")["versions"][0]["deployment_uri"].rstrip("/").rsplit("/", 1)[0]
    assert entry["uri"] == f"{train_path}/tflite/iris-{version}.tflite" and entry["path"] == f"iris-{version}.tflite"
    params = _verify_v4(entry["url"], public_key)
    assert params["response-content-disposition"] == f'attachment; filename="iris-{version}.tflite"'
    data = requests.get(entry["url"], timeout=30).content
    assert data == reg.backend.storage.read_bytes(entry["uri"])

    class Refuses(TfliteConverter):
        def convert(self, *args: Any, **kwargs: Any) -> Conversion:
            raise AssertionError("the uploaded copy should have been reused")

    reg.copies.converter = Refuses()
    again = reg.copies.signed_urls("iris", format="tflite")
    assert not again["uploaded"] and again["check"] == first["check"] and again["urls"][0]["uri"] == entry["uri"]
    lite = Path(reg.settings.home) / "downloaded.tflite"
    lite.write_bytes(requests.get(again["urls"][0]["url"], timeout=30).content)
    cls, probabilities = _litert_class(str(lite), FLOWER)
    assert cls in (0, 1, 2) and math.isclose(sum(probabilities), 1, rel_tol=1e-4)

    from bot.text import render
    from handlers.results import SignedUrls

    shown = render(SignedUrls(again)).lines
    assert shown[0].startswith(f"iris {version} (tflite): 1 signed URL(s), valid for 60 minutes (until ")
    assert "the copy already uploaded; checked against the SavedModel on 16 instances" in shown[1]
    assert shown[2] == f"iris-{version}.tflite  {again['urls'][0]['url']}"


def test_credentials_that_cannot_sign_say_what_to_do(on_vertex: Any) -> None:
    from google.oauth2.credentials import Credentials as UserCredentials

    from model_registry.adapters.gcs import CannotSign

    reg, _key, _creds = on_vertex
    store = reg.backend.storage
    for credentials in (UserCredentials(token="ya29.user-token"), None):  # a person's login; the emulator's anonymous
        store.signing_credentials = credentials
        with pytest.raises(CannotSign) as refused:
            reg.copies.signed_urls("iris")
        assert "cannot sign a URL: they hold no private key" in refused.value.message
        assert "service account key file" in refused.value.hint
        assert "roles/iam.serviceAccountTokenCreator" in refused.value.hint


def test_a_bad_format_is_named_as_a_bad_format_not_an_unknown_command() -> None:
    from handlers.grammar import Usage
    from handlers.parsing import parse, usage_text

    with pytest.raises(Usage) as bad:
        parse("pull iris —format onnx")  # as a Slack client sends --format
    shown = usage_text(str(bad.value))
    assert "argument --format: invalid choice: 'onnx'" in shown and "'tflite'" in shown
    assert "unknown command" not in shown
    args, _ = parse("pull iris v20260101000000 —format tflite")
    assert (args.model, args.version, args.format) == ("iris", "v20260101000000", "tflite")
    assert parse("pull iris")[0].format == "savedmodel", "the SavedModel stays the default"
