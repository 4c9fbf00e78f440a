"""The elector against a real etcd server started by the tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from elector_kit import keys
from scenario_kit import poll, slack

from electfsm import Elector, EtcdUnavailable, NotLeaderError, ops
from electfsm.etcd import EtcdClient
from electfsm.events import LeaderInfo
from electfsm.testing.etcd_binaries import free_port
from electfsm.testing.faultproxy import FaultProxy
from electfsm.testing.local_etcd import LocalEtcd

HERE = Path(__file__).resolve().parent
MakeElector = Callable[..., Elector]








def settle(electors: list[Elector], timeout: float = 10) -> Elector:
    """Wait until exactly one leads and every other follows it; return the leader."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        leaders = [e for e in electors if e.state == "leader"]
        if len(leaders) == 1 and all(
                e.state == "follower" and e.leader is not None
                and e.leader.key == leaders[0].term.key  # type: ignore[union-attr]
                for e in electors if e is not leaders[0]):
            return leaders[0]
        time.sleep(0.01)
    raise AssertionError(f"no single settled leader: {[(e.identity, e.state) for e in electors]}")


def test_exactly_one_of_three_leads_and_followers_know_it(make_elector: MakeElector) -> None:
    electors = [make_elector(f"node-{i}") for i in range(3)]
    leader = settle(electors)
    for e in electors:
        assert e.leader is not None and e.leader.identity == leader.identity
    assert sum(e.state == "leader" for e in electors) == 1


def test_graceful_resign_hands_over_and_requeues_at_the_back(
        make_elector: MakeElector) -> None:
    electors = [make_elector(f"node-{i}") for i in range(3)]
    first = settle(electors)
    old_token = first.term.token  # type: ignore[union-attr]
    first.resign()
    second = settle([e for e in electors])
    assert second is not first
    assert second.term is not None and second.term.token > old_token
    second.resign()
    third = settle(electors)
    assert third is not second and third is not first, "the resigned node queued at the back"


