"""Secure connections end to end: TLS, client certificates and TLS + etcd users, on real etcd.

Every server here is a real etcd (:class:`electfsm.testing.LocalEtcd`) on loopback with
certificates from :func:`electfsm.testing.pki.make_test_pki`; the ``electfsm``
command runs as a real subprocess (``python -m electfsm``). The etcd flags of each setup:

* CA only (server TLS):   ``--cert-file=server.pem --key-file=server-key.pem``
* client certificates:    the same plus ``--trusted-ca-file=ca.pem --client-cert-auth``
* expired server cert:    ``--cert-file=expired-server.pem --key-file=expired-server-key.pem``
* TLS + users:            client certificates plus ``--auth-token=simple``, then (etcdctl with
                          ``--cacert --cert --key``) root and ``scheduler`` users, a role with
                          readwrite on ``<election>/`` only, and ``auth enable``
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cli_kit import Proc, clean_env, electfsm, run

from electfsm import Elector, EtcdError, EtcdUnavailable, PermissionDenied, Term, ops
from electfsm.etcd import EtcdClient, prefix_end
from electfsm.etcd.security import TLS, Auth
from electfsm.sources.campaign import is_candidate_key
from electfsm.testing.local_etcd import LocalEtcd
from electfsm.testing.pki import ServerTLS, TestPKI, make_test_pki

MakeEtcd = Callable[..., LocalEtcd]

TTL = 2
CALL_TIMEOUT = 1.0
BACKOFF_MAX = 0.3
SLACK = 2.0
#: A refused connection must be reported within this many seconds of start().
ERROR_BOUND = CALL_TIMEOUT + SLACK
CONNECT_TIMEOUT = 1.0
#: python start-up (several at once on 2 cores) + the connect timeout + exiting.
CLI_BOUND = CONNECT_TIMEOUT + 4.0
ROOT_PW = "tls-r00t-pw-Hk2"
SECRET = "tls-S3cret-pw-9Qz"  # the scheduler's password: must never show up anywhere


# ---------------------------------------------------------------------------- servers
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@contextlib.contextmanager
def _serving(**kwargs: Any) -> Iterator[LocalEtcd]:
    server = LocalEtcd(**kwargs)
    with server:
        yield server


@pytest.fixture(scope="module")
def tls_etcd(pki: TestPKI) -> Iterator[LocalEtcd]:
    """Server TLS only: clients verify the server with the CA, no client certificate."""
    with _serving(tls=pki.server_tls()) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_etcd(pki: TestPKI) -> Iterator[LocalEtcd]:
    """``--client-cert-auth``: clients must present a certificate signed by the CA."""
    with _serving(tls=pki.server_tls(client_cert_auth=True)) as server:
        yield server


@pytest.fixture(scope="module")
def plain_etcd() -> Iterator[LocalEtcd]:
    with _serving() as server:
        yield server


@pytest.fixture(scope="module")
def expired_etcd(pki: TestPKI) -> Iterator[LocalEtcd]:
    """Serves a certificate that expired yesterday (no ca_file: the health check does not
    verify it, so the server comes up)."""
    with _serving(tls=ServerTLS(pki.expired_server_cert, pki.expired_server_key)) as server:
        yield server


def _etcdctl(etcdctl: str, server: LocalEtcd, pki: TestPKI, *args: str) -> str:
    cmd = [etcdctl, f"--endpoints=https://{server.endpoint}", f"--cacert={pki.ca_cert}",
           f"--cert={pki.client_cert}", f"--key={pki.client_key}", *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=20).stdout


@pytest.fixture
def auth_mtls_etcd(make_etcd: MakeEtcd, etcdctl: str, pki: TestPKI,
                   election: str) -> LocalEtcd:
    """Client certificates *and* etcd users: 'scheduler' may read and write '<election>/' only.

    With ``--client-cert-auth`` and auth on, etcd takes a request's user from its auth token
    and, only when there is none, from the client certificate's common name. No etcd user is
    named after our certificate's CN ('electfsm-client'), so the certificate alone grants
    nothing: whatever an elector may do comes from the user it logged in as.
    """
    server = make_etcd(tls=pki.server_tls(client_cert_auth=True),
                       extra_args=["--auth-token=simple"])

    def ctl(*args: str) -> str:
        return _etcdctl(etcdctl, server, pki, *args)

    ctl("user", "add", "root", f"--new-user-password={ROOT_PW}")
    ctl("user", "grant-role", "root", "root")
    ctl("role", "add", "elector")
    ctl("role", "grant-permission", "elector", "readwrite", f"{election}/", "--prefix=true")
    ctl("user", "add", "scheduler", f"--new-user-password={SECRET}")
    ctl("user", "grant-role", "scheduler", "elector")
    assert ctl("user", "list").split() == ["root", "scheduler"]
    assert pki.client_common_name not in ctl("user", "list").split()
    ctl("auth", "enable")
    return server


@contextlib.contextmanager
def kv_client(server: LocalEtcd, tls: TLS | None,
              auth: Auth | None = None) -> Iterator[EtcdClient]:
    client = EtcdClient([server.endpoint], timeout=5, auth=auth,
                        credentials=tls.credentials() if tls is not None else None)
    try:
        yield client
    finally:
        client.close()


def candidate_keys(server: LocalEtcd, tls: TLS | None, election: str,
                   auth: Auth | None = None) -> list[str]:
    """The candidate keys of ``election`` in queue order, read directly from etcd."""
    prefix = (election + "/").encode()
    with kv_client(server, tls, auth) as client:
        kvs = client.range(prefix, prefix_end(prefix)).kvs
    found = sorted((kv for kv in kvs if is_candidate_key(prefix, bytes(kv.key))),
                   key=lambda kv: kv.create_revision)
    return [bytes(kv.key).decode() for kv in found]


# ---------------------------------------------------------------------------- electors
class Probe:
    """An :class:`Elector` whose errors, leader terms and connections are recorded."""

    def __init__(self, elector: Elector) -> None:
        self.elector = elector
        self.started_at = 0.0
        self.errors: list[tuple[float, BaseException]] = []
        self.led: list[Term] = []
        self.connected: list[object] = []
        self._new_error = threading.Condition()
        elector.on_error(self._error)
        elector.on_enter_leader(self.led.append)
        elector.on_exit_disconnected(self.connected.append)

    def _error(self, exc: BaseException) -> None:
        with self._new_error:
            self.errors.append((time.monotonic(), exc))
            self._new_error.notify_all()

    def start(self) -> Probe:
        self.started_at = time.monotonic()
        self.elector.start()
        return self

    def first_error(self, kind: type[BaseException] = EtcdError,
                    timeout: float = ERROR_BOUND) -> tuple[float, BaseException]:
        """The first error of type ``kind`` and how long after start() it came."""
        with self._new_error:
            found = self._new_error.wait_for(
                lambda: any(isinstance(e, kind) for _, e in self.errors), timeout)
        if not found:
            pytest.fail(f"no {kind.__name__} within {timeout}s of start(); state "
                        f"{self.elector.state}, errors: {[str(e) for _, e in self.errors]}")
        at, exc = next((t, e) for t, e in self.errors if isinstance(e, kind))
        return at - self.started_at, exc


@pytest.fixture
def electors() -> Iterator[Callable[..., Probe]]:
    """``electors(server, election, identity, tls=..., auth=...)``: a recorded, unstarted
    Elector with short timings; every one is stopped when the test ends."""
    made: list[Probe] = []

    def make(server: LocalEtcd, election: str, identity: str, *, tls: TLS | None = None,
             auth: Auth | None = None) -> Probe:
        probe = Probe(Elector(endpoints=[server.endpoint], election=election,
                              identity=identity, ttl=TTL, call_timeout=CALL_TIMEOUT,
                              backoff_max=BACKOFF_MAX, tls=tls, auth=auth))
        made.append(probe)
        return probe

    try:
        yield make
    finally:
        for probe in made:
            probe.elector.stop()


# ---------------------------------------------------------------------------- 1. server TLS
def test_server_tls_with_the_ca_only_elects_one_leader_fences_writes_and_cleans_up(
        tls_etcd: LocalEtcd, pki: TestPKI, election: str,
        electors: Callable[..., Probe]) -> None:
    tls = TLS(ca=pki.ca_cert)
    a = electors(tls_etcd, election, "node-a", tls=tls).start()
    b = electors(tls_etcd, election, "node-b", tls=tls).start()
    for probe in (a, b):
        assert probe.elector.wait_for("leader", "follower", timeout=10), probe.errors
    leader, follower = sorted((a, b), key=lambda p: p.elector.state != "leader")
    assert (leader.elector.state, follower.elector.state) == ("leader", "follower")
    term = leader.elector.term
    assert term is not None
    assert follower.elector.leader is not None
    assert follower.elector.leader.identity == leader.elector.identity
    assert follower.elector.leader.key == term.key
    assert candidate_keys(tls_etcd, tls, election)[0] == term.key
    assert len(candidate_keys(tls_etcd, tls, election)) == 2

    result = leader.elector.fenced_txn(success=[ops.put(f"{election}-data", b"fenced")])
    assert result.succeeded
    with kv_client(tls_etcd, tls) as client:
        assert [bytes(kv.value) for kv in client.range(f"{election}-data".encode()).kvs] \
            == [b"fenced"]
    assert follower.led == [] and len(leader.led) == 1
    assert a.errors == [] and b.errors == []

    a.elector.stop()
    b.elector.stop()
    assert candidate_keys(tls_etcd, tls, election) == [], "stop() revoked both leases"


# ---------------------------------------------------------------------------- 2 and 3. refusals
@dataclass(frozen=True)
class Refusal:
    """A client TLS setup that ``server`` must refuse, and one it accepts (``control``)."""

    server: str  # fixture name
    client: Callable[[TestPKI], TLS | None]
    control: Callable[[TestPKI], TLS | None] | None  # None: no client can verify this server
    cause: str | None  # what the error must say about the cause (the TLS alert or check)


NO_TLS: Callable[[TestPKI], TLS | None] = lambda _pki: None  # noqa: E731
CA_ONLY: Callable[[TestPKI], TLS | None] = lambda pki: TLS(ca=pki.ca_cert)  # noqa: E731

CLIENT_CERT_REFUSALS = {
    "no-client-cert": Refusal(
        "mtls_etcd", lambda pki: pki.client_tls(cert=False),
        lambda pki: pki.client_tls(), "certificate"),
    "client-cert-from-another-ca": Refusal(
        "mtls_etcd",
        lambda pki: TLS(ca=pki.ca_cert, cert=pki.other_client_cert, key=pki.other_client_key),
        lambda pki: pki.client_tls(), "certificate"),
}
MISMATCHES = {
    "wrong-ca": Refusal(
        "tls_etcd", lambda pki: TLS(ca=pki.other_ca_cert), CA_ONLY, "CERTIFICATE_VERIFY_FAILED"),
    "expired-server-cert": Refusal(
        "expired_etcd", CA_ONLY, None, "certificate has expired"),
    "plaintext-client-to-tls-port": Refusal("tls_etcd", NO_TLS, CA_ONLY, None),
    "tls-client-to-plaintext-etcd": Refusal("plain_etcd", CA_ONLY, NO_TLS, None),
}


def check_refused(case: Refusal, request: pytest.FixtureRequest, pki: TestPKI, election: str,
                  electors: Callable[..., Probe]) -> BaseException:
    """The refused elector reports an error within ERROR_BOUND, never leaves disconnected,
    never leads and stops promptly; where some client can talk to the server, that one
    leads meanwhile (the server is fine, the refused setup is what is wrong)."""
    server: LocalEtcd = request.getfixturevalue(case.server)
    bad = electors(server, election, "node-bad", tls=case.client(pki)).start()
    took, error = bad.first_error()
    assert took < ERROR_BOUND, f"the first error took {took:.2f}s"
    assert isinstance(error, EtcdUnavailable), repr(error)
    message = str(error)
    assert server.endpoint in message, message
    if case.cause is not None:
        assert case.cause.lower() in message.lower(), message
    assert "Traceback" not in message and "\n" not in message

    if case.control is not None:
        good_tls = case.control(pki)
        good = electors(server, election, "node-good", tls=good_tls).start()
        assert good.elector.wait_for("leader", timeout=10), good.errors
        assert candidate_keys(server, good_tls, election) == [good.led[0].key], \
            "the refused elector never created a key"
    # a few retries (backoff up to 0.3 s) later it is still disconnected
    assert not bad.elector.wait_until(lambda e: e.state != "disconnected", timeout=0.8)
    assert bad.elector.state == "disconnected"
    assert bad.connected == [] and bad.led == []
    assert all(isinstance(e, EtcdError) for _, e in bad.errors), bad.errors

    stop_started = time.monotonic()
    bad.elector.stop()
    assert time.monotonic() - stop_started < 2 * CALL_TIMEOUT + SLACK, "stop() hung"
    assert bad.led == []
    return error


@pytest.mark.parametrize("case", CLIENT_CERT_REFUSALS.values(), ids=CLIENT_CERT_REFUSALS.keys())
def test_client_cert_auth_leads_with_the_ca_signed_cert_and_refuses_others_fast(
        case: Refusal, request: pytest.FixtureRequest, pki: TestPKI, election: str,
        electors: Callable[..., Probe]) -> None:
    error = check_refused(case, request, pki, election, electors)
    assert "tls" in str(error).lower(), str(error)


@pytest.mark.parametrize("case", MISMATCHES.values(), ids=MISMATCHES.keys())
def test_tls_mismatch_is_reported_fast_without_hanging_and_never_leads(
        case: Refusal, request: pytest.FixtureRequest, pki: TestPKI, election: str,
        electors: Callable[..., Probe]) -> None:
    check_refused(case, request, pki, election, electors)


ALL_REFUSALS = {**CLIENT_CERT_REFUSALS, **MISMATCHES}


@pytest.mark.parametrize("case", ALL_REFUSALS.values(), ids=ALL_REFUSALS.keys())
def test_tls_failure_messages_say_it_is_tls_and_what_to_check(
        case: Refusal, request: pytest.FixtureRequest, pki: TestPKI, election: str,
        electors: Callable[..., Probe]) -> None:
    server: LocalEtcd = request.getfixturevalue(case.server)
    bad = electors(server, election, "node-bad", tls=case.client(pki)).start()
    _took, error = bad.first_error()
    message = str(error)
    # "TLS" in our own words (gRPC's detail says "Tls handshake"), and the setting to check
    assert "TLS" in message and "--cacert" in message, message
    if case.client(pki) is not None:
        # a client with TLS settings hears that TLS failed, not that etcd seems down
        assert "TLS with etcd at" in message, message
        assert "check the endpoint and that etcd is running" not in message, message
    else:
        # a plaintext client cannot tell; it is told to try TLS
        assert "if it serves TLS (https), pass tls=TLS(ca=...)" in message, message


# ---------------------------------------------------------------------------- 4. TLS + users
def test_client_cert_plus_user_leads_fences_within_its_role_and_never_leaks_the_password(
        auth_mtls_etcd: LocalEtcd, pki: TestPKI, election: str,
        electors: Callable[..., Probe], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server, tls = auth_mtls_etcd, pki.client_tls()
    auth = Auth(user="scheduler", password=SECRET)
    a = electors(server, election, "node-a", tls=tls, auth=auth).start()
    assert a.elector.wait_for("leader", timeout=10), a.errors
    b = electors(server, election, "node-b", tls=tls, auth=auth).start()
    assert b.elector.wait_for("follower", timeout=10), b.errors
    assert b.elector.leader is not None and b.elector.leader.identity == "node-a"

    assert a.elector.fenced_txn(success=[ops.put(f"{election}/data", b"fenced")]).succeeded
    with kv_client(server, tls, auth) as client:
        assert [bytes(kv.value) for kv in client.range(f"{election}/data".encode()).kvs] \
            == [b"fenced"]
    # The role reaches no further than the election's prefix ...
    with pytest.raises(PermissionDenied, match="scheduler") as denied:
        a.elector.fenced_txn(success=[ops.put(f"outside-{election}", b"x")])
    # ... and the certificate alone is nobody: its CN is no etcd user, so the writes above
    # were made as 'scheduler', the user logged in with the password.
    cert_only = electors(server, election, "node-cert-only", tls=tls).start()
    _took, refused = cert_only.first_error(PermissionDenied)
    assert "permission denied" in str(refused)
    assert "certificate's common name as the user" in str(refused), "says whom etcd saw"
    assert cert_only.led == [] and cert_only.elector.state != "leader"

    a.elector.stop()
    assert b.elector.wait_for("leader", timeout=10), "the follower takes over over TLS + auth"
    assert candidate_keys(server, tls, election, auth) == [b.led[0].key]

    texts = [caplog.text, repr(a.elector), repr(b.elector), repr(a.elector.config),
             repr(auth), str(denied.value),
             *(str(e) for p in (a, b, cert_only) for _, e in p.errors)]
    for text in texts:
        assert SECRET not in text


# ---------------------------------------------------------------------------- 5. the command
def tls_flags(server: LocalEtcd, pki: TestPKI, *, ca: str | None = None) -> list[str]:
    return ["--endpoints", server.endpoint, "--cacert", ca or pki.ca_cert,
            "--cert", pki.client_cert, "--key", pki.client_key]


def test_cli_campaign_leader_and_observe_over_client_cert_tls(
        mtls_etcd: LocalEtcd, pki: TestPKI, election: str,
        procs: Callable[..., Proc]) -> None:
    flags = tls_flags(mtls_etcd, pki)
    a = procs(electfsm("campaign", election, "node-a", "--ttl", "2", *flags))
    key, value = a.line()[1], a.line()[1]
    assert key.startswith(election + "/") and value == "node-a"
    assert candidate_keys(mtls_etcd, pki.client_tls(), election) == [key]

    who = run("leader", election, *flags)
    assert who.returncode == 0, who.stderr
    assert who.stdout.splitlines() == [key, "node-a"]
    observer = procs(electfsm("observe", election, *flags))
    assert [observer.line()[1], observer.line()[1]] == [key, "node-a"]

    for p in (a, observer):
        p.proc.send_signal(signal.SIGTERM)
    assert a.wait() == 0, a.stderr
    assert observer.wait() == 0, observer.stderr
    assert candidate_keys(mtls_etcd, pki.client_tls(), election) == [], "resigned"
    assert "Traceback" not in a.stderr + observer.stderr + who.stderr


def test_cli_user_password_from_the_environment_over_tls_stays_out_of_argv_and_stderr(
        auth_mtls_etcd: LocalEtcd, pki: TestPKI, election: str,
        procs: Callable[..., Proc]) -> None:
    flags = [*tls_flags(auth_mtls_etcd, pki), "--user", "scheduler"]
    env = clean_env(ELECTFSM_PASSWORD=SECRET)
    a = procs(electfsm("campaign", election, "node-a", "--ttl", "2", *flags), env=env)
    key, value = a.line()[1], a.line()[1]
    assert key.startswith(election + "/") and value == "node-a"
    cmdline = Path(f"/proc/{a.pid}/cmdline").read_bytes()
    assert b"--user\0scheduler" in cmdline, "this is the process we think it is"
    assert SECRET.encode() not in cmdline

    who = run("leader", election, *flags, env=env)
    assert who.returncode == 0, who.stderr
    assert who.stdout.splitlines() == [key, "node-a"]
    # The same certificate without the user is refused: the password is what lets us in.
    anonymous = run("leader", election, *tls_flags(auth_mtls_etcd, pki))
    assert anonymous.returncode == 1, anonymous.stderr
    assert "permission denied" in anonymous.stderr.splitlines()[-1]

    a.proc.send_signal(signal.SIGTERM)
    assert a.wait() == 0, a.stderr
    auth = Auth(user="scheduler", password=SECRET)
    assert candidate_keys(auth_mtls_etcd, pki.client_tls(), election, auth) == []
    for text in (a.stderr, who.stderr, who.stdout, anonymous.stderr):
        assert SECRET not in text
    assert "Traceback" not in a.stderr


def test_cli_wrong_cacert_is_one_error_line_and_exit_4_within_the_connect_timeout(
        mtls_etcd: LocalEtcd, pki: TestPKI, election: str) -> None:
    flags = [*tls_flags(mtls_etcd, pki, ca=pki.other_ca_cert),
             "--connect-timeout", f"{CONNECT_TIMEOUT:g}"]
    commands = [["campaign", election, "node-a", *flags], ["leader", election, *flags],
                ["observe", election, *flags]]
    started = time.monotonic()
    runs = [subprocess.Popen(electfsm(*argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=clean_env())
            for argv in commands]
    try:
        for argv, p in zip(commands, runs, strict=True):
            out, err = p.communicate(timeout=30)
            took = time.monotonic() - started
            assert p.returncode == 4, (argv[0], p.returncode, err)  # EXIT_UNREACHABLE
            assert took < CLI_BOUND, f"{argv[0]} took {took:.1f}s"
            errors = [line for line in err.splitlines() if line.startswith("electfsm: error:")]
            assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
            assert mtls_etcd.endpoint in errors[0] and "--connect-timeout" in errors[0]
            assert "CERTIFICATE_VERIFY_FAILED" in errors[0], "the cause is in the message"
            assert "Traceback" not in err and out == ""
    finally:
        for p in runs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert candidate_keys(mtls_etcd, pki.client_tls(), election) == [], "nobody campaigned"
