"""A canary rollout's rules, with no I/O: what a canary asks for, how its figures are judged.

A promotion request opened with `--canary PCT [--bake 30m]` is approved as any other; its apply then sends PCT% of
the default's traffic to the candidate instead of switching the default (promotion.py: state `canary`). While it
bakes, the backend counts requests, errors and latency per side, and a sample of the default's requests is also
answered by the candidate off the request's path (mirrored) and compared with answers.agree.

`judge` decides, from the figures, each time the worker looks:
- rolled back at once when the candidate has had at least `min_requests` requests and its error rate passes both
  `max_error_rate` and the default's error rate (input the default refuses as well is not the candidate's fault),
  or when both sides have had `min_requests` requests and the candidate's p99 latency over the default's passes
  `max_p99_ratio`;
- at the end of a clean bake: promoted with `auto_promote`, else left waiting for a person; a bake that ended with
  fewer than `min_requests` requests to the candidate always waits for a person (no evidence is not clean).
Agreement is shown, never judged: a backend that mirrors nothing (Vertex AI) is judged by the same rules.
When the backend cannot give the figures at all, `unread`: nothing is decided until it can.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Mapping

from model_registry.domain.errors import InvalidInput
from model_registry.domain.names import iso, parse_duration

PERCENT_RANGE = (1, 99)
ROLLBACK, PROMOTE, WAIT, BAKE = "rollback", "promote", "wait", "bake"


@dataclass(frozen=True)
class CanaryPolicy:
    """`canary: {percent, bake, max_error_rate, max_p99_ratio, auto_promote, min_requests, mirror}`."""

    percent: int = 10
    bake: timedelta = timedelta(minutes=30)
    max_error_rate: float = 0.01
    max_p99_ratio: float = 2.0
    auto_promote: bool = False
    min_requests: int = 20  # requests a side needs before its figures are judged
    mirror: float = 0.1  # share of the default's requests also answered by the candidate, for agreement

    def __post_init__(self) -> None:
        check_percent(self.percent, "canary.percent")
        if self.bake <= timedelta(0):
            raise ValueError("`canary.bake` must be longer than 0s, e.g. 30m")
        if not 0 <= self.max_error_rate <= 1:
            raise ValueError(f"`canary.max_error_rate` is a share from 0 to 1 (0.01 is 1%), not {self.max_error_rate}")
        if not self.max_p99_ratio >= 1:
            raise ValueError(f"`canary.max_p99_ratio` is a ratio of at least 1 (2.0: twice the default's p99), "
                             f"not {self.max_p99_ratio}")
        if self.min_requests < 1:
            raise ValueError(f"`canary.min_requests` must be at least 1, not {self.min_requests}")
        if not 0 <= self.mirror <= 1:
            raise ValueError(f"`canary.mirror` is a share from 0 to 1, not {self.mirror}")


POLICY_FIELDS = ("percent", "bake", "max_error_rate", "max_p99_ratio", "auto_promote", "min_requests", "mirror")


def canary_policy(raw: Any) -> CanaryPolicy:
    """The `canary:` mapping of starchart.yaml, checked (ValueError says what is wrong)."""
    if raw is None:
        return CanaryPolicy()
    if not isinstance(raw, Mapping):
        raise ValueError("`canary` must be a mapping: {percent: 10, bake: 30m, max_error_rate: 0.01, "
                         "max_p99_ratio: 2.0, auto_promote: false}")
    unknown = sorted(set(raw) - set(POLICY_FIELDS))
    if unknown:
        raise ValueError(f"`canary` has no key {', '.join(unknown)} (known: {', '.join(POLICY_FIELDS)})")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "bake":
            try:
                values[key] = parse_duration(str(value))
            except InvalidInput:
                raise ValueError(f"`canary.bake` is a duration such as 30m or 2h, not {value!r}") from None
        elif key == "auto_promote":
            if not isinstance(value, bool):
                raise ValueError(f"`canary.auto_promote` is true or false, not {value!r}")
            values[key] = value
        elif key in ("percent", "min_requests"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"`canary.{key}` is a whole number, not {value!r}")
            values[key] = value
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"`canary.{key}` is a number, not {value!r}")
            values[key] = float(value)
    return CanaryPolicy(**values)


def check_percent(value: Any, what: str = "--canary") -> int:
    low, high = PERCENT_RANGE
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{what} is the candidate's share of the default's traffic, a whole percent from {low} to "
                         f"{high}, not {value!r}")
    return value


@dataclass(frozen=True)
class Plan:
    """What a request asks of its canary: the candidate's share of the traffic and how long it bakes."""

    percent: int
    bake: timedelta


