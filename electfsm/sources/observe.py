"""observe: one prefix watch on the election; reports who leads, including "nobody".

It keeps every candidate (``<election>/<lease hex>``) it knows of, read at a pinned revision
and then updated by PUT and DELETE events from the next revision on. The leader is the
candidate with the lowest create revision. On a broken stream or compaction it reads again
and watches again from that read's revision + 1, so no change is lost.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

from etcd3.etcdrpc import kv_pb2

from electfsm import logs
from electfsm.backoff import Backoff
from electfsm.errors import EtcdError, WatchCompacted
from electfsm.etcd import EtcdClient, Watch, prefix_end
from electfsm.events import ErrorReported, Event, LeaderInfo, LeaderSeen
from electfsm.sources.campaign import is_candidate_key

log = logs.logger("electfsm.observe")


def leader_of(candidates: dict[bytes, Any]) -> LeaderInfo | None:
    """The candidate with the lowest create revision, as a :class:`LeaderInfo`."""
    if not candidates:
        return None
    kv = min(candidates.values(), key=lambda kv: kv.create_revision)
    return LeaderInfo(identity=bytes(kv.value).decode("utf-8", "backslashreplace"),
                      key=bytes(kv.key).decode("utf-8", "backslashreplace"),
                      create_revision=int(kv.create_revision), lease=int(kv.lease),
                      value=bytes(kv.value))


class Observer:
    """Watches an election and emits :class:`LeaderSeen` whenever its leader changes."""

    def __init__(self, client: EtcdClient, election: str, emit: Callable[[Event], None],
                 backoff_max: float = 2.0) -> None:
        self._client = client
        self._election = election
        self._emit = emit
        self._prefix = (election + "/").encode()
        self._end = prefix_end(self._prefix)
        self._backoff_max = backoff_max
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watch: Watch | None = None
        self._last: LeaderInfo | None = None
        self._last_key: bytes | None = None
        self._reported = False
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"electfsm-observe[{election}]")

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stopping.set()
        with self._lock:
            watch = self._watch
        if watch is not None:
            watch.cancel()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def resync(self) -> None:
        """Drop the current stream and read again (e.g. after the session came back)."""
        with self._lock:
            watch = self._watch
        if watch is not None:
            watch.cancel()

    def _run(self) -> None:
        backoff = Backoff(self._backoff_max)
        last_error = ""
        while not self._stopping.is_set():
            try:
                self._observe()
                backoff.reset()
            except WatchCompacted as exc:
                log.info("%s: %s; reading again", self._election, exc)
            except Exception as exc:  # EtcdError, or a bug below us: never end the thread
                if self._stopping.is_set():
                    return
                if not isinstance(exc, EtcdError):
                    log.exception("%s: observe raised unexpectedly", self._election)
                if str(exc) != last_error:
                    log.info("%s: observe failed, retrying: %s", self._election, exc)
                    self._emit(ErrorReported(error=exc, where="observe"))
                    last_error = str(exc)
                self._stopping.wait(backoff.next())

    def _observe(self) -> None:
        resp = self._client.range(self._prefix, self._end)
        revision = int(resp.header.revision)
        candidates = {bytes(kv.key): kv for kv in resp.kvs
                      if is_candidate_key(self._prefix, bytes(kv.key))}
        first = _first(candidates)
        self._report(candidates, first, revision, force=False)
        watch = self._client.watch(self._prefix, self._end, start_revision=revision + 1)
        with self._lock:
            if self._stopping.is_set():
                watch.cancel()
                return
            self._watch = watch
        try:
            for wresp in watch:
                # O(1) per event: the first candidate changes only when it goes (then we
                # look again, once per response) or when its own key is written. With N
                # candidates each joining once, a full scan per event would cost N^2.
                touched = False
                lost_first = False
                for ev in wresp.events:
                    key = bytes(ev.kv.key)
                    if not is_candidate_key(self._prefix, key):
                        continue
                    if ev.type == kv_pb2.Event.DELETE:
                        candidates.pop(key, None)
                        lost_first = lost_first or key == first
                    else:
                        candidates[key] = ev.kv
                        if first is None or (not lost_first and ev.kv.create_revision
                                             < candidates[first].create_revision):
                            first = key
                    touched = touched or key == first or key == self._last_key
                if lost_first:
                    first = _first(candidates)
                # The view is that of the last event applied, not of the header: while etcd
                # sends a backlog, the header's revision is ahead of the events it carries.
                self._report(candidates, first, int(wresp.events[-1].kv.mod_revision),
                             force=touched)
        finally:
            watch.cancel()
            with self._lock:
                self._watch = None

    def _report(self, candidates: dict[bytes, Any], first: bytes | None, revision: int,
                *, force: bool) -> None:
        """Tell the dispatcher who leads. Skipped only when the leader is the one reported
        last in every field (key, create revision, lease, value) and no event touched its
        key (or the last reported one's): every put or delete of the leader's key is
        reported, and so is a new incarnation of the same key that a read after a gap finds
        (the leader resigned and won again alone while the stream was down)."""
        leader = None if first is None else leader_of({first: candidates[first]})
        if self._reported and leader == self._last and not force:
            return
        self._last, self._last_key, self._reported = leader, first, True
        self._emit(LeaderSeen(leader=leader, revision=revision))


def _first(candidates: dict[bytes, Any]) -> bytes | None:
    """The key with the lowest create revision (the leader's), or None."""
    if not candidates:
        return None
    return min(candidates, key=lambda k: candidates[k].create_revision)


class _Shared:
    """One Observer of an election serving every elector of that election on one client."""

    def __init__(self, client: EtcdClient, election: str, backoff_max: float) -> None:
        self.subscribers: list[Callable[[Event], None]] = []
        self.last: LeaderSeen | None = None
        self.lock = threading.Lock()
        self.observer = Observer(client, election, self.emit, backoff_max)

    def emit(self, event: Event) -> None:
        with self.lock:
            if isinstance(event, LeaderSeen):
                self.last = event
            subscribers = list(self.subscribers)
        for emit in subscribers:
            emit(event)


_SHARED: weakref.WeakKeyDictionary[EtcdClient, dict[str, _Shared]] = weakref.WeakKeyDictionary()
_SHARED_LOCK = threading.Lock()


class Subscription:
    """An elector's view of its election through the client's shared :class:`Observer`.

    Electors of one process that share a client and an election share one watch: with N
    of them, one stream and one pass over each event instead of N (N watchers each seeing
    N candidates join would cost N^2). A late subscriber is told the current leader at once
    (the dispatcher ignores a report older than one it has).
    """

    def __init__(self, client: EtcdClient, election: str, emit: Callable[[Event], None],
                 backoff_max: float = 2.0) -> None:
        self._client, self._election, self._emit = client, election, emit
        self._backoff_max = backoff_max
        self._shared: _Shared | None = None

    def start(self) -> None:
        with _SHARED_LOCK:
            by_election = _SHARED.setdefault(self._client, {})
            shared = by_election.get(self._election)
            first = shared is None
            if shared is None:
                shared = by_election[self._election] = _Shared(self._client, self._election,
                                                               self._backoff_max)
            with shared.lock:
                shared.subscribers.append(self._emit)
                last = shared.last
            self._shared = shared
        if first:
            shared.observer.start()
        elif last is not None:
            self._emit(last)

    def stop(self, timeout: float) -> None:
        shared, self._shared = self._shared, None
        if shared is None:
            return
        with _SHARED_LOCK:
            with shared.lock:
                shared.subscribers.remove(self._emit)
                idle = not shared.subscribers
            if idle:
                by_election = _SHARED.get(self._client, {})
                if by_election.get(self._election) is shared:
                    del by_election[self._election]
        if idle:
            shared.observer.stop(timeout)
