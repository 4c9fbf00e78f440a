"""observe and the etcd adapter on their own, against a real etcd."""

from __future__ import annotations

import queue
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest

from electfsm import EtcdError, EtcdUnavailable, LeaderSeen
from electfsm.etcd import EtcdClient
from electfsm.events import ErrorReported, Event
from electfsm.sources.campaign import is_candidate_key
from electfsm.sources.observe import Observer
from electfsm.testing.faultproxy import FaultProxy
from electfsm.testing.local_etcd import LocalEtcd


@pytest.fixture
def raw(etcd: LocalEtcd) -> Iterator[EtcdClient]:
    client = EtcdClient([etcd.endpoint], timeout=5)
    yield client
    client.close()


@pytest.fixture
def seen(etcd: LocalEtcd, election: str) -> Iterator[queue.Queue[Event]]:
    events: queue.Queue[Event] = queue.Queue()
    client = EtcdClient([etcd.endpoint], timeout=2)
    observer = Observer(client, election, events.put, backoff_max=0.2)
    observer.start()
    yield events
    observer.stop(5)
    client.close()


def next_leader(events: queue.Queue[Event]) -> LeaderSeen:
    while True:
        event = events.get(timeout=5)
        if isinstance(event, LeaderSeen):
            return event


def test_observe_reports_puts_deletes_and_no_leader(
        raw: EtcdClient, election: str, seen: queue.Queue[Event]) -> None:
    assert next_leader(seen).leader is None, "an empty election reports nobody"
    first, _ = raw.grant(30)
    second, _ = raw.grant(30)
    raw.put(f"{election}/{first:x}".encode(), b"node-1", lease=first)
    got = next_leader(seen)
    assert got.leader is not None and got.leader.identity == "node-1"
    raw.put(f"{election}/{second:x}".encode(), b"node-2", lease=second)
    raw.put(f"{election}/{first:x}".encode(), b"node-1b", lease=first)  # a proclamation
    got = next_leader(seen)
    assert got.leader is not None and got.leader.value == b"node-1b"
    raw.delete(f"{election}/{first:x}".encode())
    got = next_leader(seen)
    assert got.leader is not None and got.leader.identity == "node-2"
    raw.revoke(second)
    got = next_leader(seen)
    assert got.leader is None, "the last candidate left: nobody leads"


def test_every_write_to_the_leaders_key_is_reported_even_with_the_same_value(
        raw: EtcdClient, election: str, seen: queue.Queue[Event]) -> None:
    """The leader's key re-written by hand with its value unchanged (here: moved off its
    lease) is still news: the leader's own elector must hear of it."""
    assert next_leader(seen).leader is None
    lease, _ = raw.grant(30)
    key = f"{election}/{lease:x}".encode()
    raw.put(key, b"node-1", lease=lease)
    assert (first := next_leader(seen).leader) is not None and first.lease == lease
    raw.put(key, b"node-1")  # same key, same value, same create revision, no lease
    got = next_leader(seen).leader
    assert got is not None and got.lease == 0 and got.create_revision == first.create_revision
    raw.put(key, b"node-1")  # not even the lease changed: still a write to the leader's key
    again = next_leader(seen)
    assert again.leader == got and again.revision > 0
    raw.delete(key)
    assert next_leader(seen).leader is None
    raw.revoke(lease)


def test_keys_of_a_nested_election_are_not_candidates(
        raw: EtcdClient, election: str, seen: queue.Queue[Event]) -> None:
    assert next_leader(seen).leader is None
    raw.put(f"{election}/x/1234".encode(), b"nested")  # a candidate of election "<name>/x"
    raw.put(f"{election}/notes".encode(), b"not a lease id")
    raw.put(f"{election}/abc\n".encode(), b"a lease id and a newline")
    lease, _ = raw.grant(30)
    raw.put(f"{election}/{lease:x}".encode(), b"real", lease=lease)
    got = next_leader(seen)
    assert got.leader is not None and got.leader.identity == "real"


@pytest.mark.parametrize(("suffix", "candidate"), [
    (b"1a2b", True), (b"1a2b\n", False), (b"1a2b\n\n", False), (b"\n", False),
    (b"", False), (b"1A2B", False), (b"x/1a2b", False),
])
def test_a_candidate_key_is_the_prefix_and_a_lease_in_hex_and_nothing_else(
        suffix: bytes, candidate: bool) -> None:
    """``$`` also matches before a trailing newline: ``<election>/1a2b\\n``, a key anyone
    may write, once passed for a candidate and could be reported as the leader."""
    assert is_candidate_key(b"e/", b"e/" + suffix) is candidate


