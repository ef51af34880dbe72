"""An evaluation: a promotion request's candidate and current default answering the same labelled rows.

The evaluation job (adapters/evaluation_process.py, a TensorFlow process the backend runs) reads the rows with
`lite_check.csv_rows`, runs both versions and calls `summarize`; the core reads what it wrote, and the nightly
gate's `on: evaluation` decides with `gate_why`. Standard library and the domain only: the job ships these files.

The output named in `evaluation.output` gives one value per row. A class output (integer, bool or text: class
ids, labels) is measured by accuracy and the recall of each class the labels hold (`recall/<class>`); a numeric
output (floats) by its mean absolute error (`mae`) and root mean squared error (`rmse`). The agreement is the share
of rows both versions answer alike (`answers.agree`); up to MAX_DISAGREEMENTS rows where they do not are kept,
with their inputs, label and both answers.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from model_registry.domain.answers import agree
from model_registry.domain.errors import InvalidInput
from model_registry.domain.instances import dtype_name

MAX_DISAGREEMENTS = 5
MAX_ROWS = 100_000  # rows of the evaluation data read (the first ones)
CLASS, NUMERIC = "class", "numeric"
LOWER_IS_BETTER = ("mae", "rmse")
CONFIGURE_HINT = ("configure `evaluation: {data: CSV_PATH_OR_GS_URI, label: COLUMN, output: OUTPUT}` for {model} "
                  "in starchart.yaml (a CSV of the signature's inputs and the label)")


def output_kind(dtype: str) -> str:
    """How an output's answers are measured against the labels: CLASS (integers, bools, text) or NUMERIC."""
    short = dtype_name(dtype)
    return NUMERIC if short.startswith(("float", "bfloat", "half")) else CLASS


def one_value(answer: Any, output: str) -> Any:
    """One row's answer of the output as one value (a `[x]` of shape [-1, 1] is x)."""
    while isinstance(answer, list):
        if len(answer) != 1:
            raise InvalidInput(f"the output {output} gives {len(answer)} values per row, not one",
                               "set `evaluation.output` to an output with one value per row: a class id, a label "
                               "or a number")
        answer = answer[0]
    return answer


def _number(value: float) -> Any:
    """A metric as JSON carries it: a number, or "NaN"/"Infinity"/"-Infinity" (as the metrics of a diff are)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def jsonable(value: Any) -> Any:
    """A value with its non-finite floats as text ("NaN", "Infinity"), so that strict JSON (PostgreSQL's) holds it."""
    if isinstance(value, float) and not math.isfinite(value):
        return _number(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def metrics(answers: Sequence[Any], labels: Sequence[Any], kind: str) -> dict[str, Any]:
    """Accuracy and per-class recall (CLASS), or MAE and RMSE (NUMERIC), of the answers against the labels."""
    if kind == CLASS:
        out: dict[str, Any] = {"accuracy": sum(a == y for a, y in zip(answers, labels)) / len(labels)}
        for cls in sorted(set(labels), key=lambda c: (str(type(c)), c)):
            rows = [a for a, y in zip(answers, labels) if y == cls]
            out[f"recall/{cls}"] = sum(a == cls for a in rows) / len(rows)
        return out
    errors = [float(a) - float(y) for a, y in zip(answers, labels)]
    return {"mae": _number(sum(abs(e) for e in errors) / len(errors)),
            "rmse": _number(math.sqrt(sum(e * e for e in errors) / len(errors)))}


def summarize(instances: Sequence[Mapping[str, Any]], labels: Sequence[Any], lines: Sequence[int],
              candidate: Sequence[Any], base: Sequence[Any] | None, kind: str) -> dict[str, Any]:
    """What the card shows: rows, each version's metrics, their agreement and up to five rows they disagree on.
    `candidate` and `base` are one answer per row (`one_value`); `base` is None when there is no default."""
    answer: dict[str, Any] = {"rows": len(labels), "kind": kind, "candidate": metrics(candidate, labels, kind),
                              "base": None, "agreement": None, "disagreements": []}
    if base is None:
        return answer
    alike = 0
    for i, (c, b) in enumerate(zip(candidate, base)):
        if agree(c, b):
            alike += 1
        elif len(answer["disagreements"]) < MAX_DISAGREEMENTS:
            answer["disagreements"].append({"line": lines[i], "inputs": dict(instances[i]), "label": labels[i],
                                            "candidate": c, "base": b})
    answer.update(base=metrics(base, labels, kind), agreement=alike / len(labels))
    return answer


def direction(metric: str) -> str:
    """Which way a metric of an evaluation is better: "lower" for errors, "higher" for accuracy and recall."""
    return "lower" if metric in LOWER_IS_BETTER else "higher"


def gate_facts(metric: str, result: Mapping[str, Any]) -> dict[str, Any]:
    """The values the gate compares: the metric for both versions, their delta and which way is better."""
    cand = (result.get("candidate") or {}).get(metric)
    base = (result.get("base") or {}).get(metric)
    delta = (float(cand) - float(base) if isinstance(cand, (int, float)) and isinstance(base, (int, float))
             and not isinstance(cand, bool) and not isinstance(base, bool) else None)
    return {"candidate": cand, "base": base, "delta": delta,
            "direction": direction(metric)}


def gate_why(metric: str, min_delta: float, result: Mapping[str, Any]) -> str | None:
    """Why the gate (`on: evaluation`) keeps a candidate from review, or None when it may be reviewed: the
    evaluation failed, the metric is missing or not a number, or it changed by less than `min_delta` in the better
    direction against the default's on the same rows."""
    if result.get("state") == "failed":
        return f"the evaluation failed: {result.get('error')}"
    facts = gate_facts(metric, result)
    if facts["candidate"] is None:
        known = ", ".join(sorted(result.get("candidate") or {})) or "none"
        return f"{metric} is not among the evaluation's metrics ({known})"
    if isinstance(facts["candidate"], str):
        return f"{metric} is {facts['candidate']} on the evaluation data"
    if facts["delta"] is None:  # no default to compare with (or its value is not a number): nothing fell
        return None
    change = facts["delta"] if facts["direction"] == "higher" else -facts["delta"]
    if change < min_delta:
        return (f"{metric} on the evaluation data changed by {facts['delta']:+.4f} "
                f"(the gate allows {min_delta:+.4f} in the better direction)")
    return None
