"""End-to-end tests for the StarChart training packages in trainers/ (iris, sentiment).

Each trainer is packaged by ``model_registry.adapters.packaging.build_sdist`` (the ``build``
frontend), extracted, and run as ``python -m trainer.task`` from the extracted folder,
exactly as the training service does it.  TensorFlow is only imported by the subprocesses.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from model_registry.adapters.packaging import build_sdist

TRAINERS = Path(__file__).resolve().parents[1] / "trainers"
DATA_FILES = {"iris": "trainer/data/iris.csv", "sentiment": "trainer/data/reviews.csv"}
TIMEOUT = 180

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="tensorflow is not installed")

IRIS_SAMPLE = {  # one setosa, one virginica
    "sepal_length": [5.1, 6.7],
    "sepal_width": [3.5, 3.0],
    "petal_length": [1.4, 5.2],
    "petal_width": [0.2, 2.3],
}
SENTIMENT_SAMPLE = ["What a wonderful, brilliant film!", "The plot was boring and dull.", ""]

# Runs in a subprocess: call serving_default of a SavedModel and print its outputs as JSON.
SERVE_SCRIPT = """
import json, sys
import tensorflow as tf
model_dir, inputs = sys.argv[1], json.loads(sys.argv[2])
fn = tf.saved_model.load(model_dir).signatures["serving_default"]
if isinstance(inputs, dict):
    outputs = fn(**{k: tf.constant(v, tf.float32) for k, v in inputs.items()})
else:
    outputs = fn(text=tf.constant(inputs, tf.string))
def to_py(t):
    v = t.numpy()
    return [x.decode() if isinstance(x, bytes) else x for x in v.tolist()]
