"""A promotion request and its rules, as a plain object: no database, no Slack, no backend.

States: open → approved | rejected | expired | stale; approved → applying → applied | failed; failed → applying
(retry). A request with a canary (`canary_percent`) goes approved → applying → canary (the candidate takes its share
of the default's traffic, the default is unchanged) → applying → applied (promoted to 100%), or canary →
rolled_back; a failed promotion to 100% leaves the canary running. An apply in progress belongs to the process running it through a lease that process renews (`Lease`);
while it is live only the backend's own answer settles the request, once it lapses `settle` does. Each method checks one step against the facts it is given, changes the request, and returns what
happened: the audit events to record and, when the step is refused, the refusal to tell the person. The service
layer (model_registry.services.promotions) loads a request, calls one method, persists the request and appends the events
in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable

from model_registry.config import ModelPolicy
from model_registry.domain import approval_rules
from model_registry.domain import canary as canary_rules
from model_registry.domain.approval_rules import Requirement
from model_registry.domain.errors import InvalidInput, Refused, StarchartError
from model_registry.domain.names import iso
from model_registry.domain.policy import MembersOf, check_approver, is_listed

OPEN, APPROVED, APPLYING, APPLIED, FAILED, REJECTED, EXPIRED, STALE = (
    "open", "approved", "applying", "applied", "failed", "rejected", "expired", "stale",
)
CANARY, ROLLED_BACK = "canary", "rolled_back"
# the states an apply may start from (a failed one is a retry; a canary's is its promotion to 100%)
APPLICABLE = (APPROVED, FAILED, CANARY)


def require_reason(approve: bool, reason: str | None) -> None:
    """A rejection says why; checked before anything is looked up."""
    if not approve and not (reason or "").strip():
        raise InvalidInput("a rejection needs a reason", "say why, e.g. --reason 'accuracy dropped'")


def model_mismatch(model: str, request_id: int, actual: str) -> tuple[Refused, str]:
    """A button naming another model than its request's (tampered, or from another card): the refusal, and what the
    audit trail records of it."""
    return (Refused(f"that button names {model} but promotion request #{request_id} is for {actual}",
                    "use the buttons of the request's own card", reason="model_mismatch"),
            f"button names {model} but #{request_id} is {actual}")


@dataclass(frozen=True)
class Event:
    """An audit event a step produced; the service adds the request's model, version and id."""

    action: str
    actor: str
    details: dict[str, Any] = field(default_factory=dict)
    by_person: bool = False  # carries where the person acted (channel, message, display name)
    on_card: bool = False  # carries the request's own card (channel, message)


@dataclass(frozen=True)
class Decision:
    approver: str
    decision: str  # approve | reject
    reason: str | None
    at: datetime
    card_digest: str = ""


@dataclass(frozen=True)
class Click:
    """Where a decision came from: what the card's button carried (all None for a typed command)."""

    digest: str | None = None
    channel: str | None = None
    message_ts: str | None = None


@dataclass(frozen=True)
class Facts:
    """What the rules check a step against, read by the service in the step's transaction."""

    now: datetime
    current_default: str | None = None  # the model's default version now
    candidate_digest: str | None = None  # the candidate version's digest now
    trained_by: str = ""  # who trained the candidate


@dataclass(frozen=True)
class Lease:
    """Who runs an apply (a process: host:pid:random) and for how long a lease of it lasts unless renewed."""

    owner: str
    length: timedelta

    def __post_init__(self) -> None:
        if not self.owner.strip():
            raise InvalidInput("an apply's lease needs an owner", "name the process, e.g. host:pid:random")
        if self.length <= timedelta(0):
            raise InvalidInput(f"an apply's lease must last longer than 0s, not {self.length.total_seconds():g}s",
                               "give it a length of a few renewals, e.g. 60 seconds")


@dataclass(frozen=True)
class Seen:
    """What the backend showed as the model's default, and when it was asked (before the answer came)."""

    default: str | None
    asked_at: datetime
    canary: str | None = None  # the version the backend sends a canary's share of the traffic to, if any


