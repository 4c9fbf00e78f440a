"""Several etcd members on loopback forming one cluster, for failover tests."""

from __future__ import annotations

import concurrent.futures
import os
import time
import uuid
import weakref
from collections.abc import Sequence
from typing import Any

from electfsm import clock
from electfsm.errors import ConfigError
from electfsm.testing.etcd_binaries import (
    _CLUSTER_TERM_GRACE,
    _HOST,
    _POLL_INTERVAL,
    _PORT_RETRIES,
    _free_ports,
    find_etcd_binary,
)
from electfsm.testing.local_etcd import (
    LocalEtcd,
    _port_clash,
    _read_tail,
    _release_all,
    _Resources,
    _StartStop,
)
from electfsm.testing.pki import ServerTLS

# --------------------------------------------------------------------------- cluster


class LocalCluster(_StartStop):
    """Several etcd members on loopback forming one cluster, for failover tests.

    ::

        with LocalCluster(3) as cluster:
            elector = Elector(endpoints=cluster.endpoints, election="demo", identity="a")
            leader = cluster.leader_index()
            cluster.members[leader].kill()       # the other two elect a new leader
            cluster.members[leader].restart()    # it rejoins with its data dir
            cluster.members[0].pause()           # SIGSTOP; resume() to continue

    Each member is a :class:`LocalEtcd` with random free client and peer ports, fast raft
    timings and a unique ``--initial-cluster-token``. Data dirs are temp dirs that
    :meth:`stop` removes, or ``data_root/<name>`` (kept; logs go to ``data_root/<name>.log``).
    A cluster whose data dirs exist is tied to the ports it was started with: reuse the same
    :class:`LocalCluster` object to stop and start it again.
    """

    def __init__(
        self,
        size: int = 3,
        *,
        binary: str | None = None,
        extra_args: Sequence[str] = (),
        data_root: str | None = None,
        tls: ServerTLS | None = None,
    ) -> None:
        if size < 1:
            raise ConfigError(f"a cluster needs at least one member, not {size}")
        self.binary = find_etcd_binary(binary)
        self.size = size
        self.tls = tls
        self._extra_args = tuple(extra_args)
        self._data_root = data_root
        self._token = f"electfsm-{uuid.uuid4().hex[:12]}"
        self._launched = False
        self._client_tls = tls.client_tls() if tls is not None else None
        self.members: list[LocalEtcd] = []
        self._resources: list[_Resources] = []  # shared with the finalizer, not self
        self._make_members()
        self._finalizer = weakref.finalize(self, _release_all, self._resources,
                                           _CLUSTER_TERM_GRACE)

    def _make_members(self) -> None:
        ports = _free_ports(2 * self.size)
        names = [f"electfsm-{i}" for i in range(self.size)]
        peers = ports[self.size:]
        cluster = ",".join(f"{n}=http://{_HOST}:{p}" for n, p in zip(names, peers, strict=True))
        root = self._data_root
        self.members[:] = [
            LocalEtcd(
                binary=self.binary,
                name=name,
                client_port=client,
                peer_port=peer,
                initial_cluster=cluster,
                extra_args=(f"--initial-cluster-token={self._token}", *self._extra_args),
                data_dir=os.path.join(root, name) if root is not None else None,
                log_path=os.path.join(root, f"{name}.log") if root is not None else None,
                tls=self.tls,
            )
            for name, client, peer in zip(names, ports[: self.size], peers, strict=True)
        ]
        self._resources[:] = [m._res for m in self.members]

    @property
    def endpoints(self) -> list[str]:
        """Every member's ``127.0.0.1:<client_port>``, in member order."""
        return [m.endpoint for m in self.members]

    def __repr__(self) -> str:
        running = sum(m.pid is not None for m in self.members)
        return f"<LocalCluster {running}/{self.size} running {self.endpoints}>"

    # ----------------------------------------------------------------- raft state

    def _status(self, member: LocalEtcd, timeout: float) -> Any | None:
        from electfsm.errors import EtcdError
        from electfsm.etcd import EtcdClient

        tls = self._client_tls
        client = EtcdClient([member.endpoint], timeout=timeout,
                            credentials=tls.credentials() if tls is not None else None)
        try:
            return client.status()
        except EtcdError:
            return None
        finally:
            client.close()

    def leader_index(self, timeout: float = 0.5) -> int | None:
        """Index in ``members`` of the raft leader, or ``None`` if no running member
        answers as the leader within ``timeout`` (members are asked in parallel)."""
        live = [(i, m) for i, m in enumerate(self.members) if m.pid is not None]
        if not live:
            return None
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(live)) as pool:
            statuses = list(pool.map(lambda m: self._status(m, timeout), [m for _, m in live]))
        answers = [(i, status) for (i, _), status in zip(live, statuses, strict=True)]
        best: tuple[int, int] | None = None  # (raft term, index)
        for i, status in answers:
            if status is None or not status.leader or status.leader != status.header.member_id:
                continue
            if best is None or int(status.raftTerm) > best[0]:
                best = (int(status.raftTerm), i)
        return best[1] if best is not None else None

    def wait_for_leader(self, timeout: float = 10.0, *,
                        exclude: Sequence[int] = ()) -> int:
        """Poll :meth:`leader_index` until a leader (not in ``exclude``) exists; its index.
        Raises :class:`TimeoutError`."""
        deadline = clock.now() + timeout
        while True:
            index = self.leader_index(timeout=min(0.5, max(0.05, deadline - clock.now())))
            if index is not None and index not in exclude:
                return index
            if clock.now() >= deadline:
                raise TimeoutError(f"no raft leader within {timeout}s in {self!r}")
            time.sleep(_POLL_INTERVAL)

    # ----------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 30.0) -> LocalCluster:
        """Start every member that is not running, all at once, and wait until each is
        healthy and a raft leader exists.

        Raises :class:`RuntimeError` with the tails of the failed members' logs; the members
        this call launched are killed again then.
        """
        deadline = clock.now() + timeout
        for attempt in range(_PORT_RETRIES):
            fresh = not self._launched
            pending = [m for m in self.members if m.pid is None]
            self._launched = True
            for m in pending:
                m._launch()
            failures: list[tuple[LocalEtcd, str, str]] = []
            for m in pending:
                proc = m._res.proc
                assert proc is not None
                why = m._wait_healthy(proc, deadline)
                if why is not None:
                    failures.append((m, why, _read_tail(m.log_path)))
            if not failures:
                try:
                    self.wait_for_leader(max(0.0, deadline - clock.now()))
                except TimeoutError as exc:
                    blamed = pending[0] if pending else self.members[0]
                    failures.append((blamed, str(exc), _read_tail(blamed.log_path)))
                else:
                    return self
            for m in pending:
                m._res.kill()
            retry = (fresh and self._data_root is None and attempt + 1 < _PORT_RETRIES
                     and any(_port_clash(tail) for _, _, tail in failures))
            if fresh:
                for m in pending:
                    m._res.remove_tmpdir()
                self._launched = False
            if retry:  # a port we picked was taken meanwhile: new ports for everyone
                self._make_members()
                continue
            report = "\n\n".join(f"{m.name}: {m._failure(why, tail)}"
                                 for m, why, tail in failures)
            raise RuntimeError(f"cluster did not start:\n{report}")
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self) -> None:
        """Stop every member: SIGTERM to all at once, SIGKILL to any still running 1.5 s later
        (the leader, busy handing over leadership to members that are going away); remove the
        temp dirs. Idempotent; ``start()`` may be called again (with ``data_root`` the data
        survives)."""
        _release_all(self._resources, _CLUSTER_TERM_GRACE)
