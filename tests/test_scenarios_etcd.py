"""Scenarios S12-S16, S23, S24, S28 and S29: faults in etcd itself (a minority member, the
raft leader killed or frozen, quorum loss, whole-cluster restarts, compaction storms, auth
tokens expiring, membership changes) and a short randomized run, each checked against
P1-P8 and L1-L5. Also: an etcd restart that carries leases over, and multi-endpoint
failover to a live member without losing leadership."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from etcd3 import etcdrpc
from scenario_kit import ELECTION, TTL, WORKING, MakeLab, ok, poll, slack

from electfsm.chaos.checker import terms_of
from electfsm.chaos.cluster import PartitionableCluster
from electfsm.chaos.faults import Freezer, cgroup_problem
from electfsm.chaos.runner import CLASSIC_KINDS, run_chaos
from electfsm.errors import EtcdError
from electfsm.etcd import EtcdClient
from electfsm.etcd.security import Auth
from electfsm.testing.cluster import LocalCluster
from electfsm.testing.etcd_binaries import free_port
from electfsm.testing.local_etcd import LocalEtcd

L1_BOUND = TTL + slack(0.6)
# After the etcd leader changed, leases are refreshed to a full TTL + the election timeout;
# the new raft leader is elected within two election timeouts of the fault.
ETCD_CHANGE_BOUND = TTL + 3 * ELECTION + slack(0.8)
# A member cut off from its peers notices it has no leader after an election timeout, and
# etcd ends its require-leader streams after three more election timeouts without one.
NO_LEADER_BOUND = 6 * ELECTION + slack(0.4)

def fast_stop(c: LocalCluster) -> None:
    """SIGKILL every member first: a graceful stop waits for the leader's hand-over."""
    for m in c.members:
        m.kill()
    c.stop()


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    c = LocalCluster(3).start()
    try:
        yield c
    finally:
        fast_stop(c)


def same_term_throughout(c: Any, token: int) -> None:
    exits = [e for e in c.events() if e["kind"] == "exit_leader" and e["token"] == token]
    assert not exits, f"{c.identity} lost its term: {exits[0]}"


def start_all(members: list[LocalEtcd]) -> None:
    """Start stopped members at once (each waits for a quorum to be healthy)."""
    errors: list[BaseException] = []

    def boot(m: LocalEtcd) -> None:
        try:
            m.start(30)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=boot, args=(m,)) for m in members]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# --------------------------------------------------------------------------- S12 + failover


def test_s12_minority_member_fails_streams_fast_and_the_leader_keeps_its_term(
        make_lab: MakeLab) -> None:
    """The member both candidates talk to is cut off from its peers. With require-leader
    metadata its watch and keepalive streams fail within a few election timeouts ("no
    leader"), and both candidates fail over to a live member: the leader keeps its term.
    The leader is then killed while the partition lasts: the follower, now watching
    through a live member, takes over in time."""
    with PartitionableCluster() as cluster:
        raft = cluster.wait_for_leader()
        minority = (raft + 1) % 3
        order = [cluster.endpoints[minority]] + [e for i, e in enumerate(cluster.endpoints)
                                                 if i != minority]
        lab = make_lab(order)
        a = lab.spawn("a")
        lab.wait_leader()
        b = lab.spawn("b")
        lab.settle()
        time.sleep(0.3)
        token = a.current_term()["token"]  # type: ignore[index]
        # a bare watch on the minority member (no keepalive to time out beside it)
        lone = EtcdClient([cluster.endpoints[minority]], timeout=2)
        watch = lone.watch(f"{lab.name}/".encode(), b"\xff")
        ended: list[tuple[float, str]] = []

        def drain() -> None:
            try:
                for _ in watch:
                    pass
            except EtcdError as exc:
                ended.append((time.monotonic(), str(exc)))

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        with lab.fault("cut the candidates' member off from its peers") as f:
            cluster.isolate(minority)
            poll(lambda: ended, NO_LEADER_BOUND + 1, "the watch on the minority member ended")
            assert "no leader" in ended[0][1], ended
            assert ended[0][0] - f["start"] < NO_LEADER_BOUND, (
                "require-leader must end the watch fast")
            same_term_throughout(a, token)
            with lab.fault("SIGKILL the leader during the partition") as k:
                a.kill()
            lab.wait_leader(timeout=TTL + slack(3), exclude=[a])
            cluster.heal()
        watch.cancel()
        lone.close()
        # a keepalive answered "no leader" and the channel moved on, or a watch was
        # cancelled with "no leader": either way b's streams left the minority at once
        cut = b.wait_for(lambda e: e["kind"] == "error" and "watch" in e["message"], 0,
                         after=f["start"])
        assert cut is not None, "b's watches on the minority member never failed"
        assert cut["mono"] - f["start"] < NO_LEADER_BOUND, "require-leader should fail them fast"
        report = lab.finish(quiet=[(f["start"], k["start"])], heals=[(k["start"], L1_BOUND)])
        ok(report, (*WORKING, "L1", "L3"))


