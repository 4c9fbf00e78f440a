"""Shared fixtures: real etcd servers (electfsm.testing.LocalEtcd) and per-test election names.

Timing: every scheduling allowance in the tests (how late a hook may run after its deadline,
the tolerance above a TTL for a failover, how long a test waits for something) is multiplied
by ``ELECTFSM_TEST_SLACK`` (float, default 1; see tests/scenario_kit.py). A loaded CI runner
sets e.g. ``ELECTFSM_TEST_SLACK=3``; the bounds' physics (TTL, margin, etcd's election
timeout) is not scaled. The test etcd servers use 25/250 ms raft heartbeat/election timeout
(electfsm.testing.local_etcd.RAFT_HEARTBEAT_MS): steady through 150 ms stalls of their raft leader,
where 10/100 ms elected a new raft leader after most of them.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from cli_kit import Proc
from scenario_kit import SLACK, SLACK_ENV, TTL

from electfsm import Elector
from electfsm.chaos.lab import Lab
from electfsm.etcd import EtcdClient
from electfsm.testing.etcd_binaries import RAFT_ELECTION_MS, RAFT_HEARTBEAT_MS, find_etcdctl_binary
from electfsm.testing.local_etcd import LocalEtcd


def pytest_report_header(config: pytest.Config) -> str:
    return (f"electfsm: {SLACK_ENV}={SLACK:g} (timing allowances x{SLACK:g}, scenario TTL "
            f"{TTL} s); test etcd raft heartbeat {RAFT_HEARTBEAT_MS} ms, election timeout "
            f"{RAFT_ELECTION_MS} ms")


@pytest.fixture(scope="session")
def etcd() -> Iterator[LocalEtcd]:
    """One etcd for the whole session; tests that pause/kill/restart use ``make_etcd``."""
    server = LocalEtcd()
    with server:
        yield server


@pytest.fixture
def make_etcd() -> Iterator[Callable[..., LocalEtcd]]:
    """``make_etcd(**LocalEtcd kwargs)``: a fresh, started server; all are stopped at test end."""
    made: list[LocalEtcd] = []

    def make(**kwargs: Any) -> LocalEtcd:
        server = LocalEtcd(**kwargs)
        made.append(server)
        return server.start()

    yield make
    errors: list[BaseException] = []
    for server in reversed(made):
        try:
            server.stop()
        except Exception as exc:  # stop the others anyway
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def election(request: pytest.FixtureRequest) -> str:
    """A unique election name for this test, made of ``[A-Za-z0-9_/-]`` only."""
    raw = f"test/{request.node.name}-{uuid.uuid4().hex[:8]}"
    return re.sub(r"[^A-Za-z0-9_/-]", "_", raw)


@pytest.fixture
def make_lab(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Lab]]:
    """``make_lab(endpoints=None, **Lab kwargs)``: a started fault-injection lab
    (:class:`electfsm.chaos.lab.Lab`) on the given endpoints, else on the session's etcd; its
    candidates' TTL is ``scenario_kit.TTL`` unless given."""
    labs: list[Lab] = []

    def make(endpoints: list[str] | None = None, **kwargs: Any) -> Lab:
        if endpoints is None:
            endpoints = [request.getfixturevalue("etcd").endpoint]
        name = f"sc/{request.node.name}-{len(labs)}".replace("[", "_").replace("]", "_")
        kwargs.setdefault("ttl", TTL)
        lab = Lab(tmp_path / f"lab{len(labs)}", endpoints=endpoints, name=name, **kwargs)
        labs.append(lab)
        return lab.start()

    yield make
    for lab in labs:
        lab.close()


@pytest.fixture
def procs() -> Iterator[Callable[..., Proc]]:
    """``procs(argv, env=None)``: start a process; every one is stopped when the test ends."""
    started: list[Proc] = []

    def start(argv: Sequence[str], env: dict[str, str] | None = None) -> Proc:
        p = Proc(argv, env)
        started.append(p)
        return p

    try:
        yield start
    finally:
        for p in reversed(started):
            p.stop()


@pytest.fixture(scope="session")
def etcdctl() -> str:
    """Path of the etcdctl binary (same lookup order as the etcd binary)."""
    return find_etcdctl_binary()


MakeElector = Callable[..., Elector]


@pytest.fixture
def make_elector(etcd: LocalEtcd, election: str) -> Iterator[MakeElector]:
    """``make_elector(identity, endpoint=None, start=True, **Elector kwargs)``: an elector of
    this test's election (TTL 2 s unless given) on the session's etcd; all stopped at the end."""
    made: list[Elector] = []

    def make(identity: str, *, endpoint: str | None = None, start: bool = True,
             **kwargs: Any) -> Elector:
        kwargs.setdefault("ttl", 2)
        kwargs.setdefault("election", election)
        e = Elector(endpoints=[endpoint or etcd.endpoint], identity=identity, **kwargs)
        made.append(e)
        return e.start() if start else e

    yield make
    for e in made:
        e.stop()


@pytest.fixture
def raw(etcd: LocalEtcd) -> Iterator[EtcdClient]:
    """A plain client of the session's etcd, to read and write behind the electors' backs."""
    client = EtcdClient([etcd.endpoint], timeout=5)
    yield client
    client.close()


# transitions logs every callback at INFO; keep test logs to electfsm's own lines.
logging.getLogger("transitions").setLevel(logging.WARNING)
