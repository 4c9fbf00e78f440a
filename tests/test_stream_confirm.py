"""No phantom leadership, whichever way a term is confirmed: by the election's ordered event
stream (observe's view) or by the campaign's read. Real etcd every time.

Each test records every leader entry of its electors (an ``on_enter_leader`` hook reads the
dispatcher's confirming revision, the view it had and the path that confirmed: "by a read" or
"by the election's event stream") and checks it against etcd's own history of the election,
recorded by a raw watch that started before anything happened (so a later compaction hides
nothing): at the confirming revision our key — this incarnation, this lease — existed and was
first, and its delete was not at or before any revision the elector had seen when it entered.

Which path confirmed a term is the ``elected`` transition's reason (the dispatcher logs it, and
the hook reads it): "... by a read" (campaign) or "... by the election's event stream"
(observe's view, including the view of observe's own read after a break).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest
from etcd3 import etcdrpc
from scenario_kit import TTL, poll, slack

from electfsm import Elector, Term
from electfsm.etcd import EtcdClient, prefix_end
from electfsm.events import ErrorReported, Event, LeaderSeen
from electfsm.sources.campaign import is_candidate_key
from electfsm.sources.observe import Subscription
from electfsm.testing.cluster import LocalCluster
from electfsm.testing.faultproxy import FaultProxy
from electfsm.testing.local_etcd import LocalEtcd

#: the dispatcher's reason for ``elected`` ends with the path that confirmed the term
BY_READ = "by a read"
BY_STREAM = "by the election's event stream"


# ---------------------------------------------------------------- what etcd says happened
class History:
    """The election's candidate keys as etcd changed them: a read at ``start``, then every
    event of a raw prefix watch from ``start + 1``, kept in memory as it arrives."""

    def __init__(self, client: EtcdClient, election: str) -> None:
        self._client = client
        self.prefix = (election + "/").encode()
        end = prefix_end(self.prefix)
        resp = client.range(self.prefix, end)
        self.start = int(resp.header.revision)
        self._initial = {bytes(kv.key): (int(kv.create_revision), int(kv.lease))
                         for kv in resp.kvs if is_candidate_key(self.prefix, bytes(kv.key))}
        #: (revision, key, create revision (0 for a delete), lease), in etcd's order
        self.events: list[tuple[int, bytes, int, int]] = []
        #: revision -> time.monotonic() when this watch received it (etcd had committed it)
        self.received: dict[int, float] = {}
        self._seen = self.start
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._watch = client.watch(self.prefix, end, start_revision=self.start + 1)
        self._thread = threading.Thread(target=self._run, daemon=True, name="test-history")
        self._thread.start()

    def _run(self) -> None:
        try:
            for wresp in self._watch:
                now = time.monotonic()
                with self._cond:
                    for ev in wresp.events:
                        self.received.setdefault(int(ev.kv.mod_revision), now)
                        key = bytes(ev.kv.key)
                        if is_candidate_key(self.prefix, key):
                            self.events.append((int(ev.kv.mod_revision), key,
                                                int(ev.kv.create_revision), int(ev.kv.lease)))
                        self._seen = max(self._seen, int(ev.kv.mod_revision))
                    self._cond.notify_all()
        except BaseException as exc:  # the test fails on it in settle()
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def close(self) -> None:
        self._watch.cancel()

    def settle(self, revision: int) -> None:
        """Wait until every event up to ``revision`` is recorded: a marker key (in the
        prefix, not a candidate) written now has a later revision; wait for its event."""
        marker = int(self._client.put(self.prefix + b"history-marker", b"").header.revision)
        assert marker >= revision
        deadline = time.monotonic() + slack(10)
        with self._cond:
            while self._seen < marker and self._error is None:
                left = deadline - time.monotonic()
                assert left > 0, f"the history watch did not reach revision {marker}"
                self._cond.wait(left)
            assert self._error is None, f"the history watch failed: {self._error!r}"

    def first_at(self, revision: int) -> tuple[str, int, int] | None:
        """(key, create revision, lease) of the first candidate at ``revision``."""
        assert revision >= self.start, f"revision {revision} is before the history's start"
        keys = dict(self._initial)
        with self._cond:
            events = list(self.events)
        for rev, key, create, lease in events:
            if rev > revision:
                break
            if create:
                keys[key] = (create, lease)
            else:
                keys.pop(key, None)
        if not keys:
            return None
        key = min(keys, key=lambda k: keys[k][0])
        return key.decode(), keys[key][0], keys[key][1]

    def deleted(self, key: str, create_revision: int) -> int | None:
        """The revision that deleted the incarnation of ``key`` created at that revision."""
        with self._cond:
            events = list(self.events)
        for rev, k, create, _ in events:
            if k == key.encode() and rev > create_revision and not create:
                return rev
        return None

    def created(self, key: str, after: int) -> int:
        """The create revision of the first incarnation of ``key`` created after ``after``."""
        with self._cond:
            events = list(self.events)
        for rev, k, create, _ in events:
            if k == key.encode() and create == rev and rev > after:
                return rev
        raise AssertionError(f"no incarnation of {key} created after revision {after}")


# ---------------------------------------------------------------- what the electors did
@attrs.frozen(kw_only=True)
class Entry:
    """One entry into leader, as the elector saw it when its first hook ran."""

    identity: str
    key: str
    token: int
    lease: int
    revision: int  # the revision at which the confirmation showed our key first
    observed: int  # the newest revision of observe's view the dispatcher had applied
    how: str  # the elected transition's reason: ends with BY_READ or BY_STREAM
    at: float  # time.monotonic() in the hook

    @property
    def by(self) -> str:
        return BY_READ if self.how.endswith(BY_READ) else BY_STREAM


class Terms:
    """Every leader entry and exit of the electors it watches, from their hooks."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.exits: dict[tuple[str, int], float] = {}

    def watch(self, e: Elector) -> None:
        d = e._dispatcher

        def entered(term: Term) -> None:  # on the dispatcher's thread: its fields are still
            self.entries.append(Entry(  # those of the elected transition
                identity=term.identity, key=term.key, token=term.token, lease=term.lease,
                revision=d._elected_revision, observed=d.observed_revision, how=d._reason,
                at=time.monotonic()))

        def left(term: Term) -> None:
            self.exits[(term.identity, term.token)] = time.monotonic()

        e.on_enter_leader(entered)
        e.on_exit_leader(left)

    def of(self, identity: str) -> list[Entry]:
        return [t for t in self.entries if t.identity == identity]

    def assert_one_at_a_time(self) -> None:
        """Every term's exit hook ran before the next term's entry hook (in this process)."""
        spans = sorted(self.entries, key=lambda t: t.at)
        for t, nxt in itertools.pairwise(spans):
            end = self.exits.get((t.identity, t.token), float("inf"))
            assert end <= nxt.at, (f"{t.identity}'s term {t.token} still ran when "
                                   f"{nxt.identity}'s term {nxt.token} began")


