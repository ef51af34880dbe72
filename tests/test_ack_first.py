"""Background work waits for a gap in Slack requests, but never longer than its patience."""

from __future__ import annotations

import threading
import time

from bot.app import AckFirst, background_executor


def test_background_waits_for_requests_then_runs() -> None:
    gate = AckFirst(patience=5.0)
    submit = background_executor(gate)
    ran = threading.Event()
    gate.request_started()
    submit(ran.set)
    assert not ran.wait(0.2), "held back while a request is being answered"
    gate.request_done()
    assert ran.wait(2.0)


def test_patience_bounds_the_wait() -> None:
    gate = AckFirst(patience=0.2)
    submit = background_executor(gate)
    ran = threading.Event()
    gate.request_started()  # a request that never ends: the task still runs after its patience
    t0 = time.monotonic()
    submit(ran.set)
    assert ran.wait(3.0) and time.monotonic() - t0 >= 0.15