@pytest.mark.parametrize("how, call_timeout", [
    ("sigkill", 0.5),
    ("sigstop", 0.5),
    ("sigstop", 2.0),  # regression: the keepalive waited the whole call timeout
])
def test_failover_to_a_live_member_without_losing_leadership(
        cluster: LocalCluster, make_lab: MakeLab, how: str, call_timeout: float) -> None:
    """The member the leader talks to dies (SIGKILL: calls fail at once) or hangs (SIGSTOP:
    calls time out); the client moves to the next endpoint and the keepalive lands before
    the local deadline: same term, no churn. 2.0 s is the library's default call timeout."""
    raft = cluster.wait_for_leader()
    victim = (raft + 1) % 3
    order = [cluster.endpoints[victim]] + [e for i, e in enumerate(cluster.endpoints)
                                           if i != victim]
    lab = make_lab(order, call_timeout=call_timeout)
    a = lab.spawn("a")
    lab.wait_leader()
    lab.spawn("b")
    lab.settle()
    token = a.current_term()["token"]  # type: ignore[index]
    with lab.fault(f"{how} the leader's etcd member") as f:
        if how == "sigkill":
            cluster.members[victim].kill()
            time.sleep(2 * TTL)
        else:
            cluster.members[victim].pause()
            time.sleep(2 * TTL)
            cluster.members[victim].resume()
    same_term_throughout(a, token)
    if how == "sigkill":
        cluster.members[victim].restart()
    report = lab.finish(quiet=[(f["start"], f["end"])])
    ok(report, (*WORKING, "L3"))


# --------------------------------------------------------------------------- S13


def test_s13_killing_the_etcd_raft_leader_changes_no_client_leadership(
        cluster: LocalCluster, make_lab: MakeLab) -> None:
    lab = make_lab(cluster.endpoints)
    a = lab.spawn("a")
    lab.wait_leader()
    lab.spawn("b")
    lab.settle()
    token = a.current_term()["token"]  # type: ignore[index]
    raft = cluster.wait_for_leader()
    with lab.fault("SIGKILL the etcd raft leader") as f:
        cluster.members[raft].kill()
        cluster.wait_for_leader(timeout=slack(5), exclude=[raft])
        time.sleep(TTL)
    same_term_throughout(a, token)
    cluster.members[raft].restart()
    time.sleep(0.3)
    # S1 + S13: the client leader and the raft leader die together
    raft = cluster.wait_for_leader()
    with lab.fault("SIGKILL the client leader and the raft leader together") as g:
        a.kill()
        cluster.members[raft].kill()
    new = lab.wait_leader(timeout=ETCD_CHANGE_BOUND + slack(3), exclude=[a])
    ttf = new.current_term()["mono"] - g["start"]  # type: ignore[index]
    report = lab.finish(quiet=[(f["start"], f["end"])], heals=[(g["start"], ETCD_CHANGE_BOUND)])
    ok(report, (*WORKING, "L1", "L3"))
    assert ttf <= ETCD_CHANGE_BOUND, f"failover took {ttf:.2f}s"


# --------------------------------------------------------------------------- S14

freezer = cgroup_problem("freezer")