def assert_tokens_grow(terms: Terms) -> None:
    """Each elector's terms have strictly growing fencing tokens: a key incarnation that led
    once never leads again."""
    for identity in {t.identity for t in terms.entries}:
        tokens = [t.token for t in terms.of(identity)]
        assert all(x < y for x, y in itertools.pairwise(tokens)), (
            f"{identity} led terms with tokens {tokens}: not strictly growing")


def assert_no_phantom(terms: Terms, history: History) -> None:
    """Each entry's key (this incarnation, this lease) was first at its confirming revision,
    was not deleted at or before any revision the elector knew of when it entered, and was
    not already deleted in etcd (the history had received that delete) when it entered."""
    assert terms.entries, "nobody led: nothing was checked"
    for t in terms.entries:
        knew = max(t.revision, t.observed)
        history.settle(knew)
        first = history.first_at(t.revision)
        assert first == (t.key, t.token, t.lease), (
            f"{t.identity} entered leader on {t.key} (token {t.token}, lease {t.lease:x}) "
            f"{t.by} at revision {t.revision}, but etcd shows {first} first there")
        gone = history.deleted(t.key, t.token)
        assert gone is None or gone > knew, (
            f"{t.identity} entered leader on {t.key} (token {t.token}) having seen revision "
            f"{knew}, but that key was deleted at revision {gone}")
        if gone is not None:
            late = t.at - history.received[gone]
            assert late < 0, (
                f"{t.identity} entered leader on {t.key} (token {t.token}) {t.by} at revision "
                f"{t.revision}, {late:.3f}s after etcd had deleted that key (revision {gone})")


