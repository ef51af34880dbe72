"""Approval rules by what changes, on their own: which rules a request takes, how several combine, what the
configuration refuses. No database."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from model_registry.config import ModelPolicy, ProjectConfig, Rule
from model_registry.domain import approval_rules as ar
from model_registry.domain import promotion as rules
from model_registry.domain.errors import InvalidInput

NOW = datetime(2026, 12, 15, 9, 0, 0)
GROUPS = {"S0PLATFORM": ["U_PLAT1", "U_PLAT2", "U_BOTH"], "S0DATA": ["U_DS1", "U_DS2", "U_BOTH"]}


def members_of(group: str) -> list[str]:
    return GROUPS.get(group, [])


def diff(breaking: list[str] | None = None, accuracy: tuple[Any, Any] | None = (0.9, 0.9),
         name: str = "v2") -> dict[str, Any]:
    metrics = []
    if accuracy is not None:
        base, cand = accuracy
        delta = cand - base if isinstance(cand, float) and isinstance(base, float) else None
        metrics.append({"name": "accuracy", "base": base, "candidate": cand, "delta": delta, "direction": "higher",
                        "better": None if not delta else delta > 0})
    return {"candidate": {"name": name}, "signature": {"inputs": [], "outputs": [], "breaking": breaking or []},
            "metrics": metrics}


BREAKING = Rule("breaking_signature", required_approvals=2, approvers=("S0PLATFORM",))
DROP = Rule("metric_drop", required_approvals=2, metric="accuracy", min_delta=-0.01)
ROLLBACK = Rule("rollback", required_approvals=1, approvers=("U_ONCALL",))
CANARY = Rule("canary", required_approvals=3)
POLICY = ModelPolicy(approvers=("S0DATA",), required_approvals=1, rules=(BREAKING, DROP, ROLLBACK, CANARY))


def chosen(opening: ar.Opening, policy: ModelPolicy = POLICY) -> list[tuple[str, int, tuple[str, ...]]]:
    return [(r.when, r.required_approvals, r.approvers) for r in ar.requirements(policy, opening)]


def test_no_rule_applies_to_a_plain_promotion() -> None:
    assert chosen(ar.Opening("promote", diff())) == []
    assert ar.required_approvals([], 1) == 1 and ar.approvers([]) is None


def test_a_breaking_change_takes_the_breaking_rule_with_its_approvers() -> None:
    reqs = ar.requirements(POLICY, ar.Opening("promote", diff(["input `petal_width` removed"])))
    assert [(r.when, r.required_approvals, r.approvers) for r in reqs] == [("breaking_signature", 2, ("S0PLATFORM",))]
    assert reqs[0].why == "breaking change: input `petal_width` removed"


def test_a_long_list_of_breaking_changes_is_named_in_part() -> None:
    changes = [f"input `f{i}` removed" for i in range(5)]
    (req,) = ar.requirements(POLICY, ar.Opening("promote", diff(changes)))
    assert req.why == "breaking change: input `f0` removed; input `f1` removed; input `f2` removed and 2 more"


@pytest.mark.parametrize(("accuracy", "applies", "words"), [
    ((0.9, 0.85), True, "accuracy changed by -0.0500"),
    ((0.9, 0.895), False, ""),  # within min_delta
    ((0.9, 0.95), False, ""),
    ((0.9, "NaN"), True, "accuracy is NaN (the training diverged)"),
    ((0.9, float("nan")), True, "accuracy is nan (the training diverged)"),
    (None, True, "accuracy is missing from the candidate's metrics"),
    ((None, 0.5), False, ""),  # no default metric to fall from
])
def test_a_metric_drop_applies_as_the_nightly_gate_would(accuracy: Any, applies: bool, words: str) -> None:
    reqs = ar.requirements(POLICY, ar.Opening("promote", diff(accuracy=accuracy)))
    assert [r.when for r in reqs] == (["metric_drop"] if applies else [])
    if applies:
        assert reqs[0].why.startswith("metric drop: " + words)
        assert reqs[0].approvers == ("S0DATA",), "without approvers of its own, the model's count"


def test_a_lower_is_better_metric_drops_when_it_rises() -> None:
    policy = ModelPolicy(rules=(Rule("metric_drop", required_approvals=2, metric="loss", min_delta=0.0),))
    loss = {"name": "loss", "base": 0.3, "candidate": 0.4, "delta": 0.1, "direction": "lower", "better": False}
    opening = ar.Opening("promote", {**diff(), "metrics": [loss]})
    assert [r.when for r in ar.requirements(policy, opening)] == ["metric_drop"]


def test_rollback_applies_to_rollbacks_only_and_canary_to_nothing_yet() -> None:
    assert chosen(ar.Opening("rollback", diff(name="v1"))) == [("rollback", 1, ("U_ONCALL",))]
    assert ar.requirements(POLICY, ar.Opening("rollback", diff(name="v1")))[0].why == "rollback to v1"
    assert chosen(ar.Opening("promote", diff())) == [] and chosen(ar.Opening("apply", diff())) == []
    assert chosen(ar.Opening("promote", diff(), canary=True)) == [("canary", 3, ("S0DATA",))]


def test_a_rule_without_a_count_takes_the_models() -> None:
    policy = ModelPolicy(approvers=("U_A",), required_approvals=3, rules=(Rule("rollback", approvers=("U_B",)),))
    assert chosen(ar.Opening("rollback", diff()), policy) == [("rollback", 3, ("U_B",))]


def test_the_strictest_of_several_rules_is_named_and_its_count_is_the_requests() -> None:
    reqs = ar.requirements(POLICY, ar.Opening("promote", diff(["input `x` removed"], accuracy=(0.9, 0.5))))
    assert [r.when for r in reqs] == ["breaking_signature", "metric_drop"]
    top = ar.strictest(reqs)
    assert top is not None and top.when == "breaking_signature", "the first listed of equally strict rules"
    assert ar.required_approvals(reqs, 1) == 2
    assert ar.approvers(reqs) == ("S0PLATFORM", "S0DATA")
    lenient = ar.Requirement("rollback", "rollback to v1", 1, ("U_ONCALL",))
    assert ar.strictest([lenient, *reqs]) == reqs[0]


def request(reqs: list[ar.Requirement]) -> rules.PromotionRequest:
    return rules.PromotionRequest(
        id=9, model="iris", kind="promote", candidate="v2", base="v1", candidate_digest="cand-1",
        card_digest="card-1", requested_by="U_REQ", required_approvals=ar.required_approvals(reqs, 1),
        expires_at=NOW + timedelta(hours=72), rules=reqs)


FACTS = rules.Facts(now=NOW, current_default="v1", candidate_digest="cand-1", trained_by="U_TRAINER")


def test_every_rule_must_be_met_and_one_approval_counts_for_each_rule_that_lists_the_person() -> None:
    reqs = ar.requirements(POLICY, ar.Opening("promote", diff(["input `x` removed"], accuracy=(0.9, 0.5))))
    req = request(reqs)
    for user in ("U_DS1", "U_DS2"):  # the metric drop's two approvals ...
        assert req.decide(user, True, FACTS, POLICY, members_of).refusal is None
    assert req.state == rules.OPEN, "... do not waive the breaking change's"
    assert [len(r.approved_by) for r in req.rules] == [0, 2]
    outcome = req.decide("U_PLAT1", True, FACTS, POLICY, members_of)
    assert outcome.events[0].details["counts_for"] == ["breaking_signature"] and req.state == rules.OPEN
    outcome = req.decide("U_BOTH", True, FACTS, POLICY, members_of)  # in both groups: counts for both
    assert outcome.events[0].details["counts_for"] == ["breaking_signature", "metric_drop"]
    assert req.state == rules.APPROVED and req.complete
    assert outcome.events[-1].details["rules"] == [
        {"when": "breaking_signature", "approved_by": ["U_PLAT1", "U_BOTH"]},
        {"when": "metric_drop", "approved_by": ["U_DS1", "U_DS2", "U_BOTH"]}]


def test_someone_outside_the_rules_approvers_is_refused_and_the_refusal_says_what_is_needed() -> None:
    req = request(ar.requirements(POLICY, ar.Opening("promote", diff(["input `petal_width` removed"]))))
    outcome = req.decide("U_DS1", True, FACTS, POLICY, members_of)  # an approver of the model, not of the rule
    assert outcome.refusal is not None and outcome.refusal.reason == "not_approver"
    assert "breaking change: input `petal_width` removed — 2 approvals from S0PLATFORM" in outcome.refusal.message
    assert outcome.refusal.hint == "ask one of: S0PLATFORM"
    assert [e.action for e in outcome.events] == ["approval.refused"] and not req.decisions
    assert req.decide("U_PLAT1", True, FACTS, POLICY, members_of).refusal is None


def test_self_approval_stays_off_under_a_rule() -> None:
    rule = ar.Requirement("rollback", "rollback to v1", 1, ("U_REQ", "U_ONCALL"))
    req = request([rule])
    assert req.decide("U_REQ", True, FACTS, POLICY, members_of).refusal.reason == "self_approval"  # type: ignore[union-attr]
    assert req.decide("U_ONCALL", True, FACTS, POLICY, members_of).refusal is None and req.state == rules.APPROVED


def test_start_apply_needs_every_rule_met() -> None:
    req = request([ar.Requirement("breaking_signature", "b", 1, ("S0PLATFORM",)),
                   ar.Requirement("metric_drop", "m", 1, ("S0DATA",))])
    req.decisions.append(rules.Decision("U_PLAT1", "approve", None, NOW))
    req.rules[0] = req.rules[0].approved("U_PLAT1")
    req.state = rules.APPROVED  # as a record edited by hand would claim
    outcome = req.start_apply("U_PLAT1", FACTS, "local", rules.Lease("h:1:a", timedelta(seconds=60)))
    assert outcome.refusal is not None and outcome.refusal.reason == "not_approved" and req.state == rules.APPROVED


def test_a_request_waits_for_the_people_who_may_still_decide_on_it() -> None:
    req = request(ar.requirements(POLICY, ar.Opening("promote", diff(["input `x` removed"]))))
    assert req.awaits("U_PLAT1", FACTS, POLICY, members_of)
    assert not req.awaits("U_DS1", FACTS, POLICY, members_of), "not an approver of the rule"
    req.decide("U_PLAT1", True, FACTS, POLICY, members_of)
    assert not req.awaits("U_PLAT1", FACTS, POLICY, members_of), "decided already"
    assert req.awaits("U_PLAT2", FACTS, POLICY, members_of)
    later = rules.Facts(now=NOW + timedelta(days=4), current_default="v1", candidate_digest="cand-1")
    assert not req.awaits("U_PLAT2", later, POLICY, members_of), "expired"


def test_a_requirement_round_trips_through_its_stored_form() -> None:
    req = ar.Requirement("metric_drop", "metric drop: accuracy …", 2, ("S0DATA",), ("U_DS1",))
    assert ar.Requirement.from_dict(req.as_dict()) == req


# ---------------------------------------------------------------- the configuration

def load(tmp_path: Path, defaults: dict[str, Any] | None = None, models: dict[str, Any] | None = None
         ) -> ProjectConfig:
    return ProjectConfig.from_dict({"defaults": defaults or {}, "models": models or {}}, tmp_path)


def test_rules_load_and_a_models_list_replaces_the_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path, defaults={"rules": [{"when": "rollback", "required_approvals": 1}]}, models={
        "iris": {"rules": [{"when": "breaking_signature", "required_approvals": 2, "approvers": ["S0PLATFORM"]},
                           {"when": "metric_drop", "metric": "accuracy", "min_delta": -0.01,
                            "required_approvals": 2}]},
        "quiet": {"rules": []}})
    assert cfg.policy("iris").rules == (
        Rule("breaking_signature", 2, ("S0PLATFORM",)), Rule("metric_drop", 2, None, "accuracy", -0.01))
    assert cfg.policy("other").rules == (Rule("rollback", 1),)
    assert cfg.policy("quiet").rules == ()


def test_a_models_policy_is_built_once_and_the_memo_is_bounded(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import model_registry.config as config

    cfg = load(tmp_path, defaults={"non_finite_inputs": True}, models={"iris": {"required_approvals": 2}})
    assert cfg.policy("iris") is cfg.policy("iris")  # asked on every prediction: not built again
    assert cfg.policy("iris").required_approvals == 2 and cfg.policy("iris").non_finite_inputs
    assert cfg.policy("other").required_approvals == 1
    assert cfg == load(tmp_path, defaults={"non_finite_inputs": True}, models={"iris": {"required_approvals": 2}})
    monkeypatch.setattr(config, "POLICIES_KEPT", 3)
    for i in range(10):  # model names come from requests: they are answered, but not all kept
        assert cfg.policy(f"m{i}").required_approvals == 1
    assert len(cfg._policies) == 3


@pytest.mark.parametrize(("rule", "words"), [
    ({"when": "metric_fall", "required_approvals": 2}, "`rules[0].when` is 'metric_fall'; it must be one of "
                                                      "breaking_signature, metric_drop, rollback, canary"),
    ({"required_approvals": 2}, "`rules[0].when` is None"),
    ({"when": "rollback"}, "changes nothing: give it `required_approvals`, `approvers` or both"),
    ({"when": "rollback", "required_approvals": 0}, "whole number from 1 to 100, not 0"),
    ({"when": "rollback", "required_approvals": "two"}, "whole number from 1 to 100, not 'two'"),
    ({"when": "rollback", "approvers": "S0PLATFORM"}, "`rules[0].approvers` must be a list"),
    ({"when": "rollback", "approvers": []}, "leave it out to keep the model's approvers"),
    ({"when": "metric_drop", "required_approvals": 2}, "needs `metric`, the name of a metric"),
    ({"when": "metric_drop", "metric": "accuracy", "min_delta": "a bit", "required_approvals": 2},
     "`rules[0].min_delta` must be a number such as -0.01, not 'a bit'"),
    ({"when": "rollback", "metric": "accuracy", "required_approvals": 2}, "has no key metric"),
    ({"when": "canary", "required_approvals": 2, "approver": ["U1"]}, "has no key approver"),
    ("breaking_signature", "`rules[0]` must be a mapping"),
])
def test_a_bad_rule_is_refused_at_load_saying_what_is_wrong(tmp_path: Path, rule: Any, words: str) -> None:
    for where in ("defaults", "models"):
        with pytest.raises(InvalidInput) as info:
            if where == "defaults":
                load(tmp_path, defaults={"rules": [rule]})
            else:
                load(tmp_path, models={"iris": {"rules": [rule]}})
        assert words in info.value.message, info.value.message
        assert "README" in (info.value.hint or "")


def test_rules_must_be_a_list(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="`rules` must be a list"):
        load(tmp_path, models={"iris": {"rules": {"when": "rollback"}}})
