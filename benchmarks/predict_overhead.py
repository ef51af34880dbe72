#!/usr/bin/env python
"""Benchmark: a prediction through `starchart serve` (POST /v1/models/iris:predict) against the same request
sent straight to the local model server that answers it.

The difference is what the web process adds: its WSGI route, the core's checks (model and version in the
database) and one more loopback HTTP hop. A real iris model is trained and exposed on a temporary home
(local backend, SQLite); `starchart serve` runs under gunicorn (1 worker, 4 threads). Requests alternate
between the two sides, one at a time, after a warm-up that starts the model server and loads the model.

    python benchmarks/predict_overhead.py [--quick] [--reps N] [--instances N]

Progress goes to stderr; the last line of stdout is one JSON object (DESIGN.md, "Benchmarks").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FLOWER = {"sepal_length": 6.1, "sepal_width": 2.8, "petal_length": 4.7, "petal_width": 1.2}


def log(msg: str) -> None:
    print(f"[predict_overhead] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> float:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=60) as resp:
        answer = json.loads(resp.read())
    elapsed = time.perf_counter() - t0
    if "predictions" not in answer:
        raise SystemExit(f"unexpected answer from {url}: {answer}")
    return elapsed


def prepare(home: Path) -> dict[str, str]:
    """A home where iris has one exposed version (the default), trained for real."""
    import yaml

    from model_registry.bootstrap import bootstrap
    from model_registry.config import ProjectConfig, Settings

    home.mkdir(parents=True)
    config = home / "starchart.yaml"
    config.write_text(yaml.safe_dump({"trainer_base": str(ROOT / "trainers"), "model_files": str(home / "models")}))
    env = {"STARCHART_HOME": str(home), "STARCHART_CONFIG": str(config),
           "DATABASE_URL": f"sqlite:///{home / 'starchart.db'}"}
    reg = bootstrap(Settings.from_env(env), ProjectConfig.load(config))
    t0 = time.perf_counter()
    job = reg.jobs.wait(reg.jobs.train("iris", "bench", args=["--epochs=3"])["job_id"])
    if job["state"] != "SUCCEEDED":
        raise SystemExit(f"training failed: {job}")
    reg.versions.expose("iris", "bench")
    reg.db.engine.dispose()
    log(f"trained and exposed iris in {time.perf_counter() - t0:.1f}s")
    return env


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="100 requests per side (< 1 minute on 2 cores)")
    ap.add_argument("--reps", type=int, help="requests per side (default 500; 100 with --quick)")
    ap.add_argument("--instances", type=int, default=1, help="instances per request (default 1)")
    opts = ap.parse_args()
    reps = opts.reps or (100 if opts.quick else 500)
    body = json.dumps({"instances": [FLOWER] * opts.instances}).encode()

    work = Path(tempfile.mkdtemp(prefix="starchart-bench-predict-"))
    server = None
    try:
        env = {**os.environ, **prepare(work / "home"), "SLACK_BOT_TOKEN": "xoxb-bench",
               "SLACK_SIGNING_SECRET": "bench-secret", "SLACK_API_URL": "http://127.0.0.1:9/api/",
               "WEB_CONCURRENCY": "1", "WEB_THREADS": "4"}
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "bot.cli", "serve", "--port", str(port), "--workers", "1"],
                                  cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=open(work / "serve.log", "wb"))
        web = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(OSError, ValueError):
                with urllib.request.urlopen(f"{web}/healthz", timeout=2) as resp:
                    if json.loads(resp.read()).get("core") == "ready":
                        break
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit(f"starchart serve did not start:\n{(work / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.1)
        t0 = time.perf_counter()
        post(f"{web}/v1/models/iris:predict", body)  # starts the model server, loads the SavedModel
        log(f"first prediction (model server start + load) {time.perf_counter() - t0:.2f}s")
        info = json.loads((work / "home" / "serving" / "server.json").read_text())
        sides = {"web": f"{web}/v1/models/iris:predict",
                 "model_server": f"http://127.0.0.1:{info['port']}/v1/models/iris:predict"}
        auth = {"web": {}, "model_server": {"Authorization": f"Bearer {info['secret']}"}}  # the server's own secret
        for name, url in sides.items():  # warm both paths
            for _ in range(10):
                post(url, body, auth[name])
        times: dict[str, list[float]] = {name: [] for name in sides}
        names = list(sides)
        for i in range(reps):
            for name in (names if i % 2 == 0 else names[::-1]):
                times[name].append(post(sides[name], body, auth[name]))
        med = {k: statistics.median(v) * 1000 for k, v in times.items()}
        p99 = {k: statistics.quantiles(v, n=100)[98] * 1000 for k, v in times.items()}
        ratio = med["web"] / med["model_server"]
        log(f"{reps} requests per side, {opts.instances} instance(s) each: web median {med['web']:.2f} ms "
            f"(p99 {p99['web']:.2f}), model server median {med['model_server']:.2f} ms (p99 {p99['model_server']:.2f})"
            f"; ratio {ratio:.2f}, overhead {med['web'] - med['model_server']:.2f} ms")
        print(json.dumps({
            "benchmark": "predict_overhead", "ratio": round(ratio, 4), "better": "lower",
            "measured": round(med["web"], 4), "baseline": round(med["model_server"], 4), "unit": "ms (median latency)",
            "overhead_ms": round(med["web"] - med["model_server"], 4),
            "p99_ms": {k: round(v, 4) for k, v in p99.items()}, "runs": reps, "instances": opts.instances,
        }))
        return 0
    finally:
        if server is not None:
            server.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(timeout=20)
        info_path = work / "home" / "serving" / "server.json"
        with contextlib.suppress(OSError, ValueError, ProcessLookupError):
            os.kill(int(json.loads(info_path.read_text())["pid"]), 15)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
