#!/usr/bin/env python
"""Benchmark: wall time of `starchart train -m iris --wait -- ARGS` on the local backend, against
running the same trainer directly (`python -m trainer.task ARGS` with AIP_MODEL_DIR set).

Both run as subprocesses, timed end to end, alternating (starchart/direct, then direct/starchart, ...)
so machine noise hits both; the result is the ratio of the medians. The starchart side uses a fresh
temporary STARCHART_HOME, a temporary SQLite DATABASE_URL and a temporary starchart.yaml whose
trainer_base is this project's trainers/ folder. The direct side runs an extracted copy of the very
sdist StarChart built, with the very Python interpreter StarChart's local backend uses.

Each StarChart run is also split into phases from the job's own files (spec.json submitted_at,
status.json started_at/ended_at), to show where any overhead goes.

    python benchmarks/train_overhead.py [--quick] [--epochs N] [--pairs N] [--keep]

Human-readable progress goes to stderr; the last line of stdout is one JSON object (DESIGN.md,
"Benchmarks"). Target: ratio <= 1.15.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRAINERS = ROOT / "trainers"
MODEL = "iris"
TARGET = 1.15
# Variables the two sides must not inherit from the caller's shell (they would change what runs).
SCRUB = ("STARCHART_", "DATABASE_URL", "AIP_", "CLOUD_ML_", "TF_CONFIG", "CLUSTER_SPEC", "PYTHONPATH")


def log(msg: str) -> None:
    print(f"[train_overhead] {msg}", file=sys.stderr, flush=True)


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(SCRUB)}


def project_python() -> Path:
    """The interpreter that has the project installed (the venv's), falling back to this one."""
    venv = ROOT / ".venv" / "bin" / "python"
    here = Path(sys.executable)
    if (here.parent / "starchart").exists():
        return here
    return venv if venv.exists() else here


def starchart_argv(python: Path) -> list[str]:
    script = python.parent / "starchart"
    return [str(script)] if script.exists() else [str(python), "-m", "bot.cli"]


def write_config(home: Path) -> Path:
    """The shape of tests/conftest.py write_config, with the project's real trainers (JSON is valid YAML)."""
    cfg = {
        "trainer_base": str(TRAINERS),
        "model_files": str(home / "models"),
        "defaults": {"approvers": [], "required_approvals": 1, "allow_self_approval": False,
                     "request_expiry": "72h"},
        "models": {},
    }
    path = home / "starchart.yaml"
    path.write_text(json.dumps(cfg, indent=2))
    return path


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


class Bench:
    def __init__(self, work: Path, python: Path, trainer_args: list[str], vertex_env: bool) -> None:
        self.work = work
        self.python = python
        self.args = trainer_args
        self.vertex_env = vertex_env
        self.home = work / "home"
        self.home.mkdir()
        config = write_config(self.home)
        self.env = {**clean_env(), "STARCHART_HOME": str(self.home), "STARCHART_CONFIG": str(config),
                    "DATABASE_URL": f"sqlite:///{work / 'db' / 'starchart.db'}", "STARCHART_BACKEND": "local",
                    "STARCHART_USER": "U_BENCH"}
        self.cli = starchart_argv(python)
        self.direct_src: Path | None = None
        self.trainer_python = str(python)
        self.n = 0

    # ------------------------------------------------------------------ the measured side

    def starchart(self) -> dict[str, Any]:
        self.n += 1
        argv = [*self.cli, "train", "-m", MODEL, "--wait", "--", *self.args]
        cpu0, wall0 = children_cpu(), time.time()
        t0 = time.perf_counter()
        proc = subprocess.run(argv, env=self.env, cwd=self.work, capture_output=True, text=True, timeout=900)
        elapsed = time.perf_counter() - t0
        wall1, cpu1 = time.time(), children_cpu()
        if proc.returncode != 0 or "SUCCEEDED" not in proc.stdout:
            raise SystemExit(f"starchart train failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                             f"{proc.stderr[-2000:]}")
        job_id = next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("Job "))
        job_dir = self.home / "jobs" / job_id
        spec = json.loads((job_dir / "spec.json").read_text())
        status = json.loads((job_dir / "status.json").read_text())
        self.trainer_python = spec["python"]
        phases = {
            # CLI start, imports, Registry (engine, schema check), sdist digest/cache, job row, staging, spec
            "submit": spec["submitted_at"] - wall0,
            # starter process (python -m model_registry.adapters.backends.local_runner), fork, first status write
            "runner_start": status["started_at"] - spec["submitted_at"],
            # unpack the sdist + the trainer process itself
            "runner": status["ended_at"] - status["started_at"],
            # poll latency (sleep in Registry.wait), final status read, DB update, CLI exit
            "notice_and_exit": wall1 - status["ended_at"],
        }
        return {"seconds": elapsed, "phases": phases, "cli_cpu": cpu1 - cpu0, "job_id": job_id}

    # ------------------------------------------------------------------ the baseline side

    def prepare_direct(self) -> None:
        """Extract the sdist StarChart built (the same trainer files) once, as a user would have them."""
        built = sorted((self.home / "cache" / "sdist").glob("*/*.tar.gz"))
        if not built:
            raise SystemExit("no sdist in the StarChart cache after the warm-up run")
        dest = self.work / "direct-src"
        dest.mkdir()
        with tarfile.open(built[0]) as tar:
            tar.extractall(dest, filter="data")
        tops = [p for p in dest.iterdir() if p.is_dir()]
        self.direct_src = tops[0] if len(tops) == 1 else dest

    def direct(self, vertex_env: bool = False) -> dict[str, Any]:
        assert self.direct_src is not None
        self.n += 1
        out = self.work / "direct" / f"run{self.n}"
        out.mkdir(parents=True)
        env = {**clean_env(), "AIP_MODEL_DIR": f"{out}/model/", "PYTHONPATH": str(self.direct_src)}
        if vertex_env:  # what the local backend (and Vertex AI) also sets: per-epoch checkpoints and TB logs
            env.update(AIP_CHECKPOINT_DIR=f"{out}/checkpoints/", AIP_TENSORBOARD_LOG_DIR=f"{out}/logs/")
        argv = [self.trainer_python, "-m", "trainer.task", *self.args]
        with open(out / "train.log", "wb") as fh:
            t0 = time.perf_counter()
            proc = subprocess.run(argv, env=env, cwd=self.direct_src, stdout=fh, stderr=subprocess.STDOUT,
                                  timeout=900)
            elapsed = time.perf_counter() - t0
        if proc.returncode != 0 or not (out / "model" / "saved_model.pb").exists():
            raise SystemExit(f"direct trainer failed (exit {proc.returncode}): see {out / 'train.log'}:\n"
                             + (out / "train.log").read_text()[-2000:])
        return {"seconds": elapsed}

    # ------------------------------------------------------------------ probes of fixed costs

    def probes(self, repeat: int = 3) -> dict[str, float]:
        """Fixed costs a `starchart train --wait` pays on top of the trainer, each timed as a subprocess."""
        def timed(argv: list[str], env: dict[str, str]) -> float:
            samples = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                subprocess.run(argv, env=env, cwd=self.work, capture_output=True, check=True, timeout=120)
                samples.append(time.perf_counter() - t0)
            return statistics.median(samples)

        py = str(self.python)
        return {
            "python_startup": timed([py, "-c", "pass"], self.env),
            "import_bot_cli": timed([py, "-c", "import bot.cli"], self.env),
            "import_workflow": timed([py, "-c", "import bot.cli, model_registry.bootstrap"], self.env),
            "starchart_state_cli": timed([*self.cli, "state", MODEL], self.env),
            "local_runner_starter": timed([py, "-c", "import model_registry.adapters.backends.local_runner"], self.env),
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer epochs and pairs (< 1 minute on 2 cores)")
    ap.add_argument("--epochs", type=int, help="trainer epochs (default 3 with --quick, else 10)")
    ap.add_argument("--pairs", type=int, help="alternating measured runs per side (default 2 with --quick, else 4)")
    ap.add_argument("--no-vertex-env", action="store_true",
                    help="skip the third side (direct with AIP_CHECKPOINT_DIR/AIP_TENSORBOARD_LOG_DIR set too); "
                         "it is skipped with --quick anyway")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder and print its path")
    opts = ap.parse_args()
    epochs = opts.epochs or (3 if opts.quick else 10)
    pairs = opts.pairs or (2 if opts.quick else 4)
    vertex_side = not opts.quick and not opts.no_vertex_env
    trainer_args = [f"--epochs={epochs}"]
    python = project_python()

    work = Path(tempfile.mkdtemp(prefix="starchart-bench-train-"))
    log(f"work dir {work}; python {python}; trainer args {trainer_args}; {pairs} alternating pairs")
    bench = Bench(work, python, trainer_args, vertex_side)
    try:
        log("warm-up: starchart (builds the sdist cache, creates the schema) ...")
        cold = bench.starchart()
        log(f"  starchart cold {cold['seconds']:.2f}s")
        bench.prepare_direct()
        log("warm-up: direct ...")
        log(f"  direct cold {bench.direct()['seconds']:.2f}s")
        if vertex_side:
            log(f"  direct+vertex-env cold {bench.direct(vertex_env=True)['seconds']:.2f}s")

        sides = ["starchart", "direct"] + (["direct_vertex_env"] if vertex_side else [])
        samples: dict[str, list[float]] = {s: [] for s in sides}
        phases: list[dict[str, float]] = []
        cli_cpu: list[float] = []
        for i in range(pairs):
            order = sides[i % len(sides):] + sides[:i % len(sides)]  # rotate who goes first
            for side in order:
                if side == "starchart":
                    r = bench.starchart()
                    phases.append(r["phases"])
                    cli_cpu.append(r["cli_cpu"])
                else:
                    r = bench.direct(vertex_env=side == "direct_vertex_env")
                samples[side].append(r["seconds"])
                log(f"  round {i + 1}/{pairs} {side:<18} {r['seconds']:.2f}s"
                    + ("  (" + ", ".join(f"{k} {v:.2f}s" for k, v in r["phases"].items()) + ")"
                       if side == "starchart" else ""))

        log("probes of fixed costs ...")
        probes = bench.probes()
        for k, v in probes.items():
            log(f"  {k:<22} {v * 1000:.0f} ms")

        med = {s: statistics.median(v) for s, v in samples.items()}
        med_phases = {k: round(statistics.median(p[k] for p in phases), 4) for k in phases[0]}
        ratio = med["starchart"] / med["direct"]
        overhead = med["starchart"] - med["direct"]
        log(f"median starchart {med['starchart']:.3f}s, direct {med['direct']:.3f}s, "
            f"overhead {overhead:+.3f}s, ratio {ratio:.3f} (target <= {TARGET})")
        log("median phases of a starchart run: " + ", ".join(f"{k} {v:.3f}s" for k, v in med_phases.items()))
        if "direct_vertex_env" in med:
            log(f"median direct with checkpoint/TensorBoard env {med['direct_vertex_env']:.3f}s "
                f"(ratio vs that: {med['starchart'] / med['direct_vertex_env']:.3f})")
        result: dict[str, Any] = {
            "benchmark": "train_overhead",
            "ratio": round(ratio, 4),
            "better": "lower",
            "measured": round(med["starchart"], 4),
            "baseline": round(med["direct"], 4),
            "unit": "s",
            "target": TARGET,
            "meets_target": ratio <= TARGET,
            "overhead_s": round(overhead, 4),
            # less sensitive to load spikes from other processes than the ratio of medians
            "ratio_of_minimums": round(min(samples["starchart"]) / min(samples["direct"]), 4),
            "runs": pairs,
            "epochs": epochs,
            "quick": opts.quick,
            "samples": {s: [round(x, 4) for x in v] for s, v in samples.items()},
            "starchart_phases_median_s": med_phases,
            "starchart_cli_cpu_median_s": round(statistics.median(cli_cpu), 4),
            "starchart_cold_first_run_s": round(cold["seconds"], 4),
            "probes_median_s": {k: round(v, 4) for k, v in probes.items()},
        }
        if "direct_vertex_env" in med:
            result["baseline_vertex_env"] = round(med["direct_vertex_env"], 4)
            result["ratio_vs_vertex_env"] = round(med["starchart"] / med["direct_vertex_env"], 4)
        print(json.dumps(result))
        return 0
    finally:
        if opts.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
