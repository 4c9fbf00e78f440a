"""A thin etcd v3 adapter over gRPC, using the protobuf stubs that ship with ``python3-etcd3``.

Why not that package's client: a timeout there blacklists the endpoint for 300 s, its watcher
thread dies silently on a stream error, and calls without a timeout hang on a paused server.
Here every unary call has a deadline, every error is translated into an
:class:`~electfsm.errors.EtcdError` that says what happened, a channel that failed is closed and
rebuilt (on the next endpoint, when there are several), and watch streams belong to their caller.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from etcd3 import etcdrpc

from electfsm import clock, logs
from electfsm.errors import (
    EtcdError,
    EtcdUnavailable,
    LeaseNotFound,
    PermissionDenied,
    WatchCompacted,
)
from electfsm.etcd.keepalive import _KeepAlives, _NoAnswer
from electfsm.etcd.security import TLS, Auth
from electfsm.etcd.watch import Watch, _WatchStream
from electfsm.etcd.wire import (
    _CHANNEL_OPTIONS,
    _UNAVAILABLE,
    REQUIRE_LEADER,
    TokenExpired,
    _tls_failure,
)

if TYPE_CHECKING:
    from electfsm.config import ElectorConfig

log = logs.logger("electfsm.etcd")


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

        The caller closes it (:meth:`close`) after stopping the electors.
        """
        from electfsm.config import ElectorConfig  # here: config imports our TLS and Auth

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
        """Close every channel and stream of this connection; call after stopping its electors."""
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
              no_put: bool = False, on_event: Callable[[Any], None] | None = None,
              on_error: Callable[[EtcdError], None] | None = None) -> Watch:
        """Open a watch owned by the caller: iterate it, or give ``on_event``/``on_error``
        to be called from the stream's reader (see :class:`Watch`); ``cancel()`` from
        anywhere."""
        filters = [etcdrpc.WatchCreateRequest.NOPUT] if no_put else []
        create = etcdrpc.WatchCreateRequest(key=key, range_end=range_end,
                                            start_revision=start_revision, filters=filters)
        return Watch(self, create, key, on_event, on_error)

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
