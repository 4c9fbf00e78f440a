"""The lab's mutation check: for each property, one deliberately broken candidate or elector
behaviour (``python -m electfsm.chaos.candidate --break NAME``, a hidden option of the test
process, see ``electfsm.chaos.protocol.MUTATIONS``) makes a real run report that property as
failed, and the same run without the break passes it. A property no break can fail would be
no evidence."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import pytest

from electfsm import clock
from electfsm.chaos.checker import Report
from electfsm.chaos.lab import Lab
from electfsm.chaos.process import CandidateProcess
from electfsm.chaos.protocol import MUTATIONS

MakeLab = Callable[..., Lab]
TTL = 2
SLACK = max(1.0, float(os.environ.get("ELECTFSM_TEST_SLACK", "1")))


def logged(c: CandidateProcess, timeout: float, after: float | None = None,
           **match: Any) -> dict[str, Any]:
    ev = c.wait_for(lambda e: all(e.get(k) == v for k, v in match.items()), timeout * SLACK,
                    after=after)
    assert ev is not None, f"{c.identity} never logged {match}: {c.events()[-5:]}"
    return ev


def pair(lab: Lab, mutation: str | None, **kwargs: Any
         ) -> tuple[CandidateProcess, CandidateProcess]:
    """a then b, both with the break; returns (leader, follower) once settled."""
    a = lab.spawn("a", mutation=mutation, **kwargs)
    lab.wait_leader(timeout=15 * SLACK)
    b = lab.spawn("b", mutation=mutation, **kwargs)
    leader = lab.settle(timeout=15 * SLACK)
    return leader, (b if leader is a else a)


def p1(lab: Lab, m: str | None) -> Report:  # leadership goes a -> b -> a
    first, second = pair(lab, m)
    t = clock.now()
    first.resign()
    lab.wait_leader(timeout=10 * SLACK, exclude=[first], after=t)
    lab.settle(timeout=10 * SLACK)  # first back in line (it re-queues after a pause)
    t = clock.now()
    second.resign()
    lab.wait_leader(timeout=10 * SLACK, exclude=[second], after=t)
    return lab.finish()


def p2(lab: Lab, m: str | None) -> Report:
    leader, _ = pair(lab, m, stall=2.5 * TTL)
    leader.pause_before_write()
    logged(leader, 30, kind="fenced_write", stale_attempt=True)
    return lab.finish()


def p3(lab: Lab, m: str | None) -> Report:
    leader, _ = pair(lab, m, stall=2.5 * TTL)
    leader.pause_in_txn()
    logged(leader, 30, kind="guarded_append", stale_attempt=True)
    return lab.finish()


def p4(lab: Lab, m: str | None) -> Report:
    leader, _ = pair(lab, m, stall=2.5 * TTL)
    leader.stall()
    end = logged(leader, 30, kind="stall", phase="end")
    logged(leader, 10, after=end["mono"], kind="exit_leader")
    return lab.finish()


def p5(lab: Lab, m: str | None) -> Report:  # the leader's link dies; its clock decides
    a = lab.spawn("a", mutation=m)
    lab.wait_leader(timeout=15 * SLACK)
    b = lab.spawn("b")
    assert lab.settle(timeout=15 * SLACK) is a
    lab.link("a").blackhole()
    lab.wait_leader(timeout=15 * SLACK, exclude=[a])
    logged(a, 15, kind="exit_leader")
    lab.link("a").pass_through()
    assert b.alive
    return lab.finish()


def p6(lab: Lab, m: str | None) -> Report:
    lab.spawn("a", mutation=m)
    lab.wait_leader(timeout=15 * SLACK)
    return lab.finish()


def p7(lab: Lab, m: str | None) -> Report:
    pair(lab, m)
    return lab.finish()


def p8(lab: Lab, m: str | None) -> Report:
    leader, _ = pair(lab, m)
    leader.pause()
    lab.wait_leader(timeout=15 * SLACK, exclude=[leader])
    leader.resume()
    leader.stale_control()
    logged(leader, 15, kind="control", op="proclaim")
    return lab.finish()


def l1(lab: Lab, m: str | None) -> Report:  # a graceful stop hands over at once
    leader, _ = pair(lab, m)
    t = clock.now()
    leader.terminate()
    lab.wait_leader(timeout=10 * SLACK, exclude=[leader], after=t)
    gone = logged(leader, 5, after=t, kind="exit_leader")["mono"]  # the leader is gone
    return lab.finish(heals=[(gone, 1.0 * SLACK)])


def l2(lab: Lab, m: str | None) -> Report:  # three, the leader killed: who leads now?
    leader, _ = pair(lab, m)
    lab.spawn("c", mutation=m)
    lab.settle(timeout=15 * SLACK)
    leader.kill()
    lab.wait_leader(timeout=15 * SLACK, exclude=[leader])
    healed = clock.now()
    bound = 1.5 * SLACK
    time.sleep(bound + 1.5)
    return lab.finish(settled=(healed, bound))


def l3(lab: Lab, m: str | None) -> Report:
    pair(lab, m)
    t = clock.now()
    time.sleep(4.0)
    return lab.finish(quiet=[(t, clock.now())])


def l4(lab: Lab, m: str | None) -> Report:  # half-open: the step-down must free the lease
    leader, other = pair(lab, m)
    t = clock.now()
    lab.link(leader.identity).drop_responses()
    down = logged(leader, 15, after=t, kind="exit_leader", ended_by="session_lost")
    other.wait_for(lambda e: e["kind"] == "enter_leader", 4 * TTL * SLACK, after=t)
    lab.link(leader.identity).pass_through()
    return lab.finish(stepdowns=[(down["mono"], TTL + 0.6 * SLACK)])


def l5(lab: Lab, m: str | None) -> Report:
    lab.spawn("a", mutation=m)
    lab.wait_leader(timeout=15 * SLACK)
    return lab.finish()


RUNS: dict[str, Callable[[Lab, str | None], Report]] = {
    "P1": p1, "P2": p2, "P3": p3, "P4": p4, "P5": p5, "P6": p6, "P7": p7, "P8": p8,
    "L1": l1, "L2": l2, "L3": l3, "L4": l4, "L5": l5,
}


def test_every_property_has_a_break_and_a_run() -> None:
    assert set(RUNS) == set(MUTATIONS)


@pytest.mark.parametrize("prop", sorted(RUNS))
def test_the_break_fails_its_property(make_lab: MakeLab, prop: str) -> None:
    report = RUNS[prop](make_lab(), prop)
    assert report[prop].status == "fail", (
        f"--break {prop} ({MUTATIONS[prop]}) went unnoticed:\n{report.markdown()}")


@pytest.mark.parametrize("prop", sorted(RUNS))
def test_the_same_run_without_the_break_passes_it(make_lab: MakeLab, prop: str) -> None:
    report = RUNS[prop](make_lab(), None)
    assert report[prop].status == "pass", report.markdown()
