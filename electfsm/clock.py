"""The package's clock, and the process-wide watchdog that fires lease deadlines on it.

::

    from electfsm import clock

    deadline = clock.now() + 5.0
    alarm = clock.watchdog().arm(deadline, lambda: print("deadline passed"))
    alarm.move(clock.now() + 8.0)      # a renewal pushed it back
    alarm.cancel()                     # the lease ended another way

:func:`now` counts time the host spent suspended (``CLOCK_BOOTTIME`` on Linux) where the
platform has such a clock, and is ``time.monotonic`` elsewhere. ``time.monotonic`` stops
during a suspend, so after a resume a lease deadline kept on it would still look ahead while
etcd has already expired the lease. Every deadline in the package is kept on :func:`now`.

The :class:`Watchdog` is one thread for every deadline of the process (a heap of them, not a
thread per elector: a process may run a thousand electors). It fires a deadline even while
the thread that owns it is stuck in a call, and exits when it has no deadline left, so a
stopped elector leaves no thread behind.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("electfsm.clock")


def _pick() -> tuple[Callable[[], float], str]:
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    if boottime is not None:
        try:
            time.clock_gettime(boottime)
        except OSError:  # a kernel without it (older than Linux 2.6.39)
            pass
        else:
            def boot_now() -> float:
                return time.clock_gettime(boottime)
            return boot_now, "CLOCK_BOOTTIME"
    return time.monotonic, "monotonic"


_now, _name = _pick()
#: Which clock :func:`now` reads: ``"CLOCK_BOOTTIME"`` (counts suspended time) or
#: ``"monotonic"`` (the fallback where the platform has no such clock).
NAME: str = _name


def now() -> float:
    """Seconds on the package clock: monotonic, and counting time the host was suspended
    where the platform allows (Linux ``CLOCK_BOOTTIME``)."""
    return _now()


#: The longest the watchdog sleeps at a time. Timed waits run on ``CLOCK_MONOTONIC``, which
#: stops while the host is suspended; waking this often bounds how late a deadline fires
#: after a resume.
MAX_SLEEP = 0.5


class Alarm:
    """One deadline armed on a :class:`Watchdog`; fires its callback once, at the deadline."""

    __slots__ = ("_queued", "_watchdog", "deadline", "done", "fire")

    def __init__(self, watchdog: Watchdog, deadline: float, fire: Callable[[], None]) -> None:
        self._watchdog = watchdog
        self.deadline = deadline
        self.fire = fire
        self._queued: float | None = None  # the deadline of its heap entry, if it has one
        self.done = False  # fired or cancelled

    def move(self, deadline: float) -> None:
        """Fire at ``deadline`` instead (later or earlier); no effect once fired or cancelled."""
        self._watchdog._move(self, deadline)

    def cancel(self) -> None:
        """Never fire. Safe to call more than once, and after it fired."""
        self._watchdog._cancel(self)


class Watchdog:
    """Fires :class:`Alarm` callbacks at their deadlines, on one thread, by ``clock``.

    Callbacks run on the watchdog thread and must return quickly and not block: every
    deadline of the process waits behind them. An exception in one is logged and dropped.
    """

    def __init__(self, clock: Callable[[], float] = now) -> None:
        self.clock = clock
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Alarm]] = []
        self._seq = itertools.count()
        self._live = 0
        self._thread: threading.Thread | None = None  # running, and not on its way out
        self._last: threading.Thread | None = None  # the latest started, maybe exiting

    def arm(self, deadline: float, fire: Callable[[], None]) -> Alarm:
        """Call ``fire()`` once ``clock() >= deadline`` (unless moved or cancelled first)."""
        alarm = Alarm(self, deadline, fire)
        with self._cond:
            self._live += 1
            self._push(alarm, deadline)
            if self._thread is None:
                self._thread = self._last = threading.Thread(
                    target=self._run, daemon=True, name="electfsm-watchdog")
                self._thread.start()
        return alarm

    @property
    def pending(self) -> int:
        """How many alarms are armed and have neither fired nor been cancelled."""
        return self._live

    def join_idle(self, timeout: float) -> None:
        """If no alarm is pending, wait up to ``timeout`` for the thread to have exited."""
        with self._cond:
            thread = self._last if self._live == 0 else None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # ------------------------------------------------------------------ internals
    def _push(self, alarm: Alarm, deadline: float) -> None:
        """With ``_cond`` held: give ``alarm`` a heap entry at ``deadline``."""
        alarm._queued = deadline
        heapq.heappush(self._heap, (deadline, next(self._seq), alarm))
        if self._heap[0][2] is alarm:
            self._cond.notify()

    def _move(self, alarm: Alarm, deadline: float) -> None:
        with self._cond:
            if alarm.done:
                return
            alarm.deadline = deadline
            # A later deadline needs no new entry: the old one, when due, is pushed back.
            if alarm._queued is None or deadline < alarm._queued:
                self._push(alarm, deadline)

    def _cancel(self, alarm: Alarm) -> None:
        with self._cond:
            if alarm.done:
                return
            alarm.done = True
            self._live -= 1
            if self._live == 0:
                self._cond.notify()  # let the thread exit now

    def _due(self) -> list[Alarm] | None:
        """Wait for the next due alarms; None when nothing is left to watch."""
        with self._cond:
            while True:
                if self._live == 0:
                    self._heap.clear()
                    self._thread = None
                    return None
                now = self.clock()
                due: list[Alarm] = []
                while self._heap and self._heap[0][0] <= now:
                    queued, _, alarm = heapq.heappop(self._heap)
                    if alarm.done or alarm._queued != queued:
                        continue  # cancelled, or a stale entry (it has an earlier one)
                    alarm._queued = None
                    if alarm.deadline > now:  # moved later since this entry was made
                        self._push(alarm, alarm.deadline)
                        continue
                    alarm.done = True
                    self._live -= 1
                    due.append(alarm)
                if due:
                    return due
                wait = MAX_SLEEP if not self._heap else min(MAX_SLEEP, self._heap[0][0] - now)
                self._cond.wait(max(0.0, wait))

    def _run(self) -> None:
        while True:
            due = self._due()
            if due is None:
                return
            for alarm in due:
                try:
                    alarm.fire()
                except Exception:  # one bad callback must not stop every other deadline
                    log.exception("deadline callback %r raised", alarm.fire)


_watchdogs: dict[Callable[[], float], Watchdog] = {}
_watchdogs_lock = threading.Lock()


def watchdog(clock: Callable[[], float] | None = None) -> Watchdog:
    """The process-wide :class:`Watchdog` of ``clock`` (default: :func:`now`)."""
    clock = now if clock is None else clock
    with _watchdogs_lock:
        found = _watchdogs.get(clock)
        if found is None:
            found = _watchdogs[clock] = Watchdog(clock)
        return found
