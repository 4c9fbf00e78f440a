"""The watch stream: one Watch stream per connection for all its watches, a reader thread
that routes each response, and :class:`Watch`, the iterator a caller holds."""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc
from etcd3 import etcdrpc

from electfsm import logs
from electfsm.errors import (
    EtcdError,
    EtcdUnavailable,
    WatchCompacted,
)

if TYPE_CHECKING:
    from electfsm.etcd.client import EtcdClient

log = logs.logger("electfsm.etcd")


class _WatchStream:
    """The Watch stream of one channel, shared by every watch of the client (as Go's client
    multiplexes its watchers on one stream).

    One stream and one reader thread per connection, instead of a stream, a request thread
    and a thread blocked in gRPC per watch: gRPC wakes every thread blocked on a stream ten
    times a second, which for 1,000 followers each watching its predecessor was most of the
    processes' idle CPU. etcd answers the create requests of a stream in order, so each
    ``created`` answer belongs to the oldest watch still waiting for one; later answers carry
    the watch id it assigned. When the stream fails, every watch on it gets the error.
    """

    def __init__(self, client: EtcdClient, stub: Any, channel: Any) -> None:
        self._client = client
        self.channel = channel
        self._lock = threading.Lock()
        self._pending: collections.deque[Watch] = collections.deque()
        self._active: dict[int, Watch] = {}
        self._dead: EtcdError | None = None
        self._retired = False  # no new watches here; closed once its last watch goes
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._call = stub.Watch(iter(self._requests.get, None),
                                metadata=client.metadata(stream=True))
        self._reader = threading.Thread(target=self._read, daemon=True, name="electfsm-watch")
        self._reader.start()

    def usable(self, channel: Any) -> bool:
        return self._dead is None and not self._retired and channel is self.channel

    def add(self, watch: Watch, create: Any) -> bool:
        """Send ``watch``'s create request; False when the stream was retired since the
        caller picked it (and may be closed already): the watch belongs on a fresh one."""
        with self._lock:
            if self._retired:
                return False
            if self._dead is not None:
                raise self._dead
            self._pending.append(watch)
            self._requests.put(etcdrpc.WatchRequest(create_request=create))
            return True

    def cancel(self, watch: Watch) -> None:
        """End ``watch`` here and at etcd. Under the stream's lock, so it cannot slip between
        the reader's look at ``watch.cancelled`` and its taking the ``created`` answer: one
        still waiting for that answer is cancelled at etcd when it comes (see :meth:`_route`)."""
        with self._lock:
            if watch.cancelled:
                return
            watch.cancelled = True
            watch._deliver(None)  # wakes its iterator
            watch_id = watch.watch_id
            if (watch_id is None or self._active.pop(watch_id, None) is None
                    or self._dead is not None):
                return
            self._requests.put(etcdrpc.WatchRequest(
                cancel_request=etcdrpc.WatchCancelRequest(watch_id=watch_id)))
            idle = self._idle()
        if idle:
            self.close(EtcdUnavailable("watch: stream retired"))

    def _idle(self) -> bool:
        """Retired and serving no watch: nothing will use it again (call with the lock)."""
        return self._retired and not self._active and not self._pending

    def _retire(self) -> None:
        """etcd refused a watch at creation: with auth on, that is also how an expired token
        shows (etcd checks the stream's token at each create), so new watches go to a new
        stream with a fresh token; the watches already on this one keep going."""
        self._retired = True
        if self._client.has_auth:
            self._client._forget_token()

    def _read(self) -> None:
        try:
            error = self._follow()
        except Exception as exc:  # a bug of ours: fail every watch rather than hang them all
            log.exception("watch stream: its reader failed; failing every watch on it")
            self.close(EtcdError(f"watch stream: its reader failed ({exc!r}); watch again"))
            return
        self._end(error)

    def _follow(self) -> EtcdError:
        """Route every answer until the stream ends; returns why it ended."""
        try:
            for resp in self._call:
                self._client._answered(self.channel)
                self._route(resp)
            return EtcdUnavailable("watch stream: it ended")
        except grpc.RpcError as exc:
            return (self._dead if self._dead is not None else
                    self._client._translate(exc, "watch stream", self.channel, None))
        except ValueError as exc:  # the channel was closed (a rebuild)
            return EtcdUnavailable(f"watch stream: connection rebuilt ({exc})")

    def _route(self, resp: Any) -> None:
        watch_id = int(resp.watch_id)
        with self._lock:
            if resp.created:
                if not self._pending:
                    return
                # Taken off the line only once settled: should anything here raise, the
                # watch is still on the stream, and so gets the stream's error.
                watch = self._pending[0]
                if resp.canceled:  # refused at creation (e.g. permission): watch_id is -1
                    self._retire()
                elif watch.cancelled:  # cancelled while its create was in flight
                    self._requests.put(etcdrpc.WatchRequest(
                        cancel_request=etcdrpc.WatchCancelRequest(watch_id=watch_id)))
                else:
                    if _created_seam is not None:
                        _created_seam(watch)
                    watch.watch_id = watch_id
                    self._active[watch_id] = watch
                self._pending.popleft()
                idle = self._idle()
            else:
                watch = self._active.get(watch_id)  # type: ignore[assignment]
                if watch is None:
                    return  # a watch we cancelled
                if resp.canceled:  # compacted, or cancelled by etcd: it ends here
                    del self._active[watch_id]
                idle = self._idle()
        if not watch.cancelled:
            watch._deliver(resp)
        if idle:  # a retired stream's last watch ended: close it, or it leaks a reader thread
            self.close(EtcdUnavailable("watch: stream retired"))

    def _end(self, error: EtcdError) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = error
            watches = [*self._pending, *self._active.values()]
            self._pending.clear()
            self._active.clear()
        for watch in watches:
            watch._deliver(self._dead)

    def close(self, error: EtcdError, *, wait: float = 0.0) -> None:
        """End the stream; ``wait`` > 0 also waits that long for its reader thread."""
        self._end(error)
        self._requests.put(None)
        self._call.cancel()
        if wait > 0 and threading.current_thread() is not self._reader:
            self._reader.join(wait)


