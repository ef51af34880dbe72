"""`starchart worker`: keeps the records true while nobody is asking — jobs, interrupted applies, canaries, expiry,
scheduled retrains put up for review, audit checkpoints (`audit_checkpoint`) — and delivers the outbox's messages
to Slack (bot.delivery). `starchart clock`: starts scheduled trainings. `starchart serve --with-worker` runs both
passes in the web process (`in_background`)."""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from datetime import datetime
from typing import Any, Callable

from model_registry.domain.errors import StarchartError
from model_registry.domain.names import parse_duration, utcnow

log = logging.getLogger("starchart.worker")


def checkpoint_due(registry: Any, now: datetime) -> bool:
    every = registry.config.audit_checkpoint.get("every")
    if not every:
        return False
    last = max((str(cp.get("at", "")) for cp in registry.audit.checkpoints()), default="")
    if not last:
        return True
    return now - datetime.strptime(last, "%Y-%m-%dT%H:%M:%SZ") >= parse_duration(str(every))


def record_checkpoint(registry: Any) -> dict[str, Any]:
    """Record a checkpoint outside the database; a copy for the configured Slack channel goes through the outbox."""
    return registry.audit.checkpoint(registry.config.audit_checkpoint.get("channel"))


def one_pass(registry: Any, client: Any = None, sender: Any = None) -> dict[str, int]:
    """Jobs refreshed, interrupted applies settled, running canaries judged, requests expired, nightly retrains put
    up for review (their cards recorded for the outbox), a checkpoint when due; then the due messages delivered (with `sender`, or a
    sender on `client`)."""
    done = {"reconciled": len(registry.promotions.reconcile())}  # first: a settled apply should not wait for jobs
    done["canaries"] = len(registry.canaries.check())  # rolled back or promoted by their figures and bake
    done.update(jobs=registry.jobs.refresh(), expired=registry.promotions.expire(), checkpoints=0)
    done["evaluations"] = registry.evaluations.follow()  # evaluations started and ended (their cards updated)
    opened = registry.schedules.follow_scheduled()
    for req in opened:
        if not req.get("channel"):
            log.info("promotion request #%s of %s is open (no Slack channel to post its card)", req["id"], req["model"])
    done["reviews"] = len(opened)
    if checkpoint_due(registry, utcnow()):
        record_checkpoint(registry)
        done["checkpoints"] = 1
    if sender is None and client is not None:
        from bot.delivery import Sender

        sender = Sender(registry, client)
    if sender is not None:
        sender.deliver_due()
    return done


WORKER_INTERVAL, CLOCK_INTERVAL = 10.0, 30.0  # seconds between passes


def worker_pass(registry: Any, sender: Any = None) -> Callable[[], None]:
    """One pass of `starchart worker`, as the loop runs it: what it did is logged."""
    def work() -> None:
        done = one_pass(registry, sender=sender)
        if any(done.values()):
            log.info("worker pass: %s", done)

    return work


def clock_pass(registry: Any) -> Callable[[], None]:
    """One pass of `starchart clock`: the scheduled trainings that are due start."""
    def work() -> None:
        for job in registry.schedules.run_due():
            log.info("scheduled training %s started", job["job_id"])

    return work


def run_worker(once: bool = False, interval: float = WORKER_INTERVAL) -> int:
    from model_registry.bootstrap import Core

    _log_progress()
    registry = Core.from_env()
    from model_registry.config import SlackSettings

    slack = SlackSettings.from_env()
    sender = None
    if slack.bot_token:
        from bot.delivery import Sender, sender_client

        sender = Sender(registry, sender_client(slack), lease=slack.outbox_lease)
        if not once:
            sender.start()  # prompt: woken by this process's commits, polling for the others'
    else:
        log.warning("SLACK_BOT_TOKEN is not set: messages wait in the outbox (see `starchart outbox`)")
    return _every(interval, worker_pass(registry, sender), "worker", once)


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


def run_clock(once: bool = False, interval: float = CLOCK_INTERVAL) -> int:
    """`starchart clock`: start scheduled trainings when they are due (several clocks never double-fire)."""
    from model_registry.bootstrap import Core

    _log_progress()
    registry = Core.from_env()
    registry.schedules.sync_configured()
    return _every(interval, clock_pass(registry), "clock", once)


def in_background(registry: Any, worker_interval: float = WORKER_INTERVAL,
                  clock_interval: float = CLOCK_INTERVAL) -> threading.Thread:
    """`serve --with-worker`: the worker's and the clock's passes on daemon threads of this web process.

    gunicorn runs several worker processes; a lock file under STARCHART_HOME picks the one that runs the passes
    (the others wait on it, so when that process ends, another takes over). `registry` may be the lazily loaded
    core: this waits for it. Messages are delivered by the web process's own sender, not by these passes.
    """
    def duties() -> None:
        from bot.app import LazyRegistry

        try:
            core = registry.get(timeout=None) if isinstance(registry, LazyRegistry) else registry
        except BaseException:  # noqa: BLE001 - the load error is logged by the loader and shown by /healthz
            log.error("the worker and the clock do not run: the core failed to load")
            return
        core.settings.home.mkdir(parents=True, exist_ok=True)  # on PostgreSQL nothing else may have made it yet
        lock = open(core.settings.home / "with-worker.lock", "a")  # held for the life of the process
        fcntl.flock(lock, fcntl.LOCK_EX)  # blocks while another process of this machine runs the passes
        log.info("the worker and the clock run in this web process (pid %s)", os.getpid())
        try:
            core.schedules.sync_configured()
        except Exception:  # the clock's passes go on; the traceback is in the log
            log.exception("starchart.yaml's schedules could not be read in")
        threading.Thread(target=_every, args=(clock_interval, clock_pass(core), "clock", False),
                         name="starchart-clock", daemon=True).start()
        _every(worker_interval, worker_pass(core), "worker", False)

    log.setLevel(logging.INFO)  # the passes say what they did, as in their own processes; the web's logs stay as set
    thread = threading.Thread(target=duties, name="starchart-worker", daemon=True)
    thread.start()
    return thread
