"""The promotion rules on their own: each rule checked by constructing a request, with no database."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from model_registry.config import ModelPolicy
from model_registry.domain import promotion as rules
from model_registry.domain.errors import InvalidInput, Refused

NOW = datetime(2026, 12, 1, 9, 0, 0)
GROUPS = {"S0REVIEW": ["U_GROUPIE"]}


def members_of(group: str) -> list[str]:
    return GROUPS.get(group, [])


def request(**overrides: Any) -> rules.PromotionRequest:
    fields: dict[str, Any] = dict(
        id=7, model="iris", kind="promote", candidate="v2", base="v1", candidate_digest="cand-1",
        card_digest="card-1", requested_by="U_REQ", required_approvals=1, expires_at=NOW + timedelta(hours=72),
        channel="C1", message_ts="111.222")
    fields.update(overrides)
    return rules.PromotionRequest(**fields)


def facts(**overrides: Any) -> rules.Facts:
    fields: dict[str, Any] = dict(now=NOW, current_default="v1", candidate_digest="cand-1", trained_by="U_TRAINER")
    fields.update(overrides)
    return rules.Facts(**fields)


POLICY = ModelPolicy(approvers=("U_OK", "U_OK2", "U_REQ", "U_TRAINER", "S0REVIEW"))
LEASE = rules.Lease("host-a:101:aa11", timedelta(seconds=60))


def actions(outcome: rules.Outcome) -> list[str]:
    return [e.action for e in outcome.events]


def test_one_approval_of_one_required_approves() -> None:
    req = request()
    outcome = req.decide("U_OK", True, facts(), POLICY, members_of)
    assert outcome.refusal is None and req.state == rules.APPROVED and req.decided_at == NOW
    assert actions(outcome) == ["approval.granted", "promotion.approved"]
    assert outcome.decision is not None and outcome.decision.card_digest == "card-1"
    assert outcome.events[-1].details == {"approvals": 1, "required": 1}


def test_n_of_m_waits_for_the_last_approval() -> None:
    req = request(required_approvals=2)
    first = req.decide("U_OK", True, facts(), POLICY, members_of)
    assert req.state == rules.OPEN and actions(first) == ["approval.granted"]
    second = req.decide("U_GROUPIE", True, facts(), POLICY, members_of)  # a member of an approver group
    assert req.state == rules.APPROVED and actions(second) == ["approval.granted", "promotion.approved"]


def test_rejection_needs_a_reason_and_closes_the_request() -> None:
    req = request()
    with pytest.raises(InvalidInput, match="needs a reason"):
        req.decide("U_OK", False, facts(), POLICY, members_of, reason="  ")
    outcome = req.decide("U_OK", False, facts(), POLICY, members_of, reason="loss went up")
    assert req.state == rules.REJECTED and actions(outcome) == ["promotion.rejected"]
    assert outcome.events[0].details == {"reason": "loss went up"} and outcome.events[0].by_person


@pytest.mark.parametrize(("user", "why"), [("U_REQ", "self_approval"), ("U_TRAINER", "self_approval"),
                                           ("U_MALLORY", "not_approver")])
def test_requester_trainer_and_strangers_may_not_approve(user: str, why: str) -> None:
    req = request()
    outcome = req.decide(user, True, facts(), POLICY, members_of)
    assert outcome.refusal is not None and outcome.refusal.reason == why
    assert req.state == rules.OPEN and not req.decisions and outcome.decision is None
    assert actions(outcome) == ["approval.refused"] and outcome.events[0].details["reason"] == why


def test_self_approval_when_allowed() -> None:
    req = request()
    outcome = req.decide("U_REQ", True, facts(), ModelPolicy(allow_self_approval=True), members_of)
    assert outcome.refusal is None and req.state == rules.APPROVED  # no approvers listed: anyone may


def test_a_second_decision_by_the_same_approver_is_refused() -> None:
    req = request(required_approvals=2)
    req.decide("U_OK", True, facts(), POLICY, members_of)
    outcome = req.decide("U_OK", True, facts(), POLICY, members_of)
    assert outcome.refusal is not None and outcome.refusal.reason == "duplicate" and req.approvals == 1


def test_expired_request_closes_when_clicked() -> None:
    req = request(expires_at=NOW - timedelta(seconds=1))
    outcome = req.decide("U_OK", True, facts(), POLICY, members_of)
    assert outcome.refusal is not None and outcome.refusal.reason == "expired" and req.state == rules.EXPIRED
    assert actions(outcome) == ["promotion.expired", "approval.refused"]


@pytest.mark.parametrize(("changed", "why"), [({"current_default": "v0"}, "the default moved from v1 to v0"),
                                              ({"candidate_digest": "cand-2"}, "v2 changed since")])
def test_stale_when_the_base_default_or_the_candidate_changed(changed: dict[str, Any], why: str) -> None:
    req = request()
    outcome = req.decide("U_OK", True, facts(**changed), POLICY, members_of)
    assert outcome.refusal is not None and outcome.refusal.reason == "stale" and req.state == rules.STALE
    assert actions(outcome) == ["promotion.stale", "approval.refused"]
    assert why in outcome.events[0].details["why"]


@pytest.mark.parametrize("click", [rules.Click(digest="edited"), rules.Click(channel="C1", message_ts="999.000"),
                                   rules.Click(channel="C_OTHER", message_ts="111.222")])
def test_buttons_of_another_card_or_an_edited_value_change_nothing(click: rules.Click) -> None:
    req = request()
    outcome = req.decide("U_OK", True, facts(), POLICY, members_of, click=click)
    assert outcome.refusal is not None and outcome.refusal.reason == "card_mismatch"
    assert req.state == rules.OPEN and actions(outcome) == ["approval.refused"]


def test_a_decided_request_takes_no_more_decisions() -> None:
    req = request(state=rules.APPLIED)
    outcome = req.decide("U_OK", True, facts(), POLICY, members_of)
    assert outcome.refusal is not None and outcome.refusal.reason == "closed"


def test_expire_only_open_requests_past_their_time() -> None:
    assert request().expire(NOW) == []
    assert request(state=rules.APPROVED, expires_at=NOW - timedelta(1)).expire(NOW) == []
    late = request(expires_at=NOW - timedelta(seconds=1))
    assert [e.action for e in late.expire(NOW)] == ["promotion.expired"] and late.state == rules.EXPIRED


def approved(**overrides: Any) -> rules.PromotionRequest:
    req = request(**overrides)
    req.decide("U_OK", True, facts(), POLICY, members_of)
    return req


def test_start_apply_moves_an_approved_request_to_applying() -> None:
    req = approved()
    outcome = req.start_apply("U_OK", facts(), "local", LEASE)
    assert outcome.started and req.state == rules.APPLYING and req.apply_started_at == NOW
    assert actions(outcome) == ["promotion.applying"] and outcome.events[0].on_card
    assert outcome.events[0].details == {"base": "v1", "backend": "local"}


def test_start_apply_once_only() -> None:
    req = approved()
    req.start_apply("U_OK", facts(), "local", LEASE)
    again = req.start_apply("U_OK", facts(), "local", LEASE)  # a double click, a retry, a second replica
    assert not again.started and not again.events and again.refusal is None


def test_start_apply_refuses_without_the_approvals() -> None:
    req = request(state=rules.APPROVED)  # approved in the table but the decisions say otherwise
    outcome = req.start_apply("U_OK", facts(), "local", LEASE)
    assert isinstance(outcome.refusal, Refused) and outcome.refusal.reason == "not_approved" and not outcome.started


def test_start_apply_when_the_default_moved_is_stale() -> None:
    req = approved()
    outcome = req.start_apply("U_OK", facts(current_default="v9"), "local", LEASE)
    assert req.state == rules.STALE and actions(outcome) == ["promotion.stale"] and not outcome.started


def test_one_apply_per_model_at_a_time() -> None:
    req = approved()
    outcome = req.start_apply("U_OK", facts(), "local", LEASE, busy_with=3)
    assert outcome.refusal is not None and outcome.refusal.reason == "busy" and req.state == rules.APPROVED


def test_finish_apply_switches_or_fails() -> None:
    req = approved()
    req.start_apply("U_OK", facts(), "local", LEASE)
    events = req.finish_apply("U_OK", NOW, None, lambda: True, LEASE.owner)
    assert req.state == rules.APPLIED and req.applied_at == NOW and [e.action for e in events] == ["promotion.applied"]
    failing = approved()
    failing.start_apply("U_OK", facts(), "local", LEASE)
    switched: list[bool] = []
    events = failing.finish_apply("U_OK", NOW, "503 backend unavailable", lambda: switched.append(True) or True,
                                  LEASE.owner)
    assert failing.state == rules.FAILED and failing.error == "503 backend unavailable" and not switched
    assert events[0].details == {"error": "503 backend unavailable"}


def test_finish_apply_refuses_when_the_default_moved_under_it() -> None:
    req = approved()
    req.start_apply("U_OK", facts(), "local", LEASE)
    req.finish_apply("U_OK", NOW, None, lambda: False, LEASE.owner)
    assert req.state == rules.FAILED and "moved while" in (req.error or "")


def test_a_late_success_after_reconciling_as_failed_is_applied() -> None:
    req = approved()
    req.start_apply("U_OK", facts(), "local", LEASE)
    req.finish_apply("system", NOW, "interrupted", lambda: True, None)
    assert req.state == rules.FAILED
    req.finish_apply("U_OK", NOW, None, lambda: True, LEASE.owner)
    assert req.state == rules.APPLIED
    assert req.finish_apply("U_OK", NOW, None, lambda: True, LEASE.owner) == []  # settled: nothing more happens


def test_retry_only_by_an_approver_and_only_a_failed_apply() -> None:
    req = approved()
    assert isinstance(req.retry_refusal("U_OK", POLICY, members_of), InvalidInput)  # approved, not failed
    req.start_apply("U_OK", facts(), "local", LEASE)
    req.finish_apply("U_OK", NOW, "503", lambda: True, LEASE.owner)
    refusal = req.retry_refusal("U_MALLORY", POLICY, members_of)
    assert isinstance(refusal, Refused) and refusal.reason == "not_approver"
    assert req.retry_refusal("U_GROUPIE", POLICY, members_of) is None
    assert req.start_apply("U_GROUPIE", facts(), "local", LEASE).started


# ---------------------------------------------------------------- leases: who may settle an apply, and when


def applying(lease: rules.Lease = LEASE) -> rules.PromotionRequest:
    req = approved()
    assert req.start_apply("U_OK", facts(), "local", lease).started
    return req


def test_start_apply_gives_the_apply_to_its_owner_until_the_lease_lapses() -> None:
    req = applying()
    assert req.apply_owner == LEASE.owner and req.lease_until == NOW + timedelta(seconds=60)
    assert not req.lease_lapsed(NOW + timedelta(seconds=59))
    assert req.lease_lapsed(NOW + timedelta(seconds=60)) and req.lease_lapsed(NOW + timedelta(hours=1))
    assert not approved().lease_lapsed(NOW + timedelta(days=9)), "only an apply in progress has a lease"
    assert request(state=rules.APPLYING).lease_lapsed(NOW), "an apply recorded without a lease has no live owner"


@pytest.mark.parametrize("owner, length, words", [
    ("", timedelta(seconds=60), "needs an owner"), ("  ", timedelta(seconds=60), "needs an owner"),
    ("h:1:a", timedelta(0), "longer than 0s, not 0s"), ("h:1:a", timedelta(seconds=-5), "not -5s")])
def test_a_lease_has_an_owner_and_a_length(owner: str, length: timedelta, words: str) -> None:
    with pytest.raises(InvalidInput, match=words):
        rules.Lease(owner, length)


def test_only_the_owner_renews_and_only_while_applying() -> None:
    req = applying()
    later = NOW + timedelta(seconds=50)
    assert not req.renew("host-b:202:bb22", later, LEASE.length) and req.lease_until == NOW + LEASE.length
    assert req.renew(LEASE.owner, later, LEASE.length) and req.lease_until == later + LEASE.length
    assert not req.lease_lapsed(NOW + timedelta(seconds=100)), "renewed: live past its first expiry"
    req.finish_apply("U_OK", later, None, lambda: True, LEASE.owner)
    assert req.apply_owner is None and req.lease_until is None, "the result ends the lease"
    assert not req.renew(LEASE.owner, later, LEASE.length) and req.lease_until is None


def test_a_failure_reported_after_a_retry_took_over_changes_nothing() -> None:
    req = applying()
    req.settle(rules.Seen("v1", NOW + timedelta(minutes=5)), NOW + timedelta(minutes=5), lambda: True)
    assert req.state == rules.FAILED
    retry = rules.Lease("host-b:202:bb22", timedelta(seconds=60))
    assert req.start_apply("U_OK", facts(now=NOW + timedelta(minutes=6)), "local", retry).started
    assert req.finish_apply("U_OK", NOW, "timed out", lambda: True, LEASE.owner) == []
    assert req.state == rules.APPLYING and req.apply_owner == retry.owner, "the retry's apply is left running"
    assert [e.action for e in req.finish_apply("U_OK", NOW, None, lambda: True, LEASE.owner)] == [
        "promotion.applied"], "a success is the backend's: whoever reports it"


def test_settled_at_once_when_the_backend_has_the_candidate_even_under_a_live_lease() -> None:
    req = applying()
    switched: list[bool] = []
    events = req.settle(rules.Seen("v2", NOW + timedelta(seconds=1)), NOW + timedelta(seconds=2),
                        lambda: switched.append(True) or True)
    assert switched and req.state == rules.APPLIED and req.applied_at == NOW + timedelta(seconds=2)
    assert [e.action for e in events] == ["promotion.applied", "promotion.reconciled"]
    assert events[0].actor == "system" and events[0].on_card
    assert events[1].details == {"backend_default": "v2", "owner": LEASE.owner,
                                 "lease_until": "2026-12-01T09:01:00Z"}
    assert req.apply_owner is None and req.lease_until is None
    assert req.settle(rules.Seen("v2", NOW), NOW, lambda: True) == [], "settled once"


def test_a_live_lease_without_the_switch_is_left_to_its_owner() -> None:
    req = applying()
    for seconds in (0, 30, 59):
        assert req.settle(rules.Seen("v1", NOW + timedelta(seconds=seconds)), NOW, lambda: True) == []
    assert req.state == rules.APPLYING and req.apply_owner == LEASE.owner


def test_a_lapsed_lease_without_the_switch_fails_and_can_be_retried() -> None:
    req = applying()
    asked = NOW + timedelta(seconds=61)
    events = req.settle(rules.Seen("v1", asked), asked, lambda: True)
    assert req.state == rules.FAILED and [e.action for e in events] == ["promotion.failed", "promotion.reconciled"]
    assert req.error == ("the process running it (host-a:101:aa11) stopped before the backend switched the default: "
                         "its lease lapsed at 2026-12-01T09:01:00Z and the backend's default is still v1; retry to "
                         "apply")
    assert req.retry_refusal("U_OK", POLICY, members_of) is None
    assert req.start_apply("U_OK", facts(now=asked), "local", LEASE).started
    legacy = request(state=rules.APPLYING, decisions=[rules.Decision("U_OK", "approve", None, NOW)])
    legacy.settle(rules.Seen(None, NOW), NOW, lambda: True)
    assert legacy.state == rules.FAILED and legacy.error == (
        "it was interrupted before the backend switched the default (the backend's default is still unset); retry "
        "to apply")


def test_a_lease_that_lapsed_only_after_the_backend_was_asked_is_not_failed() -> None:
    """The backend's answer counts only if the lease had lapsed when it was asked: the owner could have switched
    the default after an earlier look, then stopped."""
    req = applying()
    events = req.settle(rules.Seen("v1", NOW + timedelta(seconds=59)), NOW + timedelta(minutes=5), lambda: True)
    assert events == [] and req.state == rules.APPLYING


def test_a_switch_the_backend_shows_but_the_records_cannot_take_fails() -> None:
    req = applying()
    events = req.settle(rules.Seen("v2", NOW), NOW, lambda: False)  # the default moved in the records meanwhile
    assert req.state == rules.FAILED and "moved while" in (req.error or "")
    assert [e.action for e in events] == ["promotion.failed", "promotion.reconciled"]


@pytest.mark.parametrize("raw, seconds", [(None, 60.0), ("", 60.0), ("0.25", 0.25), ("600", 600.0)])
def test_the_apply_lease_is_configured_in_seconds(raw: str | None, seconds: float) -> None:
    from model_registry.config import Settings

    env = {} if raw is None else {"STARCHART_APPLY_LEASE": raw}
    assert Settings.from_env(env).apply_lease == timedelta(seconds=seconds)


@pytest.mark.parametrize("raw", ["0", "-1", "soon", "nan", "inf", "90000"])
def test_a_bad_apply_lease_is_refused_saying_what_it_takes(raw: str) -> None:
    from model_registry.config import Settings

    with pytest.raises(InvalidInput) as err:
        Settings.from_env({"STARCHART_APPLY_LEASE": raw})
    assert err.value.message == f"STARCHART_APPLY_LEASE {raw!r} is not a number of seconds between 0 and 86400"
    assert "e.g. 60" in err.value.hint


@pytest.mark.parametrize("user", ["", "  "])
def test_nobody_never_decides_even_when_the_policy_lists_no_approvers(user: str) -> None:
    req = request()
    outcome = req.decide(user, True, facts(), ModelPolicy(approvers=()), members_of)
    assert outcome.refusal is not None and outcome.refusal.reason == "no_user"
    assert req.state == rules.OPEN and req.decisions == [] and actions(outcome) == ["approval.refused"]
    assert outcome.events[0].actor == "unknown"
    failed = request(state=rules.FAILED)
    refusal = failed.retry_refusal(user, ModelPolicy(approvers=()), members_of)
    assert isinstance(refusal, Refused) and refusal.reason == "no_user"
