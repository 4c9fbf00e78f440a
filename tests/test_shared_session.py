"""Many elections on one session (one lease), on a real etcd."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest
from elector_kit import wait

from electfsm import Elector, Session, Term, clock
from electfsm.etcd import EtcdClient, prefix_end
from electfsm.testing.faultproxy import FaultProxy
from electfsm.testing.local_etcd import LocalEtcd

N = 10






def leases_of(client: EtcdClient, prefix: str) -> dict[str, int]:
    p = prefix.encode()
    return {bytes(kv.key).decode(): int(kv.lease)
            for kv in client.range(p, prefix_end(p)).kvs}


def shard_electors(session: Session, election: str, n: int = N) -> list[Elector]:
    return [Elector(session=session, election=f"{election}/shard-{i}", identity="node-a")
            for i in range(n)]


def test_many_elections_lead_on_one_lease(etcd: LocalEtcd, election: str,
                                          raw: EtcdClient) -> None:
    with Session(endpoints=[etcd.endpoint], ttl=2) as session:
        electors = shard_electors(session, election)
        for e in electors:
            e.start()
        assert wait(lambda: all(e.state == "leader" for e in electors))
        keys = leases_of(raw, election + "/")
        assert len(keys) == N and set(keys.values()) == {session.lease}
        assert {e.term.lease for e in electors} == {session.lease}  # type: ignore[union-attr]
        threads = [t.name for t in threading.enumerate() if election in t.name]
        assert len(threads) <= 3 * N, threads
    assert leases_of(raw, election + "/") == {}


def test_stopping_one_elector_leaves_the_others_leading(etcd: LocalEtcd, election: str,
                                                        raw: EtcdClient) -> None:
    with Session(endpoints=[etcd.endpoint], ttl=2) as session:
        electors = shard_electors(session, election, 3)
        for e in electors:
            e.start()
        assert wait(lambda: all(e.state == "leader" for e in electors))
        gone = electors[0]
        gone_key = gone.term.key  # type: ignore[union-attr]
        gone.stop()
        keys = leases_of(raw, election + "/")
        assert gone_key not in keys and len(keys) == 2, "its key was deleted, not the lease"
        assert all(e.state == "leader" and e.is_leader for e in electors[1:])
        assert raw.time_to_live(session.lease).TTL > 0
        assert not [t for t in threading.enumerate() if gone.config.election + "]" in t.name]


def test_stopping_the_session_stops_every_elector_and_revokes_the_lease_once(
        etcd: LocalEtcd, election: str, raw: EtcdClient,
        monkeypatch: pytest.MonkeyPatch) -> None:
    revokes: list[int] = []
    session = Session(endpoints=[etcd.endpoint], ttl=2)
    revoke = session.client.revoke

    def counting(lease: int, **kw: object) -> None:
        revokes.append(lease)
        revoke(lease, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(session.client, "revoke", counting)
    exits: list[int] = []
    electors = shard_electors(session, election, 5)
    for e in electors:
        e.on_exit_leader(lambda term: exits.append(term.token))
        e.start()
    assert wait(lambda: all(e.state == "leader" for e in electors))
    lease = session.lease
    session.stop()
    assert all(e.state == "disconnected" for e in electors)
    assert len(exits) == 5
    assert revokes == [lease]
    assert raw.time_to_live(lease).TTL == -1
    assert leases_of(raw, election + "/") == {}
    assert not [t for t in threading.enumerate() if election in t.name]


def test_a_blackholed_session_steps_every_elector_down_before_etcd_expires_the_lease(
        etcd: LocalEtcd, election: str, raw: EtcdClient) -> None:
    proxy = FaultProxy(etcd.endpoint).start()
    stepped: dict[str, float] = {}
    deleted: dict[str, float] = {}
    prefix = (election + "/").encode()
    watch = raw.watch(prefix, prefix_end(prefix), no_put=True)

    def record_deletes() -> None:
        for resp in watch:
            for ev in resp.events:
                deleted.setdefault(bytes(ev.kv.key).decode(), clock.now())

    threading.Thread(target=record_deletes, daemon=True).start()
    session = Session(endpoints=[proxy.endpoint], ttl=2, call_timeout=0.5)
    try:
        electors = shard_electors(session, election, 5)
        for e in electors:
            e.on_exit_leader(lambda term: stepped.setdefault(term.key, clock.now()))
            e.start()
        assert wait(lambda: all(e.state == "leader" for e in electors))
        proxy.blackhole()
        assert wait(lambda: len(deleted) == 5, 15), "etcd expired the lease"
        assert set(stepped) == set(deleted)
        assert all(stepped[k] < deleted[k] for k in deleted), (stepped, deleted)
        assert len({round(t, 1) for t in stepped.values()}) <= 2, "one deadline for all"
        proxy.pass_through()
        assert wait(lambda: all(e.state == "leader" for e in electors), 15)
        assert len({e.term.lease for e in electors}) == 1  # type: ignore[union-attr]
    finally:
        watch.cancel()
        session.stop()
        proxy.stop()


SCRIPT = textwrap.dedent("""
    import sys, time
    from electfsm import Elector, Session
    endpoint, election, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    session = Session(endpoints=[endpoint], ttl=2).start()
    electors = [Elector(session=session, election=f"{election}/shard-{i}", identity="killed")
                for i in range(n)]
    for e in electors:
        e.start()
    while not all(e.state == "leader" for e in electors):
        time.sleep(0.01)
    print("leading", flush=True)
    time.sleep(600)
