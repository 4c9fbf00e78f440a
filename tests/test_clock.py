"""The package clock (counts suspended time on Linux) and the process-wide deadline watchdog."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

import pytest

from electfsm import clock


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"not within {timeout}s: {what}"
        time.sleep(0.01)


def watchdog_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "electfsm-watchdog" and t.is_alive()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CLOCK_BOOTTIME is Linux's")
def test_the_package_clock_is_boottime_on_linux() -> None:
    """time.monotonic stops while the host is suspended; CLOCK_BOOTTIME does not, as the
    lease on the etcd server does not stop either."""
    assert clock.NAME == "CLOCK_BOOTTIME"
    before = time.clock_gettime(time.CLOCK_BOOTTIME)
    now = clock.now()
    after = time.clock_gettime(time.CLOCK_BOOTTIME)
    assert before <= now <= after


def test_an_alarm_fires_once_at_its_deadline_and_not_before() -> None:
    dog = clock.Watchdog()
    fired: list[float] = []
    deadline = clock.now() + 0.3
    dog.arm(deadline, lambda: fired.append(clock.now()))
    wait_for(lambda: bool(fired), 10, "the alarm fired")
    assert fired[0] >= deadline
    wait_for(lambda: dog.pending == 0, 10, "nothing left pending")
    assert len(fired) == 1


def test_a_moved_alarm_fires_at_its_new_deadline() -> None:
    dog = clock.Watchdog()
    fired: list[float] = []
    alarm = dog.arm(clock.now() + 0.2, lambda: fired.append(clock.now()))
    later = clock.now() + 0.6
    alarm.move(later)
    wait_for(lambda: bool(fired), 10, "the moved alarm fired")
    assert fired[0] >= later
    sooner = dog.arm(clock.now() + 30, lambda: fired.append(clock.now()))
    sooner_deadline = clock.now() + 0.2
    sooner.move(sooner_deadline)  # earlier than armed: fires at the earlier time
    wait_for(lambda: len(fired) == 2, 10, "the alarm moved earlier fired")
    assert fired[1] >= sooner_deadline


def test_a_cancelled_alarm_never_fires_and_the_idle_thread_exits() -> None:
    dog = clock.Watchdog()
    fired: list[str] = []
    cancelled = dog.arm(clock.now() + 0.2, lambda: fired.append("cancelled"))
    kept = dog.arm(clock.now() + 0.4, lambda: fired.append("kept"))
    cancelled.cancel()
    wait_for(lambda: fired == ["kept"], 10, "the kept alarm fired")
    kept.cancel()  # after firing: no effect
    dog.join_idle(5)
    assert dog._thread is None


def test_one_thread_fires_a_thousand_deadlines_and_a_failing_callback_stops_none() -> None:
    """One thread for every deadline of the process: a later feature runs 1,000 electors."""
    dog = clock.Watchdog()
    before = set(watchdog_threads())
    fired: list[int] = []
    start = clock.now()

    def boom() -> None:
        raise RuntimeError("a callback failed")

    dog.arm(start + 0.1, boom)
    for i in range(1000):
        dog.arm(start + 0.2 + (i % 50) / 100, lambda i=i: fired.append(i))
    started = set(watchdog_threads()) - before
    assert len(started) == 1
    wait_for(lambda: len(fired) == 1000, 20, "every alarm fired")
    assert sorted(fired) == list(range(1000))
    dog.join_idle(5)
    assert not any(t.is_alive() for t in started) and dog._thread is None


def test_the_shared_watchdog_is_one_per_clock() -> None:
    assert clock.watchdog() is clock.watchdog(clock.now)
    other: Callable[[], float] = time.monotonic
    assert clock.watchdog(other) is not clock.watchdog() and clock.watchdog(other).clock is other
