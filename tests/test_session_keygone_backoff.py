"""A campaign whose key keeps vanishing (or is squatted under our name by another lease)
retries with backoff instead of spinning on etcd."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import electfsm.sources.campaign
from electfsm.backoff import Backoff
from electfsm.config import ElectorConfig
from electfsm.etcd import EtcdClient
from electfsm.events import Elected, Event
from electfsm.sources.campaign import Campaign, candidate_key
from electfsm.testing.local_etcd import LocalEtcd


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"not within {timeout}s: {what}"
        time.sleep(0.01)


class CountedReads(EtcdClient):
    """A real client that counts the campaign's "who is ahead of us" reads."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads = 0
        self.lock = threading.Lock()

    def range(self, key: bytes, range_end: bytes = b"", **kwargs: Any) -> Any:
        if str(kwargs.get("what", "")).startswith("read who is ahead"):
            with self.lock:
                self.reads += 1
        return super().range(key, range_end, **kwargs)


def test_a_key_that_keeps_vanishing_is_retried_with_backoff(
        etcd: LocalEtcd, election: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our key's name is taken by a key of another lease (here: none) with our identity:
    the campaign transaction finds it, the read refuses it as not ours, again and again.
    Every retry must wait for the backoff first: reads never outrun backoff pauses."""
    pauses: list[float] = []

    class CountedBackoff(Backoff):
        def next(self) -> float:
            delay = super().next()
            pauses.append(delay)
            return delay

    monkeypatch.setattr(electfsm.sources.campaign, "Backoff", CountedBackoff)
    config = ElectorConfig(endpoints=[etcd.endpoint], election=election, identity="node-a",
                           ttl=30, call_timeout=2, backoff_max=0.2)
    client = CountedReads(config.hosts, timeout=config.call_timeout)
    lease, _ = client.grant(30)
    key = candidate_key(config.prefix, lease).encode()
    client.put(key, config.identity)  # squatted: our name and identity, no lease
    events: list[Event] = []
    campaign = Campaign(client, config, 1, lease, events.append)
    campaign.start()
    try:
        wait_for(lambda: len(pauses) >= 5, 30, "five backoff pauses")
        campaign.cancel()
        campaign.join(10)
        assert client.reads >= 5, "the squatted key was refused each time"
        assert client.reads <= len(pauses) + 1, "a retry without a backoff pause"
        assert not any(isinstance(e, Elected) for e in events)
    finally:
        campaign.cancel()
        campaign.join(10)
        client.revoke(lease)
        client.delete(key)
        client.close()
