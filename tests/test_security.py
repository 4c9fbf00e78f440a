"""etcd users and roles, secrets, nested elections and unusual identities, on a real etcd."""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from electfsm import ConfigError, Elector, NotLeaderError, PermissionDenied, ops
from electfsm.etcd.security import TLS, Auth
from electfsm.testing.local_etcd import LocalEtcd

ROOT_PW = "root-pw-Zq9"
SECRET = "s3cret-Pw-7xk"  # the scheduler's password: must never show up anywhere


def ctl(etcdctl: str, endpoint: str, *args: str, user: str | None = None) -> None:
    cmd = [etcdctl, f"--endpoints={endpoint}", *([f"--user={user}"] if user else []), *args]
    subprocess.run(cmd, check=True, capture_output=True, timeout=20)


@pytest.fixture
def auth_etcd(make_etcd: Callable[..., LocalEtcd], etcdctl: str, election: str) -> LocalEtcd:
    """etcd with auth on: 'scheduler' may read and write '<election>/' only, 'reader' may read
    it; simple tokens expire after 2 s of disuse."""
    server = make_etcd(extra_args=["--auth-token=simple", "--auth-token-ttl=2"])
    e = server.endpoint
    ctl(etcdctl, e, "user", "add", "root", f"--new-user-password={ROOT_PW}")
    ctl(etcdctl, e, "user", "grant-role", "root", "root")
    for role, perm in (("elector", "readwrite"), ("reader", "read")):
        ctl(etcdctl, e, "role", "add", role)
        ctl(etcdctl, e, "role", "grant-permission", role, perm, f"{election}/", "--prefix=true")
    ctl(etcdctl, e, "user", "add", "scheduler", f"--new-user-password={SECRET}")
    ctl(etcdctl, e, "user", "grant-role", "scheduler", "elector")
    ctl(etcdctl, e, "user", "add", "reader", "--new-user-password=reader-pw")
    ctl(etcdctl, e, "user", "grant-role", "reader", "reader")
    ctl(etcdctl, e, "auth", "enable")
    return server


@pytest.fixture
def electors() -> Iterator[list[Elector]]:
    made: list[Elector] = []
    yield made
    for e in made:
        e.stop()


def elector(made: list[Elector], endpoint: str, election: str, identity: str | bytes,
            **kw: Any) -> Elector:
    kw.setdefault("ttl", 2)
    e = Elector(endpoints=[endpoint], election=election, identity=identity, call_timeout=1,
                backoff_max=0.3, **kw)
    made.append(e)
    return e


def test_a_role_limited_to_the_election_prefix_can_do_everything_an_elector_does(
        auth_etcd: LocalEtcd, election: str, electors: list[Elector]) -> None:
    auth = Auth(user="scheduler", password=SECRET)
    a = elector(electors, auth_etcd.endpoint, election, "node-a", auth=auth).start()
    assert a.wait_for("leader", timeout=10)
    b = elector(electors, auth_etcd.endpoint, election, "node-b", auth=auth).start()
    assert b.wait_for("follower", timeout=10)
    assert b.leader is not None and b.leader.identity == "node-a"
    assert a.fenced_txn(success=[ops.put(f"{election}/data", b"1")]).succeeded
    with pytest.raises(PermissionDenied, match="permission denied"):
        a.fenced_txn(success=[ops.put("elsewhere", b"1")])
    a.resign()
    assert b.wait_for("leader", timeout=10)


def test_expired_auth_tokens_are_renewed_without_losing_the_candidacy(
        auth_etcd: LocalEtcd, election: str, electors: list[Elector],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="electfsm.etcd")
    auth = Auth(user="scheduler", password=SECRET)
    a = elector(electors, auth_etcd.endpoint, election, "node-a", auth=auth, ttl=20).start()
    assert a.wait_for("leader", timeout=10)
    b = elector(electors, auth_etcd.endpoint, election, "node-b", auth=auth, ttl=20).start()
    assert b.wait_for("follower", timeout=10)
    time.sleep(4)  # keepalives every ~6.7 s: the 2 s simple tokens expire meanwhile
    a.resign()
    assert b.wait_for("leader", timeout=10)
    assert "authenticating again" in caplog.text


def test_read_only_user_gets_a_clear_error_and_never_leads(
        auth_etcd: LocalEtcd, election: str, electors: list[Elector]) -> None:
    errors: list[BaseException] = []
    e = elector(electors, auth_etcd.endpoint, election, "node-r",
                auth=Auth(user="reader", password="reader-pw"))
    e.on_error(errors.append)
    entered: list[object] = []
    e.on_enter_leader(entered.append)
    e.start()
    deadline = time.monotonic() + 3
    while not any(isinstance(x, PermissionDenied) for x in errors):
        assert time.monotonic() < deadline, errors
        time.sleep(0.05)
    assert entered == [] and e.state != "leader"
    denied = next(x for x in errors if isinstance(x, PermissionDenied))
    assert "reader" in str(denied) and "read-write" in str(denied)