@pytest.mark.skipif(freezer is not None, reason=f"S14 needs the cgroup-v1 freezer: {freezer}")
@pytest.mark.parametrize("stall", [0.3, TTL + 0.5])
def test_s14_frozen_etcd_leader_causes_no_overlap(
        cluster: LocalCluster, make_lab: MakeLab, stall: float) -> None:
    """The raft leader is frozen (cgroup freezer) for 3 election timeouts, or past the TTL
    (when it thaws it may revoke every lease it thinks expired: etcd#15247). electfsm
    must notice "my key vanished" at once; churn is bounded and terms never overlap."""
    lab = make_lab(cluster.endpoints)
    lab.spawn("a")
    lab.wait_leader()
    lab.spawn("b")
    lab.settle()
    raft = cluster.wait_for_leader()
    pid = cluster.members[raft].pid
    assert pid is not None
    cg = Freezer(pid)
    try:
        with lab.fault("freeze the etcd raft leader", seconds=stall) as f:
            cg.freeze()
            time.sleep(stall)
            cg.thaw()
    finally:
        cg.remove()
    lab.wait_leader(timeout=ETCD_CHANGE_BOUND + slack(2))
    time.sleep(0.5)
    report = lab.finish(heals=[(f["end"], ETCD_CHANGE_BOUND)])
    ok(report, (*WORKING, "L1"))


# --------------------------------------------------------------------------- S15


def test_s15_short_quorum_loss_is_ridden_out_or_stepped_down_in_time(
        cluster: LocalCluster, make_lab: MakeLab) -> None:
    lab = make_lab(cluster.endpoints)
    lab.spawn("a")
    lab.wait_leader()
    lab.spawn("b")
    lab.settle()
    lost = [cluster.members[i] for i in (0, 1)]
    with lab.fault("SIGSTOP 2 of 3 members for 0.5 x TTL") as f:
        for m in lost:
            m.pause()
        time.sleep(0.5 * TTL)
        for m in lost:
            m.resume()
    lab.wait_leader(timeout=ETCD_CHANGE_BOUND + slack(2))
    time.sleep(0.5)
    report = lab.finish(heals=[(f["end"], ETCD_CHANGE_BOUND)])
    ok(report, (*WORKING, "L1"))


def test_s15_long_quorum_loss_leaves_nobody_acting_then_one_leader(
        cluster: LocalCluster, make_lab: MakeLab) -> None:
    lab = make_lab(cluster.endpoints)
    lab.spawn("a")
    lab.wait_leader()
    lab.spawn("b")
    lab.spawn("c")
    lab.settle()
    lost = [cluster.members[i] for i in (0, 1)]
    with lab.fault("SIGSTOP 2 of 3 members for TTL + 1 s") as f:
        for m in lost:
            m.pause()
        time.sleep(TTL + 1.0)
        for m in lost:
            m.resume()
    lab.wait_leader(timeout=ETCD_CHANGE_BOUND + slack(3))
    time.sleep(0.5)
    report = lab.finish(heals=[(f["end"], ETCD_CHANGE_BOUND)])
    ok(report, (*WORKING, "L1"))
    spans = terms_of(lab.history())
    acting = [s for s in spans if s.start < f["end"] and s.end > f["start"] + TTL]
    assert not acting, f"a term acted without quorum: {acting}"


# --------------------------------------------------------------------------- S16


@pytest.mark.parametrize("how", ["sigkill-all", "sigstop-all"])
def test_s16_whole_cluster_restart_never_makes_two_leaders(
        cluster: LocalCluster, make_lab: MakeLab, how: str) -> None:
    lab = make_lab(cluster.endpoints)
    for n in ("a", "b", "c"):
        lab.spawn(n)
    lab.settle()
    time.sleep(0.3)
    with lab.fault(f"whole cluster: {how}") as f:
        if how == "sigkill-all":
            for m in cluster.members:
                m.kill()
            time.sleep(1.0)
            start_all(cluster.members)
        else:
            for m in cluster.members:
                m.pause()
            time.sleep(2 * TTL)
            for m in cluster.members:
                m.resume()
    lab.wait_leader(timeout=ETCD_CHANGE_BOUND + slack(3))  # the old term, if it renewed in time
    time.sleep(0.5)
    report = lab.finish(heals=[(f["end"], ETCD_CHANGE_BOUND + slack(0.5))])
    ok(report, (*WORKING, "L1"))


