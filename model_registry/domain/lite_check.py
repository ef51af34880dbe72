"""Whether a TensorFlow Lite copy answers as its SavedModel does: the instances both run on, and the comparison.

The instances are the rows of the model's evaluation data when `evaluation: {data, label, output}` is configured
(`csv_instances`), else built from the signature (`probe_instances`: deterministic, typed by dtype). The copy is
accepted when every float output is within TOLERANCE (max absolute difference) of the SavedModel's and every
integer, bool and string output is equal (`compare`).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from typing import Any, Mapping

from model_registry.domain.errors import InvalidInput
from model_registry.domain.instances import dtype_name

FORMATS = ("savedmodel", "tflite")  # what `pull --format` makes: the SavedModel, or a checked LiteRT copy

TOLERANCE = 1e-4
TOLERANCE_TEXT = "max abs difference 1e-4 for float outputs, equal for integer, bool and string outputs"
PROBES = 16  # instances built from the signature when no evaluation data is configured
MAX_ROWS = 1000  # rows of the evaluation data compared (the first ones)
_WORDS = ("good", "bad", "a long and quiet film", "", "great acting, dull plot", "ok")
_GOLDEN = (math.sqrt(5) - 1) / 2  # a low-discrepancy step: values spread evenly over the range, no randomness


def _is_float(dtype: str) -> bool:
    return dtype_name(dtype).startswith(("float", "bfloat", "half"))


def _probe_value(dtype: str, n: int) -> Any:
    """The n-th deterministic value of a dtype, in ranges common for features: floats in [-1, 8), small ints."""
    short, frac = dtype_name(dtype), (n * _GOLDEN) % 1.0
    if _is_float(short):
        return round(-1.0 + 9.0 * frac, 4)
    if short == "bool":
        return n % 2 == 1
    if short == "string":
        return _WORDS[n % len(_WORDS)]
    if short == "uint8":
        return int(frac * 256)
    if short.startswith(("int", "uint")):
        return int(frac * 10)
    raise InvalidInput(f"no test values can be made for the dtype {short}",
                       "configure `evaluation: {data, label, output}` for the model in starchart.yaml")


def _filled(dtype: str, dims: list[int], start: int) -> Any:
    if not dims:
        return _probe_value(dtype, start)
    size = dims[0] if dims[0] > 0 else 1  # unknown sizes taken as 1
    stride = math.prod(d if d > 0 else 1 for d in dims[1:])
    return [_filled(dtype, dims[1:], start + i * stride) for i in range(size)]


def probe_instances(inputs: Mapping[str, Any], count: int = PROBES) -> list[dict[str, Any]]:
    """`count` instances of the signature's inputs: the same every time, each value of its input's dtype."""
    if not inputs:
        raise InvalidInput("the version's signature has no inputs to test the copy with",
                           "expose the version again so that its signature is read, or pull the SavedModel")
    out = []
    for i in range(count):
        instance = {}
        for j, (name, spec) in enumerate(sorted(inputs.items())):
            shape = spec.get("shape")
            dims = [int(d) for d in shape[1:]] if shape else []
            instance[name] = _filled(str(spec.get("dtype")), dims, i * 7919 + j * 104729 + 1)
        out.append(instance)
    return out


def _cell(raw: str, dtype: str, where: str,
          hint: str = "fix the evaluation data: each column holds values of its input's dtype") -> Any:
    short, text = dtype_name(dtype), raw.strip()
    try:
        if _is_float(short):
            return float(text)
        if short == "bool":
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if short.startswith(("int", "uint")):
            return int(text)
    except ValueError:
        raise InvalidInput(f"{where}: {raw!r} is not a {short} value", hint) from None
    return raw


@dataclass(frozen=True)
class Rows:
    """Rows of evaluation data: the instances, their labels (typed as `label_dtype`, when asked) and CSV lines."""

    instances: list[dict[str, Any]]
    labels: list[Any]
    lines: list[int]


def csv_rows(text: str, inputs: Mapping[str, Any], label: str, source: str, limit: int = MAX_ROWS,
             label_dtype: str | None = None, output: str | None = None) -> Rows:
    """The first `limit` rows of a CSV with a header naming the signature's inputs and the label. With
    `label_dtype` (the dtype of the output the label is compared with, named `output`), the labels too."""
    names = sorted(inputs)
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in [*names, label] if c not in (reader.fieldnames or [])]
    if missing:
        raise InvalidInput(f"the evaluation data {source} has no column {', '.join(missing)} "
                           f"(its header: {', '.join(reader.fieldnames or []) or 'none'})",
                           f"its columns are the signature's inputs ({', '.join(names)}) and the label ({label})")
    nested = [n for n in names if len(inputs[n].get("shape") or [-1]) > 1]
    if nested:
        raise InvalidInput(f"the inputs {', '.join(nested)} take more than one value per instance, which a CSV "
                           "column cannot hold", "remove `evaluation` for this model: the copy is then checked "
                                                 "with test values built from the signature")
    label_hint = (f"the label column {label} holds the answers the output {output} should give "
                  f"({dtype_name(label_dtype)} values)") if label_dtype else ""
    out = Rows([], [], [])
    for number, row in enumerate(reader, start=2):  # line 1 is the header
        if len(out.instances) == limit:
            break
        out.instances.append({n: _cell(row[n] or "", str(inputs[n].get("dtype")), f"{source} line {number}, column {n}")
                              for n in names})
        if label_dtype:
            out.labels.append(_cell(row[label] or "", label_dtype, f"{source} line {number}, column {label}",
                                    label_hint))
        out.lines.append(number)
    if not out.instances:
        raise InvalidInput(f"the evaluation data {source} has no rows", "add rows below its header")
    return out


def csv_instances(text: str, inputs: Mapping[str, Any], label: str, source: str,
                  limit: int = MAX_ROWS) -> list[dict[str, Any]]:
    """The first `limit` rows of a CSV with a header naming the signature's inputs and the label, as instances."""
    return csv_rows(text, inputs, label, source, limit).instances


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def _shape(value: Any) -> list[int]:
    dims = []
    while isinstance(value, list):
        dims.append(len(value))
        value = value[0] if value else None
    return dims


