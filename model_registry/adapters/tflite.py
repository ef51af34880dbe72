"""TensorFlow Lite copies of a SavedModel, made in a TensorFlow process (tflite_process.py), never in this one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_registry.domain.errors import BackendError, Refused

TFLITE_PROCESS = str(Path(__file__).with_name("tflite_process.py"))  # run by file: its Python may be another one
CONVERT_TIMEOUT = 600.0  # seconds for one conversion and both runs (TensorFlow's import included)
SAVEDMODEL_HINT = ("pull the SavedModel instead (`pull {what} --format savedmodel`), which runs everything "
                   "TensorFlow runs")


class UnsupportedModel(Refused):
    """The converter cannot express the model with LiteRT's built-in operators."""


@dataclass(frozen=True)
class Conversion:
    """A flatbuffer written to `path`, and what the SavedModel and the flatbuffer answered for the same instances."""

    path: Path
    bytes: int
    saved: dict[str, list[Any]]
    lite: dict[str, list[Any]]


class TfliteConverter:
    """Runs tflite_process.py with `python` (STARCHART_TRAINER_PYTHON, else this interpreter)."""

    def __init__(self, python: str | None = None, timeout: float = CONVERT_TIMEOUT) -> None:
        self.python = python or sys.executable
        self.timeout = timeout

    def convert(self, saved_model: Path, out: Path, instances: list[dict[str, Any]], what: str) -> Conversion:
        """Convert `saved_model` into `out` and run both on `instances`; `what` ("iris v…") names it in errors."""
        with tempfile.TemporaryDirectory(prefix="starchart-tflite-") as tmp:
            request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
            request.write_text(json.dumps({"instances": instances}))
            try:
                proc = subprocess.run([self.python, TFLITE_PROCESS, str(saved_model), str(out), str(request),
                                       str(result)], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                      timeout=self.timeout, env=_quiet_env())
            except subprocess.TimeoutExpired:
                raise BackendError(f"converting {what} to TensorFlow Lite took over {self.timeout:.0f}s",
                                   "retry when the machine is less busy") from None
            except OSError as exc:
                raise BackendError(f"cannot run {self.python} to convert {what}: {exc.strerror}",
                                   "set STARCHART_TRAINER_PYTHON to a Python with TensorFlow and ai-edge-litert"
                                   ) from exc
            try:
                data = json.loads(result.read_text())
            except (OSError, ValueError):
                tail = " | ".join(proc.stderr.strip().splitlines()[-3:]) or f"exit code {proc.returncode}"
                raise BackendError(f"the TensorFlow Lite conversion of {what} stopped without an answer: {tail}",
                                   "see the message; retry, or pull the SavedModel instead") from None
        if data.get("ok"):
            return Conversion(out, int(data["bytes"]), data["saved"], data["lite"])
        kind, message = data.get("kind"), str(data.get("message", ""))
        if kind == "missing":
            raise BackendError(f"cannot convert {what} to TensorFlow Lite: {message}",
                               "install them there (pip install '.[train]': tensorflow-cpu and ai-edge-litert) or set "
                               "STARCHART_TRAINER_PYTHON to a Python that has both")
        if kind == "unsupported":
            ops = list(data.get("ops") or ())
            why = (f"its graph uses TensorFlow operations that LiteRT's built-in operators lack: {', '.join(ops)}"
                   + (" (text processing inside the model, such as a TextVectorization layer)"
                      if any(op.startswith(("String", "StaticRegex", "Regex")) for op in ops) else "")
                   if ops else f"the converter refused it ({message})")
            raise UnsupportedModel(f"{what} cannot be converted to TensorFlow Lite: {why}",
                                   SAVEDMODEL_HINT.format(what=what) + "; or train it with that processing outside "
                                   "the model, so that the model itself takes numbers")
        raise BackendError(f"the TensorFlow Lite conversion of {what} failed: {message}",
                           SAVEDMODEL_HINT.format(what=what))


def _quiet_env() -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