def test_etcd_restart_carries_leases_over_without_a_second_leader(
        make_lab: MakeLab, tmp_path: Path) -> None:
    """One member, SIGKILL and restart with its data: leases survive the restart (with a
    refreshed TTL). The old leader keeps its term if it renews before its deadline, else
    steps down; its surviving key keeps everyone else out until it expires; never two."""
    server = LocalEtcd(data_dir=str(tmp_path / "data")).start()
    try:
        lab = make_lab([server.endpoint])
        a = lab.spawn("a")
        lab.wait_leader()
        lab.spawn("b")
        lab.settle()
        time.sleep(0.3)
        leases_before = {k["value"]: k["lease"] for k in lab.candidate_keys()}
        with lab.fault("SIGKILL etcd, restart it at once") as f:
            server.kill()
            server.start()
        kept = {k["value"]: k["lease"] for k in lab.candidate_keys()}
        assert kept == leases_before, "the restart carried the leases and keys over"
        lab.wait_leader(timeout=ETCD_CHANGE_BOUND + slack(3))
        time.sleep(0.5)
        report = lab.finish(heals=[(f["end"], ETCD_CHANGE_BOUND)])
        ok(report, (*WORKING, "L1"))
        del a
    finally:
        server.stop()


# --------------------------------------------------------------------------- S23


def test_s23_compaction_storm_does_not_break_observation(
        make_lab: MakeLab, tmp_path: Path) -> None:
    """While the follower's streams are re-opened over a 20 ms link, etcd compacts every
    20 ms; its re-watches hit compacted revisions and must re-read. The leader resigns in
    the middle; the follower takes over and both agree afterwards."""
    server = LocalEtcd(extra_args=["--snapshot-count=20"]).start()
    raw = EtcdClient([server.endpoint], timeout=2)
    try:
        lab = make_lab([server.endpoint])
        a = lab.spawn("a")
        lab.wait_leader()
        lab.link_for("b").latency(0.02)
        b = lab.spawn("b", call_timeout=1.0)
        lab.settle()
        stop = threading.Event()

        def storm() -> None:
            i = 0
            while not stop.is_set():
                i += 1
                rev = int(raw.put(f"{lab.name}/noise".encode(), str(i).encode()).header.revision)
                raw.compact(rev)
                stop.wait(0.02)

        t = threading.Thread(target=storm)
        with lab.fault("compaction storm; the follower's streams reset; the leader resigns"
                       ) as f:
            t.start()
            try:
                lab.link("b").reset()
                # once b's streams broke, it re-reads and re-watches through the storm: the
                # leader resigns then, and b must see it and take over while the storm lasts
                broke = b.wait_for(lambda e: e["kind"] == "error", slack(5), after=f["start"])
                assert broke is not None, "resetting b's link broke none of its streams"
                a.resign()
                took = b.wait_for(lambda e: e["kind"] == "enter_leader", TTL + slack(3),
                                  after=f["start"])
                assert took is not None, "b never took over during the storm"
            finally:
                stop.set()
                t.join()
        lab.wait_leader(timeout=TTL + slack(3), exclude=[a])
        lab.settle()
        report = lab.finish(heals=[(f["end"], L1_BOUND)])
        ok(report, (*WORKING, "L1"))
        del b
    finally:
        raw.close()
        server.stop()


# --------------------------------------------------------------------------- S24


def _jwt_keys(directory: Path) -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    priv, pub = directory / "jwt.key", directory / "jwt.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return str(priv), str(pub)


