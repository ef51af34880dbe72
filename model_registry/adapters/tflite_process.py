"""The conversion process: a SavedModel to a TensorFlow Lite flatbuffer, both run on the same instances.

    python tflite_process.py SAVED_MODEL_DIR OUT.tflite REQUEST.json RESULT.json

REQUEST.json is `{"instances": [{input: value, ...}, ...]}`. The process converts the SavedModel's
`serving_default` signature with `tf.lite.TFLiteConverter.from_saved_model` (built-in operators only: the file
must run on a plain LiteRT interpreter, without TensorFlow's Flex delegate), writes OUT.tflite, loads that file
in the LiteRT interpreter (`ai-edge-litert`), and runs the SavedModel and the interpreter on the instances.
RESULT.json gets either

    {"ok": true, "saved": {output: [...]}, "lite": {output: [...]}, "bytes": N}   (one value per instance)
    {"ok": false, "kind": "unsupported" | "missing" | "failed", "message": "...", "ops": [...]}

Comparing the outputs is the caller's (model_registry/domain/lite_check.py), not this process's.

This is a TensorFlow process, like the local model server: the bot's web process never imports TensorFlow and
runs this file with the Python that has it (STARCHART_TRAINER_PYTHON, else its own). Standard library only
besides TensorFlow, NumPy and LiteRT, so a Python without this project can run it.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

# run by file, this folder comes first on sys.path, where adapters/packaging.py would hide the `packaging`
# distribution TensorFlow imports
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

SIGNATURE = "serving_default"
# the converter's words for an operation LiteRT's built-in operators lack
_UNSUPPORTED_OP = re.compile(r"'tf\.(\w+)' op is neither a custom op nor a flex op")


def _plain(value: Any) -> Any:
    """A NumPy result as JSON: bytes as text, one list per output."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _columns(instances: list[dict[str, Any]], names: list[str]) -> dict[str, list[Any]]:
    return {name: [inst[name] for inst in instances] for name in names}


def convert(saved_model: str) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model, signature_keys=[SIGNATURE])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return bytes(converter.convert())


def run_saved_model(saved_model: str, instances: list[dict[str, Any]]) -> dict[str, Any]:
    import tensorflow as tf

    fn = tf.saved_model.load(saved_model).signatures[SIGNATURE]
    specs = fn.structured_input_signature[1]
    tensors = {k: tf.constant(v, dtype=specs[k].dtype) for k, v in _columns(instances, sorted(specs)).items()}
    return {k: _plain(v.numpy().tolist()) for k, v in fn(**tensors).items()}


def run_lite(path: str, instances: list[dict[str, Any]]) -> dict[str, Any]:
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=path).get_signature_runner(SIGNATURE)
    details = runner.get_input_details()
    inputs = {k: np.asarray(v, dtype=details[k]["dtype"]) for k, v in _columns(instances, sorted(details)).items()}
    return {k: _plain(np.asarray(v).tolist()) for k, v in runner(**inputs).items()}


def main(argv: list[str]) -> int:
    saved_model, out, request, result = argv[1:5]
    instances = json.loads(Path(request).read_text())["instances"]

    def answer(data: dict[str, Any]) -> int:
        Path(result).write_text(json.dumps(data))
        return 0 if data.get("ok") else 2

    try:
        import tensorflow  # noqa: F401 - both are needed before any work: say which is missing
        from ai_edge_litert.interpreter import Interpreter  # noqa: F401
    except ImportError as exc:
        what = {"tensorflow": "TensorFlow", "ai_edge_litert": "LiteRT (ai-edge-litert)"}.get(
            (exc.name or "").split(".")[0], exc.name)
        return answer({"ok": False, "kind": "missing",
                       "message": f"{what} is not importable by {sys.executable} ({exc})"})
    try:
        flatbuffer = convert(saved_model)
    except Exception as exc:  # the converter's errors carry MLIR's diagnostics as text
        text = str(exc)
        ops = sorted(set(_UNSUPPORTED_OP.findall(text)))
        kind = "unsupported" if ops or type(exc).__name__ == "ConverterError" else "failed"
        last = [line for line in text.splitlines() if "error:" in line][-1:] or text.splitlines()[-1:]
        return answer({"ok": False, "kind": kind, "ops": ops,
                       "message": f"{type(exc).__name__}: {(last[0] if last else text)[:500]}"})
    tmp = f"{out}.{os.getpid()}.tmp"
    Path(tmp).write_bytes(flatbuffer)
    os.replace(tmp, out)
    try:
        saved = run_saved_model(saved_model, instances)
        lite = run_lite(out, instances)  # the file as written, as a device loads it
    except Exception as exc:
        return answer({"ok": False, "kind": "failed", "message": f"{type(exc).__name__}: {str(exc)[:500]}"})
    return answer({"ok": True, "saved": saved, "lite": lite, "bytes": len(flatbuffer)})


if __name__ == "__main__":
    sys.exit(main(sys.argv))
