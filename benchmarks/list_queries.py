#!/usr/bin/env python
"""Benchmark: `Registry.state(model)` and `Registry.versions(model)` on a model with 1,000 jobs and
1,000 versions, against a bare SQL select of the same rows (same columns, same WHERE and ORDER BY)
through the raw DB-API cursor: sqlite3 for SQLite, psycopg for PostgreSQL (when a server answers at
127.0.0.1:5432, user postgres, database test; a temporary database is created and dropped).

The Registry is built as tests/conftest.py make_registry does (`bootstrap(settings, config)` on a
temporary STARCHART_HOME, so the migrations run); the rows are inserted with SQLAlchemy into the
jobs, versions and models tables, all jobs SUCCEEDED (so `state` has nothing to ask the backend).
Each call is timed many times, project and baseline alternating, and the ratio of medians is
reported for every (query, database) pair; the headline ratio is the worst of them.

    python benchmarks/list_queries.py [--quick | --smoke] [--rows N] [--reps N] [--sqlite-only] [--profile]

Human-readable progress goes to stderr; the last line of stdout is one JSON object (DESIGN.md,
"Benchmarks"). Target: every ratio <= 3.0 (the Registry goes through SQLAlchemy Core, JSON decoded, times read
as the database's text and cut in Python; a list of a thousand is a chat command, where a few milliseconds go
unnoticed).
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable

from support.databases import pg_available, pg_db, sqlite_db  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET = 3.0
MODEL = "iris"
OTHER_MODEL = "sentiment"  # a second model's rows, so the WHERE clause has something to skip

# The bare selects: the columns, WHERE and ORDER BY of Registry.state / Registry.versions.
STATE_SQL = ("SELECT job_id, state, created_at, started_at, ended_at, requested_by, version_name, args, error "
             "FROM jobs WHERE model = {p} ORDER BY ts DESC")
VERSIONS_SQL = ("SELECT name, job_id, created_at, trained_by, metrics, deployment_uri "
                "FROM versions WHERE model = {p} ORDER BY name DESC")


def log(msg: str) -> None:
    print(f"[list_queries] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- data


def make_rows(model: str, n: int, start: datetime, bucket: str, home: Path) -> tuple[list[dict], list[dict]]:
    """n SUCCEEDED jobs of `model`, each exposed as a version, with realistic JSON payloads."""
    jobs, versions = [], []
    for i in range(n):
        created = start + timedelta(hours=i, seconds=i % 60)
        ts = created.strftime("%Y%m%d%H%M%S")
        job_id = f"{model}_{ts}"
        train_path = f"{bucket}/{model}/{ts}"
        sha = hashlib.sha256(f"{model}-{i // 25}".encode()).hexdigest()  # a new package every 25 trainings
        package = f"{train_path}/packages/{model}_trainer-0.1.tar.gz"
        args = [f"--epochs={5 + i % 20}", f"--hidden_units={16 + i % 3 * 16},8", f"--learning_rate={0.001 * (1 + i % 10):.3f}",
                f"--batch_size={16 * (1 + i % 4)}", f"--job-dir={train_path}"]
        started, ended = created + timedelta(seconds=3), created + timedelta(seconds=40 + i % 300)
        jobs.append({
            "job_id": job_id, "model": model, "ts": ts, "state": "SUCCEEDED", "module": "trainer.task",
            "args": args, "region": None, "scale_tier": "BASIC", "machine_type": None, "workers": 1,
            "package_uris": [package], "package_sha256": sha, "train_path": train_path, "backend": "local",
            "backend_ref": str(home / "jobs" / job_id), "requested_by": f"U_TRAINER{i % 7}", "created_at": created,
            "started_at": started, "ended_at": ended, "error": None, "version_name": f"v{ts}",
        })
        acc = 0.6 + (i % 37) / 100
        metrics = {"accuracy": acc, "loss": 1.2 - acc, "val_accuracy": acc - 0.02, "val_loss": 1.25 - acc}
        signature = {
            "method_name": "tensorflow/serving/predict",
            "inputs": {f: {"dtype": "DT_FLOAT", "shape": [-1], "tensor": f"serving_default_{f}:0"}
                       for f in ("sepal_length", "sepal_width", "petal_length", "petal_width")},
            "outputs": {"probabilities": {"dtype": "DT_FLOAT", "shape": [-1, 3], "tensor": "StatefulPartitionedCall:1"},
                        "class_ids": {"dtype": "DT_INT64", "shape": [-1], "tensor": "StatefulPartitionedCall:0"}},
        }
        versions.append({
            "model": model, "name": f"v{ts}", "job_id": job_id, "deployment_uri": f"{train_path}/model/",
            "created_at": ended + timedelta(minutes=5), "trained_by": f"U_TRAINER{i % 7}", "exposed_by": "U_EXPOSER",
            "program": {"module": "trainer.task", "package_uris": [package], "sha256": sha}, "args": args,
            "metrics": metrics, "signature": signature,
            "job": {"state": "SUCCEEDED", "region": None, "scale_tier": "BASIC", "created_at": created.isoformat(),
                    "started_at": started.isoformat(), "ended_at": ended.isoformat()},
            "backend_ref": f"{train_path}/model/", "digest": hashlib.sha256(job_id.encode()).hexdigest(),
        })
    return jobs, versions


def populate(reg: Any, n: int) -> None:
    from sqlalchemy import insert

    from model_registry.adapters.records import Job, ModelRecord, Version

    start = datetime(2024, 1, 1)
    with reg.db.unit_of_work() as s:
        for model, count in ((MODEL, n), (OTHER_MODEL, max(1, n // 5))):
            jobs, versions = make_rows(model, count, start, reg.settings.bucket, reg.settings.home)
            s.execute(insert(Job), jobs)
            s.execute(insert(Version), versions)
            s.execute(insert(ModelRecord), [{"name": model, "default_version": versions[len(versions) // 2]["name"],
                                             "updated_at": start}])


def write_config(home: Path) -> Path:
    """tests/conftest.py write_config's shape; the project's trainers/ folder makes `iris` a known model."""
    import yaml

    cfg = {
        "trainer_base": str(ROOT / "trainers"),
        "model_files": str(home / "models"),
        "defaults": {"approvers": [], "required_approvals": 1, "allow_self_approval": False,
                     "request_expiry": "72h"},
        "models": {MODEL: {"module": "trainer.task"}},
    }
    path = home / "starchart.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def make_registry(home: Path, db_url: str) -> Any:
    from model_registry.bootstrap import bootstrap
    from model_registry.config import ProjectConfig, Settings

    home.mkdir(parents=True, exist_ok=True)
    path = write_config(home)
    settings = Settings.from_env({"STARCHART_HOME": str(home), "DATABASE_URL": db_url,
                                  "STARCHART_CONFIG": str(path)})
    return bootstrap(settings, ProjectConfig.load(path))


# ---------------------------------------------------------------------- databases


# ---------------------------------------------------------------------- timing


def alternate(sides: dict[str, Callable[[], Any]], reps: int, warmup: int) -> dict[str, list[float]]:
    """Time each side `reps` times, interleaved; the side that goes first rotates every round."""
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    names = list(sides)
    times: dict[str, list[float]] = {name: [] for name in names}
    clock = time.perf_counter
    for i in range(reps):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            fn = sides[name]
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return times


def profile(fn: Callable[[], Any], calls: int, label: str) -> None:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf).strip_dirs()
    buf.write(f"==== cProfile of {label}, {calls} calls: by internal time ====\n")
    stats.sort_stats("tottime").print_stats(18)
    buf.write(f"==== cProfile of {label}: by cumulative time ====\n")
    stats.sort_stats("cumulative").print_stats(22)
    print(buf.getvalue(), file=sys.stderr)


def run_database(kind: str, db: Any, work: Path, rows: int, reps: int, warmup: int, do_profile: bool
                 ) -> dict[str, dict[str, Any]]:
    url, connect, placeholder = db
    t0 = time.perf_counter()
    reg = make_registry(work / f"home-{kind}", url)
    log(f"{kind}: registry ready (migrations) in {time.perf_counter() - t0:.2f}s; inserting rows ...")
    try:
        t0 = time.perf_counter()
        populate(reg, rows)
        log(f"{kind}: {rows} jobs + {rows} versions of {MODEL} (+{max(1, rows // 5)} of {OTHER_MODEL}) "
            f"in {time.perf_counter() - t0:.2f}s")
        conn = connect()
        try:
            cur = conn.cursor()

            def bare(sql: str, json_col: int | None = None) -> Callable[[], list[Any]]:
                """The bare select; with json_col, also json.loads that column (SQLite returns JSON as text)."""
                text = sql.format(p=placeholder)
                if json_col is None:
                    def run() -> list[Any]:
                        cur.execute(text, (MODEL,))
                        return cur.fetchall()
                    return run
                loads = json.loads

                def run_decoded() -> list[Any]:
                    cur.execute(text, (MODEL,))
                    return [(*row[:json_col], loads(row[json_col]), *row[json_col + 1:]) for row in cur.fetchall()]
                return run_decoded

            cases = {
                "state": (lambda: reg.jobs.state(MODEL), STATE_SQL, 7),  # 7, 4: the JSON column (args, metrics)
                "versions": (lambda: reg.versions.of_model(MODEL), VERSIONS_SQL, 4),
            }
            results = {}
            for query, (project, sql, json_col) in cases.items():
                baseline = bare(sql)
                got_p, got_b = project(), baseline()
                n_p = len(got_p) if query == "state" else len(got_p["versions"])
                if n_p != len(got_b) or n_p != rows:
                    raise SystemExit(f"{kind} {query}: project returned {n_p} rows, bare select {len(got_b)}, "
                                     f"expected {rows}")
                sides = {"registry": project, "bare": baseline}
                if kind == "sqlite":  # psycopg decodes JSON itself; sqlite3 hands back text
                    sides["bare+json"] = bare(sql, json_col)
                times = alternate(sides, reps, warmup)
                med = {name: statistics.median(t) for name, t in times.items()}
                p_med, b_med = med["registry"], med["bare"]
                ratio = p_med / b_med
                results[query] = {"measured_ms": p_med * 1000, "baseline_ms": b_med * 1000, "ratio": ratio,
                                  "measured_min_ms": min(times["registry"]) * 1000,
                                  "baseline_min_ms": min(times["bare"]) * 1000}
                extra = ""
                if "bare+json" in med:
                    results[query]["bare_json_ms"] = med["bare+json"] * 1000
                    results[query]["ratio_vs_bare_json"] = p_med / med["bare+json"]
                    extra = (f"; bare select + json.loads {med['bare+json'] * 1000:.2f} ms, "
                             f"ratio {p_med / med['bare+json']:.2f}")
                log(f"{kind:<10} {query:<8} Registry {p_med * 1000:8.2f} ms   bare select {b_med * 1000:7.2f} ms"
                    f"   ratio {ratio:5.2f}  (min {min(times['registry']) * 1000:.2f} / "
                    f"{min(times['bare']) * 1000:.2f} ms, {reps} alternating reps{extra})")
                if do_profile:
                    profile(project, max(reps, 20), f"Registry.{query} on {kind}")
            cur.close()
        finally:
            conn.close()
        return results
    finally:
        reg.db.engine.dispose()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="20 repetitions (< 1 minute on 2 cores)")
    ap.add_argument("--smoke", action="store_true", help="tiny run for the test suite: 50 rows, 3 reps, SQLite only")
    ap.add_argument("--rows", type=int, help="jobs and versions of the model (default 1000; 50 with --smoke)")
    ap.add_argument("--reps", type=int, help="timed calls per side (default 100; 20 with --quick; 3 with --smoke)")
    ap.add_argument("--sqlite-only", action="store_true", help="skip PostgreSQL even when it is reachable")
    ap.add_argument("--profile", action="store_true", help="print cProfile tables of the Registry calls to stderr")
    opts = ap.parse_args()
    rows = opts.rows or (50 if opts.smoke else 1000)
    reps = opts.reps or (3 if opts.smoke else 20 if opts.quick else 100)
    warmup = 1 if opts.smoke else 3

    work = Path(tempfile.mkdtemp(prefix="starchart-bench-lists-"))
    databases: list[tuple[str, Callable[[], Any]]] = [("sqlite", lambda: sqlite_db(work))]
    skipped = {}
    if opts.smoke or opts.sqlite_only:
        skipped["postgresql"] = "not requested"
    elif pg_available():
        databases.append(("postgresql", pg_db))
    else:
        skipped["postgresql"] = "unreachable at 127.0.0.1:5432"
        log("PostgreSQL is not reachable at 127.0.0.1:5432: measuring SQLite only")

    log(f"work dir {work}; {rows} rows; {reps} alternating reps per side; databases "
        f"{', '.join(k for k, _ in databases)}")
    per_pair: dict[str, dict[str, Any]] = {}
    try:
        for kind, open_db in databases:
            with open_db() as db:
                for query, res in run_database(kind, db, work, rows, reps, warmup, opts.profile).items():
                    per_pair[f"{query}/{kind}"] = res
    finally:
        shutil.rmtree(work, ignore_errors=True)

    worst_key = max(per_pair, key=lambda k: per_pair[k]["ratio"])
    worst = per_pair[worst_key]
    ratios = {k: round(v["ratio"], 3) for k, v in per_pair.items()}
    log("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items())
        + f"; worst {worst_key} {worst['ratio']:.2f}")
    log(f"target: every ratio <= {TARGET}; measured: worst {worst['ratio']:.2f} "
        f"({'meets' if all(v['ratio'] <= TARGET for v in per_pair.values()) else 'misses'} the target)")
    result: dict[str, Any] = {
        "benchmark": "list_queries",
        "ratio": round(worst["ratio"], 4),
        "better": "lower",
        "measured": round(worst["measured_ms"], 4),
        "baseline": round(worst["baseline_ms"], 4),
        "unit": "ms",
        "worst": worst_key,
        "target": TARGET,
        "meets_target": all(v["ratio"] <= TARGET for v in per_pair.values()),
        "ratios": ratios,
        "medians_ms": {k: {"registry": round(v["measured_ms"], 4), "bare_select": round(v["baseline_ms"], 4),
                           **({"bare_select_json_decoded": round(v["bare_json_ms"], 4)} if "bare_json_ms" in v else {})}
                       for k, v in per_pair.items()},
        # SQLite only: the same select with its JSON column decoded (what psycopg does on its own)
        "ratios_vs_bare_json": {k: round(v["ratio_vs_bare_json"], 3) for k, v in per_pair.items()
                                if "ratio_vs_bare_json" in v},
        # less sensitive to load spikes from other processes than the ratios of medians
        "ratios_of_minimums": {k: round(v["measured_min_ms"] / v["baseline_min_ms"], 3) for k, v in per_pair.items()},
        "rows": rows,
        "runs": reps,
        "skipped": skipped,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
