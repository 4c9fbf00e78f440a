"""The session keeps its deadline on the package clock, which counts suspended time."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from electfsm import clock
from electfsm.config import ElectorConfig
from electfsm.etcd import EtcdClient
from electfsm.events import Event, SessionLost, SessionUp
from electfsm.sources.session import LATE, SessionWatch
from electfsm.testing.local_etcd import LocalEtcd


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"not within {timeout}s: {what}"
        time.sleep(0.01)


def test_time_the_host_spent_suspended_ends_the_session(
        etcd: LocalEtcd, election: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a suspend, time.monotonic has not moved but etcd's lease ran out. The package
    clock counted the suspend (here: jumped by a minute), so the session ends at once,
    although every keepalive still succeeds."""
    suspended = [0.0]
    real = clock.now
    monkeypatch.setattr(clock, "now", lambda: real() + suspended[0])
    config = ElectorConfig(endpoints=[etcd.endpoint], election=election, identity="node-a",
                           ttl=10, call_timeout=1, backoff_max=0.3)
    client = EtcdClient.for_config(config)
    events: list[Event] = []
    session = SessionWatch(client, config, events.append)  # no clock given: the package's
    session.start()
    try:
        wait_for(lambda: any(isinstance(e, SessionUp) for e in events), 20, "session up")
        cancelled = threading.Event()
        session.bind(1, cancelled)
        assert session.deadline(1) > real() + 5
        suspended[0] = 60.0
        wait_for(lambda: any(isinstance(e, SessionLost) for e in events), 20,
                 "the session ended after the suspend")
        lost = [e for e in events if isinstance(e, SessionLost)]
        assert [(e.generation, e.reason) for e in lost] == [(1, LATE)]
        assert cancelled.is_set()
    finally:
        session.stop(10)
        client.close()
