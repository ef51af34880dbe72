"""`--workers 2` on the local backend: the real iris trainer under MultiWorkerMirroredStrategy,
as two local processes with a chief/worker TF_CONFIG, started through the Registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest import ROOT


def test_iris_trains_with_two_local_workers(make_registry: Any, sqlite_url: str) -> None:
    reg = make_registry(sqlite_url, trainer_base=ROOT / "trainers")
    job = reg.jobs.train("iris", "U_TRAINER", args=["--distribute=multiworker", "--epochs=2"], workers=2)
    assert job["workers"] == 2
    done = reg.jobs.wait(job["job_id"], timeout=240)
    job_dir = reg.settings.home / "jobs" / job["job_id"]
    logs = "".join(p.read_text(errors="replace")[-3000:] for p in sorted(job_dir.glob("*.log")))
    assert done["state"] == "SUCCEEDED", f"{done['error']}\n{logs}"
    train_path = Path(done["train_path"])
    assert (train_path / "model" / "saved_model.pb").exists()
    metrics = json.loads((train_path / "metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert (job_dir / "worker-1.log").exists(), "the second worker ran as its own process"
    exposed = reg.versions.expose("iris", "U_TRAINER")
    assert [v["name"] for v in exposed["exposed"]] == [f"v{done['job_id'].rsplit('_', 1)[1]}"]
    assert set(exposed["exposed"][0]["signature"]["inputs"]) == {"sepal_length", "sepal_width", "petal_length",
                                                                 "petal_width"}
