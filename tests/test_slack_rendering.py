"""Command parsing as Slack clients send it, and Block Kit rendering within Slack's limits."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bot import blocks
from handlers.grammar import Usage
from handlers.parsing import MAX_TEXT, normalize, parse, usage_text
from model_registry.domain.diffs import card_digest, diff_versions
from model_registry.domain.errors import InvalidInput


@pytest.mark.parametrize("typed, expected", [
    ("train iris &amp;&amp; x", "train iris && x"),
    ("diff iris &lt;v1&gt;", "diff iris <v1>"),
    ("train iris — —epochs=5", "train iris -- --epochs=5"),
    ("train iris – –epochs=5", "train iris -- --epochs=5"),
    ("train iris —epochs=5", "train iris --epochs=5"),
    ("promote iris v1 --reason “better model”", 'promote iris v1 --reason "better model"'),
    ("audit --user <@U123ABC|alice>", "audit --user U123ABC"),
    ("audit --user <@U123ABC>", "audit --user U123ABC"),
    ("x <!subteam^S0TEAM|@ml-team> <#C01|general>", "x S0TEAM C01"),
    ("x <https://example.com|site>", "x https://example.com"),
])
def test_normalize_what_slack_clients_send(typed: str, expected: str) -> None:
    assert normalize(typed) == expected


def test_parse_train_with_smart_dashes_and_trainer_args() -> None:
    args, trainer = parse("train iris —module trainer.task — —epochs=5 “--name=a b”")
    assert args.command == "train" and args.model_pos == "iris" and args.module == "trainer.task"
    assert trainer == ["--epochs=5", "--name=a b"]


def test_parse_errors_are_clear() -> None:
    with pytest.raises(Usage) as unknown:
        parse("traim iris")
    assert "did you mean train" in usage_text(str(unknown.value))
    with pytest.raises(InvalidInput) as quote:
        parse('promote iris v1 --reason "unclosed')
    assert "quote" in quote.value.hint
    with pytest.raises(InvalidInput) as long:
        parse("train iris -- " + "x" * 40_000)
    assert f"{MAX_TEXT:,}" in long.value.message
    with pytest.raises(Usage) as helped:
        parse("help promote")
    assert "promote" in str(helped.value) and "--reason" in str(helped.value)
    with pytest.raises(Usage):
        parse("")
    with pytest.raises(Usage) as trainer_flag:  # a trainer's flag typed before `--`: say where it goes
        parse("train iris --epochs=banana")
    assert "unrecognized arguments: --epochs=banana" in str(trainer_flag.value)
    assert "go after --, as in: train iris -- --epochs=5" in usage_text(str(trainer_flag.value))
    with pytest.raises(Usage) as other_flag:
        parse("versions iris --epochs=5")
    assert "unrecognized arguments: --epochs=5" in str(other_flag.value) and "go after --" not in str(other_flag.value)


def _sig(n_inputs: int) -> dict[str, Any]:
    return {"method_name": "tensorflow/serving/predict",
            "inputs": {f"feature_{i:04d}": {"dtype": "DT_FLOAT", "shape": [-1], "tensor": f"x{i}:0"}
                       for i in range(n_inputs)},
            "outputs": {"probabilities": {"dtype": "DT_FLOAT", "shape": [-1, 3], "tensor": "p:0"}}}


def _version(name: str, n_params: int, n_inputs: int, shift: int) -> dict[str, Any]:
    return {"model": "big", "name": name, "job_id": f"big_{name[1:]}", "trained_by": "U_T",
            "created_at": "2026-11-27T00:00:00Z", "deployment_uri": f"/b/{name}/model/",
            "program": {"module": "trainer.task", "sha256": str(shift) * 64, "package_uris": []},
            "args": [f"--param_{i:04d}={i + shift}" for i in range(n_params)],
            "metrics": {f"metric_{i:03d}": 0.5 + shift / 100 + i / 1000 for i in range(60)},
            "signature": _sig(n_inputs)}


def _request(diff: dict[str, Any]) -> dict[str, Any]:
    return {"id": 7, "model": "big", "kind": "promote", "candidate": "v2", "base": "v1", "state": "open",
            "requested_by": "U_REQ", "reason": "r" * 5000, "required_approvals": 2, "approvals": 0,
            "decisions": [], "created_at": "2026-11-27T00:00:00Z", "expires_at": "2026-11-30T00:00:00Z",
            "applied_at": None, "error": None, "card_digest": card_digest("a" * 64, "b" * 64, diff), "diff": diff,
            "channel": "C1", "message_ts": "1.0"}


def _assert_within_limits(title: str, items: list[dict[str, Any]]) -> None:
    assert len(items) <= blocks.MAX_BLOCKS
    for b in items:
        if b.get("type") == "section" and b.get("text"):
            assert len(b["text"]["text"]) <= blocks.SECTION_TEXT
        for e in b.get("elements", []):
            if e.get("type") == "button":
                assert len(e["value"]) <= blocks.BUTTON_VALUE
    assert len(json.dumps(items)) + len(title) < 12_000


def test_large_model_card_keeps_a_summary_and_flags_the_rest() -> None:
    base, cand = _version("v1", 2000, 500, 1), _version("v2", 2000, 480, 2)
    diff = diff_versions(cand, base)
    assert len(diff["parameters"]) == 2000 and len(diff["signature"]["breaking"]) == 20
    req = _request(diff)
    title, items, truncated = blocks.review_card(req)
    _assert_within_limits(title, items)
    assert truncated
    text = json.dumps(items)
    assert "Breaking signature changes" in text and "full diff in the thread" in text.lower()
    actions = [b for b in items if b["type"] == "actions"][0]["elements"]
    assert [a["text"]["text"] for a in actions] == ["Approve", "Reject", "Try"]
    assert "confirm" in actions[0]
    assert json.loads(actions[0]["value"]) == {"r": 7, "m": "big", "d": req["card_digest"]}
    full = blocks.full_diff_text(req)
    assert full.count("param_") >= 2000 and "feature_0499" in full
    decided = blocks.decided_card({**req, "state": "failed", "error": "503 " * 1000,
                                   "decisions": [{"user": "U_A", "decision": "approve", "reason": None,
                                                  "at": "2026-11-27T00:00:01Z"}]})
    _assert_within_limits(decided[0], decided[1])
    assert [e["text"]["text"] for e in decided[1][-1]["elements"]] == ["Retry"]


def test_small_card_shows_everything() -> None:
    base, cand = _version("v1", 3, 4, 1), _version("v2", 3, 4, 2)
    cand["metrics"] = {"accuracy": 0.97, "loss": 0.1}
    base["metrics"] = {"accuracy": 0.95, "loss": 0.2}
    title, items, truncated = blocks.review_card(_request(diff_versions(cand, base)))
    assert not truncated
    text = json.dumps(items)
    assert "param_0002" in text and "+0.0200" in text and "Signature* unchanged" in text


def test_long_tables_are_split_on_line_boundaries() -> None:
    rows = [{"a": f"row-{i:05d}", "b": "x" * 60} for i in range(3000)]
    title, items, truncated = blocks.table("Jobs", rows, [("a", "A"), ("b", "B")])
    assert truncated
    _assert_within_limits(title, items)
    for b in items[1:]:
        body = b["text"]["text"]
        assert body.startswith("```") and body.endswith("```")
