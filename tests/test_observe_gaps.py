"""observe across gaps in its watch stream, and the revision it stamps on what it reports.

A real etcd every time; gaps are made with the fault proxy (bytes thrown away, then every
connection reset) so observe has to read the election again and watch from there.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from electfsm import Elector, LeaderSeen
from electfsm.etcd import EtcdClient, Watch, prefix_end
from electfsm.events import Event, LeaderInfo
from electfsm.sources.campaign import is_candidate_key
from electfsm.sources.observe import Observer, leader_of
from electfsm.testing.faultproxy import FaultProxy
from electfsm.testing.local_etcd import LocalEtcd

WAIT = 30.0  # generous: the CI machine is small and shared


@pytest.fixture
def raw(etcd: LocalEtcd) -> Iterator[EtcdClient]:
    client = EtcdClient([etcd.endpoint], timeout=5)
    yield client
    client.close()


@pytest.fixture
def proxy(etcd: LocalEtcd) -> Iterator[FaultProxy]:
    with FaultProxy(etcd.endpoint) as p:
        yield p


def leader_seen_until(events: queue.Queue[Event], done: Callable[[LeaderSeen], bool],
                      timeout: float = WAIT) -> list[LeaderSeen]:
    """Every LeaderSeen up to the first one ``done`` accepts; fails the test if none does."""
    got: list[LeaderSeen] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            event = events.get(timeout=max(0.01, left))
        except queue.Empty:
            pytest.fail(f"no LeaderSeen matched within {timeout}s; saw {got}")
        if isinstance(event, LeaderSeen):
            got.append(event)
            if done(event):
                return got


def cut(proxy: FaultProxy, during: Callable[[], Any]) -> Any:
    """Run ``during`` while the proxy throws every byte away, then reset its connections:
    whatever etcd sent meanwhile is lost and every stream through the proxy fails."""
    proxy.blackhole()
    try:
        return during()
    finally:
        proxy.pass_through()
        proxy.reset()


@pytest.mark.parametrize("change", ["recreated", "new value", "new lease"])
def test_a_change_of_the_leader_made_during_a_watch_gap_is_reported(
        raw: EtcdClient, proxy: FaultProxy, election: str, change: str) -> None:
    """The read after a gap finds the same leader key, but not the same leader: a new
    incarnation (the leader resigned and won again alone), a new value or a new lease.
    Each is news; once the read saw the same key name and reported nothing, and followers
    kept the old fencing token."""
    lease, _ = raw.grant(60)
    other, _ = raw.grant(60)
    key = f"{election}/{lease:x}".encode()
    raw.put(key, b"node-1", lease=lease)
    events: queue.Queue[Event] = queue.Queue()
    client = EtcdClient([proxy.endpoint], timeout=2)
    observer = Observer(client, election, events.put, backoff_max=0.2)
    observer.start()
    try:
        old = leader_seen_until(events, lambda e: e.leader is not None)[-1].leader
        assert old is not None and old.key == key.decode()

        def write() -> int:
            if change == "recreated":
                raw.delete(key)
                return int(raw.put(key, b"node-1", lease=lease).header.revision)
            if change == "new value":
                raw.put(key, b"node-1 again", lease=lease)
            else:
                raw.put(key, b"node-1", lease=other)
            return old.create_revision

        created = cut(proxy, write)
        now = raw.range(key).kvs[0]
        want = LeaderInfo(identity=bytes(now.value).decode(), key=key.decode(),
                          create_revision=created, lease=int(now.lease),
                          value=bytes(now.value))
        assert want != old
        got = leader_seen_until(events, lambda e: e.leader == want)[-1]
        assert got.revision >= int(now.mod_revision)
    finally:
        observer.stop(5)
        client.close()
        raw.revoke(lease)
        raw.revoke(other)


def test_a_follower_hears_of_a_new_incarnation_of_the_leaders_key_after_a_stream_cut(
        raw: EtcdClient, proxy: FaultProxy, election: str) -> None:
    """A follower whose link broke while the leader resigned and won again alone (the
    follower's own key gone too, so nobody else was in line) must move to the new term:
    its ``leader`` carries the new fencing token and ``on_leader_change`` fires."""
    lease, _ = raw.grant(60)
    key = f"{election}/{lease:x}".encode()
    first = int(raw.put(key, b"leader", lease=lease).header.revision)
    changes: list[tuple[LeaderInfo | None, LeaderInfo | None]] = []
    follower = Elector(endpoints=[proxy.endpoint], election=election, identity="follower",
                       ttl=30, backoff_max=0.2)
    follower.on_leader_change(lambda old, new: changes.append((old, new)))
    with follower:
        assert follower.wait_until(lambda e: e.state == "follower" and e.leader is not None
                                   and e.leader.create_revision == first, timeout=WAIT)
        prefix = f"{election}/".encode()
        ours: list[bytes] = []
        deadline = time.monotonic() + WAIT
        while not ours and time.monotonic() < deadline:  # the follower's key, once in line
            ours = [bytes(kv.key) for kv in raw.range(prefix, prefix_end(prefix)).kvs
                    if bytes(kv.key) != key]
            time.sleep(0.05)
        assert len(ours) == 1, ours

        def resign_and_win_alone() -> int:
            raw.delete(key)
            raw.delete(ours[0])
            return int(raw.put(key, b"leader", lease=lease).header.revision)

        second = cut(proxy, resign_and_win_alone)
        assert follower.wait_until(lambda e: e.leader is not None
                                   and e.leader.create_revision == second, timeout=WAIT), \
            f"the follower still sees {follower.leader}"
        assert follower.leader is not None and follower.leader.token == second
        assert any(old is not None and new is not None and old.create_revision == first
                   and new.create_revision == second for old, new in changes), changes
        assert follower.wait_for("follower", timeout=WAIT), "it queued again behind the leader"
    raw.revoke(lease)


class _WritesBeforeWatching(EtcdClient):
    """A client that runs ``before_watch`` once, between observe's read and its watch: the
    watch then starts with a backlog (or from a revision compacted meanwhile)."""

    before_watch: Callable[[], None] | None = None

    def watch(self, key: bytes, range_end: bytes = b"", **kwargs: Any) -> Watch:
        hook, self.before_watch = self.before_watch, None
        if hook is not None:
            hook()
        return super().watch(key, range_end, **kwargs)


def test_leader_seen_is_stamped_with_the_revision_of_the_last_event_applied(
        make_etcd: Callable[..., LocalEtcd], election: str) -> None:
    """etcd sends a watch's backlog in responses of at most 1,000 revisions, each stamped
    with the store's current revision. A view built from the first one is that of its last
    event, not of the header: stamped with the header it claimed a leader at a revision
    where that leader was already gone (and the dispatcher trusts the stamp to tell a
    stale ``elected`` from a fresh one)."""
    server = make_etcd()
    raw = EtcdClient([server.endpoint], timeout=5)
    client = _WritesBeforeWatching([server.endpoint], timeout=5)
    prefix = f"{election}/".encode()
    leader = prefix + b"a"

    def backlog() -> None:
        raw.put(leader, b"proclaimed")  # a change of the leader in the first response
        for i in range(1100):  # nested election keys: in the watched prefix, not candidates
            raw.put(prefix + f"x/{i}".encode(), b"")
        deleted.append(int(raw.delete(leader).header.revision))  # later: nobody leads

    deleted: list[int] = []
    raw.put(leader, b"first")
    client.before_watch = backlog
    events: queue.Queue[Event] = queue.Queue()
    observer = Observer(client, election, events.put, backoff_max=0.2)
    observer.start()
    try:
        seen = leader_seen_until(events, lambda e: e.leader is None)
        assert any(e.leader is not None and e.leader.value == b"proclaimed" for e in seen), \
            seen
        assert seen[-1].revision == deleted[0], "a delete is stamped with its own revision"
        for event in seen:  # each view is etcd's at the revision it is stamped with
            resp = raw.range(prefix, prefix_end(prefix), revision=event.revision)
            truth = leader_of({bytes(kv.key): kv for kv in resp.kvs
                               if is_candidate_key(prefix, bytes(kv.key))})
            assert event.leader == truth, (event, truth)
    finally:
        observer.stop(5)
        client.close()
        raw.close()


def test_a_new_incarnation_of_the_leaders_key_hidden_by_a_compaction_is_reported(
        make_etcd: Callable[..., LocalEtcd], election: str) -> None:
    """The other kind of gap: the revisions after observe's read are compacted before its
    watch starts, so etcd cancels the watch and observe reads again. That read finds the
    leader's key re-created (a new fencing token): it must be reported."""
    server = make_etcd()
    raw = EtcdClient([server.endpoint], timeout=5)
    client = _WritesBeforeWatching([server.endpoint], timeout=5)
    key = f"{election}/1".encode()
    first = int(raw.put(key, b"leader").header.revision)
    recreated: list[int] = []

    def resign_win_again_and_compact() -> None:
        raw.delete(key)
        recreated.append(int(raw.put(key, b"leader").header.revision))
        raw.compact(recreated[0])

    client.before_watch = resign_win_again_and_compact
    events: queue.Queue[Event] = queue.Queue()
    observer = Observer(client, election, events.put, backoff_max=0.2)
    observer.start()
    try:
        seen = leader_seen_until(events, lambda e: e.leader is not None
                                 and e.leader.create_revision != first)
        assert seen[0].leader is not None and seen[0].leader.create_revision == first
        assert seen[-1].leader is not None and seen[-1].leader.create_revision == recreated[0]
    finally:
        observer.stop(5)
        client.close()
        raw.close()