def test_wrong_password_is_a_clear_error_that_does_not_show_the_password(
        auth_etcd: LocalEtcd, election: str, electors: list[Elector],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    errors: list[BaseException] = []
    wrong = "wr0ng-" + SECRET
    e = elector(electors, auth_etcd.endpoint, election, "node-a",
                auth=Auth(user="scheduler", password=wrong))
    e.on_error(errors.append)
    e.start()
    deadline = time.monotonic() + 3
    while not errors:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert isinstance(errors[0], PermissionDenied)
    assert "wrong user name or password" in str(errors[0])
    assert e.state == "disconnected"
    for text in (caplog.text, repr(e), repr(e.config), repr(e.config.auth), str(errors[0])):
        assert wrong not in text and SECRET not in text


def test_no_credentials_against_an_auth_server_says_to_pass_them(
        auth_etcd: LocalEtcd, election: str, electors: list[Elector]) -> None:
    errors: list[BaseException] = []
    e = elector(electors, auth_etcd.endpoint, election, "node-a")
    e.on_error(errors.append)
    e.start()
    deadline = time.monotonic() + 3
    while not errors:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "authentication enabled" in str(errors[0]) and "auth=Auth" in str(errors[0])


def test_secrets_stay_out_of_reprs() -> None:
    auth = Auth(user="scheduler", password=SECRET)
    assert SECRET not in repr(auth) and "***" in repr(auth)
    e = Elector(endpoints=["127.0.0.1:2379"], election="jobs", identity="n", auth=auth)
    assert SECRET not in repr(e.config)
    e.stop()


def test_tls_files_that_cannot_be_read_fail_at_construction(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="cannot read the CA certificate file"):
        TLS(ca=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="needs both cert and key"):
        TLS(cert=str(tmp_path / "c.pem"))


def test_nested_elections_do_not_disturb_each_other(
        etcd: LocalEtcd, election: str, electors: list[Elector]) -> None:
    outer = [elector(electors, etcd.endpoint, election, f"outer-{i}") for i in range(2)]
    inner = [elector(electors, etcd.endpoint, f"{election}/x", f"inner-{i}") for i in range(2)]
    for group in (outer, inner):
        group[0].start()
        assert group[0].wait_for("leader", timeout=5)
        group[1].start()
        assert group[1].wait_for("follower", timeout=5)
    assert outer[1].leader is not None and outer[1].leader.identity == "outer-0"
    assert inner[1].leader is not None and inner[1].leader.identity == "inner-0"
    outer[0].resign()
    assert outer[1].wait_for("leader", timeout=5)
    assert inner[0].state == "leader", "the nested election did not notice"
    inner[0].stop()
    assert inner[1].wait_for("leader", timeout=5)
    assert outer[1].state == "leader"


@pytest.mark.parametrize("identity", [
    b"line one\nline two", b"nul\x00inside", b"\xff\xfe not utf-8", "ünïcødé ✓",
    b"x" * 300_000,
], ids=["newline", "nul", "non-utf8", "unicode", "300k"])
def test_unusual_identities_round_trip_exactly(
        etcd: LocalEtcd, election: str, electors: list[Elector], identity: str | bytes) -> None:
    a = elector(electors, etcd.endpoint, election, identity).start()
    assert a.wait_for("leader", timeout=5)
    b = elector(electors, etcd.endpoint, election, "watcher").start()
    assert b.wait_for("follower", timeout=5)
    raw = identity.encode() if isinstance(identity, str) else identity
    assert b.leader is not None and b.leader.value == raw
    assert b.leader.identity == raw.decode("utf-8", "backslashreplace")


@pytest.mark.parametrize("name", ["jobs\nx", "jobs\x00x", "jobs\udcffx", "/" * 5000])
def test_unusual_election_names_are_refused_clearly(name: str) -> None:
    with pytest.raises(ConfigError):
        Elector(endpoints=["127.0.0.1:2379"], election=name, identity="n")


def test_fenced_txn_refuses_after_stop(etcd: LocalEtcd, election: str,
                                       electors: list[Elector]) -> None:
    e = elector(electors, etcd.endpoint, election, "node-a").start()
    assert e.wait_for("leader", timeout=5)
    e.stop()
    with pytest.raises(NotLeaderError):
        e.fenced_txn(success=[ops.put(f"{election}/late", b"1")])
