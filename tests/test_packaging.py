"""Packaging trainers with the `build` frontend: pyproject.toml-only trainers, the digest cache, the isolation rule, errors."""

from __future__ import annotations

import base64
import hashlib
import shutil
import tarfile
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import build.env
import pytest
from conftest import FIXTURES, replay_args, train_and_wait

from model_registry.adapters import packaging
from model_registry.adapters.packaging import build_sdist
from model_registry.domain.errors import InvalidInput, StarchartError

PEP621 = FIXTURES / "trainers" / "pep621"
REPLAY = FIXTURES / "trainers" / "replay"


def members(package: Path) -> list[str]:
    with tarfile.open(package) as tar:
        return tar.getnames()


def no_isolated_env(*_args: Any, **_kwargs: Any) -> Any:
    raise AssertionError("an isolated build environment was created")


def test_pyproject_only_trainer_trains_end_to_end(make_registry: Any, sqlite_url: str, trained: dict,
                                                  tmp_path: Path) -> None:
    base = tmp_path / "pep621-trainers"
    shutil.copytree(PEP621, base / "iris")
    reg = make_registry(sqlite_url, trainer_base=base)
    job = train_and_wait(reg, "iris", "U_T", replay_args(trained["iris_a"]))
    assert job["state"] == "SUCCEEDED", job
    package = Path(job["package_uris"][0])
    assert package.name == "replay_pep621_trainer-0.2.0.tar.gz"
    names = members(package)
    assert "replay_pep621_trainer-0.2.0/pyproject.toml" in names
    assert "replay_pep621_trainer-0.2.0/trainer/task.py" in names
    assert not any(m.endswith("/setup.py") for m in names), "nothing is generated for a pyproject.toml trainer"
    assert job["package_sha256"] == hashlib.sha256(package.read_bytes()).hexdigest()
    log = reg.jobs.logs(job["job_id"])
    # the staged sdist ran, not the source folder
    assert "pep621 replay trainer: job" in log and str(reg.settings.home / "jobs" / job["job_id"]) in log
    assert not (base / "iris" / "setup.py").exists() and not list((base / "iris").glob("*.egg-info"))
    exposed = reg.versions.expose("iris", "U_T")
    assert len(exposed["exposed"]) == 1 and not exposed["errors"]


