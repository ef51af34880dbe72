"""Ack latency, start-up time and memory of the bot's web process against a bare Bolt app.

Both run under the same gunicorn settings (gthread); signed requests go over loopback HTTP. The
Web API and response_url calls the bot makes after acking go to a local sink that answers ok.

    python benchmarks/slack_ack.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
SECRET = "bench-signing-secret"
TOKEN = "xoxb-bench"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Sink(BaseHTTPRequestHandler):
    """Slack's Web API and response_url, reduced to 'ok'."""

    posts = 0

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).posts += 1  # one server thread per request; a lost increment only shortens a drain wait
        body = json.dumps({"ok": True, "channel": "C0BENCH", "ts": f"{time.time():.6f}", "users": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        """Quiet: one line per request would drown the benchmark's own output."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def signed(body: str) -> dict[str, str]:
    ts = str(int(time.time()))
    sig = "v0=" + hmac.new(SECRET.encode(), f"v0:{ts}:{body}".encode(), hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": sig,
            "Content-Type": "application/x-www-form-urlencoded"}


def command_body(sink: str, i: int = 0) -> str:
    """A slash command; `i` makes each one Slack's own (a trigger_id, so a signature, of its own)."""
    return urllib.parse.urlencode({
        "token": "x", "team_id": "T0BENCH", "team_domain": "bench", "channel_id": "C0BENCH", "channel_name": "b",
        "user_id": "U0BENCH", "user_name": "bench", "command": "/ml", "text": "state iris", "api_app_id": "A0",
        "response_url": f"{sink}/response", "trigger_id": f"1.2.{i}"})


def click_body(sink: str, i: int = 0) -> str:
    """A click on Approve (of a request that does not exist: the listener looks it up and answers why)."""
    payload = {
        "type": "block_actions", "user": {"id": "U0BENCH", "username": "bench", "team_id": "T0BENCH"},
        "api_app_id": "A0", "token": "x", "team": {"id": "T0BENCH", "domain": "bench"},
        "container": {"type": "message", "message_ts": "1.000001", "channel_id": "C0BENCH", "is_ephemeral": False},
        "trigger_id": f"1.2.{i}", "channel": {"id": "C0BENCH", "name": "b"},
        "message": {"ts": "1.000001", "text": "card", "blocks": []}, "response_url": f"{sink}/response",
        "actions": [{"action_id": "review.approve", "block_id": "review-999999", "type": "button",
                     "value": json.dumps({"r": 999999, "m": "iris", "d": "0" * 64}), "action_ts": f"1.{i}"}],
    }
    return urllib.parse.urlencode({"payload": json.dumps(payload)})


def start(app: str, env: dict[str, str], port: int) -> tuple[subprocess.Popen[bytes], float]:
    argv = [sys.executable, "-m", "gunicorn", app, "--bind", f"127.0.0.1:{port}", "--workers", "2",
            "--worker-class", "gthread", "--threads", "8", "--timeout", "30", "--log-level", "warning"]
    t0 = time.perf_counter()
    errors = tempfile.TemporaryFile()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=errors)
    url = f"http://127.0.0.1:{port}/healthz"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return proc, time.perf_counter() - t0
        except OSError:
            if proc.poll() is not None:
                errors.seek(0)
                raise RuntimeError(f"{app} exited: {errors.read().decode()[-2000:]}") from None
            time.sleep(0.02)


def drain(quiet: float = 0.5, timeout: float = 30.0) -> None:
    """Wait until the bot has stopped calling Slack (the sink saw no request for `quiet` seconds)."""
    deadline, last, since = time.monotonic() + timeout, -1, time.monotonic()
    while time.monotonic() < deadline:
        if Sink.posts != last:
            last, since = Sink.posts, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.05)


def ready(port: int, timeout: float = 60.0) -> None:
    """Wait until every worker has loaded the core (the bot's /healthz says "core": "ready")."""
    deadline, streak = time.monotonic() + timeout, 0
    while streak < 10 and time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
            streak = streak + 1 if json.loads(resp.read()).get("core", "ready") == "ready" else 0
        time.sleep(0.02)


