"""Whether two versions answered an instance alike: what `predict --compare` and the card's Try report.

An answer is one instance's prediction as the prediction API gives it: a dict of outputs, or a bare value when
the signature has one output. Two answers agree when their decisions agree: the integer and text outputs (class
ids, labels) are equal; with none of those, every number is within a relative 1e-3 (or 1e-6 near zero) of the
other. Probabilities and logits are compared only when no decision output exists: a retrain that is surer of
the same class agrees.
"""

from __future__ import annotations

import math
from typing import Any

REL_TOL, ABS_TOL = 1e-3, 1e-6


def _leaves(value: Any, path: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [leaf for k in sorted(value) for leaf in _leaves(value[k], f"{path}/{k}")]
    if isinstance(value, list):
        return [leaf for i, v in enumerate(value) for leaf in _leaves(v, f"{path}/{i}")]
    return [(path, value)]


def _decision(value: Any) -> bool:
    return isinstance(value, (str, int))  # text, integers and booleans (an int)


def agree(a: Any, b: Any) -> bool:
    """Whether two answers to one instance agree (see the module's rule)."""
    left, right = _leaves(a), _leaves(b)
    if [p for p, _ in left] != [p for p, _ in right]:
        return False  # different outputs or shapes: not the same answer
    pairs = list(zip((v for _, v in left), (v for _, v in right)))
    decisions = [(x, y) for x, y in pairs if _decision(x) or _decision(y)]
    if decisions:
        return all(x == y for x, y in decisions)
    return all(isinstance(x, (int, float)) and isinstance(y, (int, float))
               and math.isclose(x, y, rel_tol=REL_TOL, abs_tol=ABS_TOL) for x, y in pairs)


def agreement(left: list[Any], right: list[Any]) -> float | None:
    """The share of instances answered alike (None without instances, or when the counts differ)."""
    if not left or len(left) != len(right):
        return None
    return sum(agree(a, b) for a, b in zip(left, right)) / len(left)
