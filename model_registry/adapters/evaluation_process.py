"""The evaluation job: a promotion request's candidate and current default run on the same labelled rows.

    python -m starchart_evaluation.task --candidate MODEL_DIR [--base MODEL_DIR] --data CSV --label COLUMN
        --output OUTPUT --result RESULT.json

The backend runs this as a job from the sdist `adapters/evaluation_package.py` builds (this file is its
`starchart_evaluation/task.py`, beside the domain files it uses): locally in a TensorFlow process, on Vertex AI as
a CustomJob in the TensorFlow executor image. Paths may be local or gs:// (read and written with tf.io.gfile).
It reads the rows (`lite_check.csv_rows`: the signature's inputs and the label, typed as the output), loads each
SavedModel's `serving_default`, answers the rows in batches and writes `evaluation.summarize`'s answer to RESULT:

    {"ok": true, "rows": N, "kind": "class" | "numeric", "candidate": {metric: value}, "base": {...} | null,
     "agreement": share | null, "disagreements": [{line, inputs, label, candidate, base}, ...]}
    {"ok": false, "error": "what is wrong", "hint": "how to fix it"}          (exit status 2)

This is a TensorFlow process: the bot's processes never import it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from model_registry.domain import evaluation, lite_check  # noqa: E402 - after the log level is set
from model_registry.domain.errors import InvalidInput, StarchartError  # noqa: E402

SIGNATURE = "serving_default"
BATCH = 4096  # rows per call of a SavedModel


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class Version:
    """One SavedModel's serving signature: its inputs and outputs as the records describe signatures."""

    def __init__(self, tf: Any, path: str, role: str) -> None:
        self.tf, self.role = tf, role
        try:
            self.fn = tf.saved_model.load(path).signatures[SIGNATURE]
        except (OSError, KeyError, ValueError, tf.errors.OpError) as exc:
            raise InvalidInput(f"cannot load the {role}'s SavedModel at {path}: {type(exc).__name__}: "
                               f"{str(exc)[:300]}", "the version's files were moved or deleted; train and "
                                                    "expose it again") from None
        self.specs = self.fn.structured_input_signature[1]
        self.inputs = {name: {"dtype": spec.dtype.name, "shape": [-1 if d is None else d for d in spec.shape.as_list()]}
                       for name, spec in self.specs.items()}
        self.outputs = {name: spec.dtype.name for name, spec in self.fn.structured_outputs.items()}

    def output_dtype(self, output: str) -> str:
        if output not in self.outputs:
            raise InvalidInput(f"the {self.role} gives no output {output!r} (its outputs: "
                               f"{', '.join(sorted(self.outputs)) or 'none'})",
                               "set `evaluation.output` in starchart.yaml to the output the label is compared with")
        return self.outputs[output]

    def answer(self, instances: list[dict[str, Any]], output: str) -> list[Any]:
        tf, out = self.tf, list[Any]()
        for start in range(0, len(instances), BATCH):
            chunk = instances[start:start + BATCH]
            tensors = {name: tf.constant([row[name] for row in chunk], dtype=spec.dtype)
                       for name, spec in self.specs.items()}
            values = _plain(self.fn(**tensors)[output].numpy().tolist())
            out.extend(evaluation.one_value(v, output) for v in values)
        return out


def _read(tf: Any, uri: str) -> str:
    try:
        with tf.io.gfile.GFile(uri, "rb") as fh:
            raw = fh.read()
    except tf.errors.NotFoundError:
        raise InvalidInput(f"the evaluation data {uri} does not exist",
                           "point `evaluation.data` in starchart.yaml at a CSV file (a gs:// URI on Vertex AI)"
                           ) from None
    except (OSError, tf.errors.OpError) as exc:
        raise InvalidInput(f"cannot read the evaluation data {uri}: {type(exc).__name__}: {str(exc)[:300]}",
                           "check the path and that the job may read it") from None
    try:
        return bytes(raw).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidInput(f"the evaluation data {uri} is not UTF-8 text",
                           "give a CSV file with a header row naming the signature's inputs and the label") from None


def evaluate(tf: Any, args: argparse.Namespace) -> dict[str, Any]:
    candidate = Version(tf, args.candidate, "candidate")
    base = Version(tf, args.base, "current default") if args.base else None
    label_dtype = candidate.output_dtype(args.output)
    if base is not None:
        base.output_dtype(args.output)
    text = _read(tf, args.data)
    rows = lite_check.csv_rows(text, candidate.inputs, args.label, args.data, evaluation.MAX_ROWS, label_dtype,
                               args.output)
    answers = candidate.answer(rows.instances, args.output)
    base_answers = None
    if base is not None:
        same = base.inputs == candidate.inputs
        theirs = rows if same else lite_check.csv_rows(text, base.inputs, args.label, args.data, evaluation.MAX_ROWS)
        base_answers = base.answer(theirs.instances, args.output)
    return evaluation.summarize(rows.instances, rows.labels, rows.lines, answers, base_answers,
                                evaluation.output_kind(label_dtype))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="starchart_evaluation.task")
    for flag in ("--candidate", "--data", "--label", "--output", "--result"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--base")
    args = parser.parse_args(argv)
    try:
        import tensorflow as tf
    except ImportError as exc:
        answer: dict[str, Any] = {"ok": False, "error": f"TensorFlow is not importable by {sys.executable} ({exc})",
                                  "hint": "set STARCHART_TRAINER_PYTHON to a Python that has TensorFlow"}
        print(json.dumps(answer), file=sys.stderr)
        return 2
    try:
        answer = {"ok": True, **evaluate(tf, args)}
    except StarchartError as exc:
        answer = {"ok": False, "error": exc.message, "hint": exc.hint or ""}
    except Exception as exc:  # anything else is the job's failure, said in its result
        answer = {"ok": False, "error": f"the evaluation stopped: {type(exc).__name__}: {str(exc)[:500]}",
                  "hint": "see the evaluation job's log"}
    with tf.io.gfile.GFile(args.result, "w") as fh:
        fh.write(json.dumps(evaluation.jsonable(answer), allow_nan=False))
    print(f"evaluation: {'done' if answer['ok'] else answer['error']}", file=sys.stderr)
    return 0 if answer["ok"] else 2


if __name__ == "__main__":
    sys.exit(main())
