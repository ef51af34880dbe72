"""The local model server's side of a canary: which version answers a request to the default, the figures per
side, and the mirrored requests. Standard library only (the model server may run in another Python).

The pointer file's `canary: {version, percent, mirror, id}` splits the default's route: each request goes to the
candidate with probability percent/100, drawn at random per request (no stickiness: a client's requests may land
on both sides). Requests, errors (any answer but 200 once the body was read as JSON) and latency are counted per
side for the canary's id, in memory: a restarted model server counts from zero. Of the requests the default
answered, a share `mirror` is queued for the candidate on a thread of its own (the request's answer does not wait;
a full queue drops the sample and counts it), and each instance's two answers are compared with answers.agree.
"""

from __future__ import annotations

import importlib.util
import queue
import random
import threading
from collections import deque
from pathlib import Path
from typing import Any, Callable

try:
    from model_registry.domain import answers
except ImportError:  # run by a Python without this project: the domain's rule is one stdlib file in the tree
    _spec = importlib.util.spec_from_file_location(
        "starchart_answers", Path(__file__).resolve().parents[2] / "domain" / "answers.py")
    assert _spec is not None and _spec.loader is not None
    answers = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(answers)

LATENCIES_KEPT = 4096  # latencies per side the percentiles are computed from (the newest)
MIRROR_QUEUE = 64  # mirrored requests waiting for the candidate; more are dropped (and counted)
CANDIDATE, BASE = "candidate", "base"


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by the nearest rank; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


class _Side:
    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.latencies: deque[float] = deque(maxlen=LATENCIES_KEPT)

    def figures(self) -> dict[str, Any]:
        kept = list(self.latencies)
        p50, p99 = percentile(kept, 50), percentile(kept, 99)
        return {"requests": self.requests, "errors": self.errors,
                "p50_ms": None if p50 is None else round(p50, 3), "p99_ms": None if p99 is None else round(p99, 3)}


class _Canary:
    def __init__(self, canary_id: str, candidate: str) -> None:
        self.id, self.candidate = canary_id, candidate
        self.sides = {CANDIDATE: _Side(), BASE: _Side()}
        self.mirrored = self.agreed = self.mirror_errors = self.dropped = 0


class Canaries:
    """Every canary this server has seen, by model: routing, counting and mirroring."""

    def __init__(self, answer: Callable[[str, str, dict[str, Any]], dict[str, Any]],
                 draw: Callable[[], float] = random.random) -> None:
        self.answer = answer  # (model, version, body) -> the version's answer, as predict gives it
        self.draw = draw
        self.lock = threading.Lock()
        self.by_model: dict[str, _Canary] = {}
        self.mirrors: queue.Queue[tuple[str, str, str, dict[str, Any], list[Any]]] = queue.Queue(MIRROR_QUEUE)
        threading.Thread(target=self._mirror_loop, name="canary-mirror", daemon=True).start()

    def route(self, model: str, pointer: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
        """(the version to answer a request to the default: the candidate or None for the default, the canary)."""
        canary = pointer.get("canary")
        if not isinstance(canary, dict) or canary.get("version") not in (pointer.get("versions") or {}):
            return None, None
        return (canary["version"] if self.draw() * 100 < float(canary.get("percent") or 0) else None), canary

    def _of(self, model: str, canary: dict[str, Any]) -> _Canary:
        current = self.by_model.get(model)
        if current is None or current.id != canary.get("id"):
            current = self.by_model[model] = _Canary(str(canary.get("id")), str(canary["version"]))
        return current

    def count(self, model: str, canary: dict[str, Any], side: str, seconds: float, ok: bool) -> None:
        with self.lock:
            counted = self._of(model, canary).sides[side]
            counted.requests += 1
            counted.errors += 0 if ok else 1
            counted.latencies.append(seconds * 1000)

    def maybe_mirror(self, model: str, canary: dict[str, Any], body: Any, answer: dict[str, Any]) -> None:
        """A request the default answered: a share of them also goes to the candidate, off the request's path."""
        share = float(canary.get("mirror") or 0)
        if not share or not isinstance(body, dict) or "instances" not in body or self.draw() >= share:
            return
        try:
            self.mirrors.put_nowait((model, str(canary.get("id")), str(canary["version"]), body,
                                     list(answer.get("predictions") or [])))
        except queue.Full:
            with self.lock:
                self._of(model, canary).dropped += 1

    def _mirror_loop(self) -> None:
        while True:
            model, canary_id, candidate, body, defaults = self.mirrors.get()
            try:
                theirs: list[Any] | None = list(self.answer(model, candidate, body).get("predictions") or [])
            except Exception:  # the candidate refused or failed: none of these instances agree
                theirs = None
            with self.lock:
                counted = self.by_model.get(model)
                if counted is None or counted.id != canary_id:
                    continue  # that canary ended meanwhile
                counted.mirrored += len(defaults)
                if theirs is None or len(theirs) != len(defaults):
                    counted.mirror_errors += 1
                else:
                    counted.agreed += sum(answers.agree(a, b) for a, b in zip(defaults, theirs))

    def figures(self, model: str, canary: dict[str, Any] | None) -> dict[str, Any]:
        """The figures of the model's running canary (zero for one this server has not seen a request of)."""
        if not canary:
            return {"id": None}
        with self.lock:
            counted = self._of(model, canary)
            return {"id": counted.id, "candidate_version": counted.candidate,
                    "candidate": counted.sides[CANDIDATE].figures(), "base": counted.sides[BASE].figures(),
                    "mirrored": counted.mirrored, "agreed": counted.agreed, "mirror_errors": counted.mirror_errors,
                    "mirror_dropped": counted.dropped}