def candidates(client: EtcdClient, election: str) -> list[Any]:
    prefix = (election + "/").encode()
    return [kv for kv in client.range(prefix, prefix_end(prefix)).kvs
            if is_candidate_key(prefix, bytes(kv.key))]


class Gate:
    """Holds an elector's observe reports (its thread blocks in ``emit``) while closed: the
    report in hand reaches the dispatcher only when the gate opens, stale by then."""

    def __init__(self, e: Elector) -> None:
        self.open = threading.Event()
        self.open.set()
        self.held = threading.Event()  # a report is waiting at the closed gate
        put = e._queue.put

        def emit(event: Event) -> None:
            if isinstance(event, LeaderSeen) and not self.open.is_set():
                self.held.set()
                self.open.wait()
            put(event)

        e._observer._emit = emit  # type: ignore[attr-defined]  # before start: subscribes it


@pytest.fixture
def server(make_etcd: Callable[..., LocalEtcd]) -> LocalEtcd:
    """A server of the test's own: compaction and pauses stay out of the others' way."""
    return make_etcd()


@pytest.fixture
def client(server: LocalEtcd) -> Iterator[EtcdClient]:
    c = EtcdClient([server.endpoint], timeout=5)
    yield c
    c.close()


@pytest.fixture
def electors() -> Iterator[Callable[..., Elector]]:
    """``electors(identity, endpoints, **kwargs)``: an unstarted elector, stopped at the end."""
    made: list[Elector] = []

    def make(identity: str, endpoints: list[str], election: str, **kwargs: Any) -> Elector:
        kwargs.setdefault("ttl", TTL)
        kwargs.setdefault("backoff_max", 0.2)
        e = Elector(endpoints=endpoints, election=election, identity=identity, **kwargs)
        made.append(e)
        return e

    yield make
    for e in reversed(made):
        e.stop()


def lead_then_queue(a: Elector, b: Elector, client: EtcdClient, election: str) -> None:
    """Start ``a`` until it leads, then ``b`` until its key waits behind ``a``'s."""
    a.start()
    assert a.wait_for("leader", timeout=slack(10)), "A never led"
    b.start()
    poll(lambda: len(candidates(client, election)) == 2, 10, "B's key in line behind A's")
    assert b.wait_for("follower", timeout=slack(10)), "B never followed A"


