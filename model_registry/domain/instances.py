"""Prediction instances checked against a version's signature, before any backend sees them.

A signature's inputs are `{name: {"dtype": "DT_FLOAT" | "float32" | ..., "shape": [-1, ...] | None}}` (the
form stored with each version; the model server builds the same from TensorFlow's specs). A body is TF
Serving's row form `{"instances": [...]}` or columnar form `{"inputs": {...}}`. `check_body` refuses, naming
the input: a value that is not a scalar of the input's dtype (numbers finite unless allowed, no booleans for
numbers, integers in range), nesting or dimensions that do not fit the signature's shape, more than
`max_instances` rows in either form, or nesting deeper than MAX_DEPTH.

Standard library only: the model server, run as a file by another Python, loads this file too.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

MAX_DEPTH = 32  # levels of JSON nesting in a body; TensorFlow allows 254 dimensions and aborts beyond
MAX_INSTANCES = 1000

_SHORT = {
    "DT_FLOAT": "float32", "DT_DOUBLE": "float64", "DT_HALF": "float16", "DT_BFLOAT16": "bfloat16",
    "DT_INT8": "int8", "DT_INT16": "int16", "DT_INT32": "int32", "DT_INT64": "int64",
    "DT_UINT8": "uint8", "DT_UINT16": "uint16", "DT_UINT32": "uint32", "DT_UINT64": "uint64",
    "DT_STRING": "string", "DT_BOOL": "bool",
}
_FLOAT_MAX = {"float32": 3.4028234663852886e38, "float64": 1.7976931348623157e308, "float16": 65504.0,
              "bfloat16": 3.3895313892515355e38}
_INT_RANGE = {f"int{b}": (-(2 ** (b - 1)), 2 ** (b - 1) - 1) for b in (8, 16, 32, 64)}
_INT_RANGE.update({f"uint{b}": (0, 2 ** b - 1) for b in (8, 16, 32, 64)})
SUPPORTED = sorted({*_FLOAT_MAX, *_INT_RANGE, "string", "bool"})


class InstancesRefused(ValueError):
    """A body that does not fit the signature: `message` says what and where, in the user's words; `named`, the
    signature's inputs it names at its end, which a caller listing them itself (with their dtypes) leaves out
    (`without_names`)."""

    def __init__(self, message: str, named: list[str] | None = None) -> None:
        self.without_names = message
        self.message = message + (f" (the signature's inputs: {', '.join(named)})" if named else "")
        super().__init__(self.message)


def dtype_name(dtype: str) -> str:
    """TensorFlow's short name of a dtype ("float32") from either spelling ("DT_FLOAT" or "float32")."""
    return _SHORT.get(dtype.removesuffix("_REF"), dtype)


def example_value(spec: Mapping[str, Any]) -> Any:
    """One instance's value of an input, built from its signature: zero, false or an empty string, nested to the
    input's shape without its batch dimension (unknown sizes taken as 1)."""
    dtype = dtype_name(str(spec.get("dtype") or ""))
    value: Any = "" if dtype == "string" else False if dtype == "bool" else 0 if dtype in _INT_RANGE else 0.0
    for size in reversed(list(spec.get("shape") or [-1])[1:]):
        value = [value] * (size if isinstance(size, int) and size > 0 else 1)
    return value


