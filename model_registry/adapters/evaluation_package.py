"""The evaluation job's program as an sdist, run by a backend like a trainer (`python -m starchart_evaluation.task`).

The package holds `starchart_evaluation/task.py` (this folder's evaluation_process.py) and the domain files it
uses (the CSV reading, the measures, the agreement), copied from this tree, so the job runs the code the core was
tested with on any Python that has TensorFlow — a local trainer Python or Vertex AI's executor image. It is built
once per content (`packaging.build_sdist` caches it by digest).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from model_registry.adapters.packaging import Package, build_sdist

MODULE = "starchart_evaluation.task"
NAME = "starchart_evaluation"
_HERE = Path(__file__).resolve().parent
_DOMAIN = _HERE.parent / "domain"
DOMAIN_FILES = ("errors.py", "instances.py", "answers.py", "lite_check.py", "evaluation.py")
SETUP = """from setuptools import find_packages, setup

setup(name="starchart_evaluation", version="0.1", packages=find_packages())
"""


def build(cache_dir: Path) -> Package:
    """The sdist of the evaluation program (built, or reused from `cache_dir`)."""
    with tempfile.TemporaryDirectory(prefix="starchart-evaluation-") as tmp:
        work = Path(tmp) / NAME
        (work / NAME).mkdir(parents=True)
        (work / NAME / "__init__.py").write_text('"""The evaluation job of StarChart ChatOps."""\n')
        (work / NAME / "task.py").write_text((_HERE / "evaluation_process.py").read_text(encoding="utf-8"))
        (work / "model_registry" / "domain").mkdir(parents=True)
        (work / "model_registry" / "__init__.py").write_text("")
        (work / "model_registry" / "domain" / "__init__.py").write_text("")
        for name in DOMAIN_FILES:
            (work / "model_registry" / "domain" / name).write_text((_DOMAIN / name).read_text(encoding="utf-8"))
        (work / "setup.py").write_text(SETUP)
        return build_sdist(work, cache_dir, NAME)
