"""Schema migrations on both databases, and the import boundaries DESIGN.md sets."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import ROOT
from sqlalchemy import inspect

from model_registry.adapters.db import SCHEMA_HEAD, alembic_config, make_engine, migrate


def test_schema_head_constant_matches_alembic(sqlite_url: str) -> None:
    from alembic.script import ScriptDirectory

    engine = make_engine(sqlite_url)
    assert ScriptDirectory.from_config(alembic_config(engine)).get_current_head() == SCHEMA_HEAD


def test_migrations_create_the_schema_and_are_idempotent(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    migrate(engine)
    migrate(engine)  # a second start is a no-op
    tables = set(inspect(engine).get_table_names())
    assert {"jobs", "versions", "models", "promotion_requests", "approvals", "audit_events", "audit_head",
            "schedules", "alembic_version"} <= tables
    uniques = {tuple(u["column_names"]) for u in inspect(engine).get_unique_constraints("approvals")}
    assert ("request_id", "approver") in uniques
    engine.dispose()


_JOB_ROW = ("INSERT INTO jobs (job_id, model, ts, state, module, args, workers, package_uris, train_path, backend, "
            "requested_by, created_at, started_at, ended_at) VALUES ('iris_20261127093000', 'iris', "
            "'20261127093000', 'SUCCEEDED', 'trainer.task', '[]', 1, '[]', '/t', 'local', 'U1', :c, :c, NULL)")
_VERSION_ROW = ("INSERT INTO versions (model, name, job_id, deployment_uri, created_at, trained_by, exposed_by, "
                "program, args, metrics, signature, job, digest) VALUES ('iris', 'v20261127093000', "
                "'iris_20261127093000', '/t/model/', :c, 'U1', 'U1', '{}', '[]', '{}', '{}', '{}', 'd')")
_TIMES = ("SELECT j.created_at, j.started_at, j.ended_at, v.created_at FROM jobs j JOIN versions v ON v.job_id = "
          "j.job_id")


def test_job_and_version_times_stored_before_0002_are_rewritten_as_iso_text(empty_db_url: str) -> None:
    """0002: on SQLite, job and version times became ISO UTC text; PostgreSQL's timestamps stayed as they were."""
    from datetime import datetime

    from alembic import command
    from sqlalchemy import text

    engine = make_engine(empty_db_url)
    command.upgrade(alembic_config(engine), "0001")
    old = "2026-11-27 09:30:00.654321"
    with engine.begin() as conn:  # rows as a 0001 database held them (SQLAlchemy's default SQLite text)
        conn.execute(text(_JOB_ROW), {"c": old})
        conn.execute(text(_VERSION_ROW), {"c": old})
    command.upgrade(alembic_config(engine), "0002")
    with engine.connect() as conn:
        got = tuple(conn.execute(text(_TIMES)).one())
    if engine.dialect.name == "sqlite":
        assert got == ("2026-11-27T09:30:00Z", "2026-11-27T09:30:00Z", None, "2026-11-27T09:30:00Z")
    else:
        at = datetime(2026, 11, 27, 9, 30, 0, 654321)
        assert got == (at, at, None, at)
    if engine.dialect.name == "sqlite":  # and back: SQLAlchemy's default text again (the fraction is gone)
        command.downgrade(alembic_config(engine), "0001")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT created_at, ended_at FROM jobs")).one() == ("2026-11-27 09:30:00.000000",
                                                                                       None)
    engine.dispose()


