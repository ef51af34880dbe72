"""The README's first command: `starchart demo` really trains iris twice and walks the review."""

from __future__ import annotations

import os
import subprocess
import sys


def test_demo_runs_the_whole_flow(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STARCHART_", "DATABASE_URL"))}
    proc = subprocess.run([sys.executable, "-m", "bot.cli", "demo"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert out.count("*succeeded*") == 2
    assert out.count("exposed `v") == 2
    assert "== Review: iris" in out and "[1] Approve" in out and "Metrics" in out
    assert "Evaluation on 30 rows" in out and "agreement" in out, "the card shows both versions on the same data"
    assert "U0REQUESTER requested this promotion and may not approve it" in out
    assert "U0TRAINER trained the candidate and may not approve it" in out
    assert "approved by @U0APPROVER" in out and ":rocket: applied" in out
    assert "promotion.applied" in out and "Audit chain OK" in out
    new_default = out.rsplit("Default of iris: ", 1)[1].split()[0]
    assert f"Predictions of iris {new_default} (1)" in out and "probabilities" in out, "the new default answers"
    assert not (tmp_path / ".starchart").exists(), "the demo uses a fresh temporary home"
