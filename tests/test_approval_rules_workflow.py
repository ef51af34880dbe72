"""Approval rules end to end on SQLite and PostgreSQL: a breaking change and a metric drop choose their rules when
the request opens, the decisions are checked against them, and the card (Slack blocks and console) and
`show --json` say which rule applies and why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import replay_args, train_and_wait
from fakes.slack_fake import MAX_MESSAGE_BLOCKS, block_problems

from bot import blocks, cli
from bot import text as plain
from handlers.results import ReviewCard
from model_registry.adapters.signatures import _saved_model_class
from model_registry.domain.errors import Refused

PLATFORM = ["U0PLAT1", "U0PLAT2"]
RULES = [{"when": "breaking_signature", "required_approvals": 2, "approvers": ["S0PLATFORM"]},
         {"when": "metric_drop", "metric": "accuracy", "min_delta": -0.01, "required_approvals": 2}]


def variant(source: Path, out: Path, *, without_input: str | None = None,
            metrics: dict[str, Any] | None = None) -> Path:
    """A copy of a trained model to replay: one input taken out of its signatures, or other metrics."""
    shutil.copytree(source, out)
    if metrics is not None:
        (out / "metrics.json").write_text(json.dumps(metrics))
    if without_input is not None:
        pb = out / "model" / "saved_model.pb"
        saved = _saved_model_class()()
        saved.ParseFromString(pb.read_bytes())
        for graph in saved.meta_graphs:
            for entry in graph.signature_def:
                keys = [e.key for e in entry.value.inputs]
                if without_input.encode() in keys:
                    del entry.value.inputs[keys.index(without_input.encode())]
        pb.write_bytes(saved.SerializeToString())
    return out


def registry(make_registry: Any, db_url: str) -> Any:
    return make_registry(db_url, defaults={"approvers": ["U0DS1", "U0DS2"], "required_approvals": 1},
                         models={"iris": {"rules": RULES}}, usergroups={"S0PLATFORM": PLATFORM})


def candidate(reg: Any, trained: dict, source: Path) -> str:
    """iris trained from iris_a (the default), then from `source`: the newest version, exposed."""
    for src in (trained["iris_a"], source):
        assert train_and_wait(reg, "iris", "U0TRAINER", replay_args(src))["state"] == "SUCCEEDED"
    assert not reg.versions.expose("iris", "U0TRAINER")["errors"]
    return reg.versions.of_model("iris")["versions"][0]["name"]


def show_json(reg: Any, request_id: int) -> Any:
    printed: list[str] = []
    assert cli.main(["--json", "--user", "U0DS1", "show", str(request_id)], core=reg, out=printed.append) == 0
    return json.loads("\n".join(printed))


def test_a_breaking_change_takes_the_platform_rule_and_refuses_other_approvers(
        make_registry: Any, db_url: str, trained: dict, tmp_path: Path) -> None:
    reg = registry(make_registry, db_url)
    newest = candidate(reg, trained, variant(trained["iris_b"], tmp_path / "no_width", without_input="petal_width"))
    req = reg.promotions.promote("iris", newest, "U0REQ", reason="smaller input")
    why = "breaking change: input `petal_width` removed"
    assert req["required_approvals"] == 2
    assert req["rule"] == {"when": "breaking_signature", "why": why, "required_approvals": 2,
                           "approvers": ["S0PLATFORM"], "approved_by": []}
    assert req["rules"] == [req["rule"]], "accuracy did not fall: only the breaking rule applies"
    opened = reg.audit.events(action="promotion.requested")[0]["details"]["rules"]
    assert opened == [{"when": "breaking_signature", "why": why, "required_approvals": 2, "approvers": ["S0PLATFORM"]}]

    with pytest.raises(Refused) as refused:  # an approver of the model, not of the rule
        reg.promotions.decide(req["id"], "U0DS1", True)
    assert refused.value.reason == "not_approver" and "2 approvals from S0PLATFORM" in refused.value.message
    audited = reg.audit.events(action="approval.refused")
    assert [(e["actor"], e["details"]["reason"]) for e in audited] == [("U0DS1", "not_approver")]

    assert reg.promotions.decide(req["id"], "U0PLAT1", True)["state"] == "open"
    shown = show_json(reg, req["id"])
    assert shown["rule"]["why"] == why and shown["rule"]["approved_by"] == ["U0PLAT1"]
    assert reg.promotions.decide(req["id"], "U0PLAT2", True)["state"] == "approved"
    assert reg.promotions.apply_request(req["id"], actor="U0PLAT2")["state"] == "applied"
    assert reg.versions.default("iris") == newest


def test_a_metric_drop_takes_its_rule_with_the_models_approvers(make_registry: Any, db_url: str, trained: dict,
                                                               tmp_path: Path) -> None:
    reg = registry(make_registry, db_url)
    worse = variant(trained["iris_b"], tmp_path / "worse", metrics={"accuracy": 0.5, "loss": 0.9})
    newest = candidate(reg, trained, worse)
    req = reg.promotions.promote("iris", newest, "U0REQ")
    (rule,) = req["rules"]
    assert rule["when"] == "metric_drop" and rule["approvers"] == ["U0DS1", "U0DS2"] and req["required_approvals"] == 2
    assert rule["why"].startswith("metric drop: accuracy changed by -0.3000 (0.8 → 0.5;"), rule["why"]
    with pytest.raises(Refused, match="not an approver of this request"):
        reg.promotions.decide(req["id"], "U0PLAT1", True)
    assert reg.promotions.decide(req["id"], "U0DS1", True)["state"] == "open", "one approval of the model's one"
    assert reg.promotions.decide(req["id"], "U0DS2", True)["state"] == "approved"


def test_a_request_without_an_applicable_rule_keeps_the_models_policy(make_registry: Any, db_url: str,
                                                                     trained: dict) -> None:
    reg = registry(make_registry, db_url)
    newest = candidate(reg, trained, trained["iris_b"])  # better accuracy, same signature
    req = reg.promotions.promote("iris", newest, "U0REQ")
    assert req["rules"] == [] and req["rule"] is None and req["required_approvals"] == 1
    assert reg.promotions.decide(req["id"], "U0DS1", True)["state"] == "approved"


# ---------------------------------------------------------------- the card

def card_request(**overrides: Any) -> dict[str, Any]:
    breaking = "breaking change: input `petal_width` removed"
    rules = [{"when": "breaking_signature", "why": breaking, "required_approvals": 2,
              "approvers": ["S0PLATFORM", "U0LEAD"], "approved_by": []},
             {"when": "metric_drop", "why": "metric drop: accuracy changed by -0.3000", "required_approvals": 2,
              "approvers": [], "approved_by": ["U0DS1"]}]
    diff = {"candidate": {"name": "v2", "job_id": "iris_2", "trained_by": "U0T"},
            "base": {"name": "v1", "job_id": "iris_1", "trained_by": "U0T"}, "parameters": [],
            "signature": {"inputs": [{"name": "petal_width", "change": "removed", "breaking": True}], "outputs": [],
                          "breaking": ["input `petal_width` removed"]},
            "metrics": [], "program": {"candidate": "abc", "base": "abc", "module": "trainer.task", "changed": False}}
    req = {"id": 4, "model": "iris", "kind": "promote", "candidate": "v2", "base": "v1", "state": "open",
           "requested_by": "U0REQ", "reason": None, "required_approvals": 2, "approvals": 1,
           "decisions": [{"user": "U0DS1", "decision": "approve", "reason": None, "at": "2026-12-15T09:00:00Z"}],
           "created_at": None, "expires_at": "2026-12-18T09:00:00Z", "applied_at": None, "error": None,
           "card_digest": "d" * 64, "diff": diff, "channel": "C1", "message_ts": "1.2", "rules": rules,
           "rule": rules[0]}
    req.update(overrides)
    return req


def test_the_card_names_the_rules_with_slack_mentions() -> None:
    req = card_request()
    shown = blocks.render(ReviewCard(req))
    assert shown.blocks is not None and not block_problems(shown.blocks, MAX_MESSAGE_BLOCKS)
    said = json.dumps(shown.blocks, ensure_ascii=False)
    assert ("breaking change: input `petal_width` removed — 2 approvals from <!subteam^S0PLATFORM>, <@U0LEAD>"
            in said)
    assert "metric drop: accuracy changed by -0.3000 — 2 approvals from any approver (1/2 so far)" in said
    assert "each must be met" in said

    one = card_request(rules=[req["rules"][0]], decisions=[], approvals=0)
    said = json.dumps(blocks.render(ReviewCard(one)).blocks, ensure_ascii=False)
    assert (":lock: *Approval rule:* breaking change: input `petal_width` removed — 2 approvals from "
            "<!subteam^S0PLATFORM>, <@U0LEAD>") in said
    assert "review.approve" in said, "an open card without decisions still asks for them"
    none = json.dumps(blocks.render(ReviewCard(card_request(rules=[], rule=None))).blocks)
    assert "Approval rule" not in none


def test_the_console_card_names_the_rules() -> None:
    lines = plain.render(ReviewCard(card_request()), plain.CHAT).lines
    assert "Rules (each must be met):" in lines
    assert ("  breaking change: input `petal_width` removed — 2 approvals from @S0PLATFORM, @U0LEAD" in lines)
    assert "  metric drop: accuracy changed by -0.3000 — 2 approvals from any approver (1/2 so far)" in lines
    one = card_request(rules=[card_request()["rules"][0]], decisions=[], approvals=0)
    assert ("Rule: breaking change: input `petal_width` removed — 2 approvals from @S0PLATFORM, @U0LEAD"
            in plain.render(ReviewCard(one), plain.CHAT).lines)


def test_a_canary_request_takes_the_canary_rule(make_registry: Any, sqlite_url: str, trained: dict) -> None:
    reg = make_registry(sqlite_url, defaults={"approvers": ["U0DS1", "U0DS2"], "required_approvals": 1},
                        models={"iris": {"rules": [{"when": "canary", "required_approvals": 2}]}})
    new = candidate(reg, trained, trained["iris_b"])
    plain_request = reg.promotions.promote("iris", new, "U0REQ")
    canary = reg.promotions.promote("iris", new, "U0REQ", canary="10", bake="30m")
    assert plain_request["required_approvals"] == 1 and plain_request["rule"] is None
    assert canary["id"] != plain_request["id"] and canary["required_approvals"] == 2
    assert canary["rule"]["when"] == "canary" and canary["canary"]["percent"] == 10