# ---------------------------------------------------------------- 1. a compacted gap
def test_after_a_compacted_stream_gap_the_successor_leads_once_from_observes_read(
        server: LocalEtcd, client: EtcdClient, election: str,
        electors: Callable[..., Elector]) -> None:
    """B waits behind A. B's event stream (alone: its campaign and session go direct) is cut;
    meanwhile revisions happen, A resigns and queues again, and etcd is compacted past all
    of it. While B hears nothing of the election it does not lead: a follower's campaign
    does not watch the line, the stream does (and without it nothing shows B first). When
    its stream comes back across the compacted gap, observe reads the election afresh: that
    read shows B first, and B leads exactly once, at that read's revision.

    An observe that resumed its pre-gap view instead (watching on from where it stopped, from
    the compaction's revision once told it is gone) misses A's delete, reports A's new
    incarnation first, and B never leads."""
    history = History(client, election)
    terms = Terms()
    with FaultProxy(server.endpoint) as proxy:
        stream = EtcdClient([proxy.endpoint], timeout=1)
        try:
            a = electors("node-a", [server.endpoint], election)
            b = electors("node-b", [server.endpoint], election)
            # B's observe alone through the proxy (replacing it before start subscribes it)
            b._observer = Subscription(stream, election, b._queue.put, 0.2)
            terms.watch(a)
            terms.watch(b)
            lead_then_queue(a, b, client, election)
            a_key = terms.of("node-a")[0].key

            proxy.blackhole()  # B's stream hears nothing more (the proxy's bytes are dropped)
            for i in range(20):  # revisions B's stream misses (in the prefix, not candidates)
                client.put(history.prefix + f"noise/{i}".encode(), b"x" * 100)
            a.resign()  # returns once applied; A's campaign deletes the key just after
            a_token = terms.of("node-a")[0].token
            poll(lambda: history.deleted(a_key, a_token) is not None, 10,
                 "A's key deleted by its resign")
            poll(lambda: len(candidates(client, election)) == 2, 10, "A queued again behind B")
            assert not b.wait_for("leader", timeout=slack(0.5)), (
                "B led with no view showing it first")
            compacted = int(client.range(b"\0").header.revision)
            client.compact(compacted)
            proxy.pass_through()
            proxy.reset()

            assert b.wait_for("leader", timeout=slack(10)), "B never led once its stream came back"
            d = b._dispatcher
            poll(lambda: d.observed_revision >= compacted and d.observed is not None
                 and d.observed.key == terms.of("node-b")[0].key, 15,
                 "B's stream shows B leading after the gap")
            time.sleep(slack(0.3))  # anything late from the stream has arrived by now
            assert b.state == "leader" and b.leader is not None
            [entry] = terms.of("node-b")
            assert entry.by == BY_STREAM, entry
            assert entry.revision >= compacted, (entry, compacted)
            assert b.term is not None and b.term.token == entry.token
            assert len(terms.of("node-a")) == 1
            terms.assert_one_at_a_time()
            assert_no_phantom(terms, history)
            assert_tokens_grow(terms)
        finally:
            history.close()
            stream.close()


# ---------------------------------------------------------------- 2. our key deleted first
@pytest.mark.parametrize("deletes", ["one txn", "two calls"])
def test_our_key_deleted_just_before_the_predecessors_never_leads_on_the_dead_key(
        etcd: LocalEtcd, election: str, electors: Callable[..., Elector], deletes: str) -> None:
    """B waits behind A (a raw key). B's key is deleted by hand, then A's: in one txn (one
    revision, both deletes in one watch response) or in two calls in quick succession. B's
    stream and its campaign's read both see B's key gone: B must not lead on it, but
    campaign again with a new incarnation and lead on that one only (its token)."""
    client = EtcdClient([etcd.endpoint], timeout=5)
    history = History(client, election)
    terms = Terms()
    lease, _ = client.grant(60)
    try:
        a_key = f"{election}/{lease:x}".encode()
        client.put(a_key, b"node-a", lease=lease)
        b = electors("node-b", [etcd.endpoint], election)
        terms.watch(b)
        b.start()
        poll(lambda: len(candidates(client, election)) == 2, 10, "B's key in line behind A's")
        assert b.wait_for("follower", timeout=slack(10)), "B never followed A"
        [b_kv] = [kv for kv in candidates(client, election) if bytes(kv.key) != a_key]
        b_key, old_token = bytes(b_kv.key), int(b_kv.create_revision)

        if deletes == "one txn":
            gone = int(client.txn([], [delete_op(b_key), delete_op(a_key)]).header.revision)
        else:
            client.delete(b_key)
            gone = int(client.delete(a_key).header.revision)

        assert b.wait_for("leader", timeout=slack(10)), "B never led on a new key"
        time.sleep(slack(0.3))  # a second entry, if any, has happened by now
        assert_no_phantom(terms, history)
        assert_tokens_grow(terms)
        [entry] = terms.of("node-b")
        # The stream reports B's key gone at once: B may put its new key before A's delete
        # (two calls) or after it (one txn); either way it leads on the new one, after A went.
        new_token = history.created(b_key.decode(), after=old_token)
        assert entry.key == b_key.decode() and entry.token == new_token > old_token, entry
        assert entry.revision >= max(new_token, gone), entry
        assert b.term is not None and b.term.token == new_token
    finally:
        history.close()
        client.revoke(lease)
        client.close()


def delete_op(key: bytes) -> Any:
    return etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=key))


