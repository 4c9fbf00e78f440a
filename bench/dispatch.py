"""Dispatch speed: injected events per second through the machine, and one transition's cost,
beside a bare ``transitions.Machine`` doing the same transitions in the same run.

    python bench/dispatch.py [--breakdown]

``--breakdown`` also splits one elect + resign cycle: the time inside ``transitions``' trigger
(the code the bare machine runs too) and the rest (electfsm's own work per event); and the
cost of starting a thread (what a campaign pays per command).
"""

from __future__ import annotations

import sys
import threading
import time

from transitions import Machine

from electfsm.events import Resign
from electfsm.machine import STATES, transition_configs
from electfsm.testing import Harness

ROUNDS = 20_000


def electfsm_events_per_second(rounds: int = ROUNDS) -> tuple[float, float]:
    """(events/s, seconds per transition) for elect → resign cycles through the Harness."""
    h = Harness(identity="bench", ttl=10)
    h.on_enter_leader(lambda term: None)
    h.connect()
    start = time.perf_counter()
    for _ in range(rounds):
        h.elect()
        h.inject(Resign())
    took = time.perf_counter() - start
    events = 2 * rounds
    return events / took, took / events


def bare_machine_per_second(rounds: int = ROUNDS) -> tuple[float, float]:
    class Model:
        pass

    model = Model()
    Machine(model=model, states=list(STATES), transitions=transition_configs(),
            initial="candidate", auto_transitions=False)
    start = time.perf_counter()
    for _ in range(rounds):
        model.elected()  # type: ignore[attr-defined]
        model.resign()  # type: ignore[attr-defined]
    took = time.perf_counter() - start
    return 2 * rounds / took, took / (2 * rounds)


def run() -> dict[str, float]:
    ours, per = electfsm_events_per_second()
    bare, bare_per = bare_machine_per_second()
    return {"events_per_s": ours, "transition_s": per, "bare_per_s": bare,
            "bare_transition_s": bare_per}


def breakdown(rounds: int = ROUNDS) -> tuple[float, float]:
    """(seconds per elect + resign cycle, of which inside transitions' trigger)."""
    h = Harness(identity="bench", ttl=10)
    h.on_enter_leader(lambda term: None)
    h.connect()
    model = h.dispatcher._model
    trigger = model.trigger  # type: ignore[attr-defined]
    inside = [0.0]

    def timed(name: str) -> bool:
        t = time.perf_counter()
        try:
            return bool(trigger(name))
        finally:
            inside[0] += time.perf_counter() - t

    model.trigger = timed  # type: ignore[attr-defined]
    start = time.perf_counter()
    for _ in range(rounds):
        h.elect()
        h.inject(Resign())
    took = time.perf_counter() - start
    return took / rounds, inside[0] / rounds


def _stamp(out: list[float]) -> None:
    out.append(time.perf_counter())


def thread_start(runs: int = 200) -> float:
    """Median seconds from ``Thread.start()`` to the thread running."""
    out = []
    for _ in range(runs):
        ran: list[float] = []
        t = time.perf_counter()
        th = threading.Thread(target=_stamp, args=(ran,))
        th.start()
        th.join()
        out.append(ran[0] - t)
    return sorted(out)[runs // 2]


if __name__ == "__main__":
    r = run()
    print(f"electfsm: {r['events_per_s']:,.0f} events/s ({r['transition_s'] * 1e6:.1f} us each)")
    ratio = r["bare_per_s"] / r["events_per_s"]
    print(f"bare transitions.Machine: {r['bare_per_s']:,.0f}/s "
          f"({r['bare_transition_s'] * 1e6:.1f} us); ratio {ratio:.1f}x")
    if "--breakdown" in sys.argv[1:]:
        cycle, inside = breakdown()
        print(f"one elect + resign cycle: {cycle * 1e6:.1f} us, of which {inside * 1e6:.1f} us "
              f"inside transitions' trigger, {(cycle - inside) * 1e6:.1f} us electfsm's own")
        print(f"thread start -> running: {thread_start() * 1e6:.0f} us (median)")
