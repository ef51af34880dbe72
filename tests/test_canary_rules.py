"""The canary's rules on their own, with no database: what --canary/--bake accept, how figures are judged, and a
promotion request's way through a canary (started, promoted, rolled back, interrupted)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from model_registry.config import ModelPolicy, ProjectConfig
from model_registry.domain import canary as canary_rules
from model_registry.domain import promotion as rules
from model_registry.domain.canary import CanaryPolicy, Figures, Side, judge, plan
from model_registry.domain.errors import InvalidInput

NOW = datetime(2026, 12, 20, 9, 0, 0)
POLICY = ModelPolicy(approvers=("U_OK", "U_REQ"))
LEASE = rules.Lease("host-a:101:aa11", timedelta(seconds=60))
LIMITS = CanaryPolicy(max_error_rate=0.01, max_p99_ratio=2.0, min_requests=20, auto_promote=False)


def no_members(_group: str) -> list[str]:
    return []


def canary_request(**overrides: Any) -> rules.PromotionRequest:
    fields: dict[str, Any] = dict(
        id=9, model="iris", kind="promote", candidate="v2", base="v1", candidate_digest="cand", card_digest="card",
        requested_by="U_REQ", required_approvals=1, expires_at=NOW + timedelta(hours=72), state=rules.APPROVED,
        decisions=[rules.Decision("U_OK", "approve", None, NOW)], canary_percent=10,
        canary_bake=timedelta(minutes=30))
    fields.update(overrides)
    return rules.PromotionRequest(**fields)


def started(req: rules.PromotionRequest) -> rules.PromotionRequest:
    assert req.start_apply("U_OK", rules.Facts(now=NOW, current_default="v1"), "local", LEASE).started
    req.finish_apply("U_OK", NOW, None, lambda: pytest.fail("a canary does not switch the default"), LEASE.owner)
    return req


def figures(cand: tuple[int, int, float], base: tuple[int, int, float]) -> Figures:
    return Figures(Side(cand[0], cand[1], 1.0, cand[2]), Side(base[0], base[1], 1.0, base[2]))


# ---------------------------------------------------------------- what a person types

def test_canary_and_bake_as_typed() -> None:
    assert plan("25", "90s", LIMITS) == canary_rules.Plan(25, timedelta(seconds=90))
    assert plan("", None, CanaryPolicy(percent=5, bake=timedelta(hours=1))) == canary_rules.Plan(5, timedelta(hours=1))
    assert plan("10%", None, LIMITS).percent == 10
    assert plan(None, None, LIMITS) is None


@pytest.mark.parametrize("percent", ["0", "100", "-5", "ten", "12.5"])
def test_a_percent_outside_1_to_99_is_refused_saying_what_to_give(percent: str) -> None:
    with pytest.raises(InvalidInput) as err:
        plan(percent, None, LIMITS)
    assert "from 1 to 99" in err.value.message and "--canary 10" in err.value.hint


@pytest.mark.parametrize("bake", ["soon", "30", "1y", "0m"])
def test_a_bake_that_is_not_a_duration_is_refused(bake: str) -> None:
    with pytest.raises(InvalidInput) as err:
        plan("10", bake, LIMITS)
    assert "--bake" in err.value.message and "30m" in err.value.hint


def test_a_bake_without_a_canary_is_refused() -> None:
    with pytest.raises(InvalidInput, match="no --canary"):
        plan(None, "30m", LIMITS)


def test_the_canary_block_of_starchart_yaml_is_checked(tmp_path: Any) -> None:
    cfg = ProjectConfig.from_dict({"models": {"iris": {"canary": {
        "percent": 20, "bake": "1h", "max_error_rate": 0.05, "max_p99_ratio": 3, "auto_promote": True}}}}, tmp_path)
    got = cfg.policy("iris").canary
    assert (got.percent, got.bake, got.max_error_rate, got.max_p99_ratio, got.auto_promote) == (
        20, timedelta(hours=1), 0.05, 3.0, True)
    assert cfg.policy("other").canary == CanaryPolicy()  # defaults without an entry
    for bad, said in (({"percent": 150}, "from 1 to 99"), ({"bake": "later"}, "duration"),
                      ({"auto_promote": "yes"}, "true or false"), ({"max_p99_ratio": 0.5}, "at least 1"),
                      ({"speed": 1}, "no key speed")):
        with pytest.raises(InvalidInput, match=said):
            ProjectConfig.from_dict({"models": {"iris": {"canary": bad}}}, tmp_path)


# ---------------------------------------------------------------- judging the figures

BAKE_END = NOW + timedelta(minutes=30)


def test_an_erroring_candidate_is_rolled_back_once_it_has_enough_requests() -> None:
    assert judge(figures((19, 19, 5.0), (200, 0, 5.0)), LIMITS, BAKE_END, NOW).action == canary_rules.BAKE
    verdict = judge(figures((20, 3, 5.0), (200, 0, 5.0)), LIMITS, BAKE_END, NOW)
    assert verdict.action == canary_rules.ROLLBACK
    assert "15.0% (3 of 20 requests)" in verdict.why and "max_error_rate 1.0%" in verdict.why


def test_errors_the_default_makes_as_often_are_not_the_candidates_fault() -> None:
    verdict = judge(figures((40, 4, 5.0), (400, 40, 5.0)), LIMITS, BAKE_END, NOW)  # 10% on both sides
    assert verdict.action == canary_rules.BAKE


def test_a_slow_candidate_is_rolled_back_by_its_p99_over_the_defaults() -> None:
    assert judge(figures((50, 0, 9.0), (50, 0, 5.0)), LIMITS, BAKE_END, NOW).action == canary_rules.BAKE  # 1.8x
    verdict = judge(figures((50, 0, 11.0), (50, 0, 5.0)), LIMITS, BAKE_END, NOW)
    assert verdict.action == canary_rules.ROLLBACK and "2.20x the default's 5.0 ms" in verdict.why
    # too few requests on the default's side: not judged
    assert judge(figures((50, 0, 50.0), (10, 0, 5.0)), LIMITS, BAKE_END, NOW).action == canary_rules.BAKE


def test_the_end_of_a_clean_bake_promotes_only_with_auto_promote_and_enough_evidence() -> None:
    clean = figures((30, 0, 5.0), (270, 0, 5.0))
    assert judge(clean, LIMITS, BAKE_END, BAKE_END).action == canary_rules.WAIT
    auto = CanaryPolicy(auto_promote=True, min_requests=20)
    assert judge(clean, auto, BAKE_END, BAKE_END).action == canary_rules.PROMOTE
    thin = figures((5, 0, 5.0), (45, 0, 5.0))
    verdict = judge(thin, auto, BAKE_END, BAKE_END)
    assert verdict.action == canary_rules.WAIT and "answered 5 requests, fewer than the 20" in verdict.why
    one = judge(figures((1, 0, 5.0), (45, 0, 5.0)), auto, BAKE_END, BAKE_END)
    assert "the candidate answered 1 request, fewer than the 20 needed" in one.why
    no_figures = judge(None, auto, BAKE_END, BAKE_END)  # Vertex AI: people decide
    assert no_figures.action == canary_rules.WAIT and "no per-version figures" in no_figures.why


def test_figures_survive_their_stored_form() -> None:
    f = Figures(Side(10, 1, 2.5, 9.0), Side(90, 0, 2.0, 4.0), mirrored=8, agreed=6, at="2026-12-20T09:00:00Z")
    again = Figures.from_dict(f.as_dict())
    assert again == f and again is not None and again.agreement == 0.75 and again.candidate.error_rate == 0.1


# ---------------------------------------------------------------- a request's way through a canary

def test_an_approved_canary_request_starts_a_canary_not_a_switch() -> None:
    req = canary_request()
    outcome = req.start_apply("U_OK", rules.Facts(now=NOW, current_default="v1"), "local", LEASE)
    assert outcome.started and outcome.events[0].details["canary"] == "start"
    events = req.finish_apply("U_OK", NOW, None, lambda: pytest.fail("no switch"), LEASE.owner)
    assert req.state == rules.CANARY and req.canary_started_at == NOW and req.bake_until == NOW + timedelta(minutes=30)
    assert [e.action for e in events] == ["canary.started"]
    assert events[0].details["split"] == {"v1": 90, "v2": 10} and events[0].details["percent"] == 10


def test_promoting_a_canary_switches_the_default_and_records_the_figures() -> None:
    req = started(canary_request())
    req.canary_figures = {"candidate": {"requests": 30}}
    later = NOW + timedelta(minutes=31)
    outcome = req.start_apply("U_OK", rules.Facts(now=later, current_default="v1"), "local", LEASE,
                              why="promoted to 100% by U_OK")
    assert outcome.started and outcome.events[0].details["canary"] == "promote"
    switched = []
    events = req.finish_apply("U_OK", later, None, lambda: switched.append(1) or True, LEASE.owner)
    assert switched and req.state == rules.APPLIED and req.canary_ended_at == later
    assert [e.action for e in events] == ["promotion.applied", "canary.promoted"]
    assert events[1].details == {"why": "promoted to 100% by U_OK", "split": {"v2": 100},
                                 "figures": {"candidate": {"requests": 30}}}


def test_a_failed_promotion_leaves_the_canary_running() -> None:
    req = started(canary_request())
    req.start_apply("U_OK", rules.Facts(now=NOW, current_default="v1"), "local", LEASE)
    events = req.finish_apply("U_OK", NOW, "the server did not load v2", lambda: True, LEASE.owner)
    assert req.state == rules.CANARY and req.error == "the server did not load v2"
    assert [e.action for e in events] == ["promotion.failed"] and events[0].details["canary"] == "running"


def test_a_canary_that_did_not_start_fails_and_can_be_retried() -> None:
    req = canary_request()
    req.start_apply("U_OK", rules.Facts(now=NOW, current_default="v1"), "vertex", LEASE)
    req.finish_apply("U_OK", NOW, "quota exceeded", lambda: True, LEASE.owner)
    assert req.state == rules.FAILED and req.starting_canary
    assert req.start_apply("U_OK", rules.Facts(now=NOW, current_default="v1"), "vertex", LEASE).started


def test_rolling_back_ends_the_canary_and_names_the_split_left() -> None:
    req = started(canary_request())
    outcome = req.roll_back("system", NOW, "rolled back automatically: errors")
    assert req.state == rules.ROLLED_BACK and req.canary_ended_by == "system"
    assert [e.action for e in outcome.events] == ["canary.rolled_back"]
    assert outcome.events[0].details["split"] == {"v1": 100}
    again = req.roll_back("U_OK", NOW, "twice")
    assert again.refusal is not None and again.refusal.reason == "closed" and not again.events


def test_who_may_promote_or_roll_back_a_canary() -> None:
    req = started(canary_request())
    assert req.canary_refusal("U_OK", True, POLICY, no_members, "U_TRAINER") is None
    self_promote = req.canary_refusal("U_REQ", True, POLICY, no_members, "U_TRAINER")
    assert self_promote is not None and self_promote.reason == "self_approval"
    assert req.canary_refusal("U_REQ", False, POLICY, no_members, "U_TRAINER") is None  # rolling back is safe
    stranger = req.canary_refusal("U_MALLORY", False, POLICY, no_members, "U_TRAINER")
    assert stranger is not None and stranger.reason == "not_approver"


def test_another_requests_canary_holds_the_default() -> None:
    req = rules.PromotionRequest(id=10, model="iris", kind="promote", candidate="v3", base="v1",
                                 candidate_digest="c", card_digest="d", requested_by="U_REQ", required_approvals=1,
                                 expires_at=NOW + timedelta(hours=1), state=rules.APPROVED,
                                 decisions=[rules.Decision("U_OK", "approve", None, NOW)])
    outcome = req.start_apply("U_OK", rules.Facts(now=NOW, current_default="v1"), "local", LEASE, canary_of=9)
    assert outcome.refusal is not None and "#9 of iris runs a canary" in outcome.refusal.message
    assert req.state == rules.APPROVED


def test_an_interrupted_canary_start_is_settled_from_the_backends_split() -> None:
    req = canary_request()
    req.start_apply("U_OK", rules.Facts(now=NOW, current_default="v1"), "local", LEASE)
    assert req.settle(rules.Seen("v1", NOW, canary=None), NOW, lambda: True) == []  # lease live, no split yet
    events = req.settle(rules.Seen("v1", NOW, canary="v2"), NOW, lambda: pytest.fail("no switch"))
    assert req.state == rules.CANARY and [e.action for e in events] == ["canary.started", "promotion.reconciled"]
    lapsed = canary_request()
    lapsed.start_apply("U_OK", rules.Facts(now=NOW, current_default="v1"), "local", LEASE)
    events = lapsed.settle(rules.Seen("v1", NOW + timedelta(minutes=5)), NOW + timedelta(minutes=5), lambda: True)
    assert lapsed.state == rules.FAILED and "no share of the traffic" in events[0].details["error"]
