"""Scenarios S1, S2, S5-S7, S17-S19, S25-S27: faults on candidate processes (SIGKILL,
SIGTERM, SIGSTOP, stalls, faketime, CPU quota), each checked against P1-P8 and L1-L5.

Every candidate is a real process (``python -m electfsm.chaos.candidate``) talking to a real etcd
through its own fault proxy; the checker reads their logs, the fenced resource's log and the
etcd history recorded during the test.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from scenario_kit import MARGIN, TTL, WORKING, MakeLab, ok, poll, slack, worked

from electfsm.chaos.checker import terms_of
from electfsm.chaos.faults import CpuLimit, cgroup_problem
from electfsm.chaos.process import CandidateProcess, faketime_problem
from electfsm.chaos.protocol import event_time
from electfsm.testing.local_etcd import LocalEtcd

RENEW = TTL / 3
L1_BOUND = TTL + slack(0.6)
# a lease that expires lets the next leader in no sooner than this after its holder died;
# a handover faster than it cannot have waited for an expiry
EXPIRY_FLOOR = TTL - RENEW - 0.1

def term_start(c: CandidateProcess, after: float = 0.0) -> float:
    ev = c.wait_for(lambda e: e["kind"] == "enter_leader", 0, after=after)
    assert ev is not None
    return event_time(ev)


def exits(c: CandidateProcess) -> list[dict[str, Any]]:
    return [e for e in c.events() if e["kind"] == "exit_leader"]


# --------------------------------------------------------------------------- S1, S2


def test_s1_killed_leader_fails_over_within_ttl_and_never_overlaps(make_lab: MakeLab) -> None:
    lab = make_lab()
    for i in range(3):
        lab.spawn(f"n{i}")
    leader = lab.settle()
    worked(leader)
    with lab.fault("SIGKILL the leader") as f:
        leader.kill()
    new = lab.wait_leader(timeout=TTL + slack(3), exclude=[leader])
    ttf = term_start(new, f["start"]) - f["start"]
    report = lab.finish(heals=[(f["start"], L1_BOUND)])
    ok(report, (*WORKING, "L1"))
    # the lease outlives the process by up to a TTL, never less than TTL - one renew interval
    assert EXPIRY_FLOOR <= ttf <= L1_BOUND, f"failover took {ttf:.2f}s"


def test_s2_sigterm_hands_over_at_once(make_lab: MakeLab) -> None:
    lab = make_lab()
    for i in range(3):
        lab.spawn(f"n{i}")
    leader = lab.settle()
    worked(leader)
    with lab.fault("SIGTERM the leader") as f:
        leader.send(15)
    handover = min(slack(1.0), EXPIRY_FLOOR)
    new = lab.wait_leader(timeout=slack(2), exclude=[leader])
    ttf = term_start(new, f["start"]) - f["start"]
    leader.terminate()
    report = lab.finish(heals=[(f["start"], handover)])
    ok(report, (*WORKING, "L1"))
    assert ttf < handover, f"graceful handover took {ttf:.3f}s (resign + revoke should be ms)"
    assert exits(leader)[-1]["ended_by"] == "stop"


# --------------------------------------------------------------------------- S5, S6, S7


def test_s5_pause_shorter_than_the_margin_keeps_the_same_term(make_lab: MakeLab) -> None:
    lab = make_lab()
    lab.spawn("a")
    leader = lab.wait_leader()
    lab.spawn("b")
    lab.settle()
    worked(leader)
    token = leader.current_term()["token"]  # type: ignore[index]
    quiet_from = time.monotonic()
    with lab.fault("SIGSTOP the leader for 0.3 x TTL"):
        leader.pause()
        time.sleep(0.3 * TTL)
        leader.resume()
    time.sleep(1.5)
    quiet_to = time.monotonic()
    assert leader.current_term() is not None and leader.current_term()["token"] == token  # type: ignore[index]
    report = lab.finish(quiet=[(quiet_from, quiet_to)])
    ok(report, (*WORKING, "L3"))


@pytest.mark.parametrize("how", ["sigstop", "gil-stall-in-work"])
def test_s6_s7_pause_longer_than_ttl_loses_leadership_before_any_stale_write(
        make_lab: MakeLab, how: str) -> None:
    """S6: SIGSTOP 2 x TTL. S7: the work callback stops the world (holds the GIL) 2 x TTL.
    A new leader takes over; the old one finds its deadline passed before any fenced write,
    and every write it tries is rejected (P2, P3, P4)."""
    lab = make_lab()
    old = lab.spawn("old", stall=2 * TTL, stall_mode="gil")
    lab.wait_leader()
    lab.spawn("new")
    worked(lab.settle())
    with lab.fault(how) as f:
        if how == "sigstop":
            old.pause()
            time.sleep(2 * TTL)
            old.resume()
        else:
            old.stall()
            time.sleep(2 * TTL)
    new = lab.wait_leader(timeout=slack(3), exclude=[old], after=f["start"])
    assert old.wait_for(lambda e: e["kind"] == "exit_leader", timeout=slack(3)) is not None
    time.sleep(0.5)
    report = lab.finish(heals=[(f["start"], L1_BOUND)])
    ok(report, (*WORKING, "L1"))
    spans = terms_of(lab.history())
    first = next(s for s in spans if s.inc == old.inc)
    second = next(s for s in spans if s.inc == new.inc)
    assert first.end <= second.start, "the old term must end (deadline) before the new one"
    if how != "sigstop":
        stall_end = old.wait_for(lambda e: e["kind"] == "stall" and e["phase"] == "end", 0)
        assert stall_end is not None and stall_end["valid"] is False


def test_s7_sleeping_callback_does_not_cost_leadership(make_lab: MakeLab) -> None:
    """A work callback that sleeps 2 x TTL (GIL released) blocks nothing: the session keeps
    the lease, the term goes on, and the callback's next write is still valid."""
    lab = make_lab()
    leader = lab.spawn("a", stall=2 * TTL, stall_mode="sleep")
    lab.wait_leader()
    lab.spawn("b")
    lab.settle()
    start = time.monotonic()
    leader.stall()
    ev = leader.wait_for(lambda e: e["kind"] == "stall" and e["phase"] == "end",
                         2 * TTL + slack(3))
    assert ev is not None and ev["valid"] is True
    report = lab.finish(quiet=[(start, time.monotonic())])
    ok(report, (*WORKING, "L3"))


