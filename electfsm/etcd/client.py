"""A thin etcd v3 adapter over gRPC, using the protobuf stubs that ship with ``python3-etcd3``.

Why not that package's client: a timeout there blacklists the endpoint for 300 s, its watcher
thread dies silently on a stream error, and calls without a timeout hang on a paused server.
Here every unary call has a deadline, every error is translated into an
:class:`~electfsm.errors.EtcdError` that says what happened, a channel that failed is closed and
rebuilt (on the next endpoint, when there are several), and watch streams belong to their caller.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
from etcd3 import etcdrpc

from electfsm import clock, logs
from electfsm.config import ElectorConfig
from electfsm.errors import (
    EtcdError,
    EtcdUnavailable,
    LeaseNotFound,
    PermissionDenied,
    WatchCompacted,
)
from electfsm.etcd.security import TLS, Auth

log = logs.logger("electfsm.etcd")

#: Watch and keepalive streams carry this so a member cut off from quorum fails them fast.
REQUIRE_LEADER = (("hasleader", "true"),)

_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    # Reconnect quickly after etcd comes back (gRPC's default backoff grows to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 5000),  # also the connect timeout
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Find a dead peer under a long-lived watch. etcd refuses pings more often than every 5 s.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.ping_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.enable_retries", 0),
]

_UNAVAILABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class TokenExpired(PermissionDenied):
    """etcd rejected our auth token (it expired); the next call authenticates again."""


def _tls_failure(details: str) -> str | None:
    """The TLS reason in a gRPC error's details, if the failure was a TLS one."""
    lowered = details.lower()
    for marker in ("certificate_verify_failed", "certificate verify failed", "ssl_error",
                   "handshake", "wrong_version_number", "tsi_", "ssl", "certificate"):
        if marker in lowered:
            return details.strip()[:300]
    return None


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` that makes a range or watch cover every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def to_bytes(value: str | bytes) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


class EtcdClient:
    """One gRPC channel to one of ``hosts`` (``host:port``), rebuilt on failure.

    ``timeout`` is the deadline of every unary call unless the call gives its own.
    Thread-safe: one client may serve every thread of an elector.
    """

    def __init__(self, hosts: Sequence[str], *, timeout: float = 2.0,
                 credentials: Any | None = None, auth: Auth | None = None,
                 server_name: str | None = None, client_cert: bool = False) -> None:
        if not hosts:
            raise ValueError("EtcdClient needs at least one host:port")
        self.hosts = tuple(hosts)
        self.timeout = timeout
        self._credentials = credentials
        self._auth = auth
        self._server_name = server_name
        self._client_cert = client_cert  # only to explain etcd's refusals
        self._token: str | None = None
        self._token_lock = threading.Lock()
        self._lock = threading.Lock()
        self._index = 0
        self._closed = False
        self._last_answer = float("-inf")
        self._channel: Any = None
        self._stubs: dict[str, Any] = {}
        self._ka_lock = threading.Lock()
        self._keepalives: _KeepAlives | None = None
        self._watches: _WatchStream | None = None
        self._connect()

    @classmethod
    def connect(cls, endpoints: str | Sequence[str], *, tls: TLS | None = None,
                auth: Auth | None = None, timeout: float = 2.0) -> EtcdClient:
        """A connection to share among several electors of one process::

            client = EtcdClient.connect(["127.0.0.1:2379"])
            shards = [Elector(client=client, election=f"shard/{i}", identity="node-a")
                      for i in range(100)]
        """
        config = ElectorConfig(endpoints=endpoints, election="x", identity="x",
                               call_timeout=timeout, tls=tls, auth=auth)
        return cls.for_config(config)

    @classmethod
    def for_config(cls, config: ElectorConfig) -> EtcdClient:
        """A client for an elector's endpoints, TLS and user."""
        return cls(config.hosts, timeout=config.call_timeout,
                   credentials=config.tls.credentials() if config.tls else None,
                   auth=config.auth, server_name=config.tls.server_name if config.tls else None,
                   client_cert=bool(config.tls and config.tls.cert))

    # ------------------------------------------------------------------ channel
    @property
    def endpoint(self) -> str:
        return self.hosts[self._index]

    def _connect(self) -> None:
        target = self.hosts[self._index]
        if self._credentials is not None:
            options = list(_CHANNEL_OPTIONS)
            if self._server_name:
                options.append(("grpc.ssl_target_name_override", self._server_name))
            self._channel = grpc.secure_channel(target, self._credentials, options)
        else:
            self._channel = grpc.insecure_channel(target, _CHANNEL_OPTIONS)
        self._stubs = {
            "kv": etcdrpc.KVStub(self._channel),
            "lease": etcdrpc.LeaseStub(self._channel),
            "watch": etcdrpc.WatchStub(self._channel),
            "maintenance": etcdrpc.MaintenanceStub(self._channel),
            "auth": etcdrpc.AuthStub(self._channel),
        }

    def _stub(self, name: str) -> tuple[Any, Any]:
        with self._lock:
            if self._closed:
                raise EtcdError("the etcd client is closed")
            return self._stubs[name], self._channel

    @property
    def has_auth(self) -> bool:
        return self._auth is not None

    def _answered(self, channel: Any) -> None:
        """A call on ``channel`` was answered: the link is alive."""
        if channel is self._channel:
            self._last_answer = clock.now()

    def _failed(self, channel: Any, *, timed_out: bool = False,
                waited: float | None = None) -> None:
        """Do not trust ``channel`` again: close it and connect anew (to the next host).

        A timeout alone is not proof of a dead link when other calls on the same channel
        were answered within the last call timeout (a busy server, or many electors sharing
        this client): then the channel is kept, or one slow call would cut every stream.
        """
        with self._lock:
            if self._closed or channel is not self._channel:
                return  # someone else already rebuilt it
            window = self.timeout if waited is None else min(self.timeout, waited)
            if timed_out and clock.now() - self._last_answer < window:
                return
            old = self._channel
            self._index = (self._index + 1) % len(self.hosts)
            log.debug("rebuilding etcd channel, now to %s", self.hosts[self._index])
            self._connect()
            self._last_answer = float("-inf")
        old.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            channel = self._channel
        with self._ka_lock:
            streams = (self._keepalives, self._watches)
            self._keepalives = self._watches = None
        for stream in streams:  # their threads are gone when close() returns
            if stream is not None:
                stream.close(EtcdError("the etcd client is closed"), wait=2.0)
        channel.close()

    # ------------------------------------------------------------------ auth
    def metadata(self, *, stream: bool = False,
                 timeout: float | None = None) -> tuple[tuple[str, str], ...]:
        """gRPC metadata for a call: the auth token, and require-leader on streams.

        Getting a token may mean authenticating (or waiting for another call that does):
        that takes ``timeout`` at most (default: the client's), so a caller with a deadline
        passes what it has left."""
        md = REQUIRE_LEADER if stream else ()
        if self._auth is None:
            return md
        return (*md, ("token", self._current_token(self.timeout if timeout is None
                                                   else timeout)))

    def _current_token(self, timeout: float) -> str:
        assert self._auth is not None
        what = f"authenticate as {self._auth.user!r}"
        until = clock.now() + timeout
        if not self._token_lock.acquire(timeout=max(0.0, timeout)):
            raise EtcdUnavailable(f"{what}: another call was still renewing the auth token "
                                  f"after {timeout:.2f}s; is etcd at "
                                  f"{self.hosts[self._index]} answering?")
        try:
            if self._token is None:
                left = until - clock.now()
                if left <= 0:
                    raise EtcdUnavailable(f"{what}: no time left to renew the auth token "
                                          f"within {timeout:.2f}s")
                self._token = self._authenticate(left)
            return self._token
        finally:
            self._token_lock.release()

    def _authenticate(self, timeout: float) -> str:
        assert self._auth is not None
        stub, channel = self._stub("auth")
        request = etcdrpc.AuthenticateRequest(name=self._auth.user, password=self._auth.password)
        try:
            token = str(stub.Authenticate(request, timeout=timeout).token)
        except grpc.RpcError as exc:
            raise self._translate(exc, f"authenticate as {self._auth.user!r}", channel,
                                  timeout) from None
        self._answered(channel)
        return token

    def _forget_token(self) -> None:
        log.info("etcd rejected our auth token (expired?); authenticating again")
        with self._token_lock:
            self._token = None

    # ------------------------------------------------------------------ errors
    def _translate(self, exc: grpc.RpcError, what: str, channel: Any,
                   timeout: float | None) -> EtcdError:
        code = exc.code() if hasattr(exc, "code") else None
        details = (exc.details() if hasattr(exc, "details") else "") or ""
        where = f"etcd at {self.hosts[self._index]}"
        if code in _UNAVAILABLE:
            self._failed(channel, timed_out=code == grpc.StatusCode.DEADLINE_EXCEEDED,
                         waited=timeout)
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return EtcdUnavailable(f"{what}: {where} did not answer within {timeout}s; "
                                       "is it running and reachable?")
            tls = _tls_failure(details) if self._credentials is not None else None
            if tls is not None:
                return EtcdUnavailable(f"{what}: TLS with {where} failed ({tls}); check the "
                                       "CA (--cacert), the client certificate and key, and "
                                       "that the endpoint speaks TLS")
            if details.startswith("etcdserver:"):
                # etcd answered but could not commit or serve the request in time
                return EtcdUnavailable(f"{what}: {where} could not serve it ({details}); "
                                       "the cluster may be without a leader or quorum; "
                                       "retry shortly, or check the other members")
            hint = ("" if self._credentials is not None else
                    "; if it serves TLS (https), pass tls=TLS(ca=...) (CLI: --cacert)")
            return EtcdUnavailable(f"{what}: cannot reach {where} ({details}); check the "
                                   f"endpoint and that etcd is running{hint}")
        if "invalid auth token" in details or "auth: revision in header is old" in details:
            self._forget_token()
            return TokenExpired(f"{what}: etcd no longer accepts our auth token; "
                                "authenticating again")
        if "user name is empty" in details:
            return PermissionDenied(f"{what}: {where} has authentication enabled; pass "
                                    "auth=Auth(user=..., password=...) (CLI: --user)")
        if "authentication failed" in details:
            user = self._auth.user if self._auth else "?"
            return PermissionDenied(f"{what}: {where} refused user {user!r}: wrong user name or "
                                    "password")
        if code == grpc.StatusCode.NOT_FOUND and "lease" in details:
            return LeaseNotFound(f"{what}: etcd no longer knows the lease ({details})")
        if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in details:
            return WatchCompacted(f"{what}: {details}", 0)
        if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
            user = f"user {self._auth.user!r}" if self._auth else "this client"
            if self._auth is None and self._client_cert:
                user += (" (with a client certificate and no user, etcd takes the "
                         "certificate's common name as the user)")
            return PermissionDenied(f"{what}: {where} refused it for {user} ({details}); grant "
                                    "the role read-write on the election's prefix")
        if code == grpc.StatusCode.CANCELLED:
            return EtcdUnavailable(f"{what}: the call was cancelled ({details})")
        name = code.name if code is not None else type(exc).__name__
        return EtcdError(f"{what}: {where} answered {name}: {details}")

    def _unary(self, stub_name: str, method: str, request: Any, what: str,
               timeout: float | None = None) -> Any:
        timeout = self.timeout if timeout is None else timeout
        until = clock.now() + timeout  # the auth token renewal and a retry included
        for attempt in (1, 2):
            stub, channel = self._stub(stub_name)
            try:
                metadata = self.metadata(timeout=until - clock.now())
                left = until - clock.now()
                if left <= 0:
                    raise EtcdUnavailable(f"{what}: no time left after renewing the auth "
                                          f"token within {timeout}s")
                resp = getattr(stub, method)(request, timeout=left, metadata=metadata)
                self._answered(channel)
                return resp
            except grpc.RpcError as exc:
                error = self._translate(exc, what, channel, timeout)
                if isinstance(error, TokenExpired) and attempt == 1:
                    continue
                raise error from None
            except ValueError as exc:  # the channel was closed under us (by a rebuild)
                self._failed(channel)  # rebuilds it unless that already happened
                raise EtcdUnavailable(f"{what}: the connection was rebuilt ({exc})") from None
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ KV
    def range(self, key: bytes, range_end: bytes = b"", *, limit: int = 0,
              sort_target: str = "KEY", sort_order: str = "NONE", keys_only: bool = False,
              max_create_revision: int = 0, revision: int = 0,
              timeout: float | None = None, what: str | None = None) -> Any:
        request = etcdrpc.RangeRequest(
            key=key, range_end=range_end, limit=limit, keys_only=keys_only,
            sort_target=getattr(etcdrpc.RangeRequest, sort_target),
            sort_order=getattr(etcdrpc.RangeRequest, sort_order),
            max_create_revision=max_create_revision, revision=revision,
        )
        return self._unary("kv", "Range", request, what or f"read {key!r}", timeout)

    def put(self, key: bytes, value: bytes, *, lease: int = 0,
            timeout: float | None = None) -> Any:
        request = etcdrpc.PutRequest(key=key, value=value, lease=lease)
        return self._unary("kv", "Put", request, f"put {key!r}", timeout)

    def delete(self, key: bytes, range_end: bytes = b"", *, timeout: float | None = None) -> Any:
        request = etcdrpc.DeleteRangeRequest(key=key, range_end=range_end)
        return self._unary("kv", "DeleteRange", request, f"delete {key!r}", timeout)

    def txn(self, compare: Sequence[Any], success: Sequence[Any], failure: Sequence[Any] = (),
            *, timeout: float | None = None, what: str = "transaction") -> Any:
        request = etcdrpc.TxnRequest(compare=list(compare), success=list(success),
                                     failure=list(failure))
        return self._unary("kv", "Txn", request, what, timeout)

    def compact(self, revision: int, *, timeout: float | None = None) -> Any:
        request = etcdrpc.CompactionRequest(revision=revision, physical=True)
        return self._unary("kv", "Compact", request, f"compact at {revision}", timeout)

    # ------------------------------------------------------------------ leases
    def grant(self, ttl: int, *, timeout: float | None = None) -> tuple[int, int]:
        """Grant a lease; returns (lease id, the TTL etcd granted)."""
        resp = self._unary("lease", "LeaseGrant", etcdrpc.LeaseGrantRequest(TTL=ttl),
                           f"grant a {ttl}s lease", timeout)
        if resp.error:
            raise EtcdError(f"grant a {ttl}s lease: etcd said {resp.error}")
        return int(resp.ID), int(resp.TTL)

    def keepalive(self, lease: int, *, timeout: float | None = None) -> int:
        """Renew ``lease`` once; returns the TTL etcd answered (0 or less: the lease is gone).

        Every lease of this client is renewed over one shared LeaseKeepAlive stream (as Go's
        lessor does): opening a stream per renewal costs a gRPC stream and a thread each
        time, which 1,000 electors renewing every TTL/3 cannot afford.
        """
        timeout = self.timeout if timeout is None else timeout
        until = clock.now() + timeout  # opening the stream (and renewing the token) included
        what = f"keep lease {lease:x} alive"
        stream = self._keepalive_stream(what, until)
        left = until - clock.now()
        if left <= 0:
            raise EtcdUnavailable(f"{what}: no time left to send it after opening the "
                                  f"keepalive stream within {timeout}s")
        try:
            return stream.renew(lease, left)
        except _NoAnswer:
            self._failed(stream.channel, timed_out=True, waited=left)
            raise EtcdUnavailable(f"{what}: etcd at {self.hosts[self._index]} did not answer "
                                  f"within {timeout}s; is it running and reachable?") from None

    def _keepalive_stream(self, what: str, until: float) -> _KeepAlives:
        """The shared keepalive stream, opened if needed, by ``until`` (on the package clock)
        at the latest. A new stream needs the auth token, and renewing it is a call: that is
        done outside ``_ka_lock``, which would hold up every other lease of this client."""
        metadata: tuple[tuple[str, str], ...] | None = None
        while True:
            if not self._ka_lock.acquire(timeout=max(0.0, until - clock.now())):
                raise EtcdUnavailable(f"{what}: another thread was still opening the "
                                      "keepalive stream; no time left")
            try:
                stream = self._keepalives
                if stream is not None and stream.usable(self._channel):
                    return stream
                if metadata is not None or self._auth is None:
                    stub, channel = self._stub("lease")
                    try:
                        stream = _KeepAlives(self, stub, channel,
                                             metadata or self.metadata(stream=True))
                    except ValueError as exc:  # the channel was closed under us (a rebuild)
                        self._failed(channel)
                        raise EtcdUnavailable(f"{what}: connection rebuilt ({exc})") from None
                    self._keepalives = stream
                    return stream
            finally:
                self._ka_lock.release()
            metadata = self.metadata(stream=True, timeout=until - clock.now())

    def revoke(self, lease: int, *, timeout: float | None = None) -> None:
        """Revoke ``lease`` (deleting every key attached to it); a lease already gone is fine."""
        with contextlib.suppress(LeaseNotFound):
            self._unary("lease", "LeaseRevoke", etcdrpc.LeaseRevokeRequest(ID=lease),
                        f"revoke lease {lease:x}", timeout)

    def time_to_live(self, lease: int, *, keys: bool = False,
                     timeout: float | None = None) -> Any:
        request = etcdrpc.LeaseTimeToLiveRequest(ID=lease, keys=keys)
        return self._unary("lease", "LeaseTimeToLive", request, f"TTL of lease {lease:x}",
                           timeout)

    def status(self, *, timeout: float | None = None) -> Any:
        return self._unary("maintenance", "Status", etcdrpc.StatusRequest(), "status", timeout)

    # ------------------------------------------------------------------ watch
    def watch(self, key: bytes, range_end: bytes = b"", *, start_revision: int = 0,
              no_put: bool = False) -> Watch:
        """Open a watch stream owned by the caller (iterate it; ``cancel()`` from anywhere)."""
        filters = [etcdrpc.WatchCreateRequest.NOPUT] if no_put else []
        create = etcdrpc.WatchCreateRequest(key=key, range_end=range_end,
                                            start_revision=start_revision, filters=filters)
        return Watch(self, create, key)

    def _watch_stream(self, what: str) -> _WatchStream:
        with self._ka_lock:
            stream = self._watches
            if stream is not None and stream.usable(self._channel):
                return stream
            stub, channel = self._stub("watch")
            try:
                stream = _WatchStream(self, stub, channel)
            except ValueError as exc:  # the channel was closed under us (by a rebuild)
                self._failed(channel)
                raise EtcdUnavailable(f"{what}: connection rebuilt ({exc})") from None
            self._watches = stream
            return stream


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
    :class:`~electfsm.errors.EtcdError`; :meth:`cancel` ends it, from any thread."""

    def __init__(self, client: EtcdClient, create: Any, key: bytes) -> None:
        self._key = key
        self._items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.cancelled = False
        self.watch_id: int | None = None
        self._stream = client._watch_stream(f"watch {key!r}")
        while not self._stream.add(self, create):  # retired meanwhile: the next one is fresh
            self._stream = client._watch_stream(f"watch {key!r}")

    def _deliver(self, item: Any) -> None:
        self._items.put(item)

    def __iter__(self) -> Iterator[Any]:
        what = f"watch {self._key!r}"
        while True:
            item = self._items.get()
            if self.cancelled:
                return
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
            if item.events:
                yield item

    def cancel(self) -> None:
        self._stream.cancel(self)