def test_a_timed_out_call_does_not_poison_the_client(
        make_etcd: Callable[..., LocalEtcd]) -> None:
    server = make_etcd()
    client = EtcdClient([server.endpoint], timeout=0.5)
    try:
        client.put(b"k", b"v")
        server.pause()
        started = time.monotonic()
        with pytest.raises(EtcdUnavailable, match=r"did not answer within 0\.5s"):
            client.range(b"k")
        assert time.monotonic() - started < 1.5
        server.resume()
        assert client.range(b"k").kvs[0].value == b"v", "usable again at once"
    finally:
        server.resume()
        client.close()


@pytest.mark.parametrize("call", ["keepalive", "watch", "range"])
def test_a_channel_closed_under_a_call_is_an_etcd_error_and_is_rebuilt(
        etcd: LocalEtcd, call: str) -> None:
    """Another thread's rebuild can close the channel between picking it and opening a
    call on it; grpc then raises ValueError. Once that escaped from a keepalive and ended an
    elector's session thread (1,000 candidates starting at once): it must be an EtcdError,
    and the next call must work on a fresh channel."""
    client = EtcdClient([etcd.endpoint], timeout=2)
    lease, _ = client.grant(10)
    try:
        client._channel.close()  # what a concurrent rebuild does to the channel we hold
        do: dict[str, Callable[[], object]] = {
            "keepalive": lambda: client.keepalive(lease),
            "watch": lambda: client.watch(b"some/key").cancel(),
            "range": lambda: client.range(b"some/key"),
        }
        with pytest.raises(EtcdUnavailable, match="rebuilt"):
            do[call]()
        assert client.keepalive(lease) > 0, "a fresh channel serves the next call"
    finally:
        client.revoke(lease)
        client.close()


def test_unreachable_endpoint_fails_fast_with_a_clear_error() -> None:
    from electfsm.testing.etcd_binaries import free_port

    port = free_port()
    client = EtcdClient([f"127.0.0.1:{port}"], timeout=2)
    try:
        started = time.monotonic()
        with pytest.raises(EtcdUnavailable, match=f"127.0.0.1:{port}"):
            client.grant(5)
        assert time.monotonic() - started < 2.5
    finally:
        client.close()


def test_second_endpoint_is_used_when_the_first_is_dead(etcd: LocalEtcd) -> None:
    from electfsm.testing.etcd_binaries import free_port

    client = EtcdClient([f"127.0.0.1:{free_port()}", etcd.endpoint], timeout=1)
    try:
        with pytest.raises(EtcdUnavailable):
            client.status()
        assert client.status().header.revision > 0
        assert client.endpoint == etcd.endpoint
    finally:
        client.close()


