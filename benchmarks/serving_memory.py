#!/usr/bin/env python
"""Benchmark: the local model server's resident memory with five versions loaded against one, and after the four
that are neither the default nor asked for any more have been unloaded.

A real iris model is trained and exposed on a temporary home (local backend, SQLite); four more versions are
copies of its SavedModel, added to the backend's pointer file (SERVING_DIR/iris.json), so five distinct
SavedModels load. The model server's RSS (VmRSS in /proc/PID/status) is read with the default loaded (the
baseline), then with the four others loaded too, asked for by name (the measured side: ratio = five / one, lower
is better), then once they have not been asked for in STARCHART_SERVING_KEEP_NAMED seconds and the server has
unloaded them and released their memory. With `--rounds N` the five-and-back cycle runs N times: the RSS after
each unload shows whether memory creeps.

    python benchmarks/serving_memory.py [--quick] [--rounds N]

Progress goes to stderr; the last line of stdout is one JSON object (DESIGN.md, "Benchmarks").
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.predict_overhead import FLOWER, prepare  # noqa: E402 - after the path is set
from model_registry.adapters.backends import local_versions  # noqa: E402

KEEP_NAMED = 2  # seconds a named version stays loaded after its last request, for this benchmark's server


def log(msg: str) -> None:
    print(f"[serving_memory] {msg}", file=sys.stderr, flush=True)


def add_copies(reg: Any, model: str, count: int) -> list[str]:
    """`count` more versions of `model` on the local backend, each a copy of the default's SavedModel."""
    pointer = json.loads((reg.settings.home / "serving" / f"{model}.json").read_text())
    default = pointer["default"]
    source = Path(pointer["versions"][default].rstrip("/"))
    names = []
    for i in range(1, count + 1):
        name = f"v{int(default[1:]) + i:014d}"
        target = source.parent.parent / f"copy-{i}" / "model"
        shutil.copytree(source, target)
        reg.backend.register_version(model, {"name": name, "deployment_uri": f"{target}/"}, first=False)
        names.append(name)
    return names


def server(home: Path) -> dict[str, Any]:
    return json.loads((home / "serving" / "server.json").read_text())


def call(port: int, secret: str, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request(method, path, body=body, headers={"Authorization": f"Bearer {secret}",
                                                       "Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.getheader("X-Model-Version") or ""
    finally:
        conn.close()


def loaded(port: int, secret: str) -> set[str]:
    status, data, _ = call(port, secret, "GET", "/healthz")
    return {k.split("/")[1] for k in json.loads(data)["model_calls"]} if status == 200 else set()


def rss_mb(pid: int) -> float:
    """VmRSS of `pid`, in MB: the median of five reads a tenth of a second apart (settled, not a spike)."""
    reads = []
    for _ in range(5):
        reads.append(local_versions.rss_mb(pid))  # the model server's own reading of it
        time.sleep(0.1)
    return statistics.median(reads)


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one round (< 1 minute on 2 cores)")
    ap.add_argument("--rounds", type=int, help="five-and-back cycles (default 3; 1 with --quick)")
    opts = ap.parse_args()
    rounds = opts.rounds or (1 if opts.quick else 3)
    # read by the model server the backend starts: room for five, named versions kept briefly
    os.environ.update({"STARCHART_SERVING_LOADED": "5", "STARCHART_SERVING_KEEP_NAMED": str(KEEP_NAMED)})

    work = Path(tempfile.mkdtemp(prefix="starchart-bench-memory-"))
    reg = None
    try:
        env = prepare(work / "home")
        from model_registry.bootstrap import bootstrap
        from model_registry.config import ProjectConfig, Settings

        reg = bootstrap(Settings.from_env(env), ProjectConfig.load(Path(env["STARCHART_CONFIG"])))
        others = add_copies(reg, "iris", 4)
        reg.predictions.predict("iris", [FLOWER])  # starts the model server, loads the default
        info = server(work / "home")
        port, secret, pid = int(info["port"]), str(info["secret"]), int(info["pid"])
        body = json.dumps({"instances": [FLOWER]}).encode()
        for _ in range(20):
            call(port, secret, "POST", "/v1/models/iris:predict", body)
        one = rss_mb(pid)
        log(f"one version loaded: RSS {one:.1f} MB")
        fives, afters = [], []
        for r in range(rounds):
            stop = threading.Event()

            def keep_asking(stop: threading.Event = stop) -> None:  # the four stay "asked for by name"
                while not stop.is_set():
                    for name in others:
                        call(port, secret, "POST", f"/v1/models/iris/versions/{name}:predict", body)
                    stop.wait(0.3)

            for name in others:
                status, data, answered = call(port, secret, "POST", f"/v1/models/iris/versions/{name}:predict", body)
                if status != 200 or answered != name:
                    raise SystemExit(f"{name} did not answer: {status} {data[:300]!r}")
            toucher = threading.Thread(target=keep_asking, daemon=True)
            toucher.start()
            if len(loaded(port, secret)) != 5:
                raise SystemExit(f"expected five versions loaded, /healthz lists {sorted(loaded(port, secret))}")
            fives.append(rss_mb(pid))
            stop.set()
            toucher.join()
            released_before = (work / "home" / "serving" / "server.log").read_text().count("released ")
            wait_until(lambda: len(loaded(port, secret)) == 1, 60, "the four to be unloaded")
            wait_until(lambda before=released_before: (work / "home" / "serving" / "server.log").read_text()
                       .count("released ") > before, 60, "their memory to be released")
            time.sleep(0.5)  # a release still under way (the last of several) settles
            afters.append(rss_mb(pid))
            log(f"round {r + 1}: five loaded RSS {fives[-1]:.1f} MB; after the four were unloaded {afters[-1]:.1f} MB")
        released = [line for line in (work / "home" / "serving" / "server.log").read_text().splitlines()
                    if line.startswith("released ")]
    finally:
        if reg is not None:
            reg.backend.stop_server()
            reg.db.engine.dispose()
        shutil.rmtree(work, ignore_errors=True)
    five, after = statistics.median(fives), statistics.median(afters)
    print(json.dumps({"benchmark": "serving_memory", "ratio": round(five / one, 4), "better": "lower",
                      "measured": round(five, 1), "baseline": round(one, 1), "unit": "MB (RSS of the model server)",
                      "after_unload_mb": round(after, 1), "per_version_mb": round((five - one) / 4, 2),
                      "returned_share": round((five - after) / (five - one), 3) if five > one else None,
                      "rounds": rounds, "five_mb_per_round": [round(v, 1) for v in fives],
                      "after_unload_mb_per_round": [round(v, 1) for v in afters], "server_said": released[-4:]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