def test_job_and_version_times_stored_by_0002_become_plain_datetimes_again(empty_db_url: str) -> None:
    """0003: every time is a plain DateTime again; SQLite's ISO text of 0002 is rewritten, and back on downgrade."""
    from datetime import datetime

    from alembic import command
    from sqlalchemy import select, text

    from model_registry.adapters.db import current_revision
    from model_registry.adapters.records import Job, Version
    from model_registry.domain.names import iso

    engine = make_engine(empty_db_url)
    command.upgrade(alembic_config(engine), "0002")
    with engine.begin() as conn:  # rows as a 0002 database held them (ISO text on SQLite, timestamps on PostgreSQL)
        conn.execute(text(_JOB_ROW), {"c": "2026-11-27T09:30:00Z"})
        conn.execute(text(_VERSION_ROW), {"c": "2026-11-27T09:30:00Z"})
    command.upgrade(alembic_config(engine), "0003")  # 0003 itself (later migrations add tables, not times)
    assert current_revision(engine) == "0003"
    at = datetime(2026, 11, 27, 9, 30)
    with engine.connect() as conn:
        got = conn.execute(select(Job.created_at, Job.started_at, Job.ended_at, Version.created_at)
                           .join(Version, Version.job_id == Job.job_id)).one()
        assert tuple(got) == (at, at, None, at) and got[0].tzinfo is None and got[3].tzinfo is None
        assert [iso(t) for t in got] == ["2026-11-27T09:30:00Z", "2026-11-27T09:30:00Z", None, "2026-11-27T09:30:00Z"]
        # compared as stored: ISO text left on SQLite ('T' after ' ') would fall outside this range
        assert conn.execute(select(Job.job_id).where(Job.created_at <= at)).scalars().all() == ["iris_20261127093000"]
        raw = tuple(conn.execute(text(_TIMES)).one())
    if engine.dialect.name == "sqlite":
        assert raw == ("2026-11-27 09:30:00.000000", "2026-11-27 09:30:00.000000", None, "2026-11-27 09:30:00.000000")
    else:
        assert raw == (at, at, None, at)
    command.downgrade(alembic_config(engine), "0002")
    with engine.connect() as conn:
        raw = tuple(conn.execute(text(_TIMES)).one())
    if engine.dialect.name == "sqlite":  # 0002's ISO text again
        assert raw == ("2026-11-27T09:30:00Z", "2026-11-27T09:30:00Z", None, "2026-11-27T09:30:00Z")
    else:  # nothing to undo on PostgreSQL
        assert raw == (at, at, None, at)
    engine.dispose()


def test_0004_adds_the_seen_requests_table_and_takes_it_away_again(empty_db_url: str) -> None:
    """0004: a 0003 database gains seen_requests (signature primary key, seen_at indexed); downgrade drops it."""
    from datetime import datetime

    from alembic import command
    from sqlalchemy import text
    from sqlalchemy.exc import IntegrityError

    from model_registry.adapters.db import current_revision

    engine = make_engine(empty_db_url)
    command.upgrade(alembic_config(engine), "0003")
    assert "seen_requests" not in inspect(engine).get_table_names()
    command.upgrade(alembic_config(engine), "0004")  # 0004 itself (later migrations add other tables)
    assert current_revision(engine) == "0004"
    assert inspect(engine).get_pk_constraint("seen_requests")["constrained_columns"] == ["signature"]
    assert [i["column_names"] for i in inspect(engine).get_indexes("seen_requests")] == [["seen_at"]]
    insert = text("INSERT INTO seen_requests (signature, seen_at) VALUES ('v0=ab', :at)")
    with engine.begin() as conn:
        conn.execute(insert, {"at": datetime(2026, 12, 1, 14, 0)})
    with pytest.raises(IntegrityError), engine.begin() as conn:  # a signature is taken once
        conn.execute(insert, {"at": datetime(2026, 12, 1, 14, 1)})
    command.downgrade(alembic_config(engine), "0003")
    assert "seen_requests" not in inspect(engine).get_table_names()
    engine.dispose()


def test_0005_adds_the_apply_lease_columns_and_takes_them_away_again(empty_db_url: str) -> None:
    """0005: promotion_requests gains apply_owner and apply_lease_until (both empty on the rows it had, which the
    rules read as an apply with no live owner); downgrade drops them and keeps the rows."""
    from datetime import datetime

    from alembic import command
    from sqlalchemy import select, text, update

    from model_registry.adapters.db import current_revision
    from model_registry.adapters.records import PromotionRequest

    engine = make_engine(empty_db_url)
    command.upgrade(alembic_config(engine), "0004")
    before = {c["name"] for c in inspect(engine).get_columns("promotion_requests")}
    assert not {"apply_owner", "apply_lease_until"} & before
    at = datetime(2026, 12, 8, 10, 0)
    with engine.begin() as conn:  # an apply a 0004 process left running
        conn.execute(text(
            "INSERT INTO promotion_requests (model, kind, candidate_version, base_version, candidate_digest, "
            "card_digest, diff, requested_by, state, required_approvals, created_at, expires_at, apply_started_at) "
            "VALUES ('iris', 'promote', 'v20261208100000', NULL, 'd', 'c', '{}', 'U1', 'applying', 1, :at, :at, :at)"),
            {"at": at})
    command.upgrade(alembic_config(engine), "0005")  # 0005 itself (0006 adds the outbox)
    assert current_revision(engine) == "0005"
    columns = {c["name"]: c for c in inspect(engine).get_columns("promotion_requests")}
    assert columns["apply_owner"]["nullable"] and columns["apply_lease_until"]["nullable"]
    with engine.begin() as conn:
        row = conn.execute(select(PromotionRequest.state, PromotionRequest.apply_owner,
                                  PromotionRequest.apply_lease_until)).one()
        assert tuple(row) == ("applying", None, None)
        conn.execute(update(PromotionRequest).values(apply_owner="host:1:ab", apply_lease_until=at))
        assert conn.execute(select(PromotionRequest.apply_lease_until)).scalar_one() == at
    command.downgrade(alembic_config(engine), "0004")
    after = {c["name"] for c in inspect(engine).get_columns("promotion_requests")}
    assert after == before
    with engine.connect() as conn:
        assert conn.execute(text("SELECT state FROM promotion_requests")).scalar_one() == "applying"
    engine.dispose()


