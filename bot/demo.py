"""`starchart demo`: the whole StarChart flow on a fresh temporary home, nothing to set up."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml

from bot import text
from model_registry.config import ProjectConfig, Settings
from model_registry.errors import Refused

PROJECT = Path(__file__).resolve().parents[1]
TRAINER, REQUESTER, APPROVER = "U0TRAINER", "U0REQUESTER", "U0APPROVER"


def _say(line: str = "") -> None:
    print(line, flush=True)


def run_demo(home: Path | None = None, epochs: tuple[int, int] = (3, 10)) -> int:
    from model_registry.workflow import Registry

    home = home or Path(tempfile.mkdtemp(prefix="starchart-demo-"))
    config_path = home / "starchart.yaml"
    config_path.write_text(yaml.safe_dump({
        "trainer_base": str(PROJECT / "trainers"),
        "model_files": "models",
        "defaults": {"approvers": [APPROVER, REQUESTER, TRAINER], "required_approvals": 1,
                     "allow_self_approval": False, "request_expiry": "72h"},
    }))
    env = {"STARCHART_HOME": str(home), "STARCHART_CONFIG": str(config_path), "STARCHART_BACKEND": "local"}
    settings = Settings.from_env({**os.environ, **env, "DATABASE_URL": f"sqlite:///{home / 'starchart.db'}"})
    reg = Registry(settings, ProjectConfig.load(config_path))
    _say(f"StarChart demo — home {home} (local backend, SQLite)")

    jobs = []
    for ep, lr in ((epochs[0], 0.01), (epochs[1], 0.02)):
        _say(f"\n$ starchart train -m iris -- --epochs={ep} --learning_rate={lr}   (as {TRAINER})")
        job = reg.train("iris", TRAINER, args=[f"--epochs={ep}", f"--learning_rate={lr}"])
        job = reg.wait(job["job_id"], on_change=lambda j: _say(f"  {j['job_id']} {j['state']}"))
        if job["state"] != "SUCCEEDED":
            _say(f"training failed:\n{job['error']}")
            return 1
        jobs.append(job)

    _say("\n$ starchart state -m iris")
    _say(text.table(reg.state("iris"), [("job_id", "JOB"), ("state", "STATE"), ("args", "ARGS")]))
    _say("\n$ starchart expose -m iris")
    result = reg.expose("iris", TRAINER)
    for v in result["exposed"]:
        _say(f"  exposed {v['name']} (accuracy {v['metrics'].get('accuracy', float('nan')):.3f})")
    versions = reg.versions("iris")
    _say(text.table(versions["versions"], [("name", "VERSION"), ("is_default", "DEFAULT"), ("metrics", "METRICS")]))

    candidate = versions["versions"][0]["name"]
    _say(f"\n$ starchart promote iris {candidate} --reason 'more epochs'   (as {REQUESTER})")
    req = reg.promote("iris", candidate, REQUESTER, "more epochs")
    _say("\n".join(text.request_lines(req)))
    _say("\n$ starchart diff iris")
    _say("\n".join(text.diff_lines(req["diff"])))

    for who in (REQUESTER, TRAINER):
        _say(f"\n$ starchart approve {req['id']}   (as {who})")
        try:
            reg.decide(req["id"], who, True)
            _say("  unexpectedly accepted")
            return 1
        except Refused as exc:
            _say(f"  refused: {exc.message}")

    _say(f"\n$ starchart approve {req['id']}   (as {APPROVER})")
    reg.decide(req["id"], APPROVER, True)
    req = reg.apply_request(req["id"], actor=APPROVER)
    _say("\n".join(text.request_lines(req)))
    if req["state"] != "applied":
        return 1
    _say(f"\nDefault of iris is now {reg.default_version('iris')} (served by the local backend: "
         f"{reg.backend.current_default('iris')})")
    _say("\n$ starchart audit iris")
    events = reg.audit_events(model="iris", limit=30)
    _say(text.table(reversed(events), [("at", "TIME"), ("action", "ACTION"), ("actor", "ACTOR"),
                                       ("version", "VERSION"), ("request_id", "REQUEST")]))
    check = reg.verify_audit()
    _say(f"\n$ starchart audit verify\n  {'OK' if check.ok else 'BROKEN'}: {check.events} events"
         + (f" — {check.problem}" if check.problem else ""))
    _say(f"\nModel file: {reg.config.model_files / 'iris.yaml'}")
    return 0 if check.ok else 1
