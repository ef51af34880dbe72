"""`starchart worker`: jobs followed, interrupted applies reconciled, expiry, audit checkpoints posted."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import Any

from conftest import expose_two_versions, replay_args
from fakes.slack_fake import SlackFake
from sqlalchemy import update

from bot.app import slack_client
from bot.worker import one_pass
from model_registry.adapters.records import PromotionRequest
from model_registry.config import SlackSettings
from model_registry.domain import names


def test_worker_pass(make_registry: Any, db_url: str, trained: dict) -> None:
    reg = expose_two_versions(make_registry(db_url, env={"STARCHART_AUDIT_KEY": "k"}), trained)
    reg.config.audit_checkpoint.update({"channel": "C0AUDIT", "every": "1h"})
    cand = reg.versions.of_model("iris")["versions"][0]["name"]
    stuck = reg.promotions.promote("iris", cand, "U_REQ")
    reg.promotions.decide(stuck["id"], "U_OK", True)
    with reg.db.unit_of_work() as s:
        s.execute(update(PromotionRequest).where(PromotionRequest.id == stuck["id"])
                  .values(state="applying", apply_started_at=names.utcnow() - timedelta(minutes=10)))
    job = reg.jobs.train("iris", "U_T", args=replay_args(trained["iris_a"]))
    with SlackFake(channels={"C0AUDIT": "audit"}) as fake:
        client = slack_client(SlackSettings.from_env({"SLACK_API_URL": fake.base_url, "SLACK_BOT_TOKEN": fake.token}))
        for _ in range(600):
            one_pass(reg, client)
            if reg.jobs.get(job["job_id"])["state"] == "SUCCEEDED":
                break
            time.sleep(0.05)
        assert reg.jobs.get(job["job_id"])["state"] == "SUCCEEDED"
        assert reg.promotions.get(stuck["id"])["state"] == "failed"  # reconciled: the backend never switched
        again = one_pass(reg, client)
        posted = [c.params["text"] for c in fake.calls_to("chat.postMessage")]
        assert len(posted) == 1 and "Audit checkpoint" in posted[0], "once per `every`, not every pass"
        assert again["checkpoints"] == 0
    cps = reg.audit.checkpoints()
    assert len(cps) == 1 and cps[0]["sig"] and json.dumps(cps[0])
    assert reg.audit.verify().ok
