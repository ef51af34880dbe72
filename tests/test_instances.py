"""The prediction input checks of model_registry/domain/instances.py, without a model or a server."""

from __future__ import annotations

import math
from typing import Any

import pytest

from model_registry.domain.instances import MAX_DEPTH, InstancesRefused, check_body, check_scalar, depth, dtype_name

IRIS = {k: {"dtype": "DT_FLOAT", "shape": [-1]} for k in ("petal_length", "petal_width", "sepal_length",
                                                            "sepal_width")}
FLOWER = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
TEXT = {"text": {"dtype": "DT_STRING", "shape": [-1]}}
IMAGE = {"pixels": {"dtype": "uint8", "shape": [-1, 2, 3]}}


def refused(body: Any, inputs: Any, *expected: str, **kw: Any) -> None:
    with pytest.raises(InstancesRefused) as exc:
        check_body(body, inputs, **kw)
    for text in expected:
        assert text in exc.value.message, (text, exc.value.message)


def nested(value: Any, levels: int) -> Any:
    for _ in range(levels):
        value = [value]
    return value


def test_good_bodies_pass_and_count_their_instances() -> None:
    assert check_body({"instances": [FLOWER, FLOWER]}, IRIS) == 2
    assert check_body({"inputs": {k: [v] * 3 for k, v in FLOWER.items()}}, IRIS) == 3
    assert check_body({"inputs": dict(FLOWER)}, IRIS) == 1  # one instance, bare values
    assert check_body({"instances": ["good", "bad"]}, TEXT) == 2
    assert check_body({"instances": [{"text": "good"}]}, TEXT) == 1
    assert check_body({"inputs": ["a", "b", "c"]}, TEXT) == 3
    assert check_body({"instances": [{"petal_length": 1, "petal_width": 0, "sepal_length": 2.5,
                                      "sepal_width": -3}]}, IRIS) == 1  # integers are numbers for floats
    assert check_body({"instances": [[[0, 1, 2], [3, 4, 255]]]}, IMAGE) == 1
    assert check_body({"instances": [1, [2, [3]]]}, {}) == 2  # no known signature: form, depth and count only


@pytest.mark.parametrize("value, expected", [
    (math.nan, "finite"), (math.inf, "finite"), (-math.inf, "finite"), (True, "not true"), (False, "not false"),
    ("5.1", "the text '5.1'"), (None, "not null"), ({"v": 1}, "an object"), (1e39, "out of float32's range"),
])
def test_float_inputs_want_finite_numbers(value: Any, expected: str) -> None:
    refused({"instances": [{**FLOWER, "sepal_width": value}]}, IRIS, "instance 0, input sepal_width", expected)


def test_non_finite_floats_only_when_allowed() -> None:
    body = {"instances": [{**FLOWER, "sepal_width": math.nan}]}
    assert check_body(body, IRIS, allow_non_finite=True) == 1
    check_scalar(1e300, "float64", "x")
    with pytest.raises(InstancesRefused, match="float16's range"):
        check_scalar(70000.0, "float16", "x")


def test_integers_in_range_and_not_booleans() -> None:
    ints = {"n": {"dtype": "DT_INT32", "shape": [-1]}}
    assert check_body({"instances": [2**31 - 1, -(2**31)]}, ints) == 2
    refused({"instances": [2**31]}, ints, "input n", "out of int32's range")
    refused({"instances": [True]}, ints, "expected int32 integers, not true")
    refused({"instances": [1.5]}, ints, "expected int32 integers")
    refused({"instances": [[[0, 1, 2], [3, 4, 256]]]}, IMAGE, "input pixels", "256 is out of uint8's range")
    refused({"instances": [[[0, 1, 2], [3, 4, -1]]]}, IMAGE, "out of uint8's range")
    check_scalar(2**64 - 1, "uint64", "x")


def test_strings_and_bools() -> None:
    for value in (5, 1.5, True, None, ["a"]):
        refused({"instances": [value]}, TEXT, "input text")
    flags = {"on": {"dtype": "DT_BOOL", "shape": [-1]}}
    assert check_body({"instances": [True, False]}, flags) == 2
    refused({"instances": [1]}, flags, "expected bool values")


