"""Training programs as sdists: built from trainers/<model>/ by a PEP 517 frontend (`build`), cached by source digest.

A trainer folder may carry a `setup.py`, a `pyproject.toml` (PEP 621 metadata, any PEP 517 backend), or neither,
in which case a minimal `setup.py` is generated in a temporary copy (the source folder is never written to).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from model_registry.domain.errors import InvalidInput, NotFound

MINIMAL_SETUP = """from setuptools import find_packages, setup

setup(name={name!r}, version="0.1", packages=find_packages(), include_package_data=True)
"""
_IGNORED = {"__pycache__", ".git", "build", "dist", ".eggs"}
HOOK_TIMEOUT = 300  # seconds for one backend hook or requirement install: a setup.py that hangs fails the training
_BUILD_HINT = "fix setup.py or pyproject.toml of the trainer (or delete both to use a generated setup.py)"


@dataclass(frozen=True)
class Package:
    path: Path
    sha256: str
    source_digest: str


def trainer_dir(trainer_base: Path, model: str) -> Path:
    path = trainer_base / model
    if not path.is_dir():
        known = sorted(p.name for p in trainer_base.iterdir() if p.is_dir()) if trainer_base.is_dir() else []
        from model_registry.domain.names import suggest

        hint = suggest(model, known) or (f"known models: {', '.join(known)}" if known else "")
        raise NotFound(f"unknown model {model!r}: there is no {path}", hint or f"create {path}/trainer/task.py")
    return path


def check_module(source: Path, module: str) -> None:
    parts = module.split(".")
    if not module or not all(p.isidentifier() for p in parts):
        raise InvalidInput(f"invalid module {module!r}", "a module is a dotted Python name such as trainer.task")
    rel = Path(*parts)
    if not ((source / rel).with_suffix(".py").is_file() or (source / rel / "__main__.py").is_file()):
        raise NotFound(f"unknown module {module!r}: {source.name} has no {rel}.py", "pass --module trainer.task or fix the name")


def _source_files(source: Path) -> list[Path]:
    files = []
    for p in sorted(source.rglob("*")):
        rel = p.relative_to(source)
        if p.is_file() and not any(part in _IGNORED or part.endswith(".egg-info") for part in rel.parts):
            if p.suffix not in (".pyc", ".pyo"):
                files.append(p)
    return files


def source_digest(source: Path) -> str:
    h = hashlib.sha256()
    for p in _source_files(source):
        h.update(str(p.relative_to(source)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def build_sdist(source: Path, cache_dir: Path, model: str) -> Package:
    """Build (or reuse) the sdist of a trainer folder; a minimal setup.py is generated when it has neither
    setup.py nor pyproject.toml. Built once per source digest, under `cache_dir/<digest>/`."""
    digest = source_digest(source)
    out = cache_dir / digest
    built = sorted(out.glob("*.tar.gz")) if out.is_dir() else []
    if not built:
        with tempfile.TemporaryDirectory(prefix="starchart-sdist-") as tmp:
            work = Path(tmp) / model
            shutil.copytree(source, work, ignore=shutil.ignore_patterns(*_IGNORED, "*.egg-info", "*.pyc"))
            if not (work / "setup.py").exists() and not (work / "pyproject.toml").exists():
                (work / "setup.py").write_text(MINIMAL_SETUP.format(name=f"{model}_trainer"))
            sdist = _build(work, Path(tmp) / "dist", source)
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy2(sdist, out / sdist.name)
        built = sorted(out.glob("*.tar.gz"))
    data = built[0].read_bytes()
    return Package(path=built[0], sha256=hashlib.sha256(data).hexdigest(), source_digest=digest)


def _run_hook(cmd: Sequence[str], cwd: str | None = None, extra_environ: Mapping[str, str] | None = None) -> None:
    """Run a backend hook with its output captured (for the error message) rather than printed by the bot."""
    subprocess.run(cmd, cwd=cwd, env={**os.environ, **(extra_environ or {})}, check=True, capture_output=True,
                   text=True, timeout=HOOK_TIMEOUT)


def _unmet(requirements: set[str]) -> list[str]:
    """The requirements (PEP 508) that the running Python does not satisfy, with their own dependencies."""
    import build

    try:
        return sorted(req for req in requirements if any(build.check_dependency(req)))
    except ValueError as exc:  # packaging's InvalidRequirement
        raise build.BuildException(f"invalid build requirement: {exc}") from None


def _build(work: Path, dist: Path, source: Path) -> Path:
    """Build the sdist of `work` into `dist` with the `build` frontend; returns the sdist's path.

    The rule: build without isolation, in the running Python, when it already satisfies the trainer's
    build requirements (`[build-system] requires`, then the backend's `get_requires_for_build_sdist`;
    setuptools is a dependency of this project, so a setup.py or setuptools trainer needs nothing more and
    no network). Only when some are missing is an isolated build environment created and they are
    installed into it from the package index, as `python -m build --sdist` would.
    """
    import build  # imported here: a cached sdist, the common case, needs no frontend
    import build.env

    try:
        builder = build.ProjectBuilder(work, runner=_run_hook)
        missing = _unmet(builder.build_system_requires)
        if not missing:
            missing = _unmet(builder.get_requires_for_build("sdist"))
        if not missing:
            return Path(builder.build("sdist", dist))
        with build.env.DefaultIsolatedEnv() as env:
            isolated = build.ProjectBuilder.from_isolated_env(env, work, runner=_run_hook)
            try:
                env.install(isolated.build_system_requires)
                env.install(isolated.get_requires_for_build("sdist"))
            except (subprocess.SubprocessError, build.FailedProcessError) as exc:
                raise InvalidInput(
                    f"cannot package {source}: its build requirements {', '.join(missing)} are not installed, "
                    f"and installing them into an isolated build environment failed{_output(exc)}",
                    "install them into the bot's Python, or let it reach the package index",
                ) from None
            return Path(isolated.build("sdist", dist))
    except build.BuildBackendException as exc:
        if isinstance(exc.exception, subprocess.TimeoutExpired):
            failure = f"the build backend gave no answer in {exc.exception.timeout:.0f}s"
        else:
            failure = f"{exc}{_output(exc.exception)}"
    except build.BuildException as exc:
        failure = str(exc)
    raise InvalidInput(f"cannot package {source}: {failure.replace(str(work), str(source))}", _BUILD_HINT)


def _output(exc: BaseException) -> str:
    """': ' and the last lines a failed hook or install printed ('' when it printed none)."""
    import build

    if isinstance(exc, build.FailedProcessError):
        exc = exc.exception
    if isinstance(exc, subprocess.TimeoutExpired):
        return f": no answer after {exc.timeout:.0f}s"
    if not isinstance(exc, subprocess.CalledProcessError):
        return ""
    streams = (exc.stderr, exc.stdout)
    text = "\n".join(s.decode(errors="replace") if isinstance(s, bytes) else s for s in streams if s).strip()
    return f": {text[-800:]}" if text else f": exit status {exc.returncode}"
