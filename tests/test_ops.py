"""Operating electfsm: metrics, the status endpoints, fork safety, slow hooks and structured
log fields — on a real etcd, with a real HTTP client, real processes and a real fork."""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from cli_kit import Proc, clean_env, electfsm, run
from elector_kit import wait
from prometheus_client import CollectorRegistry

from electfsm import Elector, ElectorForkedError, ErrorReported, clock, metrics
from electfsm.health import StatusServer
from electfsm.testing import Harness
from electfsm.testing.etcd_binaries import free_port
from electfsm.testing.faultproxy import FaultProxy
from electfsm.testing.local_etcd import LocalEtcd


def get(address: str, path: str, method: str = "GET") -> httpx.Response:
    return httpx.request(method, f"http://{address}{path}", timeout=5)


def code(address: str, path: str) -> int | None:
    try:
        return get(address, path).status_code
    except httpx.HTTPError:
        return None


def sample(text: str, metric: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(metric + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line[len(metric):line.index("}") + 1]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.fixture
def make_elector(etcd: LocalEtcd, election: str) -> Iterator[Callable[..., Elector]]:
    made: list[Elector] = []

    def make(identity: str, **kwargs: Any) -> Elector:
        kwargs.setdefault("ttl", 2)
        kwargs.setdefault("endpoints", [etcd.endpoint])
        e = Elector(election=election, identity=identity, **kwargs)
        made.append(e)
        return e

    yield make
    for e in made:
        e.stop()


# ---------------------------------------------------------------- metrics and endpoints
def test_metrics_and_endpoints_follow_a_real_handover(make_elector: Callable[..., Elector],
                                                      election: str) -> None:
    a, b = make_elector("node-a"), make_elector("node-b")
    servers = [StatusServer([e], registry=CollectorRegistry()).with_metrics().start()
               for e in (a, b)]
    try:
        a.start()
        assert a.wait_for("leader", timeout=10)
        b.start()
        assert b.wait_for("follower", timeout=10)
        sa, sb = (s.address for s in servers)
        assert (code(sa, "/leader"), code(sb, "/leader")) == (200, 503)
        assert (code(sa, "/follower"), code(sb, "/follower")) == (503, 200)
        ma = get(sa, "/metrics").text
        assert sample(ma, "electfsm_is_leader", election=election) == 1
        assert sample(ma, "leader_election_master_status", name=election) == 1
        assert sample(ma, "electfsm_state", election=election, state="leader") == 1
        assert sample(ma, "electfsm_state", election=election, state="follower") == 0
        assert sample(ma, "electfsm_term_token", election=election) == a.term.token  # type: ignore[union-attr]
        assert (sample(ma, "electfsm_deadline_remaining_seconds", election=election) or 0) > 0
        assert sample(get(sb, "/metrics").text, "electfsm_is_leader", election=election) == 0

        a.stop(revoke=False)  # like a crash: b leads once the lease expires
        assert b.wait_for("leader", timeout=10)
        mb = get(sb, "/metrics").text
        assert sample(mb, "electfsm_is_leader", election=election) == 1
        assert sum(sample(mb, "electfsm_transitions_total", election=election, source=src,
                          dest="leader", trigger="elected") or 0
                   for src in ("candidate", "follower")) == 1
        assert (sample(mb, "electfsm_leader_changes_total", election=election) or 0) >= 2
        assert (sample(mb, "electfsm_keepalive_duration_seconds_count", election=election)
                or 0) >= 1
        assert code(sb, "/leader") == 200
        status = get(sb, "/status").json()
        assert status["state"] == "leader" and status["token"] == b.term.token  # type: ignore[union-attr]
        assert status["leader"]["identity"] == "node-b"
    finally:
        for s in servers:
            s.stop()


def test_fenced_txn_results_are_counted(make_elector: Callable[..., Elector],
                                        election: str) -> None:
    from electfsm import NotLeaderError, ops

    registry = CollectorRegistry()
    a = make_elector("node-a")
    metrics.register(a, registry)
    a.start()
    assert a.wait_for("leader", timeout=10)
    a.fenced_txn(success=[ops.put(f"{election}-data", "x")])
    a.resign()
    with pytest.raises(NotLeaderError):
        a.fenced_txn(success=[ops.put(f"{election}-data", "y")])

    def value(result: str) -> float | None:
        return registry.get_sample_value("electfsm_fenced_txn_total",
                                         {"election": election, "result": result})

    assert value("committed") == 1 and value("fenced_out") == 1


def test_endpoints_answer_get_head_options_and_refuse_the_rest(
        make_elector: Callable[..., Elector]) -> None:
    a = make_elector("node-a").start()
    assert a.wait_for("leader", timeout=10)
    with StatusServer([a]) as s:
        r = get(s.address, "/leader")
        assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
        head = get(s.address, "/leader", "HEAD")
        assert head.status_code == 200 and head.content == b""
        assert get(s.address, "/leader", "OPTIONS").status_code == 200
        assert get(s.address, "/follower", "OPTIONS").status_code == 503
        post = get(s.address, "/leader", "POST")
        assert post.status_code == 405 and post.headers["allow"] == "GET, HEAD, OPTIONS"
        assert get(s.address, "/secret").status_code == 404
        assert get(s.address, "/readyz").status_code == 200
        assert s.address.startswith("127.0.0.1:"), "loopback by default"


def test_livez_stays_up_on_a_follower_while_etcd_is_paused_and_readyz_goes_down(
        make_etcd: Callable[..., LocalEtcd], election: str) -> None:
    server = make_etcd()
    leader = Elector(endpoints=[server.endpoint], election=election, identity="a", ttl=2,
                     call_timeout=0.5)
    follower = Elector(endpoints=[server.endpoint], election=election, identity="b", ttl=2,
                       call_timeout=0.5)
    try:
        leader.start()
        assert leader.wait_for("leader", timeout=10)
        follower.start()
        assert follower.wait_for("follower", timeout=10)
        with StatusServer([follower]) as s:
            server.pause()
            try:
                assert follower.wait_for("disconnected", timeout=10)
                assert code(s.address, "/readyz") == 503
                assert code(s.address, "/livez") == 200, "no restart storm in an etcd outage"
            finally:
                server.resume()
    finally:
        follower.stop()
        leader.stop()


def test_livez_fails_on_a_leader_stuck_past_its_deadline(etcd: LocalEtcd,
                                                         election: str) -> None:
    """The link is blackholed while the dispatcher is busy in a slow hook: the elector still
    believes it leads after its deadline passed; past the tolerance /livez says 503."""
    proxy = FaultProxy(etcd.endpoint).start()
    release = threading.Event()
    e = Elector(endpoints=[proxy.endpoint], election=election, identity="a", ttl=2,
                call_timeout=0.5)
    e.on_error(lambda exc: release.wait(30) if isinstance(exc, LookupError) else None)
    try:
        e.start()
        assert e.wait_for("leader", timeout=10)
        with StatusServer([e], tolerance=0.5, stall=60) as s:
            assert code(s.address, "/livez") == 200
            e._queue.put(ErrorReported(error=LookupError("slow on_error"), where="test"))
            proxy.blackhole()
            term = e.term
            assert term is not None
            assert wait(lambda: term.remaining() < -0.5, 10)
            assert e.state == "leader", "precondition: the machine has not caught up"
            assert code(s.address, "/livez") == 503
            assert code(s.address, "/leader") == 503, "a dead term is never reported leading"
            release.set()
            proxy.pass_through()
            assert wait(lambda: code(s.address, "/livez") == 200, 10)
    finally:
        release.set()
        e.stop()
        proxy.stop()


def test_campaign_processes_serve_leader_on_exactly_one_and_it_moves_after_a_sigkill(
        etcd: LocalEtcd, election: str) -> None:
    ports = [free_port(), free_port()]
    procs = [Proc(electfsm("campaign", election, f"node-{i}", "--ttl", "2", "--endpoints",
                           etcd.endpoint, "--status-addr", f"127.0.0.1:{port}"),
                  clean_env()) for i, port in enumerate(ports)]
    try:
        addrs = [f"127.0.0.1:{p}" for p in ports]
        assert wait(lambda: sorted(code(a, "/leader") or 0 for a in addrs) == [200, 503], 20)
        first = next(i for i, a in enumerate(addrs) if code(a, "/leader") == 200)
        other = 1 - first
        scrape = get(addrs[first], "/metrics").text
        assert sample(scrape, "electfsm_is_leader", election=election) == 1
        procs[first].signal(signal.SIGKILL)
        procs[first].wait()
        assert wait(lambda: code(addrs[other], "/leader") == 200, 10)
        assert sample(get(addrs[other], "/metrics").text, "electfsm_is_leader",
                      election=election) == 1
    finally:
        for p in procs:
            p.stop()


@pytest.mark.parametrize("addr, why", [("localhost", "HOST:PORT"), (":80", "HOST:PORT"),
                                       ("127.0.0.1:99999", "between 1 and 65535")])
def test_a_malformed_status_address_is_a_usage_error(etcd: LocalEtcd, election: str,
                                                     addr: str, why: str) -> None:
    r = run("campaign", election, "node-a", "--endpoints", etcd.endpoint,
            "--status-addr", addr)
    assert r.returncode == 2 and why in r.stderr


def test_a_taken_status_port_is_refused_before_campaigning(etcd: LocalEtcd,
                                                           election: str) -> None:
    from cli_kit import candidates

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run("campaign", election, "node-a", "--endpoints", etcd.endpoint,
                "--status-addr", f"127.0.0.1:{port}")
    assert r.returncode == 2 and "--status-addr" in r.stderr and str(port) in r.stderr
    assert candidates(etcd.endpoint, election) == [], "nothing was campaigned"


# ---------------------------------------------------------------- fork safety
def _child_check(e: Elector, endpoint: str, election: str) -> int:
    try:
        e.is_leader  # noqa: B018 - the access itself must raise
    except ElectorForkedError as exc:
        if "fork" not in str(exc) or "post_fork" not in str(exc):
            return 3
    else:
        return 2
    fresh = Elector(endpoints=[endpoint], election=election + "-child", identity="child",
                    ttl=2)
    try:
        fresh.start()
        return 0 if fresh.wait_for("leader", timeout=20) else 4
    finally:
        fresh.stop()


def test_an_elector_copied_by_fork_refuses_and_the_child_can_run_its_own(
        make_elector: Callable[..., Elector], etcd: LocalEtcd, election: str) -> None:
    e = make_elector("parent").start()
    assert e.wait_for("leader", timeout=10)
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code_ = 1
        try:
            code_ = _child_check(e, etcd.endpoint, election)
        finally:
            os._exit(code_)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert e.is_leader, "the parent still leads"


def _mp_target(e: Elector, endpoint: str, election: str, out: Any) -> None:
    out.put(_child_check(e, endpoint, election))


def test_multiprocessing_fork_children_refuse_the_parents_elector(
        make_elector: Callable[..., Elector], etcd: LocalEtcd, election: str) -> None:
    e = make_elector("parent").start()
    assert e.wait_for("leader", timeout=10)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    p = ctx.Process(target=_mp_target, args=(e, etcd.endpoint, election, out))
    p.start()
    p.join(60)
    assert out.get(timeout=5) == 0
    assert e.is_leader


# ---------------------------------------------------------------- hooks and logs
def test_a_slow_hook_is_logged_with_its_name_and_duration(
        caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(ttl=5)
    h.dispatcher.slow_hook = 0.2

    def slow_follower(change: object) -> None:
        h.clock.advance(0.5)

    h.on_enter_follower(slow_follower)
    h.on_enter_candidate(lambda change: None)
    with caplog.at_level(logging.WARNING, logger="electfsm"):
        h.connect()
        h.see_leader("node-b")
    slow = [r.getMessage() for r in caplog.records if "took" in r.getMessage()]
    assert len(slow) == 1 and "slow_follower" in slow[0] and "0.500s" in slow[0]


def test_log_records_carry_election_identity_state_and_token(
        make_elector: Callable[..., Elector], election: str) -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.INFO)
    logging.getLogger("electfsm").addHandler(handler)
    try:
        e = make_elector("node-a").start()
        assert e.wait_for("leader", timeout=10)
        e.resign()
        assert e.wait_for("leader", timeout=10)
    finally:
        logging.getLogger("electfsm").removeHandler(handler)
    mine = [r for r in records if getattr(r, "election", None) == election]
    assert mine, "records of the elector's threads carry its election"
    assert {getattr(r, "identity", None) for r in mine} == {"node-a"}
    resign = [r for r in mine if "--resign-->" in r.getMessage()]
    assert resign and getattr(resign[0], "state", None) == "candidate"
    assert any(getattr(r, "token", None) is not None for r in mine), "a token while leading"
    assert all(hasattr(r, "token") for r in records), "every electfsm record has the field"
    assert clock.now() > 0