def test_stall_asked_of_a_follower_never_fires_in_a_later_term(make_lab: MakeLab) -> None:
    """A stall is a fault on the term that leads when it is asked for: a follower ignores
    it (logged), so it cannot fire minutes later when that node next leads (the chaos
    runner's quiet windows saw such a late stall as churn)."""
    lab = make_lab()
    first = lab.spawn("a", stall=2 * TTL, stall_mode="gil")
    lab.wait_leader()
    second = lab.spawn("b", stall=2 * TTL, stall_mode="gil")
    lab.settle()
    second.stall()
    assert second.wait_for(lambda e: e["kind"] == "stall_ignored", slack(3)) is not None
    after = time.monotonic()
    first.resign()
    term = second.wait_for(lambda e: e["kind"] == "enter_leader", slack(5), after=after)
    assert term is not None
    # five work iterations of the new term: a stall bound to it would have fired by then
    poll(lambda: len([e for e in second.events() if e["kind"] == "work"
                      and e["token"] == term["token"]]) >= 5, 5, "five work iterations")
    assert not [e for e in second.events() if e["kind"] == "stall"]
    report = lab.finish()
    ok(report)


def test_s7_hook_that_stops_the_world_on_enter_is_deposed_by_the_deadline(
        make_lab: MakeLab) -> None:
    """on_enter_leader holds the GIL for 2 x TTL: nothing renews the lease, another node
    leads, and when the hook returns the term is already invalid: no work runs for it."""
    lab = make_lab()
    slow = lab.spawn("slow", stall_on_enter=2 * TTL, stall_mode="gil")
    begin = slow.wait_for(lambda e: e["kind"] == "stall" and e["phase"] == "begin", 10)
    assert begin is not None
    other = lab.spawn("other")
    lab.wait_leader(timeout=2 * TTL + slack(3), exclude=[slow])
    end = slow.wait_for(lambda e: e["kind"] == "stall" and e["phase"] == "end",
                        2 * TTL + slack(2))
    assert end is not None and end["valid"] is False
    time.sleep(0.5)
    report = lab.finish()
    ok(report)
    slow_terms = [s for s in terms_of(lab.history()) if s.inc == slow.inc]
    assert slow_terms and not any(s.acts for s in slow_terms)
    # the precondition: the other node led while the hook still held the GIL
    assert term_start(other) < event_time(end), "nobody else led during the stall"


