"""From a state change to its message in Slack: through the outbox, against changing and updating directly.

The state change commits anyway: a decision (a rejection with its reason) on a promotion request, with its audit
event, and the request's review card updated to show it. Measured: `promotions.decide` records the card's update
in its own transaction; the outbox's sender in this process (woken after the commit) renders the request as it
stands and calls chat.update. Baseline: the same decision on a request whose card the bot posted itself (no outbox
row: nothing is recorded, nobody is woken), then the same rendering sent with chat.update at once, as the bot did
before the outbox. Both end when the Slack fake (local, real HTTP) has applied the update; both run in the same
process, on the same database, alternating. Each round opens a new request and posts its card first, untimed.

    python benchmarks/outbox_delivery.py [--quick] [--postgres]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

CHANNEL, MODEL = "C0BENCH", "bench"
REQUESTER, REVIEWER, TRAINER = "U0BENCHREQ", "U0BENCHREV", "U0BENCHTRN"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Arrivals:
    """chat.update on the fake, noting when each update is applied."""

    def __init__(self, fake: Any) -> None:
        self.original = fake._handlers["chat.update"]
        self.arrived = threading.Event()
        self.at = 0.0
        fake.register("chat.update", self.update)

    def update(self, params: dict[str, Any]) -> dict[str, Any]:
        answer: dict[str, Any] = self.original(params)
        self.at = time.perf_counter()
        self.arrived.set()
        return answer

    def expect(self) -> None:
        self.arrived.clear()

    def wait(self) -> float:
        if not self.arrived.wait(30):
            raise RuntimeError("the card's update never arrived")
        return self.at


def core_on(home: Path, url: str) -> Any:
    from model_registry.bootstrap import bootstrap
    from model_registry.config import ProjectConfig, Settings

    config = home / "starchart.yaml"
    config.write_text(f"defaults: {{}}\nmodels: {{{MODEL}: {{required_approvals: 1}}}}\n")
    settings = Settings.from_env({"STARCHART_HOME": str(home), "DATABASE_URL": url, "STARCHART_CONFIG": str(config)})
    return bootstrap(settings, ProjectConfig.load(config))


def two_versions(core: Any) -> str:
    """A default and a candidate, recorded as expose records them (no training: the review is what is measured);
    returns the candidate's name."""
    from model_registry.adapters.records import SUCCEEDED, Job, ModelRecord, Version
    from model_registry.domain.diffs import version_digest
    from model_registry.domain.names import utcnow
    from model_registry.services.views import version_view

    tensor = {"dtype": "DT_FLOAT", "shape": [-1]}
    signature = {"method_name": "tensorflow/serving/predict", "inputs": {"x": tensor}, "outputs": {"y": tensor}}
    names = []
    with core.db.unit_of_work() as s:
        for ts, epochs, accuracy in (("20261201000000", 5, 0.91), ("20261202000000", 20, 0.94)):
            job_id, name = f"{MODEL}_{ts}", f"v{ts}"
            path = f"{core.settings.home}/bucket/{MODEL}/{ts}"
            s.add(Job(job_id=job_id, model=MODEL, ts=ts, state=SUCCEEDED, module="trainer.task",
                      args=[f"--epochs={epochs}"], workers=1, package_uris=[], train_path=path, backend="local",
                      requested_by=TRAINER, created_at=utcnow(), version_name=name))
            s.flush()
            version = Version(model=MODEL, name=name, job_id=job_id, deployment_uri=f"{path}/model/",
                              created_at=utcnow(), trained_by=TRAINER, exposed_by=TRAINER,
                              program={"module": "trainer.task", "package_uris": [], "sha256": "0" * 64},
                              args=[f"--epochs={epochs}"], metrics={"accuracy": accuracy, "loss": 1 - accuracy},
                              signature=signature, job={"state": SUCCEEDED}, digest="")
            version.digest = version_digest(version_view(version))
            s.add(version)
            names.append(name)
        s.add(ModelRecord(name=MODEL, default_version=names[0], updated_at=utcnow()))
    return names[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="60 measured pairs (300 without)")
    ap.add_argument("--reps", type=int, help="measured pairs (a few: a smoke run of the script)")
    ap.add_argument("--postgres", action="store_true", help="PostgreSQL at 127.0.0.1:5432 instead of SQLite")
    opts = ap.parse_args()
    reps, warm = (60, 10) if opts.quick else (300, 30)
    if opts.reps:
        reps, warm = opts.reps, max(1, min(warm, opts.reps // 6))

    from fakes.slack_fake import SlackFake

    from benchmarks.support.databases import pg_db, sqlite_db
    from bot.delivery import Sender, sender_client
    from bot.slack_output import SlackOutput
    from handlers.results import ReviewCard
    from model_registry.config import SlackSettings

    work = Path(tempfile.mkdtemp(prefix="starchart-bench-outbox-"))
    database = pg_db() if opts.postgres else sqlite_db(work)
    with database as (url, _connect, _placeholder), SlackFake(channels={CHANNEL: "bench"}) as fake:
        core = core_on(work, url)
        candidate = two_versions(core)
        settings = SlackSettings.from_env({"SLACK_API_URL": fake.base_url, "SLACK_BOT_TOKEN": fake.token})
        arrivals = Arrivals(fake)
        sender = Sender(core, sender_client(settings), poll=1.0).start()
        direct = SlackOutput(sender_client(settings))

        def settled() -> None:  # untimed: the last delivery's bookkeeping (its delivered revision) has committed
            while core.outbox.undelivered():
                time.sleep(0.001)

        def decide(request_id: int) -> None:
            core.promotions.decide(request_id, REVIEWER, False, reason="loss is not good enough yet")

        def through_outbox() -> float:
            req = core.promotions.promote(MODEL, candidate, REQUESTER, card=True, channel=CHANNEL)
            settled()  # its card is posted by the sender
            arrivals.expect()
            t0 = time.perf_counter()
            decide(req["id"])
            return arrivals.wait() - t0

        def updated_directly() -> float:
            req = core.promotions.promote(MODEL, candidate, REQUESTER)
            ts = direct.post(CHANNEL, ReviewCard(req)).ts  # the bot posts its card itself: no outbox row
            arrivals.expect()
            t0 = time.perf_counter()
            decide(req["id"])
            direct.update(CHANNEL, ts, ReviewCard(core.promotions.get(req["id"])))
            return arrivals.wait() - t0

        for _ in range(warm):
            through_outbox()
            updated_directly()
        measured: list[float] = []
        baseline: list[float] = []
        for i in range(reps):  # alternating, so both see the same machine
            pair = (through_outbox, updated_directly) if i % 2 == 0 else (updated_directly, through_outbox)
            for run in pair:
                (measured if run is through_outbox else baseline).append(run())
        settled()
        sender.stop()
        undelivered = core.outbox.undelivered()
        cards = len([m for m in fake.messages_in(CHANNEL) if "rejected" in json.dumps(m)])
        core.close()
    if undelivered:
        raise RuntimeError(f"{len(undelivered)} message(s) left undelivered")
    if cards != 2 * (reps + warm):
        raise RuntimeError(f"{cards} cards show their rejection, not {2 * (reps + warm)}")
    m_ms, b_ms = statistics.median(measured) * 1000, statistics.median(baseline) * 1000
    log(f"outbox: median {m_ms:.2f} ms, p90 {statistics.quantiles(measured, n=10)[-1] * 1000:.2f} ms; "
        f"direct: median {b_ms:.2f} ms, p90 {statistics.quantiles(baseline, n=10)[-1] * 1000:.2f} ms "
        f"({reps} each, {'PostgreSQL' if opts.postgres else 'SQLite'})")
    print(json.dumps({"benchmark": "outbox_delivery", "ratio": round(m_ms / b_ms, 3), "better": "lower",
                      "measured": round(m_ms, 3), "baseline": round(b_ms, 3), "unit": "ms",
                      "runs": reps, "database": "postgresql" if opts.postgres else "sqlite"}))


if __name__ == "__main__":
    main()
