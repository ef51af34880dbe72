"""The `starchart` command line as a user runs it: StarChart flags, tables, --json, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, write_config


@pytest.fixture
def cli(tmp_path: Path, replay_trainers: Path, request: pytest.FixtureRequest) -> Any:
    home = tmp_path / "home"
    home.mkdir()
    config = write_config(home, replay_trainers, defaults={"approvers": [], "required_approvals": 1})
    env = {**os.environ, "STARCHART_HOME": str(home), "STARCHART_CONFIG": str(config),
           "DATABASE_URL": f"sqlite:///{home / 'db.sqlite'}"}
    env.pop("STARCHART_USER", None)

    def run(*args: str, user: str | None = None, ok: bool | None = True) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "bot.cli", *(["--user", user] if user else []), *args]
        proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        if ok is True:
            assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    run.home = home  # type: ignore[attr-defined]
    return run


def test_starchart_flow_from_the_command_line(cli: Any, trained: dict) -> None:
    for src in (trained["iris_a"], trained["iris_b"]):
        out = cli("train", "-m", "iris", "-M", "trainer.task", "-s", "BASIC", "-r", "local", "--wait", "--",
                  f"--source={src}", user="U_T")
        assert "SUCCEEDED" in out.stdout
    state = cli("state", "-m", "iris")
    assert state.stdout.splitlines()[0].split()[:2] == ["JOB", "STATE"]
    assert state.stdout.count("SUCCEEDED") == 2
    jobs = json.loads(cli("--json", "jobs", "iris").stdout)
    assert {j["state"] for j in jobs} == {"SUCCEEDED"}
    assert "exposed v" in cli("expose", "-m", "iris", user="U_T").stdout
    versions = json.loads(cli("--json", "versions", "iris").stdout)
    newest = versions["versions"][0]["name"]
    assert versions["default"] == versions["versions"][1]["name"]
    assert "Metrics:" in cli("diff", "iris").stdout
    req = json.loads(cli("--json", "promote", "iris", newest, "--reason", "better", user="U_REQ").stdout)
    refused = cli("approve", str(req["id"]), user="U_REQ", ok=None)
    assert refused.returncode == 1 and "self-approval" in refused.stderr and "hint:" in refused.stderr
    applied = cli("approve", f"#{req['id']}", user="U_OK")
    assert "applied" in applied.stdout
    assert json.loads(cli("--json", "versions", "-m", "iris").stdout)["default"] == newest
    audit = json.loads(cli("--json", "audit", "iris", "--since", "1d").stdout)
    assert audit[0]["action"] == "promotion.applied" and audit[0]["actor"] == "U_OK"
    assert "OK" in cli("audit", "verify").stdout
    # StarChart's apply: the version marked isDefault in models/iris.yaml
    nothing = cli("apply", "-m", "iris", user="U_REQ", ok=None)
    assert nothing.returncode == 1 and "already the default" in nothing.stderr
    back = json.loads(cli("--json", "rollback", "iris", "--reason", "canary", user="U_REQ").stdout)
    rejected = cli("reject", str(back["id"]), "--reason", "keep it", "--user", "U_OK")  # the word order
    assert "rejected" in rejected.stdout
    assert json.loads(cli("audit", "--action", "promotion.rejected", "--json").stdout)[0]["actor"] == "U_OK"
    csv_out = cli("audit", "iris", "--csv").stdout.splitlines()
    assert csv_out[0].startswith("seq,at,action") and len(csv_out) > 10


def test_user_defaults_to_os_login(cli: Any, trained: dict) -> None:
    job = json.loads(cli("--json", "train", "iris", "--", f"--source={trained['iris_a']}").stdout)
    assert job["requested_by"].startswith("local:")


def test_bad_input_gets_message_and_nonzero_exit(cli: Any) -> None:
    cases = [
        (["train", "-m", "Iris"], 1, "invalid model name"),
        (["train", "-m", "irs"], 1, "did you mean iris"),
        (["train", "-m", "iris", "-M", "trainer.missing"], 1, "unknown module"),
        (["state"], 2, "a model is required"),
        (["train", "-m", "iris", "--bogus"], 2, "unrecognized arguments: --bogus — the trainer's own arguments go after --"),
        (["versions", "iris", "--bogus"], 2, "unrecognized arguments: --bogus"),
        (["approve", "abc"], 2, "invalid promotion request id"),
        (["reject", "1"], 2, "--reason"),
        (["approve", "99"], 1, "no promotion request #99"),
        (["logs", "nonsense"], 1, "invalid job id"),
        (["logs", "iris_20200101000000"], 1, "no job"),
        (["audit", "--since", "yesterday"], 1, "invalid time"),
        (["audit", "--action", "promotion.aplied"], 1, "did you mean promotion.applied"),
        (["audit", "--limit", "0"], 1, "invalid --limit"),
        (["versions", "-m", "../../etc"], 1, "invalid model name"),
    ]
    for args, code, message in cases:
        proc = cli(*args, user="U_X", ok=None)
        assert proc.returncode == code, (args, proc.stdout, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    events = json.loads(cli("--json", "audit").stdout)
    # refusals before any state change leave no half-written records: no jobs, no versions
    assert all(e["action"] == "approval.refused" for e in events)


def test_failed_training_exit_code(cli: Any) -> None:
    proc = cli("train", "-m", "iris", "--wait", "--", "--crash", user="U_T", ok=None)
    assert proc.returncode == 4 and "FAILED" in proc.stdout and "crashed on purpose" in proc.stdout


def test_help(cli: Any) -> None:
    out = cli("--help").stdout
    for command in ("train", "state", "expose", "apply", "promote", "approve", "reject", "rollback", "audit"):
        assert command in out