# ---------------------------------------------------------------- 3. the stream's member cut off
def test_a_member_cut_off_from_quorum_never_elects_from_its_stale_stream(
        election: str, electors: Callable[..., Elector]) -> None:
    """Three members; A, then B, then C in line. B talks to one member only, and that member
    is paused (SIGSTOP) while A resigns in the majority: B's key is first there until B's
    lease expires, then C leads. Resumed, the member replays the backlog on B's event stream,
    beginning with the view in which B's old key is first (true at A's delete, stale now):
    B must not lead from it — its lease is gone and C leads — and after the heal there is one
    term at a time, B following C.

    The hardest order is made certain: B's stream has a client of its own, straight to the
    member, and B's other calls (session, campaign) pass a fault proxy that stays dark until
    the stale view has reached B. (With one client, B's calls time out during the pause, the
    client rebuilds its channel and the stream ends: observe reads afresh and never sees the
    backlog; and the keepalive's "lease gone" can beat the backlog after the resume.) What
    stands between B and a phantom term is then its session's local deadline alone."""
    with LocalCluster(3) as cluster:
        raft = cluster.wait_for_leader()
        b_member = cluster.members[(raft + 1) % 3]  # a raft follower: the majority keeps its leader
        majority = [m.endpoint for m in cluster.members if m is not b_member]
        client = EtcdClient(majority, timeout=5)
        stream = EtcdClient([b_member.endpoint], timeout=2)
        proxy = FaultProxy(b_member.endpoint).start()
        history = History(client, election)
        terms = Terms()
        a = electors("node-a", [majority[0]], election)
        b = electors("node-b", [proxy.endpoint], election, call_timeout=0.5)
        c = electors("node-c", [majority[1]], election)
        try:
            views: list[LeaderSeen] = []

            def b_view(event: Event) -> None:
                if isinstance(event, LeaderSeen):
                    views.append(event)
                b._queue.put(event)

            b._observer = Subscription(stream, election, b_view, 0.2)
            for e in (a, b, c):
                terms.watch(e)
            lead_then_queue(a, b, client, election)
            c.start()
            poll(lambda: len(candidates(client, election)) == 3, 10, "C's key in line")
            assert c.wait_for("follower", timeout=slack(10))
            [a_entry] = terms.of("node-a")
            [b_old] = [kv for kv in candidates(client, election) if bytes(kv.value) == b"node-b"]
            b_key, b_token = bytes(b_old.key).decode(), int(b_old.create_revision)

            proxy.blackhole()
            b_member.pause()
            try:
                try:
                    a.resign()
                    assert c.wait_for("leader", timeout=TTL + slack(5)), "C never led"
                    time.sleep(slack(0.5))
                finally:
                    b_member.resume()
                history.settle(0)
                a_gone = history.deleted(a_entry.key, a_entry.token)
                assert a_gone is not None and history.first_at(a_gone) == (
                    b_key, b_token, int(b_old.lease))
                # the hazard: B's stream delivers the view of A's delete, B's old key first
                poll(lambda: any(v.revision == a_gone and v.leader is not None
                                 and v.leader.key == b_key
                                 and v.leader.create_revision == b_token for v in views),
                     10, "B's stream replays the stale view")
                time.sleep(slack(0.3))  # B's dispatcher has applied it
            finally:
                proxy.pass_through()
                proxy.reset()
            c_term = c.term
            assert c_term is not None
            # B's view converges on C (B queued again with a new lease, behind C)
            poll(lambda: b.leader is not None and b.leader.key == c_term.key
                 and b.state == "follower", 15, "B follows C after the heal")
            time.sleep(slack(0.3))
            assert_no_phantom(terms, history)
            assert_tokens_grow(terms)
            terms.assert_one_at_a_time()
            assert terms.of("node-b") == [], terms.of("node-b")
            [c_entry] = terms.of("node-c")
            assert c_entry.token == c_term.token
            b_gone = history.deleted(b_key, b_token)  # B's old lease expired in the majority
            assert b_gone is not None and c_entry.revision >= b_gone > a_gone, c_entry
        finally:
            for e in (c, b, a):  # while the cluster runs
                e.stop()
            proxy.stop()
            history.close()
            stream.close()
            client.close()


