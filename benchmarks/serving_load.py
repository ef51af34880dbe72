#!/usr/bin/env python
"""Benchmark: single-instance predictions per second from the local model server at concurrency 1, 8, 32 and 64
(keep-alive clients), against calling the same SavedModel in this process one call at a time.

A real iris model is trained and exposed on a temporary home (local backend, SQLite). The baseline loads its
SavedModel here and calls its serving signature with one instance per call. The measured side sends the same
instance as `POST /v1/models/iris:predict` to the model server, from N threads each holding one connection,
through the web process's own client (local_client.py: ~0.04 ms of CPU a request; http.client's ~0.4 ms, on the
cores the server runs on too, set the rate before the server did).
The ratio is the model server's rate at concurrency 32 over the in-process rate (higher is better); every
level's rate, p99 latency and failed requests are reported as well.

    python benchmarks/serving_load.py [--quick] [--requests N]

Progress goes to stderr; the last line of stdout is one JSON object (DESIGN.md, "Benchmarks").
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.predict_overhead import FLOWER, prepare  # noqa: E402 - after the path is set
from model_registry.adapters.backends.local_client import ServerConnections  # noqa: E402

LEVELS = (1, 8, 32, 64)


def log(msg: str) -> None:
    print(f"[serving_load] {msg}", file=sys.stderr, flush=True)


def in_process_rate(model_dir: str, calls: int) -> float:
    """Calls per second of the SavedModel's signature, one instance per call, in this process."""
    import tensorflow as tf

    fn = tf.saved_model.load(model_dir).signatures["serving_default"]
    tensors = {k: tf.constant([v], dtype=tf.float32) for k, v in FLOWER.items()}
    for _ in range(20):
        fn(**tensors)
    t0 = time.perf_counter()
    for _ in range(calls):
        {k: v.numpy() for k, v in fn(**tensors).items()}
    return calls / (time.perf_counter() - t0)


def served_rate(port: int, secret: str, concurrency: int, total: int) -> dict[str, float]:
    """Requests per second, p99 seconds and failures with `concurrency` keep-alive clients sending `total`."""
    body = json.dumps({"instances": [FLOWER]}).encode()
    headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    per_client = max(1, total // concurrency)
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    start = threading.Barrier(concurrency + 1)

    def client() -> None:
        conn = ServerConnections(port, keep=1)  # the web process's client: one kept-alive connection each
        mine, failed = [], 0
        start.wait()
        for _ in range(per_client):
            t0 = time.perf_counter()
            try:
                answer = conn.request("POST", "/v1/models/iris:predict", body, headers)
                ok = answer.status == 200 and b"predictions" in answer.data
            except OSError:  # refused, cut off or timed out: the next request opens a new connection
                ok = False
            mine.append(time.perf_counter() - t0)
            failed += not ok
        conn.close()
        with lock:
            latencies.extend(mine)
            failures[0] += failed

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    p99 = statistics.quantiles(latencies, n=100)[98] if len(latencies) >= 100 else max(latencies)
    return {"rps": len(latencies) / elapsed, "p99_ms": p99 * 1000, "failed": failures[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1,280 requests per level (< 1 minute on 2 cores)")
    ap.add_argument("--requests", type=int, help="requests per level (default 4,000; 1,280 with --quick: fewer measure connection set-up more than serving)")
    opts = ap.parse_args()
    total = opts.requests or (1280 if opts.quick else 4000)

    work = Path(tempfile.mkdtemp(prefix="starchart-bench-serving-"))
    reg = None
    try:
        env = prepare(work / "home")
        from model_registry.bootstrap import bootstrap
        from model_registry.config import ProjectConfig, Settings

        reg = bootstrap(Settings.from_env(env), ProjectConfig.load(Path(env["STARCHART_CONFIG"])))
        reg.predictions.predict("iris", [FLOWER])  # starts the model server, loads the SavedModel
        info = json.loads((work / "home" / "serving" / "server.json").read_text())
        pointer = json.loads((work / "home" / "serving" / "iris.json").read_text())
        model_dir = pointer["versions"][pointer["default"]].rstrip("/")
        served_rate(info["port"], info["secret"], 8, 80)  # warm
        levels = {}
        for n in LEVELS:
            levels[n] = served_rate(info["port"], info["secret"], n, total)
            log(f"concurrency {n}: {levels[n]['rps']:.0f} requests/s, p99 {levels[n]['p99_ms']:.1f} ms, "
                f"{levels[n]['failed']:.0f} failed")
        baseline = in_process_rate(model_dir, total)
        log(f"in process, one call at a time: {baseline:.0f} calls/s")
    finally:
        if reg is not None:
            reg.backend.stop_server()
            reg.db.engine.dispose()
        shutil.rmtree(work, ignore_errors=True)
    measured = levels[32]["rps"]
    print(json.dumps({"benchmark": "serving_load", "ratio": round(measured / baseline, 3), "better": "higher",
                      "measured": round(measured, 1), "baseline": round(baseline, 1), "unit": "requests/s",
                      "requests_per_level": total,
                      "levels": {str(n): {k: round(v, 1) for k, v in r.items()} for n, r in levels.items()},
                      "failed": sum(int(r["failed"]) for r in levels.values())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
