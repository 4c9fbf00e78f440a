"""The session's deadline fires even while the session thread is stuck in a call, and no call
on the session's path (the auth token renewal included) outlasts the time it was given."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from electfsm import clock
from electfsm.config import ElectorConfig
from electfsm.errors import EtcdUnavailable
from electfsm.etcd import EtcdClient
from electfsm.etcd.security import Auth
from electfsm.events import Event, SessionLost, SessionUp
from electfsm.sources.session import SessionWatch
from electfsm.testing.faultproxy import FaultProxy
from electfsm.testing.local_etcd import LocalEtcd

ROOT_PW = "root-pw-4Hd"
USER_PW = "sched-pw-8Kq"


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"not within {timeout}s: {what}"
        time.sleep(0.01)


class StampedEvent(threading.Event):
    """A term's ``cancelled`` event that remembers when (package clock) it was set."""

    at: float | None = None

    def set(self) -> None:
        if self.at is None:
            self.at = clock.now()
        super().set()


class Recorder:
    """The session's ``emit``: every event, with the package-clock time it was emitted."""

    def __init__(self) -> None:
        self.events: list[tuple[float, Event]] = []

    def __call__(self, event: Event) -> None:
        self.events.append((clock.now(), event))

    def of(self, kind: type[Any], generation: int) -> list[tuple[float, Any]]:
        return [(at, e) for at, e in self.events
                if isinstance(e, kind) and e.generation == generation]


class StuckKeepalives(EtcdClient):
    """A real client whose keepalive calls, once :meth:`jam` is called, block until
    :meth:`release` (a session thread stuck in a call, whatever the reason)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.jammed = threading.Event()
        self.released = threading.Event()
        self.stuck = threading.Event()  # a keepalive call is blocked right now

    def jam(self) -> None:
        self.jammed.set()

    def release(self) -> None:
        self.released.set()

    def keepalive(self, lease: int, *, timeout: float | None = None) -> int:
        if self.jammed.is_set() and not self.released.is_set():
            self.stuck.set()
            self.released.wait()
            self.stuck.clear()
        return super().keepalive(lease, timeout=timeout)


def test_a_session_thread_stuck_in_a_call_still_steps_down_at_the_deadline(
        etcd: LocalEtcd, election: str) -> None:
    """Terms are cancelled and SessionLost is emitted at the deadline by the watchdog while
    the session thread is still blocked; once it comes back it does not announce the loss a
    second time, and it starts a new session."""
    config = ElectorConfig(endpoints=[etcd.endpoint], election=election, identity="node-a",
                           ttl=2, call_timeout=1, backoff_max=0.3)
    client = StuckKeepalives(config.hosts, timeout=config.call_timeout)
    emitted = Recorder()
    session = SessionWatch(client, config, emitted)
    session.start()
    try:
        wait_for(lambda: bool(emitted.of(SessionUp, 1)), 20, "the first session is up")
        term_cancelled = StampedEvent()
        session.bind(1, term_cancelled)
        client.jam()
        wait_for(client.stuck.is_set, 20, "a keepalive call is blocked")
        deadline = session.deadline(1)  # no renewal can move it any more
        assert deadline > float("-inf")
        wait_for(lambda: bool(emitted.of(SessionLost, 1)), 20,
                 "SessionLost while the session thread is stuck")
        assert client.stuck.is_set(), "the session thread was still blocked in its call"
        lost_at = emitted.of(SessionLost, 1)[0][0]
        assert term_cancelled.is_set() and term_cancelled.at is not None
        assert deadline <= term_cancelled.at <= lost_at, "cancelled at the deadline, first"
        assert session.deadline(1) == float("-inf")
        client.release()
        wait_for(lambda: bool(emitted.of(SessionUp, 2)), 20, "a new session after the loss")
        assert len(emitted.of(SessionLost, 1)) == 1, "announced once, by the watchdog only"
    finally:
        client.release()
        session.stop(10)
        client.close()


def test_the_session_thread_announces_a_loss_it_sees_first_once(
        etcd: LocalEtcd, election: str) -> None:
    """The other order: etcd revokes the lease, the session thread sees TTL 0 and announces
    it; the watchdog, at the deadline, does not announce it again."""
    config = ElectorConfig(endpoints=[etcd.endpoint], election=election, identity="node-a",
                           ttl=2, call_timeout=1, backoff_max=0.3)
    client = EtcdClient.for_config(config)
    emitted = Recorder()
    session = SessionWatch(client, config, emitted)
    session.start()
    try:
        wait_for(lambda: bool(emitted.of(SessionUp, 1)), 20, "the first session is up")
        deadline = session.deadline(1)
        client.revoke(session.lease)
        wait_for(lambda: bool(emitted.of(SessionLost, 1)), 20, "the revoked lease is lost")
        wait_for(lambda: clock.now() > deadline + 2 * clock.MAX_SLEEP, 20,
                 "past the old deadline")
        assert len(emitted.of(SessionLost, 1)) == 1
    finally:
        session.stop(10)
        client.close()


# --------------------------------------------------------------------- auth token renewal

def ctl(etcdctl: str, endpoint: str, *args: str) -> None:
    subprocess.run([etcdctl, f"--endpoints={endpoint}", *args], check=True,
                   capture_output=True, timeout=20)


@pytest.fixture
def auth_etcd(make_etcd: Callable[..., LocalEtcd], etcdctl: str, election: str) -> LocalEtcd:
    """etcd with auth on; user 'scheduler' may read and write the election's keys."""
    server = make_etcd(extra_args=["--auth-token=simple"])
    e = server.endpoint
    ctl(etcdctl, e, "user", "add", "root", f"--new-user-password={ROOT_PW}")
    ctl(etcdctl, e, "user", "grant-role", "root", "root")
    ctl(etcdctl, e, "role", "add", "elector")
    ctl(etcdctl, e, "role", "grant-permission", "elector", "readwrite", f"{election}/",
        "--prefix=true")
    ctl(etcdctl, e, "user", "add", "scheduler", f"--new-user-password={USER_PW}")
    ctl(etcdctl, e, "user", "grant-role", "scheduler", "elector")
    ctl(etcdctl, e, "auth", "enable")
    return server