def test_unsupported_dtypes_are_named() -> None:
    refused({"instances": [1]}, {"z": {"dtype": "DT_COMPLEX64", "shape": [-1]}}, "DT_COMPLEX64",
            "cannot be given as JSON")


def test_nesting_and_shape_follow_the_signature_rank() -> None:
    refused({"instances": [{**FLOWER, "sepal_length": [5.1]}]}, IRIS, "nested 1 level(s) deep",
            "wants a single value", "shape [None]")
    refused({"instances": [{**FLOWER, "sepal_length": nested(5.1, 300)}]}, IRIS, "sepal_length",
            f"nested more than {MAX_DEPTH} levels")
    refused({"inputs": {**{k: [v] for k, v in FLOWER.items()}, "petal_width": [[0.2]]}}, IRIS, "input petal_width",
            "nested 2 level(s)")
    refused({"instances": [[[0, 1], [3, 4]]]}, IMAGE, "dimension 2 has 2 values", "wants 3", "shape [None, 2, 3]")
    refused({"instances": [[[0, 1, 2]]]}, IMAGE, "dimension 1 has 1 values", "wants 2")
    refused({"instances": [[[0, 1, 2], [3, 4]]]}, IMAGE, "different lengths")
    refused({"instances": [[[0, 1, 2], 5]]}, IMAGE, "mixes lists and single values")
    unknown = {"x": {"dtype": "DT_FLOAT", "shape": None}}
    assert check_body({"instances": [[[1.0, 2.0]], [[3.0, 4.0]]]}, unknown) == 2
    refused({"instances": [nested(1.0, 40)]}, unknown, "nested more than")


def test_one_instance_limit_for_rows_and_columns() -> None:
    refused({"instances": [FLOWER] * 1001}, IRIS, "1001 instances in one request; at most 1000")
    refused({"inputs": {k: [v] * 50_000 for k, v in FLOWER.items()}}, IRIS, "50000 instances", "at most 1000")
    refused({"inputs": {"a": [1] * 1001}}, {}, "1001 instances")
    assert check_body({"instances": [FLOWER] * 5}, IRIS, max_instances=5) == 5
    refused({"inputs": {**{k: [v] * 3 for k, v in FLOWER.items()}, "sepal_width": [1.0, 2.0]}}, IRIS,
            "different numbers of instances", "sepal_width 2")


def test_the_form_of_the_body() -> None:
    for body in ([], "x", {"instances": [FLOWER], "inputs": {}}, {}):
        refused(body, IRIS, "either")
    refused({"instances": []}, IRIS, "non-empty list")
    refused({"instances": {"a": 1}}, IRIS, "non-empty list")
    refused({"instances": [5.1]}, IRIS, "instance 0 is not an object", "petal_length, petal_width")
    refused({"instances": [{"sepal_length": 5.1}]}, IRIS, "missing input(s) petal_length, petal_width, sepal_width")
    refused({"instances": [{**FLOWER, "colour": "blue"}]}, IRIS, "unknown input(s) colour")
    refused({"inputs": {"sepal_length": [1.0]}}, IRIS, "exactly the inputs")
    refused({"instances": nested([], 100)}, {}, "nested more than")


def test_depth_counts_without_recursion() -> None:
    assert depth(5) == 0 and depth([]) == 1 and depth({"a": [1, {"b": []}]}) == 4
    assert depth(nested(1, 100_000)) == MAX_DEPTH + 1  # stops just past the limit, no RecursionError


def test_dtype_names() -> None:
    assert dtype_name("DT_FLOAT") == "float32" and dtype_name("float32") == "float32"
    assert dtype_name("DT_INT64_REF") == "int64" and dtype_name("DT_STRING") == "string"


def test_example_instances_fit_the_signature_they_are_built_from() -> None:
    from model_registry.domain.instances import check_body, example_instance

    inputs = {"x": {"dtype": "DT_FLOAT", "shape": [-1, 2, 3]}, "n": {"dtype": "int64", "shape": [-1]},
              "text": {"dtype": "string", "shape": [-1]}, "flag": {"dtype": "bool", "shape": [-1, -1]}}
    example = example_instance(inputs)
    assert example == {"x": [[0.0] * 3] * 2, "n": 0, "text": "", "flag": [False]}
    assert check_body({"instances": [example]}, inputs) == 1


