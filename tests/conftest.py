"""Shared fixtures: databases (SQLite and PostgreSQL), trained SavedModels, registries on a temp home."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
PG_ADMIN_URL = os.environ.get("STARCHART_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

sys.path.insert(0, str(ROOT))


def pg_available() -> bool:
    try:
        import psycopg

        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", connect_timeout=3):
            return True
    except Exception:
        return False


_PG = pg_available()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'starchart.db'}"


@pytest.fixture
def empty_pg_url() -> Iterator[str]:
    """A new, empty PostgreSQL database (no schema): what a fresh Heroku Postgres add-on is."""
    if not _PG:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not reachable on 127.0.0.1:5432 in CI")
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432")
    import psycopg

    name = f"starchart_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def upgraded(url: str) -> str:
    """The database as `starchart db upgrade` leaves it (PostgreSQL is not migrated by the processes that use it)."""
    from model_registry.adapters.db import upgrade_database

    upgrade_database(url)
    return url


@pytest.fixture
def pg_url(empty_pg_url: str) -> str:
    """A PostgreSQL database at the newest schema, as the release step leaves it."""
    return upgraded(empty_pg_url)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """A database the processes open as they are: SQLite (migrated on open), PostgreSQL after `db upgrade`."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db_url(request: pytest.FixtureRequest) -> str:
    """A database with no schema yet, on either engine: for the migrations' own tests."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "empty_pg_url")


def _train_once(out: Path, trainer: str, args: list[str]) -> Path:
    """Really train one of the shipped models (TensorFlow), outside the platform, to replay later."""
    model_dir = out / "model"
    env = {**os.environ, "AIP_MODEL_DIR": f"{model_dir}/", "AIP_TENSORBOARD_LOG_DIR": f"{out / 'logs'}/",
           "PYTHONPATH": str(ROOT / "trainers" / trainer), "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, "-m", "trainer.task", *args], env=env, cwd=out, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (model_dir / "saved_model.pb").exists() and (out / "metrics.json").exists()
    assert list((out / "logs" / "train").glob("events.out.tfevents.*")), "the trainer wrote no event files"
    return out


def made_once(factory: pytest.TempPathFactory, name: str, make: Callable[[Path], object]) -> Path:
    """A folder that `make` fills once per test run, whichever xdist worker asks for it first; the others wait for it
    and share it. (pytest-xdist's loadgroup does not group tests under pytest 9.2: pytest-xdist issue 1386.)"""
    shared = factory.getbasetemp().parent / "made-once"
    shared.mkdir(exist_ok=True)
    out = shared / name
    with open(shared / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / ".done").exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            make(out)
            (out / ".done").write_text("ok")
    return out


def _trained_set(factory: pytest.TempPathFactory, plan: dict[str, tuple[str, list[str]]]) -> dict[str, Path]:
    """SavedModels trained once per test run, with their event files (logs/)."""
    return {name: made_once(factory, f"trained-{name}", lambda out, t=trainer, a=args: _train_once(out, t, a))
            for name, (trainer, args) in plan.items()}


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """iris SavedModels trained once per test run: iris_a and iris_b differ in args, not signature."""
    return _trained_set(tmp_path_factory, {
        "iris_a": ("iris", ["--epochs=2", "--hidden_units=8"]),
        "iris_b": ("iris", ["--epochs=4", "--hidden_units=16,8"]),
    })


@pytest.fixture(scope="session")
def trained_sentiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sentiment SavedModel (string input): a different signature to diff against iris."""
    return _trained_set(tmp_path_factory, {"sentiment": ("sentiment", ["--epochs=1"])})["sentiment"]


TEST_DATA_ROOTS: list[str] = []  # set per session: where tests' trainer arguments (--source=, --dump-env=) point


@pytest.fixture(scope="session", autouse=True)
def test_data_roots(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The folder above this worker's temp folders, which holds every tmp_path and the shared trained models."""
    TEST_DATA_ROOTS[:] = [str(tmp_path_factory.getbasetemp().parent.resolve())]
    return TEST_DATA_ROOTS


def write_config(home: Path, trainer_base: Path, **overrides: Any) -> Path:
    cfg: dict[str, Any] = {
        "trainer_base": str(trainer_base),
        "model_files": str(home / "models"),
        "defaults": {"approvers": [], "required_approvals": 1, "allow_self_approval": False,
                     "request_expiry": "72h", "data_roots": list(TEST_DATA_ROOTS)},
        "models": {},
    }
    for key, value in overrides.items():
        if key in ("defaults", "models") and isinstance(value, dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    path = home / "starchart.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def replay_trainers(tmp_path: Path) -> Path:
    """A trainer base where iris, other and sentiment are the replay trainer (no TensorFlow, fast)."""
    base = tmp_path / "trainers"
    for model in ("iris", "other", "sentiment"):
        shutil.copytree(FIXTURES / "trainers" / "replay", base / model)
    return base


@pytest.fixture
def make_registry(tmp_path: Path, replay_trainers: Path) -> Callable[..., Any]:
    """make_registry(db_url, backend=None, env=None, **config) -> Core on a fresh STARCHART_HOME."""
    from model_registry.bootstrap import Core, bootstrap
    from model_registry.config import ProjectConfig, Settings

    made = []

    def make(db_url: str, backend: Any = None, trainer_base: Path | None = None, home: Path | None = None,
             env: dict[str, str] | None = None, **config: Any) -> Core:
        home = home or tmp_path / "home"
        home.mkdir(exist_ok=True)
        path = write_config(home, trainer_base or replay_trainers, **config)
        settings = Settings.from_env({"STARCHART_HOME": str(home), "DATABASE_URL": db_url,
                                      "STARCHART_CONFIG": str(path), **(env or {})})
        reg = bootstrap(settings, ProjectConfig.load(path), backend=backend)
        made.append(reg)
        return reg

    yield make
    for reg in made:
        reg.close()


def with_backend(reg: Any, backend: Any) -> Any:
    """The same records and configuration, served by another backend (e.g. one that fails on purpose)."""
    from model_registry.bootstrap import bootstrap

    return bootstrap(reg.settings, reg.config, backend=backend)


def replay_args(source: Path, *extra: str) -> list[str]:
    return [f"--source={source}", *extra]


def train_and_wait(reg: Any, model: str, user: str, args: list[str], timeout: float = 120) -> dict[str, Any]:
    job = reg.jobs.train(model, user, args=args)
    return reg.jobs.wait(job["job_id"], timeout=timeout)


@pytest.fixture
def two_versions(make_registry: Callable[..., Any], db_url: str, trained: dict[str, Path]) -> Any:
    """A registry where iris has two exposed versions: the first is the default."""
    return expose_two_versions(make_registry(db_url), trained)


def expose_two_versions(reg: Any, trained: dict[str, Path]) -> Any:
    """Train iris twice (replaying iris_a, then iris_b) and expose both: the first becomes the default."""
    for src, epochs in ((trained["iris_a"], "2"), (trained["iris_b"], "4")):
        job = train_and_wait(reg, "iris", "U_TRAINER", replay_args(src, f"--epochs={epochs}"))
        assert job["state"] == "SUCCEEDED", f"{job['job_id']} {job['state']}: {job.get('error')}"
    exposed = reg.versions.expose("iris", "U_TRAINER")
    assert len(exposed["exposed"]) == 2 and not exposed["errors"]
    return reg


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
