"""Scenarios S3, S4, S8-S11, S20-S22: faults on the link between one candidate and etcd
(fault proxy: blackhole, reset/refuse, half-open, latency, flapping; nftables on loopback:
asymmetric drop and packet loss), each checked against P1-P8 and L1-L5."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
from scenario_kit import TTL, WORKING, MakeLab, ok, poll, slack, worked

from electfsm.chaos.checker import terms_of
from electfsm.chaos.faults import PacketFilter, nft_problem
from electfsm.chaos.lab import Lab
from electfsm.chaos.process import CandidateProcess
from electfsm.chaos.protocol import event_time
from electfsm.errors import EtcdError
from electfsm.etcd import EtcdClient

L1_BOUND = TTL + slack(0.6)
# The dispatcher runs the exit hooks a moment after the session thread's deadline passed.
HOOK_SLACK = slack(0.2)

def last_exit(c: CandidateProcess) -> dict[str, Any]:
    ev = c.wait_for(lambda e: e["kind"] == "exit_leader", 0)
    assert ev is not None
    return ev


def stepped_down_by_its_deadline(lab: Lab, c: CandidateProcess) -> float:
    """The candidate's first term ended no later than its last logged deadline (+ the time
    the dispatcher takes to run the exit hook); returns when it stepped down."""
    span = next(s for s in terms_of(lab.history()) if s.inc == c.inc)
    assert span.exit_at <= span.deadline + HOOK_SLACK, (
        f"stepped down {span.exit_at - span.deadline:.3f}s after its deadline")
    return span.exit_at


def two(lab: Lab, **kwargs: Any) -> tuple[CandidateProcess, CandidateProcess]:
    a = lab.spawn("a", **kwargs)
    lab.wait_leader()
    b = lab.spawn("b", **kwargs)
    worked(lab.settle())  # the faults hit a term that already wrote
    return a, b


# --------------------------------------------------------------------------- S3, S4


def test_s3_blackholed_leader_steps_down_before_its_lease_can_expire(
        make_lab: MakeLab) -> None:
    lab = make_lab()
    a, _b = two(lab)
    with lab.fault("blackhole the leader's link") as f:
        lab.link("a").blackhole()
        lab.wait_leader(timeout=TTL + slack(2), exclude=[a])
        assert a.wait_for(lambda e: e["kind"] == "exit_leader", slack(2))
        time.sleep(0.3)
    lab.link("a").pass_through()
    assert a.wait_state("follower", timeout=TTL + slack(3), after=f["end"])
    stepped_down_by_its_deadline(lab, a)
    report = lab.finish(heals=[(f["start"], L1_BOUND)])
    ok(report, (*WORKING, "L1"))


def test_s4_reset_and_refused_link_makes_the_leader_step_down_in_time(
        make_lab: MakeLab) -> None:
    lab = make_lab()
    a, _b = two(lab)
    with lab.fault("RST every connection and refuse new ones") as f:
        lab.link("a").refuse()
        lab.link("a").reset()
        lab.wait_leader(timeout=TTL + slack(2), exclude=[a])
        assert a.wait_for(lambda e: e["kind"] == "exit_leader", slack(2))
    lab.link("a").pass_through()
    assert a.wait_state("follower", timeout=TTL + slack(3), after=f["end"])
    stepped_down_by_its_deadline(lab, a)
    report = lab.finish(heals=[(f["start"], L1_BOUND)])
    ok(report, (*WORKING, "L1"))


# --------------------------------------------------------------------------- S8


def test_s8_follower_whose_lease_expires_while_cut_off_never_becomes_a_phantom_leader(
        make_lab: MakeLab) -> None:
    lab = make_lab()
    a, b = two(lab)
    b_key = next(k for k in lab.candidate_keys() if k["value"] == "b")
    with lab.fault("blackhole the follower past its TTL; the leader resigns meanwhile") as f:
        lab.link("b").blackhole()
        gone = lab.wait_etcd(lambda e: e["type"] == "DELETE" and e["key"] == b_key["key"],
                             TTL + slack(2))
        assert gone is not None, "b's lease should have expired on the server"
        a.resign()
        time.sleep(0.5)
        lab.link("b").pass_through()
    assert b.wait_state("follower", "leader", timeout=TTL + slack(3), after=event_time(gone))
    time.sleep(0.5)
    report = lab.finish(heals=[(f["end"], L1_BOUND)])
    ok(report, (*WORKING, "L1"))
    assert not [s for s in terms_of(lab.history()) if s.key == b_key["key"]]


def test_s8_lease_revoked_just_before_the_predecessor_goes_never_elects_the_dead_key(
        make_lab: MakeLab) -> None:
    """The race behind etcd#11051: the follower's lease dies, then at once the key it waits
    on is deleted; Go's Campaign returns success here. electfsm re-reads and must not lead
    on its dead key; it re-registers with a new lease."""
    lab = make_lab()
    two(lab)
    raw = EtcdClient(lab.endpoints, timeout=2)
    dead: list[dict[str, Any]] = []
    heals: list[tuple[float, float]] = []
    try:
        for _ in range(3):
            leader = lab.settle()
            keys = {k["value"]: k for k in lab.candidate_keys()}
            follower = next(c for c in lab.live() if c is not leader)
            fk, lk = keys[follower.identity], keys[leader.identity]
            with lab.fault("revoke the follower's lease, then delete the leader's key") as f:
                raw.revoke(int(fk["lease"]))
                raw.delete(lk["key"].encode())
            dead.append(fk)
            heals.append((f["end"], L1_BOUND))
            time.sleep(1.0)
    finally:
        raw.close()
    report = lab.finish(heals=heals)
    ok(report, (*WORKING, "L1"))
    spans = terms_of(lab.history())
    for fk in dead:
        assert not [s for s in spans if s.key == fk["key"] and s.token == fk["create_revision"]]


# --------------------------------------------------------------------------- S9


def test_s9_ambiguous_campaign_retries_with_the_same_key(make_lab: MakeLab) -> None:
    """The campaign transaction commits but its answer is lost: the retry must find the
    same key (same lease), leave no orphan key, and never make two leaders.

    The fault is set off by the commit itself: the harness sees b's PUT in etcd while the
    answer is still held in b's proxy (``hold`` seconds each way), switches the link to
    dropping answers, and keeps it so until b logs that its campaign call failed."""
    hold = slack(0.2)
    lab = make_lab()
    lab.spawn("a")
    lab.wait_leader()
    a_key = next(k["key"] for k in lab.candidate_keys() if k["value"] == "a")
    link = lab.link_for("b")
    link.latency(hold)
    # calls and renewals must still fit through the slow link: 2 x hold per round trip
    b = lab.spawn("b", call_timeout=5 * hold, ttl=max(TTL, math.ceil(8 * hold)))
    put = lab.wait_etcd(lambda e: e["type"] == "PUT" and e["value"] == "b", slack(10))
    assert put is not None
    with lab.fault("drop the campaign's answer (and everything else) until b sees it lost") as f:
        link.drop_responses()
        # b's first campaign step to fail after the commit must be the transaction itself;
        # had its answer come through, b would have gone on to read who is ahead and watch
        # a's key, and those calls would fail first (match each call by its name: the
        # election's name has "campaign" in it too)
        txn = f"campaign with b'{put['key']}'"
        went_on = (f"read who is ahead of b'{put['key']}'", f"watch b'{a_key}'")
        lost = b.wait_for(lambda e: e["kind"] == "error"
                          and any(m in e["message"] for m in (txn, *went_on)),
                          slack(10), after=event_time(put))
        link.pass_through()
    assert lost is not None and txn in lost["message"], (
        f"the campaign's answer was not lost: {lost}")
    dropped = sum(p.stats().bytes_dropped for p in link.proxies)
    assert dropped > 0, "the proxy dropped no answer"

    def settled() -> bool:
        try:
            values = sorted(k["value"] for k in lab.candidate_keys())
        except EtcdError:
            return False
        return b.state == "follower" and values == ["a", "b"]

    # b retried (or lost its session and came back) and waits behind a with one key
    poll(settled, TTL + 3, "b follows a with exactly one key of its own")
    records = [e for e in lab.recorder.records
               if e.get("kind") == "etcd_event" and e.get("value") == "b"]
    b_keys = {e["key"] for e in records}
    b_leases = {e["lease"] for e in records}
    assert len(b_keys) == len(b_leases), "one key per lease: the retry reused its key"
    report = lab.finish(heals=[(f["end"], L1_BOUND)])
    ok(report, (*WORKING, "L1"))


# --------------------------------------------------------------------------- S10, S11


def test_s10_half_open_leader_steps_down_and_frees_its_lease(make_lab: MakeLab) -> None:
    """Requests reach etcd, answers are lost: keepalives still renew the lease on the
    server. The leader must step down at its deadline *and* revoke, or nobody could ever
    take over (L4)."""
    lab = make_lab()
    a, _b = two(lab)
    with lab.fault("drop the leader's answers (half-open)"):
        lab.link("a").drop_responses()
        lab.wait_leader(timeout=TTL + slack(3), exclude=[a])
        time.sleep(0.5)
    lab.link("a").pass_through()
    down = stepped_down_by_its_deadline(lab, a)
    report = lab.finish(stepdowns=[(down, L1_BOUND)])
    ok(report, (*WORKING, "L4"))
    assert report["L4"].checked == 1


nft = nft_problem()
needs_nft = pytest.mark.skipif(nft is not None, reason=f"packet-level faults: {nft}")


@needs_nft
def test_s11_packets_from_etcd_dropped_is_a_half_open_link_too(make_lab: MakeLab) -> None:
    """Kernel-level asymmetric partition: nftables drops every packet from etcd's side of
    the leader's connection (its answers and its ACKs); the leader's requests still arrive.
    Same expectations as S10."""
    lab = make_lab()
    a, _b = two(lab)
    port = lab.link("a").proxies[0].port
    with PacketFilter() as pf, lab.fault("nft: drop packets from etcd to the leader") as f:
        pf.drop(port, direction="from_server")
        lab.wait_leader(timeout=TTL + slack(3), exclude=[a])
        time.sleep(0.5)
    down = stepped_down_by_its_deadline(lab, a)
    report = lab.finish(stepdowns=[(down, L1_BOUND)], heals=[(f["end"], L1_BOUND)])
    ok(report, (*WORKING, "L1", "L4"))


# --------------------------------------------------------------------------- S20, S21, S22


def test_s20_latency_below_the_renew_interval_causes_no_churn(make_lab: MakeLab) -> None:
    renew_interval = TTL / 3
    lab = make_lab()
    # a round trip (half a renew interval) must fit in a call, whatever the TTL
    a, _b = two(lab, call_timeout=max(1.0, renew_interval))
    with lab.fault("latency 0.25 x renew interval each way, +-0.05 s, for 5 s") as f:
        for c in ("a", "b"):
            lab.link(c).latency(0.25 * renew_interval, jitter=0.05)
        time.sleep(5)
        for c in ("a", "b"):
            lab.link(c).pass_through()
    time.sleep(0.5)
    renewals = [e for e in a.events() if e["kind"] == "renew" and f["start"] <= e["mono"]
                <= f["end"]]
    report = lab.finish(quiet=[(f["start"], f["end"] + 0.5)])
    ok(report, (*WORKING, "L3"))
    assert len(renewals) >= 5 / renew_interval - 2, "renewals went on under latency"


def test_s20_a_candidate_behind_a_slow_link_still_connects(make_lab: MakeLab) -> None:
    """150 ms each way (a distant etcd): calls take 0.3 s, well under the 1 s call
    timeout, so the candidate must connect and follow. Regression: gRPC's
    min_reconnect_backoff_ms (then 100 ms) is also its connect timeout, so a link with an
    RTT over ~0.3 s never connected."""
    lab = make_lab()
    lab.spawn("a")
    lab.wait_leader()
    lab.link_for("far").latency(0.15)
    far = lab.spawn("far", call_timeout=1.0)
    assert far.wait_state("follower", timeout=slack(5)) is not None, "never connected"
    report = lab.finish()
    ok(report)


@needs_nft
def test_s21_packet_loss_never_makes_two_leaders(make_lab: MakeLab) -> None:
    """20 % of the leader's packets (both ways) are dropped by the kernel for 4 s: TCP
    retransmits stretch calls; churn may happen (reported), overlap must not."""
    lab = make_lab()
    _a, _b = two(lab, call_timeout=1.0)
    port = lab.link("a").proxies[0].port
    with PacketFilter() as pf, lab.fault("nft: 20 % packet loss on the leader's link") as f:
        pf.drop(port, direction="both", percent=20)
        time.sleep(4)
    time.sleep(1.0)
    report = lab.finish(heals=[(f["end"], L1_BOUND)])
    ok(report, (*WORKING, "L1"))


def test_s22_flapping_link_keeps_churn_bounded_and_leaks_nothing(make_lab: MakeLab) -> None:
    lab = make_lab()
    a, _b = two(lab)
    cycles = 3
    with lab.fault(f"blackhole on/off every 0.5 x TTL, {cycles} cycles") as f:
        for _ in range(cycles):
            lab.link("a").blackhole()
            time.sleep(0.5 * TTL)
            lab.link("a").pass_through()
            time.sleep(0.5 * TTL)
    time.sleep(1.0)
    moves = [e for e in a.events() if e["kind"] == "transition"]
    report = lab.finish(heals=[(f["end"], L1_BOUND)])
    ok(report, (*WORKING, "L1"))
    # at most a step-down and a way back (disconnected -> candidate -> follower) per cycle
    assert len(moves) <= 2 + 3 * cycles, [(e["source"], e["dest"]) for e in moves]
