"""The benchmark scripts run and follow DESIGN.md's output contract (timings are never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_list_queries_smoke_prints_the_result_json_last() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "list_queries.py"), "--smoke"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-2000:]
    result = json.loads(lines[-1])
    assert {"benchmark", "ratio", "better", "measured", "baseline", "unit"} <= set(result)
    assert result["benchmark"] == "list_queries"
    assert result["better"] in ("lower", "higher")
    assert isinstance(result["ratio"], (int, float)) and result["ratio"] > 0
    assert result["measured"] > 0 and result["baseline"] > 0
    assert set(result["ratios"]) == {"state/sqlite", "versions/sqlite"}


def test_predict_overhead_smoke_prints_the_result_json_last() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "predict_overhead.py"), "--reps", "3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "predict_overhead" and result["better"] == "lower" and result["runs"] == 3
    assert result["measured"] > 0 and result["baseline"] > 0 and result["ratio"] > 0


def test_serving_load_smoke_prints_the_result_json_last() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serving_load.py"), "--requests", "64"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "serving_load" and result["better"] == "higher" and result["unit"] == "requests/s"
    assert set(result["levels"]) == {"1", "8", "32", "64"} and result["failed"] == 0
    assert result["measured"] > 0 and result["baseline"] > 0 and result["ratio"] > 0


def test_outbox_delivery_smoke_prints_the_result_json_last() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "outbox_delivery.py"), "--reps", "12"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "outbox_delivery" and result["better"] == "lower" and result["unit"] == "ms"
    assert result["measured"] > 0 and result["baseline"] > 0 and result["ratio"] > 0
    assert result["runs"] == 12 and result["database"] == "sqlite"


def test_evaluation_quick_prints_the_result_json_last() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "evaluation.py"), "--quick", "--rows", "2000"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "evaluation" and result["better"] == "lower" and result["unit"] == "s"
    assert result["rows"] == 2000 and result["runs"] == 1
    assert result["measured"] > 0 and result["baseline"] > 0 and result["ratio"] > 0


def test_serving_memory_quick_prints_the_result_json_last() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serving_memory.py"), "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "serving_memory" and result["better"] == "lower" and result["rounds"] == 1
    assert result["measured"] > 0 and result["baseline"] > 0 and result["ratio"] > 0 and result["after_unload_mb"] > 0
    assert result["server_said"] and result["server_said"][-1].startswith("released ")  # the four were unloaded


def test_serving_switch_smoke_prints_the_result_json_last() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serving_switch.py"), "--quick", "--switches", "1",
                           "--clients", "4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "serving_switch" and result["better"] == "lower" and result["switches"] == 1
    assert result["failed"] == 0 and len(result["versions_seen"]) == 2 and result["unloads"] == 1
    assert result["measured"] > 0 and result["baseline"] > 0 and result["ratio"] > 0


def test_slack_ack_smoke_prints_the_result_json_last_and_the_bot_answered_every_request() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "slack_ack.py"), "--requests", "20", "--rounds", "1",
                           "--starts", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "slack_ack" and result["better"] == "lower" and result["requests"] == 20
    assert set(result["ratios"]) == {"command_p99", "click_p99", "click_behind_commands_p99", "startup", "rss"}
    assert result["measured"] > 0 and result["baseline"] > 0 and result["ratio"] > 0
    # the sink in its own process saw the bot's answer to each of its 60 requests, and nothing from the bare app
    assert result["slack_calls"]["starchart"] >= 60 and result["slack_calls"]["bare"] == 0
    assert {name: len(times) for name, times in result["startups_s"].items()} == {"bare": 2, "starchart": 2}