def rss_mb(proc: subprocess.Popen[bytes]) -> float:
    """Resident memory of the gunicorn master and its workers together."""
    pids = [proc.pid]
    with contextlib.suppress(OSError):  # no workers (yet): the master alone
        pids += [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


SENT = itertools.count()  # every request of the run is a distinct one, as Slack's are: none is a replay


def load(port: int, make_body: Callable[[str, int], str], sink: str, n: int, concurrency: int) -> list[float]:
    url = f"http://127.0.0.1:{port}/slack/events"

    def one(_: int) -> float:
        body = make_body(sink, next(SENT))
        req = urllib.request.Request(url, data=body.encode(), headers=signed(body), method="POST")
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()
            assert resp.status == 200, resp.status
        return time.perf_counter() - t0

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(n)))


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    opts = ap.parse_args()
    n, concurrency, rounds = (200, 20, 3) if opts.quick else (500, 20, 5)

    sink = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    sink_url = f"http://127.0.0.1:{sink.server_address[1]}"
    home = Path(tempfile.mkdtemp(prefix="starchart-bench-"))
    (home / "starchart.yaml").write_text(f"trainer_base: {ROOT / 'trainers'}\nmodel_files: models\n")
    env = {**os.environ, "SLACK_BOT_TOKEN": TOKEN, "SLACK_SIGNING_SECRET": SECRET, "SLACK_API_URL": sink_url + "/api/",
           "STARCHART_HOME": str(home), "STARCHART_CONFIG": str(home / "starchart.yaml"),
           "DATABASE_URL": f"sqlite:///{home / 'db.sqlite'}"}

    sys.path.insert(0, str(ROOT))
    from model_registry.adapters.db import make_engine, migrate

    migrate(make_engine(env["DATABASE_URL"]))  # a deployed bot starts on an existing schema

    apps = {"bare": "benchmarks.support.bare_bolt:build()", "starchart": "bot.serve:build_wsgi()"}
    servers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    results: dict[str, dict[str, Any]] = {name: {"command": [], "click": [], "max_ms": 0.0} for name in apps}
    try:
        for name, app in apps.items():
            port = free_port()
            proc, startup = start(app, env, port)
            servers[name] = (proc, port)
            results[name]["startup_s"] = startup
            ready(port)  # latency is measured in steady state; start-up was measured above
            load(port, command_body, sink_url, 40, 5)  # warm up every worker
        for r in range(rounds):  # alternate the two apps so that noise hits both
            for name in (list(apps) if r % 2 == 0 else list(reversed(apps))):
                port = servers[name][1]
                cmd = load(port, command_body, sink_url, n, concurrency)
                click = load(port, click_body, sink_url, n, concurrency)
                results[name]["command"].append(p99(cmd) * 1000)
                results[name]["click"].append(p99(click) * 1000)
                results[name]["max_ms"] = max(results[name]["max_ms"], max(cmd + click) * 1000)
                drain()  # the next round starts when this round's background work has answered
        for name, (proc, _port) in servers.items():
            results[name]["rss_mb"] = rss_mb(proc)  # after the load: the core and its caches are in memory
    finally:
        for proc, _port in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
        sink.shutdown()

    summary = {name: {"startup_s": r["startup_s"], "rss_mb": r["rss_mb"], "max_ms": r["max_ms"],
                      "command_p99_ms": statistics.median(r["command"]),
                      "click_p99_ms": statistics.median(r["click"])} for name, r in results.items()}
    for name, row in summary.items():
        log(f"{name}: {json.dumps({k: round(v, 2) for k, v in row.items()})}")
    bare, ours = summary["bare"], summary["starchart"]
    ratios = {
        "command_p99": ours["command_p99_ms"] / bare["command_p99_ms"],
        "click_p99": ours["click_p99_ms"] / bare["click_p99_ms"],
        "startup": ours["startup_s"] / bare["startup_s"],
        "rss": ours["rss_mb"] / bare["rss_mb"],
    }
    worst_latency = max(ratios["command_p99"], ratios["click_p99"])
    print(json.dumps({
        "benchmark": "slack_ack", "ratio": round(worst_latency, 3), "better": "lower",
        "measured": round(max(ours["command_p99_ms"], ours["click_p99_ms"]), 2),
        "baseline": round(max(bare["command_p99_ms"], bare["click_p99_ms"]), 2),
        "unit": "ms (p99 ack latency, median of rounds)",
        "targets": {"p99": 1.5, "startup": 2.0, "rss": 2.0, "max_ms": 3000},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "over_3s": ours["max_ms"] > 3000, "requests": n, "concurrency": concurrency, "rounds": rounds,
        "starchart": {k: round(v, 2) for k, v in ours.items()}, "bare": {k: round(v, 2) for k, v in bare.items()},
        "p99_per_round_ms": {name: {"command": [round(v, 1) for v in r["command"]],
                                    "click": [round(v, 1) for v in r["click"]]} for name, r in results.items()},
    }))


if __name__ == "__main__":
    main()