def test_answers_agree_on_decisions_and_on_numbers_within_a_tolerance() -> None:
    from model_registry.domain.answers import agree, agreement

    surer = {"class_ids": 2, "probabilities": [0.1, 0.2, 0.7]}
    assert agree(surer, {"class_ids": 2, "probabilities": [0.05, 0.05, 0.9]}), "the same class agrees"
    assert not agree(surer, {"class_ids": 1, "probabilities": [0.1, 0.7, 0.2]})
    assert agree([0.5, 1.0], [0.5002, 1.0]) and not agree([0.5, 1.0], [0.51, 1.0])
    assert not agree({"a": 1}, {"b": 1}), "other outputs are not the same answer"
    assert agreement([{"c": 1}, {"c": 2}], [{"c": 1}, {"c": 3}]) == 0.5
    assert agreement([], []) is None and agreement([1], [1, 2]) is None


def test_a_try_form_types_each_field_by_its_dtype_and_names_the_wrong_ones() -> None:
    import json

    from handlers.reviews import try_instance

    meta = json.dumps({"f": [["x", "DT_FLOAT", [-1]], ["n", "int32", [-1]], ["v", "float32", [-1, 2]],
                             ["s", "string", [-1]], ["b", "bool", [-1]]]})
    instance, errors = try_instance(meta, {"x": "1.5", "n": "3", "v": "[1, 2]", "s": " hi ", "b": "True"})
    assert errors == {} and instance == {"x": 1.5, "n": 3, "v": [1, 2], "s": " hi ", "b": True}
    _, errors = try_instance(meta, {"x": "nan", "n": "3.5", "v": "[1, 2, 3]", "s": "", "b": "yes"})
    assert set(errors) == {"x", "n", "v", "b"}
    assert "finite" in errors["x"] and "whole number" in errors["n"] and "true or false" in errors["b"]


SCALARS = [0, 1, -1, 255, 256, -129, 2 ** 31, 2 ** 63, 2 ** 64, -(2 ** 63) - 1, 10 ** 400, 0.5, -2.5, 1e38, 3.5e38,
           1e300, 70000.0, math.nan, math.inf, -math.inf, True, False, None, "", "x", [], [1.0], {}, {"a": 1}]


@pytest.mark.parametrize("allow_non_finite", [False, True])
def test_the_quick_scalar_check_takes_only_what_the_full_check_takes(allow_non_finite: bool) -> None:
    """An instance's scalar input is accepted without the full check only where the full check accepts it too:
    one check_body, with or without the shortcut, for every dtype and every kind of value."""
    from model_registry.domain.instances import SUPPORTED, _plain_scalar

    shortcuts = 0
    for dtype in SUPPORTED:
        for value in SCALARS:
            if not _plain_scalar(value, dtype, allow_non_finite):
                continue
            shortcuts += 1
            check_scalar(value, dtype, "here", allow_non_finite)  # raises if the shortcut took what it refuses
            inputs = {"x": {"dtype": dtype, "shape": [-1]}}
            assert check_body({"instances": [{"x": value}]}, inputs, allow_non_finite=allow_non_finite) == 1
    assert shortcuts > len(SUPPORTED), "the shortcut is taken for ordinary values"
    for dtype in SUPPORTED:  # and whatever the shortcut leaves to the full check is still refused as before
        for value in (v for v in SCALARS if not isinstance(v, list)):  # (a list: refused for its rank, not here)
            try:
                check_scalar(value, dtype, "here", allow_non_finite)
            except InstancesRefused as exc:
                assert not _plain_scalar(value, dtype, allow_non_finite), (dtype, value)
                refused({"instances": [{"x": value}]}, {"x": {"dtype": dtype, "shape": [-1]}},
                        exc.message.replace("here", "instance 0, input x"), allow_non_finite=allow_non_finite)
