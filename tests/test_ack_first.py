"""Background work waits for a quiet gap in Slack requests, but never longer than its patience."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Callable

from bot.app import AckFirst


def _after_gap(gate: AckFirst) -> Callable[[Callable[[], None]], None]:
    """Runs `fn` the way a listener's work runs: on its own thread, once the gate lets it."""
    def submit(fn: Callable[[], None]) -> None:
        threading.Thread(target=lambda: (gate.wait_for_gap(), fn()), daemon=True).start()
    return submit


def test_background_waits_for_requests_then_runs() -> None:
    gate = AckFirst(patience=5.0)
    submit = _after_gap(gate)
    ran = threading.Event()
    gate.request_started()
    submit(ran.set)
    assert not ran.wait(0.2), "held back while a request is being answered"
    gate.request_done()
    assert ran.wait(2.0)


def test_patience_bounds_the_wait() -> None:
    gate = AckFirst(patience=0.2)
    submit = _after_gap(gate)
    ran = threading.Event()
    gate.request_started()  # a request that never ends: the task still runs after its patience
    t0 = time.monotonic()
    submit(ran.set)
    assert ran.wait(3.0) and time.monotonic() - t0 >= 0.15


def test_a_gap_between_two_requests_of_a_burst_is_not_enough() -> None:
    gate = AckFirst(patience=5.0, quiet=0.3)
    gate.request_started()
    gate.request_done()  # a request just ended: no one in flight, but not quiet yet
    t0 = time.monotonic()
    gate.wait_for_gap()
    assert 0.2 <= time.monotonic() - t0 < 2.0


def _inside_at_once(gate: AckFirst, tasks: int = 3) -> int:
    """How many of `tasks` listener bodies, each taking 0.2 s in its turn, were running at the same time at most."""
    inside, most, lock = 0, 0, threading.Lock()

    def work() -> None:
        nonlocal inside, most
        with gate.turn():
            with lock:
                inside += 1
                most = max(most, inside)
            time.sleep(0.2)
            with lock:
                inside -= 1

    threads = [threading.Thread(target=work, daemon=True) for _ in range(tasks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10.0)
    return most


def test_work_past_its_patience_runs_one_task_at_a_time_while_requests_are_in_flight() -> None:
    gate = AckFirst(patience=0.05)
    gate.request_started()  # a burst that outlasts the patience
    assert _inside_at_once(gate) == 1


def test_work_in_a_quiet_gap_runs_side_by_side() -> None:
    gate = AckFirst(patience=5.0, quiet=0.0)
    assert _inside_at_once(gate) == 3


def test_a_burst_of_requests_does_not_wake_the_waiting_work_at_each_ack() -> None:
    """Each time a waiting task looks at the gate it takes the GIL from the acks: it looks every `quiet` seconds
    at most, not once a request (sixteen listeners woken at each ack of a burst held the acks back)."""
    looks = itertools.count()

    class Watched(AckFirst):
        @property
        def _inflight(self) -> int:
            if threading.current_thread() is not threading.main_thread():
                next(looks)
            return self.__dict__["inflight"]

        @_inflight.setter
        def _inflight(self, value: int) -> None:
            self.__dict__["inflight"] = value

    gate = Watched(patience=30.0, quiet=0.05)
    gate.request_started()  # the burst has begun
    waiters = [threading.Thread(target=gate.wait_for_gap, daemon=True) for _ in range(4)]
    for t in waiters:
        t.start()
    t0 = time.monotonic()
    for _ in range(400):  # requests a fraction of a millisecond apart, each acked at once
        time.sleep(0.0002)
        gate.request_done()
        time.sleep(0.0002)
        gate.request_started()
    gate.request_done()
    for t in waiters:
        t.join(10.0)
    elapsed = time.monotonic() - t0
    assert not any(t.is_alive() for t in waiters), "the work ran once the burst was over"
    assert next(looks) <= len(waiters) * (2 * elapsed / gate.quiet + 5), "looked at each ack"