def test_0006_adds_the_outbox_and_takes_it_away_again(empty_db_url: str) -> None:
    """0006 (after 0005): the outbox table, one message per (kind, subject), due messages indexed; downgrade drops
    it and leaves the earlier tables."""
    from datetime import datetime

    from alembic import command
    from sqlalchemy import text
    from sqlalchemy.exc import IntegrityError

    from model_registry.adapters.db import current_revision

    engine = make_engine(empty_db_url)
    command.upgrade(alembic_config(engine), "0005")
    assert "outbox" not in inspect(engine).get_table_names()
    command.upgrade(alembic_config(engine), "0006")  # 0006 itself (0007 adds the requests' approval rules)
    assert current_revision(engine) == "0006"
    uniques = {tuple(u["column_names"]) for u in inspect(engine).get_unique_constraints("outbox")}
    assert ("kind", "subject") in uniques
    assert ["next_attempt_at"] in [i["column_names"] for i in inspect(engine).get_indexes("outbox")]
    insert = text("INSERT INTO outbox (kind, subject, channel, payload, wanted, delivered, attempts, next_attempt_at, "
                  "created_at) VALUES ('training', 'iris_20261208100000', 'C1', '{}', 1, 0, 0, :at, :at)")
    with engine.begin() as conn:
        conn.execute(insert, {"at": datetime(2026, 12, 8, 10, 0)})
    with pytest.raises(IntegrityError), engine.begin() as conn:  # one message per record
        conn.execute(insert, {"at": datetime(2026, 12, 8, 10, 1)})
    command.downgrade(alembic_config(engine), "0005")
    tables = set(inspect(engine).get_table_names())
    assert "outbox" not in tables and "seen_requests" in tables
    engine.dispose()


def test_0007_keeps_the_approval_rules_of_a_request_and_takes_them_away_again(empty_db_url: str) -> None:
    """0007 (after 0006): promotion_requests.rules, JSON, NULL for the requests opened before it (the model's policy
    decides those); downgrade drops the column and keeps the requests."""
    from datetime import datetime

    from alembic import command
    from sqlalchemy import select, text, update

    from model_registry.adapters.db import current_revision
    from model_registry.adapters.records import PromotionRequest

    engine = make_engine(empty_db_url)
    command.upgrade(alembic_config(engine), "0006")
    before = {c["name"] for c in inspect(engine).get_columns("promotion_requests")}
    assert "rules" not in before
    at = datetime(2026, 12, 15, 10, 0)
    with engine.begin() as conn:  # a request a 0006 process opened
        conn.execute(text(
            "INSERT INTO promotion_requests (model, kind, candidate_version, base_version, candidate_digest, "
            "card_digest, diff, requested_by, state, required_approvals, created_at, expires_at) "
            "VALUES ('iris', 'promote', 'v20261215100000', NULL, 'd', 'c', '{}', 'U1', 'open', 1, :at, :at)"),
            {"at": at})
    command.upgrade(alembic_config(engine), "0007")  # 0007 itself (0008 adds the canary columns)
    assert current_revision(engine) == "0007"
    assert {c["name"]: c for c in inspect(engine).get_columns("promotion_requests")}["rules"]["nullable"]
    rule = {"when": "breaking_signature", "why": "breaking change: input `x` removed", "required_approvals": 2,
            "approvers": ["S0PLATFORM"], "approved_by": []}
    with engine.begin() as conn:
        assert conn.execute(select(PromotionRequest.rules)).scalar_one() is None
        conn.execute(update(PromotionRequest).values(rules=[rule]))
        assert conn.execute(select(PromotionRequest.rules)).scalar_one() == [rule]
    command.downgrade(alembic_config(engine), "0006")
    assert {c["name"] for c in inspect(engine).get_columns("promotion_requests")} == before
    with engine.connect() as conn:
        assert conn.execute(text("SELECT state FROM promotion_requests")).scalar_one() == "open"
    engine.dispose()


