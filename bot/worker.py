"""`starchart worker`: keeps the records true while nobody is asking — jobs, interrupted applies, expiry,
scheduled retrains put up for review, and audit checkpoints posted to Slack (`audit_checkpoint`)."""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime
from typing import Any, Callable

from model_registry.errors import StarchartError
from model_registry.names import parse_duration, utcnow

log = logging.getLogger("starchart.worker")


def checkpoint_due(registry: Any, now: datetime) -> bool:
    every = registry.config.audit_checkpoint.get("every")
    if not every:
        return False
    last = max((str(cp.get("at", "")) for cp in registry.audit.checkpoints()), default="")
    if not last:
        return True
    return now - datetime.strptime(last, "%Y-%m-%dT%H:%M:%SZ") >= parse_duration(str(every))


def post_checkpoint(registry: Any, client: Any) -> dict[str, Any]:
    """Record a checkpoint outside the database and post a copy to the configured Slack channel."""
    cp = registry.audit.checkpoint()
    channel = registry.config.audit_checkpoint.get("channel")
    if client is not None and channel:
        text = (f"Audit checkpoint: {cp['count']} events, head `{cp['head']}` at {cp['at']}"
                + (f", signature `{cp['sig']}`" if cp["sig"] else " (unsigned)"))
        client.chat_postMessage(channel=channel, text=text)
    return cp


def post_review_cards(registry: Any, client: Any, requests: list[dict[str, Any]]) -> None:
    """Review cards for promotion requests opened without a person (scheduled retrains)."""
    from bot import blocks
    from handlers.cards import post_card
    from handlers.context import Ctx, Deps

    deps = Deps(registry=registry, render=blocks, background=lambda fn: fn())
    for req in requests:
        if client is None or not req.get("channel"):
            log.info("promotion request #%s of %s is open (no Slack channel to post its card)", req["id"], req["model"])
            continue
        ctx = Ctx(user=req["requested_by"], channel=req["channel"], client=client,
                  respond=lambda text="", **_: log.info("%s", text))
        post_card(deps, ctx, req)


def one_pass(registry: Any, client: Any = None) -> dict[str, int]:
    done = {"jobs": registry.jobs.refresh(), "reconciled": len(registry.promotions.reconcile()),
            "expired": registry.promotions.expire(), "checkpoints": 0}
    opened = registry.schedules.follow_scheduled()
    post_review_cards(registry, client, opened)
    done["reviews"] = len(opened)
    if checkpoint_due(registry, utcnow()):
        post_checkpoint(registry, client)
        done["checkpoints"] = 1
    return done


def run_worker(once: bool = False, interval: float = 10.0) -> int:
    from model_registry.bootstrap import Core

    _log_progress()
    registry = Core.from_env()
    client = None
    if os.environ.get("SLACK_BOT_TOKEN"):
        from bot.app import slack_client

        client = slack_client()

    def work() -> None:
        done = one_pass(registry, client)
        if any(done.values()):
            log.info("worker pass: %s", done)

    return _every(interval, work, "worker", once)


def _log_progress() -> None:
    """Long-running processes say what they do (the CLI configures logging for warnings only)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("starchart").setLevel(logging.INFO)


def _every(interval: float, work: Callable[[], None], name: str, once: bool) -> int:
    """Run `work` every `interval` seconds; a failed pass is logged and the next one comes all the same."""
    while True:
        try:
            work()
        except StarchartError as exc:
            log.warning("%s pass failed: %s", name, exc)
        except Exception:  # keep going; the traceback is in the log
            log.exception("%s pass failed", name)
        if once:
            return 0
        time.sleep(interval)


def run_clock(once: bool = False, interval: float = 30.0) -> int:
    """`starchart clock`: start scheduled trainings when they are due (several clocks never double-fire)."""
    from model_registry.bootstrap import Core

    _log_progress()
    registry = Core.from_env()
    registry.schedules.sync_configured()

    def work() -> None:
        for job in registry.schedules.run_due():
            log.info("scheduled training %s started", job["job_id"])

    return _every(interval, work, "clock", once)
