"""observe: one prefix watch on the election; reports who leads, including "nobody".

It keeps every candidate (``<election>/<lease hex>``) it knows of, read at a pinned revision
and then updated by PUT and DELETE events from the next revision on. The leader is the
candidate with the lowest create revision. On a broken stream or compaction it reads again
and watches again from that read's revision + 1, so no change is lost.

It has no thread of its own. The watch's events are applied by the connection's watch reader
as they come (a dictionary update and, when the leader changed, one event queued to the
dispatcher); the reads run on the connection's read thread (:class:`_Reads`), which exists
only while a read is due. An idle election costs no thread at all.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import threading
import weakref
from collections.abc import Callable
from typing import Any

from etcd3.etcdrpc import kv_pb2

from electfsm import clock, logs
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


class _View:
    """The candidates one read found, kept up to date by its watch's events."""

    def __init__(self, candidates: dict[bytes, Any]) -> None:
        self.candidates = candidates
        self.first = _first(candidates)
        self.heard = False  # its watch has delivered events
        self.deleted: list[bytes] = []  # candidates deleted since the last report


class Observer:
    """Watches an election and emits :class:`LeaderSeen` whenever its leader changes."""

    def __init__(self, client: EtcdClient, election: str, emit: Callable[[Event], None],
                 backoff_max: float = 2.0) -> None:
        self._client = client
        self._election = election
        self._emit = emit
        self._prefix = (election + "/").encode()
        self._end = prefix_end(self._prefix)
        self._backoff = Backoff(backoff_max)
        self._last_error = ""
        self._stopping = False
        #: Held while the view changes and while it is reported: a read (on the read thread)
        #: and the watch's events (on the watch reader) take turns; ``stop()`` waits for it.
        self._lock = threading.Lock()
        self._view: _View | None = None  # the current read's; events of any other are stale
        self._watch: Watch | None = None
        self._not_reading = threading.Event()
        self._not_reading.set()
        self._last: LeaderInfo | None = None
        self._last_key: bytes | None = None
        self._reported = False

    def start(self) -> None:
        _reads(self._client).schedule(0.0, self._read)

    def stop(self, timeout: float) -> None:
        """No event is emitted once this returns; a read under way is waited for."""
        with self._lock:
            self._stopping = True
            watch, self._watch, self._view = self._watch, None, None
        if watch is not None:
            watch.cancel()
        end = clock.now() + timeout
        self._not_reading.wait(timeout)
        # A read it still had due (a backoff after a failure) is dropped; the read thread,
        # if nothing else is due, ends now rather than outlive the observers it served.
        idle = _reads(self._client).drop(self)
        if idle is not None and idle is not threading.current_thread():
            idle.join(max(0.0, end - clock.now()))

    def resync(self) -> None:
        """Drop the current stream and read again (e.g. after the session came back)."""
        with self._lock:
            watch, self._watch = self._watch, None
            if watch is None or self._stopping:
                return  # a read is due or under way already: it is fresh
            self._view = None
        watch.cancel()
        _reads(self._client).schedule(0.0, self._read)

    # ------------------------------------------------------------------ on the read thread
    def _read(self) -> None:
        with self._lock:
            if self._stopping:
                return
            self._not_reading.clear()
        try:
            self._read_and_watch()
        except Exception as exc:  # EtcdError, or a bug below us: never stop observing
            self._failed(exc)
        finally:
            self._not_reading.set()

    def _read_and_watch(self) -> None:
        resp = self._client.range(self._prefix, self._end)
        revision = int(resp.header.revision)
        view = _View({bytes(kv.key): kv for kv in resp.kvs
                      if is_candidate_key(self._prefix, bytes(kv.key))})
        with self._lock:
            if self._stopping:
                return
            self._view = view
            self._report(view, revision, force=False, read=True)
        watch = self._client.watch(self._prefix, self._end, start_revision=revision + 1,
                                   on_event=functools.partial(self._on_event, view),
                                   on_error=functools.partial(self._on_error, view))
        with self._lock:
            current = self._view is view  # else it failed already, or stop()/resync() came
            if current:
                self._watch = watch
        if not current:
            watch.cancel()

    def _failed(self, exc: Exception) -> None:
        with self._lock:  # stop() either sees this read scheduled (and drops it) or wins
            if self._stopping:
                return
            if isinstance(exc, WatchCompacted):
                log.info("%s: %s; reading again", self._election, exc)
                _reads(self._client).schedule(0.0, self._read)
                return
            if not isinstance(exc, EtcdError):
                log.error("%s: observe raised unexpectedly", self._election, exc_info=exc)
            if str(exc) != self._last_error:  # report each new problem once, not every retry
                log.info("%s: observe failed, retrying: %s", self._election, exc)
                self._emit(ErrorReported(error=exc, where="observe"))
                self._last_error = str(exc)
            _reads(self._client).schedule(self._backoff.next(), self._read)

    # ------------------------------------------------------------------ on the watch reader
    def _on_error(self, view: _View, exc: EtcdError) -> None:
        with self._lock:
            if self._view is not view or self._stopping:
                return
            self._view = None
            watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()
        self._failed(exc)

    def _on_event(self, view: _View, wresp: Any) -> None:
        with self._lock:
            if self._view is not view or self._stopping:
                return
            if not view.heard:
                view.heard = True
                self._backoff.reset()  # the stream works again
            candidates, first = view.candidates, view.first
            # O(1) per event: the first candidate changes only when it goes (then we look
            # again, once per response) or when its own key is written. With N candidates
            # each joining once, a full scan per event would cost N^2.
            touched = False
            lost_first = False
            for ev in wresp.events:
                key = bytes(ev.kv.key)
                if not is_candidate_key(self._prefix, key):
                    continue
                if ev.type == kv_pb2.Event.DELETE:
                    if candidates.pop(key, None) is not None:
                        view.deleted.append(key)
                    lost_first = lost_first or key == first
                else:
                    candidates[key] = ev.kv
                    if first is None or (not lost_first and ev.kv.create_revision
                                         < candidates[first].create_revision):
                        first = key
                touched = touched or key == first or key == self._last_key
            if lost_first:
                first = _first(candidates)
            view.first = first
            # The view is that of the last event applied, not of the header: while etcd
            # sends a backlog, the header's revision is ahead of the events it carries.
            self._report(view, int(wresp.events[-1].kv.mod_revision), force=touched)

    def _report(self, view: _View, revision: int, *, force: bool, read: bool = False) -> None:
        """Tell the dispatcher who leads (with the lock held). Skipped only when the leader
        is the one reported last in every field (key, create revision, lease, value), no
        event touched its key (or the last reported one's) and no candidate was deleted:
        every put or delete of the leader's key is reported, so is every candidate's delete
        (a follower whose key went must campaign again), and so is a new incarnation of the
        same key that a read after a gap finds (the leader resigned and won again alone
        while the stream was down). A read's view is always reported, with every key it found
        (a waiting candidate whose key is not among them campaigns again)."""
        first = view.first
        leader = None if first is None else leader_of({first: view.candidates[first]})
        deleted, view.deleted = view.deleted, []
        if self._reported and leader == self._last and not (force or deleted or read):
            return
        self._last, self._last_key, self._reported = leader, first, True
        present = (frozenset(k.decode("utf-8", "backslashreplace") for k in view.candidates)
                   if read else None)
        self._emit(LeaderSeen(
            leader=leader, revision=revision, present=present,
            deleted=tuple(k.decode("utf-8", "backslashreplace") for k in deleted)))


