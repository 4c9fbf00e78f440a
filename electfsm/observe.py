"""observe: one prefix watch on the election; reports who leads, including "nobody".

It keeps every candidate (``<election>/<lease hex>``) it knows of, read at a pinned revision
and then updated by PUT and DELETE events from the next revision on. The leader is the
candidate with the lowest create revision. On a broken stream or compaction it reads again
and watches again from that read's revision + 1, so no change is lost.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from etcd3.etcdrpc import kv_pb2

from electfsm.backoff import Backoff
from electfsm.campaign import is_candidate_key
from electfsm.errors import EtcdError, WatchCompacted
from electfsm.etcd import EtcdClient, Watch, prefix_end
from electfsm.events import ErrorReported, Event, LeaderInfo, LeaderSeen

log = logging.getLogger("electfsm.observe")


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
        self._report(candidates, revision)
        watch = self._client.watch(self._prefix, self._end, start_revision=revision + 1)
        with self._lock:
            if self._stopping.is_set():
                watch.cancel()
                return
            self._watch = watch
        try:
            for wresp in watch:
                touched: set[bytes] = set()
                for ev in wresp.events:
                    key = bytes(ev.kv.key)
                    if not is_candidate_key(self._prefix, key):
                        continue
                    touched.add(key)
                    if ev.type == kv_pb2.Event.DELETE:
                        candidates.pop(key, None)
                    else:
                        candidates[key] = ev.kv
                self._report(candidates, int(wresp.header.revision), touched)
        finally:
            watch.cancel()
            with self._lock:
                self._watch = None

    def _report(self, candidates: dict[bytes, Any], revision: int,
                touched: set[bytes] | None = None) -> None:
        """Tell the dispatcher who leads. Skipped only when nothing about the leader changed
        (identity, key, create revision, lease) and no event in this response touched its
        key: every put or delete of the leader's key is reported."""
        leader = leader_of(candidates)
        if (self._reported and leader == self._last
                and not (touched and self._last_key in touched)):
            return
        self._last, self._reported = leader, True
        self._last_key = None if leader is None else min(
            candidates, key=lambda k: candidates[k].create_revision)
        self._emit(LeaderSeen(leader=leader, revision=revision))