# --------------------------------------------------------------------------- S17, S18

needs_faketime = pytest.mark.skipif(shutil.which("faketime") is None,
                                    reason="Debian's faketime is not installed "
                                           "(apt-get install faketime)")


@needs_faketime
def test_s17_wall_clock_offsets_and_rates_change_nothing(make_lab: MakeLab) -> None:
    """Wall clocks 5 minutes behind, 5 minutes ahead, and running at half speed (an NTP step
    or a bad RTC): electfsm reads only the monotonic clock and etcd's TTLs, so nothing
    changes: no churn, a normal failover."""
    lab = make_lab()
    behind = lab.spawn("behind", faketime="-5m")
    lab.wait_leader()
    ahead = lab.spawn("ahead", faketime="+5m")
    lab.spawn("slow-wall", faketime="+0 x0.5")
    lab.settle()
    quiet_from = time.monotonic()
    time.sleep(2.0)
    quiet_to = time.monotonic()
    with lab.fault("SIGKILL the leader") as f:
        behind.kill()
    lab.wait_leader(timeout=TTL + slack(3), exclude=[behind])
    assert ahead.alive
    report = lab.finish(quiet=[(quiet_from, quiet_to)], heals=[(f["start"], L1_BOUND)])
    ok(report, (*WORKING, "L1", "L3"))


@pytest.mark.parametrize("rate", [0.9, 0.5])
def test_s18_slow_clock_on_a_cut_off_leader(make_lab: MakeLab, rate: float) -> None:
    """The leader's clocks (monotonic too) run at ``rate``; then its link to etcd is
    blackholed. Within the tolerance (rate >= 1 - margin/TTL = 0.875) it steps down before
    anyone else leads; far beyond it (x0.5) the terms overlap, and that is reported, but no
    stale fenced write and no guarded write of the old term gets through."""
    problem = faketime_problem(f"+0 x{rate}", fake_monotonic=True)
    if problem is not None:
        pytest.skip(f"S18 needs a monotonic clock running at x{rate}: {problem}")
    lab = make_lab()
    slow = lab.spawn("slow", faketime=f"+0 x{rate}", fake_monotonic=True)
    lab.wait_leader(timeout=15)
    lab.spawn("b")
    lab.settle(timeout=15)
    time.sleep(0.5)
    with lab.fault("blackhole the slow leader's link") as f:
        lab.link("slow").blackhole()
        lab.wait_leader(timeout=TTL + slack(3), exclude=[slow])
        stepped = slow.wait_for(lambda e: e["kind"] == "exit_leader", 2 * TTL / rate + slack(2))
        assert stepped is not None
        time.sleep(0.3)
    bounded = rate >= 1 - MARGIN / TTL
    report = lab.finish(bounded=bounded)
    ok(report)
    window = report.metrics["dual_leader_window"]
    if bounded:
        assert window == 0
    else:
        assert window > 0, "x0.5 should show the overlap the margin cannot cover"
    # the precondition: the slow leader stepped down while it was cut off, on its own clock
    assert f["start"] <= event_time(stepped) <= f["end"], stepped


# --------------------------------------------------------------------------- S19

cpu_problem = cgroup_problem("cpu")


@pytest.mark.skipif(cpu_problem is not None, reason=f"CPU starvation needs the cgroup-v1 "
                                                   f"cpu controller: {cpu_problem}")
