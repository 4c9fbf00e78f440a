"""The lab's stale attempts, for real: a GC pause after the term check sends a fenced write
and a guarded append with a dead term, a paused former leader sends its resign and proclaim,
and a candidate whose clock runs fast or slow keeps within its margin. Each run requires the
properties it exercises (n/a fails)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from electfsm.chaos.lab import Lab
from electfsm.chaos.process import CandidateProcess

MakeLab = Callable[..., Lab]
TTL = 2


def wait_event(c: CandidateProcess, timeout: float, **match: Any) -> dict[str, Any]:
    ev = c.wait_for(lambda e: all(e.get(k) == v for k, v in match.items()), timeout)
    assert ev is not None, f"{c.identity} never logged {match}: {c.events()[-5:]}"
    return ev


def settled_leader(lab: Lab, **kwargs: Any) -> CandidateProcess:
    a = lab.spawn("a", **kwargs)
    lab.wait_leader(timeout=15)
    b = lab.spawn("b", **kwargs)
    assert {a, b} == set(lab.live())
    return lab.settle(timeout=15)


def test_a_gc_pause_after_the_term_check_sends_a_stale_fenced_write_that_is_rejected(
        make_lab: MakeLab) -> None:
    lab = make_lab()
    leader = settled_leader(lab, stall=2.5 * TTL)
    with lab.fault("gc pause between the term check and the fenced write"):
        leader.pause_before_write()
        ev = wait_event(leader, 30, kind="fenced_write", stale_attempt=True)
    assert ev["result"] == "rejected", ev  # the other had written with a newer token
    assert ev["sent"] > ev["deadline"], "the write left after the term's deadline"
    report = lab.finish(expect=("P1", "P2", "P4", "P5", "P6", "P7"))
    assert report.ok, report.markdown()
    assert report["P2"].metrics["stale_attempts_rejected"] >= 1, report.markdown()
    assert report["P2"].metrics["stale_rejected"] >= 1, report.markdown()


def test_a_gc_pause_inside_fenced_txn_is_refused_by_etcds_fence(make_lab: MakeLab) -> None:
    lab = make_lab()
    leader = settled_leader(lab, stall=2.5 * TTL)
    with lab.fault("gc pause inside fenced_txn, after its check"):
        leader.pause_in_txn()
        ev = wait_event(leader, 30, kind="guarded_append", stale_attempt=True)
    assert ev["result"] == "not_leader", ev
    report = lab.finish(expect=("P1", "P3", "P4", "P5", "P6", "P7"))
    assert report.ok, report.markdown()
    assert report["P3"].metrics["stale_refused_by_etcd"] >= 1, report.markdown()


def test_a_paused_former_leaders_resign_and_proclaim_are_refused(make_lab: MakeLab) -> None:
    lab = make_lab()
    leader = settled_leader(lab)
    with lab.fault("pause the leader past its lease, then its stale resign + proclaim"):
        leader.pause()
        lab.wait_leader(timeout=15, exclude=[leader])
        leader.resume()
        leader.stale_control()
        wait_event(leader, 15, kind="control", op="proclaim")
    report = lab.finish(expect=("P1", "P5", "P6", "P7", "P8"))
    assert report.ok, report.markdown()
    assert report["P8"].metrics["stale"] >= 2, report.markdown()


@pytest.mark.parametrize("rate", [0.92, 1.25])
def test_a_leader_whose_clock_runs_slow_or_fast_steps_down_before_its_lease_expires(
        make_lab: MakeLab, rate: float) -> None:
    """The margin (TTL/10, at least 0.25 s) absorbs a clock running 8 % slow; a fast clock
    only steps down earlier. Cut the skewed leader off: no overlap with the next term."""
    lab = make_lab()
    a = lab.spawn("a", clock_rate=rate)
    lab.wait_leader(timeout=15)
    b = lab.spawn("b")
    assert lab.settle(timeout=15) is a
    assert wait_event(a, 5, kind="start")["clock_rate"] == rate
    with lab.fault("blackhole the skewed leader") as f:
        lab.link("a").blackhole()
        lab.wait_leader(timeout=15, exclude=[a])
        wait_event(a, 15, kind="exit_leader")
        lab.link("a").pass_through()
    time.sleep(0.5)
    report = lab.finish(heals=[(f["start"], TTL + 2.0)], expect=("P1", "P4", "P5", "P6", "L1"))
    assert report.ok, report.markdown()
    assert report["P5"].metrics["dual_leader_window"] == 0, report.markdown()
    assert b.current_term() is None  # stopped


def test_a_scaled_clock_runs_at_its_rate_and_maps_back_onto_the_package_clock() -> None:
    from electfsm import clock
    from electfsm.chaos.node import ScaledClock

    scaled = ScaledClock(0.5)
    r0, l0 = clock.now(), scaled()
    time.sleep(0.05)
    r1, l1, r2 = clock.now(), scaled(), clock.now()
    assert (r1 - r0) * 0.5 - 1e-3 <= l1 - l0 <= (r2 - r0) * 0.5 + 1e-3
    assert r1 - 1e-3 <= scaled.real(l1) <= r2 + 1e-3
    scaled.set_rate(2.0)  # continuous: no jump at the change
    r3, l3, r4 = clock.now(), scaled(), clock.now()
    assert l1 <= l3 <= l1 + (r4 - r1) * 2.0 + 1e-3
    assert r3 - 1e-3 <= scaled.real(l3) <= r4 + 1e-3
    assert scaled.real(l3 + 1.0) == pytest.approx(scaled.real(l3) + 0.5)
