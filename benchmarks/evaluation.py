#!/usr/bin/env python
"""Benchmark: the evaluation job on 10,000 rows against calling both SavedModels in-process on the same rows.

Two iris SavedModels are trained for real; a CSV of 10,000 labelled rows (the shipped iris rows, jittered,
deterministic) is written. Measured: the evaluation job as the local backend runs it for a promotion request —
submitted as a job (the detached runner, the staged sdist unpacked, `python -m starchart_evaluation.task`), followed
until it ends, its result read. Baseline: what a person would run by hand — one Python process that imports
TensorFlow, loads both SavedModels, reads the CSV and calls each model once on all rows, then compares the answers
with the labels. Both start a Python with TensorFlow, so the ratio is what the job adds (its runner, the package,
typed row parsing, batching, the metrics and the disagreements). Runs alternate; medians are compared.

    python benchmarks/evaluation.py [--quick] [--reps N] [--rows N]

Progress goes to stderr; the last line of stdout is one JSON object (DESIGN.md, "Benchmarks").
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]

BY_HAND = r"""
import csv, sys
import tensorflow as tf
cand, base, data = sys.argv[1:4]
fns = [tf.saved_model.load(p).signatures["serving_default"] for p in (cand, base)]
with open(data, newline="") as fh:
    rows = list(csv.DictReader(fh))
labels = [int(r["species"]) for r in rows]
tensors = {k: tf.constant([float(r[k]) for r in rows], tf.float32) for k in
           ("sepal_length", "sepal_width", "petal_length", "petal_width")}
answers = [fn(**tensors)["class_ids"].numpy().tolist() for fn in fns]
print([sum(a == y for a, y in zip(side, labels)) / len(labels) for side in answers])
"""


def log(msg: str) -> None:
    print(f"[evaluation] {msg}", file=sys.stderr, flush=True)


def train(out: Path, args: list[str]) -> Path:
    env = {**os.environ, "AIP_MODEL_DIR": f"{out / 'model'}/", "PYTHONPATH": str(ROOT / "trainers" / "iris"),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, "-m", "trainer.task", *args], env=env, cwd=out, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"training failed: {proc.stderr[-2000:]}")
    return out / "model"


def write_rows(path: Path, count: int) -> None:
    """`count` labelled rows: the shipped iris rows, each value jittered a little (seeded)."""
    with open(ROOT / "trainers" / "iris" / "trainer" / "data" / "iris.csv", newline="") as fh:
        source = list(csv.DictReader(fh))
    rng = random.Random(42)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*FEATURES, "species"])
        for i in range(count):
            row = source[i % len(source)]
            writer.writerow([round(float(row[f]) + rng.uniform(-0.1, 0.1), 3) for f in FEATURES] + [row["species"]])


def run_job(home: Path, cand: Path, base: Path, data: Path, n: int) -> tuple[float, dict]:
    from model_registry.adapters import evaluation_package
    from model_registry.adapters.backends.base import TrainingSpec
    from model_registry.adapters.backends.local import LocalBackend
    from model_registry.adapters.records import TERMINAL

    backend = LocalBackend(home)
    folder = home / "bucket" / "iris" / "evaluations" / f"{n}"
    result = folder / "evaluation.json"
    t0 = time.perf_counter()
    package = evaluation_package.build(home / "cache")
    job_id = f"iris_eval{n}_{int(time.time())}"
    spec = TrainingSpec(job_id=job_id, model="iris", ts="0", module=evaluation_package.MODULE,
                        args=(f"--candidate={cand}", f"--base={base}", f"--data={data}", "--label=species",
                              "--output=class_ids", f"--result={result}"),
                        package_uri=backend.stage_package(package, str(folder)), train_path=str(folder))
    ref = backend.submit(spec)
    while (status := backend.status(job_id, ref)).state not in TERMINAL:
        backend.wait_for_change(job_id, 0.05)
    answer = json.loads(result.read_text())
    elapsed = time.perf_counter() - t0
    if status.state != "SUCCEEDED" or not answer.get("ok"):
        raise SystemExit(f"the evaluation job failed: {status} {answer} {backend.logs(job_id, ref)}")
    return elapsed, answer


def run_by_hand(cand: Path, base: Path, data: Path) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", BY_HAND, str(cand), str(base), str(data)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the baseline failed: {proc.stderr[-2000:]}")
    return elapsed, json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true", help="one run of each side (under a minute)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=10_000)
    args = parser.parse_args()
    reps = 1 if args.quick else args.reps
    with tempfile.TemporaryDirectory(prefix="starchart-bench-eval-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        models = []
        for name, flags in (("a", ["--epochs=1", "--hidden_units=8"]), ("b", ["--epochs=2", "--hidden_units=16"])):
            (work / name).mkdir()
            models.append(train(work / name, flags))
        data = work / "rows.csv"
        write_rows(data, args.rows)
        log(f"trained two iris models and wrote {args.rows} rows in {time.perf_counter() - t0:.1f}s")
        measured, baseline = [], []
        for i in range(reps):
            took, answer = run_job(work / "home", models[1], models[0], data, i)
            measured.append(took)
            by_hand, accuracies = run_by_hand(models[1], models[0], data)
            baseline.append(by_hand)
            if answer["rows"] != args.rows or abs(answer["candidate"]["accuracy"] - accuracies[0]) > 1e-9 or abs(
                    answer["base"]["accuracy"] - accuracies[1]) > 1e-9:
                raise SystemExit(f"the job and the baseline disagree: {answer['candidate']} {accuracies}")
            log(f"run {i + 1}: job {took:.2f}s, by hand {by_hand:.2f}s (accuracy {accuracies[0]:.4f} / "
                f"{accuracies[1]:.4f}, agreement {answer['agreement']:.4f})")
    m, b = statistics.median(measured), statistics.median(baseline)
    print(json.dumps({"benchmark": "evaluation", "ratio": round(m / b, 3), "better": "lower", "measured": round(m, 3),
                      "baseline": round(b, 3), "unit": "s", "rows": args.rows, "runs": reps}))


if __name__ == "__main__":
    main()
