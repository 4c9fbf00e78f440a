"""A candidate in its own process, logging every transition and hook call, for fault tests.

Run one by hand::

    python -m electfsm.chaos.candidate --endpoints 127.0.0.1:2379 --election jobs --identity a \
        --ttl 2 --log a.jsonl --fenced 127.0.0.1:7000 --guarded-set jobs-set

or from a test, through :class:`CandidateProcess`::

    from electfsm.chaos.process import CandidateProcess

    c = CandidateProcess(identity="a", endpoints=[etcd.endpoint], election="jobs", ttl=2,
                         log_path=tmp / "a.jsonl").start()
    c.wait_for(lambda ev: ev["kind"] == "enter_leader", timeout=5)
    c.pause(); c.resume()          # SIGSTOP / SIGCONT
    c.kill()                       # SIGKILL (recorded in the harness log)
    c.terminate()                  # SIGTERM: the elector stops, revoking its lease

Why a process: SIGSTOP, SIGKILL, ``faketime`` and cgroups then apply to one candidate only.

Each line of the log is one JSON object with ``mono`` (``clock.now()``, system-wide on
Linux, so the logs of several processes merge by it), ``wall``, ``pid``, ``identity``,
``inc`` (this incarnation: ``identity#pid``) and ``kind``:

- ``start`` / ``stopped`` (with the electfsm threads still alive after ``stop()``);
- ``transition``: ``source``, ``dest``, ``trigger``, ``reason`` (and ``revision`` for
  ``elected``: the revision of the read that confirmed our key first);
- ``enter_leader`` / ``exit_leader``: the term's ``token``, ``key``, ``lease``,
  ``generation``, ``deadline`` (and ``ended_by`` on exit);
- ``leader_change``, ``error``;
- ``renew`` (the term's deadline moved later) and ``invalid`` (``is_leader`` turned false),
  from a monitor thread that polls every ``--monitor-interval`` seconds;
- while leader, every ``--work-interval``: ``work`` (after checking ``term.valid``), then a
  ``fenced_write`` to ``--fenced`` with the token and a ``guarded_append`` through
  ``Elector.fenced_txn`` to ``--guarded-set`` (key ``<set>/<inc>-<n>``), each with ``start``
  (monotonic time the action began), ``deadline`` and the outcome;
- ``control``: on SIGUSR1 the candidate resigns and tries a guarded proclaim
  (``If(create_revision(key) == token) Then Put(key)``) with its latest term, stale or not;
- ``stall``: on SIGUSR2 the leader's work callback stalls ``--stall`` seconds, either
  sleeping (other threads run) or holding the GIL (a stop-the-world pause, like a GC);
- stale attempts: on ``SIG_PAUSE_BEFORE_WRITE`` the leader's next fenced write stalls after
  its ``term.valid`` check and is then sent (``sent``, ``stale_attempt=True``); on
  ``SIG_PAUSE_IN_TXN`` the next guarded append stalls inside ``Elector.fenced_txn``, after
  its check, before the transaction leaves; on ``SIG_STALE_CONTROL`` the candidate sends a
  guarded resign and proclaim with its last term (``control`` with ``start``: when the
  request left), whatever its elector now thinks;
- ``view``: what ``Elector.leader`` says (``leader``, ``leader_token``) each time it changes;
- ``clock``: the elector's clocks (session deadline and term validity run on one
  :class:`ScaledClock`, ``--clock-rate``) change rate on ``SIG_CLOCK_SLOW`` /
  ``SIG_CLOCK_FAST`` / ``SIG_CLOCK_TRUE``; deadlines are always logged on the real clock;
- ``hook_raised`` / a ``stall`` in a hook: on ``SIG_HOOK_EXIT`` the next hook raises
  SystemExit, on ``SIG_SLOW_HOOK`` it sleeps ``--stall`` seconds (the dispatcher is busy).

``transition`` into leader carries ``revision``, the revision that confirmed the election
(a field, not parsed from the reason). ``--break NAME`` (hidden) turns on one deliberately
broken behaviour of :data:`MUTATIONS`, for the lab's mutation check only.

Every hook line carries ``hook``, ``thread`` and ``depth`` (hooks running at once in this
process, 1 unless two ran concurrently). Lines are flushed one by one, so SIGKILL loses at
most the line being written. Under ``faketime`` the process's clocks are fake: then log to
stdout (``--log -``) and let :class:`CandidateProcess` stamp each line with its own
``recv_mono``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence

from electfsm import clock
from electfsm.chaos.node import Candidate
from electfsm.chaos.protocol import (
    FAST_RATE,
    MUTATIONS,
    PASSWORD_ENV,
    SIG_CLOCK_FAST,
    SIG_CLOCK_SLOW,
    SIG_CLOCK_TRUE,
    SIG_HOOK_EXIT,
    SIG_PAUSE_BEFORE_WRITE,
    SIG_PAUSE_IN_TXN,
    SIG_SLOW_HOOK,
    SIG_STALE_CONTROL,
    SLOW_RATE,
    EventLog,
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _endpoints(text: str) -> list[str]:
    return [e.strip() for e in text.split(",") if e.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m electfsm.chaos.candidate",
                                description="One logged elector, for fault-injection tests.")
    p.add_argument("--endpoints", type=_endpoints, required=True, help="A,B,... (host:port)")
    p.add_argument("--election", required=True)
    p.add_argument("--identity", required=True)
    p.add_argument("--ttl", type=int, default=2)
    p.add_argument("--margin", type=float, default=None)
    p.add_argument("--call-timeout", type=float, default=0.5)
    p.add_argument("--backoff-max", type=float, default=0.5)
    p.add_argument("--log", required=True, help="JSON-lines file, or - for stdout")
    p.add_argument("--fenced", default=None, help="HOST:PORT of a FencedResource")
    p.add_argument("--guarded-set", default=None, help="key prefix for guarded appends")
    p.add_argument("--work-interval", type=float, default=0.1)
    p.add_argument("--monitor-interval", type=float, default=0.02)
    p.add_argument("--stall", type=float, default=4.0, help="seconds a SIGUSR2 stall lasts")
    p.add_argument("--stall-mode", choices=("sleep", "gil"), default="gil")
    p.add_argument("--stall-on-enter", type=float, default=0.0,
                   help="the first on_enter_leader hook stalls this long")
    p.add_argument("--harness-pid", type=int, default=0,
                   help="stop when this process is gone (the test that started us)")
    p.add_argument("--user", default=None,
                   help=f"etcd user (password from ${PASSWORD_ENV})")
    p.add_argument("--clock-rate", type=float, default=1.0,
                   help="the elector's clocks run this many times as fast as real time")
    p.add_argument("--break", dest="mutation", choices=sorted(MUTATIONS), default=None,
                   help=argparse.SUPPRESS)  # the lab's mutation check only
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("transitions").setLevel(logging.WARNING)
    log = EventLog(args.log, pid=os.getpid(), identity=args.identity,
                   inc=f"{args.identity}#{os.getpid()}")
    candidate = Candidate(args, log)
    done = threading.Event()
    # The handlers only set flags: the main thread acts on them, so a handler never waits
    # for a lock the interrupted main thread holds (the event log's).
    wake, control, stall = threading.Event(), threading.Event(), threading.Event()
    pause_write, pause_txn, stale = threading.Event(), threading.Event(), threading.Event()
    # one flag per requested fault; the main thread runs each fault's action
    actions: dict[threading.Event, Callable[[], None]] = {
        flag_event: action for flag_event, action in (
            (threading.Event(), lambda: candidate.set_clock_rate(SLOW_RATE)),
            (threading.Event(), lambda: candidate.set_clock_rate(FAST_RATE)),
            (threading.Event(), lambda: candidate.set_clock_rate(1.0)),
            (threading.Event(), lambda: candidate.arm_hook_fault("slow")),
            (threading.Event(), lambda: candidate.arm_hook_fault("exit")))}

    def flag(event: threading.Event) -> Callable[..., None]:
        def handler(*_: object) -> None:
            event.set()
            wake.set()
        return handler

    signal.signal(signal.SIGTERM, flag(done))
    signal.signal(signal.SIGINT, flag(done))
    signal.signal(signal.SIGUSR1, flag(control))
    signal.signal(signal.SIGUSR2, flag(stall))
    signal.signal(SIG_PAUSE_BEFORE_WRITE, flag(pause_write))
    signal.signal(SIG_PAUSE_IN_TXN, flag(pause_txn))
    signal.signal(SIG_STALE_CONTROL, flag(stale))
    for sig, event in zip((SIG_CLOCK_SLOW, SIG_CLOCK_FAST, SIG_CLOCK_TRUE, SIG_SLOW_HOOK,
                           SIG_HOOK_EXIT), actions, strict=True):
        signal.signal(sig, flag(event))
    candidate.start()
    next_check = 0.0
    while not done.is_set():
        if wake.wait(0.05):
            wake.clear()
            if stall.is_set():
                stall.clear()
                candidate.request_stall()
            if control.is_set():
                control.clear()
                candidate.control()
            if pause_write.is_set():
                pause_write.clear()
                candidate.request_pause("write")
            if pause_txn.is_set():
                pause_txn.clear()
                candidate.request_pause("txn")
            if stale.is_set():
                stale.clear()
                candidate.stale_control()
            for event, action in actions.items():
                if event.is_set():
                    event.clear()
                    action()
        if args.harness_pid and clock.now() >= next_check:
            next_check = clock.now() + 0.5
            if not _alive(args.harness_pid):  # orphaned: never outlive the harness
                log.write("orphaned", harness_pid=args.harness_pid)
                break
    candidate.stop()
    log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
