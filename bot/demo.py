"""`starchart demo`: the whole StarChart flow on a fresh temporary home, shown as the console renders Slack.

Three people take part: a trainer, a requester and an approver; at the end the new default answers a
prediction. Nothing needs setting up: the local
backend trains for real, SQLite records, and the same handlers Slack drives render the messages.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml

from bot.console import Console
from handlers.reviews import APPROVE
from model_registry.config import ProjectConfig, Settings

PROJECT = Path(__file__).resolve().parents[1]
TRAINER, REQUESTER, APPROVER = "U0TRAINER", "U0REQUESTER", "U0APPROVER"


def run_demo(home: Path | None = None, epochs: tuple[int, int] = (3, 10)) -> int:
    from model_registry.adapters.backends.local import LocalBackend
    from model_registry.bootstrap import bootstrap

    home = home or Path(tempfile.mkdtemp(prefix="starchart-demo-"))
    config_path = home / "starchart.yaml"
    config_path.write_text(yaml.safe_dump({
        "trainer_base": str(PROJECT / "trainers"),
        "model_files": "models",
        "defaults": {"approvers": [APPROVER, REQUESTER, TRAINER], "required_approvals": 1,
                     "allow_self_approval": False, "request_expiry": "72h"},
        # the card's evidence: candidate and default evaluated on the iris trainer's held-out rows
        "models": {"iris": {"evaluation": {"data": str(PROJECT / "trainers" / "iris" / "trainer" / "data" /
                                                       "iris_eval.csv"), "label": "species", "output": "class_ids"}}},
    }))
    env = {**os.environ, "STARCHART_HOME": str(home), "STARCHART_CONFIG": str(config_path),
           "STARCHART_BACKEND": "local", "DATABASE_URL": f"sqlite:///{home / 'starchart.db'}"}
    reg = bootstrap(Settings.from_env(env), ProjectConfig.load(config_path))
    local = reg.backend
    assert isinstance(local, LocalBackend)  # STARCHART_BACKEND=local above: its model server stops with the demo
    console = Console(reg, TRAINER, follow_interval=0.5)

    def type_(user: str, line: str) -> None:
        if console.user != user:
            console.handle(f"/as {user}")
        console.write(f"\n{user}> {line}")
        console.handle(line)

    def click_approve(user: str) -> None:
        number = max(i for i, b in enumerate(console.buttons, start=1) if b[0] == APPROVE)
        type_(user, str(number))

    console.write(f"StarChart demo — home {home} (local backend, SQLite); Slack messages rendered as the "
                  f"console shows them")
    type_(TRAINER, f"/ml train iris -- --epochs={epochs[0]} --learning_rate=0.01")
    type_(TRAINER, f"/ml train iris -- --epochs={epochs[1]} --learning_rate=0.02")
    if any(j["state"] != "SUCCEEDED" for j in reg.jobs.state("iris")):
        console.write("a training failed; see above")
        return 1
    type_(TRAINER, "/ml state iris")
    type_(TRAINER, "/ml expose iris")
    type_(TRAINER, "/ml versions iris")
    candidate = reg.versions.of_model("iris")["versions"][0]["name"]
    type_(REQUESTER, f"/ml promote iris {candidate} --reason \"more epochs\"")
    type_(REQUESTER, "/ml diff iris")
    click_approve(REQUESTER)  # refused: the requester may not approve
    click_approve(TRAINER)    # refused: nor may whoever trained the candidate
    click_approve(APPROVER)   # a second person: approved, then applied
    type_(APPROVER, "/ml versions iris")
    # what services get now: the new default answers (the local model server starts on this first prediction)
    try:
        type_(APPROVER, '/ml predict iris {"sepal_length": 6.1, "sepal_width": 2.8, "petal_length": 4.7, '
                        '"petal_width": 1.2}')
    finally:
        local.stop_server()
    type_(APPROVER, "/ml audit iris --limit 20")
    type_(APPROVER, "/ml audit verify")
    switched = reg.versions.default("iris") == candidate and reg.backend.current_default("iris") == candidate
    console.write(f"\nDefault of iris: {reg.versions.default('iris')} (local server: "
                  f"{reg.backend.current_default('iris')}). Model file: {reg.config.model_files / 'iris.yaml'}")
    return 0 if switched and reg.audit.verify().ok else 1