""")


def test_sigkill_of_a_process_leading_every_shard_hands_all_of_them_over(
        etcd: LocalEtcd, election: str, raw: EtcdClient) -> None:
    n = 20
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, etcd.endpoint, election, str(n)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "leading"
        with Session(endpoints=[etcd.endpoint], ttl=2) as session:
            led: dict[str, float] = {}
            electors = [Elector(session=session, election=f"{election}/shard-{i}",
                                identity="survivor") for i in range(n)]
            for e in electors:
                e.on_enter_leader(
                    lambda term: led.setdefault(term.election, clock.now()))
                e.start()
            assert wait(lambda: all(e.state == "follower" for e in electors))
            killed = clock.now()
            proc.kill()
            proc.wait()
            assert wait(lambda: len(led) == n, 15)
            slowest = max(led.values()) - killed
            assert slowest < 2 + 5, f"every shard had a new leader, the last after {slowest}s"
    finally:
        proc.kill()
        proc.wait()


def test_an_elector_cannot_bring_its_own_connection_to_a_session(etcd: LocalEtcd) -> None:
    from electfsm import ConfigError

    with Session(endpoints=[etcd.endpoint], ttl=2) as session, pytest.raises(
            ConfigError, match="session"):
        Elector(session=session, election="x", identity="a", endpoints=[etcd.endpoint])


def test_terms_on_a_shared_session_carry_the_sessions_lease(etcd: LocalEtcd,
                                                            election: str) -> None:
    seen: list[Term] = []
    with Session(endpoints=[etcd.endpoint], ttl=2) as session:
        e = Elector(session=session, election=election, identity="a")
        e.on_enter_leader(seen.append)
        e.start()
        assert e.wait_for("leader", timeout=10)
        assert seen[0].lease == session.lease and e.ttl == session.ttl


def test_two_electors_of_one_election_on_one_session_are_refused(
        etcd: LocalEtcd, election: str) -> None:
    """Both would campaign with the key <election>/<lease>: one key, two "leaders" on the
    same token. The second is refused; once the first is stopped, another may join."""
    from electfsm import ConfigError

    with Session(endpoints=[etcd.endpoint], ttl=5) as session:
        first = Elector(session=session, election=election, identity="a").start()
        with pytest.raises(ConfigError, match="already has an elector of election"):
            Elector(session=session, election=election, identity="b")
        assert first.wait_for("leader", timeout=10)
        first.stop()
        again = Elector(session=session, election=election, identity="b").start()
        assert again.wait_for("leader", timeout=10)


def test_stop_without_revoke_on_a_shared_session_still_releases_the_election(
        etcd: LocalEtcd, election: str, raw: EtcdClient) -> None:
    """The session's lease lives on for its other electors: a key left on it would hold the
    election forever with nobody leading. stop(revoke=False) of one elector deletes its key;
    the other candidate leads at once, not never."""
    b = Elector(endpoints=[etcd.endpoint], election=election, identity="b", ttl=5)
    with Session(endpoints=[etcd.endpoint], ttl=5) as session:
        other = Elector(session=session, election=election + "-other", identity="a").start()
        a = Elector(session=session, election=election, identity="a").start()
        try:
            assert a.wait_for("leader", timeout=10)
            b.start()
            assert b.wait_for("follower", timeout=10)
            a.stop(revoke=False)
            assert b.wait_for("leader", timeout=3), "the stopped elector's key still holds it"
            assert other.is_leader, "the session's other election goes on"
        finally:
            b.stop()
