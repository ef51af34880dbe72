"""From a state change to its message in Slack: through the outbox, against posting directly.

The state change is an audit event followed by an audit checkpoint with a channel (one of the messages the bot sends on its own). Measured:
`audit.checkpoint(channel)` records the message with it, the outbox's sender (a thread, woken after the commit)
claims it, renders it and posts it. Baseline: `audit.checkpoint()`, then the same rendering posted at once through
slack_sdk, as the bot did before the outbox. Both end when the Slack fake (local, real HTTP) has applied the post;
both run in the same process, on the same SQLite database, alternating.

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

CHANNEL = "C0BENCH"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Arrivals:
    """chat.postMessage on the fake, noting when each post is applied."""

    def __init__(self, fake: Any) -> None:
        self.original = fake._handlers["chat.postMessage"]
        self.arrived = threading.Event()
        self.at = 0.0
        fake.register("chat.postMessage", self.post)

    def post(self, params: dict[str, Any]) -> dict[str, Any]:
        answer: dict[str, Any] = self.original(params)
        self.at = time.perf_counter()
        self.arrived.set()
        return answer

    def expect(self) -> None:
        self.arrived.clear()

    def wait(self) -> float:
        if not self.arrived.wait(30):
            raise RuntimeError("the post never arrived")
        return self.at


def core_on(home: Path, url: str) -> Any:
    from model_registry.bootstrap import bootstrap
    from model_registry.config import ProjectConfig, Settings

    config = home / "starchart.yaml"
    config.write_text("defaults: {}\n")
    settings = Settings.from_env({"STARCHART_HOME": str(home), "DATABASE_URL": url, "STARCHART_CONFIG": str(config)})
    return bootstrap(settings, ProjectConfig.load(config))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--postgres", action="store_true", help="PostgreSQL at 127.0.0.1:5432 instead of SQLite")
    opts = ap.parse_args()
    reps, warm = (60, 10) if opts.quick else (300, 30)

    from fakes.slack_fake import SlackFake

    from benchmarks.support.databases import pg_db, sqlite_db
    from bot.delivery import Sender, sender_client
    from bot.slack_output import SlackOutput
    from handlers.results import Checkpoint
    from model_registry.config import SlackSettings

    work = Path(tempfile.mkdtemp(prefix="starchart-bench-outbox-"))
    database = pg_db() if opts.postgres else sqlite_db(work)
    with database as (url, _connect, _placeholder), SlackFake(channels={CHANNEL: "bench"}) as fake:
        core = core_on(work, url)
        settings = SlackSettings.from_env({"SLACK_API_URL": fake.base_url, "SLACK_BOT_TOKEN": fake.token})
        arrivals = Arrivals(fake)
        sender = Sender(core, sender_client(settings), poll=1.0).start()
        direct = SlackOutput(sender_client(settings))

        def event() -> None:  # one audit event each time: every checkpoint differs (a checkpoint is its head)
            core.audit.record_refusal("U0BENCH", "bench", "a refusal between two checkpoints")

        def settled() -> None:  # untimed: the last delivery's bookkeeping (its delivered revision) has committed
            while core.outbox.undelivered():
                time.sleep(0.001)

        def through_outbox() -> float:
            settled()
            arrivals.expect()
            t0 = time.perf_counter()
            event()
            core.audit.checkpoint(CHANNEL)
            return arrivals.wait() - t0

        def posted_directly() -> float:
            settled()
            arrivals.expect()
            t0 = time.perf_counter()
            event()
            cp = core.audit.checkpoint()
            direct.post(CHANNEL, Checkpoint(cp, CHANNEL))
            return arrivals.wait() - t0

        for _ in range(warm):
            through_outbox()
            posted_directly()
        measured: list[float] = []
        baseline: list[float] = []
        for i in range(reps):  # alternating, so both see the same machine
            pair = (through_outbox, posted_directly) if i % 2 == 0 else (posted_directly, through_outbox)
            for run in pair:
                (measured if run is through_outbox else baseline).append(run())
        time.sleep(0.2)  # the last post's own bookkeeping (its delivered revision) commits after Slack applied it
        sender.stop()
        undelivered = core.outbox.undelivered()
        core.close()
    if undelivered:
        raise RuntimeError(f"{len(undelivered)} message(s) left undelivered")
    m_ms, b_ms = statistics.median(measured) * 1000, statistics.median(baseline) * 1000
    log(f"outbox: median {m_ms:.2f} ms, p90 {statistics.quantiles(measured, n=10)[-1] * 1000:.2f} ms; "
        f"direct: median {b_ms:.2f} ms, p90 {statistics.quantiles(baseline, n=10)[-1] * 1000:.2f} ms "
        f"({reps} each, {'PostgreSQL' if opts.postgres else 'SQLite'})")
    print(json.dumps({"benchmark": "outbox_delivery", "ratio": round(m_ms / b_ms, 3), "better": "lower",
                      "measured": round(m_ms, 3), "baseline": round(b_ms, 3), "unit": "ms",
                      "runs": reps, "database": "postgresql" if opts.postgres else "sqlite"}))


if __name__ == "__main__":
    main()