def plan(percent: str | None, bake: str | None, policy: CanaryPolicy) -> Plan | None:
    """`--canary PCT [--bake D]` as typed (`--canary` alone: the configured percent); None without --canary."""
    if percent is None:
        if bake is not None:
            raise InvalidInput("--bake is how long a canary runs, but there is no --canary",
                               "add --canary PCT (e.g. --canary 10 --bake 30m), or drop --bake")
        return None
    text = percent.strip().rstrip("%")
    if not text:
        chosen = policy.percent
    else:
        try:
            chosen = check_percent(int(text))
        except ValueError:
            raise InvalidInput(f"--canary {percent!r} is not a percent from {PERCENT_RANGE[0]} to {PERCENT_RANGE[1]}",
                               "give the candidate's share of the default's traffic, e.g. --canary 10") from None
    if bake is None:
        return Plan(chosen, policy.bake)
    try:
        length = parse_duration(bake)
    except InvalidInput:
        raise InvalidInput(f"--bake {bake!r} is not a duration", "give a number and a unit, e.g. --bake 30m, "
                           "--bake 2h, --bake 90s") from None
    if length <= timedelta(0):
        raise InvalidInput("--bake 0 would end the canary as it starts", "give it some time, e.g. --bake 30m")
    return Plan(chosen, length)


@dataclass(frozen=True)
class Side:
    """One side's traffic during a canary: requests answered, of which errors, and latency in milliseconds."""

    requests: int = 0
    errors: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "errors": self.errors, "error_rate": round(self.error_rate, 6),
                "p50_ms": self.p50_ms, "p99_ms": self.p99_ms}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> Side:
        raw = raw or {}
        return cls(int(raw.get("requests") or 0), int(raw.get("errors") or 0),
                   _ms(raw.get("p50_ms")), _ms(raw.get("p99_ms")))


def _ms(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class Figures:
    """Both sides of a canary, and the agreement of their answers on mirrored requests (instances compared)."""

    candidate: Side
    base: Side
    mirrored: int = 0  # instances of the default's requests the candidate answered too
    agreed: int = 0  # of which the candidate's answer agreed with the default's
    at: str | None = None  # when the backend was asked (ISO)

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.mirrored if self.mirrored else None

    def as_dict(self) -> dict[str, Any]:
        return {"candidate": self.candidate.as_dict(), "base": self.base.as_dict(), "mirrored": self.mirrored,
                "agreed": self.agreed, "agreement": None if self.agreement is None else round(self.agreement, 6),
                "at": self.at}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> Figures | None:
        if not raw or "candidate" not in raw:
            return None
        return cls(Side.from_dict(raw.get("candidate")), Side.from_dict(raw.get("base")),
                   int(raw.get("mirrored") or 0), int(raw.get("agreed") or 0), raw.get("at"))


@dataclass(frozen=True)
class Verdict:
    action: str  # rollback | promote | wait (for a person) | bake (keep going)
    why: str


def _pct(share: float) -> str:
    return f"{100 * share:.1f}%"


def judge(figures: Figures | None, policy: CanaryPolicy, bake_until: datetime, now: datetime) -> Verdict:
    """What a running canary should do now (see the module's rules)."""
    if figures is not None:
        cand, base = figures.candidate, figures.base
        if cand.requests >= policy.min_requests and cand.error_rate > policy.max_error_rate \
                and cand.error_rate > base.error_rate:
            return Verdict(ROLLBACK, f"the candidate's error rate {_pct(cand.error_rate)} ({cand.errors} of "
                                     f"{cand.requests} requests) passed max_error_rate {_pct(policy.max_error_rate)} "
                                     f"(the default's: {_pct(base.error_rate)})")
        if cand.requests >= policy.min_requests and base.requests >= policy.min_requests \
                and cand.p99_ms is not None and base.p99_ms and cand.p99_ms / base.p99_ms > policy.max_p99_ratio:
            return Verdict(ROLLBACK, f"the candidate's p99 latency {cand.p99_ms:.1f} ms is "
                                     f"{cand.p99_ms / base.p99_ms:.2f}x the default's {base.p99_ms:.1f} ms "
                                     f"(max_p99_ratio {policy.max_p99_ratio:g})")
    if now < bake_until:
        return Verdict(BAKE, f"baking until {iso(bake_until)}")
    if figures is None:
        return Verdict(WAIT, "the bake is over; this backend gives no per-version figures, so a person decides: "
                             "Promote to 100% or Roll back")
    if figures.candidate.requests < policy.min_requests:
        answered = figures.candidate.requests
        return Verdict(WAIT, f"the bake is over but the candidate answered {answered} request"
                             f"{'' if answered == 1 else 's'}, fewer than the {policy.min_requests} needed to judge it: "
                             "a person decides")
    if policy.auto_promote:
        return Verdict(PROMOTE, f"a clean bake: {figures.candidate.requests} requests to the candidate, error rate "
                                f"{_pct(figures.candidate.error_rate)}, within the limits")
    return Verdict(WAIT, "a clean bake; auto_promote is off, so a person decides: Promote to 100% or Roll back")


def unread(reason: str, bake_until: datetime, now: datetime) -> Verdict:
    """A running canary whose figures the backend could not give this time: nothing is decided on missing
    figures (neither rolled back nor promoted, whatever the last figures said); it keeps baking, or waits."""
    why = (f"the figures could not be read ({reason}); nothing is rolled back or promoted on missing figures, the "
           f"worker reads them again at its next pass")
    return Verdict(BAKE if now < bake_until else WAIT, why)


def split(base: str | None, candidate: str, percent: int) -> dict[str, int]:
    """The traffic split of a running canary, by version."""
    return {**({base: 100 - percent} if base else {}), candidate: percent}