print(json.dumps({
    "inputs": sorted(fn.structured_input_signature[1]),
    "outputs": {k: {"dtype": t.dtype.name, "shape": t.shape.as_list(), "value": to_py(t)}
                for k, t in outputs.items()},
}))
"""


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("AIP_") and k not in ("TF_CONFIG", "CLOUD_ML_JOB_ID")
    }
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


def _run_task(cwd: Path, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainer.task", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def _serve(model_dir: Path, inputs: object) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", SERVE_SCRIPT, str(model_dir), json.dumps(inputs)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _read_metrics(path: Path) -> dict:
    metrics = json.loads(path.read_text())
    assert set(metrics) == {"accuracy", "loss"}
    assert all(isinstance(v, float) for v in metrics.values()), metrics
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["loss"] >= 0.0
    return metrics


def _build_and_extract(name: str, workdir: Path) -> Path:
    """``build_sdist`` of trainers/<name>, as the training service packages it, extracted; returns the sdist root."""
    tarball = build_sdist(TRAINERS / name, workdir / "cache", name).path
    with tarfile.open(tarball) as tar:
        names = tar.getnames()
        root = names[0].split("/")[0]
        for member in ("trainer/__init__.py", "trainer/task.py", DATA_FILES[name]):
            assert f"{root}/{member}" in names, names
        if hasattr(tarfile, "data_filter"):
            tar.extractall(workdir / "extracted", filter="data")
        else:  # pragma: no cover - Python without extraction filters
            tar.extractall(workdir / "extracted")
    return workdir / "extracted" / root


@pytest.fixture(scope="module")
def sdists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {name: _build_and_extract(name, tmp_path_factory.mktemp(f"{name}_sdist")) for name in DATA_FILES}


def _vertex_env(tmp_path: Path) -> dict[str, str]:
    return _env(
        AIP_MODEL_DIR=str(tmp_path / "train" / "model"),
        AIP_CHECKPOINT_DIR=str(tmp_path / "checkpoints"),
        AIP_TENSORBOARD_LOG_DIR=str(tmp_path / "tensorboard"),
        CLOUD_ML_JOB_ID="job-test-123",
    )


def _assert_training_outputs(tmp_path: Path, proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "job-test-123" in proc.stdout
    metrics = _read_metrics(tmp_path / "train" / "metrics.json")
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == metrics
    assert (tmp_path / "train" / "model" / "saved_model.pb").is_file()
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("ckpt-*.weights.h5")) == [
        "ckpt-001.weights.h5",
        "ckpt-002.weights.h5",
    ]
    for run in ("train", "validation"):
        assert list((tmp_path / "tensorboard" / run).glob("events.out.tfevents.*")), run
    return metrics


def test_iris_sdist_train_and_serve(sdists: dict[str, Path], tmp_path: Path) -> None:
    proc = _run_task(sdists["iris"], ["--epochs=2"], _vertex_env(tmp_path))
    _assert_training_outputs(tmp_path, proc)

    result = _serve(tmp_path / "train" / "model", IRIS_SAMPLE)
    assert result["inputs"] == ["petal_length", "petal_width", "sepal_length", "sepal_width"]
    out = result["outputs"]
    assert set(out) == {"probabilities", "class_ids"}
    assert out["probabilities"]["dtype"] == "float32" and out["probabilities"]["shape"] == [2, 3]
    assert out["class_ids"]["dtype"] == "int64" and out["class_ids"]["shape"] == [2]
    for row, cls in zip(out["probabilities"]["value"], out["class_ids"]["value"]):
        assert sum(row) == pytest.approx(1.0, abs=1e-4)
        assert cls == row.index(max(row))


def test_sentiment_sdist_train_and_serve(sdists: dict[str, Path], tmp_path: Path) -> None:
    proc = _run_task(sdists["sentiment"], ["--epochs=2"], _vertex_env(tmp_path))
    _assert_training_outputs(tmp_path, proc)
    assert (tmp_path / "checkpoints" / "vocab.txt").is_file()

    result = _serve(tmp_path / "train" / "model", SENTIMENT_SAMPLE)
    assert result["inputs"] == ["text"]
    out = result["outputs"]
    assert set(out) == {"probability", "label"}
    assert out["probability"]["dtype"] == "float32" and out["probability"]["shape"] == [3]
    assert out["label"]["dtype"] == "string" and out["label"]["shape"] == [3]
    for p, label in zip(out["probability"]["value"], out["label"]["value"]):
        assert 0.0 <= p <= 1.0  # also: no NaN for the empty string
        assert label == ("positive" if p >= 0.5 else "negative")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def test_iris_multiworker_two_local_workers(sdists: dict[str, Path], tmp_path: Path) -> None:
    """Two local MultiWorkerMirroredStrategy workers; paths from --model-dir/--job-dir instead of AIP_MODEL_DIR."""
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs, scratch = [], []
    for index in range(2):
        tmpdir = tmp_path / f"tmp{index}"
        tmpdir.mkdir()
        scratch.append(tmpdir)
        env = _vertex_env(tmp_path)
        del env["AIP_MODEL_DIR"]
        env.update(
            TMPDIR=str(tmpdir), TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        )
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "trainer.task",
                    "--distribute=multiworker",
                    "--epochs=2",
                    f"--model-dir={tmp_path / 'out' / 'model'}",
                    f"--job-dir={tmp_path / 'job'}",
                ],
                cwd=sdists["iris"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=TIMEOUT)
            results.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rc, out, err in results:
        assert rc == 0, out[-2000:] + err[-3000:]
    assert "(chief)" in results[0][1] and "(non-chief)" in results[1][1]
    # The chief wrote to the real locations (metrics.json under --job-dir, not next to the model) ...
    assert (tmp_path / "out" / "model" / "saved_model.pb").is_file()
    chief_metrics = _read_metrics(tmp_path / "job" / "metrics.json")
    assert not (tmp_path / "out" / "metrics.json").exists()
    assert len(list((tmp_path / "checkpoints").glob("ckpt-*.weights.h5"))) == 2
    # ... both workers computed the same (globally reduced) metrics ...
    assert json.loads(results[1][1].strip().splitlines()[-1]) == chief_metrics
    # ... and the non-chief's scratch directory is gone.
    assert not [p for p in scratch[1].iterdir() if p.name.startswith("iris-worker")]


@pytest.mark.parametrize("name", sorted(DATA_FILES))
@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--epochs=abc"], "--epochs: invalid int value: 'abc'", id="bad-int"),
        pytest.param(["--no-such-flag"], "unrecognized arguments: --no-such-flag", id="unknown-flag"),
        pytest.param(
            ["--train_data=/nonexistent/train.csv"],
            "--train_data: file not found: /nonexistent/train.csv",
            id="missing-train-data",
        ),
    ],
)
def test_bad_arguments_fail_fast(
    sdists: dict[str, Path], tmp_path: Path, name: str, args: list[str], message: str
) -> None:
    proc = _run_task(sdists[name], args, _env(AIP_MODEL_DIR=str(tmp_path / "train" / "model")))
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "usage:" in proc.stderr
    assert not (tmp_path / "train").exists()


@pytest.mark.parametrize("name", sorted(DATA_FILES))
def test_missing_model_dir_is_an_error(sdists: dict[str, Path], name: str) -> None:
    proc = _run_task(sdists[name], ["--epochs=1"], _env())
    assert proc.returncode != 0
    assert "set AIP_MODEL_DIR or pass --model-dir" in proc.stderr


def test_iris_rejects_malformed_csv(sdists: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c\n1,2,3\n")
    proc = _run_task(sdists["iris"], [f"--train_data={bad}"], _env(AIP_MODEL_DIR=str(tmp_path / "train" / "model")))
    assert proc.returncode == 1
    assert "missing column(s)" in proc.stderr
    assert not (tmp_path / "train").exists()