def test_s24_auth_tokens_expiring_during_a_long_campaign(
        make_lab: MakeLab, tmp_path: Path, etcdctl: str) -> None:
    """JWT auth tokens that expire every second, used or not: the waiting candidate's
    token has expired many times over when the leader dies; it re-authenticates and wins."""
    priv, pub = _jwt_keys(tmp_path)
    server = LocalEtcd(extra_args=[
        f"--auth-token=jwt,pub-key={pub},priv-key={priv},sign-method=RS256,ttl=1s"]).start()
    try:
        def ctl(*args: str) -> None:
            subprocess.run([etcdctl, f"--endpoints={server.endpoint}", *args], check=True,
                           capture_output=True, timeout=20)

        ctl("user", "add", "root", "--new-user-password=root-pw")
        ctl("user", "grant-role", "root", "root")
        ctl("role", "add", "elector")
        ctl("role", "grant-permission", "elector", "readwrite", "sc/", "--prefix=true")
        ctl("user", "add", "cand", "--new-user-password=cand-pw")
        ctl("user", "grant-role", "cand", "elector")
        ctl("auth", "enable")
        lab = make_lab([server.endpoint], auth=Auth(user="root", password="root-pw"))
        a = lab.spawn("a", user="cand", password="cand-pw")
        lab.wait_leader()
        lab.spawn("b", user="cand", password="cand-pw")
        lab.settle()
        time.sleep(3.5)  # several token lifetimes
        with lab.fault("SIGKILL the leader") as f:
            a.kill()
        lab.wait_leader(timeout=TTL + slack(3), exclude=[a])
        report = lab.finish(heals=[(f["start"], L1_BOUND)])
        ok(report, (*WORKING, "L1"))
    finally:
        server.stop()


# --------------------------------------------------------------------------- bug 3
# Regression: the campaign's confirm read was a read-only Txn; when a client's deadline
# cancelled one while etcd ran it, etcd <= 3.5.4 panicked ("unexpected error during txn",
# etcd#14110, fixed in 3.5.5) and the election crashed its own etcd (seen in S26 with 50
# candidates). It is a plain Range now.


def test_bug3_timed_out_campaign_reads_never_crash_etcd(tmp_path: Path) -> None:
    """Five candidates whose confirm reads are slower than their call timeout (the election
    prefix holds 8 MB of nested keys): every read times out, and etcd must survive it."""
    server = LocalEtcd(log_path=str(tmp_path / "etcd.log")).start()
    raw = EtcdClient([server.endpoint], timeout=10)
    made: list[Any] = []
    try:
        from electfsm import ops
        from electfsm.chaos.process import CandidateProcess

        for batch in range(64):
            raw.txn([], [ops.put(f"bulky/data/{batch:03d}-{i:03d}-{'k' * 1000}", b"x")
                         for i in range(125)])
        for i in range(5):
            made.append(CandidateProcess(identity=f"c{i}", endpoints=[server.endpoint],
                                         election="bulky", call_timeout=0.02,
                                         log_path=tmp_path / f"c{i}.jsonl").start())
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and server.pid is not None:
            time.sleep(0.05)
        assert server.pid is not None, "etcd crashed: " + (tmp_path / "etcd.log").read_text(
            errors="replace")[:300]
    finally:
        for c in made:
            c.terminate()
        raw.close()
        server.stop()


# --------------------------------------------------------------------------- S28


def _member_ids(endpoints: list[str]) -> list[int]:
    ids = []
    for ep in endpoints:
        c = EtcdClient([ep], timeout=2)
        try:
            ids.append(int(c.status().header.member_id))
        finally:
            c.close()
    return ids


@pytest.fixture
def young_cluster() -> Iterator[LocalCluster]:
    """A cluster that accepts membership changes at once (etcd's strict reconfiguration
    check wants every member connected for 5 s first)."""
    c = LocalCluster(3, extra_args=["--strict-reconfig-check=false"]).start()
    try:
        yield c
    finally:
        fast_stop(c)