@pytest.fixture
def proxied_auth_client(auth_etcd: LocalEtcd) -> Iterator[tuple[EtcdClient, FaultProxy]]:
    with FaultProxy(auth_etcd.endpoint) as proxy:
        # a long call timeout: the renewal below must be bounded by its own timeout instead
        client = EtcdClient([proxy.endpoint], timeout=30,
                            auth=Auth(user="scheduler", password=USER_PW))
        try:
            yield client, proxy
        finally:
            client.close()


def reopen_with_a_new_token(client: EtcdClient) -> None:
    """The next renewal opens a new keepalive stream and needs a new token first: as after
    etcd rejected the token and the stream broke (the channel itself stays connected)."""
    assert client._keepalives is not None
    client._keepalives.close(EtcdUnavailable("test: the stream broke"))
    client._forget_token()


def test_a_renewal_that_must_renew_the_auth_token_takes_no_longer_than_its_timeout(
        proxied_auth_client: tuple[EtcdClient, FaultProxy]) -> None:
    """The keepalive stream is reopened with a fresh token when etcd stops answering: that
    authentication gets the renewal's time left, not the client's 30 s call timeout."""
    client, proxy = proxied_auth_client
    lease, _ = client.grant(30)
    assert client.keepalive(lease) > 0
    reopen_with_a_new_token(client)
    proxy.blackhole()
    began = clock.now()
    with pytest.raises(EtcdUnavailable):
        client.keepalive(lease, timeout=0.5)
    assert clock.now() - began < 2.5, "bounded by its 0.5 s, not by the 30 s call timeout"


def test_a_renewal_does_not_wait_for_another_call_renewing_the_auth_token(
        proxied_auth_client: tuple[EtcdClient, FaultProxy]) -> None:
    """Another thread (a campaign step) renewing the token with the full call timeout must
    not hold up the session's renewal past the time the renewal was given."""
    client, proxy = proxied_auth_client
    lease, _ = client.grant(30)
    assert client.keepalive(lease) > 0
    reopen_with_a_new_token(client)
    proxy.blackhole()
    other = threading.Thread(target=lambda: _ignore_errors(client.range, b"k", timeout=20),
                             daemon=True)
    other.start()
    wait_for(client._token_lock.locked, 10, "the other call is renewing the token")
    began = clock.now()
    with pytest.raises(EtcdUnavailable):
        client.keepalive(lease, timeout=0.5)
    assert clock.now() - began < 2.5, "bounded by its 0.5 s, not by the other call's 20 s"
    proxy.pass_through()


def _ignore_errors(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    with contextlib.suppress(Exception):
        fn(*args, **kwargs)


def test_a_session_renewing_its_token_against_a_blackholed_etcd_steps_down_at_the_deadline(
        proxied_auth_client: tuple[EtcdClient, FaultProxy], election: str) -> None:
    """The whole story: the keepalive stream must be reopened with a fresh token just as
    etcd stops answering. The term is cancelled and SessionLost emitted at the deadline,
    not when the 30 s call timeout of the token renewal would have run out."""
    client, proxy = proxied_auth_client
    config = ElectorConfig(endpoints=list(client.hosts), election=election,
                           identity="node-a", ttl=2, call_timeout=client.timeout,
                           backoff_max=0.3, auth=Auth(user="scheduler", password=USER_PW))
    emitted = Recorder()
    session = SessionWatch(client, config, emitted)
    session.start()
    try:
        wait_for(lambda: bool(emitted.of(SessionUp, 1)), 20, "the first session is up")
        term_cancelled = StampedEvent()
        session.bind(1, term_cancelled)
        first = session.deadline(1)
        wait_for(lambda: session.deadline(1) > first, 20, "a renewal on the first stream")
        reopen_with_a_new_token(client)
        proxy.blackhole()
        deadline = session.deadline(1)  # nothing can be renewed any more
        wait_for(lambda: bool(emitted.of(SessionLost, 1)), 40, "SessionLost")
        lost_at = emitted.of(SessionLost, 1)[0][0]
        assert term_cancelled.at is not None
        assert deadline <= term_cancelled.at <= lost_at <= deadline + 1.0, \
            f"{lost_at - deadline:.2f}s after the deadline"
    finally:
        proxy.pass_through()
        session.stop(10)