class _Reads:
    """The reads observers of one connection need, run one at a time, each when it is due,
    on a thread that exists only while one is due (a backoff after a failure keeps it)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._reading = False  # the thread is running a read (not waiting for one)

    def schedule(self, delay: float, read: Callable[[], None]) -> None:
        with self._cond:
            entry = (clock.now() + delay, next(self._order), read)
            heapq.heappush(self._due, entry)
            self._cond.notify()
            if self._thread is not None:
                return
            # Started under the lock: nobody sees a thread that is not running yet.
            thread = self._thread = threading.Thread(target=self._run, daemon=True,
                                                     name="electfsm-observe-reads")
            try:
                thread.start()
            except BaseException:
                self._thread = None
                self._due.remove(entry)
                heapq.heapify(self._due)
                raise

    def drop(self, observer: Observer) -> threading.Thread | None:
        """Forget the reads due for ``observer``. Returns the thread when it has nothing
        left to do (it ends at once), so the caller may wait for it; None when it serves
        other observers still, or is gone."""
        with self._cond:
            self._due = [d for d in self._due if getattr(d[2], "__self__", None) is not observer]
            heapq.heapify(self._due)
            self._cond.notify()
            return self._thread if not self._due and not self._reading else None

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if not self._due:
                        self._thread = None  # decided under the lock schedule() takes
                        return
                    wait = self._due[0][0] - clock.now()
                    if wait <= 0:
                        read = heapq.heappop(self._due)[2]
                        self._reading = True
                        break
                    self._cond.wait(wait)
            try:
                read()
            except Exception:  # a read reports its own failures; this is a bug of ours
                log.exception("observe: a read failed unexpectedly")
            finally:
                with self._cond:
                    self._reading = False


_READS: weakref.WeakKeyDictionary[EtcdClient, _Reads] = weakref.WeakKeyDictionary()
_READS_LOCK = threading.Lock()


def _reads(client: EtcdClient) -> _Reads:
    with _READS_LOCK:
        reads = _READS.get(client)
        if reads is None:
            reads = _READS[client] = _Reads()
        return reads


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
