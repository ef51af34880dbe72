"""The console's training messages: followed in the foreground as the job goes queued → running (elapsed) →
succeeded (metrics) / failed (log tail). In Slack the records own their messages: the job's state changes record
the updates and the outbox delivers them (bot/delivery.py)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from handlers.output import Output
from handlers.results import Record, TrainingMessage

log = logging.getLogger("starchart.handlers")
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


@dataclass
class _Followed:
    job: Record
    channel: str
    ts: str
    out: Output
    shown: str
    last_edit: float
    deadline: float


class Follower:
    """Follows training messages. `background`: in a thread of its own (the bot); else `follow` returns only when
    the job has ended (the console, where the next prompt waits for it)."""

    def __init__(self, core: Callable[[], Any], *, interval: float = 2.0, running_update_every: float = 15.0,
                 timeout: float = 24 * 3600, background: bool = True,
                 report: Callable[[Output, BaseException], None] | None = None) -> None:
        self.core, self.interval, self.running_update_every = core, interval, running_update_every
        self.timeout, self.background, self.report = timeout, background, report
        self._followed: list[_Followed] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def follow(self, job: Record, channel: str, ts: str, out: Output) -> None:
        now = time.monotonic()
        with self._lock:
            self._followed.append(_Followed(job, channel, ts, out, job["state"], now, now + self.timeout))
            if self.background and (self._thread is None or not self._thread.is_alive()):
                self._thread = threading.Thread(target=self._loop, name="starchart-follow", daemon=True)
                self._thread.start()
        if not self.background:
            self._loop()

    def following(self) -> int:
        with self._lock:
            return len(self._followed)

    def _loop(self) -> None:
        while True:
            with self._lock:
                if not self._followed:
                    self._thread = None
                    return
            time.sleep(self.interval)
            self.step()

    def step(self) -> None:
        """One pass: refresh each followed model's jobs once, edit the messages whose job changed."""
        with self._lock:
            followed = list(self._followed)
        core = self.core()
        refreshed: set[str] = set()
        for f in followed:
            try:
                done = self._check(core, f, refreshed)
            except Exception as exc:  # told to the person who started the training, and logged
                done = True
                if self.report is not None:
                    self.report(f.out, exc)
                else:
                    log.exception("following %s failed", f.job["job_id"])
            if done:
                with self._lock:
                    self._followed.remove(f)

    def _check(self, core: Any, f: _Followed, refreshed: set[str]) -> bool:
        if f.job["model"] not in refreshed:
            core.jobs.refresh(f.job["model"])
            refreshed.add(f.job["model"])
        f.job = job = core.jobs.get(f.job["job_id"])
        now = time.monotonic()
        due = job["state"] == "RUNNING" and now - f.last_edit >= self.running_update_every
        if job["state"] != f.shown or due:
            metrics = core.jobs.metrics(job["job_id"]) if job["state"] == "SUCCEEDED" else None
            progress = core.jobs.progress(job["job_id"]) if job["state"] == "RUNNING" else None
            f.out.update(f.channel, f.ts, TrainingMessage(job, metrics, progress))
            f.shown, f.last_edit = job["state"], now
        return job["state"] in TERMINAL or now >= f.deadline