def streams_opened(server: LocalEtcd, method: str) -> float:
    """How many ``method`` calls (streams) etcd has seen started, from its /metrics."""
    text = urllib.request.urlopen(server.client_url + "/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("grpc_server_started_total{")
               and f'grpc_method="{method}"' in line)


def keepalive_streams(server: LocalEtcd) -> float:
    return streams_opened(server, "LeaseKeepAlive")


def test_one_late_renewal_does_not_end_the_keepalive_stream_other_leases_share(
        make_etcd: Callable[..., LocalEtcd]) -> None:
    """With 1,000 electors starting at once, one renewal answered late ended the stream that
    every lease of the connection shares; the renewals of all the others failed with it, and
    sessions were lost in a cascade. A stream that answers while a renewal waits is slow, not
    dead: it is kept, and the late answer is dropped rather than taken for a later one's."""
    server = make_etcd()
    with FaultProxy(server.endpoint) as proxy:
        client = EtcdClient([proxy.endpoint], timeout=5)
        try:
            a, _ = client.grant(30)
            b, _ = client.grant(30)
            assert client.keepalive(a) > 0 and client.keepalive(b) > 0
            assert keepalive_streams(server) == 1
            proxy.latency(0.3)  # a round trip takes 0.6 s
            answered: list[int] = []
            other = threading.Thread(target=lambda: answered.append(client.keepalive(b)))
            other.start()  # b's answer arrives while a's renewal below waits
            time.sleep(0.2)
            with pytest.raises(EtcdUnavailable, match=r"did not answer within 0\.5s"):
                client.keepalive(a, timeout=0.5)
            other.join(5)
            assert answered and answered[0] > 0, "the other lease was renewed on the same stream"
            assert client.keepalive(a) > 0, "the abandoned lease renews again"
            proxy.pass_through()
            for _ in range(3):
                assert client.keepalive(a) > 0 and client.keepalive(b) > 0
            assert keepalive_streams(server) == 1, "the slow stream was kept"
        finally:
            client.close()


def test_a_keepalive_stream_silent_while_a_renewal_waits_is_replaced(
        make_etcd: Callable[..., LocalEtcd]) -> None:
    """The other side of the rule above: a stream that answers nothing (a hung server) is
    ended, and the next renewal opens a new one once etcd answers again."""
    server = make_etcd()
    client = EtcdClient([server.endpoint], timeout=5)
    try:
        lease, _ = client.grant(30)
        assert client.keepalive(lease) > 0
        server.pause()
        try:
            with pytest.raises(EtcdUnavailable, match=r"did not answer within 0\.5s"):
                client.keepalive(lease, timeout=0.5)
        finally:
            server.resume()
        assert client.keepalive(lease) > 0
        assert keepalive_streams(server) == 2
    finally:
        client.close()


def test_watches_of_one_connection_share_one_stream_yet_end_on_their_own(
        make_etcd: Callable[..., LocalEtcd]) -> None:
    """Every watch of a client rides one Watch stream (one reader thread, not a stream and a
    gRPC-polling thread per watch). Each still gets only its own events, a cancelled one ends
    quietly without disturbing the others, and closing the client ends the rest with an
    error."""
    server = make_etcd()
    client = EtcdClient([server.endpoint], timeout=5)
    got: queue.Queue[tuple[int, object]] = queue.Queue()

    def follow(i: int, watch: object) -> None:
        try:
            for resp in watch:  # type: ignore[attr-defined]
                for ev in resp.events:
                    got.put((i, bytes(ev.kv.key)))
            got.put((i, "ended"))
        except EtcdError as exc:
            got.put((i, exc))

    try:
        watches = [client.watch(f"w/{i}".encode()) for i in range(20)]
        threads = [threading.Thread(target=follow, args=(i, w), daemon=True)
                   for i, w in enumerate(watches)]
        for t in threads:
            t.start()
        for i in range(20):
            client.put(f"w/{i}".encode(), b"x")
        seen = sorted(got.get(timeout=5) for _ in range(20))
        assert seen == sorted((i, f"w/{i}".encode()) for i in range(20))
        watches[3].cancel()
        assert got.get(timeout=5) == (3, "ended")
        client.put(b"w/3", b"y")
        client.put(b"w/4", b"y")
        assert got.get(timeout=5) == (4, b"w/4"), "the cancelled watch got nothing more"
        assert streams_opened(server, "Watch") == 1
    finally:
        client.close()
    ended = [got.get(timeout=5) for _ in range(19)]
    assert all(isinstance(e, EtcdError) for _, e in ended), ended
    assert all(not t.is_alive() for t in threads if t.join(5) is None)


def reads_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "electfsm-observe-reads"]


def test_an_idle_observer_holds_no_thread(etcd: LocalEtcd, election: str) -> None:
    """observe's watch events are applied by the connection's watch reader and its reads
    run on a thread that exists only while one is due: once it follows, it holds none."""
    events: queue.Queue[Event] = queue.Queue()
    client = EtcdClient([etcd.endpoint], timeout=2)
    before = {t.ident for t in threading.enumerate()}
    observer = Observer(client, election, events.put, backoff_max=0.2)
    try:
        observer.start()
        assert next_leader(events).leader is None
        deadline = time.monotonic() + 5
        while reads_threads() and time.monotonic() < deadline:
            time.sleep(0.01)
        mine = [t.name for t in threading.enumerate()
                if t.ident not in before and t.name.startswith("electfsm")]
        assert mine == ["electfsm-watch"], mine  # the connection's reader, no observe thread
    finally:
        observer.stop(5)
        client.close()


def test_stopping_an_observer_that_waits_to_read_again_leaves_no_thread(
        make_etcd: Callable[..., LocalEtcd], election: str) -> None:
    """An observer whose reads fail waits (backoff) to read again on the read thread;
    stop() drops that read, and the thread ends with it instead of outliving the elector."""
    server = make_etcd()
    with FaultProxy(server.endpoint) as proxy:
        events: queue.Queue[Event] = queue.Queue()
        client = EtcdClient([proxy.endpoint], timeout=0.3)
        observer = Observer(client, election, events.put, backoff_max=30)
        try:
            proxy.refuse()
            observer.start()
            while not isinstance(events.get(timeout=5), ErrorReported):
                pass
            assert reads_threads(), "precondition: a read is due again, later"
            observer.stop(5)
            assert not reads_threads()
        finally:
            observer.stop(5)
            client.close()