def test_s28_replacing_a_member_keeps_one_leader(
        young_cluster: LocalCluster, make_lab: MakeLab) -> None:
    """Replace the member the candidates use first (add a new member, remove the old one),
    then kill another: the candidates fail over along their endpoint lists (the new member
    is not in them: the client does not discover members); never two leaders."""
    cluster = young_cluster
    raft = cluster.wait_for_leader()
    first = (raft + 1) % 3
    order = [first] + [i for i in range(3) if i != first]
    lab = make_lab([cluster.endpoints[i] for i in order])
    a = lab.spawn("a")
    lab.wait_leader()
    lab.spawn("b")
    lab.settle()
    ids = _member_ids(cluster.endpoints)
    keep = cluster.endpoints[raft]
    channel = grpc.insecure_channel(keep)
    members = etcdrpc.ClusterStub(channel)
    extra: LocalEtcd | None = None
    try:
        with lab.fault("replace a member: add a new one, remove the old one") as f:
            peer, client = free_port(), free_port()
            added = members.MemberAdd(etcdrpc.MemberAddRequest(
                peerURLs=[f"http://127.0.0.1:{peer}"]), timeout=5)
            initial = ",".join(f"{m.name or 'new'}={m.peerURLs[0]}" for m in added.members)
            extra = LocalEtcd(name="new", client_port=client, peer_port=peer,
                              initial_cluster=initial,
                              extra_args=["--initial-cluster-state=existing"]).start()
            members.MemberRemove(etcdrpc.MemberRemoveRequest(ID=ids[first]), timeout=5)
            cluster.members[first].kill()
            time.sleep(1.0)
        with lab.fault("SIGKILL one more old member") as g:
            other = next(i for i in range(3) if i not in (first, raft))
            cluster.members[other].kill()
            time.sleep(TTL)
        lab.wait_leader(timeout=ETCD_CHANGE_BOUND + slack(2))
        report = lab.finish(heals=[(g["end"], ETCD_CHANGE_BOUND)])
        ok(report, (*WORKING, "L1"))
        del a, f
    finally:
        channel.close()
        if extra is not None:
            extra.stop()


# --------------------------------------------------------------------------- S29


def test_s29_short_randomized_run_holds_every_property(tmp_path: Path) -> None:
    """A 20-second Jepsen-style run with a fixed seed (``make chaos`` runs it for longer)."""
    # the first runs' fault kinds: the lab's longer kinds would leave 20 s too few faults
    report = run_chaos(seed=4, seconds=20, candidates=3, out=tmp_path / "chaos", ttl=TTL,
                       kinds=CLASSIC_KINDS)
    # the schedule has no steady window, half-open link or resign: L3, L4, P8 have nothing
    ok(report, (*WORKING, "L1"))
    schedule = (tmp_path / "chaos" / "schedule.jsonl").read_text()
    drawn = Counter(json.loads(line)["kind"] for line in schedule.splitlines())
    assert sum(drawn.values()) >= 5, drawn
    # every fault drawn was injected: none skipped, none lost
    assert report.metrics["faults_by_kind"] == dict(drawn), report.metrics
    assert report.metrics["faults_skipped"] == 0
    again = run_chaos(seed=4, seconds=20, candidates=3, out=tmp_path / "again", ttl=TTL,
                      dry_run=True, kinds=CLASSIC_KINDS)
    assert again.metrics["faults"] == len(schedule.splitlines())
    assert (tmp_path / "again" / "schedule.jsonl").read_text() == schedule


# The break is injected from outside the package (a sitecustomize on the candidates'
# PYTHONPATH), so nothing in electfsm can reach it: every third fenced write claims to have
# been accepted without being sent, a write the resource never saw.
_BROKEN_FENCED_WRITES = """
import itertools

from electfsm.chaos import fenced

_real_write = fenced.FencedClient.write
_calls = itertools.count(1)


def _write(self, **kwargs):
    if next(_calls) % 3 == 0:
        return True
    return _real_write(self, **kwargs)


fenced.FencedClient.write = _write
"""


def test_chaos_command_exits_1_when_a_candidate_breaks_a_property(tmp_path: Path) -> None:
    """``python -m electfsm.chaos`` is a gate: a run whose candidates claim fenced writes the
    resource never accepted reports P2 failed and exits 1."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "sitecustomize.py").write_text(textwrap.dedent(_BROKEN_FENCED_WRITES))
    path = [str(broken), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    out = tmp_path / "chaos"
    proc = subprocess.run(
        [sys.executable, "-m", "electfsm.chaos", "--seed", "4", "--minutes", "0.2",
         "--candidates", "2", "--ttl", str(TTL), "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=slack(240))
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    failed = {r["name"] for r in report["results"] if r["status"] == "fail"}
    assert "P2" in failed, report
    assert "VIOLATIONS" in proc.stdout, proc.stdout