def test_0008_adds_the_canary_columns_after_0007_and_takes_them_away_again(empty_db_url: str) -> None:
    """0008 (after 0007): promotion_requests gains the canary columns, empty on the rows it had (no canary);
    downgrade drops them and keeps the rows."""
    from datetime import datetime

    from alembic import command
    from sqlalchemy import select, text, update

    from model_registry.adapters.db import current_revision
    from model_registry.adapters.records import PromotionRequest

    engine = make_engine(empty_db_url)
    command.upgrade(alembic_config(engine), "0007")
    before = {c["name"] for c in inspect(engine).get_columns("promotion_requests")}
    assert not {c for c in before if c.startswith("canary_")}
    at = datetime(2026, 12, 20, 10, 0)
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO promotion_requests (model, kind, candidate_version, base_version, candidate_digest, "
            "card_digest, diff, requested_by, state, required_approvals, created_at, expires_at) "
            "VALUES ('iris', 'promote', 'v20261220100000', 'v20261219100000', 'd', 'c', '{}', 'U1', 'open', 1, "
            ":at, :at)"), {"at": at})
    command.upgrade(alembic_config(engine), "0008")  # 0008 itself (0009 adds the evaluation)
    assert current_revision(engine) == "0008"
    columns = {c["name"]: c for c in inspect(engine).get_columns("promotion_requests")}
    added = {"canary_percent", "canary_bake_seconds", "canary_started_at", "canary_ended_at", "canary_ended_by",
             "canary_why", "canary_figures"}
    assert added <= set(columns) and all(columns[c]["nullable"] for c in added)
    with engine.begin() as conn:
        assert conn.execute(select(PromotionRequest.canary_percent, PromotionRequest.canary_figures)).one() == (
            None, None)
        conn.execute(update(PromotionRequest).values(canary_percent=10, canary_bake_seconds=1800,
                                                     canary_started_at=at, canary_figures={"mirrored": 3}))
        assert conn.execute(select(PromotionRequest.canary_figures)).scalar_one() == {"mirrored": 3}
    command.downgrade(alembic_config(engine), "0007")
    assert {c["name"] for c in inspect(engine).get_columns("promotion_requests")} == before
    with engine.connect() as conn:
        assert conn.execute(text("SELECT state FROM promotion_requests")).scalar_one() == "open"
    engine.dispose()


def test_0009_keeps_the_evaluation_of_a_request_and_takes_it_away_again(empty_db_url: str) -> None:
    """0009 (after 0008): promotion_requests.evaluation_state (indexed) and .evaluation (JSON), NULL for the
    requests opened before it (their cards say they were not evaluated); downgrade drops both, keeps the requests."""
    from datetime import datetime

    from alembic import command
    from sqlalchemy import select, text, update

    from model_registry.adapters.db import current_revision
    from model_registry.adapters.records import PromotionRequest
    from model_registry.services.views import evaluation_view

    engine = make_engine(empty_db_url)
    command.upgrade(alembic_config(engine), "0008")
    before = {c["name"] for c in inspect(engine).get_columns("promotion_requests")}
    assert not {"evaluation", "evaluation_state"} & before
    at = datetime(2026, 12, 20, 10, 0)
    with engine.begin() as conn:  # a request a 0008 process opened
        conn.execute(text(
            "INSERT INTO promotion_requests (model, kind, candidate_version, base_version, candidate_digest, "
            "card_digest, diff, requested_by, state, required_approvals, created_at, expires_at) "
            "VALUES ('iris', 'promote', 'v20261220100000', NULL, 'd', 'c', '{}', 'U1', 'open', 1, :at, :at)"),
            {"at": at})
    migrate(engine)
    assert current_revision(engine) == SCHEMA_HEAD == "0009"
    columns = {c["name"]: c for c in inspect(engine).get_columns("promotion_requests")}
    assert columns["evaluation"]["nullable"] and columns["evaluation_state"]["nullable"]
    assert "ix_promotion_requests_evaluation_state" in {i["name"] for i in inspect(engine).get_indexes(
        "promotion_requests")}
    done = {"state": "done", "rows": 30, "candidate": {"accuracy": 0.9}, "base": {"accuracy": 0.8},
            "agreement": 0.9, "disagreements": [{"line": 2, "inputs": {"x": 1.0}, "label": 1, "candidate": 1,
                                                 "base": 0}]}
    with engine.begin() as conn:
        stored = conn.execute(select(PromotionRequest.evaluation_state, PromotionRequest.evaluation)).one()
        assert tuple(stored) == (None, None)
        assert evaluation_view(stored[1])["state"] == "not_configured"
        conn.execute(update(PromotionRequest).values(evaluation_state="done", evaluation=done))
        assert conn.execute(select(PromotionRequest.evaluation)).scalar_one() == done
    command.downgrade(alembic_config(engine), "0008")
    assert {c["name"] for c in inspect(engine).get_columns("promotion_requests")} == before
    with engine.connect() as conn:
        assert conn.execute(text("SELECT state FROM promotion_requests")).scalar_one() == "open"
    engine.dispose()