# ---------------------------------------------------------------- 4. the read path
def test_a_term_confirmed_by_the_read_before_any_view_is_no_phantom(
        etcd: LocalEtcd, election: str, electors: Callable[..., Elector]) -> None:
    """A led and stopped; B starts with its observe's first view held back, so only B's
    campaign's read can confirm B. When the held view arrives (older than B's term, or not
    showing B at all), B keeps leading: once, on the key that was first at the read's
    revision."""
    client = EtcdClient([etcd.endpoint], timeout=5)
    history = History(client, election)
    terms = Terms()
    try:
        a = electors("node-a", [etcd.endpoint], election)
        b = electors("node-b", [etcd.endpoint], election)
        gate = Gate(b)
        gate.open.clear()
        terms.watch(a)
        terms.watch(b)
        a.start()
        assert a.wait_for("leader", timeout=slack(10)), "A never led"
        a.stop()
        b.start()
        assert gate.held.wait(slack(5)), "B's observe never had a first view to hold"
        assert b.wait_for("leader", timeout=slack(10)), "B's read never confirmed it"
        assert b._dispatcher.observed is None, "a view reached B's dispatcher early"
        assert_no_phantom(terms, history)
        gate.open.set()
        [entry] = terms.of("node-b")
        poll(lambda: b._dispatcher.observed is not None
             and b._dispatcher.observed.key == entry.key, 10, "B's view shows B after the gate")
        time.sleep(slack(0.3))
        assert b.state == "leader"
        assert terms.of("node-b") == [entry]
        assert entry.by == BY_READ, entry
        terms.assert_one_at_a_time()
        assert_no_phantom(terms, history)
        assert_tokens_grow(terms)
    finally:
        history.close()
        client.close()


def test_a_follower_whose_key_is_deleted_unseen_campaigns_again_and_leads_on_a_new_key(
        etcd: LocalEtcd, election: str, electors: Callable[..., Elector]) -> None:
    """B waits behind A with its observe's reports held back. B's key is deleted by hand,
    then A stops: nothing shows B first, and B's key is gone, so B must not lead. Once its
    reports flow, the stream tells B its key went; B campaigns again (no campaign watches the
    line for it) and leads on the new key, never on the dead one."""
    client = EtcdClient([etcd.endpoint], timeout=5)
    history = History(client, election)
    terms = Terms()
    try:
        a = electors("node-a", [etcd.endpoint], election)
        b = electors("node-b", [etcd.endpoint], election)
        gate = Gate(b)  # open until B's key waits in line; then B's reports wait at it
        terms.watch(a)
        terms.watch(b)
        lead_then_queue(a, b, client, election)
        gate.open.clear()
        [a_entry] = terms.of("node-a")
        [b_kv] = [kv for kv in candidates(client, election)
                  if bytes(kv.key).decode() != a_entry.key]
        b_key, old_token = bytes(b_kv.key).decode(), int(b_kv.create_revision)
        client.delete(b_key.encode())
        a.stop()  # A's key goes with its lease
        assert gate.held.wait(slack(5)), "precondition: B's observe heard of the deletes"
        assert not b.wait_for("leader", timeout=slack(0.5)), "B led on its deleted key"
        gate.open.set()
        assert b.wait_for("leader", timeout=slack(10)), "B never led on a new key"
        [entry] = terms.of("node-b")
        history.settle(entry.revision)  # its watch may trail B's read
        assert entry.token == history.created(b_key, after=old_token), entry
        time.sleep(slack(0.3))
        assert terms.of("node-b") == [entry]
        terms.assert_one_at_a_time()
        assert_no_phantom(terms, history)
        assert_tokens_grow(terms)
    finally:
        history.close()
        client.close()