def _difference(a: Any, b: Any) -> float:
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return 0.0 if a == b else math.inf
    if math.isnan(a) or math.isnan(b):
        return 0.0 if math.isnan(a) and math.isnan(b) else math.inf
    if a == b:  # the same infinity
        return 0.0
    return abs(float(a) - float(b))


def compare(saved: Mapping[str, list[Any]], lite: Mapping[str, list[Any]],
            outputs: Mapping[str, Any]) -> dict[str, Any]:
    """The copy's outputs against the SavedModel's, one list of values per instance for each output.

    The answer: `ok`, `instances`, `max_abs_diff` (over float outputs), per output its `max_abs_diff` or its
    `mismatches` (instances that differ), and `worst`: the output that fails (or differs most) and by how much.
    """
    names = sorted(saved)
    if set(lite) != set(saved):
        return {"ok": False, "instances": 0, "max_abs_diff": math.inf, "outputs": {},
                "worst": {"output": ", ".join(sorted(set(lite) ^ set(saved))), "difference": math.inf,
                          "why": f"the copy's outputs are {', '.join(sorted(lite))}, the SavedModel's "
                                 f"{', '.join(names)}"}}
    count = len(saved[names[0]]) if names else 0
    per: dict[str, Any] = {}
    failures: list[tuple[int, float, str, str]] = []  # (kind: shape, exact, float; -difference; output; why)
    top = 0.0
    for name in names:
        dtype = str((outputs.get(name) or {}).get("dtype", ""))
        a, b = saved[name], lite[name]
        if len(a) != len(b) or _shape(a) != _shape(b):
            per[name] = {"shapes": [_shape(a), _shape(b)]}
            failures.append((0, -math.inf, name, f"output {name} has shape {_shape(b)} in the copy and "
                                                 f"{_shape(a)} in the SavedModel"))
            continue
        diffs = [max((_difference(x, y) for x, y in zip(_leaves(ra), _leaves(rb))), default=0.0)
                 for ra, rb in zip(a, b)]
        largest = max(diffs, default=0.0)
        if dtype and not _is_float(dtype):  # integer, bool, string outputs (class ids, labels): equal or not
            wrong = [i for i, d in enumerate(diffs) if d > 0]
            per[name] = {"mismatches": len(wrong)}
            if wrong:
                failures.append((1, -largest, name, f"output {name} ({dtype_name(dtype)}) differs in {len(wrong)} of "
                                                    f"{len(a)} instances (first: instance {wrong[0]})"))
            continue
        per[name] = {"max_abs_diff": largest}
        top = max(top, largest)
        if largest > TOLERANCE:
            shown = "by not a number or an infinity" if largest == math.inf else f"by up to {largest:.3g}"
            failures.append((2, -largest, name, f"output {name} differs {shown} (instance {diffs.index(largest)})"))
    answer: dict[str, Any] = {"ok": not failures, "instances": count, "max_abs_diff": top, "outputs": per}
    if failures:
        _kind, minus, name, why = min(failures)
        answer["worst"] = {"output": name, "difference": -minus, "why": why}
    return answer