def test_stop_during_a_failure_report_emits_nothing_after_it_returns(
        etcd: LocalEtcd, election: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream failure being handled on the watch reader while stop() runs: either the
    failure is reported and its next read scheduled before stop() (which then drops it), or
    stop() wins and nothing follows; never an event or a read thread after stop() returned."""
    from electfsm.errors import EtcdUnavailable
    from electfsm.sources import observe

    events: list[Event] = []
    client = EtcdClient([etcd.endpoint], timeout=2)
    observer = Observer(client, election, events.append, backoff_max=2.0)
    try:
        observer.start()
        deadline = time.monotonic() + 5
        while observer._watch is None and time.monotonic() < deadline:
            time.sleep(0.01)
        view = observer._view
        assert view is not None, "precondition: observing"
        info = observe.log.info
        reporting = threading.Event()

        def slow_info(*args: object) -> None:  # widens the window inside the failure report
            reporting.set()
            time.sleep(0.3)
            info(*args)

        monkeypatch.setattr(observe.log, "info", slow_info)
        reader = threading.Thread(target=observer._on_error,
                                  args=(view, EtcdUnavailable("stream broke")))
        reader.start()
        assert reporting.wait(5)
        observer.stop(5)
        after = len(events)
        reader.join(5)
        time.sleep(0.2)
        assert events[after:] == [], "an event after stop() returned"
        assert not reads_threads(), "a read thread outlived stop()"
    finally:
        observer.stop(5)
        client.close()


def test_stopping_one_observer_does_not_wait_for_another_ones_reads(
        make_etcd: Callable[..., LocalEtcd]) -> None:
    """Observers of one connection share its read thread. In an outage it keeps busy with the
    other observer's reads (each fails and is due again): stopping this one drops only its
    own reads and does not wait for the thread."""
    server = make_etcd()
    with FaultProxy(server.endpoint) as proxy:
        client = EtcdClient([proxy.endpoint], timeout=1)
        events: queue.Queue[Event] = queue.Queue()
        one = Observer(client, "one", events.put, backoff_max=0.2)
        other = Observer(client, "other", events.put, backoff_max=0.2)
        try:
            one.start()
            other.start()
            assert next_leader(events) and next_leader(events)
            proxy.blackhole()
            client.close()  # a fresh channel through the dark proxy: every read times out
            client = EtcdClient([proxy.endpoint], timeout=1)
            one._client = other._client = client
            one.resync()
            other.resync()
            time.sleep(1.5)  # both are failing and retrying now
            took = time.monotonic()
            one.stop(10)
            took = time.monotonic() - took
            assert took < 1.5, f"stop() waited {took:.1f}s for the shared read thread"
        finally:
            one.stop(5)
            other.stop(5)
            client.close()


def test_stop_while_the_read_thread_is_being_started_still_closes_the_connection(
        etcd: LocalEtcd, election: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The watch stream fails and observe schedules a read, whose thread is slow to start (a
    preempted watch reader on a busy host); stop() comes meanwhile. It must not find a thread
    that is not running yet (joining one raises, and the elector's teardown would end
    before it closed its connection)."""
    from electfsm import Elector

    start = threading.Thread.start
    armed = threading.Event()

    def slow_start(self: threading.Thread) -> None:
        if self.name == "electfsm-observe-reads" and armed.is_set():
            time.sleep(0.5)
        start(self)

    monkeypatch.setattr(threading.Thread, "start", slow_start)
    e = Elector(endpoints=[etcd.endpoint], election=election, identity="a", ttl=3).start()
    try:
        assert e.wait_for("leader", timeout=10)
        stream = e._client._watches
        assert stream is not None, "precondition: observe watches on the connection's stream"
        armed.set()
        failing = threading.Thread(target=stream._end, args=(EtcdUnavailable("injected"),))
        failing.start()
        time.sleep(0.1)  # the read's thread is being started now
        e.stop(timeout=5)
        failing.join(5)
        assert e._client._closed, "the elector's teardown ended before closing its connection"
    finally:
        e.stop()
