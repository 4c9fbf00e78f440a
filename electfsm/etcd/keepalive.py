"""The keepalive stream: one LeaseKeepAlive stream per connection, shared by every lease
renewed on it (as Go's lessor does)."""

from __future__ import annotations

import collections
import queue
import threading
from typing import TYPE_CHECKING, Any

import grpc
from etcd3 import etcdrpc

from electfsm import clock, logs
from electfsm.errors import (
    EtcdError,
    EtcdUnavailable,
)

if TYPE_CHECKING:
    from electfsm.etcd.client import EtcdClient

log = logs.logger("electfsm.etcd")


class _NoAnswer(Exception):
    """A keepalive got no answer in time."""


class _Renewal:
    """One keepalive request waiting for its answer."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self.ttl = 0
        self.error: EtcdError | None = None

    def answer(self, ttl: int) -> None:
        self.ttl = ttl
        self._done.set()

    def fail(self, error: EtcdError) -> None:
        self.error = error
        self._done.set()

    def wait(self, timeout: float) -> int:
        if not self._done.wait(timeout):
            raise _NoAnswer()
        if self.error is not None:
            raise self.error
        return self.ttl


class _KeepAlives:
    """The LeaseKeepAlive stream of one channel, shared by every lease renewed through it.

    etcd answers the requests of one stream in order, each answer naming its lease, so the
    answers for a lease go to its waiting requests first come, first served. A request that
    gets no answer in time keeps its place in that line, abandoned: its late answer is
    dropped when it comes, never taken for the answer to a later request (that would date a
    renewal later than it happened). The stream is ended only when it answered nothing at
    all while that request waited (a dead link or a hung server); a stream that is slow but
    answering stays, or one slow renewal under load would fail every lease sharing it.
    """

    def __init__(self, client: EtcdClient, stub: Any, channel: Any,
                 metadata: tuple[tuple[str, str], ...]) -> None:
        self._client = client
        self.channel = channel
        self._lock = threading.Lock()
        self._waiting: dict[int, collections.deque[_Renewal]] = {}
        self._dead: EtcdError | None = None
        self._last_answer = float("-inf")
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._call = stub.LeaseKeepAlive(iter(self._requests.get, None), metadata=metadata)
        self._reader = threading.Thread(target=self._read, daemon=True,
                                        name="electfsm-keepalive")
        self._reader.start()

    def usable(self, channel: Any) -> bool:
        return self._dead is None and channel is self.channel

    def renew(self, lease: int, timeout: float) -> int:
        renewal = _Renewal()
        with self._lock:
            if self._dead is not None:
                raise self._dead
            self._waiting.setdefault(lease, collections.deque()).append(renewal)
        sent = clock.now()
        self._requests.put(etcdrpc.LeaseKeepAliveRequest(ID=lease))
        try:
            return renewal.wait(timeout)
        except _NoAnswer:
            if self._last_answer < sent:  # silent the whole time: the stream is dead
                self.close(EtcdUnavailable(f"keep lease {lease:x} alive: no answer within "
                                           f"{timeout}s; the keepalive stream was closed"))
            raise

    def _read(self) -> None:
        error: EtcdError
        try:
            for resp in self._call:
                self._last_answer = clock.now()
                self._client._answered(self.channel)
                with self._lock:
                    waiting = self._waiting.get(int(resp.ID))
                    renewal = waiting.popleft() if waiting else None
                if renewal is not None:
                    renewal.answer(int(resp.TTL))
            error = EtcdUnavailable("keep leases alive: the stream ended")
        except grpc.RpcError as exc:
            error = (self._dead if self._dead is not None else
                     self._client._translate(exc, "keep leases alive", self.channel, None))
        except ValueError as exc:  # the channel was closed (a rebuild)
            error = EtcdUnavailable(f"keep leases alive: connection rebuilt ({exc})")
        self._end(error)

    def _end(self, error: EtcdError) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = error
            waiting, self._waiting = self._waiting, {}
        for renewals in waiting.values():
            for renewal in renewals:
                renewal.fail(self._dead)

    def close(self, error: EtcdError, *, wait: float = 0.0) -> None:
        """End the stream; ``wait`` > 0 also waits that long for its reader thread."""
        self._end(error)
        self._requests.put(None)
        self._call.cancel()
        if wait > 0 and threading.current_thread() is not self._reader:
            self._reader.join(wait)