#: Test-only seam: called (with the stream's lock held) as a ``created`` answer is matched to
#: a live watch, just before the watch takes its id; lets a test race ``cancel()`` against it.
_created_seam: Callable[[Watch], None] | None = None


class Watch:
    """One etcd watch (on the client's shared watch stream). Iterating yields
    ``WatchResponse`` messages with events; errors come out as
    :class:`~electfsm.errors.EtcdError`; :meth:`cancel` ends it, from any thread.

    With ``on_event``/``on_error`` it holds no queue and is not iterated: the stream's reader
    thread calls ``on_event(response)`` for each response with events, in order, and
    ``on_error(error)`` once when the watch fails (compaction, etcd's cancel, the stream's
    end). Both must return quickly and never block: every watch of the connection waits
    behind them. Nothing is called once :meth:`cancel` has returned, except one call already
    under way.
    """

    def __init__(self, client: EtcdClient, create: Any, key: bytes,
                 on_event: Callable[[Any], None] | None = None,
                 on_error: Callable[[EtcdError], None] | None = None) -> None:
        self._key = key
        self._on_event = on_event
        self._on_error = on_error
        self._items: queue.SimpleQueue[Any] | None = (
            queue.SimpleQueue() if on_event is None else None)
        self.cancelled = False
        self.watch_id: int | None = None
        self._stream = client._watch_stream(f"watch {key!r}")
        while not self._stream.add(self, create):  # retired meanwhile: the next one is fresh
            self._stream = client._watch_stream(f"watch {key!r}")

    def _deliver(self, item: Any) -> None:
        if self._items is not None:
            self._items.put(item)
            return
        if item is None or self.cancelled:  # None: cancel() waking an iterator
            return
        try:
            resp = self._check(item)
        except EtcdError as exc:
            self._call(self._on_error, exc)
            return
        if resp is not None:
            self._call(self._on_event, resp)

    def _call(self, fn: Callable[[Any], None] | None, arg: Any) -> None:
        """A callback's failure is its watch's, never the reader's (which serves them all)."""
        try:
            if fn is not None:
                fn(arg)
        except Exception as exc:
            log.exception("watch %r: its handler failed", self._key)
            if fn is not self._on_error and self._on_error is not None:
                self._on_error(EtcdError(f"watch {self._key!r}: its handler failed ({exc!r})"))

    def _check(self, item: Any) -> Any:
        """``item`` as a response with events (None: without), or the error it carries."""
        what = f"watch {self._key!r}"
        if isinstance(item, WatchCompacted):
            raise item
        if isinstance(item, EtcdError):  # the shared stream failed: each watch says so
            raise type(item)(f"{what}: {item}")
        if item.compact_revision:
            raise WatchCompacted(f"{what}: revision compacted up to {item.compact_revision}",
                                 int(item.compact_revision))
        if item.canceled:
            reason = item.cancel_reason or "no reason given"
            raise EtcdError(f"{what}: etcd cancelled it ({reason})")
        return item if item.events else None

    def __iter__(self) -> Iterator[Any]:
        if self._items is None:
            raise TypeError("a watch with on_event is not iterated: its reader calls it")
        while True:
            item = self._items.get()
            if self.cancelled:
                return
            resp = self._check(item)
            if resp is not None:
                yield resp

    def cancel(self) -> None:
        """End this watch, here and at etcd; from any thread."""
        self._stream.cancel(self)