def test_killed_leader_process_hands_over_within_ttl_plus_one_second(
        etcd: LocalEtcd, election: str, make_elector: MakeElector) -> None:
    ttl = 2
    proc = subprocess.Popen([sys.executable, str(HERE / "candidate.py"), etcd.endpoint,
                             election, "doomed", str(ttl)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if json.loads(line).get("state") == "leader":
                break
        else:
            pytest.fail("the candidate process never led")
        follower = make_elector("survivor", ttl=ttl)
        assert follower.wait_for("follower", timeout=5)
        killed_at = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        assert follower.wait_for("leader", timeout=ttl + slack(3))
        took = time.monotonic() - killed_at
        assert took <= ttl + slack(1.0), f"failover took {took:.2f}s with ttl {ttl}"
    finally:
        proc.kill()
        proc.wait()


def test_stop_leaves_no_key_no_lease_and_no_thread(
        make_elector: MakeElector, raw: EtcdClient, election: str) -> None:
    e = make_elector("node-a")
    assert e.wait_for("leader", timeout=5)
    lease = e.term.lease  # type: ignore[union-attr]
    assert raw.time_to_live(lease).TTL > 0
    e.stop()
    assert e.state == "disconnected"
    assert keys(raw, election) == []
    assert raw.time_to_live(lease).TTL == -1, "the lease was revoked"
    assert [t.name for t in threading.enumerate() if election in t.name] == []


def test_hooks_run_in_order_on_the_dispatcher_thread(make_elector: MakeElector) -> None:
    calls: list[tuple[str, str]] = []
    e = make_elector("node-a", start=False)
    for state in ("disconnected", "candidate", "follower", "leader"):
        getattr(e, f"on_enter_{state}")(
            lambda _a, s=state: calls.append((f"enter_{s}", threading.current_thread().name)))
        getattr(e, f"on_exit_{state}")(
            lambda _a, s=state: calls.append((f"exit_{s}", threading.current_thread().name)))
    e.start()
    assert e.wait_for("leader", timeout=5)
    e.stop()
    names = [c[0] for c in calls]
    assert names == ["exit_disconnected", "enter_candidate", "exit_candidate", "enter_leader",
                     "exit_leader", "enter_disconnected"]
    assert {c[1] for c in calls} == {f"electfsm-dispatch[{e.config.election}]"}


def test_fenced_txn_writes_while_leader_and_fails_once_leadership_is_lost(
        make_elector: MakeElector, raw: EtcdClient, election: str) -> None:
    e = make_elector("node-a")
    assert e.wait_for("leader", timeout=5)
    data = f"{election}-data"
    result = e.fenced_txn(success=[ops.put(data, b"1")])
    assert result.succeeded
    assert raw.range(data.encode()).kvs[0].value == b"1"
    term = e.term
    assert term is not None
    raw.revoke(term.lease)  # leadership lost behind the elector's back
    with pytest.raises(NotLeaderError):
        e.fenced_txn(success=[ops.put(data, b"2")])
    assert raw.range(data.encode()).kvs[0].value == b"1", "nothing written without leadership"


def test_fenced_txn_runs_the_users_compare(make_elector: MakeElector, raw: EtcdClient,
                                           election: str) -> None:
    e = make_elector("node-a")
    assert e.wait_for("leader", timeout=5)
    data = f"{election}-cursor"
    raw.put(data.encode(), b"41")
    ok = e.fenced_txn(compare=[ops.value(data) == b"41"], success=[ops.put(data, b"42")])
    assert ok.succeeded
    stale = e.fenced_txn(compare=[ops.value(data) == b"41"], success=[ops.put(data, b"99")],
                         failure=[ops.get(data)])
    assert not stale.succeeded
    assert stale.responses[0].response_range.kvs[0].value == b"42"


def test_fenced_txn_outside_leadership_is_refused(make_elector: MakeElector) -> None:
    e = make_elector("node-a", start=False)
    with pytest.raises(NotLeaderError, match="not leader"):
        e.fenced_txn(success=[ops.put("x", b"1")])


def test_deleting_the_leaders_key_by_hand_deposes_it_and_everyone_sees_it(
        make_elector: MakeElector, raw: EtcdClient) -> None:
    a = make_elector("node-a")
    assert a.wait_for("leader", timeout=5)
    b = make_elector("node-b")
    assert b.wait_for("follower", timeout=5)
    exits: list[str | None] = []
    a.on_exit_leader(lambda term: exits.append(term.ended_by))
    key = a.term.key  # type: ignore[union-attr]
    raw.delete(key.encode())
    assert b.wait_for("leader", timeout=5), "b's key is now the oldest"
    assert settle([a, b]) is b, "a campaigned again, behind b"
    assert exits == ["deposed"]
    assert a.leader is not None and a.leader.identity == "node-b"


def test_waiting_candidate_whose_lease_expires_never_becomes_leader(
        make_elector: MakeElector, raw: EtcdClient) -> None:
    a = make_elector("node-a")
    assert a.wait_for("leader", timeout=5)
    b = make_elector("node-b")
    assert b.wait_for("follower", timeout=5)
    doomed_lease = b._session.lease
    terms: list[int] = []
    b.on_enter_leader(lambda term: terms.append(term.lease))
    raw.revoke(doomed_lease)   # b's key goes with its lease while b waits behind a
    a.stop()                   # ...and right then its predecessor leaves
    assert b.wait_until(lambda e: e.state == "leader", timeout=10)
    assert terms, "b leads, once it has a new lease"
    assert doomed_lease not in terms, "phantom leadership on a revoked lease"


def test_revoked_lease_is_noticed_and_a_new_session_leads_again(
        make_elector: MakeElector, raw: EtcdClient) -> None:
    lost: list[str] = []
    e = make_elector("node-a", start=False)
    e.on_enter_disconnected(lambda change: lost.append(change.reason))
    e.start()
    assert e.wait_for("leader", timeout=5)
    first = e.term
    assert first is not None
    raw.revoke(first.lease)
    assert e.wait_until(lambda x: x.term is not None and x.term.lease != first.lease,
                        timeout=10)
    assert first.cancelled.is_set()
    assert any("lease" in reason for reason in lost), lost


def test_paused_etcd_makes_the_leader_step_down_before_the_lease_could_expire(
        make_etcd: Callable[..., LocalEtcd], election: str) -> None:
    server = make_etcd()
    ttl = 2
    e = Elector(endpoints=[server.endpoint], election=election, identity="node-a", ttl=ttl,
                call_timeout=0.5)
    stepped: list[float] = []
    e.on_exit_leader(lambda term: stepped.append(time.monotonic()))
    try:
        e.start()
        assert e.wait_for("leader", timeout=5)
        term = e.term
        assert term is not None
        paused_at = time.monotonic()
        deadline = term.deadline
        server.pause()
        try:
            assert e.wait_for("disconnected", timeout=ttl + 2)
        finally:
            server.resume()
        assert stepped, "on_exit_leader ran"
        # The last keepalive was sent before the pause, so the server's expiry is later than
        # paused_at + ttl - (time since that keepalive); stepping down by the local deadline
        # (send time + ttl - margin) is before it.
        assert stepped[0] <= deadline + slack(0.2)
        assert stepped[0] - paused_at < ttl
        assert e.wait_for("leader", timeout=10), "leads again once etcd answers"
    finally:
        e.stop()


def test_a_lost_lease_whose_revoke_failed_is_revoked_as_soon_as_etcd_answers(
        make_etcd: Callable[..., LocalEtcd], election: str) -> None:
    """Cut off past its deadline, the leader steps down and its revoke of the lost lease
    fails. Its key then stays first in line until the lease expires: a TTL at worst (etcd
    renews every lease when its own leader changes; seen after a quorum loss in a randomized
    run). The revoke is tried again right after the next grant, before campaigning."""
    from electfsm.testing.faultproxy import FaultProxy

    server = make_etcd()
    margin = 4.0
    with FaultProxy(server.endpoint) as proxy:
        e = Elector(endpoints=[proxy.endpoint], election=election, identity="node-a", ttl=10,
                    margin=margin, call_timeout=1.0, backoff_max=0.3)
        observer = EtcdClient([server.endpoint], timeout=2)
        try:
            e.start()
            assert e.wait_for("leader", timeout=5)
            term = e.term
            assert term is not None
            proxy.blackhole()
            # The last keepalive was sent by now, so etcd expires the lease no sooner than
            # this deadline + the margin: everything below must happen before that.
            natural_expiry = term.deadline + margin
            assert e.wait_for("disconnected", timeout=10)
            time.sleep(1.5)  # the revoke of the lost lease times out against the blackhole
            assert observer.time_to_live(term.lease).TTL > 0, "the old lease is still there"
            proxy.pass_through()
            assert e.wait_for("leader", timeout=natural_expiry - time.monotonic())
            assert time.monotonic() < natural_expiry, "too slow to tell: the lease expired"
            assert observer.time_to_live(term.lease).TTL == -1, "the lost lease was revoked"
            assert e.term is not None and e.term.lease != term.lease
        finally:
            e.stop()
            observer.close()


def test_unreachable_etcd_keeps_retrying_and_leads_once_it_comes_up(
        make_etcd: Callable[..., LocalEtcd], election: str) -> None:
    port = free_port()
    errors: list[BaseException] = []
    e = Elector(endpoints=[f"127.0.0.1:{port}"], election=election, identity="node-a", ttl=2,
                call_timeout=0.5, backoff_max=0.3)
    e.on_error(errors.append)
    try:
        e.start()
        poll(lambda: any(isinstance(err, EtcdUnavailable) and f"127.0.0.1:{port}" in str(err)
                         for err in errors), 5, "an error naming the unreachable endpoint")
        assert e.state == "disconnected"
        make_etcd(client_port=port)
        assert e.wait_for("leader", timeout=15)
    finally:
        e.stop()


def test_ttl_below_etcds_minimum_uses_and_exposes_the_granted_ttl(
        make_etcd: Callable[..., LocalEtcd], election: str) -> None:
    # Default raft timings: etcd's minimum TTL is 2 s.
    server = make_etcd(extra_args=["--heartbeat-interval", "100", "--election-timeout", "1000"])
    e = Elector(endpoints=[server.endpoint], election=election, identity="node-a", ttl=1)
    try:
        assert e.ttl == 1
        e.start()
        assert e.wait_for("leader", timeout=10)
        assert e.ttl == 2
    finally:
        e.stop()


def test_go_etcdctl_elect_and_electfsm_agree_on_one_leader(
        etcd: LocalEtcd, etcdctl: str, election: str, make_elector: MakeElector) -> None:
    env = {**os.environ, "ETCDCTL_API": "3"}
    go = subprocess.Popen([etcdctl, f"--endpoints={etcd.endpoint}", "elect", election, "go-node"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert go.stdout is not None
        first = go.stdout.readline()  # etcdctl prints the leader key when it wins
        assert first.startswith(election + "/"), first
        py = make_elector("py-node")
        assert py.wait_for("follower", timeout=5)
        assert py.leader is not None and py.leader.identity == "go-node"
        go.send_signal(signal.SIGINT)  # etcdctl resigns
        assert py.wait_for("leader", timeout=5)
        go.wait(5)
        go2 = subprocess.Popen([etcdctl, f"--endpoints={etcd.endpoint}", "elect", election,
                                "go-node-2"], stdout=subprocess.PIPE, text=True, env=env)
        try:
            time.sleep(1.0)
            assert go2.poll() is None
            assert py.state == "leader", "the Go candidate waits behind the electfsm leader"
            py.resign()
            assert go2.stdout is not None
            assert go2.stdout.readline().startswith(election + "/"), "etcdctl took over"
            assert py.wait_until(lambda e: e.leader is not None
                                 and e.leader.identity == "go-node-2", timeout=5)
        finally:
            go2.send_signal(signal.SIGINT)
            go2.wait(5)
    finally:
        go.kill()
        go.wait()


def test_observe_survives_an_etcd_restart(make_etcd: Callable[..., LocalEtcd],
                                          election: str) -> None:
    server = make_etcd()
    a = Elector(endpoints=[server.endpoint], election=election, identity="node-a", ttl=5,
                call_timeout=0.5, backoff_max=0.3)
    b = Elector(endpoints=[server.endpoint], election=election, identity="node-b", ttl=5,
                call_timeout=0.5, backoff_max=0.3)
    try:
        a.start()
        assert a.wait_for("leader", timeout=5)
        b.start()
        assert b.wait_for("follower", timeout=5)
        server.kill()
        server.restart()
        raw = EtcdClient([server.endpoint], timeout=5)
        try:
            deadline = time.monotonic() + 10
            while len(keys(raw, election)) < 2:  # both campaigns are in the queue again
                assert time.monotonic() < deadline, keys(raw, election)
                time.sleep(0.05)
        finally:
            raw.close()
        leader = settle([a, b], timeout=20)
        other = b if leader is a else a
        leader.resign()
        assert other.wait_for("leader", timeout=10), "the change after the restart was seen"
        assert settle([a, b]) is other
    finally:
        a.stop()
        b.stop()


def test_compaction_does_not_break_observation(make_elector: MakeElector,
                                               raw: EtcdClient) -> None:
    a = make_elector("node-a")
    assert a.wait_for("leader", timeout=5)
    b = make_elector("node-b")
    assert b.wait_for("follower", timeout=5)
    for i in range(20):
        raw.put(b"noise", str(i).encode())
    raw.compact(int(raw.status().header.revision))
    a.resign()
    assert settle([a, b]) is b
    assert a.leader is not None and a.leader.identity == "node-b"


def test_a_raising_hook_does_not_stop_a_real_elector(make_elector: MakeElector) -> None:
    errors: list[BaseException] = []
    e = make_elector("node-a", start=False)
    e.on_error(errors.append)

    @e.on_enter_leader
    def broken(term: object) -> None:
        raise RuntimeError("bug in user code")

    e.start()
    assert e.wait_for("leader", timeout=5)
    e.resign()
    assert e.wait_for("leader", timeout=5), "still campaigning and winning after the error"
    assert len(errors) >= 2 and all("bug in user code" in str(err) for err in errors)


def test_context_manager_stops_cleanly(etcd: LocalEtcd, election: str,
                                       raw: EtcdClient) -> None:
    with Elector(endpoints=[etcd.endpoint], election=election, identity="node-a",
                 ttl=2) as e:
        assert e.wait_for("leader", timeout=5)
        assert keys(raw, election) != []
    assert e.state == "disconnected"
    assert keys(raw, election) == []


def test_run_while_leader_work_is_cancelled_when_leadership_ends(
        make_elector: MakeElector) -> None:
    tokens: list[int] = []
    finished = threading.Event()

    def work(term: Any) -> None:
        tokens.append(term.token)
        term.cancelled.wait(30)
        finished.set()

    e = make_elector("node-a", start=False)
    e.run_while_leader(work)
    e.start()
    assert e.wait_for("leader", timeout=5)
    e.resign()
    assert finished.wait(5), "work saw term.cancelled and returned"
    assert e.wait_for("leader", timeout=5)
    deadline = time.monotonic() + 5
    while len(tokens) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(tokens) == 2 and tokens[0] < tokens[1], "a fresh term, a larger token"


def test_stop_lets_work_finish_before_the_lease_is_revoked(
        make_elector: MakeElector, raw: EtcdClient, election: str) -> None:
    """While run_while_leader work winds down after stop(), our key still holds the
    election, so no other leader's work can overlap it; once stop() returns it is gone."""
    held_while_winding_down: list[bool] = []

    def work(term: Any) -> None:
        term.cancelled.wait(30)
        time.sleep(0.3)  # wind down: flush, close files ...
        held_while_winding_down.append(keys(raw, election) == [term.key.encode()])

    e = make_elector("node-a", start=False)
    e.run_while_leader(work)
    e.start()
    assert e.wait_for("leader", timeout=5)
    e.stop()
    assert held_while_winding_down == [True]
    assert keys(raw, election) == []


def test_electors_can_share_one_connection(etcd: LocalEtcd, election: str) -> None:
    client = EtcdClient.connect([etcd.endpoint])
    shards = [Elector(client=client, election=f"{election}/shard-{i}", identity="node-a",
                      ttl=2) for i in range(5)]
    try:
        for e in shards:
            e.start()
        assert all(e.wait_for("leader", timeout=5) for e in shards)
    finally:
        for e in shards:
            e.stop()
    assert client.status().header.revision > 0, "stopping electors left the shared client open"
    client.close()


def watchers(etcd: LocalEtcd) -> int:
    """etcd's count of open watchers (its /metrics)."""
    import urllib.request

    text = urllib.request.urlopen(etcd.client_url + "/metrics", timeout=5).read().decode()
    return int(float(next(line.split()[1] for line in text.splitlines()
                          if line.startswith("etcd_debugging_mvcc_watcher_total "))))


def test_electors_sharing_a_connection_share_one_watch_of_their_election(
        make_etcd: Callable[..., LocalEtcd], election: str) -> None:
    """N electors of one election on one client: one observe watch, not N (each watcher
    would see every candidate join: N^2 events). All know the leader, a late one at once,
    and stopping some leaves the others observing."""
    server = make_etcd()
    client = EtcdClient.connect([server.endpoint])
    made = [Elector(client=client, election=election, identity=f"n{i}", ttl=5)
            for i in range(10)]
    try:
        for e in made[:9]:
            e.start()
        leader = settle(made[:9])
        # one shared observe watch, and none per waiting candidate (the election's stream
        # elects a follower: its campaign holds no watch of its predecessor); a watch of the
        # election per elector would make it 9, a predecessor watch per follower 1 + 8
        poll(lambda: watchers(server) == 1, 10, "exactly 1 watcher")
        # and no campaign or observe keeps a thread once it knows where it stands: each
        # elector's only thread is its dispatcher
        poll(lambda: not [t for t in threading.enumerate()
                          if t.name.startswith(("electfsm-campaign", "electfsm-observe"))],
             10, "no campaign or observe thread left")
        late = made[9]
        late.start()
        assert late.wait_until(lambda e: e.leader is not None and e.state == "follower", 5)
        assert late.leader is not None and late.leader.identity == leader.identity
        for e in made[:5]:
            if e is not leader:
                e.stop()
        leader.resign()
        rest = [e for e in made[5:] if e is not leader]
        new = settle(rest)
        assert new is not leader
        assert all(e.leader is not None and e.leader.identity == new.identity for e in rest)
    finally:
        for e in made:
            e.stop()
        client.close()


def test_client_and_endpoints_together_are_refused(etcd: LocalEtcd) -> None:
    from electfsm import ConfigError

    client = EtcdClient.connect([etcd.endpoint])
    try:
        with pytest.raises(ConfigError, match="either client"):
            Elector(client=client, endpoints=[etcd.endpoint], election="x", identity="n")
    finally:
        client.close()


def test_a_renewal_answered_only_after_the_local_deadline_does_not_revive_the_term(
        make_etcd: Callable[..., LocalEtcd], election: str) -> None:
    """The renewal's answer is taken in only once the local deadline has passed (here: the
    session's clock jumps past it while etcd answers; in life: the process stalled). Anyone
    may have seen the term end by then, so the session is lost; the term never turns valid
    again, though etcd did renew the lease."""
    from electfsm.config import ElectorConfig
    from electfsm.events import SessionLost, SessionUp
    from electfsm.sources.session import SessionWatch

    server = make_etcd()
    offset = [0.0]

    def clock() -> float:
        return time.monotonic() + offset[0]

    jumped = threading.Event()
    seen: dict[str, float] = {}

    class LateAnswers(EtcdClient):
        def keepalive(self, lease: int, *, timeout: float | None = None) -> int:
            sent = clock()
            granted = super().keepalive(lease, timeout=timeout)
            if not jumped.is_set():  # the first renewal: its answer arrives too late
                seen["sent"] = sent
                seen["granted"] = int(granted)
                seen["deadline"] = session.deadline(session.generation)
                offset[0] = seen["deadline"] + 0.5 - time.monotonic()
                jumped.set()
            return int(granted)

    events: list[object] = []
    config = ElectorConfig(endpoints=[server.endpoint], election=election, identity="a",
                           ttl=6, margin=0.5)
    client = LateAnswers([server.endpoint], timeout=2)
    session = SessionWatch(client, config, events.append, clock=clock)
    try:
        session.start()
        assert jumped.wait(10), "no renewal was sent"
        time.sleep(0.3)
        generation = next(e.generation for e in events if isinstance(e, SessionUp))
        # the renewal was sent while the term was valid and etcd did renew the lease: taken
        # in at once, it would have pushed the deadline to sent + TTL - margin, well past now
        assert seen["sent"] < seen["deadline"], seen
        assert seen["granted"] > 0, seen
        assert seen["sent"] + 6 - 0.5 > clock(), "the jump went past what the renewal buys"
        assert session.deadline(generation) < clock(), "the term came back to life"
        assert any(isinstance(e, SessionLost) and e.generation == generation
                   and "local deadline" in e.reason for e in events), events
    finally:
        session.stop(5)
        client.close()


# --------------------------------------------------------------------------- promises


def test_is_leader_is_true_only_for_the_leader_and_only_until_its_deadline(
        make_etcd: Callable[..., LocalEtcd], election: str) -> None:
    """``is_leader`` is the leader's *valid* term: false on a follower, and false on the
    leader once its local deadline passed, even while its machine still says ``leader``
    (here the dispatcher is held in a slow hook while etcd hangs, so nothing has stepped
    it down yet)."""
    server = make_etcd()
    hold = threading.Event()
    a = Elector(endpoints=[server.endpoint], election=election, identity="node-a", ttl=2,
                call_timeout=0.5)
    a.on_enter_leader(lambda term: hold.wait(30))
    b = Elector(endpoints=[server.endpoint], election=election, identity="node-b", ttl=2,
                call_timeout=0.5)
    try:
        assert not a.is_leader, "not started"
        a.start()
        poll(lambda: a.is_leader, 5, "a leads")
        b.start()
        assert b.wait_for("follower", timeout=slack(5))
        assert not b.is_leader
        term = a.term
        assert term is not None
        server.pause()
        try:
            poll(lambda: not a.is_leader, 2 + slack(2), "the leader's is_leader turned false")
            assert time.monotonic() >= term.deadline, "is_leader turned false early"
            assert a.state == "leader", "the precondition: the machine had not stepped down"
            assert not b.is_leader
        finally:
            hold.set()
            server.resume()
        leader = poll(lambda: next((e for e in (a, b) if e.is_leader), None), 10,
                      "someone leads again")
        other = b if leader is a else a
        assert not other.is_leader
        leader.stop()
        assert not leader.is_leader, "stopped"
    finally:
        hold.set()
        a.stop()
        b.stop()


def test_stop_without_revoke_leaves_the_key_until_the_ttl_and_nobody_leads_before(
        make_elector: MakeElector, raw: EtcdClient, election: str) -> None:
    """``stop(revoke=False)`` stops renewing and leaves the lease to expire, as a crash
    would: the key stays, and the follower leads only once etcd expired it."""
    ttl = 2
    a = make_elector("node-a", ttl=ttl)
    assert a.wait_for("leader", timeout=slack(5))
    b = make_elector("node-b", ttl=ttl)
    assert b.wait_for("follower", timeout=slack(5))
    led: list[float] = []
    b.on_enter_leader(lambda term: led.append(time.monotonic()))
    term = a.term
    assert term is not None
    a.stop(revoke=False)
    stopped = time.monotonic()
    assert a.state == "disconnected"
    assert term.key.encode() in keys(raw, election), "the key stays after stop(revoke=False)"
    assert raw.time_to_live(term.lease).TTL > 0, "the lease was not revoked"
    assert b.wait_for("leader", timeout=ttl + slack(3))
    assert raw.time_to_live(term.lease).TTL == -1, "b leads only once a's lease is gone"
    # a's last renewal was sent at most TTL/3 before stop(): its lease lived at least the rest
    assert led and led[0] - stopped >= ttl - ttl / 3 - 0.1, (
        f"b led {led[0] - stopped:.2f}s after the stop: the lease did not wait out its TTL")


def test_on_leader_change_reports_each_change_as_old_new_pairs(
        make_elector: MakeElector) -> None:
    """A real elector's ``on_leader_change`` gets ``(old, new)`` for every change it sees,
    each pair starting where the last ended, ours included."""
    a = make_elector("node-a")
    assert a.wait_for("leader", timeout=slack(5))
    b = make_elector("node-b")
    assert b.wait_for("follower", timeout=slack(5))
    c = make_elector("node-c", start=False)
    seen: list[tuple[str | None, str | None]] = []

    def record(old: LeaderInfo | None, new: LeaderInfo | None) -> None:
        seen.append((old.identity if old else None, new.identity if new else None))

    c.on_leader_change(record)
    c.start()
    assert c.wait_for("follower", timeout=slack(5))
    poll(lambda: seen, 5, "c saw the first leader")
    a.resign()  # b is next in line; a queues behind c
    poll(lambda: seen and seen[-1][1] == "node-b", 5, "c saw b take over")
    b.stop()    # c is next in line
    assert c.wait_for("leader", timeout=slack(5))
    poll(lambda: seen[-1][1] == "node-c", 5, "c saw itself take over")
    assert seen[0] == (None, "node-a"), seen
    assert all(x[1] == y[0] for x, y in pairwise(seen)), f"pairs do not chain: {seen}"
    assert [n for _, n in seen if n is not None] == ["node-a", "node-b", "node-c"], seen


def test_leader_is_none_while_disconnected(make_elector: MakeElector, etcd: LocalEtcd) -> None:
    """Cut off past its deadline, a follower cannot tell who leads: ``leader`` is None in
    ``disconnected`` (already when its enter hook runs), and known again once it is back."""
    a = make_elector("node-a")
    assert a.wait_for("leader", timeout=slack(5))
    with FaultProxy(etcd.endpoint) as proxy:
        b = make_elector("node-b", endpoint=proxy.endpoint, start=False, call_timeout=0.5)
        in_hook: list[LeaderInfo | None] = []
        b.on_enter_disconnected(lambda change: in_hook.append(b.leader))
        b.start()
        assert b.wait_until(lambda e: e.state == "follower" and e.leader is not None,
                            timeout=slack(5))
        assert b.leader is not None and b.leader.identity == "node-a"
        proxy.blackhole()
        assert b.wait_for("disconnected", timeout=2 + slack(3))
        assert b.leader is None
        assert in_hook == [None], in_hook
        proxy.pass_through()
        assert b.wait_until(lambda e: e.state == "follower" and e.leader is not None,
                            timeout=slack(10))
        assert b.leader is not None and b.leader.identity == "node-a"
        b.stop()
