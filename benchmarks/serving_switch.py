#!/usr/bin/env python
"""Benchmark: p99 latency of predictions while the default switches, against the steady state before it, with
16 keep-alive clients sending single-instance requests to `POST /v1/models/iris:predict` all along.

A real iris model is trained and exposed on a temporary home (local backend, SQLite); a second version is a copy
of its SavedModel added to the backend's pointer file. After a steady phase, the default is switched back and
forth between the two through the local backend's apply step (LocalBackend.set_default: the model server loads
and warms the version, then the pointer file moves, then the old version is unloaded once idle). A request
belongs to a switch's window when it was sent between the warm's start and one second after the pointer moved.
ratio = p99 in the windows / p99 in the steady phase (lower is better); failed requests (any answer but 200, or
a connection error) must be 0, and the versions that answered are counted from X-Model-Version. The p99 of all
requests after the first switch (the unloads' releases included) is reported too.

    python benchmarks/serving_switch.py [--quick] [--switches N] [--clients N]

Progress goes to stderr; the last line of stdout is one JSON object (DESIGN.md, "Benchmarks").
"""

from __future__ import annotations

import argparse
import gc
import http.client
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.predict_overhead import FLOWER, prepare  # noqa: E402 - after the path is set
from benchmarks.serving_memory import add_copies, server  # noqa: E402

AFTER = 1.0  # seconds after the pointer moved that still count as the switch's window


def log(msg: str) -> None:
    print(f"[serving_switch] {msg}", file=sys.stderr, flush=True)


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 100 else max(values)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="5 s steady, 3 switches (< 1 minute on 2 cores)")
    ap.add_argument("--switches", type=int, help="switches of the default (default 8; 3 with --quick)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent keep-alive clients (default 16)")
    opts = ap.parse_args()
    switches = opts.switches or (3 if opts.quick else 8)
    steady_s, gap_s = (5.0, 3.0) if opts.quick else (15.0, 6.0)

    work = Path(tempfile.mkdtemp(prefix="starchart-bench-switch-"))
    reg = None
    try:
        env = prepare(work / "home")
        from model_registry.bootstrap import bootstrap
        from model_registry.config import ProjectConfig, Settings

        reg = bootstrap(Settings.from_env(env), ProjectConfig.load(Path(env["STARCHART_CONFIG"])))
        first = reg.backend.current_default("iris")
        [second] = add_copies(reg, "iris", 1)
        reg.predictions.predict("iris", [FLOWER])  # starts the model server, loads the default
        info = server(work / "home")
        body = json.dumps({"instances": [FLOWER]}).encode()
        headers = {"Authorization": f"Bearer {info['secret']}", "Content-Type": "application/json"}
        stop = threading.Event()
        lock = threading.Lock()
        sent: list[tuple[float, float]] = []  # (sent at, latency), every request
        failed: list[str] = []
        seen: Counter[str] = Counter()

        def client() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", int(info["port"]), timeout=60)
            mine: list[tuple[float, float]] = []
            versions: Counter[str] = Counter()
            errors: list[str] = []
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    conn.request("POST", "/v1/models/iris:predict", body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    if resp.status != 200 or b"predictions" not in data:
                        errors.append(f"{resp.status} {data[:200]!r}")
                    versions[resp.getheader("X-Model-Version") or ""] += 1
                except OSError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", int(info["port"]), timeout=60)
                mine.append((t0, time.perf_counter() - t0))
            conn.close()
            with lock:
                sent.extend(mine)
                failed.extend(errors)
                seen.update(versions)

        threads = [threading.Thread(target=client) for _ in range(opts.clients)]
        # This process's collector would pause all the clients at once, and the switches themselves (the core's
        # apply step runs here) make its garbage: a full pass took 80-90 ms here, inside the switch windows. Off
        # while the clients time, as timeit does.
        gc.collect()
        gc.disable()
        for t in threads:
            t.start()
        time.sleep(1.0)  # connections open, the batcher busy: not counted
        steady_from = time.perf_counter()
        time.sleep(steady_s)
        windows: list[tuple[float, float]] = []
        moves: list[float] = []
        took: list[float] = []
        for i in range(switches):
            target = second if i % 2 == 0 else first
            t0 = time.perf_counter()
            reg.backend.set_default("iris", target, None)  # what an approved apply calls
            t1 = time.perf_counter()
            windows.append((t0, t1 + AFTER))
            moves.append(t1)
            took.append(t1 - t0)
            log(f"switch {i + 1} to {target}: warm and pointer move {1000 * (t1 - t0):.0f} ms")
            time.sleep(gap_s)
        stop.set()
        for t in threads:
            t.join(timeout=120)
        gc.enable()
        unloads = (work / "home" / "serving" / "server.log").read_text().count("unloaded iris")
    finally:
        if reg is not None:
            reg.backend.stop_server()
            reg.db.engine.dispose()
        shutil.rmtree(work, ignore_errors=True)
    steady = [lat for at, lat in sent if steady_from <= at < windows[0][0]]
    during = [lat for at, lat in sent if any(a <= at < b for a, b in windows)]
    after = [lat for at, lat in sent if at >= windows[0][0]]
    warming = [lat for at, lat in sent if any(a <= at < m for (a, _), m in zip(windows, moves))]
    moved = [lat for at, lat in sent if any(m <= at < b for (_, b), m in zip(windows, moves))]
    measured, baseline = p99(during) * 1000, p99(steady) * 1000
    log(f"steady p99 {baseline:.1f} ms ({len(steady)} requests), during the switches {measured:.1f} ms "
        f"({len(during)} requests), after the first switch {p99(after) * 1000:.1f} ms; {len(failed)} failed; "
        f"answered by {dict(seen)}; {unloads} unloads")
    print(json.dumps({"benchmark": "serving_switch", "ratio": round(measured / baseline, 3), "better": "lower",
                      "measured": round(measured, 2), "baseline": round(baseline, 2), "unit": "ms (p99 latency)",
                      "failed": len(failed), "failures": failed[:3], "versions_seen": dict(seen),
                      "switches": switches, "clients": opts.clients, "requests_steady": len(steady),
                      "requests_during": len(during), "p99_after_first_switch_ms": round(p99(after) * 1000, 2),
                      "p99_while_warming_ms": round(p99(warming) * 1000, 2),
                      "p99_after_the_move_ms": round(p99(moved) * 1000, 2),
                      "switch_ms": [round(1000 * s) for s in took], "unloads": unloads}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
