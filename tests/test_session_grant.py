"""A slow lease grant: the first renewal is due TTL/3 after the grant was *sent*, and a grant
answered too late to renew is not used."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from electfsm import clock
from electfsm.config import ElectorConfig
from electfsm.etcd import EtcdClient
from electfsm.events import ErrorReported, Event, SessionLost, SessionUp
from electfsm.sources.session import SessionWatch
from electfsm.testing.local_etcd import LocalEtcd


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"not within {timeout}s: {what}"
        time.sleep(0.01)


class SlowGrants(EtcdClient):
    """A real client whose grant answers arrive ``delay`` seconds late (the lease is granted
    by etcd at once; only the answer is slow, as over a congested link)."""

    def __init__(self, *args: Any, delay: float, slow: int = 1_000_000,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delay = delay
        self.slow = slow  # how many grants are slow
        self.granted: list[int] = []

    def grant(self, ttl: int, *, timeout: float | None = None) -> tuple[int, int]:
        lease, granted = super().grant(ttl, timeout=timeout)
        self.granted.append(lease)
        if len(self.granted) <= self.slow:
            time.sleep(self.delay)
        return lease, granted


def of(events: list[Event], kind: type[Any]) -> list[Any]:
    return [e for e in list(events) if isinstance(e, kind)]


def test_a_grant_answered_half_a_ttl_late_does_not_lose_the_fresh_session(
        etcd: LocalEtcd, election: str) -> None:
    """TTL 6 s, margin 1.5 s: the lease lasts 4.5 s from the grant's send time. Its answer
    comes 3 s late; renewing TTL/3 after that answer (at 5 s) would be past the deadline, so
    the session was lost before its first keepalive, and the next slow grant lost again."""
    config = ElectorConfig(endpoints=[etcd.endpoint], election=election, identity="node-a",
                           ttl=6, margin=1.5, call_timeout=2, backoff_max=0.3)
    client = SlowGrants(config.hosts, timeout=config.call_timeout, delay=3.0)
    events: list[Event] = []
    session = SessionWatch(client, config, events.append)
    session.start()
    try:
        wait_for(lambda: bool(of(events, SessionUp)), 30, "the session is up")
        first = session.deadline(1)
        assert first > clock.now(), "the slow grant was still in time to be used"
        wait_for(lambda: session.deadline(1) > first or bool(of(events, SessionLost)), 30,
                 "a renewal, or the loss")
        assert of(events, SessionLost) == [], "renewed before its deadline"
        assert session.generation == 1 and session.deadline(1) > first
    finally:
        session.stop(10)
        client.close()


def test_a_grant_answered_after_the_lease_could_be_renewed_is_not_used(
        etcd: LocalEtcd, election: str) -> None:
    """TTL 2 s (1.75 s to the deadline): an answer 2 s late would be a session that is lost
    the moment it is up. It is revoked and granted again, with no SessionUp for it."""
    config = ElectorConfig(endpoints=[etcd.endpoint], election=election, identity="node-a",
                           ttl=2, call_timeout=1, backoff_max=0.3)
    client = SlowGrants(config.hosts, timeout=config.call_timeout, delay=2.0, slow=1)
    events: list[Event] = []
    session = SessionWatch(client, config, events.append)
    session.start()
    try:
        wait_for(lambda: bool(of(events, SessionUp)), 30, "a session is up")
        late = client.granted[0]
        assert late not in [e.lease for e in of(events, SessionUp)], "the late lease unused"
        assert [e.lease for e in of(events, SessionUp)] == [client.granted[1]]
        assert of(events, SessionLost) == []
        assert "too late" in str(of(events, ErrorReported)[0].error)
        assert client.time_to_live(late).TTL == -1, "the late lease was revoked"
    finally:
        session.stop(10)
        client.close()