def example_instance(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """An instance that fits a signature's inputs: one example value per input (see example_value)."""
    return {name: example_value(spec) for name, spec in sorted(inputs.items())}


def depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """Levels of lists and objects in `value`, without recursion; stops counting just past `limit`."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (list, dict)):
            level += 1
            deepest = max(deepest, level)
            if deepest > limit:
                return deepest
            stack.extend((v, level) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"the text {value[:40]!r}"
    if isinstance(value, dict):
        return "an object"
    return repr(value)[:40]


def check_scalar(value: Any, dtype: str, where: str, allow_non_finite: bool = False) -> None:
    """Refuse `value` unless it is one scalar of `dtype` (the short name)."""
    if dtype in _FLOAT_MAX:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InstancesRefused(f"{where}: expected {dtype} numbers, not {_describe(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            if not allow_non_finite:
                raise InstancesRefused(f"{where}: expected finite {dtype} numbers, not {value!r} "
                                       "(NaN, Infinity and numbers too large to represent are refused)")
        elif abs(value) > _FLOAT_MAX[dtype]:
            raise InstancesRefused(f"{where}: {_describe(value)} is out of {dtype}'s range "
                                   f"(at most {_FLOAT_MAX[dtype]:.7g} in size)")
    elif dtype in _INT_RANGE:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InstancesRefused(f"{where}: expected {dtype} integers, not {_describe(value)}")
        low, high = _INT_RANGE[dtype]
        if not low <= value <= high:
            raise InstancesRefused(f"{where}: {value} is out of {dtype}'s range ({low} to {high})")
    elif dtype == "string":
        if not isinstance(value, str):
            raise InstancesRefused(f"{where}: expected string values (JSON text), not {_describe(value)}")
    elif dtype == "bool":
        if not isinstance(value, bool):
            raise InstancesRefused(f"{where}: expected bool values (true or false), not {_describe(value)}")
    else:
        raise InstancesRefused(f"{where}: the input's dtype {dtype} cannot be given as JSON here "
                               f"(supported: {', '.join(SUPPORTED)})")


def _plain_scalar(value: Any, dtype: str, allow_non_finite: bool) -> bool:
    """Whether `value` is a scalar that check_scalar takes without a word, told cheaply (no refusal's text is
    made): most instances' inputs are such, and the full check of each cost a prediction tens of microseconds."""
    kind = type(value)
    if dtype in _FLOAT_MAX:
        if kind is float and not math.isfinite(value):
            return allow_non_finite
        return (kind is float or kind is int) and abs(value) <= _FLOAT_MAX[dtype]
    if dtype in _INT_RANGE:
        low, high = _INT_RANGE[dtype]
        return kind is int and low <= value <= high
    return (dtype == "string" and kind is str) or (dtype == "bool" and kind is bool)


def check_tensor(value: Any, dtype: str, dims: list[int] | None, where: str, allow_non_finite: bool = False,
                 shown: list[int] | None = None) -> None:
    """Refuse `value` unless it is a rectangular nesting of scalars of `dtype` fitting `dims`.

    `dims` are the expected sizes, outermost first (-1: any size); None: any rank up to MAX_DEPTH. `shown` is
    the signature's shape named in a refusal (default `dims`; one instance's dims lack the batch dimension).
    """
    if depth(value) > MAX_DEPTH:
        raise InstancesRefused(f"{where}: nested more than {MAX_DEPTH} levels deep")
    rank = len(dims) if dims is not None else None
    shape: list[int] = []
    level: list[Any] = [value]
    while level and any(isinstance(v, list) for v in level):
        if not all(isinstance(v, list) for v in level):
            raise InstancesRefused(f"{where}: mixes lists and single values at the same level (it must be "
                                   "rectangular)")
        sizes = {len(v) for v in level}
        if len(sizes) != 1:
            raise InstancesRefused(f"{where}: lists of different lengths {sorted(sizes)[:5]} at the same level "
                                   "(it must be rectangular)")
        shape.append(sizes.pop())
        level = [item for v in level for item in v]
    if rank is not None:
        if len(shape) != rank:
            want = "a single value" if rank == 0 else f"{rank} level(s) of lists"
            raise InstancesRefused(f"{where}: nested {len(shape)} level(s) deep, but the signature wants {want} "
                                   f"(shape {_shape_text(shown if shown is not None else dims)})")
        for i, (got, want_size) in enumerate(zip(shape, dims or [])):
            if want_size >= 0 and got != want_size:
                raise InstancesRefused(f"{where}: dimension {i + 1} has {got} values, but the signature wants "
                                       f"{want_size} (shape {_shape_text(shown if shown is not None else dims)})")
    for item in level:
        check_scalar(item, dtype, where, allow_non_finite)


def _shape_text(dims: list[int] | None) -> str:
    return "unknown" if dims is None else "[" + ", ".join("None" if d < 0 else str(d) for d in dims) + "]"


def _spec(inputs: Mapping[str, Any], name: str) -> tuple[str, list[int] | None]:
    spec = inputs[name]
    shape = spec.get("shape")
    return dtype_name(str(spec.get("dtype") or "")), (None if shape is None else [int(d) for d in shape])


def check_body(body: Any, inputs: Mapping[str, Any], max_instances: int = MAX_INSTANCES,
               allow_non_finite: bool = False) -> int:
    """Refuse a predict body that does not fit the signature's `inputs`; the number of instances it holds.

    With no `inputs` (a version whose signature is unknown), only the form, the depth and the count are checked.
    """
    if not isinstance(body, dict) or ("instances" in body) == ("inputs" in body):
        raise InstancesRefused('the body must be a JSON object with either "instances" (a list) or "inputs"')
    names = sorted(inputs)
    if "instances" in body:
        return _check_rows(body["instances"], inputs, names, max_instances, allow_non_finite)
    return _check_columns(body["inputs"], inputs, names, max_instances, allow_non_finite)


def _check_rows(instances: Any, inputs: Mapping[str, Any], names: list[str], max_instances: int,
                allow_non_finite: bool) -> int:
    if not isinstance(instances, list) or not instances:
        raise InstancesRefused('"instances" must be a non-empty list')
    if len(instances) > max_instances:
        raise InstancesRefused(f"{len(instances)} instances in one request; at most {max_instances}")
    if not names:  # no signature to name an input by: the depth of the whole list
        if depth(instances, MAX_DEPTH + 1) > MAX_DEPTH + 1:
            raise InstancesRefused(f"the instances are nested more than {MAX_DEPTH} levels deep")
        return len(instances)
    specs = {name: _spec(inputs, name) for name in names}
    for i, inst in enumerate(instances):
        if not isinstance(inst, dict):
            if len(names) != 1:
                raise InstancesRefused(f"instance {i} is not an object, but the signature has the inputs "
                                       f"{', '.join(names)}: give each instance as {{name: value}}")
            inst = {names[0]: inst}
        missing, extra = set(names) - set(inst), set(inst) - set(names)
        if missing or extra:
            raise InstancesRefused(f"instance {i}: " + "; ".join(
                ([f"missing input(s) {', '.join(sorted(missing))}"] if missing else [])
                + ([f"unknown input(s) {', '.join(sorted(map(str, extra)))}"] if extra else [])), named=names)
        for name in names:
            dtype, dims = specs[name]
            value = inst[name]
            if (dims is None or len(dims) == 1) and _plain_scalar(value, dtype, allow_non_finite):
                continue  # one scalar where one fits: what check_tensor would find, without its cost
            check_tensor(value, dtype, None if dims is None else dims[1:], f"instance {i}, input {name}",
                         allow_non_finite, shown=dims)
    return len(instances)


def _check_columns(columns: Any, inputs: Mapping[str, Any], names: list[str], max_instances: int,
                   allow_non_finite: bool) -> int:
    if len(names) == 1 and not isinstance(columns, dict):
        columns = {names[0]: columns}
    if not isinstance(columns, dict) or not columns or (names and set(columns) != set(names)):
        raise InstancesRefused('"inputs" must be an object naming exactly the inputs '
                               f"{', '.join(names) or '(any)'}")
    rows: dict[str, int] = {}
    for name, value in columns.items():
        if isinstance(value, list) and len(value) > max_instances:
            raise InstancesRefused(f"input {name}: {len(value)} instances in one request; at most {max_instances}")
        if not names:
            if depth(value) > MAX_DEPTH:
                raise InstancesRefused(f"input {name}: nested more than {MAX_DEPTH} levels deep")
            continue
        dtype, dims = _spec(inputs, name)
        if not isinstance(value, list) and dims is not None and len(dims) == 1:
            value = [value]  # one instance of a rank-1 input, given bare, as the model server accepts it
        check_tensor(value, dtype, dims, f"input {name}", allow_non_finite)
        if isinstance(value, list):
            rows[name] = len(value)
    if len(set(rows.values())) > 1:
        raise InstancesRefused("the inputs have different numbers of instances: "
                               + ", ".join(f"{k} {n}" for k, n in sorted(rows.items())))
    return max(rows.values(), default=1)