@dataclass
class Outcome:
    """What one step did: events to record, the decision to store, or why it was refused."""

    events: list[Event] = field(default_factory=list)
    refusal: Refused | None = None
    decision: Decision | None = None
    started: bool = False  # start_apply: the backend is to be called now


@dataclass
class PromotionRequest:
    """One request to make `candidate` the default of `model` in place of `base`."""

    id: int
    model: str
    kind: str  # promote | apply | rollback
    candidate: str
    base: str | None
    candidate_digest: str
    card_digest: str
    requested_by: str
    required_approvals: int
    expires_at: datetime
    state: str = OPEN
    decisions: list[Decision] = field(default_factory=list)
    decided_at: datetime | None = None
    apply_started_at: datetime | None = None
    apply_owner: str | None = None  # the process running the apply while it is applying
    lease_until: datetime | None = None  # when the owner's lease lapses unless renewed
    applied_at: datetime | None = None
    error: str | None = None
    channel: str | None = None
    message_ts: str | None = None
    rules: list[Requirement] = field(default_factory=list)  # the approval rules that applied when it opened
    canary_percent: int | None = None  # a canary: the candidate's share of the default's traffic once applied
    canary_bake: timedelta | None = None
    canary_started_at: datetime | None = None
    canary_ended_at: datetime | None = None
    canary_ended_by: str | None = None
    canary_why: str | None = None  # why it was promoted or rolled back
    canary_figures: dict[str, Any] | None = None  # the figures last read from the backend

    @property
    def approvals(self) -> int:
        return sum(1 for d in self.decisions if d.decision == "approve")

    @property
    def complete(self) -> bool:
        """Whether the approvals are all there: every rule's, or (with none) the count the request opened with."""
        if self.rules:
            return all(r.met for r in self.rules)
        return self.approvals >= self.required_approvals

    def awaits(self, user: str, facts: Facts, policy: ModelPolicy, members_of: MembersOf) -> bool:
        """Whether the request waits for `user`'s decision: open, not expired, not decided by them, and they may
        decide on it (the same checks a click meets, staleness aside: the click finds that out)."""
        if self.state != OPEN or facts.now > self.expires_at or any(d.approver == user for d in self.decisions):
            return False
        try:
            self._check_approver(user, facts, policy, members_of)
        except Refused:
            return False
        return True

    def _check_approver(self, user: str, facts: Facts, policy: ModelPolicy, members_of: MembersOf) -> None:
        check_approver(policy, user, members_of, self.requested_by, facts.trained_by, self.model,
                       approvers=approval_rules.approvers(self.rules), needs=approval_rules.asks(self.rules))

    @property
    def starting_canary(self) -> bool:
        """An apply of this request starts its canary (rather than switching the default)."""
        return self.canary_percent is not None and self.canary_started_at is None

    @property
    def bake_until(self) -> datetime | None:
        if self.canary_started_at is None or self.canary_bake is None:
            return None
        return self.canary_started_at + self.canary_bake

    # ------------------------------------------------------------ decisions

    def decide(self, user: str, approve: bool, facts: Facts, policy: ModelPolicy, members_of: MembersOf, *,
               reason: str | None = None, click: Click = Click()) -> Outcome:
        """One approver's decision. Refused (and recorded) for: a button of another card, a closed or expired
        request, someone who may not decide, a stale card, a second decision by the same person."""
        require_reason(approve, reason)
        outcome = Outcome()
        refusal = self._decision_refusal(user, facts, policy, members_of, click, outcome)
        if refusal is not None:
            outcome.refusal = refusal
            outcome.events.append(Event("approval.refused", user.strip() or "unknown", {
                "reason": refusal.reason, "message": refusal.message,
                "decision": "approve" if approve else "reject"}, by_person=True))
            return outcome
        decision = Decision(user, "approve" if approve else "reject", reason, facts.now, self.card_digest)
        self.decisions.append(decision)
        outcome.decision = decision
        if not approve:
            self.state, self.decided_at = REJECTED, facts.now
            outcome.events.append(Event("promotion.rejected", user, {"reason": reason}, by_person=True))
            return outcome
        counted = [r.when for r in self.rules if r.counts(user, members_of)]
        self.rules = [r.approved(user) if r.counts(user, members_of) else r for r in self.rules]
        granted: dict[str, Any] = {"card_digest": self.card_digest}
        if self.rules:
            granted["counts_for"] = counted
        outcome.events.append(Event("approval.granted", user, granted, by_person=True))
        if self.complete:
            self.state, self.decided_at = APPROVED, facts.now
            approved: dict[str, Any] = {"approvals": self.approvals, "required": self.required_approvals}
            if self.rules:
                approved["rules"] = [{"when": r.when, "approved_by": list(r.approved_by)} for r in self.rules]
            outcome.events.append(Event("promotion.approved", "system", approved))
        return outcome

    def _decision_refusal(self, user: str, facts: Facts, policy: ModelPolicy, members_of: MembersOf, click: Click,
                          outcome: Outcome) -> Refused | None:
        clicked_elsewhere = click.message_ts is not None and self.message_ts is not None and (
            click.message_ts != self.message_ts or (click.channel is not None and click.channel != self.channel))
        if clicked_elsewhere or (click.digest is not None and click.digest != self.card_digest):
            # a button copied to another message, or a value edited: refuse without touching the request
            return Refused(f"that button does not belong to the card of promotion request #{self.id}",
                           "use the buttons on the request's own card", reason="card_mismatch")
        if self.state != OPEN:
            return Refused(f"promotion request #{self.id} is already {self.state}", "nothing left to decide",
                           reason="closed")
        if facts.now > self.expires_at:
            outcome.events += self.expire(facts.now)
            return Refused(f"promotion request #{self.id} expired at {iso(self.expires_at)}",
                           f"open a new one: `promote {self.model} {self.candidate}`", reason="expired")
        try:
            self._check_approver(user, facts, policy, members_of)
        except Refused as exc:
            return exc
        stale_why = self._stale_why(facts)
        if stale_why:
            self.state, self.decided_at = STALE, facts.now
            outcome.events.append(Event("promotion.stale", "system", {"why": stale_why}))
            return Refused(f"promotion request #{self.id} is stale: {stale_why}",
                           f"open a new one: `promote {self.model} {self.candidate}`", reason="stale")
        if any(d.approver == user for d in self.decisions):
            return Refused(f"{user} already decided on promotion request #{self.id}", "one decision per approver",
                           reason="duplicate")
        return None

    def _stale_why(self, facts: Facts) -> str | None:
        if facts.current_default != self.base:
            return f"the default moved from {self.base} to {facts.current_default} since the card was posted"
        if facts.candidate_digest != self.candidate_digest:
            return f"{self.candidate} changed since the card was posted"
        return None

    def expire(self, now: datetime) -> list[Event]:
        """An open request past its expiry closes as expired."""
        if self.state != OPEN or now <= self.expires_at:
            return []
        self.state, self.decided_at = EXPIRED, now
        return [Event("promotion.expired", "system")]

    # ------------------------------------------------------------ applying

    def start_apply(self, actor: str, facts: Facts, backend: str, lease: Lease,
                    busy_with: int | None = None, canary_of: int | None = None, why: str | None = None) -> Outcome:
        """approved (or failed: a retry; or canary: its promotion to 100%) → applying, when the approvals are all
        there and the default is still the base; the apply then belongs to `lease.owner` until its lease lapses.
        `busy_with`: another request of the model being applied now (one apply per model at a time); `canary_of`:
        another request of the model whose canary runs (its split holds the default's traffic). `why`: why a
        canary is promoted (a person's click, or the clean bake)."""
        if self.state not in APPLICABLE:
            return Outcome()  # applied, applying or closed already: nothing to start (double clicks, replicas)
        if canary_of is not None:
            return Outcome(refusal=Refused(
                f"promotion request #{canary_of} of {self.model} runs a canary", f"promote it to 100% or roll it "
                f"back (`canary {self.model} promote|rollback`), then retry #{self.id}", reason="busy"))
        if not self.complete:
            return Outcome(refusal=Refused(
                f"promotion request #{self.id} has {self.approvals} of {self.required_approvals} approvals",
                "wait for more approvals", reason="not_approved"))
        if facts.current_default != self.base:
            self.state = STALE
            return Outcome([Event("promotion.stale", "system", {"why": "the default moved before the apply"})])
        if busy_with is not None:
            return Outcome(refusal=Refused(f"promotion request #{busy_with} of {self.model} is being applied right "
                                           f"now", f"retry #{self.id} when it has finished", reason="busy"))
        if self.state == CANARY:
            self.canary_ended_by, self.canary_why = actor, why or f"promoted to 100% by {actor}"
        self.state, self.apply_started_at, self.error = APPLYING, facts.now, None
        self.apply_owner, self.lease_until = lease.owner, facts.now + lease.length
        details: dict[str, Any] = {"base": self.base, "backend": backend}
        if self.canary_percent is not None:
            details["canary"] = "start" if self.starting_canary else "promote"
        return Outcome([Event("promotion.applying", actor, details, on_card=True)], started=True)

    def lease_lapsed(self, at: datetime) -> bool:
        """An apply in progress whose owner has not renewed its lease by `at` (or that has no owner: recorded by
        a version without leases); False for a request not applying."""
        return self.state == APPLYING and (self.lease_until is None or self.lease_until <= at)

    def renew(self, owner: str, now: datetime, length: timedelta) -> bool:
        """The owner's lease runs `length` from now again; only the owner renews, and only while applying (a
        request settled meanwhile, or taken over by a retry, is no longer its to hold)."""
        if self.state != APPLYING or self.apply_owner != owner:
            return False
        self.lease_until = max(self.lease_until or now, now + length)
        return True

    def finish_apply(self, actor: str, now: datetime, error: str | None, switch_default: Callable[[], bool],
                     owner: str | None) -> list[Event]:
        """applying → applied (the default switched) or failed (with the reason), ending the lease.

        `owner`: whose backend call this is the result of (None: no process's; the outcome was read from the
        backend). A success is recorded whoever reports it, even on a request reconciled as failed meanwhile:
        the backend has the candidate. A failure is recorded only by the apply's own owner (or for an apply
        that has none): it says nothing of an apply another process runs now. `switch_default` moves the
        model's default from base to candidate if it still is base, and says whether it did.
        """
        late_success = error is None and self.state == FAILED
        if self.state != APPLYING and not late_success:
            return []  # settled by someone else meanwhile
        if error is not None and owner is not None and self.apply_owner not in (None, owner):
            return []  # a failure of an earlier attempt, reported after a retry took the request over
        if self.starting_canary:
            return self._canary_started(actor, now, error)
        if error is None and not switch_default():
            error = "the default moved while this request was being applied"  # refuse rather than guess
        self.apply_owner, self.lease_until = None, None
        promoting = self.canary_started_at is not None
        if error is not None:
            # a canary whose promotion failed keeps running: its split is as it was, the worker keeps judging it
            self.state, self.error = (CANARY if promoting else FAILED), error
            return [Event("promotion.failed", actor, {"error": error, **({"canary": "running"} if promoting else {})},
                          on_card=True)]
        self.state, self.applied_at, self.error = APPLIED, now, None
        events = [Event("promotion.applied", actor, {"base": self.base, "kind": self.kind}, on_card=True)]
        if promoting:
            self.canary_ended_at = now
            events.append(Event("canary.promoted", self.canary_ended_by or actor, {
                "why": self.canary_why, "split": {self.candidate: 100}, "figures": self.canary_figures}))
        return events

    def _canary_started(self, actor: str, now: datetime, error: str | None) -> list[Event]:
        """applying → canary: the backend sends the candidate its share; the default stays the base."""
        self.apply_owner, self.lease_until = None, None
        if error is not None:
            self.state, self.error = FAILED, error
            return [Event("promotion.failed", actor, {"error": error, "canary": "not started"}, on_card=True)]
        assert self.canary_percent is not None and self.canary_bake is not None
        self.state, self.error, self.canary_started_at = CANARY, None, now
        return [Event("canary.started", actor, {
            "percent": self.canary_percent, "bake_seconds": int(self.canary_bake.total_seconds()),
            "bake_until": iso(now + self.canary_bake), "base": self.base,
            "split": canary_rules.split(self.base, self.candidate, self.canary_percent)}, on_card=True)]

    def roll_back(self, actor: str, now: datetime, why: str) -> Outcome:
        """canary → rolled_back: the default keeps all its traffic (the service removed the split first)."""
        if self.state != CANARY:
            return Outcome(refusal=Refused(f"promotion request #{self.id} is {self.state}, not a running canary",
                                           "nothing to roll back", reason="closed"))
        self.state, self.canary_ended_at, self.canary_ended_by, self.canary_why = ROLLED_BACK, now, actor, why
        return Outcome([Event("canary.rolled_back", actor, {
            "why": why, "split": {self.base: 100} if self.base else {}, "figures": self.canary_figures},
            on_card=True)])

    def canary_refusal(self, user: str, promote: bool, policy: ModelPolicy, members_of: MembersOf,
                       trained_by: str) -> Refused | None:
        """Why `user` may not promote (or roll back) this canary, or None. Promoting to 100% is an approval and
        follows the approvals' policy (self-approval included); rolling back only needs an approver."""
        if self.state != CANARY:
            return Refused(f"promotion request #{self.id} is {self.state}, not a running canary",
                           f"see `canary {self.model} status`", reason="closed")
        if promote:
            try:
                check_approver(policy, user, members_of, self.requested_by, trained_by, self.model)
            except Refused as exc:
                return exc
            return None
        if not user.strip():
            return Refused("a rollback needs a known person; this one came without a user id",
                           "roll back from Slack or the console as yourself", reason="no_user")
        if policy.approvers and not is_listed(user, policy.approvers, members_of):
            return Refused(f"{user} is not an approver of {self.model}",
                           "ask one of: " + ", ".join(policy.approvers), reason="not_approver")
        return None

    def settle(self, seen: Seen, now: datetime, switch_default: Callable[[], bool]) -> list[Event]:
        """An apply in progress, settled by any process from what the backend shows (`seen`): applied as soon as
        the backend has the candidate as its default (the owner's reply was lost, or it is about to report it);
        failed, and retryable, once the lease had lapsed before the backend was asked; left alone while the
        owner's lease is live (a slow switch, an endpoint deploy, is still running). Exactly once: a request
        no longer applying is not settled again."""
        if self.state != APPLYING:
            return []
        owner, lease_until = self.apply_owner, self.lease_until
        if (seen.canary == self.candidate and seen.default == self.base) if self.starting_canary \
                else seen.default == self.candidate:
            events = self.finish_apply("system", now, None, switch_default, owner=None)
        elif self.lease_lapsed(seen.asked_at):
            still = ("the backend sends the candidate no share of the traffic" if self.starting_canary
                     else f"the backend's default is still {seen.default or 'unset'}")
            why = (f"the process running it ({owner}) stopped before the backend switched the default: its lease "
                   f"lapsed at {iso(lease_until)} and {still}" if owner and lease_until else
                   f"it was interrupted before the backend switched the default ({still})")
            events = self.finish_apply("system", now, f"{why}; retry to apply", switch_default, owner=None)
        else:
            return []
        return events + [Event("promotion.reconciled", "system", {
            "backend_default": seen.default, "owner": owner, "lease_until": iso(lease_until)})]

    def retry_refusal(self, user: str, policy: ModelPolicy, members_of: MembersOf) -> StarchartError | None:
        """Why `user` may not retry a failed apply, or None: only an approver may, and only a failed one."""
        if not user.strip():
            return Refused("a retry needs a known person; this one came without a user id",
                           "retry from Slack or the console as yourself", reason="no_user")
        listed = approval_rules.approvers(self.rules)
        listed = policy.approvers if listed is None else listed
        if listed and not is_listed(user, listed, members_of):
            return Refused(f"{user} is not an approver of {self.model}" + (" for this request" if self.rules else ""),
                           "ask an approver to retry", reason="not_approver")
        if self.state != FAILED:
            return InvalidInput(f"promotion request #{self.id} is {self.state}, not failed",
                                "only a failed apply can be retried")
        return None

