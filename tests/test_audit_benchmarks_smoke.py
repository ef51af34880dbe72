"""The audit benchmark scripts run end to end on tiny data and follow DESIGN.md's output contract.

Timings, rates and memory figures are never asserted: only the shape of the last stdout line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {"benchmark", "ratio", "better", "measured", "baseline", "unit"}


@pytest.mark.parametrize(
    ("name", "better"),
    [("audit_queries", "lower"), ("audit_append", "higher"), ("audit_verify", "lower")],
)
def test_audit_benchmark_smoke_prints_the_result_json_last(name: str, better: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--smoke", "--sqlite-only"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-2000:]
    result = json.loads(lines[-1])
    assert REQUIRED <= set(result), result
    assert result["benchmark"] == name
    assert result["better"] == better
    assert isinstance(result["ratio"], (int, float)) and result["ratio"] > 0
    assert result["measured"] > 0 and result["baseline"] > 0
    assert isinstance(result["unit"], str) and result["unit"]
    assert result["events"] > 0
    assert set(result["ratios"]) == {"sqlite"}