def test_s19_cpu_starved_leader_renews_or_steps_down_in_time(make_lab: MakeLab) -> None:
    lab = make_lab()
    starved = lab.spawn("starved")
    lab.wait_leader()
    lab.spawn("b")
    lab.settle()
    limit = CpuLimit(starved.pid, 5)
    try:
        with lab.fault("5 % CPU quota on the leader") as f:
            time.sleep(2 * TTL)
    finally:
        limit.remove()
    time.sleep(1.0)
    report = lab.finish(heals=[(f["end"], L1_BOUND)])
    ok(report, (*WORKING, "L1"))


# --------------------------------------------------------------------------- S25


def test_s25_stale_resign_and_proclaim_from_a_paused_leader_do_nothing(
        make_lab: MakeLab) -> None:
    lab = make_lab()
    old = lab.spawn("old")
    lab.wait_leader()
    lab.spawn("new")
    lab.settle()
    with lab.fault("pause the leader past its TTL, then resign + proclaim") as f:
        old.pause()
        new = lab.wait_leader(timeout=TTL + slack(3), exclude=[old])
        new_token = new.current_term()["token"]  # type: ignore[index]
        old.resign()  # SIGUSR1 waits in the stopped process and runs first thing on SIGCONT
        old.resume()
        done = old.wait_for(lambda e: e["kind"] == "control" and e["op"] == "proclaim",
                            slack(5))
    assert done is not None and done["result"] == "rejected", done
    time.sleep(0.5)
    assert new.current_term() is not None
    assert new.current_term()["token"] == new_token  # type: ignore[index]
    report = lab.finish(heals=[(f["end"], L1_BOUND)])
    ok(report, (*WORKING, "P8", "L1"))


# --------------------------------------------------------------------------- S26, S27


def test_s26_fifty_candidates_with_random_kills_keep_one_leader(
        make_lab: MakeLab, make_etcd: Callable[..., LocalEtcd], tmp_path: Path) -> None:
    """50 candidate processes; the leader is killed twice, random followers too. One
    leader at a time, and the failover takes no longer than with 3 candidates. (An etcd of
    its own, with its log kept in the test's directory.)"""
    import random

    rnd = random.Random(26)
    server = make_etcd(log_path=str(tmp_path / "etcd.log"))
    lab = make_lab([server.endpoint])
    for i in range(50):
        # call_timeout 2 s: with 0.5 s, 50 candidates starting at once on 2 cores time
        # out many of their reads and the test measures the machine, not the elector
        lab.spawn(f"c{i:02d}", monitor_interval=0.1, work_interval=0.25, call_timeout=2.0)
    lab.settle(timeout=40)
    ttfs = []
    heals = []
    for _ in range(2):
        leader = lab.settle(timeout=15)
        followers = [c for c in lab.live() if c is not leader]
        with lab.fault("SIGKILL the leader and 3 random followers") as f:
            leader.kill()
            for c in rnd.sample(followers, 3):
                c.kill()
        new = lab.wait_leader(timeout=TTL + slack(3), exclude=[leader])
        ttfs.append(term_start(new, f["start"]) - f["start"])
        heals.append((f["start"], L1_BOUND))
    report = lab.finish(heals=heals)
    ok(report, (*WORKING, "L1"))
    assert max(ttfs) <= L1_BOUND, ttfs


def test_s27_mixed_ttls_and_margins_stay_safe(make_lab: MakeLab) -> None:
    lab = make_lab()
    configs = [("t2", 2, 0.25), ("t3", 3, 0.5), ("t5", 5, 1.0)]
    for name, ttl, margin in configs:
        lab.spawn(name, ttl=ttl, margin=margin)
    kills: list[tuple[float, float]] = []
    for _ in range(2):
        leader = lab.settle(timeout=15)
        worked(leader)
        ttl = {n: t for n, t, _ in configs}[leader.identity]
        with lab.fault("SIGKILL the leader", ttl=ttl) as f:
            leader.kill()
        kills.append((f["start"], ttl + slack(0.6)))
        if len(lab.live()) > 1:
            lab.wait_leader(timeout=ttl + slack(3), exclude=[leader])
    report = lab.finish(heals=kills)
    ok(report, (*WORKING, "L1"))
