"""Training programs as sdists: built from trainers/<model>/, cached by source digest."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from model_registry.errors import InvalidInput, NotFound

MINIMAL_SETUP = """from setuptools import find_packages, setup

setup(name={name!r}, version="0.1", packages=find_packages(), include_package_data=True)
"""
_IGNORED = {"__pycache__", ".git", "build", "dist", ".eggs"}


@dataclass(frozen=True)
class Package:
    path: Path
    sha256: str
    source_digest: str


def trainer_dir(trainer_base: Path, model: str) -> Path:
    path = trainer_base / model
    if not path.is_dir():
        known = sorted(p.name for p in trainer_base.iterdir() if p.is_dir()) if trainer_base.is_dir() else []
        from model_registry.names import suggest

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
    """Build (or reuse) the sdist of a trainer folder; a minimal setup.py is generated when missing."""
    digest = source_digest(source)
    out = cache_dir / digest
    built = sorted(out.glob("*.tar.gz")) if out.is_dir() else []
    if not built:
        with tempfile.TemporaryDirectory(prefix="starchart-sdist-") as tmp:
            work = Path(tmp) / model
            shutil.copytree(source, work, ignore=shutil.ignore_patterns(*_IGNORED, "*.egg-info", "*.pyc"))
            if not (work / "setup.py").exists() and not (work / "pyproject.toml").exists():
                (work / "setup.py").write_text(MINIMAL_SETUP.format(name=f"{model}_trainer"))
            dist = Path(tmp) / "dist"
            proc = subprocess.run(
                [sys.executable, "setup.py", "-q", "sdist", "--formats=gztar", "-d", str(dist)],
                cwd=work, capture_output=True, text=True,
            )
            built = sorted(dist.glob("*.tar.gz")) if dist.is_dir() else []
            if proc.returncode != 0 or not built:
                raise InvalidInput(
                    f"cannot package {source}: {(proc.stderr or proc.stdout).strip()[-800:]}",
                    "fix setup.py of the trainer (or delete it to use a generated one)",
                )
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy2(built[0], out / built[0].name)
        built = sorted(out.glob("*.tar.gz"))
    data = built[0].read_bytes()
    return Package(path=built[0], sha256=hashlib.sha256(data).hexdigest(), source_digest=digest)
