"""Approval rules by what changes: which `rules:` entries apply to a request when it opens, and what they ask.

A rule applies to a breaking signature change, a metric that fell further than it allows, a rollback, or a canary
release. Each rule that applies becomes a `Requirement` stored with the request: why it applies, how many approvals
it needs and from whom (its own approvers, or the model's as they were when the request opened). Every requirement
must be met: an approval counts for each requirement whose approvers list the person, so two rules never waive
each other, and one person's approval may count for both. The strictest requirement (the most approvals; the first
listed on a tie) is the one a card names first and `show --json` gives as `rule`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Sequence

from model_registry.config import ModelPolicy, Rule
from model_registry.domain.diffs import metric_fell
from model_registry.domain.policy import MembersOf, is_listed

BREAKING_SHOWN = 3  # breaking changes named in a rule's why before "and N more"


@dataclass(frozen=True)
class Opening:
    """What a request is about as it opens: its kind (promote | apply | rollback), its diff, whether a canary."""

    kind: str
    diff: Mapping[str, Any]
    canary: bool = False  # a request opened with --canary


@dataclass(frozen=True)
class Requirement:
    """A rule that applies to one request: why, how many approvals, from whom (empty: anyone who may approve),
    and who has approved for it so far."""

    when: str
    why: str
    required_approvals: int
    approvers: tuple[str, ...] = ()
    approved_by: tuple[str, ...] = field(default=())

    @property
    def met(self) -> bool:
        return len(self.approved_by) >= self.required_approvals

    def counts(self, user: str, members_of: MembersOf) -> bool:
        """Whether `user`'s approval counts for this requirement."""
        return not self.approvers or is_listed(user, self.approvers, members_of)

    def approved(self, user: str) -> Requirement:
        return replace(self, approved_by=(*self.approved_by, user))

    def as_dict(self) -> dict[str, Any]:
        return {"when": self.when, "why": self.why, "required_approvals": self.required_approvals,
                "approvers": list(self.approvers), "approved_by": list(self.approved_by)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Requirement:
        return cls(when=str(raw["when"]), why=str(raw["why"]), required_approvals=int(raw["required_approvals"]),
                   approvers=tuple(str(a) for a in raw.get("approvers") or ()),
                   approved_by=tuple(str(a) for a in raw.get("approved_by") or ()))


def why_it_applies(rule: Rule, opening: Opening) -> str | None:
    """Why `rule` applies to a request opening as `opening`, in a reviewer's words; None when it does not."""
    if rule.when == "breaking_signature":
        breaking = list(opening.diff.get("signature", {}).get("breaking") or [])
        if not breaking:
            return None
        more = len(breaking) - BREAKING_SHOWN
        return "breaking change: " + "; ".join(breaking[:BREAKING_SHOWN]) + (f" and {more} more" if more > 0 else "")
    if rule.when == "metric_drop":
        fell = metric_fell(opening.diff, str(rule.metric), rule.min_delta)
        return f"metric drop: {fell}" if fell else None
    if rule.when == "rollback":
        if opening.kind != "rollback":
            return None
        return f"rollback to {(opening.diff.get('candidate') or {}).get('name') or 'the previous default'}"
    if rule.when == "canary":
        return "canary release" if opening.canary else None
    raise ValueError(f"unknown rule kind {rule.when!r}")  # the configuration refuses these at load


def requirements(policy: ModelPolicy, opening: Opening) -> list[Requirement]:
    """The requirements of the model's rules that apply, in the configuration's order; none: the model's policy
    (its approvers and required approvals) decides the request as it stands at each decision."""
    out = []
    for rule in policy.rules:
        why = why_it_applies(rule, opening)
        if why is None:
            continue
        count = rule.required_approvals if rule.required_approvals is not None else policy.required_approvals
        approvers = rule.approvers if rule.approvers is not None else policy.approvers
        out.append(Requirement(rule.when, why, count, tuple(approvers)))
    return out


def strictest(reqs: Sequence[Requirement]) -> Requirement | None:
    """The requirement asking the most approvals (the first listed on a tie), or None."""
    return max(reqs, key=lambda r: r.required_approvals, default=None)  # max keeps the first of equals


def required_approvals(reqs: Sequence[Requirement], default: int) -> int:
    """The approvals a request needs at least: the strictest rule's count, else the model's."""
    top = strictest(reqs)
    return top.required_approvals if top else default


def approvers(reqs: Iterable[Requirement]) -> tuple[str, ...] | None:
    """Who may decide on a request with requirements: everyone listed by one of them (() when one lists nobody,
    i.e. anyone may); None when there are no requirements (the model's approvers then decide)."""
    reqs = list(reqs)
    if not reqs:
        return None
    if any(not r.approvers for r in reqs):
        return ()
    listed: list[str] = []
    for r in reqs:
        listed += [a for a in r.approvers if a not in listed]
    return tuple(listed)


def asks(reqs: Iterable[Requirement]) -> str:
    """What the requirements ask, in one line (refusals and logs; the cards render their own)."""
    return "; ".join(f"{r.why} — {r.required_approvals} approval{'s' if r.required_approvals != 1 else ''} from "
                     f"{', '.join(r.approvers) or 'any approver'}" for r in reqs)