def test_concurrent_migrations_run_once(empty_db_url: str) -> None:
    """Three first starts on SQLite, or three `db upgrade`s on PostgreSQL, at once: one migrates, two find it done."""
    code = ("import sys; from model_registry.adapters.db import upgrade_database; "
            "print(upgrade_database(sys.argv[1])[1])")
    procs = [subprocess.Popen([sys.executable, "-c", code, empty_db_url], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    said = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        said.append(out.strip())
    assert sorted(said) == [f"migrated the schema from an empty database to revision {SCHEMA_HEAD}"] + [
        f"the schema is at revision {SCHEMA_HEAD}, the newest: nothing to do"] * 2, said


def _imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_web_process_never_imports_tensorflow_or_matplotlib(tmp_path) -> None:
    loaded = _imported_after(
        f"import os; os.environ.update(SLACK_BOT_TOKEN='xoxb-t', SLACK_SIGNING_SECRET='s', STARCHART_HOME='{tmp_path}',"
        f" STARCHART_CONFIG='{tmp_path}/none.yaml'); import bot.serve; app = bot.serve.build_wsgi();"
        " app.bot.registry.get(timeout=60)")
    assert not any(m == "tensorflow" or m.startswith("tensorflow.") for m in loaded)
    # charts are drawn in the background (the outbox's sender, a command after its ack), never on the ack path
    assert not any(m == "matplotlib" or m.startswith("matplotlib.") for m in loaded)
    assert "model_registry.services.charts" in loaded
    assert "bot.web" in loaded and "model_registry.bootstrap" in loaded
    # loaded where they are used (a prediction, a schedule, an event file): a worker answering Slack is smaller
    lazy = {"urllib3", "httptools", "croniter", "google_crc32c"}
    assert not loaded & lazy, loaded & lazy


def test_the_web_process_listens_before_the_command_table_and_renderers_load(tmp_path) -> None:
    """Acking needs Bolt and the listeners only: the command table, the results and the renderers load with the
    core, in the background (start to healthy, benchmarks/slack_ack.py). Here the core never finishes loading."""
    loaded = _imported_after(
        f"import os, threading; os.environ.update(SLACK_BOT_TOKEN='xoxb-t', SLACK_SIGNING_SECRET='s',"
        f" STARCHART_HOME='{tmp_path}', STARCHART_CONFIG='{tmp_path}/none.yaml'); from bot.app import create_bot;"
        " from bot.web import WebApp; from model_registry.config import SlackSettings;"
        " app = WebApp(create_bot(SlackSettings.from_env(), build=threading.Event().wait))")
    assert "bot.web" in loaded and "handlers.listeners" in loaded
    late = {"handlers.chat", "handlers.commands", "handlers.results", "bot.slack_output", "bot.blocks", "bot.text",
            "sqlalchemy", "yaml"}
    assert not loaded & late, loaded & late


def test_core_and_cli_never_import_tensorflow_slack_or_google() -> None:
    loaded = _imported_after("import bot.cli, bot.demo, model_registry.bootstrap, model_registry.adapters.backends.local, "
                             "model_registry.adapters.backends.local_serving, model_registry.adapters.tflite_process, "
                             "model_registry.adapters.evaluation_process, model_registry.services.evaluations, "
                             "model_registry.adapters.event_files")
    assert not any(m == "tensorflow" or m.startswith("tensorflow.") or m.startswith("matplotlib") for m in loaded)
    assert not any(m.startswith(("slack_bolt", "slack_sdk")) for m in loaded)
    assert "google.cloud.aiplatform" not in loaded and "google.cloud.storage" not in loaded


def test_the_configuration_checks_vertex_settings_without_google() -> None:
    loaded = _imported_after("import model_registry.config, model_registry.adapters.backends.vertex_settings")
    google = {m for m in loaded if m.startswith("google.")}
    assert google <= {"google.cloud"}, google  # the namespace package alone (a .pth file loads it at start-up)


def test_model_registry_source_has_no_slack_imports() -> None:
    for path in (ROOT / "model_registry").rglob("*.py"):
        text = path.read_text()
        assert "slack_bolt" not in text and "slack_sdk" not in text, path
        google_allowed = path.parent.name == "vertex" or path.name == "gcs.py"  # backends/vertex/, and storage
        if not google_allowed:
            assert "import google.cloud" not in text and "from google.cloud" not in text, path
        # the local model server and the TensorFlow Lite conversion: TensorFlow processes run by file, never imported
        if path.name not in ("local_serving.py", "tflite_process.py", "evaluation_process.py"):
            assert "import tensorflow" not in text, path
            assert "ai_edge_litert" not in text, path


def test_the_core_layers_point_inward() -> None:
    """domain ← adapters ← services ← bootstrap: the rules import no I/O, the adapters no use case."""
    allowed = {
        "domain": {"domain", "config"},
        "adapters": {"adapters", "domain", "config"},
        "services": {"services", "adapters", "domain", "config"},
    }
    for layer, may in allowed.items():
        for path in (ROOT / "model_registry" / layer).rglob("*.py"):
            imported = set(re.findall(r"^\s*(?:from|import) model_registry\.(\w+)", path.read_text(), re.M))
            assert imported <= may, f"{path.relative_to(ROOT)} imports {sorted(imported - may)}"
    config = (ROOT / "model_registry" / "config.py").read_text()
    assert "model_registry.services" not in config and "model_registry.bootstrap" not in config


def test_a_connection_the_server_closed_is_replaced(pg_url: str, tmp_path) -> None:
    """A session the server terminated is noticed on checkout (the pool's pre-ping) and replaced."""
    import psycopg

    from model_registry.bootstrap import bootstrap
    from model_registry.config import ProjectConfig, Settings

    settings = Settings.from_env({"STARCHART_HOME": str(tmp_path), "DATABASE_URL": pg_url,
                                  "STARCHART_CONFIG": str(tmp_path / "none.yaml")})
    reg = bootstrap(settings, ProjectConfig.load(settings.config_path))
    with reg.db.unit_of_work() as s:
        reg.audit_log.append(s, "schedule.changed", "U_T")
    assert reg.audit.events(limit=5)[0]["action"] == "schedule.changed"
    dbname = pg_url.rsplit("/", 1)[1]
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (dbname,))
    import time

    time.sleep(0.2)
    with reg.db.unit_of_work() as s:  # the pool hands out a fresh connection instead of the dead one
        reg.audit_log.append(s, "schedule.changed", "U_T")
    assert len(reg.audit.events(limit=5)) == 2
    assert reg.audit.verify().ok
    reg.db.engine.dispose()


def test_unsupported_database_urls_are_refused_clearly() -> None:
    import pytest

    from model_registry.domain.errors import InvalidInput

    for url, words in (("mysql://root@127.0.0.1/test", "does not support"), ("not a url", "not a database URL")):
        with pytest.raises(InvalidInput) as exc:
            make_engine(url)
        assert words in exc.value.message


def test_the_web_process_starts_without_the_database_layer() -> None:
    """bot.app, bot.web and bot.serve import no SQLAlchemy: the core loads after the process listens (start-up is
    what a deploy and a crashed worker wait for)."""
    loaded = _imported_after("import bot.app, bot.web, bot.serve")
    assert not any(m == "sqlalchemy" or m.startswith("sqlalchemy.") for m in loaded)
    assert "model_registry.adapters.db" not in loaded


def test_charts_are_drawn_in_a_process_of_their_own() -> None:
    """A chart asked for by a web process's sender is drawn elsewhere: matplotlib never loads beside the acks."""
    loaded = _imported_after(
        "from model_registry.adapters import charts; "
        "png = charts.history_png('iris', 'accuracy', [('v1', 0.9), ('v2', 0.95)], 'v1', 'v2'); "
        "assert png[:8] == bytes([137, 80, 78, 71, 13, 10, 26, 10]), png[:8]")
    assert not any(m == "matplotlib" or m.startswith("matplotlib.") for m in loaded)
