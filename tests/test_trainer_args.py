"""Trainer arguments under policy (`args_allowed`, `data_roots`), the local trainer's clean environment, and log
tails capped before they go to Slack."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURES, ROOT, read_json, write_config
from sqlalchemy import func, select

from model_registry.adapters.records import Job, Schedule
from model_registry.adapters.trainer_flags import declared_flags
from model_registry.config import ProjectConfig
from model_registry.domain import names
from model_registry.domain.errors import InvalidInput
from model_registry.domain.trainer_args import check_trainer_args
from model_registry.services.jobs import LOG_TAIL_CHARS, cap_log_tail

SECRETS = ("SLACK_BOT_TOKEN", "SLACK_SIGNING_SECRET", "DATABASE_URL", "STARCHART_AUDIT_KEY")
TP = "/srv/bucket/iris/20260101000000"


def refusal(args: list[str], allowed: list[str] | None = None, roots: tuple[str, ...] = ("/srv/ml-data",
                                                                                           "gs://my-ml-data/")) -> str:
    with pytest.raises(InvalidInput) as caught:
        check_trainer_args("iris", args, allowed=allowed, data_roots=roots, train_path=TP)
    return caught.value.message


def test_flags_outside_args_allowed_are_refused_with_the_allowed_ones() -> None:
    message = refusal(["--epochs=3", "--job-dir=/srv/ml-data/x"], allowed=["--epochs", "--learning_rate"])
    assert message == "`--job-dir` is not a flag you may pass to iris: allowed are --epochs, --learning_rate"
    assert "allowed are none" in refusal(["--epochs=3"], allowed=[])
    check_trainer_args("iris", ["--epochs", "3", "--learning_rate", "-0.5"], allowed=["--epochs", "--learning_rate"],
                       data_roots=(), train_path=TP)  # values, negative numbers included, are not flags


@pytest.mark.parametrize("arg, why", [
    ("--train_data=/etc/passwd", "outside the data roots"),
    ("--job-dir=/some/dir", "outside the data roots"),
    ("--train_data=/srv/ml-data/../../etc/passwd", "`..` is not allowed"),
    (f"--job-dir={TP}/../20250101000000", "`..` is not allowed"),
    ("--train_data=gs://my-ml-data-other/x.csv", "outside the data roots"),
    ("--train_data=gs://other-bucket/my-ml-data/x.csv", "outside the data roots"),
    ("--train_data=gs://my-ml-data/../secret/x.csv", "`..` is not allowed"),
    ("--train_data=data/../x.csv", "`..` is not allowed"),
    ("--train_data=some/relative.csv", "must be absolute"),
    ("--train_data=/srv/ml-data-evil/x.csv", "outside the data roots"),
    ("--files=/srv/ml-data/a.csv,/etc/shadow", "outside the data roots"),
    ("/etc/passwd", "outside the data roots"),  # a positional path
    ("--train_data=file:///etc/passwd", "outside the data roots"),
    ("-s/etc/passwd", "outside the data roots"),  # argparse reads a short option's attached value
    ("-s=/etc/passwd", "must be absolute"),
    ("@/etc/passwd", "must be absolute"),  # an argparse arguments file
])
def test_paths_must_lie_under_the_data_roots_or_the_train_path(arg: str, why: str) -> None:
    assert why in refusal(["--epochs=1", arg])


def test_a_relative_train_path_is_the_jobs_own() -> None:
    check_trainer_args("iris", ["--job-dir=bucket/iris/20260101000000/out"], allowed=None, data_roots=(),
                       train_path="bucket/iris/20260101000000")


def test_paths_under_the_roots_and_the_train_path_pass() -> None:
    check_trainer_args("iris", [
        "--train_data=/srv/ml-data/iris/train.csv", "--eval", "gs://my-ml-data/iris/eval.csv",
        f"--job-dir={TP}", f"--checkpoints={TP}/ckpt/", "--files=/srv/ml-data/a.csv,/srv/ml-data/b.csv",
        "--hidden_units=16,8", "--learning_rate=.01", "--name=iris.csv",
    ], allowed=None, data_roots=("/srv/ml-data", "gs://my-ml-data/"), train_path=TP)


def test_policy_keys_are_validated_at_load(tmp_path: Path) -> None:
    def load(**models: Any) -> ProjectConfig:
        return ProjectConfig.load(write_config(tmp_path, tmp_path, models={"iris": models}))

    for bad, says in [({"args_allowed": "--epochs"}, "must be a list"),
                      ({"args_allowed": ["epochs"]}, "lists flags such as --epochs"),
                      ({"trainer_env": ["SLACK_BOT_TOKEN"]}, "may not hand the bot's secrets"),
                      ({"trainer_env": ["DATABASE_URL"]}, "may not hand the bot's secrets"),
                      ({"trainer_env": ["NOT A NAME"]}, "environment variable names"),
                      ({"data_roots": ["gs://b/../c"]}, "may not contain `..`")]:
        with pytest.raises(InvalidInput, match="invalid policy for model 'iris'") as caught:
            load(**bad)
        assert says in caught.value.message, caught.value.message
    with pytest.raises(InvalidInput, match="invalid defaults: `trainer_env` may not hand the bot's secrets"):
        ProjectConfig.load(write_config(tmp_path, tmp_path, defaults={"trainer_env": ["SLACK_APP_TOKEN"]}))
    policy = load(data_roots=["data", "gs://my-ml-data/"], args_allowed=["--epochs"],
                  trainer_env=["GOOGLE_APPLICATION_CREDENTIALS"]).policy("iris")
    assert policy.data_roots == (str((tmp_path / "data").resolve()), "gs://my-ml-data/"), "relative to the file"
    assert policy.args_allowed == ("--epochs",) and policy.trainer_env == ("GOOGLE_APPLICATION_CREDENTIALS",)
    assert load().policy("iris").args_allowed is None


def training_rows(reg: Any) -> int:
    with reg.db.reads() as s:
        return int(s.execute(select(func.count()).select_from(Job)).scalar_one())


def test_refused_arguments_change_nothing(make_registry: Any, sqlite_url: str, trained: dict) -> None:
    reg = make_registry(sqlite_url, models={"iris": {"args_allowed": ["--epochs", "--learning_rate", "--source"]}})
    with pytest.raises(InvalidInput) as caught:
        reg.jobs.train("iris", "U_T", args=["--job-dir=/some/dir"])
    assert caught.value.message == ("`--job-dir` is not a flag you may pass to iris: allowed are --epochs, "
                                    "--learning_rate, --source")
    with pytest.raises(InvalidInput, match="outside the data roots"):
        reg.jobs.train("iris", "U_T", args=["--source=/etc"])
    with pytest.raises(InvalidInput, match="`..` is not allowed"):
        reg.jobs.train("iris", "U_T", args=["--source=TRAIN_PATH/../../../etc"])
    assert training_rows(reg) == 0
    assert reg.audit.events(action="training.requested") == []
    job = reg.jobs.wait(reg.jobs.train("iris", "U_T", args=[f"--source={trained['iris_a']}", "--epochs=2"])["job_id"],
                        timeout=120)
    assert job["state"] == "SUCCEEDED", job


def test_configured_args_skip_args_allowed_but_not_the_data_roots(make_registry: Any, sqlite_url: str,
                                                                   trained: dict) -> None:
    reg = make_registry(sqlite_url, models={
        "iris": {"args": [f"--source={trained['iris_a']}", "--job-dir=TRAIN_PATH"], "args_allowed": ["--epochs"]},
        "other": {"args": ["--source=/etc"]},
    })
    job = reg.jobs.wait(reg.jobs.train("iris", "U_T")["job_id"], timeout=120)
    assert job["state"] == "SUCCEEDED" and f"--job-dir={job['train_path']}" in job["args"]
    with pytest.raises(InvalidInput, match="outside the data roots"):
        reg.jobs.train("other", "U_T")
    assert training_rows(reg) == 1


def test_schedules_from_chat_are_checked_and_configured_ones_skip_args_allowed(make_registry: Any,
                                                                               sqlite_url: str,
                                                                               trained: dict) -> None:
    source = f"--source={trained['iris_a']}"
    reg = make_registry(sqlite_url, models={
        "iris": {"args_allowed": ["--epochs"], "schedule": {"cron": "0 3 * * *", "args": [source, "--sleep=0"]}},
        "other": {"args_allowed": ["--epochs", "--source"]},
    })
    with pytest.raises(InvalidInput, match="`--source` is not a flag you may pass to iris"):
        reg.schedules.set("iris", "0 3 * * *", "U_T", [source])
    with pytest.raises(InvalidInput, match="outside the data roots"):
        reg.schedules.set("other", "0 3 * * *", "U_T", ["--source=/etc"])
    with reg.db.reads() as s:
        assert s.execute(select(Schedule)).all() == []
    reg.schedules.sync_configured()
    started = reg.schedules.run_due(now=names.utcnow() + timedelta(days=2))
    assert [job["model"] for job in started] == ["iris"], "starchart.yaml's schedule args are the operators'"


def probe_registry(make_registry: Any, sqlite_url: str, tmp_path: Path, replay_trainers: Path, **config: Any) -> Any:
    shutil.copytree(FIXTURES / "trainers" / "envprobe", replay_trainers / "probe")
    return make_registry(sqlite_url, **config)


def test_the_trainers_environment_checked_from_inside_a_trainer(make_registry: Any, sqlite_url: str,
                                                                tmp_path: Path, replay_trainers: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SECRETS:
        monkeypatch.setenv(name, f"secret-{name.lower()}")
    monkeypatch.setenv("PROBE_LISTED", "listed")
    monkeypatch.setenv("PROBE_UNLISTED", "unlisted")
    reg = probe_registry(make_registry, sqlite_url, tmp_path, replay_trainers,
                         models={"probe": {"trainer_env": ["PROBE_LISTED"]}})
    report = tmp_path / "report.json"
    job = reg.jobs.wait(reg.jobs.train("probe", "U_T", args=[f"--report={report}", "--lines=400"])["job_id"],
                        timeout=120)
    seen = read_json(report)
    for where in ("env", "parent_env"):  # the trainer, and the runner it could read as the same user
        assert not set(SECRETS) & set(seen[where]), (where, seen[where])
        assert "PROBE_UNLISTED" not in seen[where]
        assert "PROBE_LISTED" in seen[where] and "PATH" in seen[where]
    assert seen["values"]["PROBE_LISTED"] == "listed"
    assert seen["values"]["AIP_MODEL_DIR"] == f"{job['train_path']}/model/"
    assert not any("secret-" in value for value in seen["values"].values())
    # the failed-training message and /ml logs take a capped tail, saying it was cut
    assert job["state"] == "FAILED" and "earlier line(s) cut" in job["error"]
    assert len(job["error"]) < LOG_TAIL_CHARS + 200
    log = reg.jobs.logs(job["job_id"], tail=1000)
    assert "earlier line(s) cut" in log and len(log) <= LOG_TAIL_CHARS + 100 and log.endswith("row,of,a,csv,")


def test_cap_log_tail() -> None:
    assert cap_log_tail("short\nlog") == "short\nlog"
    text = "\n".join(f"line {i} " + "x" * 90 for i in range(100))
    capped = cap_log_tail(text, 1000)
    assert capped.startswith("… ") and "earlier line(s) cut" in capped
    kept = capped.split("\n", 1)[1]
    assert len(kept) <= 1000 and text.endswith(kept) and kept.startswith("line ")


def test_the_example_configuration_names_operators_and_puts_arguments_under_policy() -> None:
    config = ProjectConfig.load(ROOT / "starchart.yaml")
    for model in ("iris", "sentiment"):
        policy = config.policy(model)
        assert policy.operators and policy.data_roots and policy.args_allowed
        assert "--job-dir" not in policy.args_allowed and "--epochs" in policy.args_allowed


def test_args_allowed_declared_takes_the_trainers_own_flags(make_registry: Any, sqlite_url: str,
                                                            trained: dict) -> None:
    shipped = declared_flags(ROOT / "trainers" / "iris", "trainer.task")
    assert {"--epochs", "--learning_rate", "--hidden_units", "--train_data", "--job-dir"} <= set(shipped)
    reg = make_registry(sqlite_url, models={"iris": {"args_allowed": "declared"}})
    assert reg.config.policy("iris").args_declared and reg.config.policy("iris").args_allowed is None
    with pytest.raises(InvalidInput, match=r"`--run` is not a flag you may pass to iris: allowed are --source, --crash"):
        reg.jobs.train("iris", "U_T", args=["--run=a"])
    with pytest.raises(InvalidInput, match="outside the data roots"):
        reg.jobs.train("iris", "U_T", args=["--job-dir=/some/dir"])  # declared, but the path is checked
    assert training_rows(reg) == 0
    job = reg.jobs.wait(reg.jobs.train("iris", "U_T", args=[f"--source={trained['iris_a']}", "--epochs=2"])["job_id"],
                        timeout=120)
    assert job["state"] == "SUCCEEDED", job