def test_installed_requirements_build_without_isolation(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(build.env, "DefaultIsolatedEnv", no_isolated_env)
    pep621 = build_sdist(PEP621, tmp_path / "cache", "iris")
    generated = build_sdist(REPLAY, tmp_path / "cache", "other")
    assert pep621.path.name == "replay_pep621_trainer-0.2.0.tar.gz"
    assert generated.path.name == "other_trainer-0.1.tar.gz"
    assert "other_trainer-0.1/setup.py" in members(generated.path), "a minimal setup.py is generated when missing"


def test_builds_are_cached_by_source_digest(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    source = tmp_path / "iris"
    shutil.copytree(PEP621, source)
    first = build_sdist(source, tmp_path / "cache", "iris")
    assert first.path.parent == tmp_path / "cache" / first.source_digest

    def no_build(*_args: Any, **_kwargs: Any) -> Path:
        raise AssertionError("rebuilt although the source did not change")

    monkeypatch.setattr(packaging, "_build", no_build)
    (source / "trainer" / "__pycache__").mkdir()
    (source / "trainer" / "__pycache__" / "task.cpython-311.pyc").write_bytes(b"ignored")
    assert build_sdist(source, tmp_path / "cache", "iris") == first
    monkeypatch.undo()
    (source / "trainer" / "task.py").write_text((source / "trainer" / "task.py").read_text() + "\n# changed\n")
    second = build_sdist(source, tmp_path / "cache", "iris")
    assert second.source_digest != first.source_digest and second.path.parent.name == second.source_digest
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([first.source_digest, second.source_digest])


@pytest.mark.parametrize("files, match", [
    ({"setup.py": "raise SystemExit('setup.py of the trainer is broken on purpose')"},
     "broken on purpose"),
    ({"pyproject.toml": "[build-system\nrequires = ["}, "pyproject.toml"),
    ({"pyproject.toml": '[build-system]\nrequires = ["not a requirement !!"]\nbuild-backend = "setuptools.build_meta"\n'},
     "invalid build requirement"),
    ({"pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "no_such_backend_module"\n'},
     "no_such_backend_module"),
    ({"pyproject.toml": '[project]\nname = "x"\nversion = "not-a-version"\n'}, "version"),
])
def test_a_build_that_fails_says_why(tmp_path: Path, files: dict[str, str], match: str) -> None:
    source = tmp_path / "iris"
    shutil.copytree(REPLAY, source)
    for name, text in files.items():
        (source / name).write_text(text)
    with pytest.raises(InvalidInput, match=match) as exc:
        build_sdist(source, tmp_path / "cache", "iris")
    assert isinstance(exc.value, StarchartError)
    assert f"cannot package {source}" in exc.value.message
    assert "setup.py or pyproject.toml" in exc.value.hint
    assert "starchart-sdist-" not in exc.value.message, "paths name the trainer folder, not the temporary copy"
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.tar.gz"))


def test_a_hanging_build_times_out(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(packaging, "HOOK_TIMEOUT", 1)
    source = tmp_path / "iris"
    shutil.copytree(REPLAY, source)
    (source / "setup.py").write_text("import time\ntime.sleep(60)\n")
    with pytest.raises(InvalidInput, match="the build backend gave no answer in 1s"):
        build_sdist(source, tmp_path / "cache", "iris")


# An in-tree stand-in for a build backend the running Python does not have, shipped as a wheel so the isolated
# build environment installs it with no package index at all.
TOY_BACKEND = textwrap.dedent('''
    import os, tarfile

    def get_requires_for_build_sdist(config_settings=None):
        return []

    def build_sdist(sdist_directory, config_settings=None):
        name = "toy_trainer-1.0"
        with tarfile.open(os.path.join(sdist_directory, name + ".tar.gz"), "w:gz") as tar:
            tar.add("trainer", arcname=name + "/trainer")
            tar.add("pyproject.toml", arcname=name + "/pyproject.toml")
        return name + ".tar.gz"
''')


def toy_backend_wheel(where: Path) -> Path:
    wheel = where / "starchart_toy_backend-1.0-py3-none-any.whl"
    files = {
        "starchart_toy_backend.py": TOY_BACKEND,
        "starchart_toy_backend-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: starchart-toy-backend\nVersion: 1.0\n",
        "starchart_toy_backend-1.0.dist-info/WHEEL":
            "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
            digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
            record.append(f"{name},sha256={digest},{len(text.encode())}")
        record.append("starchart_toy_backend-1.0.dist-info/RECORD,,")
        zf.writestr("starchart_toy_backend-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return wheel


def test_missing_build_requirements_build_in_an_isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # no package index: the requirement comes from the local wheel only
    source = tmp_path / "iris"
    shutil.copytree(REPLAY, source)
    wheel = toy_backend_wheel(tmp_path)
    (source / "pyproject.toml").write_text(
        f'[build-system]\nrequires = ["starchart-toy-backend @ {wheel.as_uri()}"]\n'
        'build-backend = "starchart_toy_backend"\n')
    package = build_sdist(source, tmp_path / "cache", "iris")
    assert package.path.name == "toy_trainer-1.0.tar.gz"
    assert "toy_trainer-1.0/trainer/task.py" in members(package.path)


def test_uninstallable_build_requirements_say_what_is_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # offline: the install fails without asking any index
    source = tmp_path / "iris"
    shutil.copytree(REPLAY, source)
    (source / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["starchart-absent-backend>=1"]\n'
        'build-backend = "setuptools.build_meta"\n')
    with pytest.raises(InvalidInput, match="build requirements starchart-absent-backend>=1 are not installed") as exc:
        build_sdist(source, tmp_path / "cache", "iris")
    assert "isolated build environment failed" in exc.value.message
    assert "No matching distribution found for starchart-absent-backend" in exc.value.message, "pip's words are kept"
    assert "install them" in exc.value.hint
