"""electfsm.testing.LocalCluster: three real etcd members on loopback."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from scenario_kit import eventually, slack

from electfsm.errors import EtcdError, EtcdUnavailable
from electfsm.etcd import EtcdClient
from electfsm.testing.cluster import LocalCluster
from electfsm.testing.local_etcd import LocalEtcd
from electfsm.testing.pki import make_test_pki


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(3) as c:
        pids = [m.pid for m in c.members]
        yield c
    assert not any(pid is not None and pid_exists(pid) for pid in pids)


@pytest.fixture
def client() -> Iterator[Callable[..., EtcdClient]]:
    made: list[EtcdClient] = []

    def make(member: LocalEtcd, timeout: float = 2.0) -> EtcdClient:
        c = EtcdClient([member.endpoint], timeout=timeout)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def key() -> bytes:
    return f"cluster/{uuid.uuid4().hex}".encode()


def test_three_members_elect_a_leader_and_share_writes(
        cluster: LocalCluster, client: Callable[..., EtcdClient]) -> None:
    assert len(cluster.members) == 3 and len(set(cluster.endpoints)) == 3
    assert all(e.startswith("127.0.0.1:") for e in cluster.endpoints)
    leader = cluster.leader_index()
    assert leader is not None
    statuses = [client(m).status() for m in cluster.members]
    assert len({s.header.member_id for s in statuses}) == 3
    assert {s.leader for s in statuses} == {statuses[leader].header.member_id}
    k = key()
    client(cluster.members[0]).put(k, b"from member 0")
    assert client(cluster.members[2]).range(k).kvs[0].value == b"from member 0"


def test_killing_the_leader_leaves_two_that_elect_a_new_one(
        cluster: LocalCluster, client: Callable[..., EtcdClient]) -> None:
    old = cluster.leader_index()
    assert old is not None
    cluster.members[old].kill()
    started = time.monotonic()
    new = cluster.wait_for_leader(5)
    assert new != old and time.monotonic() - started < 5
    survivors = [m for i, m in enumerate(cluster.members) if i != old]
    k = key()
    client(survivors[0]).put(k, b"after failover")
    assert client(survivors[1]).range(k).kvs[0].value == b"after failover"


def test_a_killed_member_restarts_and_catches_up(
        cluster: LocalCluster, client: Callable[..., EtcdClient]) -> None:
    leader = cluster.leader_index()
    assert leader is not None
    victim_index = next(i for i in range(3) if i != leader)
    victim = cluster.members[victim_index]
    endpoint, data_dir, pid = victim.endpoint, victim.data_dir, victim.pid
    victim.kill()
    assert victim.pid is None and pid is not None and not pid_exists(pid)
    k = key()
    client(cluster.members[leader]).put(k, b"written while it was down")
    victim.restart()
    assert victim.endpoint == endpoint and victim.data_dir == data_dir
    # a linearizable read on the restarted member: it has applied everything up to now
    assert client(victim).range(k).kvs[0].value == b"written while it was down"
    assert cluster.leader_index() is not None


def test_pausing_two_of_three_loses_quorum_until_they_resume(
        cluster: LocalCluster, client: Callable[..., EtcdClient]) -> None:
    leader = cluster.leader_index()
    assert leader is not None
    paused = [m for i, m in enumerate(cluster.members) if i != leader]
    writer = client(cluster.members[leader], timeout=1.0)
    k = key()
    writer.put(k, b"before")
    for m in paused:
        m.pause()
    try:
        started = time.monotonic()
        # timed out by the client, or by etcd itself a moment before ("context deadline"
        # or "etcdserver: request timed out", when the proposal's deadline passes first)
        with pytest.raises(EtcdError, match=r"within 1\.0s|deadline|request timed out") as err:
            writer.put(k, b"without quorum")
        assert "cannot reach" not in str(err.value)  # it did answer: no "is etcd running?"
        assert 0.9 <= time.monotonic() - started < slack(3)
    finally:
        for m in paused:
            m.resume()
    eventually(lambda: writer.put(k, b"after"))
    assert client(paused[0]).range(k).kvs[0].value == b"after"


def test_a_write_etcd_cannot_commit_is_reported_as_lost_quorum_not_as_unreachable(
        cluster: LocalCluster, client: Callable[..., EtcdClient]) -> None:
    """With a client deadline longer than etcd's own request timeout (5 s + 2 election
    timeouts), the leader answers "etcdserver: request timed out" itself: the error says the
    cluster may lack quorum, not that etcd is unreachable or not running."""
    leader = cluster.leader_index()
    assert leader is not None
    paused = [m for i, m in enumerate(cluster.members) if i != leader]
    writer = client(cluster.members[leader], timeout=15.0)
    k = key()
    writer.put(k, b"before")
    for m in paused:
        m.pause()
    try:
        with pytest.raises(EtcdUnavailable, match=r"could not serve it \(etcdserver: request "
                                                  r"timed out\); the cluster may be without "
                                                  r"a leader or quorum"):
            writer.put(k, b"without quorum")
    finally:
        for m in paused:
            m.resume()
    eventually(lambda: writer.put(k, b"after"))


def test_stop_removes_every_process_and_temp_dir_and_data_root_keeps_data(
        tmp_path: Path, client: Callable[..., EtcdClient]) -> None:
    temp = LocalCluster(3).start()
    pids = [m.pid for m in temp.members]
    dirs = [Path(m.data_dir).parent for m in temp.members if m.data_dir is not None]
    assert len(dirs) == 3 and all(d.is_dir() for d in dirs)
    temp.members[0].pause()  # a paused member is stopped too
    started = time.monotonic()
    temp.stop()
    assert time.monotonic() - started < 4
    assert not any(pid is not None and pid_exists(pid) for pid in pids)
    assert not any(d.exists() for d in dirs)
    temp.stop()  # idempotent

    kept = LocalCluster(3, data_root=str(tmp_path))
    try:
        kept.start()
        k = key()
        client(kept.members[1]).put(k, b"durable")
        kept.stop()
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "electfsm-0", "electfsm-0.log", "electfsm-1", "electfsm-1.log",
            "electfsm-2", "electfsm-2.log"]
        kept.start()
        assert eventually(lambda: client(kept.members[2]).range(k)).kvs[0].value == b"durable"
    finally:
        kept.stop()


def test_a_tls_cluster_serves_https_and_finds_its_leader(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path)
    with LocalCluster(3, tls=pki.server_tls(client_cert_auth=True)) as tls_cluster:
        assert all(m.client_url.startswith("https://127.0.0.1:") for m in tls_cluster.members)
        assert tls_cluster.leader_index() is not None
        member = tls_cluster.members[1]
        secure = EtcdClient([member.endpoint], timeout=2,
                            credentials=pki.client_tls().credentials())
        try:
            assert secure.status().leader
        finally:
            secure.close()
