"""Session: one lease, and one keepalive schedule, shared by many elections.

Leadership per shard is the common way to spread work: every node runs for every shard. With
a session, that costs etcd one lease per process, as Go's ``concurrency.Session`` does::

    from electfsm import Elector, Session

    with Session(endpoints=["127.0.0.1:2379"], ttl=5) as session:
        shards = [Elector(session=session, election=f"jobs/shard-{i}", identity="node-a")
                  for i in range(100)]
        for elector in shards:
            elector.start()
        ...                                    # leaving the session stops them all

Each elector keeps its own machine, hooks, campaign and safety rules; the deadline is the
session's. When the session's lease is lost, every elector on it steps down at the same
deadline and they campaign again together on the next lease. ``stop()`` of one elector
deletes its key and leaves the others leading; stopping the session stops every elector on it
and revokes the lease once.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

from electfsm import clock
from electfsm.config import ElectorConfig, connection
from electfsm.errors import ConfigError, ElectorStopped
from electfsm.etcd import EtcdClient
from electfsm.etcd.security import TLS, Auth
from electfsm.sources.session import SessionWatch

if TYPE_CHECKING:
    from electfsm.elector import Elector


class Session:
    """One lease for any number of :class:`~electfsm.Elector` (``Elector(session=...)``)."""

    def __init__(self, *, endpoints: str | Sequence[str] | None = None, ttl: int = 10,
                 margin: float | None = None, call_timeout: float = 2.0,
                 backoff_max: float = 2.0, tls: TLS | None = None, auth: Auth | None = None,
                 client: EtcdClient | None = None) -> None:
        endpoints, call_timeout = connection(endpoints, client, tls, auth, call_timeout)
        # The election and identity only name the session in logs and thread names.
        self.config = ElectorConfig(endpoints=endpoints, election="electfsm-session",
                                    identity="session", ttl=ttl, margin=margin,
                                    call_timeout=call_timeout, backoff_max=backoff_max,
                                    tls=tls, auth=auth)
        self._owns_client = client is None
        self.client = client if client is not None else EtcdClient.for_config(self.config)
        self._watch = SessionWatch(self.client, self.config, clock=clock.now)
        self._electors: weakref.WeakSet[Elector] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._started = False
        self._stopped = False

    def __repr__(self) -> str:
        return (f"Session(lease={self._watch.lease:x}, ttl={self.ttl}, "
                f"electors={len(self._electors)})")

    @property
    def lease(self) -> int:
        """The current lease id (0 before the first grant)."""
        return self._watch.lease

    @property
    def ttl(self) -> int:
        """The TTL etcd granted (the one asked for before the first grant)."""
        return self._watch.granted_ttl or self.config.ttl

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stopped

    @property
    def generation(self) -> int:
        """How many leases this session has had (each loss starts a new one)."""
        return self._watch.generation

    def start(self) -> Session:
        """Grant the lease and keep it alive (electors started on the session call this)."""
        with self._lock:
            if self._stopped:
                raise ElectorStopped("this session was stopped; create a new Session")
            if not self._started:
                self._watch.start()
                self._started = True
        return self

    def stop(self, timeout: float = 10.0, *, revoke: bool = True) -> None:
        """Stop every elector on the session (their terms end, their work returns), then end
        the lease: revoked once (deleting every key on it), or with ``revoke=False`` left to
        expire like a crash."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        end = clock.now() + timeout
        for elector in list(self._electors):
            # Their keys go with the lease below: one revoke, not one delete each.
            elector.stop(max(0.1, end - clock.now()), revoke=False)
        if self._started:
            self._watch.stop(max(self.config.call_timeout + 1, end - clock.now()),
                             revoke=revoke)
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> Session:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _join(self, elector: Elector) -> None:
        with self._lock:
            if self._stopped:
                raise ElectorStopped("this session was stopped; create a new Session")
            election = elector.config.election
            if any(e.config.election == election and not getattr(e, "_stopped", True)
                   for e in self._electors):
                # The candidate key is <election>/<lease>: two of them would be one key,
                # both "leading" on the same token.
                raise ConfigError(f"this session already has an elector of election "
                                  f"{election!r}: one lease is one candidate per election; "
                                  f"stop that one first, or give this one its own Session")
            self._electors.add(elector)
