"""Opt-in: the real Slack Web API accepts our cards. Skipped unless SLACK_LIVE_BOT_TOKEN and
SLACK_LIVE_CHANNEL are set (this machine cannot reach Slack)."""

from __future__ import annotations

import os

import pytest

from bot import blocks
from model_registry.domain.diffs import card_digest, diff_versions

TOKEN, CHANNEL = os.environ.get("SLACK_LIVE_BOT_TOKEN"), os.environ.get("SLACK_LIVE_CHANNEL")
pytestmark = pytest.mark.skipif(not (TOKEN and CHANNEL), reason="set SLACK_LIVE_BOT_TOKEN and SLACK_LIVE_CHANNEL")


def test_review_card_posts_updates_and_deletes_on_real_slack() -> None:
    from slack_sdk import WebClient

    base = {"model": "iris", "name": "v1", "job_id": "iris_1", "trained_by": "U0LIVE", "args": ["--epochs=5"],
            "metrics": {"accuracy": 0.9}, "signature": {"inputs": {}, "outputs": {}},
            "program": {"module": "trainer.task", "sha256": "a" * 64}}
    cand = {**base, "name": "v2", "job_id": "iris_2", "args": ["--epochs=20"], "metrics": {"accuracy": 0.95}}
    diff = diff_versions(cand, base)
    req = {"id": 1, "model": "iris", "kind": "promote", "candidate": "v2", "base": "v1", "state": "open",
           "requested_by": "U0LIVE", "reason": "live smoke test", "required_approvals": 1, "approvals": 0,
           "decisions": [], "expires_at": "-", "applied_at": None, "error": None, "diff": diff,
           "card_digest": card_digest("c", "b", diff)}
    client = WebClient(token=TOKEN)
    text, card, _ = blocks.review_card(req)
    posted = client.chat_postMessage(channel=CHANNEL, text=text, blocks=card)
    text, done, _ = blocks.decided_card({**req, "state": "rejected", "decisions": [
        {"user": "U0LIVE", "decision": "reject", "reason": "smoke test", "at": "now"}]})
    client.chat_update(channel=posted["channel"], ts=posted["ts"], text=text, blocks=done)
    client.chat_delete(channel=posted["channel"], ts=posted["ts"])
