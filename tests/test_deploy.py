"""Heroku's conventions and the single machine: `postgres://` URLs, `starchart db upgrade` as the release step,
processes that refuse an old schema instead of migrating it, and `serve --with-worker`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, replay_args, train_and_wait, write_config
from fakes.slack_fake import SlackFake
from sqlalchemy import select, text, update
from test_slack_http import CHANNEL, SECRET, Server, message_with, registry

from model_registry.adapters.db import SCHEMA_HEAD, alembic_config, current_revision, make_engine


def heroku_url(url: str) -> str:
    """The same database as Heroku writes its DATABASE_URL: postgres://, no driver."""
    assert url.startswith("postgresql+psycopg://")
    return "postgres://" + url.removeprefix("postgresql+psycopg://")


def starchart(env: dict[str, str], *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bot.cli", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture
def env(tmp_path: Path, replay_trainers: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    config = write_config(home, replay_trainers)
    return {**os.environ, "STARCHART_HOME": str(home), "STARCHART_CONFIG": str(config), "PYTHONPATH": str(ROOT)}


def test_a_heroku_postgres_url_is_used_as_it_is(empty_pg_url: str) -> None:
    engine = make_engine(heroku_url(empty_pg_url))
    assert (engine.dialect.name, engine.dialect.driver) == ("postgresql", "psycopg")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT current_database()")).scalar() == empty_pg_url.rsplit("/", 1)[1]
    engine.dispose()
    with_query = make_engine(heroku_url(empty_pg_url) + "?sslmode=disable&application_name=starchart")
    assert with_query.url.query == {"sslmode": "disable", "application_name": "starchart"}
    with with_query.connect() as conn:
        assert conn.execute(text("SHOW application_name")).scalar() == "starchart"
    with_query.dispose()


def test_db_upgrade_migrates_once_and_says_what_it_did(empty_pg_url: str, env: dict[str, str]) -> None:
    env = {**env, "DATABASE_URL": heroku_url(empty_pg_url)}
    first = starchart(env, "db", "upgrade")
    assert first.returncode == 0, first.stderr
    database = heroku_url(empty_pg_url).replace("postgres://", "postgresql+psycopg://")
    assert first.stdout.strip() == f"{database}: migrated the schema from an empty database to revision {SCHEMA_HEAD}"
    again = starchart(env, "db", "upgrade")
    assert again.returncode == 0 and again.stdout.strip().endswith(
        f"the schema is at revision {SCHEMA_HEAD}, the newest: nothing to do")
    assert json.loads(starchart(env, "--json", "db", "upgrade").stdout) == {
        "database": database, "from": SCHEMA_HEAD, "to": SCHEMA_HEAD}
    # the other processes now start: a command on Heroku's URL
    verified = starchart(env, "audit", "verify")
    assert verified.returncode == 0, verified.stderr
    assert "OK" in verified.stdout


def test_db_upgrade_from_an_older_revision(empty_pg_url: str, env: dict[str, str]) -> None:
    from alembic import command

    engine = make_engine(empty_pg_url)
    command.upgrade(alembic_config(engine), "0003")
    done = starchart({**env, "DATABASE_URL": empty_pg_url}, "db", "upgrade")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(f"migrated the schema from revision 0003 to revision {SCHEMA_HEAD}")
    assert current_revision(engine) == SCHEMA_HEAD
    engine.dispose()


PROCESSES = [("command", ["versions", "iris"]), ("worker", ["worker", "--once"]), ("clock", ["clock", "--once"]),
             ("serve", ["serve", "--port", "0"]), ("socket", ["socket"]), ("console", ["console"])]


def refused(env: dict[str, str], argv: list[str]) -> str:
    env = {**env, "SLACK_BOT_TOKEN": "xoxb-test", "SLACK_SIGNING_SECRET": SECRET, "SLACK_APP_TOKEN": "xapp-test",
           "SLACK_API_URL": "http://127.0.0.1:9/api/"}
    done = starchart(env, *argv)
    assert done.returncode == 1, (argv, done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    return done.stderr


def test_processes_refuse_an_empty_postgres_database(empty_pg_url: str, env: dict[str, str]) -> None:
    env = {**env, "DATABASE_URL": heroku_url(empty_pg_url)}
    for name, argv in PROCESSES:
        said = refused(env, argv)
        assert "has no StarChart schema yet" in said and "run `starchart db upgrade`" in said, (name, said)
        assert "hint:" in said, (name, said)
    engine = make_engine(empty_pg_url)
    assert current_revision(engine) is None, "nothing migrated it"
    engine.dispose()


def test_processes_refuse_an_older_schema_and_a_newer_one(empty_pg_url: str, env: dict[str, str]) -> None:
    from alembic import command

    env = {**env, "DATABASE_URL": empty_pg_url}
    engine = make_engine(empty_pg_url)
    command.upgrade(alembic_config(engine), "0003")
    for name, argv in PROCESSES:
        said = refused(env, argv)
        assert f"is at schema revision 0003; this release needs revision {SCHEMA_HEAD}" in said, (name, said)
        assert "run `starchart db upgrade`" in said, (name, said)
    assert current_revision(engine) == "0003", "no process migrated it"
    with engine.begin() as conn:  # as a newer release would leave it
        conn.execute(text("UPDATE alembic_version SET version_num = '0999'"))
    for argv in (["versions", "iris"], ["db", "upgrade"]):
        said = refused(env, argv)
        assert "at schema revision 0999, which this release does not know" in said, said
    assert current_revision(engine) == "0999"
    engine.dispose()


def test_sqlite_is_still_migrated_when_a_process_starts(env: dict[str, str], tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'laptop.db'}"
    done = starchart({**env, "DATABASE_URL": url}, "audit", "verify")
    assert done.returncode == 0, done.stderr
    engine = make_engine(url)
    assert current_revision(engine) == SCHEMA_HEAD
    engine.dispose()


def test_serve_with_worker_runs_the_worker_and_the_clock(tmp_path: Path, replay_trainers: Path,
                                                         trained: dict[str, Path]) -> None:
    """One process: the clock starts a scheduled retrain, the worker follows it, exposes it and posts its review
    card — with no `starchart worker` or `starchart clock` running, over real HTTP to a Slack fake."""
    from model_registry.adapters.records import Job, Schedule
    from model_registry.domain.names import utcnow

    home = tmp_path / "home"
    home.mkdir()
    config = write_config(home, replay_trainers, defaults={"channel": CHANNEL, "approvers": ["U0ERIN"]},
                          models={"iris": {"auto_expose": True, "auto_review": True}})
    with SlackFake(channels={CHANNEL: "ml-review"}) as slack:
        env = {**os.environ, "SLACK_BOT_TOKEN": slack.token, "SLACK_SIGNING_SECRET": SECRET,
               "SLACK_API_URL": slack.base_url, "STARCHART_HOME": str(home), "STARCHART_CONFIG": str(config),
               "DATABASE_URL": f"sqlite:///{home / 'starchart.db'}", "STARCHART_FOLLOW_INTERVAL": "0.1"}
        reg: Any = registry(env)
        try:
            first = train_and_wait(reg, "iris", "U0ALICE", replay_args(trained["iris_a"]))
            assert first["state"] == "SUCCEEDED", first
            default = reg.versions.expose("iris", "U0ALICE")["exposed"][0]["name"]
            reg.schedules.set("iris", "* * * * *", "U0ALICE", args=replay_args(trained["iris_b"], "--epochs=4"))
            with reg.db.unit_of_work() as s:  # set two minutes ago: its firing is due now, not at the next minute
                s.execute(update(Schedule).values(updated_at=utcnow() - timedelta(minutes=2)))
            server = Server(env, tmp_path / "serve.log", "--with-worker")
            try:
                _key, card = message_with(slack, "Review: iris", timeout=90)
                with reg.db.reads() as s:  # the records as the passes left them (reading them refreshes nothing)
                    jobs = s.execute(select(Job.requested_by, Job.state, Job.version_name)
                                     .where(Job.model == "iris").order_by(Job.ts)).all()
                assert [tuple(j) for j in jobs][0][:2] == ("U0ALICE", "SUCCEEDED")
                by, state, version = jobs[1]
                assert (by, state) == ("schedule:iris", "SUCCEEDED") and version, jobs
                assert version in json.dumps(card) and reg.versions.default("iris") == default
                opened = reg.promotions.of_model("iris", open_only=True)
                assert [(r["candidate"], r["requested_by"]) for r in opened] == [(version, "schedule:iris")]
                log = (tmp_path / "serve.log").read_text()
                # two gunicorn workers, one of them runs the passes
                assert log.count("the worker and the clock run in this web process") == 1, log[-3000:]
                assert "scheduled training iris_" in log
            finally:
                server.stop()
        finally:
            reg.close()


def test_a_start_on_the_newest_schema_does_not_load_alembic(db_url: str) -> None:
    """The check every start makes is one query: Alembic (0.1 s to import) loads only when the schema differs."""
    code = ("import sys; from model_registry.adapters.db import check_database; check_database(sys.argv[1]); "
            "check_database(sys.argv[1]); print(sorted(m for m in sys.modules if m.split('.')[0] == 'alembic'))")
    done = subprocess.run([sys.executable, "-c", code, db_url], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    if db_url.startswith("sqlite"):  # the first start migrated the new file; Alembic was needed for that
        assert "'alembic'" in done.stdout
        done = subprocess.run([sys.executable, "-c", code, db_url], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
    assert done.stdout.strip() == "[]", done.stdout