# ---------------------------------------------------------------- 5. a late view of our old key
def test_a_view_of_our_resigned_key_arriving_after_the_resign_never_reelects(
        etcd: LocalEtcd, election: str, electors: Callable[..., Elector]) -> None:
    """B leads, C waits. B resigns; before B's key is deleted, a write to it (same lease,
    same create revision) makes B's stream report B's key first once more, and that view is
    queued behind the resign. Applied after it, the view is true at its revision, is B's key
    and B's lease — but that incarnation's term has ended: B must not lead on it again (C
    leads next, and B only ever again on a new incarnation)."""
    client = EtcdClient([etcd.endpoint], timeout=5)
    history = History(client, election)
    terms = Terms()
    try:
        b = electors("node-b", [etcd.endpoint], election)
        c = electors("node-c", [etcd.endpoint], election)
        views: list[LeaderSeen] = []
        put = b._queue.put

        def b_view(event: Event) -> None:
            if isinstance(event, LeaderSeen):
                views.append(event)
            put(event)

        b._observer._emit = b_view  # type: ignore[attr-defined]  # before start: subscribes it
        terms.watch(b)
        terms.watch(c)
        late_view: list[int] = []

        @b.on_exit_leader
        def touch_our_key(term: Term) -> None:  # on B's dispatcher, before the resign's delete
            if late_view:
                return
            rev = int(client.put(term.key.encode(), b"node-b", lease=term.lease).header.revision)
            late_view.append(rev)
            poll(lambda: any(v.revision == rev for v in views), 5, "B's stream reports it")

        lead_then_queue(b, c, client, election)
        [first] = terms.of("node-b")
        b.resign()
        assert c.wait_for("leader", timeout=slack(10)), "C never led after B resigned"
        [late] = [v for v in views if v.revision == late_view[0]]
        assert late.leader is not None and late.leader.key == first.key
        assert late.leader.create_revision == first.token  # the view: B's ended incarnation
        time.sleep(slack(0.3))
        assert_no_phantom(terms, history)
        assert_tokens_grow(terms)
        terms.assert_one_at_a_time()
        assert terms.of("node-b") == [first], terms.of("node-b")
    finally:
        history.close()
        client.close()


# ---------------------------------------------------------------- 6. a leaderless member's stream
def test_a_member_without_a_raft_leader_ends_the_stream_instead_of_keeping_a_stale_view(
        election: str, electors: Callable[..., Elector]) -> None:
    """The other side of 3: B's member is alive but the two others are paused, so it has no
    raft leader and its data stops at the last revision it applied. A watch opened with
    require-leader is cancelled by etcd then, so B's stream fails (observe reports it) rather
    than going quiet on a view nobody can update; B does not lead meanwhile, and after the
    heal there is one term at a time, each confirmed at a revision where its key was first."""
    with LocalCluster(3) as cluster:
        raft = cluster.wait_for_leader()
        b_member = cluster.members[(raft + 1) % 3]
        others = [m for m in cluster.members if m is not b_member]
        client = EtcdClient([m.endpoint for m in others], timeout=5)
        stream = EtcdClient([b_member.endpoint], timeout=2)  # the stream alone: see test 3
        history = History(client, election)
        terms = Terms()
        a = electors("node-a", [others[0].endpoint], election)
        b = electors("node-b", [b_member.endpoint], election, call_timeout=0.5)
        errors: list[BaseException] = []

        def b_stream(event: Event) -> None:
            if isinstance(event, ErrorReported) and event.where == "observe":
                errors.append(event.error)
            b._queue.put(event)

        b._observer = Subscription(stream, election, b_stream, 0.2)
        try:
            terms.watch(a)
            terms.watch(b)
            lead_then_queue(a, b, client, election)
            for m in others:
                m.pause()
            try:
                poll(lambda: any("no leader" in str(e) for e in errors), 5,
                     "B's stream fails for want of a raft leader")
                assert b.state != "leader"
            finally:
                for m in others:
                    m.resume()
            assert cluster.wait_for_leader(timeout=slack(10)) is not None
            poll(lambda: [e.state for e in (a, b)].count("leader") == 1
                 and a.leader is not None and b.leader is not None
                 and a.leader.key == b.leader.key, 20, "one leader, both agree after the heal")
            time.sleep(slack(0.3))
            assert_no_phantom(terms, history)
            assert_tokens_grow(terms)
            terms.assert_one_at_a_time()
        finally:
            for e in (b, a):  # while the cluster runs
                e.stop()
            history.close()
            stream.close()
            client.close()
